"""Geometry for real photos: the random-scale random crop of WSSS training, and the padding that lets
evaluation images of their own sizes share a batch. Both mark what is not image: `valid` False in a
training crop, mask 255 (ignore) in an evaluation batch."""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

IGNORE = 255


def _span(length: int, crop: int, rng: random.Random) -> tuple[int, int, int]:
    """(source start, target start, extent) along one axis: a random window of `crop` inside a longer
    image, or the whole shorter image at a random place inside the crop."""
    if length >= crop:
        return rng.randint(0, length - crop), 0, crop
    return 0, rng.randint(0, crop - length), length


def random_scale_crop(image: np.ndarray, crop: int, scale_range: tuple[float, float],
                      rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """H x W x 3 uint8 -> (crop x crop x 3 uint8, crop x crop bool valid).

    The image is rescaled by a factor drawn uniformly from `scale_range` (bilinear), then a crop x crop
    window is cut at a random place; where the scaled image is smaller than the window it sits at a random
    offset inside it and the rest is 0 with valid False (IRN's `imutils.random_scale` + `random_crop`, as
    ReCAM and most WSSS code bases train on VOC and COCO)."""
    height, width = image.shape[:2]
    scale = rng.uniform(*scale_range)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    scaled = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BILINEAR))
    src_y, dst_y, extent_y = _span(scaled.shape[0], crop, rng)
    src_x, dst_x, extent_x = _span(scaled.shape[1], crop, rng)
    out = np.zeros((crop, crop, 3), np.uint8)
    valid = np.zeros((crop, crop), bool)
    out[dst_y:dst_y + extent_y, dst_x:dst_x + extent_x] = scaled[src_y:src_y + extent_y, src_x:src_x + extent_x]
    valid[dst_y:dst_y + extent_y, dst_x:dst_x + extent_x] = True
    return out, valid


def pad_batch(samples: list[dict], multiple: int = 1) -> list[dict]:
    """Samples of different sizes, each padded at the bottom and right to the largest height and width
    (rounded up to a multiple of `multiple`): image with 0, mask with 255 (ignore). Their own size stays in
    sample["size"]."""
    height = -(-max(s["image"].shape[0] for s in samples) // multiple) * multiple
    width = -(-max(s["image"].shape[1] for s in samples) // multiple) * multiple
    padded = []
    for sample in samples:
        h, w = sample["image"].shape[:2]
        out = {**sample, "size": sample.get("size", (h, w))}
        out["image"] = np.pad(sample["image"], ((0, height - h), (0, width - w), (0, 0)))
        if "mask" in sample:
            out["mask"] = np.pad(sample["mask"], ((0, height - h), (0, width - w)), constant_values=IGNORE)
        padded.append(out)
    return padded
