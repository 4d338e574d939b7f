"""Writes one split as WebDataset shards `{split}-{index:05d}.tar` with deterministic bytes.

Each shard is written under a temporary name and renamed when complete, so a listed shard is
always whole; the manifest (written after all shards) is what makes a data set visible.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import webdataset as wds
from PIL import Image

from .manifest import SplitInfo

# A fixed tar member mtime (2000-01-01 UTC) so identical samples give identical shard bytes.
FIXED_MTIME = 946684800


def encode_jpeg(rgb: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 mask (0 background, c+1 class c, 255 ignore) as an L-mode PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_sample(key: str, jpg: bytes, meta: dict, mask_png: bytes | None = None) -> dict:
    """One shard sample in our format; `meta` must hold "labels" (class indices)."""
    if "labels" not in meta:
        raise ValueError(f"sample {key}: metadata needs 'labels'")
    sample = {"__key__": key, "jpg": jpg, "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    if mask_png is not None:
        sample["mask.png"] = mask_png
    return sample


class ShardWriter:
    """Like `webdataset.ShardWriter`, but with fixed mtimes, temp names, and no empty shards."""

    def __init__(self, out_dir: str, split: str, maxcount: int = 1000):
        if maxcount < 1:
            raise ValueError(f"maxcount must be a positive number of samples per shard, got {maxcount}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split, self.maxcount = out_dir, split, maxcount
        self.shards: list[str] = []  # completed shard names, relative to out_dir
        self.samples = 0
        self.has_masks = False
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}-{len(self.shards):05d}.tar"
        self._name = name
        self._tar = wds.TarWriter(os.path.join(self.out_dir, name + ".tmp"), encoder=False, mtime=FIXED_MTIME)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        final = os.path.join(self.out_dir, self._name)
        os.replace(final + ".tmp", final)
        self.shards.append(self._name)

    def write(self, sample: dict) -> None:
        if self._tar is None or self._count >= self.maxcount:
            self._open_next()
        self._tar.write(sample)
        self._count += 1
        self.samples += 1
        self.has_masks = self.has_masks or "mask.png" in sample

    def close(self) -> SplitInfo:
        self._close_current()
        return SplitInfo(shards=list(self.shards), samples=self.samples, has_masks=self.has_masks)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close_current()
        elif self._tar is not None:  # failed: never leave a half-written shard under a final name
            self._tar.close()
            self._tar = None
            os.remove(os.path.join(self.out_dir, self._name + ".tmp"))
