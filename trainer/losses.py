"""The objectives, term by term, named as in the paper: mask-lets M, image-lets X, reconstruction Î,
L = L_recon + λ_m·L_mask + λ_c·L_cls (preset `paper`), and the preserve/delete objective of docs/method.md
(preset `preserve_delete`) whose every term is a function here with its config weight; `objectives` weighs
and sums them.

Shapes: I B×3×H×W in [0,1]; Z B×K×H×W; M B×K×H×W (sums to 1 over K); X B×K×3×H×W; y B×C multi-hot.
Components 0..C−1 belong to the classes, C..K−1 are background components. `valid` (B×H×W bool, the loader's
batch["valid"] for random-scale crops of real photos): the pixels that are image; every mean over pixels is
then a mean over the valid ones, and the padding counts nowhere. `valid` None (the toy sets) is the plain mean,
computed exactly as without the argument."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import speedups
from .config import ObjectiveConfig

EPS = 1e-6
Classifier = Callable[[torch.Tensor], torch.Tensor]  # images in [0,1] → logits B×C


# ---------------------------------------------------------------------------------------------- paper terms
def mask_lets(Z: torch.Tensor, sampling: str = "soft", tau: float = 1.0) -> torch.Tensor:
    """M = softmax_K(Z); `straight_through`: one-hot argmax forward, softmax gradient; `gumbel`: hard Gumbel
    samples with the straight-through gradient."""
    M = torch.softmax(Z, dim=1)
    if sampling == "soft":
        return M
    if sampling == "straight_through":
        hard = F.one_hot(M.argmax(dim=1), Z.shape[1]).permute(0, 3, 1, 2).to(M.dtype)
        return hard + M - M.detach()
    if sampling == "gumbel":
        return F.gumbel_softmax(Z, tau=tau, hard=True, dim=1)
    raise ValueError(f"mask_sampling must be soft, straight_through or gumbel, got {sampling!r}")


def reconstruction(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Î[c,h,w] = Σ_k M[k,h,w]·X[k,c,h,w]."""
    return (M.unsqueeze(2) * X).sum(dim=1)


def valid_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean of x (B×H×W, or B×N×H×W with `valid` broadcast over N) over the valid pixels; x.mean() when
    `valid` is None. 0 (with a graph) when no pixel is valid."""
    if valid is None:
        return x.mean()
    v = valid.to(x.dtype)
    if x.dim() == 4:
        v = v.unsqueeze(1).expand_as(x)
    return (x * v).sum() / v.sum().clamp_min(1)


def valid_area(M: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """a = mean over pixels of each map of M (B×K×H×W → B×K), over the valid pixels of each image."""
    if valid is None:
        return M.mean(dim=(2, 3))
    v = valid.to(M.dtype).unsqueeze(1)
    return (M * v).sum(dim=(2, 3)) / v.sum(dim=(2, 3)).clamp_min(1)


def L_recon(I_hat: torch.Tensor, I: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean (Î − I)² (over the valid pixels)."""
    return valid_mean((I_hat - I) ** 2, valid)


def bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy of a probability (clamped away from 0 and 1)."""
    p = p.clamp(EPS, 1 - EPS)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def L_mask(M: torch.Tensor, y: torch.Tensor, area_target: float = 0.0,
           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Area prior. a_k = mean over (valid) pixels of M_k. Class components: BCE(a_k, y_k) (absent → area 0, or
    `area_target`; present → area pushed up); background: BCE(Σ_{background k} a_k, 1). Sum over
    components, mean over batch."""
    C = y.shape[1]
    a = valid_area(M, valid)
    target = y + (1 - y) * area_target
    class_terms = bce(a[:, :C], target).sum(dim=1)
    background_term = bce(a[:, C:].sum(dim=1), torch.ones_like(a[:, 0]))
    return (class_terms + background_term).mean()


