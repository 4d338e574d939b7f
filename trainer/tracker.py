"""The run tracker: params from the resolved config, per-step metrics, the config, data manifest and picture
grids as artifacts, the git revision and the data set's content hash. Only rank 0 logs; other ranks get a
tracker that does nothing.

The run is created synchronously, so an unreachable server fails the command at once with a clear message.
After that every metric, tag and artifact goes through a queue that a background thread sends: training never
waits on the network, a server that drops mid-run only delays the sending, and `finish` waits (bounded by
`mlflow.flush_timeout_s`) until everything is sent. What still cannot be sent then is written to a JSON file
that `wsssrec sync-metrics FILE` replays, so nothing is lost."""
from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .config import Config, flatten
from .mlflow_params import log_params_batched
from .tracking import (TrackingError, connect, experiment_id_for, manifest_fingerprint, mlflow_names, process_rank,
                       short_error, tracking_uri)

log = logging.getLogger(__name__)
BATCH_LIMIT = 500  # MLflow's log_batch takes at most 1000 metrics; 500 leaves room for tags


def pending_path(cfg: Config, run_name: str) -> Path:
    """Where a tracker keeps what it could not send yet (`wsssrec sync-metrics` sends it later)."""
    from .files import run_dir

    return run_dir(cfg) / "mlflow" / f"{run_name}.pending.json"


