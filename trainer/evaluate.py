"""`wsssrec eval`: per split, g's accuracy and, for the trained segmenter, the CAM baseline and the trivial
all-background / all-foreground predictions: foreground IoU over positive images (ignore excluded), background
IoU, mIoU and the false-positive foreground area on negative images. Thresholds are chosen first (one search),
then each split is scored (`score_split`); `eval_report` turns the scores into tables, grids, JSON and MLflow."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .boundary import BoundaryMeter
from .cam import cam_labels, cam_scores
from .config import Config, ConfigError
from .data import dataset_classes, eval_batches, eval_splits, split_has_masks
from .distributed import init_distributed, set_threads
from .eval_report import finish_results, split_result
from .files import run_dir, stage_run_name
from .gate import apply_gate, preserve_scores
from .inference import PredictSettings, predict_masks
from .losses import mask_lets, reconstruction
from .metrics import SegmentationMeter
from .multiclass import PerClassThresholdSearch, bias_groups, cam_labels_per_class
from .paired import PairedScores, pair_keys
from .tracker import Tracker
from .viz import grid_row
from .weights import load_frozen_g, load_segmenter, segmenter_path

log = logging.getLogger(__name__)
CAM_THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]
TRIVIAL = ("all-background", "all-foreground")


def trivial_labels(name: str, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """all-background: 0 everywhere; all-foreground: each image's first tagged class (bird for C = 1)."""
    B = labels.shape[0]
    if name == "all-background":
        return torch.zeros(B, *size, dtype=torch.long)
    first = torch.where(labels.sum(1) > 0, labels.argmax(1) + 1, torch.ones(B, dtype=torch.long))
    return first[:, None, None].expand(B, *size).clone()


# ---- the threshold search (CAM, the method's foreground, the preserve gate) ----

@torch.no_grad()
def search_threshold(cfg: Config, num_labels: int, candidates: list[float],
                     prepare: Callable[[dict], Callable[[float], torch.Tensor]]) -> tuple[float, dict[float, float]]:
    """The candidate with the best mIoU on `eval.cam_split`. `prepare(batch)` does a batch's network work once
    and returns the label map for a threshold. Returns the best threshold and the whole curve."""
    meters = {t: SegmentationMeter(num_labels) for t in candidates}
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        labels_for = prepare(batch)
        positive = batch["labels"].sum(1) > 0
        for t, meter in meters.items():
            meter.update(labels_for(t), batch["mask"], positive)
    curve = {t: m.summary()["miou"] for t, m in meters.items()}
    return max(curve, key=curve.get), curve


def choose_cam_threshold(g, cfg: Config, num_labels: int) -> tuple[float, dict[float, float]]:
    def prepare(batch):
        scores = cam_scores(g, batch["image"])
        return lambda t: cam_labels(scores, t)
    return search_threshold(cfg, num_labels, CAM_THRESHOLDS, prepare)


def choose_fg_threshold(model, cfg: Config, num_labels: int, g=None) -> tuple[float, dict[float, float]]:
    """The method's foreground threshold chosen on the same split and by the same rule as CAM's (`g`: for the
    tag gate, which acts before the threshold)."""
    def prepare(batch):  # the one inference path's logits (flip, scales, tag gate, CRF), before threshold and gate
        logits = predict_masks(model, batch["image"], PredictSettings.of(cfg.eval, gate_threshold=0.0), g).logits
        return lambda t: model.predict_labels(logits, t)
    return search_threshold(cfg, num_labels, CAM_THRESHOLDS, prepare)


def choose_gate_threshold(model, g, cfg: Config, num_labels: int, fg_threshold: float
                          ) -> tuple[float, dict[float, float]]:
    """The preserve gate's threshold chosen on the CAM split by mIoU; 0 (no gate) is one of the candidates."""
    def prepare(batch):
        pred = predict_masks(model, batch["image"], PredictSettings.of(cfg.eval, fg_threshold=fg_threshold,
                                                                       gate_threshold=0.0), g).labels
        scores = preserve_scores(g, batch["image"], pred, num_labels - 1, cfg.objective)
        return lambda t: apply_gate(pred, scores, t)
    return search_threshold(cfg, num_labels, [0.0, *CAM_THRESHOLDS], prepare)


@torch.no_grad()
def choose_cam_thresholds_per_class(g, cfg: Config, num_classes: int) -> tuple[list[float], list[dict]]:
    """C > 1: one CAM threshold per class, each chosen on `eval.cam_split` (multiclass.PerClassThresholdSearch)."""
    search = PerClassThresholdSearch(num_classes, CAM_THRESHOLDS)
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        search.update(cam_scores(g, batch["image"]), batch["mask"], batch["labels"])
    return search.best()