def cls_targets(y: torch.Tensor, K: int) -> torch.Tensor:
    """B×K×C: class component k → e_k·y_k (recognised as class k when present, as nothing else);
    background components → 0."""
    B, C = y.shape
    targets = torch.zeros(B, K, C, dtype=y.dtype, device=y.device)
    idx = torch.arange(C, device=y.device)
    targets[:, idx, idx] = y
    return targets


def L_cls(g: Classifier, M: torch.Tensor, V: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over components k of BCE(g(M_k ⊙ V_k), cls_targets(y)_k); V = X (image-lets, paper) or the
    image I repeated over K. BCE is averaged over batch and classes."""
    B, K = M.shape[:2]
    masked = (M.unsqueeze(2) * V).flatten(0, 1)  # (B·K)×3×H×W
    logits = g(masked).view(B, K, -1)
    return F.binary_cross_entropy_with_logits(logits, cls_targets(y, K), reduction="none").mean(dim=(0, 2)).mean()


# ---------------------------------------------------------------------------------- preserve / delete terms
def gaussian_blur(I: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (radius 3σ, capped by the image size). With the speed-up
    `blur_matmul` (trainer/speedups.py) it is A_H · I · A_Wᵀ, the padded kernel as a banded matrix per side (the
    same weighted sums; on CPUs the 1-D depthwise convolutions take a slow path)."""
    radius = max(1, min(int(math.ceil(3 * sigma)), min(I.shape[-2:]) - 1))
    if speedups.enabled("blur_matmul"):
        H, W = I.shape[-2:]
        rows = blur_matrix(H, radius, float(sigma), I.dtype, I.device)
        cols = rows if W == H else blur_matrix(W, radius, float(sigma), I.dtype, I.device)
        return torch.matmul(rows, torch.matmul(I, cols.t()))
    kernel = _blur_kernel(radius, sigma, I.dtype, I.device)
    c = I.shape[1]
    x = F.pad(I, [radius, radius, 0, 0], mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.pad(x, [0, 0, radius, radius], mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _blur_kernel(radius: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, radius: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n×n: row i holds the 1-D Gaussian kernel around i, its taps past the border reflected back in (reflect
    padding: index −j → j, n−1+j → n−1−j), so (A x)_i is the padded convolution's output i. Cached per size; made
    outside inference mode so a matrix first built in an evaluation can be saved for a later backward."""
    with torch.inference_mode(False):
        kernel = _blur_kernel(radius, sigma, dtype, device)
        taps = torch.arange(n, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None, :]
        taps = torch.where(taps < 0, -taps, taps)
        taps = torch.where(taps > n - 1, 2 * (n - 1) - taps, taps)
        A = torch.zeros(n, n, dtype=dtype, device=device)
        A.index_put_((torch.arange(n, device=device)[:, None].expand_as(taps), taps), kernel.expand_as(taps),
                     accumulate=True)
    return A


def fill_image(I: torch.Tensor, cfg: ObjectiveConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """F: what deleted pixels are replaced with (no gradient). `blur`: Gaussian blur of I; `shuffle`: blur of
    another image of the batch, so the fill carries no trace of this image's object. With `valid` the blur is
    normalised by the blurred valid mask, G * (v ⊙ I) / G * v, so the padding's black never bleeds into it."""
    with torch.no_grad():
        if valid is None:
            fill = gaussian_blur(I, cfg.fill_sigma)
        else:
            v = valid.to(I.dtype).unsqueeze(1)
            fill = gaussian_blur(I * v, cfg.fill_sigma) / gaussian_blur(v, cfg.fill_sigma).clamp_min(1e-4)
        if cfg.fill == "shuffle":
            fill = fill.roll(1, dims=0)
    return fill


def foreground(M: torch.Tensor, num_classes: int) -> torch.Tensor:
    """M_fg = Σ_{class k} M_k (B×H×W); the background mask is 1 − M_fg."""
    return M[:, :num_classes].sum(dim=1)


def preserved(M_fg: torch.Tensor, I: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """P = M_fg ⊙ I + (1 − M_fg) ⊙ F: only the object is kept."""
    m = M_fg.unsqueeze(1)
    return m * I + (1 - m) * fill


def deleted(M_fg: torch.Tensor, I: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """D = M_bg ⊙ I + (1 − M_bg) ⊙ F with M_bg = 1 − M_fg: the object is removed."""
    return preserved(1 - M_fg, I, fill)


def L_preserve(g: Classifier, P: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE(g(P), y): what the mask keeps must still be recognised."""
    return F.binary_cross_entropy_with_logits(g(P), y)


def L_delete(g: Classifier, D: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """BCE(g(D), target), target 0 by default: with the mask's content removed, no class may remain (for
    C > 1 removing class c's component leaves the image's other tags, `classifier_rows`)."""
    logits = g(D)
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits) if target is None else target)


def L_delete_tagged(deleted_logits: torch.Tensor, keep_targets: torch.Tensor,
                    delete_targets: torch.Tensor) -> torch.Tensor:
    """L_delete over the rows of tagged classes only (`objective.delete_untagged: false`). On an untagged image
    there is nothing to delete: g(D) > 0 there is g's own error (on toy-birds, water read as bird), and asking
    the mask to remove it teaches the mask g's bias. 0 (with a graph) when no row is tagged."""
    tagged = keep_targets.sum(dim=1) > 0
    if not tagged.any():
        return deleted_logits.sum() * 0.0
    return L_delete(lambda _: deleted_logits[tagged], None, delete_targets[tagged])


def L_area(M_fg: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean(M_fg) over every (valid) pixel of every image (positive or not): the smallest mask that does the job."""
    return valid_mean(M_fg, valid)


def L_binary(M_fg: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """4·mean(M_fg·(1 − M_fg)) over every (valid) pixel: 0 for a mask of 0s and 1s, 1 for a mask of 0.5
    everywhere. A fractional mask that follows the image's texture can keep g's evidence in the preserved image
    and remove it from the deleted one at a small area (seen at 128 px, docs/results.md); this prices it."""
    return 4.0 * valid_mean(M_fg * (1 - M_fg), valid)


def L_tv(M_fg: torch.Tensor, I: torch.Tensor | None = None, edge_aware: float = 0.0,
         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Total variation mean|Δ_v M| + mean|Δ_h M|. With edge_aware > 0 each difference is weighted by
    exp(−edge_aware·|Δ I|) (mean over RGB), so the mask may change where the image has an edge. With `valid`,
    only differences between two valid pixels count (the edge of the padding is no mask edge)."""
    dv = (M_fg[:, 1:, :] - M_fg[:, :-1, :]).abs()
    dh = (M_fg[:, :, 1:] - M_fg[:, :, :-1]).abs()
    if edge_aware > 0 and I is not None:
        dv = dv * torch.exp(-edge_aware * (I[:, :, 1:, :] - I[:, :, :-1, :]).abs().mean(dim=1))
        dh = dh * torch.exp(-edge_aware * (I[:, :, :, 1:] - I[:, :, :, :-1]).abs().mean(dim=1))
    if valid is None:
        return dv.mean() + dh.mean()
    return valid_mean(dv, valid[:, 1:, :] & valid[:, :-1, :]) + valid_mean(dh, valid[:, :, 1:] & valid[:, :, :-1])


def pasted(M_fg: torch.Tensor, I: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The masked object of I pasted onto another image: M_fg ⊙ I + (1 − M_fg) ⊙ background."""
    return preserved(M_fg, I, background)


@dataclass(frozen=True)
class AuxPass:
    """One more pass of the mask network that a term needs (L_paste, L_erase): the `images` it sees and the term
    as a function of the mask logits there. `run` makes the pass; `run_batched` makes several in one forward."""
    images: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]

    def run(self, segment: Callable[[torch.Tensor], dict]) -> torch.Tensor:
        return self.loss(segment(self.images)["mask_logits"])


def run_batched(passes: list[AuxPass], segment: Callable[[torch.Tensor], dict]) -> list[torch.Tensor]:
    """The terms of `passes` from one forward on their images concatenated (the speed-up `aux_batched`: the same
    values wherever the network treats the images of a batch independently, i.e. no BatchNorm in training mode)."""
    if len(passes) == 1:
        return [passes[0].run(segment)]
    logits = segment(torch.cat([p.images for p in passes]))["mask_logits"].split([len(p.images) for p in passes])
    return [p.loss(z) for p, z in zip(passes, logits)]


def _idle_pass(I: torch.Tensor) -> AuxPass:
    """A term with nothing to compare still makes its forward, weighted 0: every rank must run the same number of
    forwards (ZeRO-3 gathers the parameters collectively in each one, and a rank that skipped it would hang the
    others)."""
    return AuxPass(I[:1], lambda logits: logits.sum() * 0.0)


def paste_pass(I: torch.Tensor, y: torch.Tensor, M_fg: torch.Tensor, num_classes: int,
               valid: torch.Tensor | None = None) -> AuxPass:
    """L_paste's pass: the composites, and the term given the mask logits on them."""
    positive = y.sum(dim=1) > 0
    if positive.all() or not positive.any():
        return _idle_pass(I)
    per_class = M_fg if M_fg.dim() == 4 else M_fg.unsqueeze(1)
    source = per_class[positive].detach()
    backgrounds = I[~positive]
    pick = torch.arange(source.shape[0], device=I.device) % backgrounds.shape[0]
    backgrounds = backgrounds[pick]
    both = None
    if valid is not None:
        source = source * valid[positive].unsqueeze(1).to(source.dtype)
        both = valid[positive] & valid[~positive][pick]
    composite = pasted(source.sum(dim=1), I[positive], backgrounds)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        M_new = mask_lets(logits)[:, :num_classes]
        return valid_mean(bce(M_new, (source > 0.5).to(M_new.dtype)), both)

    return AuxPass(composite, loss)


def L_paste(segment: Callable[[torch.Tensor], dict], I: torch.Tensor, y: torch.Tensor, M_fg: torch.Tensor,
            num_classes: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Background-swap consistency (cut-and-paste, Remez et al. 2018): each positive image's objects, cut out
    by the current mask (no gradient), are pasted onto a negative image of the batch, and the mask network must
    return the same (hardened) mask there, class by class. The training set pairs each class with its own
    background group, so these composites are exactly the pairings the bias hides; a mask that leans on the
    background fails them. `M_fg` is B×H×W (C = 1) or the class mask-lets B×C×H×W. BCE averaged over pixels
    (and classes) of the pasted images; 0 when the batch lacks positives or negatives. With `valid`, nothing is cut
    from a positive's padding and only pixels that are image in both the positive and its background count."""
    return paste_pass(I, y, M_fg, num_classes, valid).run(segment)


def erased(M_fg: torch.Tensor, I: torch.Tensor, fill: torch.Tensor, dilate: int) -> torch.Tensor:
    """E: the image with its objects removed for good. The mask is hardened at 0.5 and grown by `dilate` pixels
    (so edges and thin parts go too), then filled with F; no gradient. `M_fg` is B×H×W."""
    with torch.no_grad():
        hard = (M_fg > 0.5).to(I.dtype).unsqueeze(1)
        if dilate > 0:
            hard = F.max_pool2d(hard, 2 * dilate + 1, stride=1, padding=dilate)
        return (1 - hard) * I + hard * fill


def erase_pass(g: Classifier | None, I: torch.Tensor, y: torch.Tensor, M_fg: torch.Tensor, fill: torch.Tensor,
               num_classes: int, dilate: int, valid: torch.Tensor | None = None) -> AuxPass:
    """L_erase's pass: the erased positives, and the term given the mask logits on them."""
    positive = y.sum(dim=1) > 0
    if not positive.any():
        return _idle_pass(I)
    M_erase = M_fg[positive] if valid is None else M_fg[positive] * valid[positive].to(M_fg.dtype)
    E = erased(M_erase, I[positive], fill[positive], dilate)
    with torch.no_grad():
        clean = (torch.sigmoid(g(E)) < 0.5).all(dim=1) if g is not None else torch.ones(
            len(E), dtype=torch.bool, device=E.device)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        M_new = mask_lets(logits)[:, :num_classes]
        per_pixel = bce(M_new, torch.zeros_like(M_new))
        if valid is None:
            per_image = per_pixel.flatten(1).mean(dim=1)
        else:
            v = valid[positive].to(per_pixel.dtype).unsqueeze(1).expand_as(per_pixel)
            per_image = (per_pixel * v).flatten(1).sum(dim=1) / v.flatten(1).sum(dim=1).clamp_min(1)
        return (per_image * clean.to(per_image.dtype)).sum() / clean.sum().clamp(min=1)

    return AuxPass(E, loss)


def L_erase(segment: Callable[[torch.Tensor], dict], g: Classifier | None, I: torch.Tensor, y: torch.Tensor,
            M_fg: torch.Tensor, fill: torch.Tensor, num_classes: int, dilate: int,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Erase consistency: each positive image with its objects erased by the current mask (`erased`) is a
    background-only image, and the mask network must find no object there: BCE(M_c(E), 0) over pixels and class
    components. Given g (`objective.erase_gate`), it counts only where g agrees that E holds no class any more
    (σ(g(E)) < 0.5 for every class), so an incomplete erasure never teaches the mask to ignore an object; with
    g None every erased positive counts, even where g's bias still reads the background as the class. On
    toy-birds the positives are mostly on water, so E is the water-without-bird image that the training set
    (ρ = 0.9) almost lacks. Mean over the counted images; 0 (with a graph) when none counts. With `valid`, the
    padding is never erased (its mask is taken as 0) and each image's BCE is a mean over its valid pixels."""
    return erase_pass(g, I, y, M_fg, fill, num_classes, dilate, valid).run(segment)


def classifier_rows(M: torch.Tensor, M_fg: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """The (image, mask) pairs the classifier terms look at, in image order: one per tagged class c of an
    image (mask M_c; preserved target e_c, deleted target y − e_c) and one per untagged image (mask M_fg, both
    targets 0). M_fg = Σ_{class k} M_k. Returns (image index, mask R×H×W, preserve targets R×C, delete targets
    R×C). For C = 1 this is one row per image with mask M_fg and targets y, 0: the binary objective exactly."""
    B, C = y.shape
    if C == 1:  # the general path gives these rows too; without the gather the gradient is bitwise the binary one
        return torch.arange(B, device=y.device), M_fg, y, torch.zeros_like(y)
    tagged = y > 0
    untagged = ~tagged.any(dim=1)
    # (b, c) pairs in image order; c = C stands for "all class components" of an untagged image
    pairs = torch.cat([tagged, untagged[:, None]], dim=1).nonzero()
    image, comp = pairs[:, 0], pairs[:, 1]
    masks_with_fg = torch.cat([M[:, :C], M_fg[:, None]], dim=1)
    rows = masks_with_fg[image, comp]
    eye = torch.cat([torch.eye(C, dtype=y.dtype, device=y.device), torch.zeros(1, C, dtype=y.dtype, device=y.device)])
    keep = eye[comp]
    return image, rows, keep, y[image] - keep


def L_absent(M: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the classes an image is not tagged with of the area a_c = mean_px M_c (valid pixels), mean over
    images: a class component must be empty where its class is absent (multi-class; `objective.absent_weight`)."""
    C = y.shape[1]
    return ((1 - y) * valid_area(M[:, :C], valid)).sum(dim=1).mean()


def erase_schedule(cfg: ObjectiveConfig, step: int | None) -> float:
    """The factor on erase_weight at training step `step` (0-based): 0 before `erase_start`, then rising
    linearly to 1 over `erase_ramp` steps (the first step at erase_start already gets 1/erase_ramp). A mask that
    has not found the object yet erases nothing, and L_erase would then teach "no mask" on the whole image, so
    erasing waits for the mask to form. `step` None (outside a training loop) → 1."""
    if step is None:
        return 1.0
    if step < cfg.erase_start:
        return 0.0
    return 1.0 if cfg.erase_ramp <= 0 else min(1.0, (step - cfg.erase_start + 1) / cfg.erase_ramp)


def area_schedule(cfg: ObjectiveConfig, step: int | None) -> float:
    """The weight of L_area at training step `step` (0-based): area_weight before `area_relax_start`, then
    linearly to `area_relax_weight` over `area_relax_ramp` steps (the first step at area_relax_start is already
    1/area_relax_ramp of the way). area_relax_start 0 → area_weight throughout; `step` None (outside a training
    loop) → area_weight. The prior that makes the mask form is what shrinks it onto g's evidence once L_delete is
    met (docs/results.md, 2026-12-06), so it can relax after the mask has formed."""
    if step is None or cfg.area_relax_start <= 0 or step < cfg.area_relax_start:
        return cfg.area_weight
    frac = 1.0 if cfg.area_relax_ramp <= 0 else min(1.0, (step - cfg.area_relax_start + 1) / cfg.area_relax_ramp)
    return cfg.area_weight + frac * (cfg.area_relax_weight - cfg.area_weight)


def cam_schedule(cfg: ObjectiveConfig, step: int | None) -> float:
    """The factor on cam_weight at training step `step` (0-based): 1 at step 0, falling linearly to 0 at
    `cam_steps` (0 = constant 1). `step` None (outside a training loop) → 1 while the term is on."""
    if step is None or cfg.cam_steps <= 0:
        return 1.0
    return max(0.0, 1.0 - step / cfg.cam_steps)


def L_negative(M_fg: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Negative bags (multiple-instance learning): an image tagged with no class holds no object pixel, so every
    pixel of M_fg there is background: BCE(M_fg, 0), mean over the pixels of the untagged images. Unlike L_area
    (linear in M_fg, over all images) it punishes a confident false positive without bound, which is what g's
    bias leaves on toy-birds' water negatives (splashes that g reads as "bird" and L_delete therefore pushes
    into the mask). 0 (with a graph) when the batch has no untagged image."""
    negative = y.sum(dim=1) == 0
    if not negative.any():
        return M_fg.sum() * 0.0
    M_neg = M_fg[negative]
    return valid_mean(bce(M_neg, torch.zeros_like(M_neg)), None if valid is None else valid[negative])


# ------------------------------------------------------------------------- two-stage baseline: CAM pseudo-labels
def L_pseudo(Z: torch.Tensor, pseudo_labels: torch.Tensor, num_classes: int,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the components against a label map (label c + 1 → component c, 0 → the first
    background component C); padded pixels (`valid` False) and label 255 (self-training's uncertain pixels)
    are ignored; 0 when every pixel is."""
    target = torch.where(pseudo_labels > 0, pseudo_labels - 1, torch.full_like(pseudo_labels, num_classes))
    ignored = pseudo_labels == 255
    if valid is not None:
        ignored = ignored | ~valid
    target = torch.where(ignored, torch.full_like(target, -100), target)  # F.cross_entropy's ignore_index
    if bool(ignored.all()):
        return Z.sum() * 0.0
    return F.cross_entropy(Z, target)


# ------------------------------------------------------------------ multi-class from scratch (issue 19)
def L_class_area(M: torch.Tensor, y: torch.Tensor, a_min: float, a_max: float, absent_max: float = 0.0,
                 floor: str = "hinge", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class area bounds tied to the tags (Pathak et al., "Constrained CNN", 2015; Stalder et al., NeurIPS
    2022): with a_c = mean_px M_c, a class the image is tagged with must cover between `a_min` and `a_max` of
    it, relu(a_min − a_c) + relu(a_c − a_max); an untagged class at most `absent_max` (0: nothing),
    relu(a_c − absent_max). Sum over the classes, mean over images (`objective.class_area_weight`, × λ_m).
    Unlike L_area (one prior on the whole foreground, which at K = C + 1 pushes every class component towards
    0 at once) the floor keeps a tagged class's component alive. `floor` "log" (`objective.class_area_floor`)
    makes the floor relu(log a_min − log a_c): through the softmax ∂a_c/∂Z_c shrinks with a_c, so a linear
    floor stops pulling once a component is nearly empty; the log floor's pull, ∝ 1/a_c, does not fade.
    Areas are over the `valid` pixels (padding of random-scale crops counts nowhere; None: every pixel)."""
    C = y.shape[1]
    a = valid_area(M[:, :C], valid)
    if floor == "log":
        below = F.relu(math.log(a_min) - torch.log(a.clamp_min(EPS))) if a_min > 0 else torch.zeros_like(a)
    elif floor == "hinge":
        below = F.relu(a_min - a)
    else:
        raise ValueError(f"objective.class_area_floor must be hinge or log, got {floor!r}")
    tagged = below + F.relu(a - a_max)
    untagged = F.relu(a - absent_max)
    return (y * tagged + (1 - y) * untagged).sum(dim=1).mean()


def L_class_rank(M: torch.Tensor, y: torch.Tensor, a_min: float, a_max: float,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ranked area bounds for the tagged classes (the area constraint of Fong et al., "Understanding deep
    networks via extremal perturbations and smooth masks", ICCV 2019): sort a tagged class's mask values over
    the image, v_1 ≥ v_2 ≥ …; the top ⌈a_min·N⌉ should be 1 and everything after the ⌈a_max·N⌉-th 0,
    mean (1 − v_i)² over the first plus mean v_i² over the tail. L_class_area bounds the *mean* of M_c, which a
    component spread thinly over the whole image (every pixel ≈ a_min, winning none) satisfies; this asks that
    a_min of the image be the class's with confidence, so a diffuse component pays and must commit somewhere.
    Untagged classes are left to L_class_area. Sum over classes, mean over images
    (`objective.class_rank_weight`, × λ_m); over the `valid` pixels of each image (None: every pixel)."""
    B, C = y.shape
    m = M[:, :C].flatten(2)  # B×C×N
    n = torch.full((B,), m.shape[-1], dtype=torch.long, device=M.device)
    if valid is not None:
        keep = valid.flatten(1).to(m.dtype)
        m = m * keep.unsqueeze(1)  # padding as 0: sorts into the tail, where it adds nothing
        n = keep.sum(1).long()
    v = m.sort(dim=-1, descending=True).values
    rank = torch.arange(v.shape[-1], device=M.device)
    k_min = torch.ceil(a_min * n.to(v.dtype)).long().clamp(min=1)
    k_max = torch.ceil(a_max * n.to(v.dtype)).long()
    top = (rank[None, :] < k_min[:, None]).to(v.dtype)[:, None]  # B×1×N
    tail = ((rank[None, :] >= k_max[:, None]) & (rank[None, :] < n[:, None])).to(v.dtype)[:, None]
    below = ((1 - v) ** 2 * top).sum(-1) / top.sum(-1).clamp_min(1)
    above = (v ** 2 * tail).sum(-1) / tail.sum(-1).clamp_min(1)
    return (y * (below + above)).sum(dim=1).mean()
