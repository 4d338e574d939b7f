"""The reporting half of `wsssrec eval`: one split's scores as a result record (g's accuracy, every
prediction kind's summary, per class and per bias group for C > 1, confusion matrices and the picture grid),
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
    result = {"g": classifier_accuracy(g, cfg, split), "methods": {m: scored.meters[m].summary() for m in methods}}
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


def split_metrics(split: str, result: dict) -> dict[str, float]:
    """The MLflow metrics of one split: g's accuracy, each kind's summary, per-class IoU, bias groups' mIoU."""
    flat = {f"{split}/g_{k}": v for k, v in result["g"].items()}
    for m, summary in result["methods"].items():
        flat.update({f"{split}/{m}/{k}": v for k, v in summary.items() if np.isfinite(v)})
    for m, report in result.get("classes", {}).items():
        flat.update({f"{split}/{m}/iou_{name}": v for name, v in report["per_class_iou"].items() if np.isfinite(v)})
        if np.isfinite(report["worst_class_iou"]):
            flat[f"{split}/{m}/worst_class_iou"] = report["worst_class_iou"]
    for m, by_group in result.get("bias_groups", {}).items():
        flat.update({f"{split}/{m}/{group}/miou": s["miou"] for group, s in by_group.items() if np.isfinite(s["miou"])})
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