def choose_thresholds(cfg: Config, model, g, classes: list[str]) -> dict:
    """Every threshold eval predicts with, and how each was chosen (the start of results.json)."""
    C, num_labels = len(classes), len(classes) + 1
    threshold, curve = choose_cam_threshold(g, cfg, num_labels)
    fg_threshold, fg_curve = cfg.eval.fg_threshold, {}
    if model is not None and cfg.eval.fg_threshold_from_val:
        fg_threshold, fg_curve = choose_fg_threshold(model, cfg, num_labels, g)
    gate_threshold, gate_curve = cfg.eval.gate_threshold, {}
    if model is not None and cfg.eval.gate_threshold_from_val:
        gate_threshold, gate_curve = choose_gate_threshold(model, g, cfg, num_labels, fg_threshold)
    chosen: dict = {"classes": classes, "cam_threshold": threshold, "cam_threshold_curve": curve,
                    "fg_threshold": fg_threshold, "fg_threshold_curve": fg_curve,
                    "gate_threshold": gate_threshold, "gate_threshold_curve": gate_curve,
                    "cam_threshold_split": cfg.eval.cam_split, "splits": {}}
    if C > 1:  # CAM for every class, each with its own threshold chosen on val
        class_thresholds, class_curves = choose_cam_thresholds_per_class(g, cfg, C)
        chosen["cam_thresholds"] = dict(zip(classes, class_thresholds))
        chosen["cam_threshold_curves"] = dict(zip(classes, class_curves))
    return chosen


# ---- scoring one split ----

@dataclass
class SplitScores:
    """What one pass over a split accumulates: a meter per prediction kind, per kind and bias group, each
    kind's boundary F (trainer/boundary.py), on a paired split (samples with `pair` and `group` metadata) each
    kind's per-image scores by pair (trainer/paired.py), the method's foreground area on positive and negative
    images, and the grid rows."""
    meters: dict[str, SegmentationMeter]
    groups: dict[str, dict[str, SegmentationMeter]]
    areas: dict[str, list[float]] = field(default_factory=lambda: {"positive": [], "negative": []})
    rows: list = field(default_factory=list)
    boundary: dict[str, BoundaryMeter] = field(default_factory=dict)
    pairs: dict[str, PairedScores] = field(default_factory=dict)

    def update(self, preds: dict[str, torch.Tensor], batch: dict, num_labels: int) -> None:
        truth, positive = batch["mask"], batch["labels"].sum(1) > 0
        groups = bias_groups(batch.get("meta", []))
        picks = {group: torch.tensor([b == group for b in groups]) for group in sorted({b for b in groups if b})}
        keys = pair_keys(batch.get("meta", []))
        for name, pred in preds.items():
            self.meters[name].update(pred, truth, positive)
            image_f = self.boundary.setdefault(name, BoundaryMeter(num_labels)).update(pred, truth, positive,
                                                                                      batch.get("size"))
            if any(keys):
                self.pairs.setdefault(name, PairedScores(num_labels)).update(pred, truth, positive, keys, image_f)
            for group, pick in picks.items():
                meter = self.groups[name].setdefault(group, SegmentationMeter(num_labels))
                meter.update(pred[pick], truth[pick], positive[pick])
        if "method" in preds:
            fg_area = (preds["method"] > 0).float().mean(dim=(1, 2))
            self.areas["positive"] += fg_area[positive].tolist()
            self.areas["negative"] += fg_area[~positive].tolist()


def batch_predictions(batch: dict, model, g, cfg: Config, chosen: dict) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """Every prediction kind for one batch: the method (the one inference path), CAM (and CAM through the
    same gate), the trivial rows. Also returns the segmenter's forward and the CAM scores (for the grid)."""
    images, labels = batch["image"], batch["labels"]
    C, gate_threshold = labels.shape[1], chosen["gate_threshold"]
    scores = cam_scores(g, images)
    class_thresholds = list(chosen["cam_thresholds"].values()) if "cam_thresholds" in chosen else None
    preds = {"CAM": cam_labels(scores, chosen["cam_threshold"]) if class_thresholds is None
             else cam_labels_per_class(scores, class_thresholds)}
    if model is not None and gate_threshold > 0:  # CAM through the same gate, so the comparison is fair
        preds["CAM-gated"] = apply_gate(preds["CAM"], preserve_scores(g, images, preds["CAM"], C, cfg.objective),
                                        gate_threshold)
    for name in TRIVIAL:
        preds[name] = trivial_labels(name, labels, tuple(images.shape[-2:]))
    net_out = {}
    if model is not None:
        net_out = model(images)
        settings = PredictSettings.of(cfg.eval, fg_threshold=chosen["fg_threshold"], gate_threshold=gate_threshold)
        preds["method"] = predict_masks(model, images, settings, g, cfg.objective, net_out).labels
    return preds, net_out, scores


