"""`python -m data_shards data ...` end to end in a subprocess."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from data_shards.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_shards", "data", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_ls_shows_classes_splits_and_sizes(toy_dataset):
    result = _cli("ls", os.path.dirname(toy_dataset))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "classes (1): bird" in lines
    assert any(line.split()[:3] == ["train", "96", "samples"] for line in lines)
    assert any(line.split()[:3] == ["test_conflict", "32", "samples"] for line in lines)
    total_bytes = sum(os.path.getsize(s) for info in read_manifest(toy_dataset).splits.values() for s in info.shards)
    assert lines[-1] == f"total 192 samples, {total_bytes} bytes"


def test_toy_birds_command_is_deterministic(tmp_path, toy_dataset):
    args = ["toy-birds", "--seed", "0", "--size", "64", "--train", "96", "--val", "32", "--test", "32",
            "--maxcount", "32", "--paired", "0"]
    result = _cli(*args, "--out", str(tmp_path / "toy"))
    assert result.returncode == 0, result.stderr
    assert f"wrote toy-birds to {tmp_path / 'toy' / 'manifest.json'}" in result.stdout
    for name in os.listdir(os.path.dirname(toy_dataset)):  # same bytes as the fixture's API build
        assert (tmp_path / "toy" / name).read_bytes() == open(os.path.join(os.path.dirname(toy_dataset), name), "rb").read()


def test_convert_folder_command_and_errors(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(images / f"im{i}.jpg")
    (tmp_path / "tags.csv").write_text("image,labels\nim0.jpg,cat\nim1.jpg,dog;cat\nim2.jpg,\n")
    result = _cli("convert", "folder", "--images", str(images), "--tags", str(tmp_path / "tags.csv"),
                  "--out", str(tmp_path / "out"), "--split", "train", "--classes", "dog,cat")
    assert result.returncode == 0, result.stderr
    assert "wrote split 'train'" in result.stdout and "classes (2): dog, cat" in result.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["samples"] == 3

    result = _cli("convert", "folder", "--images", str(images), "--tags", str(tmp_path / "tags.csv"),
                  "--out", str(tmp_path / "bad"), "--split", "train", "--classes", "dog")
    assert result.returncode == 2
    assert "unknown class 'cat' (classes: dog)" in result.stderr and "Traceback" not in result.stderr

    result = _cli("ls", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no manifest.json in" in result.stderr
