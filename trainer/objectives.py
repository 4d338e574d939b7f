"""The presets' objectives: each returns a dict of named loss terms (the functions of `losses`) and "loss",
open_clip's way. For `preserve_delete` the terms and their weights are two tables: `LOSS_GROUPS` (the terms
that are always on, summed as L = λ_c·L_cls + λ_m·L_mask + L_recon) and `OPTIONAL_TERMS` (computed only while
their weight is on); `weighted_loss` sums both in one place. To add a term: a function in `losses`, a weight
field in `ObjectiveConfig`, and one row here."""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import add
from typing import Callable

import torch

from .config import ObjectiveConfig
from . import speedups
from .losses import (AuxPass, Classifier, L_absent, L_area, L_binary, L_class_area, L_class_rank, L_cls, L_delete,
                     L_delete_tagged, L_mask, L_negative, L_preserve, L_pseudo, L_recon, L_tv, area_schedule,
                     cam_schedule, classifier_rows, deleted, erase_pass, erase_schedule, fill_image, foreground,
                     mask_lets, paste_pass, preserved, reconstruction, run_batched)

Terms = dict[str, torch.Tensor]


def paper_objective(out: dict, I: torch.Tensor, y: torch.Tensor, g: Classifier, cfg: ObjectiveConfig,
                    training: bool = True, segment=None, step: int | None = None,
                    valid: torch.Tensor | None = None) -> Terms:
    """L = L_recon + λ_m·L_mask + λ_c·L_cls."""
    M = mask_lets(out["mask_logits"], cfg.mask_sampling if training else "soft", cfg.gumbel_tau)
    X = out["imagelets"]
    I_hat = reconstruction(M, X)
    V = X if cfg.cls_input == "imagelet" else I.unsqueeze(1).expand_as(X)
    terms = {"L_recon": L_recon(I_hat, I, valid), "L_mask": L_mask(M, y, cfg.area_target, valid),
             "L_cls": L_cls(g, M, V, y)}
    terms["loss"] = terms["L_recon"] + cfg.lambda_m * terms["L_mask"] + cfg.lambda_c * terms["L_cls"]
    return terms


# ---- preserve / delete: the tables ----

# (scale, [(term, weight field)]): each group enters the loss as scale · Σ weight · term, in this order
LOSS_GROUPS: tuple[tuple[str | None, tuple[tuple[str, str], ...]], ...] = (
    ("lambda_c", (("L_preserve", "preserve_weight"), ("L_delete", "delete_weight"))),
    ("lambda_m", (("L_area", "area_weight"), ("L_tv", "tv_weight"))),
    (None, (("L_recon", "recon_weight"),)),
)


# weight fields of LOSS_GROUPS that follow the training step: field -> (cfg, step) -> the weight at that step
SCHEDULED_WEIGHTS: dict[str, Callable[[ObjectiveConfig, int | None], float]] = {"area_weight": area_schedule}


def group_weight(cfg: ObjectiveConfig, field: str, step: int | None) -> float:
    """A LOSS_GROUPS weight at training step `step`: its schedule's value, or the config field as it is."""
    schedule = SCHEDULED_WEIGHTS.get(field)
    return schedule(cfg, step) if schedule else getattr(cfg, field)


@dataclass(frozen=True)
class OptionalTerm:
    """A term computed only while `active`; it adds `weight · term` to the loss. `training`: only in a training
    step, given the mask network. A term that runs the mask network again on altered images gives that pass as
    `aux` (ctx → losses.AuxPass) instead of `compute`, so the passes of several terms can share one forward."""
    name: str
    weight: Callable[[ObjectiveConfig, int | None], float]
    active: Callable[[ObjectiveConfig, int | None], bool]
    compute: Callable[..., torch.Tensor] | None = None  # (ctx: dict) → the term
    training: bool = False
    aux: Callable[..., AuxPass] | None = None  # (ctx: dict) → its pass of the mask network


