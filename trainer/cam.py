"""Class activation maps from g (Zhou et al. 2016): the CAM baseline and the pseudo-labels of the classic
two-stage WSSS pipeline."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cam_scores(g, images: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
    """B×C×H×W CAM in [0,1]: ReLU, normalised by each map's maximum, upsampled to the image, and zero for
    classes that are absent: by g's own prediction (σ < 0.5), or by the given image-level `tags`."""
    logits, maps = g.cam(images)
    maps = F.relu(maps)
    maps = maps / maps.flatten(2).amax(dim=2).clamp_min(1e-6)[:, :, None, None]
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    present = (torch.sigmoid(logits) > 0.5).float() if tags is None else tags.float()
    return maps * present[:, :, None, None]


def cam_labels(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label map: the strongest class c where its score exceeds the threshold (label c + 1), else 0."""
    best, cls = scores.max(dim=1)
    return torch.where(best > threshold, cls + 1, torch.zeros_like(cls))


def confident_cam_labels(scores: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Label map of the confident pixels only: the strongest class c where its score exceeds `high` (label
    c + 1), background (0) where every score is below `low`, 255 (ignored) in between: the seeds of IRN /
    AffinityNet, which trust CAM's peaks and its empty regions but not its extent."""
    best, cls = scores.max(dim=1)
    labels = torch.where(best > high, cls + 1, torch.full_like(cls, 255))
    return torch.where(best < low, torch.zeros_like(cls), labels)
