"""Streaming reader for our shards (open_clip style WebDataset pipeline) that yields ready batches.

Train mode: deterministic shard shuffle by (seed, epoch) -> split by node -> split by worker -> tar
reading (local or s3://) that drops `mask.png` members unread -> sample shuffle on raw bytes -> decode ->
flip -> full batches, the same number on every worker of every rank. Two ways to get there: `exact`
(each sample once per epoch, then padded with flagged repeats or cut to the common count) and `resampled`
(shards drawn with replacement). Eval mode: every sample once, in shard order, last batch partial.
Corrupt samples are skipped and counted per reason in `dataset.skipped`, never raised; a missing shard,
bucket or bad credentials raise a DataError naming the URL.
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from . import s3
from .augment import pad_batch, random_scale_crop
from .errors import DataError
from .manifest import read_manifest
from .tarstream import tar_samples

log = logging.getLogger(__name__)
s3.register_with_webdataset()  # at import, so DataLoader workers (forked or spawned) have it too

SKIP_REASONS = ("tar", "missing", "image", "json", "mask")
SAMPLING_MODES = ("exact", "resampled")
BALANCE_MODES = ("pad", "drop")
RESIZE_MODES = ("square", "crop")
TAR_READERS = ("lean", "webdataset")


@dataclass(frozen=True)
class LoaderOptions:
    """How one split is read. Train mode: `sampling="exact"` reads each sample once per epoch, then
    `balance="pad"` tops every reader up to the longest one with flagged repeats or `"drop"` cuts every
    reader to the shortest; `"resampled"` draws shards with replacement, `samples // (batch_size x ranks x
    workers)` batches per worker. `num_workers` must match the DataLoader's, so the train epoch length comes
    out right. `shard_by_rank` (default: in train mode only) gives each rank its own shards; off, every rank
    reads the whole split (evaluation on rank 0). `epoch` is the first epoch; `set_epoch` moves on.

    `resize="square"` (the toy sets) resizes every image to image_size x image_size. `resize="crop"` (real
    photos): training takes a random scale in `scale_range` and a random image_size x image_size crop,
    padded where the scaled image is smaller (batch["valid"] is False there, the ignore region); evaluation
    keeps every image at its own size (see `collate`), batches padded up to a multiple of `pad_multiple`
    (an encoder that downsamples 32 times needs 32).

    Speed (docs/benchmarks.md): `uint8` batches are a quarter of float32's bytes through the worker queue and
    skip the conversion in the loader (the trainer converts, bit for bit the same values); `draft` lets
    libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (never below the target) before the bilinear resize,
    which is not bit-identical to a full decode (tests/test_data_loader.py bounds the difference), so it is
    off by default; `tar_reader="lean"` parses the tar headers directly (data_shards/tarstream.py)."""
    image_size: int
    batch_size: int
    train: bool
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    hflip: bool | None = None  # default: in train mode only
    num_workers: int = 0
    sampling: str = "exact"
    balance: str = "pad"
    shard_by_rank: bool | None = None
    resize: str = "square"
    scale_range: tuple[float, float] = (0.5, 2.0)
    pad_multiple: int = 1  # resize="crop", eval: pad each batch's height and width up to a multiple of this
    uint8: bool = False  # batch["image"] stays uint8 (B x 3 x H x W); the consumer makes it float (`as_float`)
    draft: bool = False  # resize="square": JPEG DCT-domain downscaling when the source is >= 2x the target
    tar_reader: str = "lean"  # data_shards/tarstream.py; "webdataset": webdataset's tarfile-based reader

    def __post_init__(self):
        _positive_int("image_size", self.image_size)
        _positive_int("batch_size", self.batch_size)
        _positive_int("pad_multiple", self.pad_multiple)
        for name, value, allowed in (("sampling", self.sampling, SAMPLING_MODES),
                                     ("balance", self.balance, BALANCE_MODES),
                                     ("resize", self.resize, RESIZE_MODES),
                                     ("tar_reader", self.tar_reader, TAR_READERS)):
            if value not in allowed:
                raise DataError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.sampling == "resampled" and not self.train:
            raise DataError("sampling='resampled' is for training; evaluation reads every sample once (exact)")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise DataError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range!r}")


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
        if isinstance(exn, DataError):  # missing object or bucket, credentials, endpoint gone: not bad data
            raise DataError(exn.message) from None
        if isinstance(exn, FileNotFoundError):
            raise DataError(f"shard {exn.filename} does not exist (it is listed in the manifest)") from None
        self.add("tar", repr(exn))
        return True


def _not_mask(fname: str) -> bool:
    return not fname.endswith(".mask.png")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def decode_sample(sample: dict, *, image_size: int | None, num_classes: int, with_mask: bool, flip: bool,
                  draft: bool = False) -> dict:
    """Raw shard sample -> {"image": uint8 S x S x 3, "labels", "mask"?, "key", "meta"}; image_size None
    keeps the image (and mask) at its own size, H x W. `draft`: see LoaderOptions."""
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
        image = Image.open(io.BytesIO(sample["jpg"]))
        if draft and image_size is not None:
            image.draft("RGB", (image_size, image_size))  # JPEG only; the result stays >= the target
        image = image.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):  # PIL copies on an equal size
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        if flip:  # in PIL: the array below is then contiguous (a reversed numpy view made collate copy slowly)
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise SampleError("image", f"sample {where}: undecodable jpg ({exn})") from None
    out = {"image": image, "labels": labels, "key": key, "meta": meta}
    if with_mask:
        try:
            mask = Image.open(io.BytesIO(sample["mask.png"]))
            if mask.mode not in ("L", "P"):
                raise ValueError(f"mask mode {mask.mode}, expected 8-bit L or P")
            if image_size is not None:
                mask = mask.resize((image_size, image_size), Image.Resampling.NEAREST)
            elif mask.size != (image.shape[1], image.shape[0]):
                raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, its image {image.shape[1]}x{image.shape[0]}")
            if flip:
                mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out["mask"] = np.asarray(mask)
        except (OSError, ValueError) as exn:
            raise SampleError("mask", f"sample {where}: undecodable mask.png ({exn})") from None
    return out


def collate(samples: list[dict], pad_multiple: int = 1, uint8: bool = False) -> dict:
    """Samples -> one batch. Images of different sizes (real photos in evaluation) are padded at the bottom
    and right to the largest (image 0, mask 255 = ignore), and batch["size"] (B x 2, height and width)
    records each one's own size so predictions can be cut back to it; `pad_multiple` > 1 pads further, up to
    a multiple of it. `uint8`: the images stay uint8 (`as_float` makes the float batch, the same values and
    memory layout)."""
    sizes = [s["image"].shape[:2] for s in samples]
    if len(set(sizes)) > 1 or pad_multiple > 1:
        samples = pad_batch(samples, pad_multiple)
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    batch = {
        "image": images.permute(0, 3, 1, 2) if uint8 else as_float(images.permute(0, 3, 1, 2)),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "padded": torch.tensor([s.get("padded", False) for s in samples], dtype=torch.bool),
    }
    if "mask" in samples[0]:
        batch["mask"] = torch.from_numpy(np.stack([s["mask"] for s in samples]).astype(np.int64))
    if "valid" in samples[0]:
        batch["valid"] = torch.from_numpy(np.stack([s["valid"] for s in samples]))
    if "size" in samples[0]:
        batch["size"] = torch.tensor([s["size"] for s in samples], dtype=torch.int64)
    return batch


def as_float(images: torch.Tensor) -> torch.Tensor:
    """A uint8 image batch -> float in [0, 1] (a float batch is returned as it is). The strides of the uint8
    batch are kept (a channels-last view of the collated H x W x 3 arrays), as the loader's float batches had."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def reader_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one reader gets: `split_by_node` (every world_size-th from rank), then `split_by_worker`."""
    return urls[rank::world_size][worker::num_workers]


