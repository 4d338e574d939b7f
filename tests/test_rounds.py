"""Rounds of stage 1 + stage 2 (`train.rounds`, trainer/rounds.py): where each round lives and whose segmenter its
g decouples with, the config's checks, and a real two-round `wsssrec demo`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.rounds import round_config
from trainer.weights import classifier_path, segmenter_path

REPO = Path(__file__).resolve().parent.parent


def test_round_folders_and_the_segmenter_each_round_decouples_with(tmp_path):
    cfg = load_config(REPO / "configs/toy_birds.yaml", [f"train.out_dir={tmp_path}", "train.run_name=exp",
                                                         "train.rounds=3"])
    first, second, last = (round_config(cfg, r) for r in (1, 2, 3))
    assert classifier_path(first) == tmp_path / "exp" / "round1" / "classifier.pt"
    assert first.classifier.decouple_from == ""
    assert second.classifier.decouple_from == str(tmp_path / "exp" / "round1" / "segmenter.pt")
    assert segmenter_path(second) == tmp_path / "exp" / "round2" / "segmenter.pt"
    assert last.train.run_name == "exp" and last.classifier.decouple_from == str(segmenter_path(second))
    assert segmenter_path(last) == tmp_path / "exp" / "segmenter.pt"
    with pytest.raises(ValueError, match="round 4"):
        round_config(cfg, 4)
    one = load_config(REPO / "configs/toy_birds.yaml", ["train.run_name=exp", "train.rounds=1"])
    assert round_config(one, 1) == one
    given = load_config(REPO / "configs/toy_birds.yaml", ["train.rounds=2", "classifier.decouple_from=a.pt"])
    assert round_config(given, 1).classifier.decouple_from == "a.pt"  # a round-1 segmenter the user names


def test_rounds_must_be_positive():
    with pytest.raises(ConfigError, match="train.rounds"):
        load_config(None, ["train.rounds=0"])


def _demo(tmp_path, toy_dataset, *extra):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    args = ["demo", "-c", str(REPO / "configs/toy_birds.yaml"), f"data.url={toy_dataset}", "data.image_size=64",
            "train.steps=4", "classifier.epochs=1", "train.rounds=2", f"train.out_dir={tmp_path}/runs",
            "train.run_name=demo", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"mlflow.artifact_location={tmp_path}/art", "eval.grid_images=2", *extra]
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_two_round_demo(toy_dataset, tmp_path):
    import mlflow

    refused = _demo(tmp_path, toy_dataset, f"classifier.checkpoint={tmp_path}/g.pt")
    assert refused.returncode != 0 and "train.rounds=2 trains g in every round" in refused.stderr
    proc = _demo(tmp_path, toy_dataset)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "demo"
    for name in ("classifier.pt", "segmenter.pt"):
        assert (run / "round1" / name).is_file() and (run / name).is_file()
    assert not (run / "round1" / "decouple_examples.png").exists()  # round 1 is stage 1 as always
    assert (run / "decouple_examples.png").is_file()
    assert f"round 1 of 2 done: g {run}/round1/classifier.pt, segmenter {run}/round1/segmenter.pt" in proc.stdout
    assert "| test_conflict | method |" in proc.stdout
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("wsssrec").experiment_id])
    finished = [r for r in runs if r.info.run_name == "demo" and r.info.status == "FINISHED"]
    assert len(finished) == 1  # the refused demo's parent run ended FAILED
    parent = finished[0].info.run_id
    by_name = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {"demo/round1-classifier", "demo/round1-segmenter", "demo-classifier", "demo-segmenter",
            "demo-eval"} <= set(by_name)
    g_tags = by_name["demo-classifier"].data.tags
    assert g_tags["decouple_from"] == str(run / "round1" / "segmenter.pt")
    assert len(g_tags["decouple_from.weights_sha256"]) == 64
    assert "decouple.from" not in by_name["demo/round1-classifier"].data.tags
    # a rerun reuses the finished rounds: nothing of round 1 is trained again
    again = _demo(tmp_path, toy_dataset)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "stage 1 done" not in again.stdout and "round 1 of 2 done" in again.stdout
