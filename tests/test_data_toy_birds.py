"""toy-birds: determinism, disjoint instances and photo regions, bias rates, masks and bird sizes; the paired
split test_paired (identical layouts on water and land, independent of ρ and of the other splits' bytes, added
to an existing build)."""
import io
import json
import os
import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from conftest import TOY_ARGS, folder_bytes, split_samples
from data_shards.errors import DataError
from data_shards.manifest import read_manifest
from data_shards.toy_birds import (BACKGROUNDS, BIRD_RANGE, EXCLUDED_BIRDS, TEST_BIRDS, add_paired_split, bird_mask,
                                   build_toy_birds)

SIZE = TOY_ARGS["size"]


@pytest.fixture(scope="module")
def samples(toy_dataset):
    return split_samples(toy_dataset)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(toy_dataset, tmp_path):
    again = build_toy_birds(str(tmp_path / "again"), progress=False, **TOY_ARGS)
    first, second = folder_bytes(toy_dataset), folder_bytes(again)
    assert sorted(first) == sorted(second)
    assert "manifest.json" in first and not any(name.endswith(".tmp") for name in first)
    for name in first:
        assert first[name] == second[name], name

    other = build_toy_birds(str(tmp_path / "other"), progress=False, **{**TOY_ARGS, "seed": 1})
    third = folder_bytes(other)
    assert third["manifest.json"] == first["manifest.json"]  # same counts, same shard names
    differing = [name for name in first if name.endswith(".tar") and first[name] != third[name]]
    assert len(differing) == len([n for n in first if n.endswith(".tar")])


