"""MLflow against real servers on 127.0.0.1: a tiny `wsssrec demo` tracked on an `mlflow server` process
(sqlite backend, proxied local artifacts), its runs, nesting and metrics, the registry (lineage, signature,
aliases, promote, ls), pulling the champion in a fresh process to predict (identical masks to the in-memory
model), `mlflow models serve` over REST, the server killed mid-run, wrong URIs, and S3 artifacts on s3rver."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3_server import BUCKET, _free_port, s3_server  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
SEG, CLS = "wsssrec-segmenter", "wsssrec-classifier"
STEPS = 30
# one thread everywhere: the same conv arithmetic in every process, so masks compare bit for bit
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


class ServerProcess:
    """A server command in its own process group on 127.0.0.1:`port`; stopped by that group's id."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict[str, str], ready_path: str):
        self.command, self.port, self.log, self.env, self.ready_path = command, port, log, env, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        _wait_http(self.url + self.ready_path, self.process, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the server and the workers it forked
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        self.process = None


def mlflow_server(root: Path, artifacts: str, extra_env: dict[str, str] | None = None) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, **THREADS, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    return ServerProcess(command, port, root / f"server-{port}.log", env, "/health")


@pytest.fixture(autouse=True)
def mlflow_environment_unchanged():
    """wsssrec must not export MLflow's URIs into this process's environment (every later subprocess would
    inherit them, and MLFLOW_TRACKING_URI wins over the config)."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    before = {name: os.environ.get(name) for name in names}
    yield
    assert {name: os.environ.get(name) for name in names} == before


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = mlflow_server(tmp_path_factory.mktemp("mlflow-server"), str(tmp_path_factory.mktemp("mlflow-artifacts")))
    srv.start()
    yield srv
    srv.stop()


def wsssrec(*args, cwd, env_extra: dict[str, str] | None = None, check: bool = True, timeout: float = 900):
    env = {**os.environ, **THREADS, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"wsssrec {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def tiny_args(toy_dataset: str, work: Path, name: str) -> list[str]:
    return ["-c", str(REPO / "configs/toy_birds.yaml"), f"data.url={toy_dataset}", "data.image_size=64",
            f"train.out_dir={work}/runs", f"train.run_name={name}", "eval.grid_images=2", "train.threads=1",
            f"train.deepspeed={REPO}/configs/deepspeed/zero0.json", "classifier.epochs=1", "train.log_every=1",
            # the preserve gate on (the default turned it off with the dense CRF): the registered model then
            # carries g, which these tests check; the CRF stays on, as in the default
            "eval.gate_threshold=0.5",
            # only used if the MLFLOW_TRACKING_URI variable were missing: it must win over the config
            "mlflow.tracking_uri=sqlite:////nonexistent/never-used.db"]


@pytest.fixture(scope="module")
def pipeline(server, toy_dataset, tmp_path_factory):
    """`wsssrec demo` (g 1 epoch, segmenter 30 steps) tracked on the server through MLFLOW_TRACKING_URI."""
    work = tmp_path_factory.mktemp("pipeline")
    proc = wsssrec("demo", *tiny_args(toy_dataset, work, "tiny"), f"train.steps={STEPS}", cwd=work,
                   env_extra={"MLFLOW_TRACKING_URI": server.url})
    return work, work / "runs" / "tiny", proc


def client_for(server):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def in_memory_masks(checkpoint: Path, paths: list[Path], probabilities: bool = False) -> list[dict]:
    """The masks of the segmenter as trained (segmenter.pt in the run folder), in this process."""
    import torch

    from trainer.predict import decode_image, load_predictor

    torch.set_num_threads(1)
    predictor = load_predictor(str(checkpoint))
    return predictor.segment([decode_image(p.read_bytes()) for p in paths], probabilities=probabilities)


@pytest.fixture(scope="module")
def images(pipeline, tmp_path_factory) -> list[Path]:
    """The demo's sample JPEGs plus two of other sizes and formats (any size must work)."""
    _, run, _ = pipeline
    folder = tmp_path_factory.mktemp("images")
    samples = sorted((run / "sample_images").glob("*.jpg"))
    assert len(samples) == 8
    for path in samples:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.open(samples[0]).resize((150, 100)).save(folder / "wide.jpg", quality=95)
    Image.open(samples[1]).resize((48, 80)).save(folder / "tall.png")
    return sorted(p for p in folder.iterdir())


# ---- tracking ----

@pytest.mark.slow
def test_pipeline_runs_nest_with_params_metrics_tags_and_artifacts(server, pipeline, toy_dataset):
    client = client_for(server)
    exp = client.get_experiment_by_name("wsssrec")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a local folder
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"tiny", "tiny-classifier", "tiny-segmenter", "tiny-eval"} <= set(runs)
    parent = runs["tiny"].info.run_id
    for stage in ("classifier", "segmenter", "eval"):
        run = runs[f"tiny-{stage}"]
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED"
    seg = runs["tiny-segmenter"]
    assert seg.data.params["train.steps"] == str(STEPS) and seg.data.params["data.image_size"] == "64"
    assert seg.data.params["mlflow.tracking_uri"] == "sqlite:////nonexistent/never-used.db"
    history = client.get_metric_history(seg.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(STEPS))
    manifest_hash = hashlib.sha256(Path(toy_dataset).read_bytes()).hexdigest()
    for run in runs.values():
        assert run.data.tags["data.manifest_sha256"] == manifest_hash
        assert run.data.tags["data.manifest_url"] == toy_dataset
        assert len(run.data.tags["git_revision"]) == 40 and run.data.tags["git_dirty"] in ("true", "false")
    ev = runs["tiny-eval"]
    assert "test_conflict/method/miou" in ev.data.metrics and "val/g_accuracy" in ev.data.metrics
    grids = {a.path for a in client.list_artifacts(ev.info.run_id, "grids")}
    assert {"grids/grid_val.png", "grids/grid_test_conflict.png"} <= grids
    assert {a.path for a in client.list_artifacts(ev.info.run_id)} >= {"results.md", "results.json", "data"}
    assert "config.yaml" in {a.path for a in client.list_artifacts(seg.info.run_id)}