OPTIONAL_TERMS: tuple[OptionalTerm, ...] = (
    OptionalTerm("L_absent", lambda cfg, step: cfg.lambda_m * cfg.absent_weight,
                 lambda cfg, step: cfg.absent_weight > 0, lambda ctx: L_absent(ctx["M"], ctx["y"], ctx["valid"])),
    OptionalTerm("L_class_area", lambda cfg, step: cfg.lambda_m * cfg.class_area_weight,
                 lambda cfg, step: cfg.class_area_weight > 0,
                 lambda ctx: L_class_area(ctx["M"], ctx["y"], ctx["cfg"].class_area_min, ctx["cfg"].class_area_max,
                                          ctx["cfg"].class_area_absent, ctx["cfg"].class_area_floor,
                                          ctx["valid"])),
    OptionalTerm("L_class_rank", lambda cfg, step: cfg.lambda_m * cfg.class_rank_weight,
                 lambda cfg, step: cfg.class_rank_weight > 0,
                 lambda ctx: L_class_rank(ctx["M"], ctx["y"], ctx["cfg"].class_area_min, ctx["cfg"].class_area_max,
                                          ctx["valid"])),
    OptionalTerm("L_binary", lambda cfg, step: cfg.lambda_m * cfg.binary_weight,
                 lambda cfg, step: cfg.binary_weight > 0, lambda ctx: L_binary(ctx["M_fg"], ctx["valid"])),
    OptionalTerm("L_negative", lambda cfg, step: cfg.lambda_m * cfg.negative_weight,
                 lambda cfg, step: cfg.negative_weight > 0,
                 lambda ctx: L_negative(ctx["M_fg"], ctx["y"], ctx["valid"])),
    OptionalTerm("L_paste", lambda cfg, step: cfg.paste_weight, lambda cfg, step: cfg.paste_weight > 0,
                 training=True,
                 aux=lambda ctx: paste_pass(ctx["I"], ctx["y"], ctx["M_classes"], ctx["C"], ctx["valid"])),
    OptionalTerm("L_erase", lambda cfg, step: cfg.erase_weight * erase_schedule(cfg, step),
                 lambda cfg, step: cfg.erase_weight > 0 and erase_schedule(cfg, step) > 0, training=True,
                 aux=lambda ctx: erase_pass(ctx["g"] if ctx["cfg"].erase_gate else None, ctx["I"], ctx["y"],
                                            ctx["M_fg"], ctx["fill"], ctx["C"], ctx["cfg"].erase_dilate, ctx["valid"])),
    OptionalTerm("L_cam", lambda cfg, step: cfg.cam_weight * cam_schedule(cfg, step),
                 lambda cfg, step: cfg.cam_weight > 0 and cam_schedule(cfg, step) > 0,
                 lambda ctx: L_pseudo(ctx["Z"], _confident_cam_labels(ctx["g"], ctx["I"], ctx["y"], ctx["cfg"]),
                                      ctx["C"], ctx["valid"]),
                 training=True),
)


def weighted_loss(terms: Terms, cfg: ObjectiveConfig, step: int | None) -> torch.Tensor:
    """The one place the terms are weighed and summed: the groups of `LOSS_GROUPS`, then every optional term
    present in `terms`, in table order."""
    parts = []
    for scale, members in LOSS_GROUPS:
        group = reduce(add, [group_weight(cfg, weight, step) * terms[name] for name, weight in members])
        parts.append(getattr(cfg, scale) * group if scale else group)
    parts += [term.weight(cfg, step) * terms[term.name] for term in OPTIONAL_TERMS if term.name in terms]
    return reduce(add, parts)


def preserve_delete_objective(out: dict, I: torch.Tensor, y: torch.Tensor, g: Classifier,
                              cfg: ObjectiveConfig, training: bool = True,
                              segment: Callable[[torch.Tensor], dict] | None = None,
                              step: int | None = None, valid: torch.Tensor | None = None) -> Terms:
    """L = λ_c·(preserve_weight·L_preserve + delete_weight·L_delete) + λ_m·(area_schedule(step)·L_area
    + tv_weight·L_tv) + recon_weight·L_recon + λ_m·(absent_weight·L_absent + class_area_weight·L_class_area
    + class_rank_weight·L_class_rank + binary_weight·L_binary + negative_weight·L_negative)
    + paste_weight·L_paste + erase_weight·erase_schedule(step)·L_erase + cam_weight·cam_schedule(step)·L_cam
    (paste, erase and cam only while training, given the mask network `segment`; L_erase only once its schedule
    has started, L_cam only until its schedule has faded to 0). The passes of L_paste and L_erase share one forward
    (speed-up `aux_batched`) unless `segment.batch_independent` is False (BatchNorm in training mode).

    For C classes the classifier terms work per tagged class on the class's own component (`classifier_rows`):
    keeping only M_c must read as class c alone, removing M_c must remove class c and keep the others. L_tv is
    summed over the class components, L_paste is checked class by class. For C = 1 every term is the binary
    one unchanged.

    `valid` (batch["valid"] of random-scale crops; None: every pixel is image): the pixel terms (L_area, L_tv,
    L_recon, L_absent, L_negative, L_paste, L_erase) count only valid pixels, the fill is blurred from valid
    pixels only, and g sees the padding of the preserved and deleted images as the loader gave it."""
    C = y.shape[1]
    M = mask_lets(out["mask_logits"], cfg.mask_sampling if training else "soft", cfg.gumbel_tau)
    M_fg = foreground(M, C)
    fill = fill_image(I, cfg, valid)
    image, rows, keep_targets, delete_targets = classifier_rows(M, M_fg, y)
    R = rows.shape[0]
    I_rows, fill_rows = I[image], fill[image]
    views = torch.cat([preserved(rows, I_rows, fill_rows), deleted(rows, I_rows, fill_rows)])
    if valid is not None:  # the padding stays as the loader padded it: the mask has no say there
        views = torch.where(valid[image].unsqueeze(1).repeat(2, 1, 1, 1), views, I_rows.repeat(2, 1, 1, 1))
    both = g(views)  # one pass
    terms = {
        "L_preserve": L_preserve(lambda _: both[:R], None, keep_targets),
        "L_delete": (L_delete(lambda _: both[R:], None, delete_targets) if cfg.delete_untagged
                     else L_delete_tagged(both[R:], keep_targets, delete_targets)),
        "L_area": L_area(M_fg, valid),
        # per class component; C = 1 reads M_fg (= M_0) so gradients accumulate in the binary code's order
        "L_tv": sum(L_tv(M_c, I, cfg.edge_aware_tv, valid) for M_c in (M[:, :C].unbind(1) if C > 1 else [M_fg])),
        "L_recon": L_recon(reconstruction(M, out["imagelets"]), I, valid),
    }
    ctx = {"Z": out["mask_logits"], "M": M, "M_fg": M_fg, "M_classes": M[:, :C] if C > 1 else M_fg, "I": I, "y": y, "g": g, "fill": fill,
           "C": C, "cfg": cfg, "segment": segment, "valid": valid}
    passes: dict[str, AuxPass] = {}
    for term in OPTIONAL_TERMS:
        if term.active(cfg, step) and (not term.training or (training and segment is not None)):
            if term.aux is None:
                terms[term.name] = term.compute(ctx)
            else:
                passes[term.name] = term.aux(ctx)
    if passes:  # the mask network's extra passes: one forward (speed-up aux_batched) or one per term
        batched = speedups.enabled("aux_batched") and batch_independent(segment)
        values = (run_batched(list(passes.values()), segment) if batched
                  else [p.run(segment) for p in passes.values()])
        terms.update(zip(passes, values))
    terms["loss"] = weighted_loss(terms, cfg, step)
    return terms


