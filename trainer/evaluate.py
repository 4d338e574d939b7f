"""`wsssrec eval`: per split, g's accuracy and, for the trained segmenter, the CAM baseline and the trivial
all-background / all-foreground predictions: foreground IoU over positive images (ignore excluded), background
IoU, mIoU and the false-positive foreground area on negative images. Writes picture grids, a JSON and a
Markdown table, and logs all of it to MLflow."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cam import cam_labels, cam_scores
from .classifier import classifier_accuracy
from .config import Config, ConfigError
from .data import dataset_classes, eval_batches, split_has_masks
from .distributed import init_distributed, set_threads
from .files import run_dir, write_json
from .gate import apply_gate, method_labels, preserve_scores
from .losses import mask_lets, reconstruction
from .metrics import SegmentationMeter
from .models import mask_logits
from .multiclass import (PerClassThresholdSearch, bias_groups, cam_labels_per_class, class_report, per_class_table,
                         save_confusion_png)
from .tracking import Tracker
from .weights import load_frozen_g, load_segmenter, segmenter_path
from .viz import grid_row, save_grid

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


@torch.no_grad()
def choose_cam_threshold(g, cfg: Config, num_labels: int) -> tuple[float, dict[float, float]]:
    meters = {t: SegmentationMeter(num_labels) for t in CAM_THRESHOLDS}
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        scores = cam_scores(g, batch["image"])
        positive = batch["labels"].sum(1) > 0
        for t, meter in meters.items():
            meter.update(cam_labels(scores, t), batch["mask"], positive)
    curve = {t: m.summary()["miou"] for t, m in meters.items()}
    return max(curve, key=curve.get), curve


@torch.no_grad()
def choose_cam_thresholds_per_class(g, cfg: Config, num_classes: int) -> tuple[list[float], list[dict]]:
    """C > 1: one CAM threshold per class, each chosen on `eval.cam_split` (multiclass.PerClassThresholdSearch)."""
    search = PerClassThresholdSearch(num_classes, CAM_THRESHOLDS)
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        search.update(cam_scores(g, batch["image"]), batch["mask"], batch["labels"])
    return search.best()


@torch.no_grad()
def choose_fg_threshold(model, cfg: Config, num_labels: int) -> tuple[float, dict[float, float]]:
    """The method's foreground threshold chosen on the same split and by the same rule as CAM's."""
    meters = {t: SegmentationMeter(num_labels) for t in CAM_THRESHOLDS}
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        logits = mask_logits(model, batch["image"], cfg.eval.flip)
        positive = batch["labels"].sum(1) > 0
        for t, meter in meters.items():
            meter.update(model.predict_labels(logits, t), batch["mask"], positive)
    curve = {t: m.summary()["miou"] for t, m in meters.items()}
    return max(curve, key=curve.get), curve


@torch.no_grad()
def choose_gate_threshold(model, g, cfg: Config, num_labels: int, fg_threshold: float
                          ) -> tuple[float, dict[float, float]]:
    """The preserve gate's threshold chosen on the CAM split by mIoU; 0 (no gate) is one of the candidates."""
    candidates = [0.0, *CAM_THRESHOLDS]
    meters = {t: SegmentationMeter(num_labels) for t in candidates}
    for batch in eval_batches(cfg, cfg.eval.cam_split):
        images = batch["image"]
        pred = model.predict_labels(mask_logits(model, images, cfg.eval.flip), fg_threshold)
        scores = preserve_scores(g, images, pred, num_labels - 1, cfg.objective)
        positive = batch["labels"].sum(1) > 0
        for t, meter in meters.items():
            meter.update(apply_gate(pred, scores, t), batch["mask"], positive)
    curve = {t: m.summary()["miou"] for t, m in meters.items()}
    return max(curve, key=curve.get), curve


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