# ---- registry ----

@pytest.mark.slow
def test_registered_versions_carry_lineage_metrics_and_signature(server, pipeline, toy_dataset, monkeypatch):
    import mlflow

    client = client_for(server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # for mlflow's module-level functions below
    work, run, proc = pipeline
    seg = client.get_model_version_by_alias(SEG, "champion")
    g = client.get_model_version_by_alias(CLS, "champion")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("wsssrec").experiment_id])}
    assert seg.run_id == runs["tiny-segmenter"] and g.run_id == runs["tiny-classifier"]
    assert seg.tags["classifier.model_uri"] == f"models:/{CLS}/{g.version}"
    assert [v.version for v in client.search_model_versions(f"name='{CLS}'")] == ["1"]  # found by hash
    assert seg.tags["classifier.weights_sha256"] == g.tags["weights_sha256"]
    assert seg.tags["data.manifest_sha256"] == hashlib.sha256(Path(toy_dataset).read_bytes()).hexdigest()
    assert seg.tags["weights_sha256"] == hashlib.sha256((run / "segmenter.pt").read_bytes()).hexdigest()
    assert float(seg.tags["metric.test_conflict/method/miou"]) >= 0.0
    assert "metric.val/g_accuracy" in g.tags and "metric.classifier/loss" in g.tags
    info = mlflow.models.get_model_info(f"models:/{SEG}@champion")
    assert info.signature.inputs.input_names() == ["image", "pixels"]
    assert info.signature.params.params[0].name == "probabilities"
    assert set(info.flavors) == {"python_function", "wsssrec"}
    assert info.flavors["python_function"]["loader_module"] == "trainer.pyfunc"
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{SEG}/{seg.version}", dst_path=str(work / "dl")))
    assert json.loads((folder / "lineage.json").read_text())["classifier.model_uri"] == f"models:/{CLS}/{g.version}"
    assert "test_conflict/method/miou" in json.loads((folder / "metrics.json").read_text())
    assert (folder / "manifest.json").read_bytes() == Path(toy_dataset).read_bytes()
    assert "steps: 30" in (folder / "config.yaml").read_text()
    # with the gate on (eval.gate_threshold, tiny_args) the model carries that g, to predict as eval scored
    meta = json.loads((folder / "data" / "wsssrec.json").read_text())
    assert meta["gate"] == {"weights": "classifier.pt", "threshold": 0.5}
    assert (folder / "data" / "classifier.pt").read_bytes() == (run / "classifier.pt").read_bytes()
    assert f"--model models:/{SEG}@champion" in proc.stdout and f"MLFLOW_TRACKING_URI={server.url}" in proc.stdout


