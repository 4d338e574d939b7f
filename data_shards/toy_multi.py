"""The `toy-multi` data set: 1 to 3 real photo cut-outs of C = 4 classes (bird, mammal, fish, fruit) pasted on
the toy-birds background photos, occluding each other by paste order, with exact per-class masks and a
class-to-background bias (bird and fish on water, mammal and fruit on land).

Same sources, crops, ignore rims and JPEG re-encoding as toy-birds (`data_shards.toy_birds`); every sample is
drawn from its own RNG seeded by (seed, split, index), so the same seed gives byte-identical shards. The builder
takes a `MultiSpec`, so `data_shards.toy_multi8` (C = 8) is only its class lists.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .manifest import write_manifest
from .toy_birds import (BIRD_DIR, BIRD_OUTSIDE, EXCLUDED_BIRDS, JPEG_QUALITY, SPLIT_IDS, SPLITS, TEST_BIRDS,
                        check_build_args,
                        Cutout, Photo, _orig_box, _paste, _premultiplied, _resized, background_crop, bird_mask,
                        fetch_sources, load_photos, paste_distractors)
from .writer import ShardWriter, encode_jpeg, encode_mask_png, make_sample

CLASSES = ["bird", "mammal", "fish", "fruit"]
# The background group each class is biased towards (train/val/test_aligned: with probability ρ).
CLASS_GROUPS = {"bird": "water", "mammal": "land", "fish": "water", "fruit": "land"}
DEFAULT_COUNTS = {"train": 2000, "val": 200, "test_aligned": 300, "test_conflict": 300}
NEGATIVE_FRACTION = 0.2  # background-only images (no tag): L_delete and L_paste need some in every batch

# Photo cut-outs per class (folders under tuxpaint/stamps; each stamp looked at). Left out: drawings and
# silhouettes (hedgehog, echidna, the bee and fly among the insects), a toy (edward_bear), a rendered whale,
# cut-outs that keep a patch of ground (indian_blackbuck, tiger_sumatran, lion, fox: a land cue inside the
# mask), aquatic mammals (dolphin, orca, otter, sea_lion, whale: they would contradict "mammals on land"),
# crustaceans among the fish stamps (lobster, shrimp).
CLASS_GLOBS = {
    "bird": (f"{BIRD_DIR}/*.png",),
    "mammal": ("tuxpaint/stamps/animals/mammals/*.png", "tuxpaint/stamps/animals/mammals/*/*.png"),
    "fish": ("tuxpaint/stamps/animals/fish/*.png",),
    "fruit": ("tuxpaint/stamps/food/fruit/*.png",),
}
EXCLUDED = {
    "bird": EXCLUDED_BIRDS,
    "mammal": {"hedgehog", "echidna", "indian_blackbuck", "tiger_sumatran", "lion", "fox", "dolphin", "orca",
               "otter", "sea_lion", "whale"},
    "fish": {"lobster", "shrimp"},
    "fruit": set(),
}
# Test-only instances (~30 % per class); near-duplicates (same species, same fruit kind) stay on one side.
TEST_INSTANCES = {
    "bird": TEST_BIRDS,
    "mammal": {"chimp", "gorilla", "tamarin_emperor", "bear", "european-bear", "camel", "dromedary", "caribou",
               "deer", "doe", "wapiti", "donkey", "donkey_eating", "horse", "zebra"},
    "fish": {"lionfish", "seahorse", "moonwrasse"},
    "fruit": {"apple_fuji", "apple_granny_smith", "apple_green", "apple_red", "apple_sierra_beauty", "pear",
              "pineapple", "banana"},
}
# Distractors: photo stamps of no class in CLASSES, never labelled (flowers, vehicles).
DISTRACTOR_GLOBS = ("tuxpaint/stamps/plants/flowers/*.png", "tuxpaint/stamps/vehicles/**/*.png")
MAX_DISTRACTORS = 1
DISTRACTOR_RANGE = (0.20, 0.35)
OBJECT_RANGES = {1: (0.50, 0.85), 2: (0.40, 0.65), 3: (0.35, 0.55)}  # longest side / canvas, by object count
MIN_VISIBLE = 0.35  # an object later pastes cover beyond this fraction of its own mask is placed again
PLACEMENT_TRIES = 8


@dataclass(frozen=True)
class MultiSpec:
    """What makes one multi-class toy set (toy-multi, toy-multi8): its classes, their background groups and
    stamps, the test-only instances, the distractors, and which classes prefer each other's company."""
    name: str
    classes: list[str]
    class_groups: dict[str, str]  # class -> "water" | "land", the group it is biased towards
    class_globs: dict[str, tuple[str, ...]]  # class -> stamp globs under usr/share
    excluded: dict[str, set[str]]  # class -> stamp names left out
    test_instances: dict[str, set[str]]  # class -> stamp names used by the test splits only
    distractor_globs: tuple[str, ...]
    distractor_excluded: frozenset[str] = frozenset()  # names relative to tuxpaint/stamps, no extension
    # Co-occurrence: class -> its partner (symmetric, same group). Each additional object of an image is the
    # primary class's partner with probability partner_probability, else a class of the primary's group.
    partners: dict[str, str] = field(default_factory=dict)
    partner_probability: float = 0.0

    def __post_init__(self) -> None:
        for cls, partner in self.partners.items():
            if self.partners.get(partner) != cls or self.class_groups[cls] != self.class_groups[partner]:
                raise ValueError(f"{self.name}: partners {cls!r} and {partner!r} must name each other and share a "
                                 f"background group (groups: {self.class_groups})")


