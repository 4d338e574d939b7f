"""The smaller items of issue 21 (item 6): `data upload` with a relative source, `data ls` with missing shards,
`predict` past an unreadable image, g found beside a segmenter.pt (or `--classifier`), a one-process world
listening on loopback only, and the image's pins."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_reliability_errors import _jpeg, tiny_segmenter

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _dataset(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "train-000000.tar").write_bytes(b"shard bytes")
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "classes": ["bird"], "splits": {
        "train": {"shards": ["train-000000.tar"], "samples": 4}}}))


def test_upload_of_a_relative_source_does_not_nest_its_path(tmp_path, monkeypatch):
    from data_shards.cli import main

    _dataset(tmp_path / "data" / "toy-birds")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "upload", "data/toy-birds", str(tmp_path / "bucket" / "p")]) == 0
    assert sorted(os.listdir(tmp_path / "bucket" / "p")) == ["manifest.json", "train-000000.tar"]
    assert json.loads((tmp_path / "bucket" / "p" / "manifest.json").read_text())["splits"]["train"]["shards"] == \
        ["train-000000.tar"]


def test_ls_exits_non_zero_when_shards_are_missing(tmp_path):
    _dataset(tmp_path / "ds")
    (tmp_path / "ds" / "train-000000.tar").unlink()
    proc = subprocess.run([sys.executable, "-m", "trainer", "data", "ls", str(tmp_path / "ds")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "MISSING 1 shard(s)" in proc.stdout
    assert "lists 1 shard(s) that do not exist" in proc.stderr


def _predict(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "predict", *args], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_predict_goes_on_past_an_unreadable_image(tmp_path):
    model = tiny_segmenter(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg(100))
    (images / "b.jpg").write_bytes(b"not a jpeg at all")
    (images / "c.png").write_bytes(_jpeg(200))
    proc = _predict(tmp_path, "--model", str(model), "--images", str(images), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"skipped {images / 'b.jpg'}" in proc.stderr
    assert f"1 of 3 images could not be read and have no mask: {images / 'b.jpg'}" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "c.png"]
    assert "Traceback" not in proc.stderr


def test_predict_finds_g_beside_the_segmenter_or_takes_classifier(tmp_path):
    import torch

    from trainer.config import load_config
    from trainer.effnet import EfficientNetLite0
    from trainer.models import Segmenter
    from trainer.weights import save_segmenter

    # a run folder made elsewhere: its config names g relative to another working directory
    run = tmp_path / "runs" / "X"
    run.mkdir(parents=True)
    cfg = load_config(str(REPO / "configs" / "toy_birds.yaml"),
                      ["data.image_size=64", "eval.gate_threshold=0.5", "train.out_dir=runs", "train.run_name=X"])
    torch.manual_seed(0)
    g = EfficientNetLite0(num_classes=1)
    save_segmenter(Segmenter(cfg.model, 1, trunk=g), cfg, ["bird"], run / "segmenter.pt")
    torch.save(g.state_dict(), run / "classifier.pt")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _predict(elsewhere, "--model", str(run / "segmenter.pt"), "--images", str(images), "--out", "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "out" / "a.png").is_file() and not (elsewhere / "runs").exists()
    (run / "classifier.pt").rename(tmp_path / "g.pt")
    proc = _predict(elsewhere, "--model", str(run / "segmenter.pt"), "--images", str(images), "--out", "out2")
    assert proc.returncode == 2 and "pass --classifier PATH" in proc.stderr, proc.stderr[-3000:]
    proc = _predict(elsewhere, "--model", str(run / "segmenter.pt"), "--images", str(images), "--out", "out3",
                    "--classifier", str(tmp_path / "g.pt"))
    assert proc.returncode == 0 and (elsewhere / "out3" / "a.png").is_file(), proc.stderr[-3000:]


LISTEN_SCRIPT = r"""
import psutil, torch
from trainer.distributed import init_distributed
init_distributed(120)
t = torch.ones(1)
torch.distributed.all_reduce(t)
for c in psutil.Process().net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN:
        print("LISTEN", c.laddr.ip, c.laddr.port)
print("DONE", float(t))
"""


@pytest.mark.slow
def test_a_one_process_world_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                      "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")}
    proc = subprocess.run([sys.executable, "-c", LISTEN_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "DONE 1.0" in proc.stdout, proc.stderr[-3000:]
    addresses = re.findall(r"^LISTEN (\S+) \d+$", proc.stdout, re.M)
    assert all(a in ("127.0.0.1", "::1") for a in addresses), proc.stdout


def test_the_image_pins_its_base_and_installs_from_the_lock():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert "@sha256:" in base or re.fullmatch(r"debian:\d+\.\d+(-slim)?", base), base
    assert re.search(r'pip install "\./\[\$\{EXTRAS\}\]" -c deploy/requirements\.lock', text)
    lock = (REPO / "deploy" / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if line and not line.startswith("#"))
    from importlib.metadata import version

    for name in ("deepspeed", "mlflow", "ray", "numpy", "webdataset", "boto3"):
        assert pins[name] == version(name), name
    assert "torch" not in pins  # the Dockerfile's TORCH_VERSION picks the CPU or CUDA wheel
