"""The `toy-birds` data set: real bird cut-outs pasted on real water/land photos, with a background bias.

Sources are Debian packages fetched with `apt-get download` + `dpkg -x` into a cache folder (no system
install). Every sample is drawn from its own RNG seeded by (seed, split, index), so a build is fully
deterministic: the same seed gives byte-identical shards and manifest.
"""
from __future__ import annotations

import glob
import io
import os
import subprocess
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .manifest import SplitInfo, read_manifest, relative_name, url_dirname, write_manifest
from .writer import ShardWriter, encode_jpeg, encode_mask_png, make_sample

CLASSES = ["bird"]
SPLITS = ("train", "val", "test_aligned", "test_conflict")
SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
DEFAULT_COUNTS = {"train": 2000, "val": 200, "test_aligned": 300, "test_conflict": 300}
# The paired evaluation split (write_paired_split): each test layout once on water, once on land.
PAIRED_SPLIT = "test_paired"
PAIR_GROUPS = ("water", "land")
DEFAULT_PAIRS = 200
PAIRED_STREAM = 1 << 16  # its RNG stream id, apart from SPLIT_IDS

# Debian package -> a folder (under usr/share) it provides; a package is fetched only when it is missing.
PACKAGES = {
    "tuxpaint-stamps-default": "tuxpaint/stamps/animals/birds",
    "tuxpaint-data": "tuxpaint/templates",
    "mate-backgrounds": "backgrounds/mate/nature",
}

BIRD_DIR = "tuxpaint/stamps/animals/birds"
# albino_peahen's cut-out keeps a patch of grass under the bird: its mask would call grass "bird"
# and it carries a land cue, so it is left out. That leaves 34 photo cut-outs.
EXCLUDED_BIRDS = {"albino_peahen"}
# Test-only instances (10 of 34, ~30 %). Near-duplicates stay on one side (duck/drake are both
# mallards, the two gulls, crow/blackbird) so a test bird is never a re-shot of a training bird.
TEST_BIRDS = {"duck", "drake", "seagull", "silver-gull", "crow", "blackbird", "owl", "pigeon", "turkey", "tucan"}

DISTRACTOR_GLOBS = ("tuxpaint/stamps/food/fruit/*.png", "tuxpaint/stamps/plants/flowers/*.png",
                    "tuxpaint/stamps/vehicles/**/*.png")

# Background photos, each looked at and labelled: name -> (group, usable box as fractions x0, y0, x1, y1).
# Left out: lighthouse (a building against sky), spiders_web (dark out-of-focus blur), sun_behind_clouds,
# trees_above and trees_at_dusk (mostly sky), wool_mill_machine (indoor machinery), Storm (sky over a
# road), Dune (sea and sky above dune grass: a crop could be either), Wood (sawn boards, a man-made
# surface, neither water nor land scenery).
BACKGROUNDS = {
    # water
    "templates/ocean_waves": ("water", (0, 0, 1, 1)),
    "templates/ocean_splash": ("water", (0, 0, 1, 1)),
    "templates/jellyfish": ("water", (0, 0, 1, 1)),  # underwater, blue-lit aquarium
    "mate/Aqua": ("water", (0, 0, 1, 1)),  # a drop splashing into water
    # land
    "templates/burnt_bark": ("land", (0, 0, 1, 1)),
    "templates/cliff": ("land", (0, 0.45, 1, 1)),  # the top is sky; keep the rock
    "templates/corn_maze": ("land", (0, 0, 1, 1)),
    "templates/mossy_bark": ("land", (0, 0.0625, 1, 0.9375)),  # black bars top and bottom (30 of 480 px)
    "templates/mossy_log": ("land", (0, 0, 1, 1)),
    "templates/mudstone": ("land", (0, 0, 1, 1)),
    "templates/redwoods_above": ("land", (0, 0, 1, 1)),
    "templates/rocks": ("land", (0, 0, 1, 1)),
    "templates/sheep": ("land", (0, 0.45, 1, 1)),  # the top is sky; keep the meadow
    "templates/sun_behind_leaves": ("land", (0, 0, 1, 1)),
    "mate/Blinds": ("land", (0, 0, 1, 1)),  # a green leaf close up
    "mate/FreshFlower": ("land", (0, 0, 1, 1)),
    "mate/Garden": ("land", (0, 0, 1, 1)),
    "mate/GreenMeadow": ("land", (0, 0, 1, 1)),
    "mate/LadyBird": ("land", (0, 0, 1, 1)),
    "mate/RainDrops": ("land", (0, 0, 1, 1)),  # water drops on a green leaf: a leaf, not water
    "mate/TwoWings": ("land", (0, 0, 1, 1)),
    "mate/YellowFlower": ("land", (0, 0, 1, 1)),
}
BACKGROUND_DIRS = {"templates": "tuxpaint/templates", "mate": "backgrounds/mate/nature"}

