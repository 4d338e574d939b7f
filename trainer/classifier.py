"""Stage 1: fine-tune the classifier g (ImageNet EfficientNet-Lite0 or -Lite2, multi-label sigmoid over C) on the
training shards with image-level tags only. g never sees a mask."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .accel import prepare_images, prepare_modules
from .checkpoint import Checkpointer
from .config import ClassifierConfig, Config
from .decouple import Decoupler, save_examples
from .data import dataset_classes, epoch_batches, eval_batches, eval_splits, resumable_batches
from .effnet import EfficientNetLite, imagenet_state_dict, load_state_dict_file, load_trunk
from .engine import deepspeed_config, make_engine, zero_stage
from .files import atomic_torch_save, stage_run_name, write_json
from .loop import LoopState, StageResult, StepMeter, start_stage
from .tracker import Tracker
from .weights import classifier_path, load_classifier

log = logging.getLogger(__name__)


def build_classifier(ccfg: ClassifierConfig, num_classes: int) -> EfficientNetLite:
    """g of `classifier.arch` with trunk weights from `classifier.init` and a fresh C-way head."""
    net = EfficientNetLite(num_classes=num_classes, arch=ccfg.arch)
    if ccfg.init == "imagenet":
        load_trunk(net, imagenet_state_dict(ccfg.arch))
    elif ccfg.init not in ("none", ""):
        load_trunk(net, load_state_dict_file(ccfg.init))
    if ccfg.train_layers == "head":
        net.freeze_trunk()
    return net


def colour_augment(images: torch.Tensor, grayscale_p: float, channel_shuffle_p: float, seed: int) -> torch.Tensor:
    """Stage-1 augmentation against the colour shortcut (on toy-birds blue water stands for "bird"): each image
    is shown in grayscale with probability `grayscale_p`, else with its RGB channels permuted with probability
    `channel_shuffle_p` (a non-identity permutation), else unchanged. Shape and texture survive; colour stops
    telling the class. The same `seed` gives the same draws (a resumed run repeats them)."""
    if grayscale_p <= 0 and channel_shuffle_p <= 0:
        return images
    generator = torch.Generator().manual_seed(seed)
    B = images.shape[0]
    gray = torch.rand(B, generator=generator) < grayscale_p
    shuffle = (~gray) & (torch.rand(B, generator=generator) < channel_shuffle_p)
    perms = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    chosen = perms[torch.randint(len(perms), (B,), generator=generator)]
    gray, shuffle, chosen = gray.to(images.device), shuffle.to(images.device), chosen.to(images.device)
    out = images.clone()
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    out[gray] = luma[gray].expand(-1, 3, -1, -1)
    if shuffle.any():
        idx = chosen[shuffle][:, :, None, None].expand(-1, -1, *images.shape[-2:])
        out[shuffle] = torch.gather(images[shuffle], 1, idx)
    return out


@torch.no_grad()
def classifier_accuracy(g: torch.nn.Module, cfg: Config, split: str) -> dict[str, float]:
    """Multi-label accuracy (σ > 0.5 against the tags, averaged over images and classes), also split by
    positive and negative images."""
    g.eval()
    correct = total = pos_correct = pos_total = 0.0
    for batch in eval_batches(cfg, split):
        hits = ((torch.sigmoid(g(batch["image"])) > 0.5).float() == batch["labels"]).float()
        positive = batch["labels"].sum(dim=1) > 0
        correct += hits.sum().item()
        total += hits.numel()
        pos_correct += hits[positive].sum().item()
        pos_total += hits[positive].numel()
    neg_total = total - pos_total
    return {"accuracy": correct / max(total, 1),
            "accuracy_positive": pos_correct / max(pos_total, 1),
            "accuracy_negative": (correct - pos_correct) / max(neg_total, 1)}


@torch.no_grad()
def misclassified(g: torch.nn.Module, batches: Iterator[dict]) -> tuple[list[str], dict[str, list[int]]]:
    """The keys of the images that g gets wrong (any class's σ > 0.5 decision differs from the tag; padding
    repeats skipped), and, per group, [wrong, total]: a group is positive/negative, plus the sample's
    `background` where its metadata has one (toy-birds: water/land), so a log shows where the errors sit."""
    g.eval()
    wrong: list[str] = []
    groups: dict[str, list[int]] = {}
    for batch in batches:
        hits = ((torch.sigmoid(g(batch["image"])) > 0.5).float() == batch["labels"]).all(dim=1)
        padded = batch.get("padded", torch.zeros(len(hits), dtype=torch.bool))
        for i, key in enumerate(batch["key"]):
            if padded[i]:
                continue
            meta = batch["meta"][i] if "meta" in batch else {}
            group = "positive" if batch["labels"][i].sum() > 0 else "negative"
            if isinstance(meta, dict) and meta.get("background"):
                group += f"/{meta['background']}"
            counts = groups.setdefault(group, [0, 0])
            counts[1] += 1
            if not hits[i]:
                counts[0] += 1
                wrong.append(key)
    return wrong, dict(sorted(groups.items()))


def jtt_weights(keys: list[str], error_set: frozenset[str] | set[str], upweight: float) -> torch.Tensor:
    """Per-image loss weights of JTT's second pass: `upweight` for an image in the error set, 1 otherwise."""
    return torch.tensor([upweight if key in error_set else 1.0 for key in keys])