TOY_MULTI = MultiSpec("toy-multi", CLASSES, CLASS_GROUPS, CLASS_GLOBS, EXCLUDED, TEST_INSTANCES, DISTRACTOR_GLOBS)


def load_class_cutouts(share: str, size: int,
                       spec: MultiSpec = TOY_MULTI) -> dict[str, dict[str, list[Cutout]]]:
    """class -> {"train": [...], "test": [...]} photo cut-outs, pre-shrunk to at most twice the canvas."""
    out: dict[str, dict[str, list[Cutout]]] = {}
    for cls in spec.classes:
        paths = sorted(p for pattern in spec.class_globs[cls] for p in glob.glob(os.path.join(share, pattern)))
        split: dict[str, list[Cutout]] = {"train": [], "test": []}
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            if "/cartoon/" in path or name in spec.excluded[cls]:  # cartoon/ folders hold drawings
                continue
            side = "test" if name in spec.test_instances[cls] else "train"
            split[side].append(Cutout(name, _premultiplied(path, 2 * size)))
        if not split["train"] or not split["test"]:
            raise DataError(f"{spec.name} class {cls!r}: no {'train' if not split['train'] else 'test'} cut-outs "
                            f"under {share} ({', '.join(spec.class_globs[cls])}; expected tuxpaint-stamps-default)")
        out[cls] = split
    return out


def load_distractors(share: str, size: int, spec: MultiSpec = TOY_MULTI) -> list[Cutout]:
    items = []
    for pattern in spec.distractor_globs:
        for path in sorted(glob.glob(os.path.join(share, pattern), recursive=True)):
            name = os.path.splitext(os.path.relpath(path, os.path.join(share, "tuxpaint", "stamps")))[0]
            if "/cartoon/" in path or name in spec.distractor_excluded:
                continue
            items.append(Cutout(name, _premultiplied(path, size)))
    return items