class ShardDataset(torch.utils.data.IterableDataset):
    """One split as an IterableDataset of batches: dicts with image (B x 3 x S x S float in [0,1]), labels
    (B x C multi-hot), key, meta, padded (B bool: a repeat that fills up the epoch in exact/pad mode), mask
    (B x S x S int64) only in eval mode on splits with masks, and with resize="crop" valid (train: B x S x S
    bool) or size (eval: B x 2). Call `set_epoch` between epochs in train mode; it reaches DataLoader
    workers that persist across epochs too.

    `len(dataset)` (== `num_batches`) is the batch count of this rank for the epoch: the same on every rank
    in train mode, so DDP never waits on a rank that ran dry."""

    def __init__(self, manifest_url: str, split: str, options: LoaderOptions):
        super().__init__()
        self.options = options
        train, sampling = options.train, options.sampling
        self.image_size, self.batch_size = options.image_size, options.batch_size
        self.manifest = read_manifest(manifest_url)
        self.split = split
        self.info = self.manifest.split(split)
        self.train, self.seed = train, options.seed
        self.sampling, self.balance = sampling, options.balance
        self.hflip = train if options.hflip is None else options.hflip
        self.with_mask = (not train) and self.info.has_masks
        self.shuffle_buffer = options.shuffle_buffer
        self.num_workers = max(1, options.num_workers)  # readers per rank (the main process counts as one)
        self.skipped = SkipCounter()
        self.shard_by_rank = train if options.shard_by_rank is None else options.shard_by_rank
        self.rank, self.world_size, _, _ = wds.utils.pytorch_worker_info()
        if not self.shard_by_rank:  # every rank reads the whole split (e.g. rank 0 evaluates alone)
            self.rank, self.world_size = 0, 1
        readers = self.world_size * self.num_workers
        if len(self.info.shards) < readers:
            if train and sampling == "exact":
                raise DataError(
                    f"split {split!r} of {self.manifest.url} has {len(self.info.shards)} shard(s) for "
                    f"{self.world_size} rank(s) x {self.num_workers} worker(s) = {readers} readers; exact "
                    f"sampling needs at least one shard per reader (write smaller shards with --maxcount, "
                    f"use fewer workers, or sampling='resampled')")
            log.warning("split %r has %d shards for %d rank(s) x %d worker(s): some read nothing "
                        "(write smaller shards)", split, len(self.info.shards), self.world_size, self.num_workers)
        if train and sampling == "exact" and self.info.shard_samples is None:
            log.warning("manifest %s has no per-shard sample counts; assuming equal shards for the epoch "
                        "length (rewrite it with this version for exact counts)", self.manifest.url)
        # Shared memory, so that set_epoch in the main process reaches persistent DataLoader workers.
        self._epoch = multiprocessing.Value("q", options.epoch, lock=False)
        if train:
            self.batches_per_worker = self._batches_per_worker()
            self.num_batches = self.batches_per_worker * self.num_workers
        else:
            self.batches_per_worker = None
            self.num_batches = -(-self.info.samples // self.batch_size)  # all ranks together

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`: same (seed, epoch) -> same order. The batch count does not depend on it.
        Call it before iterating a DataLoader over this dataset again (workers read it when they start the
        epoch)."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _shard_order(self, what: str, epoch: int, pass_: int = 0) -> list[str]:
        urls = list(self.info.shards)
        if self.train:
            random.Random(f"{what}:{self.seed}:{epoch}:{pass_}").shuffle(urls)
        return urls

    def _shard_sizes(self) -> list[int]:
        counts = self.info.shard_samples
        if counts is None:  # old manifest: spread the total evenly (pad rounds up, drop rounds down)
            share = self.info.samples / max(1, len(self.info.shards))
            counts = [math.ceil(share) if self.balance == "pad" else math.floor(share)] * len(self.info.shards)
        return list(counts)

    def _batches_per_worker(self) -> int:
        """The common batch count of every reader. Exact mode bounds it over every possible shard shuffle
        (pad: the most a reader can get, the largest ceil(shards / readers) shards; drop: the least, the
        smallest floor(shards / readers)), so it is the same in every epoch."""
        readers = self.world_size * self.num_workers
        if self.sampling == "resampled":
            return max(1, self.info.samples // (self.batch_size * readers))
        sizes = sorted(self._shard_sizes())
        if self.balance == "pad":
            most = sum(sizes[len(sizes) - -(-len(sizes) // readers):])
            return -(-most // self.batch_size)
        least = sum(sizes[:len(sizes) // readers])
        if least < self.batch_size:
            raise DataError(
                f"split {self.split!r} of {self.manifest.url}: with balance='drop' a reader may get only "
                f"{least} samples, fewer than one batch of {self.batch_size}, so every rank would get 0 "
                f"batches (use balance='pad', a smaller batch or fewer workers)")
        return least // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_info()
        if self.train and workers != self.num_workers:
            raise DataError(f"this dataset was made for {self.num_workers} reader(s) per rank but runs in "
                            f"{workers}: pass the DataLoader's num_workers in LoaderOptions")
        samples = self._samples(worker, workers, self.epoch)  # the epoch is read once, as the pass starts
        own_size = not self.train and self.options.resize == "crop"  # the square sizes are all equal already
        pad_multiple = self.options.pad_multiple if own_size else 1
        collation = functools.partial(collate, pad_multiple=pad_multiple, uint8=self.options.uint8)
        batches = wds.batched(self.batch_size, collation_fn=collation, partial=not self.train)(samples)
        return itertools.islice(batches, self.batches_per_worker) if self.train else batches

    def _samples(self, worker: int, workers: int, epoch: int) -> Iterator[dict]:
        """Decoded samples of this reader. Train, exact: pass 0 is this reader's share of the epoch; later
        passes (over the whole split, flagged `padded`) fill up to the common batch count."""
        for pass_ in itertools.count():
            if self.sampling == "resampled":
                urls: Iterable[str] = self._resampled_urls(worker, epoch)
            elif pass_ == 0:
                urls = reader_shards(self._shard_order("shards", epoch), self.rank, self.world_size, worker, workers)
            else:
                urls = self._shard_order(f"pad:{self.rank}:{worker}", epoch, pass_)
            usable = 0
            for raw in self._raw_samples(urls, f"{pass_}:{self.rank}:{worker}", epoch):
                try:
                    sample = self._decode(raw, epoch)
                except SampleError as exn:
                    self.skipped.add(exn.reason, str(exn))
                    continue
                sample["padded"] = pass_ > 0
                usable += 1
                yield sample
            if not self.train or self.sampling == "resampled":
                return
            if pass_ > 0 and usable == 0:
                raise DataError(f"split {self.split!r} of {self.manifest.url} has no usable sample left to pad "
                                f"rank {self.rank} worker {worker} to {self.batches_per_worker} batches "
                                f"(skipped so far: {self.skipped.counts()})")

    def _resampled_urls(self, worker: int, epoch: int) -> Iterator[str]:
        rng = random.Random(f"resample:{self.seed}:{epoch}:{self.rank}:{worker}")
        while True:
            yield rng.choice(self.info.shards)

    def _raw_samples(self, urls: Iterable[str], stream: str, epoch: int) -> Iterator[dict]:
        # Train mode never reads mask members: no mask reaches, or is decoded for, a training batch.
        select = _not_mask if self.train else None
        if self.options.tar_reader == "lean":
            samples = tar_samples(({"url": u} for u in urls), self.skipped.tar_handler, select_files=select)
        else:
            samples = wds.tarfile_to_samples(handler=self.skipped.tar_handler, select_files=select)(
                {"url": u} for u in urls)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{stream}")
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        return samples

    def _decode(self, sample: dict, epoch: int) -> dict:
        key = sample.get("__key__")
        flip = self.hflip and zlib.crc32(f"{self.seed}:{epoch}:{key}".encode()) & 1
        square = self.options.resize == "square"
        out = decode_sample(sample, image_size=self.image_size if square else None,
                            num_classes=len(self.manifest.classes), with_mask=self.with_mask, flip=bool(flip),
                            draft=self.options.draft)
        if square:
            return out
        if self.train:  # one generator per (seed, epoch, sample): the same crop with any number of workers
            rng = random.Random(f"crop:{self.seed}:{epoch}:{key}")
            out["image"], out["valid"] = random_scale_crop(out["image"], self.image_size, self.options.scale_range,
                                                           rng)
        else:
            out["size"] = out["image"].shape[:2]
        return out


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def raw_samples(shard_url: str) -> list[dict]:
    """Every sample of one shard as raw bytes, in order (for inspection and tests; errors raise)."""
    return list(wds.DataPipeline(wds.SimpleShardList([shard_url]), wds.tarfile_to_samples()))


def make_loader(manifest_url: str, split: str, options: LoaderOptions, *,
                persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardDataset (batching happens in the dataset); `loader.dataset.skipped` holds the
    skip counts and `loader.dataset.set_epoch(e)` reshuffles. `persistent` keeps the worker processes
    between epochs (for a loader iterated once per epoch)."""
    dataset = ShardDataset(manifest_url, split, options)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=options.num_workers,
                                       persistent_workers=persistent and options.num_workers > 0,
                                       collate_fn=_as_is)


def _as_is(batch: dict) -> dict:
    """Batches leave the dataset finished; torch's default_convert would walk every `meta` dict again."""
    return batch
