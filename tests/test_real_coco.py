"""`wsssrec data convert coco` on a tiny COCO 2014 layout: polygons (one in two parts), an uncompressed and a
compressed RLE, a crowd region and overlapping instances give hand-made masks pixel for pixel; tags equal the
annotations; the 80-class order comes from the category ids, which are not contiguous."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
# pycocotools 2.0.11 decodes through an __array__ that numpy 2 warns about; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
from pycocotools import mask as coco_mask  # noqa: E402

from data_shards.coco import category_index, convert_coco  # noqa: E402
from data_shards.errors import DataError  # noqa: E402
from data_shards.loader import raw_samples  # noqa: E402
from data_shards.manifest import read_manifest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a few of COCO's real ids (1..90 with gaps); listed out of order in the file on purpose
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
              {"id": 2, "name": "bicycle", "supercategory": "vehicle"}]
PERSON, BICYCLE, DOG, TOOTHBRUSH = 0, 1, 2, 3  # our indices: ascending category id


def _rect(x0, y0, x1, y1) -> list[float]:
    """A polygon covering pixel columns x0..x1-1 and rows y0..y1-1 (pycocotools' rasterisation)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE written out by hand: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_coco(root):
    images = root / "val2014"
    images.mkdir()
    sizes = {101: (40, 30), 102: (32, 24), 103: (36, 28), 104: (20, 20)}  # id -> (W, H)
    docs = []
    for image_id, (w, h) in sizes.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            images / name, quality=90)
        docs.append({"id": image_id, "file_name": name, "width": w, "height": h})
    expected = {}
    # 101: a large person and a smaller dog overlapping it: the smaller instance wins the overlap
    m = np.zeros((30, 40), np.uint8)
    m[5:20, 5:25] = PERSON + 1
    m[10:25, 15:30] = DOG + 1
    m[26:29, 2:6] = DOG + 1  # the dog's second polygon part
    expected[101] = m
    anns = [{"id": 1, "image_id": 101, "category_id": 1, "iscrowd": 0, "area": 300.0,
             "segmentation": [_rect(5, 5, 25, 20)]},
            {"id": 2, "image_id": 101, "category_id": 18, "iscrowd": 0, "area": 237.0,
             "segmentation": [_rect(15, 10, 30, 25), _rect(2, 26, 6, 29)]}]
    # 102: a bicycle as uncompressed RLE, a toothbrush as compressed RLE (string counts, as in the JSON files)
    bike = np.zeros((24, 32), np.uint8)
    bike[3:12, 4:20] = 1
    brush = np.zeros((24, 32), np.uint8)
    brush[15:20, 22:30] = 1
    compressed = coco_mask.encode(np.asfortranarray(brush))
    m = np.zeros((24, 32), np.uint8)
    m[bike == 1] = BICYCLE + 1
    m[brush == 1] = TOOTHBRUSH + 1
    expected[102] = m
    anns += [{"id": 3, "image_id": 102, "category_id": 2, "iscrowd": 0, "area": float(bike.sum()),
              "segmentation": _uncompressed_rle(bike)},
             {"id": 4, "image_id": 102, "category_id": 90, "iscrowd": 0, "area": float(brush.sum()),
              "segmentation": {"size": [24, 32], "counts": compressed["counts"].decode("ascii")}}]
    # 103: a crowd of people (uncompressed RLE, as COCO stores crowds) with one person in front of it:
    # the person keeps its pixels, the rest of the crowd is ignore
    crowd = np.zeros((28, 36), np.uint8)
    crowd[2:20, 2:34] = 1
    m = np.zeros((28, 36), np.uint8)
    m[crowd == 1] = 255
    m[8:26, 10:16] = PERSON + 1
    expected[103] = m
    anns += [{"id": 5, "image_id": 103, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
              "segmentation": _uncompressed_rle(crowd)},
             {"id": 6, "image_id": 103, "category_id": 1, "iscrowd": 0, "area": 108.0,
              "segmentation": [_rect(10, 8, 16, 26)]}]
    # 104: no annotation at all (left out, as the WSSS lists leave such images out)
    path = root / "instances_val2014.json"
    path.write_text(json.dumps({"images": docs, "annotations": anns, "categories": CATEGORIES}))
    return path, images, expected


def test_category_order_and_ids():
    names, index = category_index(CATEGORIES)
    assert names == ["person", "bicycle", "dog", "toothbrush"]
    assert index == {1: 0, 2: 1, 18: 2, 90: 3}


def test_val_masks_equal_hand_made_ones(tmp_path):
    annotations, images, expected = make_coco(tmp_path)
    manifest = read_manifest(convert_coco(str(annotations), str(images), str(tmp_path / "out"), "val"))
    assert manifest.classes == ["person", "bicycle", "dog", "toothbrush"]
    assert manifest.split("val").samples == 3 and manifest.split("val").has_masks
    raws = raw_samples(manifest.split("val").shards[0])
    assert [r["__key__"] for r in raws] == ["val-000000000101", "val-000000000102", "val-000000000103"]
    assert [json.loads(r["json"])["labels"] for r in raws] == [[PERSON, DOG], [BICYCLE, TOOTHBRUSH], [PERSON]]
    for raw, image_id in zip(raws, (101, 102, 103)):
        got = np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
        assert np.array_equal(got, expected[image_id]), image_id
        assert raw["jpg"] == (images / f"COCO_val2014_{image_id:012d}.jpg").read_bytes()


def test_train_split_has_tags_only_and_errors(tmp_path):
    annotations, images, _ = make_coco(tmp_path)
    manifest = read_manifest(convert_coco(str(annotations), str(images), str(tmp_path / "out"), "train",
                                          keep_empty=True))
    raws = raw_samples(manifest.split("train").shards[0])
    assert len(raws) == 4 and all("mask.png" not in r for r in raws)
    assert json.loads(raws[3]["json"])["labels"] == []

    (images / "COCO_val2014_000000000102.jpg").unlink()
    with pytest.raises(DataError, match=r"COCO image 102 .* has no file: .*COCO_val2014_000000000102.jpg does not"):
        convert_coco(str(annotations), str(images), str(tmp_path / "o1"), "val")
    with pytest.raises(DataError, match=r"COCO annotations .*nope.json do not exist"):
        convert_coco(str(tmp_path / "nope.json"), str(images), str(tmp_path / "o2"), "val")
    doc = json.loads(annotations.read_text())
    doc["annotations"][0]["category_id"] = 7
    annotations.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotation 1 has category id 7, not among the file's categories"):
        convert_coco(str(annotations), str(images), str(tmp_path / "o3"), "val")


def test_cli_convert_coco(tmp_path):
    annotations, images, _ = make_coco(tmp_path)
    result = subprocess.run([sys.executable, "-m", "data_shards", "data", "convert", "coco", "--annotations",
                             str(annotations), "--images", str(images), "--out", str(tmp_path / "out"), "--split",
                             "val"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "classes (4): person, bicycle, dog, toothbrush" in result.stdout
