"""The loader for real photos (resize="crop"): random-scale random crops with the padding marked invalid in
training, evaluation at each image's own size with padded batches; the toy sets' square resize unchanged."""
import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.loader import LoaderOptions, ShardDataset, make_loader
from data_shards.manifest import write_manifest
from data_shards.writer import ShardWriter, encode_jpeg, encode_mask_png, make_sample

SIZES = [(40, 30), (64, 48), (30, 52), (80, 60), (48, 48), (36, 44), (70, 40), (50, 50)]  # (W, H)


def _photo_dataset(folder, samples_per_shard=2, with_masks=True) -> str:
    """8 photos of different sizes in 4 shards of a train split and a val split, both with masks."""
    splits = {}
    for split in ("train", "val"):
        with ShardWriter(str(folder), split, samples_per_shard) as writer:
            for n, (w, h) in enumerate(SIZES):
                pixels = np.random.default_rng(n).integers(30, 256, (h, w, 3), dtype=np.uint8)
                mask = np.zeros((h, w), np.uint8)
                mask[h // 4:h // 2, w // 4:w // 2] = 1 + n % 2
                writer.write(make_sample(f"{split}{n:02d}", encode_jpeg(pixels, quality=95),
                                         {"labels": [n % 2]}, encode_mask_png(mask) if with_masks else None))
            splits[split] = writer.close()
    return write_manifest(str(folder), ["cat", "dog"], splits)


def _raw_by_key(url: str) -> dict:
    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest

    return {r["__key__"]: r for info in read_manifest(url).splits.values() for s in info.shards for r in raw_samples(s)}


def test_square_resize_is_todays_behaviour_bit_for_bit(tmp_path):
    url = _photo_dataset(tmp_path / "ds")
    raws = _raw_by_key(url)
    default = list(ShardDataset(url, "train", LoaderOptions(image_size=32, batch_size=4, train=True, seed=3)))
    explicit = list(ShardDataset(url, "train", LoaderOptions(image_size=32, batch_size=4, train=True, seed=3,
                                                             resize="square")))
    for a, b in zip(default, explicit, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"]
    for batch in default:
        assert set(batch) == {"image", "labels", "key", "meta", "padded"}  # no new keys for the toy sets
        for key, image in zip(batch["key"], batch["image"]):
            # the reference: PIL bilinear to 32 x 32, flipped when crc32("seed:epoch:key") is odd
            ref = np.asarray(Image.open(io.BytesIO(raws[key]["jpg"])).convert("RGB").resize((32, 32),
                                                                                            Image.Resampling.BILINEAR))
            if zlib.crc32(f"3:0:{key}".encode()) & 1:
                ref = ref[:, ::-1]
            assert torch.equal(image, torch.from_numpy(ref.copy()).permute(2, 0, 1).float().div_(255.0))
    (val,) = list(ShardDataset(url, "val", LoaderOptions(image_size=24, batch_size=8, train=False)))
    assert val["image"].shape == (8, 3, 24, 24) and val["mask"].shape == (8, 24, 24) and "size" not in val


def test_random_scale_crop_sizes_padding_and_no_masks(tmp_path):
    url = _photo_dataset(tmp_path / "ds")
    raws = _raw_by_key(url)
    # scale fixed at 1: a W x H photo inside a 64 x 64 crop is either cut (side > 64) or padded (side < 64)
    options = LoaderOptions(image_size=64, batch_size=4, train=True, hflip=False, resize="crop", scale_range=(1, 1))
    batches = list(ShardDataset(url, "train", options))
    assert len(batches) == 2
    for batch in batches:
        assert "mask" not in batch and batch["image"].shape == (4, 3, 64, 64) and batch["valid"].shape == (4, 64, 64)
        for key, image, valid in zip(batch["key"], batch["image"], batch["valid"]):
            w, h = Image.open(io.BytesIO(raws[key]["jpg"])).size
            rows, cols = valid.any(1).nonzero().flatten(), valid.any(0).nonzero().flatten()
            assert (len(rows), len(cols)) == (min(h, 64), min(w, 64))  # the photo's extent, cut at 64
            assert int(valid.sum()) == min(h, 64) * min(w, 64)  # one rectangle
            assert (image[:, ~valid] == 0).all() and (image[:, valid] > 0).any()  # padding is 0, outside `valid`
    # scale 2 makes every photo at least 60 px: a 40 px crop is always all photo
    options = LoaderOptions(image_size=40, batch_size=4, train=True, resize="crop", scale_range=(2, 2))
    assert all(bool(b["valid"].all()) for b in ShardDataset(url, "train", options))


def test_crops_are_the_same_with_any_number_of_workers_and_change_with_the_epoch(tmp_path):
    url = _photo_dataset(tmp_path / "ds")
    def keyed(workers, epoch=0):
        options = LoaderOptions(image_size=48, batch_size=2, train=True, seed=5, epoch=epoch, resize="crop",
                                num_workers=workers)
        return {k: (img, v) for b in make_loader(url, "train", options)
                for k, img, v in zip(b["key"], b["image"], b["valid"])}

    zero, one = keyed(0), keyed(1)
    assert zero.keys() == one.keys() and len(zero) == 8
    assert all(torch.equal(zero[k][0], one[k][0]) and torch.equal(zero[k][1], one[k][1]) for k in zero)
    other = keyed(0, epoch=1)
    assert any(not torch.equal(zero[k][0], other[k][0]) for k in zero)


def test_every_rank_the_same_batch_count_in_crop_mode(tmp_path, monkeypatch):
    url = _photo_dataset(tmp_path / "ds", samples_per_shard=3)  # shards of 3, 3, 2 samples
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = ShardDataset(url, "train", LoaderOptions(image_size=32, batch_size=2, train=True, resize="crop"))
        batches = list(dataset)
        assert len(batches) == len(dataset)
        counts.append(len(batches))
        assert all("mask" not in b and b["image"].shape == (2, 3, 32, 32) for b in batches)
    assert counts[0] == counts[1] == 3  # the most a rank can get: two 3-sample shards -> ceil(6 / 2)


def test_eval_at_own_size_with_padded_batches(tmp_path):
    url = _photo_dataset(tmp_path / "ds")
    raws = _raw_by_key(url)
    batches = list(ShardDataset(url, "val", LoaderOptions(image_size=32, batch_size=3, train=False, resize="crop")))
    assert [len(b["key"]) for b in batches] == [3, 3, 2]
    for batch in batches:
        height, width = batch["size"].max(0).values.tolist()
        assert batch["image"].shape[2:] == (height, width) and batch["mask"].shape[1:] == (height, width)
        for key, image, mask, (h, w) in zip(batch["key"], batch["image"], batch["mask"], batch["size"].tolist()):
            photo = np.asarray(Image.open(io.BytesIO(raws[key]["jpg"])).convert("RGB"))
            truth = np.asarray(Image.open(io.BytesIO(raws[key]["mask.png"])))
            assert (h, w) == photo.shape[:2]
            assert torch.equal(image[:, :h, :w], torch.from_numpy(photo.copy()).permute(2, 0, 1).float().div_(255.0))
            assert torch.equal(mask[:h, :w], torch.from_numpy(truth.astype(np.int64)))
            assert (mask[h:] == 255).all() and (mask[:, w:] == 255).all() and (image[:, h:] == 0).all()


def test_options_are_checked():
    from data_shards.errors import DataError

    with pytest.raises(DataError, match="resize must be one of square, crop"):
        LoaderOptions(image_size=32, batch_size=2, train=True, resize="stretch")
    with pytest.raises(DataError, match="scale_range must be"):
        LoaderOptions(image_size=32, batch_size=2, train=True, resize="crop", scale_range=(2.0, 0.5))


def test_data_config_reaches_the_loader(tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.data import eval_batches, train_batches

    url = _photo_dataset(tmp_path / "ds")
    cfg = load_config(None, [f"data.url={url}", "data.image_size=40", "data.batch_size=4", "data.eval_batch_size=8",
                             "data.resize=crop", "data.scale_min=0.5", "data.scale_max=1.5"])
    batch = next(train_batches(cfg, seed=0))
    assert batch["image"].shape == (4, 3, 40, 40) and batch["valid"].shape == (4, 40, 40) and "mask" not in batch
    (val,) = list(eval_batches(cfg, "val"))
    assert val["size"].tolist() == [[h, w] for w, h in SIZES]
    with pytest.raises(ConfigError, match="data.resize"):
        load_config(None, ["data.resize=stretch"])
    with pytest.raises(ConfigError, match="scale_min"):
        load_config(None, ["data.scale_min=3"])


def test_eval_batches_padded_to_a_multiple(tmp_path):
    url = _photo_dataset(tmp_path / "ds")
    options = LoaderOptions(image_size=32, batch_size=3, train=False, resize="crop", pad_multiple=32)
    batches = list(ShardDataset(url, "val", options))
    assert [tuple(b["image"].shape[2:]) for b in batches] == [(64, 64), (64, 96), (64, 96)]
    for batch in batches:
        for mask, (h, w) in zip(batch["mask"], batch["size"].tolist()):
            assert (mask[h:] == 255).all() and (mask[:, w:] == 255).all()
    # the square resize ignores it: the toy sets' batches stay as they were
    square = next(iter(ShardDataset(url, "val", LoaderOptions(image_size=24, batch_size=3, train=False,
                                                              pad_multiple=32))))
    assert square["image"].shape == (3, 3, 24, 24) and "size" not in square