@torch.no_grad()
def evaluate(cfg: Config, segmenter_file: str | Path | None = None, parent_run_id: str | None = None,
             with_segmenter: bool = True) -> dict:
    for split in cfg.eval.splits:  # fail before any work on an unknown split or one without masks
        if not split_has_masks(cfg, split):
            raise ConfigError(f"split {split!r} of {cfg.data.url} has no masks; eval.splits must name "
                             "evaluation splits")
    init_distributed()
    set_threads(cfg.train.threads)
    out = run_dir(cfg) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    classes = dataset_classes(cfg)
    C, num_labels = len(classes), len(classes) + 1
    g_net, g = load_frozen_g(cfg, C)
    model = None
    if with_segmenter:
        model, _, _ = load_segmenter(segmenter_file or segmenter_path(cfg), g_net)
        model.eval()
    tracker = Tracker(cfg, f"{cfg.train.run_name or 'run'}-eval", parent_run_id=parent_run_id)
    threshold, curve = choose_cam_threshold(g, cfg, num_labels)
    fg_threshold, fg_curve = cfg.eval.fg_threshold, {}
    if model is not None and cfg.eval.fg_threshold_from_val:
        fg_threshold, fg_curve = choose_fg_threshold(model, cfg, num_labels)
    gate_threshold, gate_curve = cfg.eval.gate_threshold, {}
    if model is not None and cfg.eval.gate_threshold_from_val:
        gate_threshold, gate_curve = choose_gate_threshold(model, g, cfg, num_labels, fg_threshold)
    results: dict = {"classes": classes, "cam_threshold": threshold, "cam_threshold_curve": curve,
                     "fg_threshold": fg_threshold, "fg_threshold_curve": fg_curve,
                     "gate_threshold": gate_threshold, "gate_threshold_curve": gate_curve,
                     "cam_threshold_split": cfg.eval.cam_split, "splits": {}}
    class_thresholds = None
    if C > 1:  # CAM for every class, each with its own threshold chosen on val
        class_thresholds, class_curves = choose_cam_thresholds_per_class(g, cfg, C)
        results["cam_thresholds"] = dict(zip(classes, class_thresholds))
        results["cam_threshold_curves"] = dict(zip(classes, class_curves))
    cam_gate = model is not None and gate_threshold > 0  # CAM through the same gate, so the comparison is fair
    methods = (["method"] if model is not None else []) + ["CAM"] + (["CAM-gated"] if cam_gate else []) + [*TRIVIAL]
    for split in cfg.eval.splits:
        meters = {m: SegmentationMeter(num_labels) for m in methods}
        group_meters: dict[str, dict[str, SegmentationMeter]] = {m: {} for m in methods}  # by sample bias group
        rows, pos_left, neg_left = [], (cfg.eval.grid_images + 1) // 2, cfg.eval.grid_images // 2
        areas = {"positive": [], "negative": []}
        for batch in tqdm(eval_batches(cfg, split), desc=f"eval {split}", dynamic_ncols=True, leave=False):
            images, labels, truth = batch["image"], batch["labels"], batch["mask"]
            positive = labels.sum(1) > 0
            size = tuple(images.shape[-2:])
            scores = cam_scores(g, images)
            preds = {"CAM": cam_labels(scores, threshold) if class_thresholds is None
                     else cam_labels_per_class(scores, class_thresholds)}
            if cam_gate:
                cam_gate_scores = preserve_scores(g, images, preds["CAM"], C, cfg.objective)
                preds["CAM-gated"] = apply_gate(preds["CAM"], cam_gate_scores, gate_threshold)
            for name in TRIVIAL:
                preds[name] = trivial_labels(name, labels, size)
            if model is not None:
                net_out = model(images)
                preds["method"] = method_labels(model, images, flip=cfg.eval.flip, fg_threshold=fg_threshold,
                                                gate_threshold=gate_threshold, g=g, objective=cfg.objective,
                                                net_out=net_out)
                fg_area = (preds["method"] > 0).float().mean(dim=(1, 2))
                areas["positive"] += fg_area[positive].tolist()
                areas["negative"] += fg_area[~positive].tolist()
            groups = bias_groups(batch.get("meta", []))
            picks = {group: torch.tensor([b == group for b in groups]) for group in sorted({b for b in groups if b})}
            for name, pred in preds.items():
                meters[name].update(pred, truth, positive)
                for group, pick in picks.items():
                    meter = group_meters[name].setdefault(group, SegmentationMeter(num_labels))
                    meter.update(pred[pick], truth[pick], positive[pick])
            for i in _pick_grid_indices(labels, pos_left, neg_left):
                pos_left -= int(positive[i])
                neg_left -= int(not positive[i])
                if model is not None:
                    M = mask_lets(net_out["mask_logits"][i:i + 1])
                    X = net_out["imagelets"][i:i + 1]
                    rows.append(grid_row(images[i], truth[i], preds["method"][i], scores[i].max(0).values,
                                         M[0], X[0], reconstruction(M, X)[0]))
                else:
                    rows.append(grid_row(images[i], truth[i], preds["CAM"][i], scores[i].max(0).values,
                                         [], [], images[i]))
        split_result = {"g": classifier_accuracy(g, cfg, split),
                        "methods": {m: meters[m].summary() for m in methods}}
        if model is not None:
            split_result["mean_fg_area"] = {k: float(np.mean(v)) if v else float("nan") for k, v in areas.items()}
        if C > 1:
            split_result["classes"] = {m: class_report(meters[m], classes) for m in methods}
            split_result["bias_groups"] = {
                m: {group: {**meter.summary(), "images": meter.positive_images + meter.negative_images,
                            "worst_class_iou": class_report(meter, classes)["worst_class_iou"]}
                    for group, meter in sorted(group_meters[m].items())} for m in methods}
            for m in ("method", "CAM"):
                if m in split_result["classes"]:
                    png = save_confusion_png(split_result["classes"][m], out / f"confusion_{split}_{m}.png",
                                             title=f"{cfg.train.run_name} {split} {m}")
                    split_result.setdefault("confusion_png", {})[m] = str(png)
                    tracker.log_artifact(png, "confusion")
        grid = save_grid(rows, out / f"grid_{split}.png", K=model.K if model is not None else 0,
                         title=f"{cfg.train.run_name} {split}")
        split_result["grid"] = str(grid)
        results["splits"][split] = split_result
        tracker.log_artifact(grid, "grids")
        flat = {f"{split}/g_{k}": v for k, v in split_result["g"].items()}
        for m, summary in split_result["methods"].items():
            flat.update({f"{split}/{m}/{k}": v for k, v in summary.items() if np.isfinite(v)})
        for m, report in split_result.get("classes", {}).items():
            flat.update({f"{split}/{m}/iou_{name}": v for name, v in report["per_class_iou"].items() if np.isfinite(v)})
            if np.isfinite(report["worst_class_iou"]):
                flat[f"{split}/{m}/worst_class_iou"] = report["worst_class_iou"]
        for m, by_group in split_result.get("bias_groups", {}).items():
            flat.update({f"{split}/{m}/{group}/miou": s["miou"] for group, s in by_group.items() if np.isfinite(s["miou"])})
        tracker.log_metrics(flat)
    _gate_warning(results)
    write_json(out / "results.json", results)
    table = results_table(results)
    if C > 1:
        table += "\n" + per_class_table(results)
    (out / "results.md").write_text(table)
    tracker.log_artifact(out / "results.json")
    tracker.log_artifact(out / "results.md")
    tracker.log_metrics({"cam_threshold": threshold})
    tracker.finish()
    return results