class Tracker:
    def __init__(self, cfg: Config, run_name: str, active: bool = True, parent_run_id: str | None = None):
        self.active = active and cfg.mlflow.enabled and process_rank() == 0
        self.run_id: str | None = None
        self.run_name = run_name
        if not self.active:
            return
        import mlflow

        from .files import git_revision

        self.entities = mlflow.entities
        self.uri = tracking_uri(cfg)
        self.flush_timeout_s = cfg.mlflow.flush_timeout_s
        try:
            self.client = connect(self.uri)
            experiment_id = experiment_id_for(self.client, cfg, self.uri)
            tags = {**git_revision(), **manifest_fingerprint(cfg.data.url)}
            tags["mlflow.source.git.commit"] = tags.get("git_revision", "unknown")
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            log_params_batched(self.client, self.run_id, flatten(cfg.to_dict()))
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001 - turn any store error at start into one clear message
            raise TrackingError(f"cannot start an MLflow run at {self.uri} (experiment "
                                f"{cfg.mlflow.experiment!r}): {short_error(err)}") from err
        self.pending_path = pending_path(cfg, run_name)
        self._queue: list[tuple] = []  # ("batch", metrics, tags) | ("artifact", path, artifact_path)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._failing_since: float | None = None
        self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-{run_name}", daemon=True)
        self._sender.start()
        manifest = tags["data.manifest_url"]
        if tags["data.manifest_sha256"] != "unavailable" and "://" not in manifest:
            self.log_artifact(manifest, "data")
        atexit.register(self._at_exit)

    # ---- what the training code calls ----

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        metrics = mlflow_names(metrics, "metric")
        now = int(time.time() * 1000)
        batch = [self.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._put(("batch", batch, []))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            tags = mlflow_names(tags, "tag")
            self._put(("batch", [], [self.entities.RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.active:
            self._put(("artifact", str(path), artifact_path))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent (at most `timeout` seconds); True when it was."""
        if not self.active:
            return True
        deadline = time.monotonic() + (self.flush_timeout_s if timeout is None else timeout)
        self._wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue:  # an operation leaves the queue only once the server took it
                    return True
            time.sleep(0.05)
        return False

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended once everything before it is sent; wait at most `mlflow.flush_timeout_s`, then
        keep what is left in a file for `wsssrec sync-metrics`."""
        if not (self.active and self.run_id):
            return
        self._put(("terminate", status, None))
        self._closing.set()
        self._sender.join(self.flush_timeout_s)
        self.active = False
        with self._lock:
            left, self._queue[:] = list(self._queue), []
        if left:
            self._save_pending(left)
        elif self.pending_path.exists():
            self.pending_path.unlink()

    # ---- the background sender ----

    def _put(self, op: tuple) -> None:
        with self._lock:
            self._queue.append(op)
        self._wake.set()

    def _send_loop(self) -> None:
        backoff = 1.0
        while self.active:
            with self._lock:
                op, count = _next_op(self._queue) if self._queue else (None, 0)
            if op is None:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
                continue
            try:
                self._send(op)
            except Exception as err:  # noqa: BLE001 - any network/store failure: keep it queued, retry later
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); metrics are kept locally and sent when it is "
                                "back", self.uri, short_error(err))
                # finish() sets _closing: from then on retry every second until its deadline
                self._closing.wait(timeout=1.0 if self._closing.is_set() else backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            with self._lock:
                del self._queue[:count]
            if self._failing_since is not None:
                log.warning("MLflow at %s is back after %.0f s; the kept metrics are sent", self.uri,
                            time.monotonic() - self._failing_since)
                self._failing_since = None
            backoff = 1.0
            if op[0] == "terminate":
                return

    def _send(self, op: tuple) -> None:
        kind = op[0]
        if kind == "batch":
            self.client.log_batch(self.run_id, metrics=op[1], tags=op[2])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op[1], op[2])
        else:
            self.client.set_terminated(self.run_id, op[1])

    def _save_pending(self, ops: list[tuple]) -> None:
        doc = {"tracking_uri": self.uri, "run_id": self.run_id, "metrics": [], "tags": {}, "artifacts": [],
               "status": None}
        for op in ops:
            if op[0] == "batch":
                doc["metrics"] += [[m.key, m.value, m.timestamp, m.step] for m in op[1]]
                doc["tags"].update({t.key: t.value for t in op[2]})
            elif op[0] == "artifact":
                doc["artifacts"].append([op[1], op[2]])
            else:
                doc["status"] = op[1]
        _write_json(self.pending_path, doc)
        msg = (f"MLflow at {self.uri} still unreachable after {self.flush_timeout_s} s: {len(doc['metrics'])} "
               f"metrics of run {self.run_id} kept in {self.pending_path}; send them later with "
               f"`wsssrec sync-metrics {self.pending_path}`")
        log.warning(msg)
        print(f"WARNING: {msg}")

    def _at_exit(self) -> None:
        if self.active:  # the process is ending without finish(): an exception escaped the stage
            self.flush_timeout_s = min(self.flush_timeout_s, 15)
            self.finish("FAILED")


def _next_op(queue: list[tuple]) -> tuple[tuple, int]:
    """The next operation to send: consecutive metric/tag batches merged up to BATCH_LIMIT metrics."""
    if queue[0][0] != "batch":
        return queue[0], 1
    metrics, tags, count = [], {}, 0
    for op in queue:
        if op[0] != "batch" or (count and len(metrics) + len(op[1]) > BATCH_LIMIT):
            break
        metrics += op[1]
        tags.update({t.key: t for t in op[2]})
        count += 1
    return ("batch", metrics, list(tags.values())), count


def sync_pending(path: str | Path) -> dict[str, int]:
    """Send what a tracker could not (`<run dir>/mlflow/<run>.pending.json`) and delete the file."""
    import mlflow

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pending-metrics file {path} does not exist")
    doc = json.loads(path.read_text())
    client = connect(os.environ.get("MLFLOW_TRACKING_URI") or doc["tracking_uri"])
    metrics = [mlflow.entities.Metric(k, v, ts, step) for k, v, ts, step in doc["metrics"]]
    tags = [mlflow.entities.RunTag(k, v) for k, v in doc["tags"].items()]
    for start in range(0, max(len(metrics), 1), BATCH_LIMIT):
        client.log_batch(doc["run_id"], metrics=metrics[start:start + BATCH_LIMIT], tags=tags if not start else [])
    for local, artifact_path in doc["artifacts"]:
        client.log_artifact(doc["run_id"], local, artifact_path)
    if doc["status"]:
        client.set_terminated(doc["run_id"], doc["status"])
    path.unlink()
    return {"metrics": len(metrics), "tags": len(tags), "artifacts": len(doc["artifacts"])}


def _write_json(path: Path, data: Any) -> None:
    from .files import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


