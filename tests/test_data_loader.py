"""Streaming loader: batch contents, epoch lengths, shard splitting, no masks in training, skip counts."""
import io
import os
import tarfile
import zlib

import numpy as np
import pytest
import torch

from data_shards.errors import DataError
from data_shards.loader import LoaderOptions, ShardDataset, make_loader, raw_samples
from data_shards.manifest import SplitInfo, read_manifest, write_manifest
from data_shards.writer import encode_jpeg, encode_mask_png, make_sample

SIZE = 32


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def _good(key: str, labels=(0,), mask: bytes | None = None) -> dict:
    return make_sample(key, encode_jpeg(_image(zlib.crc32(key.encode()))), {"labels": list(labels), "name": key}, mask)


def _write_tar(path, samples: list[dict], truncate_to: int | None = None) -> None:
    """Write samples member by member (any bytes allowed); optionally cut the file short."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)


def _dataset(folder, shards: dict[str, list[dict]], split="train", classes=("bird", "fish"), has_masks=False,
             samples=None) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, content in shards.items():
        _write_tar(os.path.join(folder, name), content)
    total = samples if samples is not None else sum(len(c) for c in shards.values())
    counts = [len(c) for c in shards.values()] if samples is None else None
    return write_manifest(str(folder), list(classes), {split: SplitInfo(list(shards), total, has_masks, counts)})


def _all(loader):
    return list(loader)


def test_eval_batches_every_sample_once_in_order(toy_dataset):
    manifest = read_manifest(toy_dataset)
    expected_keys = [raw["__key__"] for shard in manifest.split("val").shards for raw in raw_samples(shard)]
    loader = make_loader(toy_dataset, "val", LoaderOptions(image_size=48, batch_size=10, train=False))
    batches = _all(loader)
    assert [len(b["key"]) for b in batches] == [10, 10, 10, 2]  # last partial batch kept
    assert len(loader) == 4
    assert [k for b in batches for k in b["key"]] == expected_keys
    batch = batches[0]
    assert batch["image"].shape == (10, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.05
    assert batch["labels"].shape == (10, 1) and batch["labels"].dtype == torch.float32
    assert batch["mask"].shape == (10, 48, 48) and batch["mask"].dtype == torch.int64
    assert set(torch.unique(batch["mask"]).tolist()) <= {0, 1, 255}
    for i, meta in enumerate(batch["meta"]):
        assert batch["labels"][i].tolist() == [1.0 if meta["labels"] else 0.0]
        assert bool((batch["mask"][i] == 1).any()) == bool(meta["labels"])
        assert set(meta) >= {"labels", "background", "background_photo", "bird", "distractors"}
    assert loader.dataset.skipped.total == 0


def test_train_epoch_length_shuffle_and_no_masks(toy_dataset):
    def keys(epoch, seed=0):
        dataset = ShardDataset(toy_dataset, "train", LoaderOptions(image_size=SIZE, batch_size=16, train=True,
                                                                   seed=seed, epoch=epoch, shuffle_buffer=50))
        batches = list(dataset)
        assert len(batches) == dataset.num_batches == 96 // 16
        for b in batches:
            assert "mask" not in b and b["image"].shape == (16, 3, SIZE, SIZE)
        return [k for b in batches for k in b["key"]]

    first = keys(0)
    assert len(set(first)) == 96  # one pass over 96 samples, each once
    assert first == keys(0)  # deterministic in (seed, epoch)
    assert first != keys(1) and first != keys(0, seed=1)
    assert sorted(first) == sorted(keys(1))


def test_train_mode_never_decodes_masks_even_if_present(tmp_path):
    garbage = b"\x00not a png at all\xff" * 10
    samples = [_good(f"s{i:03d}", mask=garbage) for i in range(20)]
    url = _dataset(tmp_path / "ds", {"train-00000.tar": samples})
    dataset = ShardDataset(url, "train", LoaderOptions(image_size=SIZE, batch_size=4, train=True))
    batches = list(dataset)
    assert len(batches) == 5 and all("mask" not in b for b in batches)
    assert dataset.skipped.total == 0
    # the same shard read for evaluation does try the masks, and counts every one as bad
    eval_url = _dataset(tmp_path / "ds_eval", {"val-00000.tar": samples}, split="val", has_masks=True)
    eval_set = ShardDataset(eval_url, "val", LoaderOptions(image_size=SIZE, batch_size=4, train=False))
    assert list(eval_set) == [] and eval_set.skipped.counts()["mask"] == 20


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    good = [_good(f"a{i:03d}", labels=(1,)) for i in range(6)]
    bad_jpeg = {**_good("b000"), "jpg": b"\xff\xd8 definitely not jpeg"}
    bad_json = {**_good("b001"), "json": b"{labels: oops"}
    no_labels = {**_good("b002"), "json": b'{"tags": [0]}'}
    wrong_class = {**_good("b003"), "json": b'{"labels": [7]}'}
    no_jpg = {k: v for k, v in _good("b004").items() if k != "jpg"}
    shard0 = good[:3] + [bad_jpeg, bad_json, no_labels, wrong_class, no_jpg] + good[3:]
    shard1 = [_good(f"c{i:03d}") for i in range(8)]
    folder = tmp_path / "ds"
    url = _dataset(folder, {"val-00000.tar": shard0, "val-00001.tar": shard1}, split="val")
    with tarfile.open(folder / "val-00001.tar") as tar:
        cut = tar.getmember("c001.jpg").offset_data + 100
    _write_tar(folder / "val-00001.tar", shard1, truncate_to=cut)  # cut inside the second sample

    dataset = ShardDataset(url, "val", LoaderOptions(image_size=SIZE, batch_size=4, train=False))
    keys = [k for b in dataset for k in b["key"]]
    counts = dataset.skipped.counts()
    assert [k for k in keys if k.startswith("a")] == [f"a{i:03d}" for i in range(6)]
    assert counts["image"] == 1 and counts["json"] == 3 and counts["missing"] == 1
    assert counts["tar"] >= 1
    assert [k for k in keys if k.startswith("c")] == ["c000"]  # the truncated tail is lost, not fatal
    assert dataset.skipped.total == sum(counts.values())


def test_skip_counts_reach_the_main_process_from_a_worker(tmp_path):
    samples = [_good(f"a{i:03d}") for i in range(8)] + [{**_good("z000"), "jpg": b"garbage"}]
    url = _dataset(tmp_path / "ds", {"val-00000.tar": samples}, split="val")
    loader = make_loader(url, "val", LoaderOptions(image_size=SIZE, batch_size=4, train=False, num_workers=1))
    assert sum(len(b["key"]) for b in loader) == 8
    assert loader.dataset.skipped.counts()["image"] == 1


def test_ranks_get_disjoint_shards_and_equal_batch_counts(tmp_path, monkeypatch):
    # 3 shards of unequal size over 2 ranks: one rank reads 2 shards, the other 1, yet in train mode
    # both get the same batch count (exact mode pads the shorter rank with flagged repeats), so DDP never
    # waits forever; the unflagged samples are every sample exactly once.
    shards = {f"train-{i:05d}.tar": [_good(f"s{i}-{j:03d}") for j in range(n)] for i, n in enumerate((8, 8, 5))}
    url = _dataset(tmp_path / "ds", shards)
    per_rank, counts = {}, []
    everything = sorted(k["__key__"] for c in shards.values() for k in c)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = ShardDataset(url, "train", LoaderOptions(image_size=SIZE, batch_size=2, train=True, shuffle_buffer=4))
        batches = list(dataset)
        assert len(batches) == dataset.num_batches == len(dataset)
        counts.append(len(batches))
        per_rank[f"train{rank}"] = [k for b in batches for k, pad in zip(b["key"], b["padded"]) if not pad]
        eval_set = ShardDataset(url, "train", LoaderOptions(image_size=SIZE, batch_size=2, train=False,
                                                            shard_by_rank=True))
        per_rank[f"eval{rank}"] = [k for b in eval_set for k in b["key"]]
        # rank-0 evaluation
        whole = ShardDataset(url, "train", LoaderOptions(image_size=SIZE, batch_size=2, train=False))
        assert sorted(k for b in whole for k in b["key"]) == everything
    assert counts == [8, 8]  # a rank may get the two 8-sample shards: ceil(16 / 2) batches for both
    assert sorted(per_rank["train0"] + per_rank["train1"]) == everything
    assert not set(per_rank["eval0"]) & set(per_rank["eval1"])
    assert sorted(per_rank["eval0"] + per_rank["eval1"]) == everything


def test_masks_follow_the_image_through_resize(tmp_path):
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :24] = 2  # class 1 on the left half
    mask[0, :] = 255
    url = _dataset(tmp_path / "ds", {"val-00000.tar": [_good("m000", labels=(1,), mask=encode_mask_png(mask))]},
                   split="val", has_masks=True)
    batch = next(iter(ShardDataset(url, "val", LoaderOptions(image_size=24, batch_size=1, train=False))))
    got = batch["mask"][0]
    assert got.shape == (24, 24)
    assert (got[5:, :11] == 2).all() and (got[5:, 13:] == 0).all() and (got[0] == 255).all()
    assert batch["labels"].tolist() == [[0.0, 1.0]]


def test_clear_errors(tmp_path, toy_dataset):
    with pytest.raises(DataError, match=r"no manifest.json in .*nothing_here.*wsssrec data toy-birds"):
        ShardDataset(str(tmp_path / "nothing_here"), "train", LoaderOptions(image_size=SIZE, batch_size=2, train=True))
    with pytest.raises(DataError, match=r"has no split 'foo' \(splits: train, val, test_aligned, test_conflict\)"):
        ShardDataset(toy_dataset, "foo", LoaderOptions(image_size=SIZE, batch_size=2, train=True))
    for bad in (0, -3, 1.5, "64", True):
        with pytest.raises(DataError, match=r"image_size must be a positive integer, got"):
            ShardDataset(toy_dataset, "train", LoaderOptions(image_size=bad, batch_size=2, train=True))
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        ShardDataset(toy_dataset, "train", LoaderOptions(image_size=SIZE, batch_size=0, train=True))
