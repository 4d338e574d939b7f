"""The preserve gate: the frozen g checks each predicted class region at inference, as L_preserve does in
training. For every image and class c with predicted pixels, g sees the preserved view of that region alone
(P_c = M_c ⊙ I + (1 − M_c) ⊙ F, with M_c the hard prediction of class c and F the training fill); where
σ(g(P_c))_c falls below the gate threshold, the region is dropped to background. A region that g cannot
recognise as its class on its own, e.g. a patch of water on a negative image, is not an object of that class
by the method's own criterion."""
from __future__ import annotations

import torch

from .config import ObjectiveConfig
from .crf import FLOOR  # the logit a removed class component keeps (its mass went to background)
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


# ---- the tag gate: g's image-level prediction removes the classes it does not see ----

@torch.no_grad()
def absent_classes(g, images: torch.Tensor, threshold: float) -> torch.Tensor:
    """B×C bool: the classes whose whole-image probability σ(g(I))_c is below `threshold` (what CAM's
    tag-free rows already use, at 0.5: `cam.cam_scores`)."""
    return torch.sigmoid(g(images)).float() < threshold


def remove_classes(logits: torch.Tensor, absent: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mask logits B×K×H×W with every absent class component's mass moved to the first background component
    (its logit → logaddexp(bg, class), the class's → FLOOR): the softmax of the others is unchanged, so
    the foreground threshold and argmax then decide among the classes g sees. Images with no absent class
    are returned as they are."""
    if not absent.any():
        return logits
    out = logits.clone()
    C = num_classes
    for c in range(C):
        rows = absent[:, c].to(logits.device)
        if rows.any():
            out[rows, C] = torch.logaddexp(out[rows, C], out[rows, c])
            out[rows, c] = FLOOR
    return out
