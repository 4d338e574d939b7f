"""The number ASHA and the registry compare trials on: the segmenter's mIoU on the validation split (as
`wsssrec eval` computes it for the method) when that split has masks, and the validation loss. The loss is
taken under the experiment's own objective weights, not the trial's λ_m and λ_c, so that trials with
different weights are compared on one scale."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from trainer.config import Config, ObjectiveConfig
from trainer.data import dataset_classes, eval_batches, split_has_masks
from trainer.evaluate import SplitScores
from trainer.inference import PredictSettings, predict_masks
from trainer.metrics import SegmentationMeter
from trainer.objectives import objective
from trainer.weights import load_frozen_g, load_segmenter


def metric_key(split: str, kind: str) -> str:
    """`val/method/miou` (the key `wsssrec eval` logs and the registry shows) or `val/loss`."""
    return f"{split}/method/miou" if kind == "miou" else f"{split}/loss"


def resolve_metric(cfg: Config, split: str, kind: str) -> tuple[str, str]:
    """(metric key, "max" | "min") for sweep.metric = auto | miou | loss on this data set."""
    has_masks = split_has_masks(cfg, split)
    if kind == "auto":
        kind = "miou" if has_masks else "loss"
    if kind == "miou" and not has_masks:
        from trainer.config import ConfigError

        raise ConfigError(f"sweep.metric=miou needs masks, but split {split!r} of {cfg.data.url} has none; "
                          "use sweep.metric=loss (or auto)")
    return metric_key(split, kind), "max" if kind == "miou" else "min"


@torch.no_grad()
def validation_metrics(cfg: Config, segmenter_path: str | Path, split: str,
                       reference: ObjectiveConfig) -> dict[str, float]:
    """mIoU, per-label IoU and boundary F at 2 px (when `split` has masks; predicted with `eval.flip`,
    `eval.fg_threshold`, the preserve gate at `eval.gate_threshold` and the CRF, as `wsssrec eval` predicts) and
    the mean loss under `reference` weights."""
    classes = dataset_classes(cfg)
    g_net, g = load_frozen_g(cfg, len(classes))
    model, _, _ = load_segmenter(segmenter_path, g_net)
    model.eval()
    has_masks = split_has_masks(cfg, split)
    num_labels = len(classes) + 1
    scored = SplitScores({"method": SegmentationMeter(num_labels)}, {"method": {}})  # as `wsssrec eval` scores
    weights = replace(reference, paste_weight=0.0)  # L_paste only exists while training
    loss_sum, images_seen = 0.0, 0
    for batch in eval_batches(cfg, split):
        images, labels = batch["image"], batch["labels"]
        out = model(images)
        terms = objective(out, images, labels, g, weights, training=False)
        loss_sum += float(terms["loss"]) * images.shape[0]
        images_seen += images.shape[0]
        if has_masks:
            pred = predict_masks(model, images, PredictSettings.of(cfg.eval), g, cfg.objective, out).labels
            scored.update({"method": pred}, batch, num_labels)
    metrics = {metric_key(split, "loss"): loss_sum / max(images_seen, 1)}
    if has_masks:
        summary = {**scored.meters["method"].summary(), **scored.boundary["method"].summary()}
        metrics.update({f"{split}/method/{k}": v for k, v in summary.items()})
    return metrics