def jtt_loss(logits: torch.Tensor, labels: torch.Tensor, keys: list[str], error_set: frozenset[str],
             upweight: float, mean_weight: float) -> torch.Tensor:
    """Stage 1's loss: BCE over classes, averaged over images; an image in `error_set` counts `upweight` times,
    and the mean is divided by the data set's mean weight `mean_weight`, so the loss is JTT's upsampled-data
    loss in expectation at the plain loss's scale. No error set: exactly the plain mean BCE."""
    if not error_set:
        return F.binary_cross_entropy_with_logits(logits, labels)
    per_image = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
    return (per_image * jtt_weights(keys, error_set, upweight).to(per_image.device)).mean() / mean_weight


def classifier_step(engine, batch: dict, cfg: Config, seed_key: tuple, error_set: frozenset[str] = frozenset(),
                    upweight: float = 1.0, mean_weight: float = 1.0, decoupler: Decoupler | None = None,
                    examples: Path | None = None) -> float:
    """One stage-1 micro-step: context decoupling with a first-round segmenter (`decoupler`; its first pairs
    saved as a picture to `examples`), colour augmentation (both seeded by `seed_key`), forward, JTT-weighted BCE,
    backward and DeepSpeed's step (which steps the optimizer at the end of an accumulation); the loss."""
    images = prepare_images(batch["image"], cfg, engine.device)
    labels = batch["labels"].to(images.device)
    if decoupler is not None:
        before = images
        # a tuple of ints hashes the same in every process (a resumed run draws the same pairs)
        images, labels, pairs = decoupler(images, labels, seed=hash(seed_key + (1,)))
        if examples is not None:
            save_examples(before, images, pairs, examples)
    images = colour_augment(images, cfg.classifier.grayscale_p, cfg.classifier.channel_shuffle_p,
                            seed=hash(seed_key))
    logits = engine(images)
    loss = jtt_loss(logits, labels, batch["key"], error_set, upweight, mean_weight)
    engine.backward(loss)
    engine.step()
    return loss.item()


