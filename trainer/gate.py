"""The preserve gate: the frozen g checks each predicted class region at inference, as L_preserve does in
training. For every image and class c with predicted pixels, g sees the preserved view of that region alone
(P_c = M_c ⊙ I + (1 − M_c) ⊙ F, with M_c the hard prediction of class c and F the training fill); where
σ(g(P_c))_c falls below the gate threshold, the region is dropped to background. A region that g cannot
recognise as its class on its own, e.g. a patch of water on a negative image, is not an object of that class
by the method's own criterion."""
from __future__ import annotations

import torch

from .config import ObjectiveConfig
from .losses import fill_image, preserved


@torch.no_grad()
def preserve_scores(g, images: torch.Tensor, pred: torch.Tensor, num_classes: int,
                    objective: ObjectiveConfig) -> torch.Tensor:
    """B×C: σ(g(P_c))_c for each class c's predicted region (NaN where class c has no predicted pixel)."""
    fill = fill_image(images, objective)
    B = images.shape[0]
    scores = torch.full((B, num_classes), float("nan"))
    for c in range(num_classes):
        region = (pred == c + 1)
        present = region.flatten(1).any(dim=1)
        if not present.any():
            continue
        idx = present.nonzero().squeeze(1)
        view = preserved(region[idx].to(images.dtype), images[idx], fill[idx])
        scores[idx, c] = torch.sigmoid(g(view)[:, c]).float().cpu()
    return scores


def apply_gate(pred: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """`pred` with every class region whose preserve score is below `threshold` set to background (0)."""
    if threshold <= 0:
        return pred
    out = pred.clone()
    for c in range(scores.shape[1]):
        drop = (scores[:, c] < threshold).to(pred.device)  # NaN (no region) compares False
        if drop.any():
            out[drop] = torch.where(out[drop] == c + 1, torch.zeros_like(out[drop]), out[drop])
    return out
