"""A failed command never changes a finished run's folder (issue 21, item 4): the inputs are checked before
anything is written into it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _finished_run(root: Path) -> tuple[Path, dict[str, bytes]]:
    run = root / "runs" / "done"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# the config that made segmenter.pt\ntrain:\n  steps: 7\n")
    (run / "segmenter.pt").write_bytes(b"finished weights")
    return run, {p.name: p.read_bytes() for p in run.iterdir()}


def _manifest(root: Path) -> Path:
    folder = root / "data"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "classes": ["bird"], "splits": {
        "train": {"shards": ["train-000000.tar"], "samples": 4}}}))
    return folder / "manifest.json"


def _train(root: Path, command: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", command, "-c", str(REPO / "configs" / "toy_birds.yaml"),
                           f"train.out_dir={root / 'runs'}", "train.run_name=done", "mlflow.enabled=false",
                           *overrides], cwd=root, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "train-classifier"])
def test_missing_data_leaves_a_finished_run_untouched(tmp_path, command):
    run, before = _finished_run(tmp_path)
    proc = _train(tmp_path, command, f"data.url={tmp_path / 'nowhere'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "wsssrec: error: no manifest.json in" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_missing_classifier_leaves_a_finished_run_untouched(tmp_path):
    run, before = _finished_run(tmp_path)
    manifest = _manifest(tmp_path)
    proc = _train(tmp_path, "train", f"data.url={manifest}", f"classifier.checkpoint={tmp_path / 'no-g.pt'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"classifier checkpoint {tmp_path / 'no-g.pt'} does not exist" in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_invalid_config_leaves_a_finished_run_untouched(tmp_path):
    run, before = _finished_run(tmp_path)
    proc = _train(tmp_path, "train", f"data.url={_manifest(tmp_path)}", "train.steps=-3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
