"""Stage 2: train the segmenter (f_m, f_x) against the frozen classifier g through DeepSpeed. One readable loop:
batch → forward → objective terms → backward → step, with resumable checkpoints, all-reduced metrics, MLflow
and a progress bar on rank 0, and one consolidated fp32 segmenter.pt at the end."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from . import speedups

from .accel import prepare_images, prepare_modules
from .checkpoint import Checkpointer
from .config import Config, ConfigError
from .data import dataset_classes, resumable_batches
from .engine import deepspeed_config, make_engine, zero_stage
from .files import stage_run_name, write_json
from .loop import StageResult, StepMeter, start_stage
from .model_uri import is_model_uri
from .models import Segmenter, count_parameters
from .objectives import batch_independent, objective
from .select import Selector, check_select_split
from .selftrain import Teacher
from .tracker import Tracker
from .weights import build_segmenter, init_from_checkpoint, load_frozen_g, save_segmenter, segmenter_path


def start_from(model: Segmenter, cfg: Config, lineage: dict[str, str], out: Path) -> dict[str, str]:
    """`model.init_from`: load the matching tensors, print what was loaded and skipped, keep the report and the
    lineage in <run dir>/init_from.json; returns the MLflow tags for the run. An encoder that is g's trunk and
    stays frozen for the whole run is kept: it is this run's g's trunk, while the checkpoint's is the trunk of the
    g *it* was trained with (a binary toy-birds g, say), and frozen it would never adapt to this run's g
    (2026-12-06: loading it cost toy-multi 0.10 test_conflict mIoU, docs/results.md)."""
    frozen_g_trunk = (hasattr(model.encoder, "trunk") and not model.encoder.trainable
                      and cfg.model.encoder_init != "imagenet" and cfg.model.encoder_unfreeze_step < 0)
    report = init_from_checkpoint(model, cfg.model.init_from, cfg.model.init_from_head,
                                  keep=("encoder.",) if frozen_g_trunk else ())
    lineage = lineage or {"init_from": cfg.model.init_from}
    loaded = set(report["loaded"])
    n_loaded = sum(own.numel() for k, own in model.state_dict().items() if k in loaded)
    print(f"init_from {lineage['init_from']}: loaded {len(report['loaded'])} tensors ({n_loaded} values), "
          f"skipped {len(report['skipped'])} (shape mismatch), {len(report['missing'])} not in the checkpoint"
          + (f", kept this run's frozen g-trunk encoder ({len(report['kept'])} tensors)" if report["kept"] else ""))
    for line in report["skipped"]:
        print(f"  skipped {line}")
    for key in report["missing"]:
        print(f"  missing {key}")
    for line in report.get("copied", []):
        print(f"  copied {line} (model.init_from_head=binary)")
    write_json(out / "init_from.json", {"lineage": lineage, **report})
    return {**lineage, "init_from.loaded": len(report["loaded"]), "init_from.skipped": len(report["skipped"]),
            "init_from.missing": len(report["missing"]), "init_from.kept": len(report["kept"])}


def unfreeze_encoder(model: Segmenter, optimizer, lr: float) -> None:
    """`model.encoder_unfreeze_step`: fine-tune the pretrained encoder from then on, at a tenth of the lr."""
    model.encoder.set_trainable(True)
    optimizer.add_param_group({"params": list(model.encoder.parameters()), "lr": lr * 0.1})


def build_models(cfg: Config, classes: list[str], lineage: dict[str, str], out: Path):
    """g (frozen, outside the engine: eval mode, unsharded) and the segmenter around its trunk, started from
    `model.init_from` when set (a local file: drivers resolve registry URIs). Returns model, g, init tags."""
    if is_model_uri(cfg.model.init_from):
        raise ConfigError(f"model.init_from = {cfg.model.init_from!r} is a registry URI: resolve it first "
                          "(model_uri.resolve_init_from), as `wsssrec train`, the demo and sweep trials do")
    g_net, g = load_frozen_g(cfg, len(classes))
    model = build_segmenter(cfg, len(classes), g_net)
    model.check_size(cfg.data.image_size, cfg.data.image_size)
    init_lineage = {k: v for k, v in lineage.items() if k.startswith("init_from")}
    init_tags = start_from(model, cfg, init_lineage, out) if cfg.model.init_from else {}
    return model, g, init_tags


def encoder_unfreeze_step(cfg: Config, model: Segmenter, ds_config: dict) -> int:
    """The step at which the pretrained encoder starts to train (-1: never)."""
    step = cfg.model.encoder_unfreeze_step if hasattr(model.encoder, "set_trainable") else -1
    if step >= 0 and (zero_stage(ds_config) > 0 or cfg.train.bf16):
        raise ConfigError("model.encoder_unfreeze_step needs ZeRO stage 0 without bf16 (ZeRO flattens the "
                          "optimizer's parameter groups at the start); use model.encoder_trainable=true instead")
    return step


def train_segmenter(cfg: Config, parent_run_id: str | None = None, batches: Iterator[dict] | None = None,
                    lineage: dict[str, str] | None = None) -> StageResult:
    """Train f_m and f_x; returns segmenter.pt and the run. `batches` replaces this rank's training stream
    (tests use it to fix the data order across world sizes); `lineage` holds what the driver's URI resolution
    said about g and `model.init_from` (`model_uri.resolve_classifier`, `resolve_init_from`)."""
    lineage = dict(lineage or {})
    speedups.configure(cfg)
    check_select_split(cfg)  # before the run folder is touched
    rank, world, out = start_stage(cfg)
    classes = dataset_classes(cfg)
    model, g, init_tags = build_models(cfg, classes, lineage, out)
    teacher = Teacher.load(cfg, len(classes))  # objective.preset self_train only
    ds_config = deepspeed_config(cfg, cfg.data.batch_size)
    unfreeze_step = encoder_unfreeze_step(cfg, model, ds_config)
    checkpoints = Checkpointer(out / "checkpoints", cfg.train.resume, cfg.train.checkpoint_every,
                               cfg.train.keep_last, cfg.train.seed, ds_config)
    engine, optimizer = make_engine(model, cfg.train.lr, ds_config, zero3_shared_master=cfg.train.zero3_shared_master)
    g.to(engine.device)  # outside the engine, so not moved by it (a no-op on the CPU)
    if teacher is not None:
        teacher.to(engine.device)
    prepare_modules(cfg, model, g, zero_stage=zero_stage(ds_config))  # channels-last / compile (trainer/accel.py)
    if checkpoints.resume_from and 0 <= unfreeze_step < checkpoints.resume_from.step:
        unfreeze_encoder(model, optimizer, cfg.train.lr)  # the saved optimizer state has that group
    state = checkpoints.restore(engine)
    selector = Selector(cfg, classes, g, out, state.selection)  # train.select_split (off when empty)
    accum, micro = ds_config["gradient_accumulation_steps"], cfg.data.batch_size
    if batches is None:
        batches = resumable_batches(cfg, seed=cfg.train.seed + 1, batch_size=micro, samples_seen=state.samples)
    tracker = Tracker(cfg, stage_run_name(cfg, "segmenter"), active=rank == 0, parent_run_id=parent_run_id)
    tracker.set_tags({"trainable_parameters": count_parameters(model, True),
                      "parameters": count_parameters(model), "world_size": world,
                      "zero_stage": zero_stage(ds_config), "global_batch": micro * accum * world, **init_tags})
    if init_tags:
        tracker.log_artifact(out / "init_from.json")
    engine.train()
    g.train()  # a no-op by construction: g stays in eval mode
    meter = StepMeter(state, micro * accum, world, "train")
    bar = tqdm(range(state.step, cfg.train.steps), desc="stage 2: segmenter", disable=rank != 0,
               dynamic_ncols=True, initial=state.step, total=cfg.train.steps)
    record = {}
    for step in bar:
        if step == unfreeze_step:
            unfreeze_encoder(model, optimizer, cfg.train.lr)
        record = meter.step(train_step(engine, g, cfg, batches, accum, step, teacher))  # means over ranks
        bar.set_postfix(loss=f"{record['train/loss']:.4f}", img_s=f"{record['train/images_per_s']:.1f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            tracker.log_metrics(record, step)
        if checkpoints.due(state.step):
            selector.score(engine, state.step, tracker)  # before the checkpoint, which then holds its score
            checkpoints.save(engine, state)
    selector.score(engine, state.step, tracker)
    state_dict = checkpoints.finish(engine, state)  # final checkpoint; every rank gathers, rank 0 gets it
    path = segmenter_path(cfg)
    if rank == 0:
        save_segmenter(state_dict, cfg, classes, selector.final_path(path))
        selector.finish(path, tracker)
        finish_run(out, tracker, state, record, time.time() - meter.start, world, path)
    return StageResult("segmenter", path, tracker.run_id, lineage)


def train_step(engine, g, cfg: Config, batches: Iterator[dict], accum: int, step: int,
               teacher: Teacher | None = None) -> dict[str, float]:
    """One optimizer step over `accum` micro-batches (DeepSpeed steps on the last); the terms' means.
    `teacher`: self-training's (trainer/selftrain.py), which labels each batch first."""
    sums: dict[str, float] = {}
    for _ in range(accum):
        batch = next(batches)
        images = prepare_images(batch["image"], cfg, engine.device)
        labels = batch["labels"].to(images.device, non_blocking=True)
        valid = batch.get("valid")  # crop mode: the pixels that are image, not padding (None: all)
        targets = None if teacher is None else teacher.pseudo_labels(images, labels)
        terms = objective(engine(images), images, labels, g, cfg.objective, segment=AuxSegment(engine), step=step,
                          valid=None if valid is None else valid.to(images.device), targets=targets)
        engine.backward(terms["loss"])
        engine.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item() / accum
    return sums


