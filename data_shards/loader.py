"""Streaming reader for our shards (open_clip style WebDataset pipeline) that yields ready batches.

Train mode: deterministic shard shuffle by (seed, epoch) -> split by node -> split by worker -> tar
reading that drops `mask.png` members unread -> sample shuffle on raw bytes -> decode -> flip -> full
batches, a fixed number per worker. Eval mode: every sample once, in shard order, last batch partial.
Corrupt samples are skipped and counted per reason in `dataset.skipped`, never raised.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
import zlib

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from .manifest import DataError, read_manifest

log = logging.getLogger(__name__)

SKIP_REASONS = ("tar", "missing", "image", "json", "mask")


class SampleError(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Per-reason counts of skipped samples, shared with DataLoader worker processes."""

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))

    def add(self, reason: str, detail: str) -> None:
        index = SKIP_REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += 1
            count = self._counts[index]
        if count <= 3 or count & (count - 1) == 0:  # log sparsely: 1, 2, 3, 4, 8, 16, ...
            log.warning("skipped sample (%s, %d so far): %s", reason, count, detail)

    def counts(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, self._counts[:]))

    def __getitem__(self, reason: str) -> int:
        return self.counts()[reason]

    @property
    def total(self) -> int:
        return sum(self._counts[:])

    def tar_handler(self, exn: Exception) -> bool:
        self.add("tar", repr(exn))
        return True

    def sample_handler(self, exn: Exception) -> bool:
        if not isinstance(exn, SampleError):
            raise exn  # a bug, not bad data: let it surface
        self.add(exn.reason, str(exn))
        return True


def _not_mask(fname: str) -> bool:
    return not fname.endswith(".mask.png")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def decode_sample(sample: dict, *, image_size: int, num_classes: int, with_mask: bool, flip: bool) -> dict:
    """Raw shard sample -> {"image": uint8 S x S x 3, "labels", "mask"?, "key", "meta"}."""
    key = sample.get("__key__", "?")
    where = f"{key} in {sample.get('__url__', '?')}"
    needed = ("jpg", "json", "mask.png") if with_mask else ("jpg", "json")
    missing = [field for field in needed if field not in sample]
    if missing:
        raise SampleError("missing", f"sample {where} has no {', '.join(missing)}")
    try:
        meta = json.loads(sample["json"])
        labels = np.zeros(num_classes, np.float32)
        for c in meta["labels"]:
            if not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"label {c!r} is not a class index below {num_classes}")
            labels[c] = 1.0
    except (ValueError, KeyError, TypeError) as exn:
        raise SampleError("json", f"sample {where}: bad json ({exn})") from None
    try:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        image = np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise SampleError("image", f"sample {where}: undecodable jpg ({exn})") from None
    out = {"image": image, "labels": labels, "key": key, "meta": meta}
    if with_mask:
        try:
            mask = Image.open(io.BytesIO(sample["mask.png"]))
            if mask.mode not in ("L", "P"):
                raise ValueError(f"mask mode {mask.mode}, expected 8-bit L or P")
            out["mask"] = np.asarray(mask.resize((image_size, image_size), Image.Resampling.NEAREST))
        except (OSError, ValueError) as exn:
            raise SampleError("mask", f"sample {where}: undecodable mask.png ({exn})") from None
    if flip:
        out["image"] = out["image"][:, ::-1]
        if "mask" in out:
            out["mask"] = out["mask"][:, ::-1]
    return out


