"""Converters: an image folder + tags CSV, and a tiny PASCAL VOC 2012 tree, both read back by the loader."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_shards.convert import VOC_CLASSES, convert_folder, convert_voc
from data_shards.errors import DataError
from data_shards.loader import LoaderOptions, ShardDataset, raw_samples
from data_shards.manifest import read_manifest


def _photo(path, seed, size=(40, 30), fmt=None):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def folder_data(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rows = [("a.jpg", "cat;dog"), ("b.png", "dog"), ("c.jpg", ""), ("d.jpg", "cat dog")]
    for i, (name, _) in enumerate(rows):
        _photo(images / name, i)
        mask = np.zeros((30, 40), np.uint8)
        mask[:10, :10] = 1
        mask[20:, 30:] = 2
        mask[15, :] = 255
        Image.fromarray(mask, mode="L").save(masks / (name.rsplit(".", 1)[0] + ".png"))
    tags = tmp_path / "tags.csv"
    tags.write_text("image,labels\n" + "".join(f"{n},{t}\n" for n, t in rows))
    return tmp_path, images, masks, tags


def test_folder_with_csv_and_masks(folder_data):
    root, images, masks, tags = folder_data
    out = root / "shards"
    path = convert_folder(str(images), str(tags), str(out), "train", maxcount=3)
    path = convert_folder(str(images), str(tags), str(out), "val", masks_dir=str(masks))
    manifest = read_manifest(path)
    assert manifest.classes == ["cat", "dog"]  # sorted union of the CSV's labels
    assert {n: (i.samples, len(i.shards), i.has_masks) for n, i in manifest.splits.items()} == {
        "train": (4, 2, False), "val": (4, 1, True)}

    raw = raw_samples(manifest.split("val").shards[0])
    assert [json.loads(r["json"]) for r in raw] == [
        {"labels": [0, 1], "source": "a.jpg"}, {"labels": [1], "source": "b.png"},
        {"labels": [], "source": "c.jpg"}, {"labels": [0, 1], "source": "d.jpg"}]
    assert raw[0]["jpg"] == (images / "a.jpg").read_bytes()  # JPEGs are stored as they are
    assert Image.open(io.BytesIO(raw[1]["jpg"])).format == "JPEG"  # the PNG is re-encoded
    assert all("mask.png" not in r for r in raw_samples(manifest.split("train").shards[0]))

    batch = next(iter(ShardDataset(path, "val", LoaderOptions(image_size=40, batch_size=4, train=False))))
    assert batch["labels"].tolist() == [[1, 1], [0, 1], [0, 0], [1, 1]]
    mask = batch["mask"][0]
    assert set(mask.unique().tolist()) == {0, 1, 2, 255}
    assert mask[0, 0] == 1 and mask[-1, -1] == 2


def test_folder_with_explicit_classes_and_errors(folder_data):
    root, images, masks, tags = folder_data
    path = convert_folder(str(images), str(tags), str(root / "out"), "train", classes=["dog", "cat", "bird"])
    manifest = read_manifest(path)
    assert manifest.classes == ["dog", "cat", "bird"]
    assert json.loads(raw_samples(manifest.split("train").shards[0])[0]["json"])["labels"] == [0, 1]

    with pytest.raises(DataError, match=r"tags.csv line 2 \(a.jpg\): unknown class 'cat' \(classes: dog\)"):
        convert_folder(str(images), str(tags), str(root / "x"), "train", classes=["dog"])
    with pytest.raises(DataError, match=r"image folder .*nope does not exist"):
        convert_folder(str(root / "nope"), str(tags), str(root / "x"), "train")
    with pytest.raises(DataError, match=r"tags CSV .*missing.csv does not exist"):
        convert_folder(str(images), str(root / "missing.csv"), str(root / "x"), "train")
    bad_header = root / "bad.csv"
    bad_header.write_text("file,tags\na.jpg,cat\n")
    with pytest.raises(DataError, match=r"bad.csv has columns \['file', 'tags'\]; expected .*'image' and 'labels'"):
        convert_folder(str(images), str(bad_header), str(root / "x"), "train")
    (images / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"image .*images/c.jpg does not exist"):
        convert_folder(str(images), str(tags), str(root / "y"), "train")
    _photo(images / "c.jpg", 2)
    (masks / "d.png").unlink()
    with pytest.raises(DataError, match=r"mask .*masks/d.png does not exist"):
        convert_folder(str(images), str(tags), str(root / "z"), "val", masks_dir=str(masks))
    # a failed conversion leaves neither a manifest nor a half-written shard behind
    assert sorted(p.name for p in (root / "z").iterdir()) == []
    with pytest.raises(DataError, match=r"has classes \['dog', 'cat', 'bird'\], the new split has \['cat', 'dog'\]"):
        convert_folder(str(images), str(tags), str(root / "out"), "val", classes=["cat", "dog"])
    assert not (root / "out" / "val-00000.tar").exists()  # checked before writing


def _voc_tree(root):
    """A 3-image VOC 2012 layout with palette masks (values 0..20, 255 border)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "ImageSets/Segmentation", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    palette = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]
    contents = {"2007_000001": [15, 12], "2007_000002": [3], "2008_000003": [20, 1, 15]}
    for n, (image_id, values) in enumerate(contents.items()):
        _photo(voc / "JPEGImages" / f"{image_id}.jpg", n, size=(36, 24))
        mask = np.zeros((24, 36), np.uint8)
        for j, v in enumerate(values):
            mask[4:20, 2 + 10 * j:10 + 10 * j] = v
        mask[0, :] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2008_000003\n")
    return voc, contents