class AuxSegment:
    """The mask network as L_paste and L_erase call it: the mask logits only (speed-up `aux_masks_only`), and
    `batch_independent` (no BatchNorm in training mode, e.g. a frozen encoder; read each step, since
    `model.encoder_unfreeze_at` can make the encoder trainable mid-run) for their shared forward."""

    def __init__(self, engine):
        self.engine = engine
        self.masks_only = speedups.enabled("aux_masks_only")
        self.batch_independent = batch_independent(getattr(engine, "module", engine))

    def __call__(self, images: torch.Tensor) -> dict:
        return self.engine(images, imagelets=False) if self.masks_only else self.engine(images)


def finish_run(out: Path, tracker: Tracker, state, record: dict, seconds: float, world: int, path: Path) -> None:
    """Rank 0 after the last step: the loss history and speed on disk, the config to MLflow, one line."""
    write_json(out / "train_history.json", {
        "loss": state.history, "seconds": seconds, "world_size": world,
        "images_per_s": record.get("train/images_per_s"),
        "images_per_s_per_rank": record.get("train/images_per_s_rank"), "selection": state.selection})
    tracker.log_artifact(out / "config.yaml")
    tracker.finish()
    speed = (f", {record['train/images_per_s']:.1f} img/s total, {record['train/images_per_s_rank']:.1f} "
             f"per rank × {world}") if record else ""
    print(f"stage 2 done: segmenter saved to {path} ({seconds:.0f} s{speed})")
