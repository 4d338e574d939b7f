"""MLflow tracking: params from the resolved config, per-step metrics, the config and picture grids as
artifacts, the git revision. Only rank 0 logs; other ranks get a tracker that does nothing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import Config, flatten
from .runtime import git_revision

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: Config, run_name: str, active: bool = True, parent_run_id: str | None = None):
        self.active = active and cfg.mlflow.enabled
        self.run_id: str | None = None
        self.pending: list = []
        if not self.active:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            location = cfg.mlflow.artifact_location
            if "://" not in location:  # a local folder; sqlite would otherwise put artifacts in ./mlruns
                location = Path(location).resolve().as_uri()
            experiment_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = git_revision()
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.client = mlflow.MlflowClient()
        params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
        for chunk in _chunks(list(params.items()), 100):
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in chunk])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        now = int(time.time() * 1000)
        self.pending += [self.mlflow.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.flush()

    def flush(self) -> bool:
        """Send buffered metrics; on a tracking-store error keep them for the next call (training goes on)."""
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:500])
                self.pending = self.pending[500:]
        except Exception as err:  # noqa: BLE001 - any store/network failure must not stop training
            log.warning("MLflow logging failed (%s); %d metrics kept for retry", err, len(self.pending))
            return False
        return True

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, status)
            self.active = False


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
