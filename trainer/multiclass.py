"""Multi-class (C > 1). Evaluation: CAM thresholds chosen per class on val, per-class IoU, worst-class IoU, the
confusion matrix between labels (table and picture), and per-bias-group meters (a sample's `bias` metadata:
aligned or conflict); `wsssrec eval` calls these. Training: how the K-way mask head starts (`class_bias_init`,
`binary_head_rows`). For C = 1 nothing here changes the binary results."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .metrics import SegmentationMeter


def cam_labels_per_class(scores: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Label map from B×C CAM scores with one threshold per class: among the classes whose score exceeds their
    own threshold, the strongest (label c + 1); 0 where none does. One threshold for all classes gives
    `cam.cam_labels`."""
    t = torch.as_tensor(thresholds, dtype=scores.dtype, device=scores.device)[None, :, None, None]
    passed = torch.where(scores > t, scores, torch.full_like(scores, -1.0))
    best, cls = passed.max(dim=1)
    return torch.where(best >= 0, cls + 1, torch.zeros_like(cls))


class PerClassThresholdSearch:
    """For each class c and threshold t: the mIoU of the two-label problem {not c, c} (prediction score_c > t)
    over the images tagged with c. The best t per class is that class's CAM threshold."""

    def __init__(self, num_classes: int, thresholds: list[float]):
        self.thresholds = thresholds
        self.meters = [[SegmentationMeter(2) for _ in thresholds] for _ in range(num_classes)]

    def update(self, scores: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor) -> None:
        for c, row in enumerate(self.meters):
            tagged = labels[:, c] > 0
            if not tagged.any():
                continue
            target = torch.where(truth[tagged] == 255, truth[tagged], (truth[tagged] == c + 1).long())
            for t, meter in zip(self.thresholds, row):
                meter.update((scores[tagged, c] > t).long(), target, torch.ones(int(tagged.sum()), dtype=torch.bool))

    def best(self) -> tuple[list[float], list[dict[float, float]]]:
        curves = [{t: m.summary()["miou"] for t, m in zip(self.thresholds, row)} for row in self.meters]
        return [max(curve, key=lambda t: np.nan_to_num(curve[t], nan=-1.0)) for curve in curves], curves


def class_report(meter: SegmentationMeter, classes: list[str]) -> dict:
    """Per-class IoU by name, the worst class, and the confusion matrix (rows: truth, columns: prediction,
    labels background + classes, pixel counts over positive images, ignore excluded)."""
    iou = meter.iou()
    per_class = {name: float(iou[c + 1]) for c, name in enumerate(classes)}
    finite = {k: v for k, v in per_class.items() if np.isfinite(v)}
    worst = min(finite, key=finite.get) if finite else None
    return {"per_class_iou": per_class, "worst_class": worst,
            "worst_class_iou": finite[worst] if worst else float("nan"),
            "confusion": meter.confusion.tolist(), "labels": ["background", *classes]}


def bias_groups(meta: list[dict]) -> list[str | None]:
    """Each sample's bias group from its metadata (toy-multi: aligned / conflict; None when absent)."""
    return [m.get("bias") if isinstance(m, dict) else None for m in meta]


