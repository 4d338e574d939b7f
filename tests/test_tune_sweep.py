"""Real sweeps on a local Ray, through `python tune/sweep.py` on the tiny toy-birds set: ASHA stops a weak trial,
MLflow holds the parent and one nested run per trial, the registry's champion only moves for a better
segmenter, an interrupted sweep resumes without re-running finished trials, and a trial trains with 2 Ray
Train workers under DeepSpeed ZeRO-2 (gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "tune" / "sweep.py"
METRIC = "val/method/miou"
# a trial that trains well on this tiny set, and one whose mask swallows the whole image (no area prior,
# strong classifier terms): ASHA must stop the second after its first rung
GOOD = {"lambda_m": 1.0, "lambda_c": 1.0, "K": 2}
BAD = {"lambda_m": 1e-4, "lambda_c": 10.0, "K": 2}


def _flow(points):
    return "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}" for p in points) + "]"


def common_args(work: Path, toy: str) -> list[str]:
    return [f"data.url={toy}", "data.image_size=64", "data.batch_size=8", "data.eval_batch_size=32",
            "model.decoder_widths=[8,8,8,8,8]", "model.bottleneck=8", "classifier.epochs=1", "train.steps=12",
            "train.lr=0.01", f"train.out_dir={work}/runs", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            f"mlflow.artifact_location={work}/mlartifacts", f"sweep.storage_path={work}/ray", "sweep.rungs=3",
            "sweep.ray_num_cpus=3", "sweep.max_concurrent=1", "sweep.search.lambda_m=[0.3, 3]",
            "sweep.search.lambda_c=[0.3, 3]", "sweep.search.K=[0, 3]"]


def sweep_cmd(work: Path, toy: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(SWEEP), "--config", str(REPO / "configs/sweep_toy_birds.yaml"),
            *common_args(work, toy), f"sweep.name={name}", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}


def run_sweep(work: Path, toy: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(work, toy, name, *extra), cwd=work, env=env(), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"sweep {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def summary(work: Path, name: str) -> dict:
    return json.loads((work / "runs" / name / "summary.json").read_text())


def mlflow_client(work: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db", registry_uri=f"sqlite:///{work}/mlflow.db")


@pytest.fixture(scope="module")
def other_local_ray(tmp_path_factory):
    """A second local Ray on the same machine (another user's, or a benchmark's) for the length of the sweep.
    Without the sweep's pinned state-API address, Ray Train's clean-up of a stopped trial fails with "Found
    multiple active Ray instances", the trial's CPUs are never freed and the next trial never starts."""
    ready = tmp_path_factory.mktemp("other-ray") / "ready"
    code = ("import pathlib, sys, time, ray; ray.init(num_cpus=1, include_dashboard=False); "
            "pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready)], env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not ready.is_file():
        assert proc.poll() is None and time.time() < deadline, "the second local Ray did not start"
        time.sleep(0.5)
    yield proc
    proc.send_signal(signal.SIGINT)  # the driver's atexit ray.shutdown() stops the Ray processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of its process group (its own, by start_new_session)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def first_sweep(toy_dataset, tmp_path_factory, other_local_ray):
    """Four trials, the good setting first and the degenerate one second; g is trained once by the sweep.
    Another local Ray runs beside it all along (`other_local_ray`)."""
    work = tmp_path_factory.mktemp("sweep")
    proc = run_sweep(work, toy_dataset, "first", "--num-samples", "4",
                     f"sweep.points_to_evaluate={_flow([GOOD, BAD])}")
    return work, toy_dataset, proc


@pytest.mark.slow
def test_asha_sweep_finishes_and_stops_a_trial_early(first_sweep):
    work, _, proc = first_sweep
    result = summary(work, "first")
    assert len(result["trials"]) == 4 and not result["unfinished"]
    outcomes = {t["trial_id"]: t["outcome"] for t in result["trials"]}
    assert set(outcomes.values()) <= {"complete", "stopped_early"}
    stopped = [t for t in result["trials"] if t["outcome"] == "stopped_early"]
    assert stopped, outcomes
    assert all(t["metrics"]["rung"] < 3 for t in stopped)
    bad = next(t for t in result["trials"] if t["params"]["lambda_m"] == BAD["lambda_m"])
    assert bad["outcome"] == "stopped_early" and bad["metrics"]["rung"] == 1
    best = result["best"]
    assert best["outcome"] == "complete"
    assert best["metrics"][METRIC] == max(t["metrics"][METRIC] for t in result["trials"] if t["outcome"] == "complete")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"best trial {best['trial_id']}: lambda_m=") and f"K={best['params']['K']}" in last
    assert f"{METRIC}={best['metrics'][METRIC]:.4f}" in last and "wsssrec-segmenter v1 as champion" in last
    assert f"| trial | lambda_m | lambda_c | K | rungs | {METRIC} | boundary F | train/loss |" in proc.stdout
    boundary = METRIC.rsplit("/", 1)[0] + "/boundary_f"  # the same split's boundary F, a number in [0, 1]
    assert all(0.0 <= t["metrics"][boundary] <= 1.0 for t in result["trials"])


