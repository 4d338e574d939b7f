"""Stage 2: train the segmenter (f_m, f_x) against the frozen classifier g through DeepSpeed. One readable loop:
batch → forward → objective terms → backward → step, with resumable checkpoints, all-reduced metrics, MLflow
and a progress bar on rank 0, and one consolidated fp32 segmenter.pt at the end."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .checkpoint import Checkpointer
from .config import Config, ConfigError
from .data import dataset_classes, resumable_batches
from .engine import deepspeed_config, make_engine, zero_stage
from .files import write_json
from .loop import StepMeter, start_stage
from .losses import objective
from .models import Segmenter, count_parameters
from .tracking import Tracker
from .weights import (build_segmenter, init_from_checkpoint, load_frozen_g, save_segmenter,
                      segmenter_path)


def start_from(model: Segmenter, cfg: Config, lineage: dict[str, str], out: Path) -> dict[str, str]:
    """`model.init_from`: load the matching tensors, print what was loaded and skipped, keep the report and the
    lineage in <run dir>/init_from.json; returns the MLflow tags for the run."""
    report = init_from_checkpoint(model, cfg.model.init_from)
    lineage = lineage or {"init_from": cfg.model.init_from}
    loaded = set(report["loaded"])
    n_loaded = sum(own.numel() for k, own in model.state_dict().items() if k in loaded)
    print(f"init_from {lineage['init_from']}: loaded {len(report['loaded'])} tensors ({n_loaded} values), "
          f"skipped {len(report['skipped'])} (shape mismatch), {len(report['missing'])} not in the checkpoint")
    for line in report["skipped"]:
        print(f"  skipped {line}")
    for key in report["missing"]:
        print(f"  missing {key}")
    write_json(out / "init_from.json", {"lineage": lineage, **report})
    return {**lineage, "init_from.loaded": len(report["loaded"]), "init_from.skipped": len(report["skipped"]),
            "init_from.missing": len(report["missing"])}


def unfreeze_encoder(model: Segmenter, optimizer, lr: float) -> None:
    """`model.encoder_unfreeze_step`: fine-tune the pretrained encoder from then on, at a tenth of the lr."""
    model.encoder.set_trainable(True)
    optimizer.add_param_group({"params": list(model.encoder.parameters()), "lr": lr * 0.1})


def train_segmenter(cfg: Config, parent_run_id: str | None = None, batches: Iterator[dict] | None = None,
                    init_lineage: dict[str, str] | None = None) -> Path:
    """Train f_m and f_x; returns the path of segmenter.pt. `batches` replaces this rank's training stream
    (tests use it to fix the data order across world sizes); `init_lineage` is what `resolve_init_from` said
    about `model.init_from`."""
    rank, world, out = start_stage(cfg)
    classes = dataset_classes(cfg)
    g_net, g = load_frozen_g(cfg, len(classes))  # g stays outside the engine: frozen, eval mode, unsharded
    model = build_segmenter(cfg, len(classes), g_net)
    model.check_size(cfg.data.image_size, cfg.data.image_size)
    init_tags = {}
    if cfg.model.init_from:
        from .registry import is_model_uri, resolve_init_from

        if is_model_uri(cfg.model.init_from):  # `wsssrec train` resolves it before; demo and sweeps get here
            init_lineage = resolve_init_from(cfg)
        init_tags = start_from(model, cfg, init_lineage, out)
    ds_config = deepspeed_config(cfg, cfg.data.batch_size)
    unfreeze_step = cfg.model.encoder_unfreeze_step if hasattr(model.encoder, "set_trainable") else -1
    if unfreeze_step >= 0 and (zero_stage(ds_config) > 0 or cfg.train.bf16):
        raise ConfigError("model.encoder_unfreeze_step needs ZeRO stage 0 without bf16 (ZeRO flattens the "
                          "optimizer's parameter groups at the start); use model.encoder_trainable=true instead")
    checkpoints = Checkpointer(out / "checkpoints", cfg.train.resume, cfg.train.checkpoint_every,
                               cfg.train.keep_last, cfg.train.seed, ds_config)
    engine, optimizer = make_engine(model, cfg.train.lr, ds_config, zero3_shared_master=cfg.train.zero3_shared_master)
    if checkpoints.resume_from and 0 <= unfreeze_step < checkpoints.resume_from.step:
        unfreeze_encoder(model, optimizer, cfg.train.lr)  # the saved optimizer state has that group
    state = checkpoints.restore(engine)
    accum = ds_config["gradient_accumulation_steps"]
    micro = cfg.data.batch_size
    if batches is None:
        batches = resumable_batches(cfg, seed=cfg.train.seed + 1, batch_size=micro, samples_seen=state.samples)
    tracker = Tracker(cfg, f"{cfg.train.run_name or 'run'}-segmenter", active=rank == 0,
                      parent_run_id=parent_run_id)
    tracker.set_tags({"trainable_parameters": count_parameters(model, True),
                      "parameters": count_parameters(model), "world_size": world,
                      "zero_stage": zero_stage(ds_config), "global_batch": micro * accum * world, **init_tags})
    if init_tags:
        tracker.log_artifact(out / "init_from.json")
    engine.train()
    g.train()  # a no-op by construction: g stays in eval mode
    bar = tqdm(range(state.step, cfg.train.steps), desc="stage 2: segmenter", disable=rank != 0,
               dynamic_ncols=True, initial=state.step, total=cfg.train.steps)
    meter, record = StepMeter(state, micro * accum, world, "train"), {}
    for step in bar:
        if step == unfreeze_step:
            unfreeze_encoder(model, optimizer, cfg.train.lr)
        sums: dict[str, float] = {}
        for _ in range(accum):  # DeepSpeed steps the optimizer on the last micro-batch
            batch = next(batches)
            images, labels = batch["image"], batch["labels"]
            terms = objective(engine(images), images, labels, g, cfg.objective, segment=engine, step=step)
            engine.backward(terms["loss"])
            engine.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() / accum
        record = meter.step(sums)  # means over ranks; advances step, data position and loss history
        bar.set_postfix(loss=f"{record['train/loss']:.4f}", img_s=f"{record['train/images_per_s']:.1f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            tracker.log_metrics(record, step)
        if checkpoints.due(state.step):
            checkpoints.save(engine, state)
    state_dict = checkpoints.finish(engine, state)  # final checkpoint; every rank gathers, rank 0 gets it
    path = segmenter_path(cfg)
    if rank == 0:
        seconds = time.time() - meter.start
        save_segmenter(state_dict, cfg, classes, path)
        write_json(out / "train_history.json", {
            "loss": state.history, "seconds": seconds, "world_size": world,
            "images_per_s": record.get("train/images_per_s"),
            "images_per_s_per_rank": record.get("train/images_per_s_rank")})
        tracker.log_artifact(out / "config.yaml")
        tracker.finish()
        speed = (f", {record['train/images_per_s']:.1f} img/s total, {record['train/images_per_s_rank']:.1f} "
                 f"per rank × {world}") if record else ""
        print(f"stage 2 done: segmenter saved to {path} ({seconds:.0f} s{speed})")
    return path
