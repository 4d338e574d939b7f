"""Writes one split as WebDataset shards `{split}-{index:05d}.tar` with deterministic bytes.

Shards go to a local folder or an S3 prefix. Each shard appears whole or not at all (local: a temporary
name renamed when complete; S3: a PUT or a multipart upload completed at close); the manifest, written
after all shards, is what makes a data set visible.
"""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
from PIL import Image

from .errors import DataError
from .manifest import (MANIFEST_NAME, SplitInfo, join_url, open_url, read_manifest, relative_name, url_dirname,
                       url_exists, write_manifest)

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
        if "://" not in out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split, self.maxcount = out_dir, split, maxcount
        self.shards: list[str] = []  # completed shard names, relative to out_dir
        self.shard_samples: list[int] = []
        self.samples = 0
        self.has_masks = False
        self._tar = None  # a webdataset.TarWriter
        self._file = None  # the atomic file or S3 object under the current tar
        self._count = 0

    def _open_next(self) -> None:
        import webdataset as wds  # pulls in torch: only when a shard is written, not for `data upload`

        self._close_current()
        self._name = f"{self.split}-{len(self.shards):05d}.tar"
        self._file = open_url(join_url(self.out_dir, self._name), "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=FIXED_MTIME)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # ends the tar stream; the file object is ours to commit
        self._tar = None
        self._file.close()
        self.shards.append(self._name)
        self.shard_samples.append(self._count)

    def write(self, sample: dict) -> None:
        if self._tar is None or self._count >= self.maxcount:
            self._open_next()
        self._tar.write(sample)
        self._count += 1
        self.samples += 1
        self.has_masks = self.has_masks or "mask.png" in sample

    def close(self) -> SplitInfo:
        self._close_current()
        return SplitInfo(shards=list(self.shards), samples=self.samples, has_masks=self.has_masks,
                         shard_samples=list(self.shard_samples))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close_current()
        elif self._tar is not None:  # failed: never leave a half-written shard under a final name
            self._tar = None
            self._file.abort()


COPY_CHUNK = 8 * 2**20


def copy_dataset(src: str, dst_dir: str, *, overwrite: bool = False, progress=None) -> str:
    """Copy a data set (its manifest URL or folder) to a folder or s3:// prefix: every shard first, the
    manifest last, so readers of `dst_dir` never see a half-copied set. Returns the new manifest URL.

    Refuses to replace an existing manifest at the destination unless `overwrite`."""
    manifest = read_manifest(src)
    target = join_url(dst_dir, MANIFEST_NAME)
    if not overwrite and url_exists(target):
        raise DataError(f"{target} already exists (pass overwrite=True / --overwrite to replace that data set)")
    splits = {}
    for name, info in manifest.splits.items():
        names = []
        for shard in info.shards:
            shard_name = relative_name(shard, url_dirname(manifest.url))
            if "://" in shard_name or os.path.isabs(shard_name) or shard_name.startswith(".."):
                shard_name = shard_name.rstrip("/").rsplit("/", 1)[-1]  # a shard kept elsewhere lands beside the manifest
            with open_url(shard, "rb") as reader, open_url(join_url(dst_dir, shard_name), "wb") as writer:
                shutil.copyfileobj(reader, writer, COPY_CHUNK)
            names.append(shard_name)
            if progress is not None:
                progress(shard, join_url(dst_dir, shard_name))
        splits[name] = SplitInfo(names, info.samples, info.has_masks, info.shard_samples)
    return write_manifest(dst_dir, manifest.classes, splits)