@pytest.mark.slow
def test_promote_and_ls(server, pipeline):
    from trainer.registry import format_versions, list_versions

    work, _, _ = pipeline
    env = {"MLFLOW_TRACKING_URI": server.url}
    proc = wsssrec("registry", "promote", SEG, "1", "--alias", "staging", cwd=work, env_extra=env)
    assert f"models:/{SEG}@staging → version 1" in proc.stdout
    assert client_for(server).get_model_version_by_alias(SEG, "staging").version == "1"
    table = format_versions(list_versions(uri=server.url))
    seg_line = next(line for line in table.splitlines() if line.startswith(SEG))
    assert "champion" in seg_line and "staging" in seg_line and f"models:/{CLS}/1" in seg_line
    proc = wsssrec("registry", "promote", SEG, "99", cwd=work, env_extra=env, check=False)
    assert proc.returncode == 2 and f"model '{SEG}' has no version '99' (versions: 1)" in proc.stderr


# ---- pulling and predicting ----

@pytest.mark.slow
def test_predict_pulls_the_champion_in_a_fresh_process_and_matches_the_trained_model(server, pipeline, images,
                                                                                     tmp_path):
    work, run, _ = pipeline
    out = tmp_path / "masks"
    proc = wsssrec("predict", "--model", f"models:/{SEG}@champion", "--images", str(images[0].parent),
                   "--out", str(out), cwd=work, env_extra={"MLFLOW_TRACKING_URI": server.url})
    assert "predict: 100%" in proc.stderr and "wrote 10 label masks" in proc.stdout
    expected = in_memory_masks(run / "segmenter.pt", images)
    for path, want in zip(images, expected):
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        overlay = Image.open(out / "overlays" / f"{path.stem}.jpg")
        size = Image.open(path).size
        assert mask.shape == (size[1], size[0]) and overlay.size == size
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, want["mask"], err_msg=path.name)


