"""MS COCO 2014 -> our shards: image tags from the instance annotations, and for evaluation splits semantic
masks built from the instances (polygons and RLEs decoded by pycocotools), crowd regions marked ignore."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from .convert import existing_splits, jpeg_bytes, write_split
from .errors import DataError
from .manifest import write_manifest
from .writer import encode_mask_png, make_sample

IGNORE = 255


def _mask_api():
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError("wsssrec data convert coco needs pycocotools (pip install 'wsssrec[coco]')") from None
    return mask


def read_instances(path: str) -> dict:
    """The instances JSON, checked for what the converter uses (images, annotations, categories)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"COCO annotations {path} do not exist (expected e.g. annotations/instances_val2014.json)"
                        ) from None
    except json.JSONDecodeError as exn:
        raise DataError(f"COCO annotations {path} are not valid JSON ({exn})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in doc]
    if missing:
        raise DataError(f"COCO annotations {path} have no {', '.join(missing)} (expected an instances_*.json)")
    return doc


def category_index(categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """Class names in COCO's order (ascending category id: person, bicycle, car, ...) and the map from the
    non-contiguous category ids (1..90, 80 used) to our class indices 0..79."""
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    return [c["name"] for c in ordered], {int(c["id"]): i for i, c in enumerate(ordered)}


def instance_mask(segmentation, height: int, width: int) -> np.ndarray:
    """H x W uint8 0/1 mask of one instance: polygons, uncompressed RLE (counts a list) or compressed RLE."""
    api = _mask_api()
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = api.merge(api.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = api.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return api.decode(rle)


def semantic_mask(annotations: list[dict], height: int, width: int, index: dict[int, int]) -> np.ndarray:
    """H x W uint8 mask: 0 background, class + 1, 255 ignore.

    Overlaps: the smaller instance (by its `area`) wins, ties in file order. This is the rule of coco2voc
    (github.com/alicranck/coco2voc, `annsToMask` sorts by area, `annsToSeg` keeps the first label a pixel
    gets), whose masks the COCO WSSS code bases point to (SEAM, 1-stage-wseg, ToCo). Crowd regions
    (iscrowd 1) become 255 where no single instance claims the pixel; coco2voc paints them with their class,
    we ignore them as COCO's own evaluation does."""
    out = np.zeros((height, width), np.uint8)
    claimed = np.zeros((height, width), bool)
    for ann in sorted((a for a in annotations if not a.get("iscrowd")), key=lambda a: float(a["area"])):
        pixels = instance_mask(ann["segmentation"], height, width).astype(bool) & ~claimed
        out[pixels] = index[int(ann["category_id"])] + 1
        claimed |= pixels
    for ann in annotations:
        if ann.get("iscrowd"):
            pixels = instance_mask(ann["segmentation"], height, width).astype(bool) & ~claimed
            out[pixels] = IGNORE
    return out


def convert_coco(annotations: str, images_dir: str, out_dir: str, split: str, *, with_masks: bool | None = None,
                 keep_empty: bool = False, maxcount: int = 1000, limit: int | None = None) -> str:
    """One COCO split (e.g. instances_train2014.json + train2014/ -> `train`, instances_val2014.json +
    val2014/ -> `val`). Tags: every category annotated in the image (crowd ones too). Masks: by default for
    every split but `train` (with_masks overrides). Images without any annotation are left out unless
    `keep_empty` (the WSSS lists have 82,081 train and 40,137 val images). JPEGs are stored byte for byte;
    keys are `{split}-{image id:012d}`. `limit` converts the first N images only (smoke runs)."""
    if not os.path.isdir(images_dir):
        raise DataError(f"COCO image folder {images_dir} does not exist (expected e.g. train2014/)")
    doc = read_instances(annotations)
    classes, index = category_index(doc["categories"])
    with_masks = split != "train" if with_masks is None else with_masks
    if with_masks:
        _mask_api()  # fail before writing anything
    by_image: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        if int(ann["category_id"]) not in index:
            raise DataError(f"COCO annotations {annotations}: annotation {ann.get('id')} has category id "
                            f"{ann['category_id']}, not among the file's categories")
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = sorted(doc["images"], key=lambda im: int(im["id"]))
    if not keep_empty:
        images = [im for im in images if int(im["id"]) in by_image]
    images = images[:limit] if limit is not None else images
    existing = existing_splits(out_dir, classes)

    def samples() -> Iterator[dict]:
        for image in images:
            image_id = int(image["id"])
            path = os.path.join(images_dir, image["file_name"])
            if not os.path.isfile(path):
                raise DataError(f"COCO image {image_id} ({annotations}) has no file: {path} does not exist")
            jpg, size = jpeg_bytes(path)
            if size != (int(image["width"]), int(image["height"])):
                raise DataError(f"COCO image {path} is {size[0]}x{size[1]}, its annotation says "
                                f"{image['width']}x{image['height']}")
            anns = by_image.get(image_id, [])
            meta = {"labels": sorted({index[int(a["category_id"])] for a in anns}), "source": image["file_name"]}
            mask = encode_mask_png(semantic_mask(anns, size[1], size[0], index)) if with_masks else None
            yield make_sample(f"{split}-{image_id:012d}", jpg, meta, mask)

    info = write_split(out_dir, split, samples(), len(images), maxcount)
    return write_manifest(out_dir, classes, {**existing, split: info})