def collate(samples: list[dict]) -> dict:
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    batch = {
        "image": images.permute(0, 3, 1, 2).float().div_(255.0),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "mask" in samples[0]:
        batch["mask"] = torch.from_numpy(np.stack([s["mask"] for s in samples]).astype(np.int64))
    return batch


class ShardDataset(wds.DataPipeline):
    """One split as an IterableDataset of batches; use `set_epoch` between epochs in train mode."""

    def __init__(self, manifest_url: str, split: str, *, image_size: int, batch_size: int, train: bool,
                 seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, hflip: bool | None = None,
                 num_workers: int = 0):
        self.image_size = _positive_int("image_size", image_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.manifest = read_manifest(manifest_url)
        self.split = split
        self.info = self.manifest.split(split)
        self.train, self.seed, self.epoch = train, seed, epoch
        self.hflip = train if hflip is None else hflip
        self.with_mask = (not train) and self.info.has_masks
        self.shuffle_buffer = shuffle_buffer
        self.skipped = SkipCounter()
        self._pass = 0
        stages = [
            self._shard_urls,
            wds.split_by_node,
            wds.split_by_worker,
            # Train mode never reads mask members: no mask reaches, or is decoded for, a training batch.
            wds.tarfile_to_samples(handler=self.skipped.tar_handler, select_files=_not_mask if train else None),
        ]
        if train and shuffle_buffer > 1:
            stages.append(self._shuffle_samples)
        stages += [
            wds.map(self._decode, handler=self.skipped.sample_handler),
            wds.batched(self.batch_size, collation_fn=collate, partial=not train),
        ]
        super().__init__(*stages)

        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        workers = max(1, num_workers)
        if len(self.info.shards) < world_size * workers:
            log.warning("split %r has %d shards for %d rank(s) x %d worker(s): some read nothing "
                        "(write smaller shards)", split, len(self.info.shards), world_size, workers)
        if train:
            # Equal batch count on every rank and worker: cycle over the shards and cut each worker's
            # stream at a fixed number of batches from the manifest.
            per_worker = max(1, self.info.samples // (self.batch_size * world_size) // workers)
            self.num_batches = per_worker * workers
            self.with_epoch(per_worker)
        else:
            self.num_batches = -(-self.info.samples // self.batch_size)  # all ranks together
        self.with_length(self.num_batches, silent=True)

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self._pass = 0
        return super().__iter__()

    def _stream_seed(self, what: str) -> str:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return f"{what}:{self.seed}:{self.epoch}:{self._pass}:{rank}:{worker}"

    def _shard_urls(self):
        urls = list(self.info.shards)
        if self.train:
            random.Random(f"shards:{self.seed}:{self.epoch}:{self._pass}").shuffle(urls)
            self._pass += 1
        return iter([{"url": url} for url in urls])

    def _shuffle_samples(self, samples):
        rng = random.Random(self._stream_seed("samples"))
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)

    def _decode(self, sample: dict) -> dict:
        flip = self.hflip and zlib.crc32(f"{self.seed}:{self.epoch}:{sample.get('__key__')}".encode()) & 1
        return decode_sample(sample, image_size=self.image_size, num_classes=len(self.manifest.classes),
                             with_mask=self.with_mask, flip=bool(flip))


def raw_samples(shard_url: str) -> list[dict]:
    """Every sample of one shard as raw bytes, in order (for inspection and tests; errors raise)."""
    return list(wds.DataPipeline(wds.SimpleShardList([shard_url]), wds.tarfile_to_samples()))


def make_dataset(manifest_url: str, split: str, *, image_size: int, batch_size: int, train: bool,
                 seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, hflip: bool | None = None,
                 num_workers: int = 0) -> ShardDataset:
    """Batches of one split: dicts with image (B x 3 x S x S float in [0,1]), labels (B x C multi-hot),
    key, meta, and mask (B x S x S int64) only in eval mode on splits with masks.

    `num_workers` must match the DataLoader's, so the train epoch length comes out right."""
    return ShardDataset(manifest_url, split, image_size=image_size, batch_size=batch_size, train=train,
                        seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, hflip=hflip,
                        num_workers=num_workers)


def make_loader(manifest_url: str, split: str, *, image_size: int, batch_size: int, train: bool,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, hflip: bool | None = None,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over `make_dataset` (batching happens in the dataset); `loader.dataset.skipped`
    holds the skip counts and `loader.dataset.set_epoch(e)` reshuffles."""
    dataset = make_dataset(manifest_url, split, image_size=image_size, batch_size=batch_size, train=train,
                           seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, hflip=hflip,
                           num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False)