TEST_REGION_FRACTION = 0.35  # the far end of each photo's longer axis is the test region
PHOTO_SCALE = 3.0  # usable box's shorter side = 3 x image size, so random square crops fit each region
CROP_RANGE = (1.0, 1.5)  # crop side, in units of the image size, before resizing to the image size
BIRD_RANGE = (0.55, 0.95)  # bird longest side / canvas
BIRD_OUTSIDE = 0.1  # up to this fraction of the bird's width/height may leave the canvas
DISTRACTOR_RANGE = (0.20, 0.40)
MAX_DISTRACTORS = 2
JPEG_QUALITY = 90


@dataclass
class Cutout:
    name: str
    premult: np.ndarray  # H x W x 4 float32: premultiplied RGB in [0,1], alpha in [0,1]


@dataclass
class Photo:
    name: str
    group: str
    pixels: np.ndarray  # the usable box, resized: H x W x 3 uint8
    scale: float  # resized px per original px
    offset: tuple[float, float]  # usable box origin, original px
    regions: dict  # "train"/"test" -> (x0, y0, x1, y1) in resized px


def default_cache_dir() -> str:
    root = os.environ.get("WSSSREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wsssrec")
    return os.path.join(root, "debian")


def fetch_sources(cache_dir: str | None = None) -> str:
    """Make sure the Debian packages are extracted under `cache_dir`; returns the usr/share folder.

    Packages already extracted there are reused; missing ones are fetched with `apt-get download`
    (run inside `cache_dir`) and unpacked with `dpkg -x` into `cache_dir/root`.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    share = os.path.join(cache_dir, "root", "usr", "share")
    for package, provides in PACKAGES.items():
        if os.path.isdir(os.path.join(share, provides)):
            continue
        os.makedirs(cache_dir, exist_ok=True)
        debs = sorted(glob.glob(os.path.join(cache_dir, f"{package}_*.deb")))
        if not debs:
            _run(["apt-get", "download", package], cache_dir, package, cache_dir)
            debs = sorted(glob.glob(os.path.join(cache_dir, f"{package}_*.deb")))
        if not debs:
            raise DataError(f"apt-get download {package} wrote no .deb into {cache_dir}")
        _run(["dpkg", "-x", debs[-1], os.path.join(cache_dir, "root")], cache_dir, package, cache_dir)
        if not os.path.isdir(os.path.join(share, provides)):
            raise DataError(f"package {package} ({debs[-1]}) has no usr/share/{provides}")
    return share


def _run(cmd: list[str], cwd: str, package: str, cache_dir: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        proc = None
    if proc is None or proc.returncode != 0:
        stderr = proc.stderr.strip() if proc is not None else f"{cmd[0]} is not installed"
        raise DataError(
            f"could not fetch Debian package {package} with `{' '.join(cmd)}`: {stderr}\n"
            f"Fetch it on a machine with apt (apt-get download {' '.join(PACKAGES)}; dpkg -x each .deb into "
            f"CACHE/root) and pass --cache-dir CACHE, or put the .deb files into {cache_dir}."
        )


def _premultiplied(path: str, max_side: int) -> np.ndarray:
    image = Image.open(path).convert("RGBA")
    bbox = image.getchannel("A").point(lambda a: 255 if a >= 32 else 0).getbbox()
    if bbox:  # trim transparent margins so "longest side" means the object's size
        image = image.crop(bbox)
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        image = image.convert("RGBa").resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BOX
        )
    premult = np.asarray(image.convert("RGBa"), dtype=np.float32) / 255.0
    return premult


def load_cutouts(share: str, size: int) -> tuple[list[Cutout], list[Cutout], list[Cutout]]:
    """(train birds, test birds, distractors), each pre-shrunk to at most twice the canvas."""
    paths = sorted(glob.glob(os.path.join(share, BIRD_DIR, "*.png")))
    birds = [p for p in paths if os.path.splitext(os.path.basename(p))[0] not in EXCLUDED_BIRDS]
    if not birds:
        raise DataError(f"no bird cut-outs in {os.path.join(share, BIRD_DIR)} (expected tuxpaint-stamps-default)")
    train, test = [], []
    for path in birds:
        name = os.path.splitext(os.path.basename(path))[0]
        (test if name in TEST_BIRDS else train).append(Cutout(name, _premultiplied(path, 2 * size)))
    distractors = []
    for pattern in DISTRACTOR_GLOBS:
        for path in sorted(glob.glob(os.path.join(share, pattern), recursive=True)):
            if "/cartoon/" in path:
                continue
            name = os.path.relpath(path, os.path.join(share, "tuxpaint", "stamps"))
            distractors.append(Cutout(os.path.splitext(name)[0], _premultiplied(path, size)))
    return train, test, distractors


def _regions(width: int, height: int) -> dict:
    if width >= height:
        cut = round(width * (1 - TEST_REGION_FRACTION))
        return {"train": (0, 0, cut, height), "test": (cut, 0, width, height)}
    cut = round(height * (1 - TEST_REGION_FRACTION))
    return {"train": (0, 0, width, cut), "test": (0, cut, width, height)}


def load_photos(share: str, size: int) -> list[Photo]:
    photos = []
    for name, (group, box) in BACKGROUNDS.items():
        folder, stem = name.split("/")
        path = os.path.join(share, BACKGROUND_DIRS[folder], stem + ".jpg")
        try:
            image = Image.open(path)
        except FileNotFoundError:
            raise DataError(f"background photo {path} is missing (expected {BACKGROUND_DIRS[folder]})") from None
        W, H = image.size
        x0, y0, x1, y1 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
        scale = PHOTO_SCALE * size / min(x1 - x0, y1 - y0)
        target = (round((x1 - x0) * scale), round((y1 - y0) * scale))
        image.draft("RGB", (round(W * scale), round(H * scale)))  # fast JPEG decode at reduced size
        reduce = image.size[0] / W
        pixels = image.convert("RGB").resize(
            target, Image.Resampling.LANCZOS, box=(x0 * reduce, y0 * reduce, x1 * reduce, y1 * reduce)
        )
        photos.append(Photo(stem, group, np.asarray(pixels), scale, (x0, y0), _regions(*target)))
    return photos


def _resized(cutout: Cutout, longest: int, flip: bool) -> np.ndarray:
    h, w = cutout.premult.shape[:2]
    factor = longest / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    channels = [
        np.asarray(Image.fromarray(cutout.premult[..., c], mode="F").resize(size, Image.Resampling.BILINEAR))
        for c in range(4)
    ]
    out = np.clip(np.stack(channels, axis=-1), 0.0, 1.0)
    return out[:, ::-1] if flip else out


def _paste(canvas: np.ndarray, premult: np.ndarray, x: int, y: int) -> np.ndarray:
    """Composite a premultiplied cut-out at (x, y) (may be partly outside); returns the canvas-sized alpha."""
    S = canvas.shape[0]
    h, w = premult.shape[:2]
    cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, S), min(y + h, S)
    alpha = np.zeros((S, S), np.float32)
    if cx1 <= cx0 or cy1 <= cy0:
        return alpha
    part = premult[cy0 - y:cy1 - y, cx0 - x:cx1 - x]
    region = canvas[cy0:cy1, cx0:cx1]
    canvas[cy0:cy1, cx0:cx1] = part[..., :3] + region * (1.0 - part[..., 3:])
    alpha[cy0:cy1, cx0:cx1] = part[..., 3]
    return alpha


def bird_mask(alpha: np.ndarray) -> np.ndarray:
    """alpha in [0,1] -> uint8 mask: 1 where alpha >= 128/255, 255 (ignore) where 32..223, else 0."""
    a8 = np.round(alpha * 255.0)
    mask = np.where(a8 >= 128, 1, 0).astype(np.uint8)
    mask[(a8 >= 32) & (a8 <= 223)] = 255
    return mask


def _plan(split: str, count: int, rho: float, seed: int) -> list[tuple[bool, str]]:
    """(has bird, background group) per sample: exactly 50/50 positives, exact bias counts."""
    bias = 1.0 - rho if split == "test_conflict" else rho
    n_pos = count // 2
    n_neg = count - n_pos
    pos_water = round(bias * n_pos)
    neg_land = round(bias * n_neg)
    plan = ([(True, "water")] * pos_water + [(True, "land")] * (n_pos - pos_water)
            + [(False, "land")] * neg_land + [(False, "water")] * (n_neg - neg_land))
    order = np.random.default_rng([seed, SPLIT_IDS[split], 1 << 20]).permutation(count)
    return [plan[i] for i in order]


def _orig_box(photo: Photo, box) -> list[float]:
    """A resized-photo box in original photo pixels (rounding is monotone, so containment survives)."""
    ox, oy = photo.offset
    x0, y0, x1, y1 = box
    return [round(ox + x0 / photo.scale, 1), round(oy + y0 / photo.scale, 1),
            round(ox + x1 / photo.scale, 1), round(oy + y1 / photo.scale, 1)]


def background_crop(rng: np.random.Generator, size: int, photo: Photo, region: str) -> tuple[np.ndarray, tuple]:
    """A random square crop of the photo's `region`, resized to the canvas: (H×W×3 float32 in [0,1], writable;
    the crop box (x0, y0, x1, y1) in resized-photo pixels)."""
    rx0, ry0, rx1, ry1 = photo.regions[region]
    side = int(rng.integers(round(CROP_RANGE[0] * size), min(round(CROP_RANGE[1] * size), rx1 - rx0, ry1 - ry0) + 1))
    cx = int(rng.integers(rx0, rx1 - side + 1))
    cy = int(rng.integers(ry0, ry1 - side + 1))
    crop = Image.fromarray(photo.pixels[cy:cy + side, cx:cx + side])
    canvas = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.array(canvas), (cx, cy, cx + side, cy + side)


def paste_distractors(rng: np.random.Generator, canvas: np.ndarray, distractors: list[Cutout],
                      max_count: int = MAX_DISTRACTORS, size_range: tuple = DISTRACTOR_RANGE) -> list[str]:
    """0..max_count unlabelled objects pasted wholly inside the canvas; returns their names."""
    size = canvas.shape[0]
    used = []
    for _ in range(int(rng.integers(0, max_count + 1))):
        item = distractors[int(rng.integers(len(distractors)))]
        pixels = _resized(item, round(rng.uniform(*size_range) * size), bool(rng.integers(2)))
        h, w = pixels.shape[:2]
        _paste(canvas, pixels, int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)))
        used.append(item.name)
    return used


def paste_objects(rng: np.random.Generator, canvas: np.ndarray, bird: Cutout | None,
                  distractors: list[Cutout]) -> tuple[np.ndarray, list | None, list[str]]:
    """The distractors, then the bird (pasted last, so nothing covers it and its mask is exact), on `canvas`:
    (uint8 mask, bird box or None, distractor names). The draws depend on the canvas size only, never on its
    pixels, so the same RNG state lays out the same objects on any background (the paired split)."""
    size = canvas.shape[0]
    used = paste_distractors(rng, canvas, distractors)
    mask = np.zeros((size, size), np.uint8)
    bird_box = None
    if bird is not None:
        flip = bool(rng.integers(2))
        pixels = _resized(bird, round(rng.uniform(*BIRD_RANGE) * size), flip)
        h, w = pixels.shape[:2]
        x = int(rng.integers(-int(BIRD_OUTSIDE * w), size - w + int(BIRD_OUTSIDE * w) + 1))
        y = int(rng.integers(-int(BIRD_OUTSIDE * h), size - h + int(BIRD_OUTSIDE * h) + 1))
        mask = bird_mask(_paste(canvas, pixels, x, y))
        bird_box = [x, y, x + w, y + h]
    return mask, bird_box, used


def compose(rng: np.random.Generator, size: int, photo: Photo, region: str, bird: Cutout | None,
            distractors: list[Cutout], objects_rng: np.random.Generator | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One composite: (RGB uint8 image, uint8 mask, metadata). The objects are laid out by `objects_rng`
    (default: `rng`, after the crop), so two calls with equal `objects_rng` states paste identical objects."""
    canvas, crop_box = background_crop(rng, size, photo, region)
    mask, bird_box, used = paste_objects(rng if objects_rng is None else objects_rng, canvas, bird, distractors)

    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    meta = {
        "labels": [0] if bird is not None else [],
        "background": photo.group,
        "background_photo": photo.name,
        "bird": bird.name if bird is not None else None,
        "bird_box": bird_box,
        "distractors": used,
        "region": region,
        "crop": _orig_box(photo, crop_box),
        "region_box": _orig_box(photo, photo.regions[region]),
    }
    return image, mask, meta


