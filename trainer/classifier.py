"""Stage 1: fine-tune the classifier g (ImageNet EfficientNet-Lite0, multi-label sigmoid over C) on the
training shards with image-level tags only. g never sees a mask."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import Checkpointer
from .config import ClassifierConfig, Config
from .data import dataset_classes, eval_batches
from .effnet import EfficientNetLite0, imagenet_lite0_state_dict, load_state_dict_file, load_trunk
from .runtime import (StepMeter, atomic_torch_save, deepspeed_config, epoch_batches, make_engine,
                      resumable_batches, run_dir, start_stage, write_json, zero_stage)
from .tracking import Tracker

log = logging.getLogger(__name__)


def build_classifier(ccfg: ClassifierConfig, num_classes: int) -> EfficientNetLite0:
    """g with trunk weights from `classifier.init` and a fresh C-way head."""
    net = EfficientNetLite0(num_classes=num_classes)
    if ccfg.init == "imagenet":
        load_trunk(net, imagenet_lite0_state_dict())
    elif ccfg.init not in ("none", ""):
        load_trunk(net, load_state_dict_file(ccfg.init))
    if ccfg.train_layers == "head":
        net.freeze_trunk()
    return net


def load_classifier(path: str | Path, num_classes: int) -> EfficientNetLite0:
    """A trained g from its checkpoint (plain tensors, loaded with weights_only=True)."""
    state = load_state_dict_file(path)
    net = EfficientNetLite0(num_classes=num_classes)
    fc = state.get("_fc.weight")
    if fc is None or fc.shape[0] != num_classes:
        got = "no `_fc` head" if fc is None else f"{fc.shape[0]} classes"
        raise ValueError(f"classifier checkpoint {path} has {got}; the data set has {num_classes} classes")
    net.load_state_dict(state, strict=True)
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
    out = images.clone()
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    out[gray] = luma[gray].expand(-1, 3, -1, -1)
    if shuffle.any():
        idx = chosen[shuffle][:, :, None, None].expand(-1, -1, *images.shape[-2:])
        out[shuffle] = torch.gather(images[shuffle], 1, idx)
    return out


def classifier_path(cfg: Config) -> Path:
    return Path(cfg.classifier.checkpoint) if cfg.classifier.checkpoint else run_dir(cfg) / "classifier.pt"


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


def train_classifier(cfg: Config, parent_run_id: str | None = None) -> Path:
    """Fine-tune g for `classifier.epochs` epochs; returns the path of the saved state dict."""
    rank, world, out = start_stage(cfg)
    classes = dataset_classes(cfg)
    micro = cfg.classifier.batch_size
    ds_config = deepspeed_config(cfg, micro)
    accum = ds_config["gradient_accumulation_steps"]
    steps = max(epoch_batches(cfg, micro) // accum, 1) * cfg.classifier.epochs
    net = build_classifier(cfg.classifier, len(classes))
    checkpoints = Checkpointer(out / "classifier_checkpoints", cfg.train.resume, cfg.train.checkpoint_every,
                               cfg.train.keep_last, cfg.train.seed, ds_config)
    engine, _ = make_engine(net, cfg.classifier.lr, ds_config, cfg.classifier.weight_decay,
                            zero3_shared_master=cfg.train.zero3_shared_master)
    state = checkpoints.restore(engine)
    batches = resumable_batches(cfg, seed=cfg.train.seed, batch_size=micro, samples_seen=state.samples)
    tracker = Tracker(cfg, f"{cfg.train.run_name or 'run'}-classifier", active=rank == 0,
                      parent_run_id=parent_run_id)
    tracker.set_tags({"world_size": world, "zero_stage": zero_stage(ds_config),
                      "global_batch": micro * accum * world})
    engine.train()
    bar = tqdm(range(state.step, steps), desc="stage 1: g", disable=rank != 0, dynamic_ncols=True,
               initial=state.step, total=steps)
    meter, record = StepMeter(state, micro * accum, world, "classifier"), {}
    for step in bar:
        loss_sum = 0.0
        for micro_step in range(accum):  # DeepSpeed steps the optimizer on the last micro-batch
            batch = next(batches)
            images = colour_augment(batch["image"], cfg.classifier.grayscale_p, cfg.classifier.channel_shuffle_p,
                                    seed=hash((cfg.train.seed, step, micro_step, rank)))
            logits = engine(images)
            loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item() / accum
        record = meter.step({"loss": loss_sum})  # means over ranks; advances step, data position, history
        bar.set_postfix(loss=f"{record['classifier/loss']:.3f}", img_s=f"{record['classifier/images_per_s']:.0f}")
        if step % cfg.train.log_every == 0 or step == steps - 1:
            tracker.log_metrics(record, step)
        if checkpoints.due(state.step):
            checkpoints.save(engine, state)
    state_dict = checkpoints.finish(engine, state)  # final checkpoint; every rank gathers, rank 0 gets it
    path = classifier_path(cfg)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state_dict, path)
        write_json(out / "classifier_history.json", {"loss": state.history, "seconds": time.time() - meter.start,
                                                     "world_size": world})
        g = load_classifier(path, len(classes))  # a plain module: the engine's may hold only a ZeRO-3 shard
        metrics = {}
        for split in cfg.eval.splits:
            for key, value in classifier_accuracy(g, cfg, split).items():
                metrics[f"{split}/g_{key}"] = value
        tracker.log_metrics(metrics, steps)
        log.info("g accuracy: %s", metrics)
        print("stage 1 done: g saved to", path, {k: round(v, 3) for k, v in metrics.items()})
        tracker.log_artifact(out / "config.yaml")
        tracker.finish()
    return path