def test_voc_tree(tmp_path):
    voc, contents = _voc_tree(tmp_path)
    path = convert_voc(str(tmp_path / "VOCdevkit"), str(tmp_path / "out"))
    manifest = read_manifest(path)
    assert manifest.classes == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert manifest.classes[14] == "person"
    assert {n: (i.samples, i.has_masks) for n, i in manifest.splits.items()} == {"train": (2, False), "val": (1, True)}
    train = raw_samples(manifest.split("train").shards[0])
    assert [json.loads(r["json"])["labels"] for r in train] == [[11, 14], [2]]
    assert all("mask.png" not in r for r in train)
    (val,) = raw_samples(manifest.split("val").shards[0])
    assert json.loads(val["json"]) == {"labels": [0, 14, 19], "source": "2008_000003"}
    stored = np.asarray(Image.open(io.BytesIO(val["mask.png"])))
    original = np.asarray(Image.open(voc / "SegmentationClass" / "2008_000003.png"))
    assert (stored == original).all()  # VOC indices are our mask values

    batch = next(iter(ShardDataset(path, "val", LoaderOptions(image_size=24, batch_size=2, train=False))))
    assert batch["labels"][0].nonzero().flatten().tolist() == [0, 14, 19]
    assert set(batch["mask"].unique().tolist()) == {0, 1, 15, 20, 255}


def test_voc_errors(tmp_path):
    with pytest.raises(DataError, match=r"is not a PASCAL VOC 2012 folder \(expected JPEGImages/"):
        convert_voc(str(tmp_path), str(tmp_path / "out"))
    voc, _ = _voc_tree(tmp_path)
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match=r"VOC image list .*Segmentation/val.txt does not exist"):
        convert_voc(str(voc), str(tmp_path / "out"))
    (voc / "ImageSets/Segmentation/val.txt").write_text("2008_000003\n")
    bad = np.full((24, 36), 40, np.uint8)
    Image.fromarray(bad, mode="L").save(voc / "SegmentationClass" / "2008_000003.png")
    with pytest.raises(DataError, match=r"2008_000003.png has values \[40\]; expected 0 \(background\), 1..20"):
        convert_voc(str(voc), str(tmp_path / "out"))
