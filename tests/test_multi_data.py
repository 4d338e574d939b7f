"""toy-multi: determinism, class list, disjoint instances and photo regions, exact occluding masks, tags,
the class-to-background bias, unlabelled distractors."""

import numpy as np
import pytest

from conftest import MULTI_ARGS, folder_bytes, split_samples
from data_shards.manifest import read_manifest
from data_shards.toy_birds import SPLIT_IDS, Cutout, Photo
from data_shards.toy_multi import (CLASS_GROUPS, CLASSES, NEGATIVE_FRACTION, TEST_INSTANCES, build_toy_multi,
                                   compose_multi)


@pytest.fixture(scope="module")
def samples(toy_multi_dataset):
    return split_samples(toy_multi_dataset)


def test_same_seed_identical_bytes_other_seed_differs(toy_multi_dataset, tmp_path):
    small = {**MULTI_ARGS, "counts": {"train": 12, "val": 6, "test_aligned": 6, "test_conflict": 6}}
    first = folder_bytes(build_toy_multi(str(tmp_path / "a"), progress=False, **small))
    again = folder_bytes(build_toy_multi(str(tmp_path / "b"), progress=False, **small))
    other = folder_bytes(build_toy_multi(str(tmp_path / "c"), progress=False, **{**small, "seed": 1}))
    assert first == again
    tars = [n for n in first if n.endswith(".tar")]
    assert tars and all(first[n] != other[n] for n in tars)


def test_manifest_has_four_classes_and_counts(toy_multi_dataset):
    manifest = read_manifest(toy_multi_dataset)
    assert manifest.classes == CLASSES == ["bird", "mammal", "fish", "fruit"]
    assert {n: i.samples for n, i in manifest.splits.items()} == MULTI_ARGS["counts"]
    assert not manifest.split("train").has_masks and manifest.split("test_conflict").has_masks


def test_instances_disjoint_and_regions_respected(samples):
    seen = {"train": set(), "test": set()}
    for split, items in samples.items():
        side = "test" if split.startswith("test") else "train"
        for meta, _ in items:
            assert meta["region"] == side
            x0, y0, x1, y1 = meta["crop"]
            rx0, ry0, rx1, ry1 = meta["region_box"]
            assert rx0 <= x0 and ry0 <= y0 and x1 <= rx1 and y1 <= ry1, meta
            for obj in meta["objects"]:
                seen[side].add((obj["class"], obj["name"]))
                assert (obj["name"] in TEST_INSTANCES[obj["class"]]) == (side == "test"), obj
    assert seen["train"] and seen["test"] and not seen["train"] & seen["test"]
    assert {c for c, _ in seen["test"]} == set(CLASSES)


def test_masks_and_tags_agree(samples):
    multi = 0
    for split in ("val", "test_aligned", "test_conflict"):
        for meta, mask in samples[split]:
            present = {int(v) - 1 for v in np.unique(mask) if v not in (0, 255)}
            assert present == set(meta["labels"]), (meta, present)
            assert present <= {CLASSES.index(o["class"]) for o in meta["objects"]}
            multi += len(meta["labels"]) > 1
            if not meta["objects"]:
                assert set(np.unique(mask)) <= {0}, "a negative image's distractors must not be labelled"
    assert multi > 0  # some images hold objects of two classes


def test_bias_aligned_conflict_and_negatives(samples):
    rho = MULTI_ARGS["rho"]
    for split, items in samples.items():
        n = len(items)
        negatives = [m for m, _ in items if not m["objects"]]
        assert len(negatives) == round(NEGATIVE_FRACTION * n)
        positives = [m for m, _ in items if m["objects"]]
        aligned = sum(m["bias"] == "aligned" for m in positives) / len(positives)
        expect = 1 - rho if split == "test_conflict" else rho
        assert abs(aligned - expect) < 0.1, (split, aligned)
        for m in positives:  # every object of an image shares the image's bias
            for obj in m["objects"]:
                assert (CLASS_GROUPS[obj["class"]] == m["background"]) == (m["bias"] == "aligned"), m


def test_distractors_are_not_classes(samples):
    names = {d for items in samples.values() for m, _ in items for d in m["distractors"]}
    assert names and all(d.startswith(("plants/flowers/", "vehicles/")) for d in names)


def _square(value: float, side: int) -> Cutout:
    premult = np.zeros((side, side, 4), np.float32)
    premult[..., :3] = value
    premult[..., 3] = 1.0
    return Cutout(f"square{value}", premult)


def test_occlusion_by_paste_order_is_exact():
    size = 32
    photo = Photo("flat", "land", np.full((200, 200, 3), 90, np.uint8), 1.0, (0, 0),
                  {"train": (0, 0, 200, 200), "test": (0, 0, 200, 200)})
    for seed in range(5):
        rng = np.random.default_rng([seed, SPLIT_IDS["val"], 0])
        objects = [(1, _square(0.2, 40)), (3, _square(0.9, 40))]  # mammal, then fruit on top
        image, mask, meta = compose_multi(rng, size, photo, "train", objects, distractors=[_square(0.5, 10)])
        expected = np.zeros((size, size), np.uint8)
        for obj, label in zip(meta["objects"], (2, 4)):
            x0, y0, x1, y1 = obj["box"]
            expected[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = label
        assert np.array_equal(mask, expected), seed
        assert meta["labels"] == sorted({int(v) - 1 for v in np.unique(expected) if v})
        top = mask == 4
        assert top.any() and np.all(np.abs(image[top].astype(int) - round(0.9 * 255)) <= 1)


@pytest.mark.parametrize("name, classes", [("toy-multi", 4), ("toy-multi8", 8)])
def test_demo_builds_the_configs_toy_set(tmp_path, name, classes):
    """`wsssrec demo -c configs/toy_multi.yaml` (toy.name) builds toy-multi where data.url is missing, not
    toy-birds; an existing manifest is left alone."""
    from trainer.cli import ensure_toy_data
    from trainer.config import load_config

    config = "configs/toy_multi.yaml" if name == "toy-multi" else "configs/toy_multi8.yaml"
    url = tmp_path / "set" / "manifest.json"
    cfg = load_config(config, [f"data.url={url}", "toy.size=32", "toy.train=8", "toy.val=4", "toy.test=4"])
    assert cfg.toy.name == name
    ensure_toy_data(cfg)
    manifest = read_manifest(str(url))
    assert len(manifest.classes) == classes
    before = url.stat().st_mtime_ns
    ensure_toy_data(cfg)
    assert url.stat().st_mtime_ns == before
