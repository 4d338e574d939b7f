"""toy-multi8: eight classes, mask labels, co-occurring pairs above independent draws, disjoint instances, the
per-class background bias, unlabelled distractors of no class, and a byte-identical rebuild (through the CLI)."""

import itertools

import numpy as np
import pytest

from conftest import folder_bytes, split_samples
from data_shards.cli import main as data_main
from data_shards.manifest import read_manifest
from data_shards.toy_multi import MultiSpec
from data_shards.toy_multi8 import (CLASS_GROUPS8, CLASSES8, PAIRS8, TEST_INSTANCES8, TOY_MULTI8,
                                    build_toy_multi8)

RHO = 0.9
# Big enough to tell co-occurrence from chance (320 positive train images, 40 per primary class) and the bias of
# each class in test_conflict (16 primaries per class), small enough to build in a few seconds at 48 px.
COUNTS = {"train": 400, "val": 40, "test_aligned": 40, "test_conflict": 160}


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> str:
    return build_toy_multi8(str(tmp_path_factory.mktemp("toy_multi8")), seed=0, size=48, rho=RHO, counts=COUNTS,
                            maxcount=100, progress=False)


@pytest.fixture(scope="module")
def samples(manifest_path):
    return split_samples(manifest_path)


def test_manifest_has_eight_classes_and_counts(manifest_path):
    manifest = read_manifest(manifest_path)
    assert manifest.classes == CLASSES8 == ["bird", "mammal", "fish", "fruit", "vegetable", "vehicle",
                                            "instrument", "tool"]
    assert {n: i.samples for n, i in manifest.splits.items()} == COUNTS
    assert not manifest.split("train").has_masks and manifest.split("val").has_masks


def test_mask_labels_in_range_and_equal_to_tags(samples):
    seen = set()
    for split in ("val", "test_aligned", "test_conflict"):
        for meta, mask in samples[split]:
            values = {int(v) for v in np.unique(mask)}
            assert values <= set(range(9)) | {255}, (split, values)
            present = {v - 1 for v in values if v not in (0, 255)}
            assert present == set(meta["labels"]), (meta, present)
            seen |= present
    assert seen == set(range(8))  # every class has labelled pixels in the evaluation splits


def _tag_rates(samples) -> tuple[dict, dict]:
    """Over the positive train images: P(class tagged) per class, P(both tagged) per class pair."""
    tags = [set(meta["labels"]) for meta, _ in samples["train"] if meta["objects"]]
    single = {c: np.mean([c in t for t in tags]) for c in range(8)}
    both = {(a, b): np.mean([a in t and b in t for t in tags]) for a, b in itertools.combinations(range(8), 2)}
    return single, both


def test_pairs_cooccur_more_than_independent_draws(samples):
    single, both = _tag_rates(samples)
    pairs = {tuple(sorted((CLASSES8.index(a), CLASSES8.index(b)))) for a, b in PAIRS8}
    for (a, b), p_ab in both.items():
        lift = p_ab / (single[a] * single[b])
        if (a, b) in pairs:  # measured 2.5-3.1 on this build
            assert lift > 2.0, (CLASSES8[a], CLASSES8[b], lift)
        elif CLASS_GROUPS8[CLASSES8[a]] == CLASS_GROUPS8[CLASSES8[b]]:  # measured 0.55-0.96
            assert lift < 1.2, (CLASSES8[a], CLASSES8[b], lift)
        else:  # classes of different groups never share an image (it would be aligned for one only)
            assert p_ab == 0, (CLASSES8[a], CLASSES8[b])


def test_instances_disjoint_and_all_classes_in_test(samples):
    seen = {"train": set(), "test": set()}
    for split, items in samples.items():
        side = "test" if split.startswith("test") else "train"
        for meta, _ in items:
            assert meta["region"] == side
            for obj in meta["objects"]:
                seen[side].add((obj["class"], obj["name"]))
                assert (obj["name"] in TEST_INSTANCES8[obj["class"]]) == (side == "test"), obj
    assert not seen["train"] & seen["test"]
    assert {c for c, _ in seen["test"]} == {c for c, _ in seen["train"]} == set(CLASSES8)


def test_bias_per_class_rho_in_train_one_minus_rho_in_conflict(samples):
    for split, expect, tolerance in (("train", RHO, 0.06), ("test_conflict", 1 - RHO, 0.08)):
        for c, cls in enumerate(CLASSES8):
            images = [meta for meta, _ in samples[split] if c in meta["labels"]]
            own = np.mean([meta["background"] == CLASS_GROUPS8[cls] for meta in images])
            assert abs(own - expect) < tolerance, (split, cls, own, len(images))
    for items in samples.values():
        for meta, _ in items:  # every object of an image shares the image's bias
            for obj in meta["objects"]:
                assert (CLASS_GROUPS8[obj["class"]] == meta["background"]) == (meta["bias"] == "aligned"), meta


def test_distractors_are_of_no_class(samples):
    names = {d for items in samples.values() for meta, _ in items for d in meta["distractors"]}
    assert names and all(d.startswith(("plants/flowers/", "sports/", "household/dishes/")) for d in names)


def test_same_seed_identical_bytes_through_cli_other_seed_differs(tmp_path):
    small = dict(size=48, rho=RHO, maxcount=40, counts={"train": 12, "val": 6, "test_aligned": 6, "test_conflict": 6})
    first = folder_bytes(build_toy_multi8(str(tmp_path / "a"), seed=0, progress=False, **small))
    assert data_main(["data", "toy-multi8", "--out", str(tmp_path / "b"), "--seed", "0", "--size", "48",
                      "--train", "12", "--val", "6", "--test", "6", "--maxcount", "40"]) == 0
    again = folder_bytes(str(tmp_path / "b" / "manifest.json"))
    other = folder_bytes(build_toy_multi8(str(tmp_path / "c"), seed=1, progress=False, **small))
    assert first == again
    tars = [n for n in first if n.endswith(".tar")]
    assert tars and all(first[n] != other[n] for n in tars)


def test_partners_must_pair_up_within_a_group():
    with pytest.raises(ValueError, match="share a background group"):
        MultiSpec("bad", ["bird", "fruit"], {"bird": "water", "fruit": "land"}, {}, {}, {}, (),
                  partners={"bird": "fruit", "fruit": "bird"})
    assert TOY_MULTI8.partners["fish"] == "bird" and TOY_MULTI8.partners["bird"] == "fish"
