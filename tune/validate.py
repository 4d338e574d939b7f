"""The number ASHA and the registry compare trials on: the segmenter's mIoU on the validation split (as
`wsssrec eval` computes it for the method) when that split has masks, and the validation loss. The loss is
taken under the experiment's own objective weights, not the trial's λ_m and λ_c, so that trials with
different weights are compared on one scale."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config, ObjectiveConfig
from trainer.data import dataset_classes, split_has_masks
from trainer.select import split_scores
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
    the mean loss under `reference` weights (`trainer.select.split_scores`)."""
    classes = dataset_classes(cfg)
    g_net, g = load_frozen_g(cfg, len(classes))
    model, _, _ = load_segmenter(segmenter_path, g_net)
    model.eval()
    scores = split_scores(model, g, cfg, split, len(classes) + 1, reference)
    metrics = {metric_key(split, "loss"): scores.pop("loss")}
    metrics.update({f"{split}/method/{k}": v for k, v in scores.items()})
    return metrics
