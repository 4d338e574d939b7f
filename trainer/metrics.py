"""Segmentation metrics: IoU pooled over all pixels of a split's positive images (ignore 255 excluded), mIoU
over labels 0..C, and the false-positive foreground area on negative images; next to them the field's mIoU from
one global confusion matrix over every image of the split (`*_all` keys, as mmsegmentation computes it)."""
from __future__ import annotations

import numpy as np
import torch

IGNORE = 255


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per label TP / (TP + FP + FN) of a truth × prediction confusion matrix; NaN where a label is neither in
    the truth nor predicted (mmsegmentation's `total_area_intersect / total_area_union`)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


class SegmentationMeter:
    """Accumulates a (C+1)×(C+1) confusion matrix over positive images and the predicted foreground fraction
    of negative images (images whose ground truth has no foreground label), and the global confusion matrix
    over all images (`confusion_all`, negative images included)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: truth, cols: prediction
        self.confusion_all = np.zeros((num_labels, num_labels), dtype=np.int64)  # every image of the split
        self.negative_fg = 0.0
        self.negative_images = 0
        self.positive_images = 0

    def _counts(self, p: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        valid = t != IGNORE
        idx = t[valid] * self.num_labels + p[valid]
        return torch.bincount(idx, minlength=self.num_labels ** 2).view(self.num_labels, self.num_labels).numpy()

    def update(self, pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> None:
        """pred, target: B×H×W labels; positive: B bools (the image carries at least one tag). Pixels whose
        target is 255 (ignore, and the padding of evaluation batches of real photos) count nowhere."""
        pred, target = pred.cpu().long(), target.cpu().long()
        for p, t, is_pos in zip(pred, target, positive.cpu().bool()):
            counts = self._counts(p, t)
            self.confusion_all += counts
            if is_pos:
                self.confusion += counts
                self.positive_images += 1
            else:
                valid = t != IGNORE  # a negative image's own pixels: not the padding of its batch
                self.negative_fg += float((p[valid] > 0).float().mean()) if valid.any() else 0.0
                self.negative_images += 1

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.confusion)

    def iou_all(self) -> np.ndarray:
        """Per label IoU from the global confusion matrix over every image of the split."""
        return iou_from_confusion(self.confusion_all)

    def summary(self) -> dict[str, float]:
        """The pooled-over-positive-images keys (background_iou, miou, iou_<label>), negative_fp_area, and the
        global-confusion keys over all images: miou_all, background_iou_all, all_iou_<label>."""
        iou, iou_all = self.iou(), self.iou_all()
        out = {"background_iou": float(iou[0]), "miou": float(np.nanmean(iou)),
               "negative_fp_area": self.negative_fg / max(self.negative_images, 1)}
        for label in range(1, self.num_labels):
            out[f"iou_{label}"] = float(iou[label])
        out["miou_all"] = float(np.nanmean(iou_all)) if np.isfinite(iou_all).any() else float("nan")
        out["background_iou_all"] = float(iou_all[0])
        for label in range(1, self.num_labels):
            out[f"all_iou_{label}"] = float(iou_all[label])
        return out
