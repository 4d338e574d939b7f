"""Converters from user data to our shards: an image folder with a tags CSV, and PASCAL VOC 2012 (COCO: coco.py).

Both write the same format as toy-birds (jpg, json with "labels", mask.png for evaluation splits) and
add their splits to the folder's manifest, which is written after the shards.
"""
from __future__ import annotations

import csv
import os
import re
from xml.etree import ElementTree
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .manifest import MANIFEST_NAME, SplitInfo, join_url, read_manifest, relative_name, url_exists, write_manifest
from .writer import ShardWriter, encode_jpeg, encode_mask_png, make_sample

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def jpeg_bytes(path: str) -> tuple[bytes, tuple[int, int]]:
    """The file's own bytes when it is an RGB JPEG (no re-compression), else an RGB re-encode."""
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "JPEG" and image.mode == "RGB":
                with open(path, "rb") as f:
                    return f.read(), size
            return encode_jpeg(image.convert("RGB"), quality=95), size
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except OSError as exn:
        raise DataError(f"image {path} cannot be read as an image ({exn})") from None


def _mask_array(path: str, num_classes: int, image_size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P"):
                raise DataError(f"mask {path} has mode {mask.mode}; expected an 8-bit L or palette PNG")
            values = np.asarray(mask)
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist (expected one PNG per image, same stem)") from None
    except OSError as exn:
        raise DataError(f"mask {path} cannot be read ({exn})") from None
    if values.shape[::-1] != tuple(image_size):
        raise DataError(f"mask {path} is {values.shape[1]}x{values.shape[0]}, its image is "
                        f"{image_size[0]}x{image_size[1]}")
    bad = sorted(set(np.unique(values).tolist()) - set(range(num_classes + 1)) - {255})
    if bad:
        raise DataError(f"mask {path} has values {bad[:5]}; expected 0 (background), 1..{num_classes} "
                        f"(class + 1) or 255 (ignore)")
    return values


def write_split(out_dir: str, split: str, samples: Iterable[dict], total: int, maxcount: int) -> SplitInfo:
    with ShardWriter(out_dir, split, maxcount) as writer:
        for sample in tqdm(samples, total=total, desc=f"convert {split}"):
            writer.write(sample)
        return writer.close()


def existing_splits(out_dir: str, classes: list[str]) -> dict[str, SplitInfo]:
    """Splits already in `out_dir` (checked before writing anything: the classes must match)."""
    if not url_exists(join_url(out_dir, MANIFEST_NAME)):
        return {}
    manifest = read_manifest(out_dir)
    if manifest.classes != classes:
        raise DataError(f"{manifest.url} has classes {manifest.classes}, the new split has {classes}; "
                        f"use another --out or pass --classes {','.join(manifest.classes)}")
    return {name: SplitInfo([relative_name(s, out_dir) for s in info.shards], info.samples, info.has_masks,
                            info.shard_samples)
            for name, info in manifest.splits.items()}


def read_tags_csv(path: str, classes: list[str] | None = None) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Rows (image name, class names) of a tags CSV with columns image,labels; and the class list
    (given, or the sorted union of all labels)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
                raise DataError(f"tags CSV {path} has columns {reader.fieldnames}; expected a header "
                                f"with 'image' and 'labels'")
            rows = [(row["image"].strip(), [t for t in re.split(r"[;\s]+", row["labels"] or "") if t])
                    for row in reader]
    except FileNotFoundError:
        raise DataError(f"tags CSV {path} does not exist") from None
    if classes is None:
        classes = sorted({name for _, names in rows for name in names})
    known = set(classes)
    for line, (image, names) in enumerate(rows, start=2):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"tags CSV {path} line {line} ({image}): unknown class {unknown[0]!r} "
                            f"(classes: {', '.join(classes)})")
    return rows, classes


def convert_folder(images_dir: str, tags_csv: str, out_dir: str, split: str, *, masks_dir: str | None = None,
                   classes: list[str] | None = None, maxcount: int = 1000) -> str:
    """Image folder + tags CSV (+ optional masks folder, same stem .png) -> one split; returns the manifest."""
    if not os.path.isdir(images_dir):
        raise DataError(f"image folder {images_dir} does not exist")
    if masks_dir is not None and not os.path.isdir(masks_dir):
        raise DataError(f"mask folder {masks_dir} does not exist")
    if classes is None and url_exists(join_url(out_dir, MANIFEST_NAME)):
        classes = read_manifest(out_dir).classes  # adding a split to an existing data set
    rows, classes = read_tags_csv(tags_csv, classes)
    existing = existing_splits(out_dir, classes)
    index = {name: i for i, name in enumerate(classes)}

    def samples() -> Iterator[dict]:
        for number, (image_name, names) in enumerate(rows):
            jpg, size = jpeg_bytes(os.path.join(images_dir, image_name))
            meta = {"labels": sorted({index[n] for n in names}), "source": image_name}
            mask_png = None
            if masks_dir is not None:
                stem = os.path.splitext(image_name)[0]
                mask_png = encode_mask_png(_mask_array(os.path.join(masks_dir, stem + ".png"), len(classes), size))
            yield make_sample(f"{split}-{number:06d}", jpg, meta, mask_png)

    info = write_split(out_dir, split, samples(), len(rows), maxcount)
    return write_manifest(out_dir, classes, {**existing, split: info})