@pytest.mark.slow
def test_models_serve_answers_rest_with_the_same_masks(server, pipeline, images, tmp_path):
    from deploy.rest_client import request_masks

    _, run, _ = pipeline
    port = _free_port()
    serve = ServerProcess([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{SEG}@champion",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                          port, tmp_path / "serve.log", {**os.environ, **THREADS, "MLFLOW_TRACKING_URI": server.url,
                                                         # it execs `uvicorn` from PATH: the venv's
                                                         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                          "/ping")
    serve.start()
    try:
        got = request_masks(serve.url, [p.read_bytes() for p in images], probabilities=True)
    finally:
        serve.stop()
    expected = in_memory_masks(run / "segmenter.pt", images, probabilities=True)
    assert len(got) == len(images)
    for path, row, want in zip(images, got, expected):
        np.testing.assert_array_equal(row["mask"], want["mask"], err_msg=path.name)
        np.testing.assert_array_equal(row["probabilities"], want["probabilities"], err_msg=path.name)
        assert row["probabilities"].shape == (2, *want["mask"].shape)


@pytest.mark.slow
def test_wrong_uris_fail_with_clear_messages(server, pipeline, images, monkeypatch):
    from trainer.model_uri import RegistryError
    from trainer.predict import load_predictor
    from trainer.tracking import TrackingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    with pytest.raises(RegistryError, match=f"no registered model 'nosuch' in the registry at {server.url} "
                                            f"\\(registered: {CLS}, {SEG}\\)"):
        load_predictor("models:/nosuch@champion")
    with pytest.raises(RegistryError, match=f"model '{SEG}' has no alias 'best' \\(aliases: champion → v1"):
        load_predictor(f"models:/{SEG}@best")
    with pytest.raises(RegistryError, match="no run 'feedbeef' on the tracking server"):
        load_predictor("runs:/feedbeef/model")
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {dead} is unreachable"):
        load_predictor(f"models:/{SEG}@champion")
    assert time.monotonic() - start < 30
    work, _, _ = pipeline
    proc = wsssrec("predict", "--model", f"models:/{SEG}@best", "--images", str(images[0].parent), "--out",
                   str(work / "never"), cwd=work, env_extra={"MLFLOW_TRACKING_URI": server.url}, check=False)
    assert proc.returncode == 2 and f"wsssrec: error: models:/{SEG}@best: model '{SEG}' has no alias" in proc.stderr
    assert not (work / "never").exists()


@pytest.mark.slow
def test_training_fails_fast_when_the_server_is_unreachable(toy_dataset, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    proc = wsssrec("train-classifier", *tiny_args(toy_dataset, tmp_path, "dead"), cwd=tmp_path,
                   env_extra={"MLFLOW_TRACKING_URI": dead}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"wsssrec: error: MLflow tracking server {dead} is unreachable" in proc.stderr
    assert "mlflow.enabled=false" in proc.stderr
    assert not (tmp_path / "runs" / "dead" / "classifier.pt").exists()
    assert time.monotonic() - start < 120


# ---- the server going away ----

@pytest.mark.slow
def test_server_killed_mid_run_loses_no_metric(server, pipeline, toy_dataset, tmp_path, monkeypatch):
    """Stage 2 takes g by registry alias; the server is killed while it trains and comes back: training
    completes, every step reaches the run, and the new version records which g it used. A second run that
    ends while the server is down keeps what it could not send in a file that `sync-metrics` sends."""
    from trainer.config import load_config
    from trainer.tracker import Tracker
    from trainer.tracking import HTTP_DEFAULTS

    for name, value in {**HTTP_DEFAULTS, "MLFLOW_TRACKING_URI": server.url}.items():
        monkeypatch.setenv(name, value)  # what connect() would set, undone after the test
    client = client_for(server)
    steps = 60
    args = [*tiny_args(toy_dataset, tmp_path, "killed"), f"train.steps={steps}", "mlflow.flush_timeout_s=400",
            f"classifier=models:/{CLS}@champion"]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        train = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path,
                                 env={**os.environ, **THREADS}, stdout=out, stderr=subprocess.STDOUT)
    try:
        run_id, deadline = None, time.monotonic() + 300
        experiment = client.get_experiment_by_name("wsssrec").experiment_id
        while run_id is None and time.monotonic() < deadline and train.poll() is None:
            found = client.search_runs([experiment], "attributes.run_name = 'killed-segmenter'")
            if found and len(client.get_metric_history(found[0].info.run_id, "train/loss")) >= 3:
                run_id = found[0].info.run_id
            time.sleep(0.3)
        assert run_id, f"stage 2 never logged 3 steps:\n{log.read_text()[-3000:]}"
        cfg = load_config(None, [f"data.url={toy_dataset}", f"train.out_dir={tmp_path}/runs",
                                 "mlflow.flush_timeout_s=1"])
        offline = Tracker(cfg, "offline")
        server.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        offline.log_metrics({"x": 1.0}, 0)
        offline.log_metrics({"x": 2.0}, 1)
        offline.finish()
        time.sleep(max(0.0, 5 - (time.monotonic() - killed_at)))  # down for at least 5 s
        server.start()
        assert train.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if train.poll() is None:
            train.kill()
        if server.process is None:
            server.start()
    text = log.read_text()
    assert "unreachable" in text and "kept locally" in text and "is back after" in text
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(steps))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    version = client.get_model_version(SEG, run.data.tags["registered.segmenter"].rsplit("/", 1)[1])
    assert version.run_id == run_id
    assert version.tags["classifier.model_uri"] == f"models:/{CLS}/1"
    assert version.tags["classifier.model_uri_requested"] == f"models:/{CLS}@champion"
    # the run that ended while the server was down
    pending = tmp_path / "runs" / "run" / "mlflow" / "offline.pending.json"
    assert json.loads(pending.read_text())["status"] == "FINISHED"
    proc = wsssrec("sync-metrics", str(pending), cwd=tmp_path)
    assert "sent 2 metrics" in proc.stdout and not pending.exists()
    assert [m.value for m in client.get_metric_history(offline.run_id, "x")] == [1.0, 2.0]
    assert client.get_run(offline.run_id).info.status == "FINISHED"


# ---- S3 artifacts ----

@pytest.mark.slow
def test_s3_artifacts_log_register_and_pull(s3_server, pipeline, toy_dataset, tmp_path):  # noqa: F811
    from data_shards.s3 import list_sizes

    _, run, _ = pipeline
    s3_env = {**s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    srv = mlflow_server(tmp_path / "server", f"s3://{BUCKET}/mlflow-artifacts", s3_env)
    srv.start()
    try:
        env = {**s3_env, "MLFLOW_TRACKING_URI": srv.url}
        wsssrec("train", *tiny_args(toy_dataset, tmp_path, "s3"), "train.steps=3",
                f"classifier.checkpoint={run / 'classifier.pt'}", cwd=tmp_path, env_extra=env)
        objects = list_sizes(f"s3://{BUCKET}/mlflow-artifacts/")
        assert any(u.endswith("/data/segmenter.pt") for u in objects), sorted(objects)[:20]
        assert any(u.endswith("/artifacts/config.yaml") for u in objects)
        out = tmp_path / "masks"
        images = sorted((run / "sample_images").glob("*.jpg"))
        wsssrec("predict", "--model", f"models:/{SEG}/1", "--images", str(images[0].parent), "--out", str(out),
                cwd=tmp_path, env_extra=env)
    finally:
        srv.stop()
    expected = in_memory_masks(tmp_path / "runs" / "s3" / "segmenter.pt", images)
    for path, want in zip(images, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{path.stem}.png")), want["mask"])


def test_local_sqlite_store_elsewhere_than_cwd_registers(toy_dataset, tmp_path, monkeypatch):
    """A local store that is not ./mlflow.db: MLflow's SQL registry and its models:/ download resolve through
    the module-level URI; registering and pulling must still work, and leave MLFLOW_TRACKING_URI as it was."""
    import torch

    from trainer.classifier import build_classifier
    from trainer.config import ClassifierConfig, load_config
    from trainer.model_uri import download
    from trainer.registry import register

    monkeypatch.chdir(tmp_path)  # cwd's own ./mlflow.db is NOT the store below
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "elsewhere" / "store.db"
    store.parent.mkdir()
    weights = tmp_path / "g.pt"
    torch.save(build_classifier(ClassifierConfig(), 1).state_dict(), weights)
    cfg = load_config(REPO / "configs/toy_birds.yaml", [f"data.url={toy_dataset}",
                                                         f"mlflow.tracking_uri=sqlite:///{store}",
                                                         f"mlflow.artifact_location={tmp_path}/art"])
    mv = register(cfg, "classifier", weights, ["bird"], None)
    assert str(mv.version) == "1"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    _, folder = download(f"models:/{mv.name}/1", tmp_path / "pulled", f"sqlite:///{store}")
    pulled = [p for p in folder.rglob("*.pt")]
    assert pulled and hashlib.sha256(pulled[0].read_bytes()).digest() == hashlib.sha256(weights.read_bytes()).digest()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not (tmp_path / "mlflow.db").exists()


def test_metric_names_mlflow_refuses_are_renamed_not_lost(toy_dataset, tmp_path):
    """A metric name with characters MLflow refuses (e.g. from a class name of a user's data set) would make
    the store reject its whole batch, and hold back every metric after it; the tracker renames it instead."""
    import mlflow

    from trainer.config import load_config
    from trainer.tracker import Tracker
    from trainer.tracking import mlflow_name

    assert mlflow_name("val/CAM+gate/iou_traffic(light)") == "val/CAM_gate/iou_traffic_light_"
    assert mlflow_name("/a/../b") == "a/._/b" and mlflow_name("val/method/miou") == "val/method/miou"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [f"data.url={toy_dataset}", f"train.out_dir={tmp_path}/runs",
                             f"mlflow.tracking_uri={store}", f"mlflow.artifact_location={tmp_path}/art"])
    tracker = Tracker(cfg, "names")
    tracker.log_metrics({"val/CAM+gate/miou": 0.25, "val/method/miou": 0.5}, 0)
    tracker.log_metrics({"after": 1.0}, 1)
    tracker.set_tags({"group+1": "x"})
    tracker.finish()
    run = mlflow.MlflowClient(tracking_uri=store).get_run(tracker.run_id)
    assert run.data.metrics == {"val/CAM_gate/miou": 0.25, "val/method/miou": 0.5, "after": 1.0}
    assert run.data.tags["group_1"] == "x" and run.info.status == "FINISHED"
    assert not tracker.pending_path.exists()  # nothing was left unsent
