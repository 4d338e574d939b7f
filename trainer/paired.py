"""Scores on a paired split (toy-birds `test_paired`): every object layout appears twice, identical, once on a
bias-aligned and once on a bias-conflicting background (water / land), so differences between the two groups
are the background's doing alone and can be compared image by image.

For each prediction kind `PairedScores` keeps one meter per image; `summary()` gives, with A = water and B =
land (or the two groups in sorted order for other names):

- per group: the pooled scores of that group's images, exactly as every split is scored (IoU pooled over the
  group's positive images, mIoU over labels, negative FP area, boundary F mean over positive images);
- `paired_gap`: mIoU(A) − mIoU(B), both pooled over the paired split's positive images of the group;
- `pair_gap_mean`, `pair_gap_std`: mean and standard deviation over the positive pairs of
  mIoU(A image) − mIoU(B image), each image's mIoU the mean IoU over the labels present in it or predicted;
- `pair_fp_gap`: mean over the negative pairs of FP area(A image) − FP area(B image);
- `boundary_f_gap`: boundary F(A) − boundary F(B) (means over positive images);
- `worst_group` and `worst_group_miou`: the group with the lower pooled mIoU ("tie" when equal, as for the
  trivial predictions, which are the same on both images of a pair), and that mIoU.
Only complete pairs (both images scored) enter the per-pair numbers."""
from __future__ import annotations

import numpy as np
import torch

from .metrics import SegmentationMeter

GAP_ORDER = ("water", "land")  # toy-birds: paired_gap = water − land


def pair_keys(meta: list) -> list[tuple[int, str] | None]:
    """(pair id, group) of each sample from its metadata (`pair`, `group`); None where a sample has none."""
    keys = []
    for m in meta:
        if isinstance(m, dict) and m.get("pair") is not None and m.get("group"):
            keys.append((int(m["pair"]), str(m["group"])))
        else:
            keys.append(None)
    return keys


def merged(meters: list[SegmentationMeter], num_labels: int) -> SegmentationMeter:
    """One meter holding what all `meters` saw (their images pooled)."""
    total = SegmentationMeter(num_labels)
    for meter in meters:
        total.confusion += meter.confusion
        total.negative_fg += meter.negative_fg
        total.negative_images += meter.negative_images
        total.positive_images += meter.positive_images
    return total


def gap_order(groups) -> tuple[str, str]:
    """(A, B) of the gap A − B: water − land, else the two groups sorted."""
    names = sorted(groups)
    if set(names) == set(GAP_ORDER):
        return GAP_ORDER
    if len(names) != 2:
        raise ValueError(f"a paired split needs exactly two groups, got {names}")
    return names[0], names[1]


class PairedScores:
    """Per-image meters and boundary F of one prediction kind on a paired split, keyed by (pair, group)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.images: dict[tuple[int, str], tuple[SegmentationMeter, float]] = {}

    def update(self, pred: torch.Tensor, truth: torch.Tensor, positive: torch.Tensor, keys: list,
               boundary_f: np.ndarray) -> None:
        """One batch: `keys` from `pair_keys` (None: not part of a pair), `boundary_f` each image's F."""
        for i, key in enumerate(keys):
            if key is None:
                continue
            meter = SegmentationMeter(self.num_labels)
            meter.update(pred[i:i + 1], truth[i:i + 1], positive[i:i + 1])
            self.images[key] = (meter, float(boundary_f[i]))

    def summary(self) -> dict:
        groups = sorted({group for _, group in self.images})
        if not groups:
            return {}
        a, b = gap_order(groups)
        by_group = {}
        for group in (a, b):
            items = [(m, f) for (_, g), (m, f) in self.images.items() if g == group]
            pooled = merged([m for m, _ in items], self.num_labels)
            fs = [f for m, f in items if m.positive_images]
            by_group[group] = {**pooled.summary(), "boundary_f": float(np.mean(fs)) if fs else float("nan"),
                               "images": len(items), "positive_images": pooled.positive_images}
        pairs = sorted({pair for pair, _ in self.images})
        complete = [(self.images[(p, a)][0], self.images[(p, b)][0]) for p in pairs
                    if (p, a) in self.images and (p, b) in self.images]
        diffs = [_image_miou(ma) - _image_miou(mb) for ma, mb in complete if ma.positive_images and mb.positive_images]
        diffs = [d for d in diffs if np.isfinite(d)]
        fp = [ma.negative_fg - mb.negative_fg for ma, mb in complete if ma.negative_images and mb.negative_images]
        score = {g: float(np.nan_to_num(by_group[g]["miou"], nan=np.inf)) for g in (a, b)}
        worst = "tie" if score[a] == score[b] else min(score, key=score.get)
        return {
            "groups": by_group, "gap": [a, b],
            "paired_gap": by_group[a]["miou"] - by_group[b]["miou"],
            "pair_gap_mean": float(np.mean(diffs)) if diffs else float("nan"),
            "pair_gap_std": float(np.std(diffs)) if diffs else float("nan"),
            "pair_fp_gap": float(np.mean(fp)) if fp else float("nan"),
            "boundary_f_gap": by_group[a]["boundary_f"] - by_group[b]["boundary_f"],
            "positive_pairs": len(diffs), "negative_pairs": len(fp),
            "worst_group": worst, "worst_group_miou": by_group[b if worst == "tie" else worst]["miou"],
        }


def _image_miou(meter: SegmentationMeter) -> float:
    iou = meter.iou()
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