def test_manifest_counts_and_masks(toy_dataset, samples):
    manifest = read_manifest(toy_dataset)
    assert manifest.classes == ["bird"]
    expected = TOY_ARGS["counts"]
    assert {name: info.samples for name, info in manifest.splits.items()} == expected
    assert [os.path.basename(s) for s in manifest.split("train").shards] == [
        "train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert manifest.split("train").has_masks is False
    for split in ("val", "test_aligned", "test_conflict"):
        assert manifest.split(split).has_masks is True
    assert all(mask is None for _, mask in samples["train"])
    for split, rows in samples.items():
        assert len(rows) == expected[split]
        positives = sum(1 for meta, _ in rows if meta["labels"] == [0])
        assert positives == expected[split] // 2
        assert all(meta["labels"] in ([0], []) for meta, _ in rows)


def test_bird_instances_are_disjoint_between_train_and_test(samples):
    seen = {split: {meta["bird"] for meta, _ in rows if meta["bird"]} for split, rows in samples.items()}
    train_side = seen["train"] | seen["val"]
    test_side = seen["test_aligned"] | seen["test_conflict"]
    assert train_side and test_side
    assert not train_side & test_side
    assert test_side <= TEST_BIRDS
    assert not (train_side | test_side) & EXCLUDED_BIRDS
    assert len(TEST_BIRDS) == 10  # of 34 instances


def test_crops_stay_inside_their_photo_region(samples):
    regions = defaultdict(dict)  # photo -> region name -> box
    for split, rows in samples.items():
        expected_region = "test" if split.startswith("test") else "train"
        for meta, _ in rows:
            assert meta["region"] == expected_region
            x0, y0, x1, y1 = meta["crop"]
            rx0, ry0, rx1, ry1 = meta["region_box"]
            assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1, (split, meta)
            assert abs((x1 - x0) - (y1 - y0)) < 1.0  # square crops
            regions[meta["background_photo"]].setdefault(meta["region"], tuple(meta["region_box"]))
    both = [photo for photo, r in regions.items() if len(r) == 2]
    assert both
    for photo in both:
        a, b = regions[photo]["train"], regions[photo]["test"]
        overlap_w = min(a[2], b[2]) - max(a[0], b[0])
        overlap_h = min(a[3], b[3]) - max(a[1], b[1])
        assert overlap_w <= 0 or overlap_h <= 0, photo


def test_background_bias_rates(samples):
    def rates(rows):
        pos = [m for m, _ in rows if m["labels"]]
        neg = [m for m, _ in rows if not m["labels"]]
        return (sum(m["background"] == "water" for m in pos) / len(pos),
                sum(m["background"] == "land" for m in neg) / len(neg))

    rho = TOY_ARGS["rho"]
    for split in ("train", "val", "test_aligned"):
        water_given_bird, land_given_none = rates(samples[split])
        tolerance = 1.5 / (TOY_ARGS["counts"][split] // 2)  # exact counts, rounded
        assert abs(water_given_bird - rho) <= tolerance, split
        assert abs(land_given_none - rho) <= tolerance, split
    water_given_bird, land_given_none = rates(samples["test_conflict"])
    assert abs(water_given_bird - (1 - rho)) <= 0.1 and abs(land_given_none - (1 - rho)) <= 0.1


def test_masks_values_areas_and_negatives(samples):
    fractions = []
    for split in ("val", "test_aligned", "test_conflict"):
        for meta, mask in samples[split]:
            assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 1, 255}
            if meta["labels"]:
                assert (mask == 1).sum() > 0
                fractions.append(float((mask == 1).mean()))
            else:
                assert not mask.any(), meta
                assert meta["bird"] is None and meta["bird_box"] is None
    median = float(np.median(fractions))
    assert 0.08 <= median <= 0.22, median  # DESIGN: median bird area ~13 %
    ignore = [float((m == 255).mean()) for split in ("val",) for meta, m in samples[split] if meta["labels"]]
    assert 0.0 < np.median(ignore) < 0.08  # a thin rim, not a dilated band


def test_bird_size_and_position(samples):
    for rows in samples.values():
        for meta, _ in rows:
            if not meta["labels"]:
                continue
            x0, y0, x1, y1 = meta["bird_box"]
            longest = max(x1 - x0, y1 - y0)
            assert BIRD_RANGE[0] * SIZE - 1 <= longest <= BIRD_RANGE[1] * SIZE + 1
            visible_w = min(x1, SIZE) - max(x0, 0)
            visible_h = min(y1, SIZE) - max(y0, 0)
            assert visible_w >= 0.8 * (x1 - x0) - 1 and visible_h >= 0.8 * (y1 - y0) - 1
            assert len(meta["distractors"]) <= 2


def test_distractors_appear_with_and_without_birds(samples):
    rows = samples["train"]
    with_bird = np.mean([len(m["distractors"]) for m, _ in rows if m["labels"]])
    without = np.mean([len(m["distractors"]) for m, _ in rows if not m["labels"]])
    assert 0.5 < with_bird < 1.5 and 0.5 < without < 1.5


def test_bird_mask_thresholds():
    alpha = np.array([[0, 31, 32, 127, 128, 223, 224, 255]], np.float32) / 255.0
    assert bird_mask(alpha).tolist() == [[0, 0, 255, 255, 255, 255, 1, 1]]


def test_missing_apt_gives_an_actionable_error(tmp_path, monkeypatch):
    from data_shards.errors import DataError
    from data_shards.toy_birds import fetch_sources

    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH: the fetch must fail clearly
    with pytest.raises(DataError, match=r"could not fetch Debian package tuxpaint-stamps-default .*apt-get is not "
                                        r"installed(.|\n)*pass --cache-dir"):
        fetch_sources(str(tmp_path / "cache"))


# ---- the paired split test_paired ----

PAIRS = 6
SMALL = dict(seed=0, size=64, maxcount=32, counts={"train": 2, "val": 2, "test_aligned": 2, "test_conflict": 2})


@pytest.fixture(scope="module")
def paired_build(tmp_path_factory):
    """toy-birds with TOY_ARGS' splits plus test_paired (PAIRS pairs)."""
    return build_toy_birds(str(tmp_path_factory.mktemp("paired")), progress=False, **{**TOY_ARGS, "paired": PAIRS})


def _manifest_doc(path: str) -> dict:
    return json.loads(open(path, "rb").read())


def test_other_splits_are_byte_identical_with_and_without_the_paired_split(toy_dataset, paired_build):
    without, with_paired = folder_bytes(toy_dataset), folder_bytes(paired_build)
    assert sorted(set(with_paired) - set(without)) == ["test_paired-00000.tar"]  # 12 samples, 32 per shard
    for name in without:
        if name != "manifest.json":
            assert with_paired[name] == without[name], name
    old, new = _manifest_doc(toy_dataset)["splits"], _manifest_doc(paired_build)["splits"]
    assert list(new) == [*old, "test_paired"]
    assert {name: new[name] for name in old} == old
    assert new["test_paired"] == {"shards": ["test_paired-00000.tar"], "samples": 2 * PAIRS, "has_masks": True,
                                  "shard_samples": [2 * PAIRS]}


def test_paired_geometry_identical_masks_and_layouts_on_water_and_land(paired_build):
    rows = split_samples(paired_build)["test_paired"]
    assert len(rows) == 2 * PAIRS
    photos = {name.split("/")[1]: group for name, (group, _) in BACKGROUNDS.items()}
    positives = 0
    for pair in range(PAIRS):
        (water, water_mask), (land, land_mask) = rows[2 * pair], rows[2 * pair + 1]
        assert (water["pair"], water["group"], land["pair"], land["group"]) == (pair, "water", pair, "land")
        assert photos[water["background_photo"]] == water["background"] == "water"
        assert photos[land["background_photo"]] == land["background"] == "land"
        assert water["region"] == land["region"] == "test"  # the photos' test regions: never in training
        for key in ("labels", "bird", "bird_box", "distractors"):
            assert water[key] == land[key], (pair, key)
        assert np.array_equal(water_mask, land_mask), pair
        if water["labels"]:
            positives += 1
            assert water["bird"] in TEST_BIRDS and (water_mask == 1).sum() > 0
        else:
            assert water["bird"] is None and not water_mask.any()
    assert positives == PAIRS // 2


def test_paired_images_share_the_bird_and_differ_behind_it(paired_build):
    from data_shards.loader import raw_samples

    shard = read_manifest(paired_build).split("test_paired").shards[0]
    raws = list(raw_samples(shard))
    images = [np.asarray(Image.open(io.BytesIO(raw["jpg"]))).astype(int) for raw in raws]
    masks = [np.asarray(Image.open(io.BytesIO(raw["mask.png"]))) for raw in raws]
    for pair in range(PAIRS):
        water, land, mask = images[2 * pair], images[2 * pair + 1], masks[2 * pair]
        bird = mask == 1
        inner = bird.copy()  # two pixels in from the bird's edge: JPEG blocks there may mix in the background
        for axis in (0, 1):
            for shift in (-2, -1, 1, 2):
                inner &= np.roll(bird, shift, axis=axis)
        if inner.any():
            assert np.abs(water - land)[inner].mean() < 12, pair  # the same opaque bird pixels
        assert np.abs(water - land)[mask == 0].mean() > 20, pair  # different photos behind


def test_paired_split_does_not_depend_on_rho_and_is_added_to_an_existing_build(paired_build, toy_dataset, tmp_path):
    reference = folder_bytes(paired_build)["test_paired-00000.tar"]
    other_rho = build_toy_birds(str(tmp_path / "rho05"), progress=False, rho=0.5, paired=PAIRS, **SMALL)
    assert folder_bytes(other_rho)["test_paired-00000.tar"] == reference

    copy = tmp_path / "old"  # a build without the paired split, as the builder before it wrote them
    shutil.copytree(os.path.dirname(toy_dataset), copy)
    before = folder_bytes(str(copy / "manifest.json"))
    path = add_paired_split(str(copy), seed=0, pairs=PAIRS, maxcount=32, progress=False)  # size read: 64
    after = folder_bytes(path)
    assert after["test_paired-00000.tar"] == reference
    assert {n: b for n, b in after.items() if n != "manifest.json" and not n.startswith("test_paired")} == \
        {n: b for n, b in before.items() if n != "manifest.json"}
    assert after["manifest.json"] == folder_bytes(paired_build)["manifest.json"]  # = a full build's, byte for byte
    with pytest.raises(DataError, match=r"already has split 'test_paired' \(12 samples\); nothing to add"):
        add_paired_split(str(copy), pairs=PAIRS, progress=False)
    shutil.rmtree(copy)
    shutil.copytree(os.path.dirname(toy_dataset), copy)
    with pytest.raises(DataError, match=r"holds 64 px images; the paired split would be 96 px"):
        add_paired_split(str(copy), size=96, pairs=PAIRS, progress=False)
    assert "test_paired" not in read_manifest(str(copy)).splits and not list(copy.glob("test_paired*"))


def test_data_command_only_test_paired_adds_the_split(toy_dataset, paired_build, tmp_path, capsys):
    from data_shards.cli import main

    copy = tmp_path / "old"
    shutil.copytree(os.path.dirname(toy_dataset), copy)
    assert main(["data", "toy-birds", "--out", str(copy), "--only", "test_paired", "--paired", str(PAIRS),
                 "--maxcount", "32"]) == 0
    assert "test_paired" in capsys.readouterr().out
    assert folder_bytes(str(copy / "manifest.json")) == folder_bytes(paired_build)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "toy-birds", "--out", str(copy), "--only", "val"])
    assert exit_info.value.code == 2
    assert "--only val is not supported for toy-birds" in capsys.readouterr().err


def test_paired_count_is_checked():
    with pytest.raises(DataError, match=r"number of pairs must be an integer >= 0, got -1"):
        build_toy_birds("/nonexistent", paired=-1)