def batch_independent(segment) -> bool:
    """Whether the mask network treats the images of a batch independently (no BatchNorm in training mode), so
    that passes can share a forward: `segment.batch_independent` where it says (train.AuxSegment), else read from
    its modules; a plain function (tests) is taken as independent."""
    flag = getattr(segment, "batch_independent", None)
    if flag is not None:
        return bool(flag)
    if isinstance(segment, torch.nn.Module):
        return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in segment.modules())
    return True


# ---- the two-stage baseline ----

@torch.no_grad()
def _cam_pseudo_labels(g, I: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    from .cam import cam_labels, cam_scores

    return cam_labels(cam_scores(g, I, tags=y), threshold)


@torch.no_grad()
def _confident_cam_labels(g, I: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    from .cam import cam_scores, confident_cam_labels

    return confident_cam_labels(cam_scores(g, I, tags=y), cfg.cam_high, cfg.cam_low)


def cam_pseudo_objective(out: dict, I: torch.Tensor, y: torch.Tensor, g, cfg: ObjectiveConfig,
                         training: bool = True, segment=None, step: int | None = None,
                         valid: torch.Tensor | None = None) -> Terms:
    """The classic two-stage WSSS baseline: g's CAM, gated by the image-level tags and thresholded at
    `cam_threshold`, is the pixel label the segmenter learns (no reconstruction, no classifier guidance)."""
    terms = {"L_pseudo": L_pseudo(out["mask_logits"], _cam_pseudo_labels(g, I, y, cfg.cam_threshold), y.shape[1],
                                  valid)}
    terms["loss"] = terms["L_pseudo"]
    return terms


OBJECTIVES = {"paper": paper_objective, "preserve_delete": preserve_delete_objective,
              "cam_pseudo": cam_pseudo_objective}


def self_train_objective(out: dict, targets: torch.Tensor, num_classes: int,
                         valid: torch.Tensor | None = None) -> Terms:
    """Self-training (trainer/selftrain.py): cross-entropy to the teacher's confident labels (255 ignored)."""
    terms = {"L_pseudo": L_pseudo(out["mask_logits"], targets, num_classes, valid)}
    terms["loss"] = terms["L_pseudo"]
    return terms


def objective(out: dict, I: torch.Tensor, y: torch.Tensor, g: Classifier, cfg: ObjectiveConfig,
              training: bool = True, segment: Callable[[torch.Tensor], dict] | None = None,
              step: int | None = None, valid: torch.Tensor | None = None,
              targets: torch.Tensor | None = None) -> Terms:
    """The preset's objective. Every preset takes the training `step` (None outside a training loop); only
    scheduled terms (preserve_delete's L_erase) read it. `valid`: batch["valid"] (B×H×W bool) of crop-mode
    batches, the pixels that are image (None: all of them, the toy sets). `targets`: the teacher's labels of
    the `self_train` preset (B×H×W, 255 = ignore)."""
    if cfg.preset == "self_train":
        if targets is None:
            raise ValueError("objective.preset self_train needs the teacher's labels (targets=...)")
        return self_train_objective(out, targets, y.shape[1], valid)
    return OBJECTIVES[cfg.preset](out, I, y, g, cfg, training, segment, step, valid)
