"""Picture grids users look at: one row per image, columns image | ground truth | prediction | CAM |
mask-lets | image-lets | reconstruction; each image at its own size (evaluate cuts padded batches to it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    out = PALETTE[np.clip(labels, 0, len(PALETTE) - 1) % len(PALETTE)]
    out[labels == 255] = (255, 255, 255)
    return out


def to_rgb(t: torch.Tensor) -> np.ndarray:
    """3×H×W in [0,1] or H×W in [0,1] → H×W×3 uint8."""
    arr = t.detach().float().clamp(0, 1).cpu().numpy()
    if arr.ndim == 2:
        arr = np.repeat(arr[None], 3, axis=0)
    return (arr.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)


def grid_row(image, truth, prediction, cam, masklets, imagelets, recon) -> list[np.ndarray]:
    cells = [to_rgb(image), colorize(truth.cpu().numpy()) if truth is not None else to_rgb(image * 0),
             colorize(prediction.cpu().numpy())]
    cells.append(to_rgb(cam) if cam is not None else to_rgb(image[0] * 0))
    cells += [to_rgb(m) for m in masklets]
    cells += [to_rgb(x) for x in imagelets]
    cells.append(to_rgb(recon))
    return cells


def save_grid(rows: list[list[np.ndarray]], path: Path, K: int, scale: int = 2, title: str = "") -> Path:
    """The rows as one PNG, every cell `scale` times its own size (rows of different sizes, real photos at
    their own size, each keep their aspect; the cell box is the largest of them)."""
    headers = ["image", "truth", "prediction", "CAM"] + [f"M_{k}" for k in range(K)] + \
              [f"X_{k}" for k in range(K)] + ["recon"]
    h = max(row[0].shape[0] for row in rows) * scale
    w = max(row[0].shape[1] for row in rows) * scale
    pad, top = 2, 16 + (14 if title else 0)
    canvas = Image.new("RGB", (len(headers) * (w + pad), top + len(rows) * (h + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill=(255, 255, 255))
    for col, name in enumerate(headers):
        draw.text((col * (w + pad) + 2, top - 14), name, fill=(255, 255, 255))
    for r, row in enumerate(rows):
        for col, cell in enumerate(row):
            tile = Image.fromarray(cell).resize((cell.shape[1] * scale, cell.shape[0] * scale), Image.NEAREST)
            canvas.paste(tile, (col * (w + pad), top + r * (h + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