def confusion_table(report: dict) -> str:
    """Markdown: row-normalised confusion (fraction of each true label's pixels predicted as each label)."""
    labels, confusion = report["labels"], np.asarray(report["confusion"], dtype=np.float64)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    lines = ["| truth \\ prediction | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, rows):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def save_confusion_png(report: dict, path: Path, title: str = "", cell: int = 56) -> Path:
    """The row-normalised confusion matrix as a picture: darker = more pixels, values written in each cell."""
    labels, confusion = report["labels"], np.asarray(report["confusion"], dtype=np.float64)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    n, left, top = len(labels), 90, 40
    canvas = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=(0, 0, 0))
    draw.text((left, top - 14), "prediction ->   (rows: truth, fraction of its pixels)", fill=(0, 0, 0))
    for j, name in enumerate(labels):
        draw.text((left + j * cell + 2, top + n * cell + 4), name[:9], fill=(0, 0, 0))
    for i, name in enumerate(labels):
        draw.text((4, top + i * cell + cell // 2 - 6), name[:12], fill=(0, 0, 0))
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((box[0] + 12, box[1] + cell // 2 - 6), f"{rows[i, j]:.2f}",
                      fill=(255, 255, 255) if rows[i, j] > 0.5 else (0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def per_class_table(results: dict) -> str:
    """Markdown: per split and method, g accuracy, each class's IoU, mIoU over C + 1 labels, the worst class,
    and per bias group mIoU."""
    classes = results["classes"]
    head = "| split | method | " + " | ".join(f"{c} IoU" for c in classes) + " | bg IoU | mIoU | worst class |"
    lines = [head, "|---" * (len(classes) + 5) + "|"]
    for split, res in results["splits"].items():
        for method, report in res.get("classes", {}).items():
            s = res["methods"][method]
            ious = " | ".join(f"{report['per_class_iou'][c]:.3f}" for c in classes)
            lines.append(f"| {split} | {method} | {ious} | {s['background_iou']:.3f} | {s['miou']:.3f} | "
                         f"{report['worst_class']} {report['worst_class_iou']:.3f} |")
    groups = [(split, method, group, s) for split, res in results["splits"].items()
              for method, by_group in res.get("bias_groups", {}).items() for group, s in by_group.items()]
    if groups:
        lines += ["", "| split | method | bias group | images | mIoU | worst class IoU |", "|---|---|---|---|---|---|"]
        for split, method, group, s in groups:
            lines.append(f"| {split} | {method} | {group} | {s['images']} | {s['miou']:.3f} | "
                         f"{s['worst_class_iou']:.3f} |")
    for split, res in results["splits"].items():
        for method in ("method", "CAM"):
            if method in res.get("classes", {}):
                lines += ["", f"Confusion ({split}, {method}; rows: truth, fraction of its pixels):", "",
                          confusion_table(res["classes"][method])]
    return "\n".join(lines) + "\n"


# ---- how the mask head starts (training) ----

def class_bias_init(head: torch.nn.Conv2d, num_classes: int, area: float) -> None:
    """Set the K-way mask head's bias so that, with the rest of the logits near 0, each class component starts
    at `area` of every pixel and the B = K − C background components share the rest: bias_c = log(area),
    bias_bg = log((1 − C·area)/B) (`model.class_init_area`). A fresh head starts every component at 1/K
    (0.2 each at K = 5, so M_fg ≈ 0.8 and the area prior drives all class components to 0 in the first steps;
    docs/results.md "Multi-class"); this starts them near an object's size instead. No random draw: the
    other weights are exactly as initialised."""
    K = head.out_channels
    background = K - num_classes
    if background < 1 or not 0.0 < area * num_classes < 1.0:
        raise ValueError(f"model.class_init_area = {area}: with C = {num_classes} classes and K = {K} components "
                         f"it must be in (0, 1/C) = (0, {1 / num_classes:.3f}) and K ≥ C + 1")
    bias = [math.log(area)] * num_classes + [math.log((1.0 - num_classes * area) / background)] * background
    with torch.no_grad():
        head.bias.copy_(torch.tensor(bias, dtype=head.bias.dtype))


def binary_head_rows(num_classes: int, K: int, source_K: int) -> list[int]:
    """For each of the K rows of a C-class mask head, the row of a binary model's head (C = 1: row 0 the
    foreground, rows 1.. background) it starts from: every class row from the foreground row, background row
    j from the binary model's background rows in turn (`model.init_from_head: binary`)."""
    if source_K < 2:
        raise ValueError(f"a binary mask head has at least 2 rows (foreground, background), got {source_K}")
    return [0] * num_classes + [1 + j % (source_K - 1) for j in range(K - num_classes)]