def _fit(cfg: Config, net: torch.nn.Module, epochs: int, directory: Path, tracker: Tracker, prefix: str,
         error_set: frozenset[str] = frozenset(), upweight: float = 1.0, dataset_size: int = 0,
         decoupler: Decoupler | None = None) -> tuple[dict[str, torch.Tensor] | None, LoopState, StepMeter]:
    """Fine-tune `net` for `epochs` epochs of the training split under DeepSpeed, checkpointing into
    `directory` (a killed run resumes there); returns the fp32 state dict on rank 0 (None elsewhere). With an
    error set, each image's BCE is weighted by `jtt_weights` and the batch mean divided by the data set's mean
    weight, which is JTT's upsampling of the error set in expectation, at an unchanged learning-rate scale. With a
    `decoupler`, batches are decoupled first (trainer/decouple.py); the first step's pairs are saved as
    <directory>/../decouple_examples.png."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    micro = cfg.classifier.batch_size
    ds_config = deepspeed_config(cfg, micro)
    accum = ds_config["gradient_accumulation_steps"]
    steps = max(epoch_batches(cfg, micro) // accum, 1) * epochs
    checkpoints = Checkpointer(directory, cfg.train.resume, cfg.train.checkpoint_every, cfg.train.keep_last,
                               cfg.train.seed, ds_config)
    engine, _ = make_engine(net, cfg.classifier.lr, ds_config, cfg.classifier.weight_decay,
                            zero3_shared_master=cfg.train.zero3_shared_master)
    prepare_modules(cfg, net, zero_stage=zero_stage(ds_config))  # channels-last / compile (trainer/accel.py)
    if decoupler is not None:
        decoupler.to(engine.device)
    state = checkpoints.restore(engine)
    batches = resumable_batches(cfg, seed=cfg.train.seed, batch_size=micro, samples_seen=state.samples)
    mean_weight = 1.0 + (upweight - 1.0) * len(error_set) / max(dataset_size, 1)
    engine.train()
    bar = tqdm(range(state.step, steps), desc=f"stage 1: {prefix}", disable=rank != 0, dynamic_ncols=True,
               initial=state.step, total=steps)
    meter = StepMeter(state, micro * accum, world, prefix)
    for step in bar:
        loss_sum = 0.0
        for micro_step in range(accum):  # DeepSpeed steps the optimizer on the last micro-batch
            examples = directory.parent / "decouple_examples.png" if (
                decoupler is not None and rank == 0 and step == state.step and micro_step == 0) else None
            loss = classifier_step(engine, next(batches), cfg, (cfg.train.seed, step, micro_step, rank),
                                   error_set, upweight, mean_weight, decoupler, examples)
            loss_sum += loss / accum
        record = meter.step({"loss": loss_sum})  # means over ranks; advances step, data position, history
        bar.set_postfix(loss=f"{record[f'{prefix}/loss']:.3f}", img_s=f"{record[f'{prefix}/images_per_s']:.0f}")
        if step % cfg.train.log_every == 0 or step == steps - 1:
            tracker.log_metrics(record, step)
        if checkpoints.due(state.step):
            checkpoints.save(engine, state)
    state_dict = checkpoints.finish(engine, state)  # final checkpoint; every rank gathers, rank 0 gets it
    return state_dict, state, meter


def jtt_error_set(cfg: Config, out: Path, classes: list[str], tracker: Tracker) -> tuple[frozenset[str], int]:
    """JTT's first pass (Liu et al., "Just Train Twice", 2021): an ERM g trained `classifier.jtt_epochs` epochs
    only, whose training-split mistakes are the error set; JTT's premise is that these are the images against
    the bias (on toy-birds they are not: docs/results.md). Saved to <run>/jtt_error_set.json, which a resumed
    run reuses; rank 0 computes it and every rank reads the file."""
    path = out / "jtt_error_set.json"
    rank = torch.distributed.get_rank()
    if not path.is_file():
        net = build_classifier(cfg.classifier, len(classes))
        state_dict, _, _ = _fit(cfg, net, cfg.classifier.jtt_epochs, out / "classifier_jtt_checkpoints", tracker,
                                "classifier_jtt")
        if rank == 0:
            net = EfficientNetLite(num_classes=len(classes), arch=cfg.classifier.arch)
            net.load_state_dict(state_dict, strict=True)
            wrong, groups = misclassified(net, tqdm(eval_batches(cfg, "train"), desc="JTT error set",
                                                    dynamic_ncols=True))
            total = sum(t for _, t in groups.values())
            write_json(path, {"epochs": cfg.classifier.jtt_epochs, "images": total, "keys": sorted(wrong),
                              "groups": {k: {"wrong": w, "total": t} for k, (w, t) in groups.items()}})
            tracker.log_metrics({"classifier_jtt/error_set": len(wrong), "classifier_jtt/train_images": total}, 0)
            tracker.log_artifact(path)
            print(f"JTT error set: {len(wrong)} of {total} training images;",
                  ", ".join(f"{k} {w}/{t}" for k, (w, t) in groups.items()))
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
    data = json.loads(path.read_text())
    return frozenset(data["keys"]), int(data["images"])


def train_classifier(cfg: Config, parent_run_id: str | None = None,
                     lineage: dict[str, str] | None = None) -> StageResult:
    """Fine-tune g for `classifier.epochs` epochs; returns the saved state dict's path and the run. With
    `classifier.jtt_epochs` > 0 a short first pass finds the training images g gets wrong and the real pass
    weights them by `classifier.jtt_upweight` (`jtt_error_set`); with `classifier.decouple_from` a first-round
    segmenter decouples objects from their context (trainer/decouple.py; `lineage`: its registry tags)."""
    rank, world, out = start_stage(cfg)
    classes = dataset_classes(cfg)
    micro = cfg.classifier.batch_size
    ds_config = deepspeed_config(cfg, micro)
    accum = ds_config["gradient_accumulation_steps"]
    tracker = Tracker(cfg, stage_run_name(cfg, "classifier"), active=rank == 0, parent_run_id=parent_run_id)
    tracker.set_tags({"world_size": world, "zero_stage": zero_stage(ds_config),
                      "global_batch": micro * accum * world, **(lineage or {})})
    error_set, dataset_size = frozenset(), 0
    if cfg.classifier.jtt_epochs > 0:
        error_set, dataset_size = jtt_error_set(cfg, out, classes, tracker)
        tracker.set_tags({"jtt.error_set": len(error_set), "jtt.upweight": cfg.classifier.jtt_upweight})
    decoupler = None
    if cfg.classifier.decouple_from:
        decoupler = Decoupler(cfg.classifier.decouple_from, classes, cfg.classifier.decouple_p,
                              cfg.classifier.decouple_dilate)
        tracker.set_tags({"decouple.from": cfg.classifier.decouple_from, "decouple.p": cfg.classifier.decouple_p})
    net = build_classifier(cfg.classifier, len(classes))
    state_dict, state, meter = _fit(cfg, net, cfg.classifier.epochs, out / "classifier_checkpoints", tracker,
                                    "classifier", error_set, cfg.classifier.jtt_upweight, dataset_size, decoupler)
    if rank == 0 and decoupler is not None and (out / "decouple_examples.png").is_file():
        tracker.log_artifact(out / "decouple_examples.png")
    path = classifier_path(cfg)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state_dict, path)
        write_json(out / "classifier_history.json", {"loss": state.history, "seconds": time.time() - meter.start,
                                                     "world_size": world})
        g = load_classifier(path, len(classes))  # a plain module: the engine's may hold only a ZeRO-3 shard
        metrics = {}
        for split in eval_splits(cfg):
            for key, value in classifier_accuracy(g, cfg, split).items():
                metrics[f"{split}/g_{key}"] = value
        tracker.log_metrics(metrics, state.step)
        log.info("g accuracy: %s", metrics)
        print("stage 1 done: g saved to", path, {k: round(v, 3) for k, v in metrics.items()})
        tracker.log_artifact(out / "config.yaml")
        tracker.finish()
    return StageResult("classifier", path, tracker.run_id)