def _gate_warning(results: dict) -> None:
    splits = results["splits"]
    if "test_aligned" in splits and "test_conflict" in splits:
        gap = splits["test_aligned"]["g"]["accuracy"] - splits["test_conflict"]["g"]["accuracy"]
        if gap > 0.15:
            msg = (f"WARNING: g's accuracy on test_conflict is {gap:.2f} below test_aligned: g learned the "
                   "background, not the object; segmentation numbers below are not meaningful")
            results["gate_warning"] = msg
            print(msg)


def results_table(results: dict) -> str:
    fg_name = f"{results['classes'][0]} IoU" if len(results["classes"]) == 1 else "mean fg IoU"
    lines = [f"| split | method | g acc | {fg_name} | bg IoU | mIoU | neg FP area |", "|---|---|---|---|---|---|---|"]
    for split, res in results["splits"].items():
        for method, s in res["methods"].items():
            fg = np.nanmean([v for k, v in s.items() if k.startswith("iou_")])
            lines.append(f"| {split} | {method} | {res['g']['accuracy']:.3f} | {fg:.3f} | {s['background_iou']:.3f}"
                         f" | {s['miou']:.3f} | {s['negative_fp_area']:.3f} |")
    cam = results.get("cam_thresholds") or results["cam_threshold"]  # one per class when C > 1
    lines.append(f"\nCAM threshold {cam} (chosen on {results['cam_threshold_split']}); "
                 f"method foreground threshold {results.get('fg_threshold', 0.5)}, preserve gate threshold "
                 f"{results.get('gate_threshold', 0.0)} (0: off).")
    return "\n".join(lines) + "\n"
