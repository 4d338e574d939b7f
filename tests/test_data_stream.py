"""The trainer's training stream (one persistent DataLoader, epochs moved on by set_epoch) yields exactly the
batches of the old way (a fresh DataLoader per epoch), also after a resume in the middle of an epoch."""
import itertools

import pytest
import torch

from data_shards.loader import LoaderOptions, as_float, make_loader
from trainer.config import load_config
from trainer.data import epoch_batches, resumable_batches, train_batches

BATCH = 16
SEED = 7


def _config(url: str, workers: int):
    return load_config(None, [f"data.url={url}", "data.image_size=32", f"data.batch_size={BATCH}",
                              f"data.num_workers={workers}", "data.shuffle_buffer=40"])


def _fresh_loader_per_epoch(cfg, epochs: int) -> list[dict]:
    """The stream as trainer/data.py made it before: a new DataLoader for every epoch."""
    batches = []
    for epoch in range(epochs):
        options = LoaderOptions(image_size=cfg.data.image_size, batch_size=BATCH, train=True, seed=SEED,
                                epoch=epoch, shuffle_buffer=cfg.data.shuffle_buffer, hflip=cfg.data.hflip,
                                num_workers=cfg.data.num_workers)
        batches.extend(make_loader(cfg.data.url, "train", options))
    return batches


def _same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["key"] == b["key"]
        assert a["image"].dtype == torch.uint8  # the trainer's stream: uint8, made float by the training step
        assert torch.equal(as_float(a["image"]), as_float(b["image"])) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["padded"], b["padded"]) and "mask" not in a


@pytest.mark.parametrize("workers", [0, 1])
def test_persistent_stream_equals_a_fresh_loader_per_epoch(toy_dataset, workers):
    cfg = _config(toy_dataset, workers)
    per_epoch = epoch_batches(cfg, BATCH)
    assert per_epoch == 96 // BATCH
    epochs = 3
    expected = _fresh_loader_per_epoch(cfg, epochs)
    got = list(itertools.islice(train_batches(cfg, seed=SEED, batch_size=BATCH), per_epoch * epochs))
    _same(got, expected)
    keys = [[k for b in expected[e * per_epoch:(e + 1) * per_epoch] for k in b["key"]] for e in range(epochs)]
    assert keys[0] != keys[1] != keys[2] and sorted(keys[0]) == sorted(keys[1])  # epochs really reshuffle

    # a resume at any data position continues the same stream: mid-epoch 0, an epoch boundary, mid-epoch 1
    for seen_batches in (2, per_epoch, per_epoch + 3):
        stream = resumable_batches(cfg, seed=SEED, batch_size=BATCH, samples_seen=seen_batches * BATCH)
        rest = list(itertools.islice(stream, per_epoch * epochs - seen_batches))
        _same(rest, expected[seen_batches:])
