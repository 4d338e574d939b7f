"""Boundary F-score (the F measure of DAVIS, Perazzi et al. 2016): how crisp a predicted mask's edges are, next
to IoU, which barely moves when a blob loses or gains a rim.

Per image and per class c: the boundary of a region is its pixels with a 4-neighbour outside it (the image
border is not a boundary: pixels there are compared with themselves). A predicted boundary pixel is a hit when
a true boundary pixel of the same class lies within `tolerance` pixels (Euclidean: the tolerance is a disk, as
DAVIS dilates with disk(r)); a true boundary pixel is found when a predicted one lies within the tolerance.
Precision = hits / predicted boundary pixels, recall = found / true boundary pixels, pooled over the classes of
the image, F = 2PR / (P + R). Ignore (255) pixels of the truth are excluded: a predicted boundary pixel there is
neither a hit nor a miss (the true edge lies inside the ignore rim), and ignore is outside every true region.
Empty boundaries follow DAVIS: none predicted and none true → P = R = 1 (F = 1); none predicted → P = 1, R = 0;
none true → P = 0, R = 1 (F = 0 either way)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255
TOLERANCE = 2  # pixels; the tolerance the tables report


def region_boundary(region: torch.Tensor) -> torch.Tensor:
    """B×H×W bool → the region's pixels that have a 4-neighbour outside it (a one-pixel inner contour)."""
    padded = F.pad(region[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0] > 0.5
    inside = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    return region & ~inside


def disk(radius: int) -> torch.Tensor:
    """The (2r+1)×(2r+1) 0/1 kernel of the offsets (dy, dx) with dy² + dx² ≤ r²."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius ** 2).float()


def dilate(pixels: torch.Tensor, radius: int) -> torch.Tensor:
    """B×H×W bool dilated by a disk of `radius` pixels (zero outside the image)."""
    if radius <= 0:
        return pixels.clone()
    kernel = disk(radius).to(pixels.device)[None, None]
    hits = F.conv2d(pixels[:, None].float(), kernel, padding=radius)[:, 0]
    return hits > 0.5


def boundary_counts(pred: torch.Tensor, truth: torch.Tensor, num_labels: int, tolerance: int = TOLERANCE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image of B×H×W label maps, pooled over the foreground labels 1..num_labels−1: (predicted boundary
    pixels that are hits, predicted boundary pixels, true boundary pixels found, true boundary pixels), each
    a B-vector of counts. Predicted boundary pixels on ignore are left out of both predicted counts."""
    pred, truth = pred.long(), truth.long()
    valid = truth != IGNORE
    zeros = torch.zeros(pred.shape[0], dtype=torch.long, device=pred.device)
    hits, predicted, found, true = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    for label in range(1, num_labels):
        pred_edge = region_boundary(pred == label)
        true_edge = region_boundary(truth == label)
        counted = pred_edge & valid
        hits += (counted & dilate(true_edge, tolerance)).sum(dim=(1, 2))
        predicted += counted.sum(dim=(1, 2))
        found += (true_edge & dilate(pred_edge, tolerance)).sum(dim=(1, 2))
        true += true_edge.sum(dim=(1, 2))
    return hits, predicted, found, true


def precision_recall_f(hits, predicted, found, true) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image precision, recall and F from `boundary_counts`, with DAVIS's rules for empty boundaries."""
    hits, predicted, found, true = (np.asarray(torch.as_tensor(v).cpu(), dtype=np.float64)
                                    for v in (hits, predicted, found, true))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 1.0)  # no true edge: no hit, precision 0
        recall = np.where(true > 0, found / true, 1.0)
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f


def boundary_f(pred: torch.Tensor, truth: torch.Tensor, num_labels: int = 2, tolerance: int = TOLERANCE
               ) -> np.ndarray:
    """Per image boundary F-score of B×H×W (or H×W) label maps."""
    if pred.dim() == 2:
        pred, truth = pred[None], truth[None]
    return precision_recall_f(*boundary_counts(pred, truth, num_labels, tolerance))[2]


class BoundaryMeter:
    """Accumulates per-image boundary precision, recall and F over a split's positive images (the images IoU is
    pooled over; a negative image's masks are what the negative FP area measures)."""

    def __init__(self, num_labels: int, tolerance: int = TOLERANCE):
        self.num_labels, self.tolerance = num_labels, tolerance
        self.precision: list[float] = []
        self.recall: list[float] = []
        self.f: list[float] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor, sizes=None) -> np.ndarray:
        """pred, target: B×H×W labels; positive: B bools; `sizes`: each image's (height, width) in a padded
        batch (real photos at their own size), so the padding's edge is no object edge. Returns every image's
        F (negatives too)."""
        pred, target = pred.cpu(), target.cpu()
        if sizes is None:
            counts = boundary_counts(pred, target, self.num_labels, self.tolerance)
        else:
            per_image = [boundary_counts(pred[i:i + 1, :h, :w], target[i:i + 1, :h, :w], self.num_labels,
                                         self.tolerance) for i, (h, w) in enumerate((int(a), int(b)) for a, b in sizes)]
            counts = [torch.cat(column) for column in zip(*per_image)]
        precision, recall, f = precision_recall_f(*counts)
        keep = positive.cpu().bool().numpy()
        self.precision += precision[keep].tolist()
        self.recall += recall[keep].tolist()
        self.f += f[keep].tolist()
        return f

    def summary(self) -> dict[str, float]:
        """Means over positive images: boundary_f, boundary_precision, boundary_recall (NaN when none)."""
        def mean(values: list[float]) -> float:
            return float(np.mean(values)) if values else float("nan")
        return {"boundary_f": mean(self.f), "boundary_precision": mean(self.precision),
                "boundary_recall": mean(self.recall)}
