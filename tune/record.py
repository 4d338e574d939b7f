"""The sweep driver's record of its trials, as a Tune callback: each trial's searched values, last metrics,
checkpoint and outcome (complete, stopped early by ASHA, error, or unfinished when the sweep was
interrupted), kept in `<sweep dir>/trials.json` so a resumed sweep knows the trials finished before; and,
with MLflow on, one nested run per trial under the sweep's parent run, with the trial's resolved config as
params and every rung's metrics at its training step. The driver logs, not the trial: trials on cluster
nodes need no access to the tracking server."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainer.config import flatten

from .trial import trial_config

STATUS = ("running", "complete", "stopped_early", "error")


def _reported(key: str, value: Any, split: str) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        key.startswith((f"{split}/", "train/")) or key in ("rung", "train_steps", "rung_seconds"))


class SweepRecorder(Callback):
    def __init__(self, state_path: Path, rungs: int, split: str, base: dict[str, Any],
                 mlflow: dict[str, str] | None = None):
        """`mlflow`: {"uri", "experiment_id", "parent_run_id", "sweep"} or None when tracking is off."""
        self.state_path, self.rungs, self.split, self.base, self.mlflow = Path(state_path), rungs, split, base, mlflow
        self.trials: dict[str, dict[str, Any]] = (json.loads(self.state_path.read_text())
                                                 if self.state_path.is_file() else {})
        self._client = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_client": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Tuner.restore unpickles the callback as it was when the sweep started: the trials since are on disk."""
        self.__dict__.update(state)
        if self.state_path.is_file():
            self.trials = json.loads(self.state_path.read_text())

    # ---- Tune's hooks (called in the driver) ----

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self.trials.setdefault(trial.trial_id, {"params": dict(trial.config),
                                                         "metrics": {}, "checkpoint_path": None})
        record["status"] = "running"
        if self.mlflow:
            record["run_id"] = self._open_run(trial.trial_id, record)
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self.trials[trial.trial_id]
        metrics = {k: float(v) for k, v in result.items() if _reported(k, v, self.split)}
        if not metrics:
            return
        record["metrics"].update(metrics)
        record["checkpoint_path"] = result.get("checkpoint_path") or record["checkpoint_path"]
        if self.mlflow:
            import mlflow

            now = int(result.get("timestamp", 0) * 1000) or None
            step = int(metrics.get("train_steps", 0))
            self.client.log_batch(record["run_id"], metrics=[mlflow.entities.Metric(k, v, now or 0, step)
                                                             for k, v in metrics.items()])
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        record = self.trials[trial.trial_id]
        record["status"] = "complete" if record["metrics"].get("rung", 0) >= self.rungs else "stopped_early"
        self._close_run(record, "FINISHED" if record["status"] == "complete" else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        record = self.trials[trial.trial_id]
        record["status"] = "error"
        self._close_run(record, "FAILED")

    # ---- queries for the driver ----

    def outcome(self, trial_id: str) -> str:
        """complete | stopped_early | error | unfinished (still running when the sweep was interrupted)."""
        status = self.trials.get(trial_id, {}).get("status", "running")
        return "unfinished" if status == "running" else status

    def rows(self) -> list[dict[str, Any]]:
        return [{"trial_id": tid, **rec, "outcome": self.outcome(tid)} for tid, rec in sorted(self.trials.items())]

    # ---- MLflow ----

    @property
    def client(self):
        if self._client is None:
            from trainer.tracking import connect

            self._client = connect(self.mlflow["uri"])
        return self._client

    def _open_run(self, trial_id: str, record: dict[str, Any]) -> str:
        """The trial's nested run: reopened when the trial runs again after a resume, else created with the
        trial's resolved config as params."""
        from trainer.mlflow_params import log_params_batched

        if record.get("run_id"):
            self.client.update_run(record["run_id"], status="RUNNING")
            return record["run_id"]
        tags = {"mlflow.parentRunId": self.mlflow["parent_run_id"], "wsssrec.kind": "sweep-trial",
                "wsssrec.sweep": self.mlflow["sweep"], "wsssrec.trial_id": trial_id}
        run = self.client.create_run(self.mlflow["experiment_id"], run_name=f"{self.mlflow['sweep']}-{trial_id}",
                                     tags=tags)
        log_params_batched(self.client, run.info.run_id, flatten(trial_config(self.base, record["params"], trial_id)))
        return run.info.run_id

    def _close_run(self, record: dict[str, Any], status: str) -> None:
        if self.mlflow and record.get("run_id"):
            self.client.set_tag(record["run_id"], "wsssrec.trial_outcome", record["status"])
            self.client.set_terminated(record["run_id"], status)
        self._save()

    def _save(self) -> None:
        from trainer.files import write_json

        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.state_path, self.trials)
