"""`wsssrec data convert voc --train-list train_aug.txt` on a tiny VOCdevkit in the exact layout: tags from
Annotations XML, masks from SegmentationClass(Aug) palette PNGs equal to hand-made ones, JPEGs byte for byte."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_shards.convert import VOC_CLASSES, convert_voc
from data_shards.errors import DataError
from data_shards.loader import raw_samples
from data_shards.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSON, DOG, CAT, CHAIR, BOTTLE = (VOC_CLASSES.index(n) for n in ("person", "dog", "cat", "chair", "bottle"))


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (the devkit's `labelcolormap`: bits of the index spread over R, G, B)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _save_palette_png(mask: np.ndarray, path) -> None:
    png = Image.fromarray(mask, mode="P")
    png.putpalette(voc_palette())
    png.save(path)


def _xml(objects: list[tuple[str, int]]) -> str:
    # a person's layout parts have a <name> too (head, hand): they are not objects and must not become tags
    part = "<part><name>head</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></part>"
    body = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
                   f"<ymax>9</ymax></bndbox>{part if name == 'person' else ''}</object>"
                   for name, difficult in objects)
    return f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>{body}</annotation>"


# id -> (image size W x H, XML objects, hand-made mask or None when the id has no mask in that folder)
def _expected_masks():
    a = np.zeros((30, 40), np.uint8)
    a[5:20, 5:25] = PERSON + 1
    a[4, 5:25] = 255  # VOC's object border
    b = np.zeros((24, 36), np.uint8)
    b[2:22, 10:30] = DOG + 1
    b[10:14, 0:4] = CAT + 1
    c = np.zeros((20, 28), np.uint8)
    c[3:9, 3:9] = CHAIR + 1
    return {"2007_000032": a, "2008_000123": b, "2011_003276": c}


IMAGES = {"2007_000032": (40, 30), "2008_000123": (36, 24), "2011_003276": (28, 20), "2009_000500": (32, 32)}
XML = {"2007_000032": [("person", 0), ("bottle", 1)],  # a difficult bottle too small for the mask: still a tag
       "2008_000123": [("dog", 0), ("cat", 0), ("dog", 0)],
       "2011_003276": [("chair", 0)], "2009_000500": [("person", 0), ("dog", 1)]}


def make_vocdevkit(root) -> str:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass", "SegmentationClassAug"):
        (voc / sub).mkdir(parents=True)
    for n, (image_id, (w, h)) in enumerate(IMAGES.items()):
        pixels = np.random.default_rng(n).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=85)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(XML[image_id]))
    masks = _expected_masks()
    # SegmentationClass: the official 2,913 (here: the val image and one train image)
    _save_palette_png(masks["2007_000032"], voc / "SegmentationClass" / "2007_000032.png")
    _save_palette_png(masks["2011_003276"], voc / "SegmentationClass" / "2011_003276.png")
    # SegmentationClassAug: every train_aug image (SBD's masks for the extra ones)
    for image_id in ("2007_000032", "2008_000123"):
        _save_palette_png(masks[image_id], voc / "SegmentationClassAug" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2011_003276\n")
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("2007_000032\n2008_000123\n")
    return voc


def _decoded(raw: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw["mask.png"])))


def test_train_aug_tags_from_xml_masks_from_aug_and_val(tmp_path):
    voc = make_vocdevkit(tmp_path)
    path = convert_voc(str(tmp_path / "VOCdevkit"), str(tmp_path / "out"), train_list="train_aug.txt")
    manifest = read_manifest(path)
    assert manifest.classes == VOC_CLASSES
    assert {n: (i.samples, i.has_masks) for n, i in manifest.splits.items()} == {"train": (2, True), "val": (1, True)}
    train = raw_samples(manifest.split("train").shards[0])
    assert [r["__key__"] for r in train] == ["train-2007_000032", "train-2008_000123"]
    assert [json.loads(r["json"])["labels"] for r in train] == [[BOTTLE, PERSON], [CAT, DOG]]
    expected = _expected_masks()
    for raw, image_id in zip(train, ("2007_000032", "2008_000123")):
        assert np.array_equal(_decoded(raw), expected[image_id])
        assert raw["jpg"] == (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()  # byte for byte, own size
    (val,) = raw_samples(manifest.split("val").shards[0])
    assert json.loads(val["json"]) == {"labels": [CHAIR], "source": "2011_003276"}
    assert np.array_equal(_decoded(val), expected["2011_003276"])
    assert Image.open(io.BytesIO(val["jpg"])).size == (28, 20)


def test_train_aug_without_aug_masks_and_clear_errors(tmp_path):
    voc = make_vocdevkit(tmp_path)
    out = tmp_path / "out"
    list_path = tmp_path / "my_list.txt"
    list_path.write_text("2008_000123\n2009_000500\n")
    (voc / "SegmentationClassAug").rename(voc / "SegmentationClassAug.off")
    manifest = read_manifest(convert_voc(str(voc), str(out), train_list=str(list_path)))
    assert manifest.split("train").has_masks is False
    assert [json.loads(r["json"])["labels"] for r in raw_samples(manifest.split("train").shards[0])] == [
        [CAT, DOG], [DOG, PERSON]]
    (voc / "SegmentationClassAug.off").rename(voc / "SegmentationClassAug")

    with pytest.raises(DataError, match=r"SegmentationClassAug/2009_000500.png does not exist"):
        convert_voc(str(voc), str(tmp_path / "o1"), train_list=str(list_path))
    list_path.write_text("2007_000032\n2010_999999\n")
    with pytest.raises(DataError, match=r"image id '2010_999999' of .*my_list.txt has no JPEG: .*JPEGImages/"
                                        r"2010_999999.jpg does not exist"):
        convert_voc(str(voc), str(tmp_path / "o2"), train_list=str(list_path))
    (voc / "Annotations" / "2008_000123.xml").unlink()
    with pytest.raises(DataError, match=r"VOC annotation .*Annotations/2008_000123.xml does not exist"):
        convert_voc(str(voc), str(tmp_path / "o3"), train_list="train_aug.txt")
    (voc / "Annotations" / "2008_000123.xml").write_text(_xml([("unicorn", 0)]))
    with pytest.raises(DataError, match=r"2008_000123.xml names unknown class 'unicorn'"):
        convert_voc(str(voc), str(tmp_path / "o4"), train_list="train_aug.txt")
    with pytest.raises(DataError, match=r"VOC image list .*nope.txt does not exist"):
        convert_voc(str(voc), str(tmp_path / "o5"), train_list="nope.txt")
    for folder in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / folder / "manifest.json").exists()


def test_cli_convert_voc_train_list(tmp_path):
    make_vocdevkit(tmp_path)
    result = subprocess.run([sys.executable, "-m", "data_shards", "data", "convert", "voc", "--root",
                             str(tmp_path / "VOCdevkit"), "--out", str(tmp_path / "out"), "--train-list",
                             "train_aug.txt"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:2] == ["train", "2"] for line in result.stdout.splitlines())