@pytest.mark.slow
def test_mlflow_holds_parent_and_nested_runs(first_sweep):
    work, _, _ = first_sweep
    client = mlflow_client(work)
    experiment = client.get_experiment_by_name("wsssrec")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("wsssrec.kind") == "sweep" and r.info.run_name == "first"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 4
    result = summary(work, "first")
    for run in nested:
        trial = next(t for t in result["trials"] if t["trial_id"] == run.data.tags["wsssrec.trial_id"])
        assert float(run.data.params["objective.lambda_m"]) == pytest.approx(trial["params"]["lambda_m"])
        assert int(run.data.params["model.K"]) == trial["params"]["K"]
        history = client.get_metric_history(run.info.run_id, METRIC)
        assert [m.step for m in history] == [4, 8, 12][:int(trial["metrics"]["rung"])]
        assert run.info.status == ("FINISHED" if trial["outcome"] == "complete" else "KILLED")
    assert parent.data.tags["best_trial"] == result["best"]["trial_id"]
    assert parent.data.metrics[f"best/{METRIC}"] == pytest.approx(result["best"]["metrics"][METRIC])


@pytest.mark.slow
def test_registry_holds_the_best_as_champion(first_sweep):
    work, _, _ = first_sweep
    client = mlflow_client(work)
    result = summary(work, "first")
    champion = client.get_model_version_by_alias("wsssrec-segmenter", "champion")
    assert str(champion.version) == result["registered"]["version"] == "1"
    assert float(champion.tags[f"metric.{METRIC}"]) == pytest.approx(result["best"]["metrics"][METRIC], abs=1e-5)
    assert champion.run_id == result["best"]["run_id"]
    assert champion.tags["classifier.model_uri"].startswith("models:/wsssrec-classifier/")  # the shared g


@pytest.mark.slow
def test_worse_sweep_interrupted_resumes_and_stays_challenger(first_sweep):
    """Only degenerate settings, so its best is worse than the champion; interrupted (Ctrl-C) after the first
    trial has finished, then resumed: the finished trial is not trained again."""
    work, toy, _ = first_sweep
    name = "worse"
    g = work / "runs" / "first" / "g" / "classifier.pt"  # the first sweep's g, registered as version 1
    args = ["--num-samples", "2", f"classifier.checkpoint={g}",
            f"sweep.search.lambda_m=[{BAD['lambda_m']}, {BAD['lambda_m']}]",
            f"sweep.search.lambda_c=[{BAD['lambda_c']}, {BAD['lambda_c']}]", "sweep.search.K=[2, 2]",
            "sweep.scheduler=none", "train.steps=6"]  # 2 steps a rung: still the whole-image mask it starts into
    trials_file = work / "runs" / name / "trials.json"
    proc = subprocess.Popen(sweep_cmd(work, toy, name, *args), cwd=work, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            trials = json.loads(trials_file.read_text()) if trials_file.is_file() else {}
            if any(t["status"] == "complete" for t in trials.values()) and len(trials) == 2:
                break
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(2)
        else:
            raise AssertionError("the first trial did not finish in 10 minutes")
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted with 1 unfinished trial" in out, out[-4000:]
    before = json.loads(trials_file.read_text())
    finished = next(tid for tid, t in before.items() if t["status"] == "complete")
    finished_model = work / "runs" / name / "trials" / finished / "segmenter.pt"
    stamp = finished_model.stat().st_mtime_ns

    resumed = run_sweep(work, toy, name, *args, "--resume")
    result = summary(work, name)
    assert not result["unfinished"] and len(result["trials"]) == 2
    assert all(t["outcome"] == "complete" for t in result["trials"])
    assert finished_model.stat().st_mtime_ns == stamp  # not trained again
    client = mlflow_client(work)
    run_id = next(t["run_id"] for t in result["trials"] if t["trial_id"] == finished)
    assert [m.step for m in client.get_metric_history(run_id, METRIC)] == [2, 4, 6]  # no second history

    # not better than the first sweep's champion (on this tiny set both may sit at the all-background level:
    # a tie is not a win either): registered, but only as challenger
    first_best = summary(work, "first")["best"]["metrics"][METRIC]
    assert result["best"]["metrics"][METRIC] <= first_best
    assert result["registered"]["alias"] == "challenger"
    assert str(client.get_model_version_by_alias("wsssrec-segmenter", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("wsssrec-segmenter", "challenger").version) == \
        result["registered"]["version"] == "2"
    assert "as challenger" in resumed.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_trial_with_two_ray_train_workers_zero2(first_sweep):
    work, toy, _ = first_sweep
    g = next((work / "runs" / "first" / "g").glob("classifier.pt"))
    run_sweep(work, toy, "two-workers", "--num-samples", "1", "sweep.workers=2", "train.deepspeed=zero2",
              "train.steps=4", "sweep.rungs=2", f"classifier.checkpoint={g}", "mlflow.enabled=false",
              "sweep.scheduler=none")
    result = summary(work, "two-workers")
    (trial,) = result["trials"]
    assert trial["outcome"] == "complete" and trial["metrics"]["rung"] == 2 and METRIC in trial["metrics"]
    run = work / "runs" / "two-workers" / "trials" / trial["trial_id"]
    history = json.loads((run / "train_history.json").read_text())
    assert history["world_size"] == 2 and len(history["loss"]) == 4
    # the reported checkpoint merges both ranks' ZeRO-2 shards
    files = {p.name for p in Path(trial["checkpoint_path"]).rglob("*") if p.is_file()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "segmenter.pt", "complete.json"} <= files
    assert result["registered"] is None
