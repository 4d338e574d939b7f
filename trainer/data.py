"""The trainer's view of the data: the manifest's classes, an endless stream of training batches over epochs
(resumable at any data position), and one ordered pass over an evaluation split."""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from data_shards.loader import LoaderOptions, ShardDataset, make_loader
from data_shards.manifest import read_manifest

from .config import Config

log = logging.getLogger(__name__)


def dataset_classes(cfg: Config) -> list[str]:
    return list(read_manifest(cfg.data.url).classes)


def loader_options(cfg: Config, *, train: bool, batch_size: int, seed: int = 0, epoch: int = 0) -> LoaderOptions:
    """The loader settings of `cfg.data` for one split: training (shuffled, flipped, cropped) or evaluation.
    Training batches travel as uint8 (a quarter of float32's bytes through worker queues and to the GPU); the
    training steps make them float on the engine's device (`accel.prepare_images`, the same values)."""
    data = cfg.data
    common = dict(image_size=data.image_size, batch_size=batch_size, num_workers=data.num_workers,
                  resize=data.resize, scale_range=(data.scale_min, data.scale_max), draft=data.jpeg_draft)
    if not train:
        return LoaderOptions(train=False, pad_multiple=data.eval_pad_multiple, **common)
    return LoaderOptions(train=True, seed=seed, epoch=epoch, shuffle_buffer=data.shuffle_buffer, hflip=data.hflip,
                         uint8=True, **common)


def train_dataset(cfg: Config, seed: int, batch_size: int, epoch: int = 0) -> ShardDataset:
    return ShardDataset(cfg.data.url, "train", loader_options(cfg, train=True, batch_size=batch_size, seed=seed,
                                                               epoch=epoch))


def train_batches(cfg: Config, seed: int, batch_size: int | None = None, start_epoch: int = 0) -> Iterator[dict]:
    """Training batches forever, epoch after epoch; each epoch reshuffles shards and samples by (seed, epoch).
    batch["image"] is uint8 (`data_shards.loader.as_float` or `accel.prepare_images` make it float).
    One DataLoader (its workers persist) serves every epoch; the dataset's set_epoch moves it on."""
    batch_size = batch_size or cfg.data.batch_size
    loader = make_loader(cfg.data.url, "train", loader_options(cfg, train=True, batch_size=batch_size, seed=seed,
                                                               epoch=start_epoch), persistent=True)
    epoch = start_epoch
    while True:
        loader.dataset.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(f"split 'train' of {cfg.data.url} yields no batch of {batch_size}"
                             " images (fewer samples than one batch?)")
        epoch += 1


def eval_batches(cfg: Config, split: str) -> Iterator[dict]:
    """Every sample of `split` once, in shard order. With data.resize=crop the images keep their own size:
    batches are padded (mask 255) and batch["size"] holds each image's height and width."""
    return iter(make_loader(cfg.data.url, split, loader_options(cfg, train=False,
                                                                batch_size=cfg.data.eval_batch_size)))


def eval_splits(cfg: Config) -> list[str]:
    """`eval.splits` less those of `eval.optional_splits` that the data set does not have (built before they
    existed), each named in a warning with how to add it; any other missing split stays an error later."""
    present = read_manifest(cfg.data.url).splits
    missing = [s for s in cfg.eval.splits if s not in present and s in cfg.eval.optional_splits]
    for split in missing:
        hint = "; `wsssrec data toy-birds --out FOLDER --only test_paired` adds it" if split == "test_paired" else ""
        log.warning("split %r of eval.splits is not in %s (a data set built before it existed): skipped%s",
                    split, cfg.data.url, hint)
    return [s for s in cfg.eval.splits if s not in missing]


def split_has_masks(cfg: Config, split: str) -> bool:
    return read_manifest(cfg.data.url).split(split).has_masks


def epoch_batches(cfg: Config, batch_size: int) -> int:
    """Training micro-batches per epoch on this rank (the dataset's own count, equal on every rank)."""
    return len(train_dataset(cfg, seed=0, batch_size=batch_size))


def resumable_batches(cfg: Config, seed: int, batch_size: int, samples_seen: int = 0) -> Iterator[dict]:
    """The training stream of this rank, positioned after `samples_seen` images (all ranks together): it starts
    at the right epoch and skips the batches already used in it, so a resumed run sees the same data as an
    uninterrupted one (with the same world size; with another one, the same number of images per epoch)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    consumed = samples_seen // (batch_size * world)
    epoch, skip = divmod(consumed, epoch_batches(cfg, batch_size))
    stream = train_batches(cfg, seed=seed, batch_size=batch_size, start_epoch=epoch)
    for _ in range(skip):
        next(stream)
    return stream