def _pick_grid_indices(labels: torch.Tensor, want_pos: int, want_neg: int) -> list[int]:
    picked = []
    for i, positive in enumerate((labels.sum(1) > 0).tolist()):
        if positive and want_pos > 0:
            picked.append(i)
            want_pos -= 1
        elif not positive and want_neg > 0:
            picked.append(i)
            want_neg -= 1
    return picked


def add_grid_rows(rows: list, left: list[int], batch: dict, preds: dict, net_out: dict, scores: torch.Tensor) -> None:
    """The first positive and negative images of the split, up to `left` = [positives, negatives] still wanted.
    Images of a padded batch (real photos at their own size) are cut to batch["size"]: no padding is shown."""
    images, labels, truth = batch["image"], batch["labels"], batch["mask"]
    for i in _pick_grid_indices(labels, *left):
        positive = bool(labels[i].sum() > 0)
        left[0 if positive else 1] -= 1
        h, w = (int(v) for v in batch["size"][i]) if "size" in batch else images.shape[-2:]
        image, cam = images[i, :, :h, :w], scores[i].max(0).values[:h, :w]
        if net_out:
            M = mask_lets(net_out["mask_logits"][i:i + 1])[..., :h, :w]
            X = net_out["imagelets"][i:i + 1][..., :h, :w]
            rows.append(grid_row(image, truth[i, :h, :w], preds["method"][i, :h, :w], cam,
                                 M[0], X[0], reconstruction(M, X)[0]))
        else:
            rows.append(grid_row(image, truth[i, :h, :w], preds["CAM"][i, :h, :w], cam, [], [], image))


@torch.no_grad()
def score_split(cfg: Config, split: str, model, g, chosen: dict, methods: list[str]) -> SplitScores:
    """One ordered pass over `split`: every prediction kind scored, by bias group too, and the grid rows."""
    num_labels = len(chosen["classes"]) + 1
    scored = SplitScores({m: SegmentationMeter(num_labels) for m in methods}, {m: {} for m in methods})
    left = [(cfg.eval.grid_images + 1) // 2, cfg.eval.grid_images // 2]
    for batch in tqdm(eval_batches(cfg, split), desc=f"eval {split}", dynamic_ncols=True, leave=False):
        preds, net_out, scores = batch_predictions(batch, model, g, cfg, chosen)
        scored.update(preds, batch, num_labels)
        add_grid_rows(scored.rows, left, batch, preds, net_out, scores)
    return scored


@torch.no_grad()
def evaluate(cfg: Config, segmenter_file: str | Path | None = None, parent_run_id: str | None = None,
             with_segmenter: bool = True) -> dict:
    """Choose the thresholds, score every split of `eval.splits`, report; returns results.json's contents
    (with the eval run's MLflow id as "run_id")."""
    splits = eval_splits(cfg)  # an optional split the data set lacks is left out with a warning
    for split in splits:  # fail before any work on an unknown split or one without masks
        if not split_has_masks(cfg, split):
            raise ConfigError(f"split {split!r} of {cfg.data.url} has no masks; eval.splits must name "
                             "evaluation splits")
    init_distributed()
    set_threads(cfg.train.threads)
    out = run_dir(cfg) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    classes = dataset_classes(cfg)
    g_net, g = load_frozen_g(cfg, len(classes))
    model = None
    if with_segmenter:
        model, _, _ = load_segmenter(segmenter_file or segmenter_path(cfg), g_net)
        model.eval()
    tracker = Tracker(cfg, stage_run_name(cfg, "eval"), parent_run_id=parent_run_id)
    results = choose_thresholds(cfg, model, g, classes)
    cam_gate = model is not None and results["gate_threshold"] > 0
    methods = (["method"] if model is not None else []) + ["CAM"] + (["CAM-gated"] if cam_gate else []) + [*TRIVIAL]
    for split in splits:
        scored = score_split(cfg, split, model, g, results, methods)
        results["splits"][split] = split_result(cfg, split, classes, scored, g, model, out, tracker)
    finish_results(results, out, tracker)
    results["run_id"] = tracker.run_id
    return results
