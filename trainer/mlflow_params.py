"""Logging many params to one MLflow run: the store takes at most 100 params per `log_batch` and 6000
characters per value, so a whole resolved config goes in batches of 100 with long values cut."""
from __future__ import annotations

from typing import Any

BATCH = 100  # MLflow's limit on params per log_batch
MAX_VALUE = 6000  # MLflow's limit on a param value's length


def log_params_batched(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log `params` ({name: value}, values turned into text) to run `run_id` through `client` (an
    MlflowClient)."""
    from mlflow.entities import Param

    entries = [Param(key, str(value)[:MAX_VALUE]) for key, value in params.items()]
    for start in range(0, len(entries), BATCH):
        client.log_batch(run_id, params=entries[start:start + BATCH])