def _voc_dir(root: str) -> str:
    for candidate in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise DataError(f"{root} is not a PASCAL VOC 2012 folder (expected JPEGImages/, ImageSets/Segmentation/ "
                    f"and SegmentationClass/ in it or in VOC2012/ below it)")


def _read_ids(path: str) -> list[str]:
    """Image ids of a VOC list file, one per line (a second column, as in ImageSets/Main, is ignored)."""
    try:
        with open(path) as f:
            return [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"VOC image list {path} does not exist") from None


def voc_xml_tags(path: str) -> list[int]:
    """Class indices named by the `<object><name>` entries of one VOC annotation XML (every object, also
    `difficult` and `truncated` ones, as IRN's `load_image_label_from_xml` reads them for train_aug)."""
    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"VOC annotation {path} does not exist (expected one XML per listed image id)") from None
    except ElementTree.ParseError as exn:
        raise DataError(f"VOC annotation {path} is not valid XML ({exn})") from None
    names = [(obj.findtext("name") or "").strip() for obj in root.findall("object")]
    unknown = sorted({n for n in names if n not in VOC_CLASSES})
    if unknown:
        raise DataError(f"VOC annotation {path} names unknown class {unknown[0]!r} (expected one of the 20 VOC "
                        f"classes)")
    return sorted({VOC_CLASSES.index(n) for n in names})


def _voc_samples(voc: str, split: str, ids: list[str], list_path: str, *, tags: str,
                 masks_dir: str | None) -> Iterator[dict]:
    for image_id in ids:
        image_path = os.path.join(voc, "JPEGImages", image_id + ".jpg")
        if not os.path.isfile(image_path):
            raise DataError(f"image id {image_id!r} of {list_path} has no JPEG: {image_path} does not exist")
        jpg, size = jpeg_bytes(image_path)
        mask = None
        if masks_dir is not None:
            mask = _mask_array(os.path.join(masks_dir, image_id + ".png"), len(VOC_CLASSES), size)
        if tags == "annotations":
            labels = voc_xml_tags(os.path.join(voc, "Annotations", image_id + ".xml"))
        else:
            labels = sorted(int(v) - 1 for v in np.unique(mask) if 0 < v < 255)
        mask_png = encode_mask_png(mask) if mask is not None else None
        yield make_sample(f"{split}-{image_id}", jpg, {"labels": labels, "source": image_id}, mask_png)


def convert_voc(root: str, out_dir: str, *, maxcount: int = 1000, splits: tuple[str, ...] = ("train", "val"),
                train_list: str | None = None) -> str:
    """PASCAL VOC 2012 -> splits `train` (tags; no masks unless SegmentationClassAug/ holds them) and `val`
    (tags and SegmentationClass masks). JPEGs are stored byte for byte at their own size.

    Without `train_list`: VOC's own ImageSets/Segmentation lists, tags from the SegmentationClass masks.
    With `train_list` (e.g. train_aug.txt, 10,582 ids; a path, or a name in ImageSets/Segmentation/), as
    WSSS papers train: tags of every split from Annotations/<id>.xml; the train split stores masks from
    SegmentationClassAug/ when that folder exists (for scoring pseudo-labels; training never reads them).
    Mask values (0..20, 255 border) already match our encoding."""
    voc = _voc_dir(root)
    infos = existing_splits(out_dir, VOC_CLASSES)
    tags = "annotations" if train_list else "masks"
    aug = os.path.join(voc, "SegmentationClassAug")
    for split in splits:
        list_path = os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt")
        if split == "train" and train_list:
            list_path = train_list if os.path.isfile(train_list) else os.path.join(voc, "ImageSets", "Segmentation",
                                                                                   train_list)
        ids = _read_ids(list_path)
        if split == "train" and train_list:
            masks_dir = aug if os.path.isdir(aug) else None
        else:
            masks_dir = os.path.join(voc, "SegmentationClass")
        samples = _voc_samples(voc, split, ids, list_path, tags=tags, masks_dir=masks_dir)
        if split == "train" and not train_list:  # the old layout: train tags come from masks, none stored
            samples = ({k: v for k, v in sample.items() if k != "mask.png"} for sample in samples)
        infos[split] = write_split(out_dir, split, samples, len(ids), maxcount)
    return write_manifest(out_dir, VOC_CLASSES, infos)
