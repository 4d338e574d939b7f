"""Segmentation metrics: IoU pooled over all pixels of a split's positive images (ignore 255 excluded), mIoU
over labels 0..C, and the false-positive foreground area on negative images."""
from __future__ import annotations

import numpy as np
import torch

IGNORE = 255


class SegmentationMeter:
    """Accumulates a (C+1)×(C+1) confusion matrix over positive images and the predicted foreground fraction
    of negative images (images whose ground truth has no foreground label)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: truth, cols: prediction
        self.negative_fg = 0.0
        self.negative_images = 0
        self.positive_images = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> None:
        """pred, target: B×H×W labels; positive: B bools (the image carries at least one tag)."""
        pred, target = pred.cpu().long(), target.cpu().long()
        for p, t, is_pos in zip(pred, target, positive.cpu().bool()):
            if is_pos:
                valid = t != IGNORE
                idx = t[valid] * self.num_labels + p[valid]
                self.confusion += torch.bincount(idx, minlength=self.num_labels ** 2).view(
                    self.num_labels, self.num_labels).numpy()
                self.positive_images += 1
            else:
                self.negative_fg += float((p > 0).float().mean())
                self.negative_images += 1

    def iou(self) -> np.ndarray:
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def summary(self) -> dict[str, float]:
        iou = self.iou()
        out = {"background_iou": float(iou[0]), "miou": float(np.nanmean(iou)),
               "negative_fp_area": self.negative_fg / max(self.negative_images, 1)}
        for label in range(1, self.num_labels):
            out[f"iou_{label}"] = float(iou[label])
        return out
