"""The reporting half of `wsssrec eval`: one split's scores as a result record (g's accuracy, every
prediction kind's summary with its boundary F, per class and per bias group for C > 1, on a paired split the
groups, the paired gap and the worst group, confusion matrices and the picture grid),
its metrics logged to MLflow, and at the end results.json, results.md and the table the CLI prints."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .classifier import classifier_accuracy
from .config import Config
from .files import write_json
from .multiclass import class_report, per_class_table, save_confusion_png
from .tracker import Tracker
from .viz import save_grid


def split_result(cfg: Config, split: str, classes: list[str], scored, g, model, out: Path, tracker: Tracker) -> dict:
    """The result record of one split (`scored`: evaluate.SplitScores); its metrics go to MLflow."""
    methods = list(scored.meters)
    result = {"g": classifier_accuracy(g, cfg, split), "methods": method_summaries(scored)}
    if scored.pairs:  # a paired split: per group, the paired gap, the worst group (trainer/paired.py)
        result["paired"] = {m: scored.pairs[m].summary() for m in methods if m in scored.pairs}
    if model is not None:
        result["mean_fg_area"] = {k: float(np.mean(v)) if v else float("nan") for k, v in scored.areas.items()}
    if len(classes) > 1:
        result["classes"] = {m: class_report(scored.meters[m], classes) for m in methods}
        result["bias_groups"] = {
            m: {group: {**meter.summary(), "images": meter.positive_images + meter.negative_images,
                        "worst_class_iou": class_report(meter, classes)["worst_class_iou"]}
                for group, meter in sorted(scored.groups[m].items())} for m in methods}
        for m in ("method", "CAM"):
            if m in result["classes"]:
                png = save_confusion_png(result["classes"][m], out / f"confusion_{split}_{m}.png",
                                         title=f"{cfg.train.run_name} {split} {m}")
                result.setdefault("confusion_png", {})[m] = str(png)
                tracker.log_artifact(png, "confusion")
    grid = save_grid(scored.rows, out / f"grid_{split}.png", K=model.K if model is not None else 0,
                     title=f"{cfg.train.run_name} {split}")
    result["grid"] = str(grid)
    tracker.log_artifact(grid, "grids")
    tracker.log_metrics(split_metrics(split, result))
    return result


def method_summaries(scored) -> dict[str, dict[str, float]]:
    """Each prediction kind's summary: the meter's (IoU, mIoU, negative FP area) and its boundary F."""
    return {m: {**meter.summary(), **(scored.boundary[m].summary() if m in scored.boundary else {})}
            for m, meter in scored.meters.items()}


PAIRED_METRICS = ("paired_gap", "pair_gap_mean", "pair_fp_gap", "boundary_f_gap", "worst_group_miou")


def split_metrics(split: str, result: dict) -> dict[str, float]:
    """The MLflow metrics of one split: g's accuracy, each kind's summary (boundary F included), per-class IoU,
    bias groups' mIoU, and on a paired split each group's mIoU and boundary F, the gaps and the worst group."""
    flat = {f"{split}/g_{k}": v for k, v in result["g"].items()}
    for m, summary in result["methods"].items():
        flat.update({f"{split}/{m}/{k}": v for k, v in summary.items() if np.isfinite(v)})
    for m, report in result.get("classes", {}).items():
        flat.update({f"{split}/{m}/iou_{name}": v for name, v in report["per_class_iou"].items() if np.isfinite(v)})
        if np.isfinite(report["worst_class_iou"]):
            flat[f"{split}/{m}/worst_class_iou"] = report["worst_class_iou"]
    for m, by_group in result.get("bias_groups", {}).items():
        flat.update({f"{split}/{m}/{group}/miou": s["miou"] for group, s in by_group.items() if np.isfinite(s["miou"])})
    for m, paired in result.get("paired", {}).items():
        for group, s in paired.get("groups", {}).items():
            flat.update({f"{split}/{m}/{group}/{k}": s[k] for k in ("miou", "boundary_f") if np.isfinite(s[k])})
        flat.update({f"{split}/{m}/{k}": paired[k] for k in PAIRED_METRICS if k in paired and np.isfinite(paired[k])})
    return flat


def finish_results(results: dict, out: Path, tracker: Tracker) -> None:
    """The g gate warning, results.json and results.md on disk and in MLflow; closes the eval run."""
    _gate_warning(results)
    write_json(out / "results.json", results)
    table = results_table(results)
    if len(results["classes"]) > 1:
        table += "\n" + per_class_table(results)
    (out / "results.md").write_text(table)
    tracker.log_artifact(out / "results.json")
    tracker.log_artifact(out / "results.md")
    tracker.log_metrics({"cam_threshold": results["cam_threshold"]})
    tracker.finish()


def _gate_warning(results: dict) -> None:
    splits = results["splits"]
    if "test_aligned" in splits and "test_conflict" in splits:
        gap = splits["test_aligned"]["g"]["accuracy"] - splits["test_conflict"]["g"]["accuracy"]
        if gap > 0.15:
            msg = (f"WARNING: g's accuracy on test_conflict is {gap:.2f} below test_aligned: g learned the "
                   "background, not the object; segmentation numbers below are not meaningful")
            results["gate_warning"] = msg
            print(msg)


def _num(value) -> str:
    return f"{value:.3f}" if value is not None and np.isfinite(value) else "–"


def results_table(results: dict) -> str:
    """Markdown: per split and prediction kind g's accuracy, IoU, boundary F at 2 px, mIoU, negative FP area;
    then, for a paired split, the paired table (`paired_table`)."""
    fg_name = f"{results['classes'][0]} IoU" if len(results["classes"]) == 1 else "mean fg IoU"
    lines = [f"| split | method | g acc | {fg_name} | boundary F | bg IoU | mIoU | mIoU all | neg FP area |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, res in results["splits"].items():
        for method, s in res["methods"].items():
            fg = np.nanmean([v for k, v in s.items() if k.startswith("iou_")])
            lines.append(f"| {split} | {method} | {res['g']['accuracy']:.3f} | {fg:.3f} | {_num(s.get('boundary_f'))}"
                         f" | {s['background_iou']:.3f} | {s['miou']:.3f} | {_num(s.get('miou_all'))}"
                         f" | {s['negative_fp_area']:.3f} |")
    cam = results.get("cam_thresholds") or results["cam_threshold"]  # one per class when C > 1
    lines.append(f"\nCAM threshold {cam} (chosen on {results['cam_threshold_split']}); "
                 f"method foreground threshold {results.get('fg_threshold', 0.5)}, preserve gate threshold "
                 f"{results.get('gate_threshold', 0.0)} (0: off). Boundary F: DAVIS F measure at a 2-pixel "
                 "tolerance, mean over positive images. mIoU: IoU pooled over the pixels of the positive images; "
                 "mIoU all: one confusion matrix over every image of the split, negatives included (VOC's "
                 "convention).")
    paired = paired_table(results)
    return "\n".join(lines) + "\n" + ("\n" + paired if paired else "")


def paired_table(results: dict) -> str:
    """Markdown: per paired split and prediction kind, each group's mIoU and boundary F, the paired gap (pooled
    group mIoUs), the mean ± std of the per-pair mIoU differences, and the worst group ('' without one)."""
    lines = []
    for split, res in results["splits"].items():
        for method, p in res.get("paired", {}).items():
            if not p:
                continue
            a, b = p["gap"]
            if not lines:
                lines = [(f"| split | method | {a} mIoU | {b} mIoU | paired gap ({a} − {b}) | per-pair gap | "
                          f"{a} boundary F | {b} boundary F | worst group |"), "|---|---|---|---|---|---|---|---|---|"]
            ga, gb = p["groups"][a], p["groups"][b]
            lines.append(f"| {split} | {method} | {_num(ga['miou'])} | {_num(gb['miou'])} | {_num(p['paired_gap'])} | "
                         f"{_num(p['pair_gap_mean'])} ± {_num(p['pair_gap_std'])} ({p['positive_pairs']} pairs) | "
                         f"{_num(ga['boundary_f'])} | {_num(gb['boundary_f'])} | "
                         f"{p['worst_group']} {_num(p['worst_group_miou'])} |")
    return "\n".join(lines) + "\n" if lines else ""