def check_build_args(name: str, size, rho, counts: dict[str, int] | None,
                     defaults: dict[str, int]) -> dict[str, int]:
    """The split counts (defaults overridden by `counts`) after checking size, ρ and the split names."""
    if not isinstance(size, int) or size < 16:
        raise DataError(f"{name} image size must be an integer >= 16, got {size!r}")
    if not 0.0 <= rho <= 1.0:
        raise DataError(f"{name} bias rho must be in [0, 1], got {rho!r}")
    counts = {**defaults, **(counts or {})}
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown {name} split(s) {sorted(unknown)} (splits: {', '.join(SPLITS)})")
    return counts


def _paired_plan(pairs: int, seed: int) -> list[bool]:
    """Has bird, per pair: exactly half the pairs (rounded down) hold a bird, in a seeded order."""
    plan = [True] * (pairs // 2) + [False] * (pairs - pairs // 2)
    order = np.random.default_rng([seed, PAIRED_STREAM, 1 << 20]).permutation(pairs)
    return [plan[i] for i in order]


def write_paired_split(out_dir: str, pairs: int, seed: int, size: int, test_birds: list[Cutout],
                       distractors: list[Cutout], photos: list[Photo], maxcount: int = 250,
                       progress: bool = True) -> SplitInfo:
    """The split `test_paired`: `pairs` pairs of composites, each pair one object layout (the same test bird
    cut-out, scale, flip and position, the same distractors in the same places; or only the distractors for a
    negative pair) pasted once on a water and once on a land photo, both cropped from their photo's test
    region (never seen in training). Samples 2i (water) and 2i + 1 (land) are pair i; their metadata carry
    `pair` (i) and `group` ("water" / "land"), and their masks are identical.

    Every draw comes from RNG streams keyed by (seed, PAIRED_STREAM, pair), apart from every other split's:
    the other splits' bytes do not depend on this one, and ρ plays no part, so data sets built with any ρ (and
    the same seed and size) hold the same pairs. Birds are taken in turn, so each test bird appears equally
    often (± 1)."""
    by_group = {g: [p for p in photos if p.group == g] for g in PAIR_GROUPS}
    positives = 0
    with ShardWriter(out_dir, PAIRED_SPLIT, maxcount) as writer:
        plan = _paired_plan(pairs, seed)
        for pair, positive in enumerate(tqdm(plan, desc=f"toy-birds {PAIRED_SPLIT}", disable=not progress)):
            rng = np.random.default_rng([seed, PAIRED_STREAM, pair])
            bird = test_birds[positives % len(test_birds)] if positive else None
            positives += int(positive)
            chosen = {g: by_group[g][int(rng.integers(len(by_group[g])))] for g in PAIR_GROUPS}
            for k, group in enumerate(PAIR_GROUPS):
                crop_rng = np.random.default_rng([seed, PAIRED_STREAM, pair, 2 + k])
                objects_rng = np.random.default_rng([seed, PAIRED_STREAM, pair, 1])  # the same for both
                image, mask, meta = compose(crop_rng, size, chosen[group], "test", bird, distractors, objects_rng)
                meta.update(pair=pair, group=group)
                writer.write(make_sample(f"{PAIRED_SPLIT}-{2 * pair + k:06d}", encode_jpeg(image, JPEG_QUALITY),
                                         meta, encode_mask_png(mask)))
        info = writer.close()
    info.has_masks = True  # also when empty
    return info


def _check_pairs(pairs) -> int:
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise DataError(f"toy-birds paired split: the number of pairs must be an integer >= 0, got {pairs!r}")
    return pairs


def build_toy_birds(
    out_dir: str,
    *,
    seed: int = 0,
    size: int = 96,
    rho: float = 0.9,
    counts: dict[str, int] | None = None,
    paired: int = DEFAULT_PAIRS,
    cache_dir: str | None = None,
    maxcount: int = 250,
    progress: bool = True,
) -> str:
    """Build toy-birds into `out_dir` (shards, then manifest.json); returns the manifest path. `paired` pairs
    (0: none) make the split `test_paired` (`write_paired_split`), written after the others and drawn from
    its own RNG streams, so the other splits are byte-identical with or without it."""
    counts = check_build_args("toy-birds", size, rho, counts, DEFAULT_COUNTS)
    _check_pairs(paired)
    share = fetch_sources(cache_dir)
    train_birds, test_birds, distractors = load_cutouts(share, size)
    photos = load_photos(share, size)
    by_group = {g: [p for p in photos if p.group == g] for g in ("water", "land")}

    splits = {}
    for split in SPLITS:
        count = counts[split]
        is_test = split.startswith("test")
        birds = test_birds if is_test else train_birds
        with ShardWriter(out_dir, split, maxcount) as writer:
            plan = _plan(split, count, rho, seed)
            for index, (positive, group) in enumerate(tqdm(plan, desc=f"toy-birds {split}", disable=not progress)):
                rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
                photo = by_group[group][int(rng.integers(len(by_group[group])))]
                bird = birds[int(rng.integers(len(birds)))] if positive else None
                image, mask, meta = compose(rng, size, photo, "test" if is_test else "train", bird, distractors)
                mask_png = encode_mask_png(mask) if split != "train" else None
                writer.write(make_sample(f"{split}-{index:06d}", encode_jpeg(image, JPEG_QUALITY), meta, mask_png))
            splits[split] = writer.close()
        if split != "train":
            splits[split].has_masks = True  # also for an empty evaluation split
    if paired:
        splits[PAIRED_SPLIT] = write_paired_split(out_dir, paired, seed, size, test_birds, distractors, photos,
                                                  maxcount, progress)
    return write_manifest(out_dir, CLASSES, splits)


def add_paired_split(out_dir: str, *, seed: int = 0, size: int | None = None, pairs: int = DEFAULT_PAIRS,
                     cache_dir: str | None = None, maxcount: int = 250, progress: bool = True) -> str:
    """Add `test_paired` to a toy-birds data set built without it (by an older builder, or with paired=0):
    its shards are written beside the others, then manifest.json is replaced in one atomic write with the
    old splits' entries unchanged. Nothing else is touched, so runs reading the data set meanwhile see either
    the old manifest or the new one. `size` defaults to the data set's own image size (read from a sample);
    the pairs are those of a full build with the same seed and size, whatever ρ the data set was built with.
    Returns the manifest URL."""
    from .loader import raw_samples

    _check_pairs(pairs)
    base = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    manifest = read_manifest(base)
    if manifest.classes != CLASSES:
        raise DataError(f"{manifest.url} has classes {manifest.classes}, not {CLASSES}: not a toy-birds data set")
    if PAIRED_SPLIT in manifest.splits:
        raise DataError(f"{manifest.url} already has split {PAIRED_SPLIT!r} "
                        f"({manifest.splits[PAIRED_SPLIT].samples} samples); nothing to add")
    first = next((info.shards[0] for info in manifest.splits.values() if info.shards), None)
    if first is None:
        raise DataError(f"{manifest.url} lists no shard to read the image size from; pass the size")
    with Image.open(io.BytesIO(next(iter(raw_samples(first)))["jpg"])) as image:
        own_size = image.size[0]
    size = own_size if size is None else size
    if size != own_size:
        raise DataError(f"{manifest.url} holds {own_size} px images; the paired split would be {size} px "
                        f"(pass size {own_size} or leave it out)")
    share = fetch_sources(cache_dir)
    _, test_birds, distractors = load_cutouts(share, size)
    folder = url_dirname(manifest.url)
    info = write_paired_split(folder, pairs, seed, size, test_birds, distractors, load_photos(share, size),
                              maxcount, progress)
    splits = {name: SplitInfo([relative_name(s, folder) for s in old.shards], old.samples, old.has_masks,
                              old.shard_samples) for name, old in manifest.splits.items()}
    return write_manifest(folder, manifest.classes, {**splits, PAIRED_SPLIT: info})