def _plan(split: str, count: int, rho: float, seed: int, spec: MultiSpec) -> list[tuple[int | None, str]]:
    """(primary class index or None for a negative, background group) per sample: exact class balance, exact
    bias counts per class (aligned = the class's own group), negatives split evenly between the groups."""
    bias = 1.0 - rho if split == "test_conflict" else rho
    n_neg = round(NEGATIVE_FRACTION * count)
    n_pos = count - n_neg
    plan: list[tuple[int | None, str]] = []
    for c, cls in enumerate(spec.classes):
        n_c = n_pos // len(spec.classes) + (1 if c < n_pos % len(spec.classes) else 0)
        own = spec.class_groups[cls]
        other = "land" if own == "water" else "water"
        aligned = round(bias * n_c)
        plan += [(c, own)] * aligned + [(c, other)] * (n_c - aligned)
    plan += [(None, "water")] * (n_neg // 2) + [(None, "land")] * (n_neg - n_neg // 2)
    order = np.random.default_rng([seed, SPLIT_IDS[split], 1 << 20]).permutation(count)
    return [plan[i] for i in order]


def _place(rng: np.random.Generator, size: int, pixels: np.ndarray) -> tuple[int, int]:
    h, w = pixels.shape[:2]
    x = int(rng.integers(-int(BIRD_OUTSIDE * w), size - w + int(BIRD_OUTSIDE * w) + 1))
    y = int(rng.integers(-int(BIRD_OUTSIDE * h), size - h + int(BIRD_OUTSIDE * h) + 1))
    return x, y


def _own_mask(size: int, pixels: np.ndarray, x: int, y: int) -> np.ndarray:
    """Where this cut-out, pasted at (x, y), is opaque enough to be labelled (or ignored): bool size×size."""
    alpha_only = np.zeros((size, size, 3), np.float32)
    return bird_mask(_paste(alpha_only, pixels, x, y)) != 0


def compose_multi(rng: np.random.Generator, size: int, photo: Photo, region: str,
                  objects: list[tuple[int, Cutout]], distractors: list[Cutout],
                  classes: list[str] = CLASSES) -> tuple[np.ndarray, np.ndarray, dict]:
    """One composite of `objects` (class index, cut-out) in paste order: (RGB uint8, uint8 mask, metadata).
    Mask: 0 background, c + 1 where object c (the last one pasted there) has alpha ≥ 128, 255 on its rim;
    tags: the classes left with labelled pixels."""
    canvas, crop_box = background_crop(rng, size, photo, region)
    used = paste_distractors(rng, canvas, distractors, MAX_DISTRACTORS, DISTRACTOR_RANGE)
    lo, hi = OBJECT_RANGES.get(len(objects), OBJECT_RANGES[1])
    placed = []  # (class, cut-out, pixels, x, y)
    owns: list[np.ndarray] = []  # each placed object's own mask
    covered: list[np.ndarray] = []  # what later objects cover of it
    for c, cutout in objects:
        pixels = _resized(cutout, round(rng.uniform(lo, hi) * size), bool(rng.integers(2)))
        for _ in range(PLACEMENT_TRIES):  # place again while an earlier object would be mostly hidden
            x, y = _place(rng, size, pixels)
            own = _own_mask(size, pixels, x, y)
            if all(1.0 - ((cov | own) & prev).sum() / max(prev.sum(), 1) >= MIN_VISIBLE
                   for prev, cov in zip(owns, covered)):
                break
        covered = [cov | own for cov in covered]
        owns.append(own)
        covered.append(np.zeros_like(own))
        placed.append((c, cutout, pixels, x, y))
    mask = np.zeros((size, size), np.uint8)
    records = []
    for c, cutout, pixels, x, y in placed:
        object_mask = bird_mask(_paste(canvas, pixels, x, y))
        mask[object_mask == 1] = c + 1
        mask[object_mask == 255] = 255
        h, w = pixels.shape[:2]
        records.append({"class": classes[c], "name": cutout.name, "box": [x, y, x + w, y + h]})
    labels = sorted({c for c, *_ in placed if (mask == c + 1).any()})
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    meta = {
        "labels": labels,
        "background": photo.group,
        "background_photo": photo.name,
        "objects": records,
        "distractors": used,
        "region": region,
        "crop": _orig_box(photo, crop_box),
        "region_box": _orig_box(photo, photo.regions[region]),
    }
    return image, mask, meta


def _objects(rng: np.random.Generator, primary: int, pool: dict[str, list[Cutout]],
             spec: MultiSpec) -> list[tuple[int, Cutout]]:
    """The primary class first, then 0-2 more objects of classes biased towards the same background group
    (so an aligned image is aligned for every object in it, a conflict image in conflict for every one); with
    partners, each of them is the primary's partner with probability spec.partner_probability."""
    names = spec.classes
    same_side = [c for c, cls in enumerate(names) if spec.class_groups[cls] == spec.class_groups[names[primary]]]
    partner = spec.partners.get(names[primary])

    def another() -> int:
        # no draw for the partner test without partners: toy-multi's RNG stream (and bytes) stay as they were
        if partner is not None and rng.random() < spec.partner_probability:
            return names.index(partner)
        return same_side[int(rng.integers(len(same_side)))]

    classes = [primary] + [another() for _ in range(int(rng.integers(0, 3)))]
    order = rng.permutation(len(classes))  # the primary class is not always pasted first (or last)
    picked = []
    for i in order:
        c = classes[int(i)]
        instances = pool[names[c]]
        picked.append((c, instances[int(rng.integers(len(instances)))]))
    return picked


def build_toy_multi(
    out_dir: str,
    *,
    seed: int = 0,
    size: int = 96,
    rho: float = 0.9,
    counts: dict[str, int] | None = None,
    cache_dir: str | None = None,
    maxcount: int = 250,
    progress: bool = True,
    spec: MultiSpec = TOY_MULTI,
) -> str:
    """Build toy-multi (or the set `spec` describes) into `out_dir` (shards, then manifest.json); returns the
    manifest path."""
    counts = check_build_args(spec.name, size, rho, counts, DEFAULT_COUNTS)
    share = fetch_sources(cache_dir)
    cutouts = load_class_cutouts(share, size, spec)
    distractors = load_distractors(share, size, spec)
    photos = load_photos(share, size)
    by_group = {g: [p for p in photos if p.group == g] for g in ("water", "land")}

    splits = {}
    for split in SPLITS:
        is_test = split.startswith("test")
        pool = {cls: cutouts[cls]["test" if is_test else "train"] for cls in spec.classes}
        with ShardWriter(out_dir, split, maxcount) as writer:
            plan = _plan(split, counts[split], rho, seed, spec)
            for index, (primary, group) in enumerate(tqdm(plan, desc=f"{spec.name} {split}", disable=not progress)):
                rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
                photo = by_group[group][int(rng.integers(len(by_group[group])))]
                objects = _objects(rng, primary, pool, spec) if primary is not None else []
                image, mask, meta = compose_multi(rng, size, photo, "test" if is_test else "train", objects,
                                                  distractors, spec.classes)
                if primary is not None:
                    own = spec.class_groups[spec.classes[primary]]
                    meta["bias"] = "aligned" if group == own else "conflict"
                mask_png = encode_mask_png(mask) if split != "train" else None
                writer.write(make_sample(f"{split}-{index:06d}", encode_jpeg(image, JPEG_QUALITY), meta, mask_png))
            splits[split] = writer.close()
        if split != "train":
            splits[split].has_masks = True
    return write_manifest(out_dir, spec.classes, splits)
