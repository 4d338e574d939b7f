"""The trainer's view of the data: the manifest's classes, an endless stream of training batches over epochs
(resumable at any data position), and one ordered pass over an evaluation split."""
from __future__ import annotations

from typing import Iterator

import torch

from data_shards.loader import make_loader
from data_shards.manifest import read_manifest

from .config import Config


def dataset_classes(cfg: Config) -> list[str]:
    return list(read_manifest(cfg.data.url).classes)


def train_batches(cfg: Config, seed: int, batch_size: int | None = None, start_epoch: int = 0) -> Iterator[dict]:
    """Training batches forever, epoch after epoch; each epoch reshuffles shards and samples by (seed, epoch)."""
    epoch = start_epoch
    while True:
        loader = make_loader(cfg.data.url, "train", image_size=cfg.data.image_size,
                             batch_size=batch_size or cfg.data.batch_size, train=True, seed=seed, epoch=epoch,
                             shuffle_buffer=cfg.data.shuffle_buffer, hflip=cfg.data.hflip,
                             num_workers=cfg.data.num_workers)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(f"split 'train' of {cfg.data.url} yields no batch of {batch_size or cfg.data.batch_size}"
                             " images (fewer samples than one batch?)")
        epoch += 1


def eval_batches(cfg: Config, split: str) -> Iterator[dict]:
    return iter(make_loader(cfg.data.url, split, image_size=cfg.data.image_size,
                            batch_size=cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers))


def split_has_masks(cfg: Config, split: str) -> bool:
    return read_manifest(cfg.data.url).split(split).has_masks


def epoch_batches(cfg: Config, batch_size: int) -> int:
    """Training micro-batches per epoch on this rank (the loader's own count, equal on every rank)."""
    return len(make_loader(cfg.data.url, "train", image_size=cfg.data.image_size, batch_size=batch_size,
                           train=True, num_workers=cfg.data.num_workers))


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
