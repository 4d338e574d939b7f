"""MLflow, the connection side: which tracking URI (MLFLOW_TRACKING_URI or the config's), a client after a
fast health check (a clear TrackingError instead of minutes of retries), the experiment, the data manifest's
fingerprint, metric and tag names as MLflow accepts them, and MLflow's module-level URI set for one block.
The run tracker itself (a background sender that never blocks training) is `tracker.Tracker`."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger(__name__)

# MLflow's own HTTP defaults (7 retries, backoff factor 2, 120 s timeout) retry one request for ~4 minutes.
# Ours are shorter: the queue below already retries forever in the background, and a command that talks to
# the registry should fail within seconds, not minutes. Users can still set these variables themselves.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """The MLflow tracking server or registry cannot be used; the message says which one and what to do."""


def tracking_uri(cfg: Config | None = None) -> str:
    """MLFLOW_TRACKING_URI when set (a team server), else the config's (default: the embedded sqlite file)."""
    from .config import MlflowConfig

    return os.environ.get("MLFLOW_TRACKING_URI") or (cfg.mlflow if cfg else MlflowConfig()).tracking_uri


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0] in ("http", "https")


def connect(uri: str, attempts: int = 3):
    """An MlflowClient for `uri` after checking that a remote server answers `/health`; raises TrackingError
    within a few seconds when it does not (instead of MLflow's minutes of retries). MLflow's module-level URI
    is left alone: `mlflow.set_tracking_uri` would also export MLFLOW_TRACKING_URI to every later subprocess."""
    import mlflow

    if is_remote(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        _check_health(uri, attempts)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_health(uri: str, attempts: int) -> None:
    import requests

    url = uri.rstrip("/") + "/health"
    error: Exception | str = ""
    for attempt in range(attempts):
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return
            error = f"HTTP {response.status_code} from {url}"
        except requests.RequestException as err:
            error = err
        if attempt + 1 < attempts:
            time.sleep(1.0 * (attempt + 1))
    raise TrackingError(f"MLflow tracking server {uri} is unreachable ({short_error(error)}); start it, point "
                        "MLFLOW_TRACKING_URI (or mlflow.tracking_uri) at a running server, or set "
                        "mlflow.enabled=false to train without tracking")


def short_error(err: Exception | str) -> str:
    text = str(err)
    return text if len(text) < 300 else text[:300] + "..."


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 for a plain process)."""
    return int(os.environ.get("RANK", "0"))


def manifest_fingerprint(data_url: str) -> dict[str, str]:
    """The data set's manifest URL and the SHA-256 of its bytes (which shards, how many samples, classes)."""
    from data_shards.errors import DataError
    from data_shards.manifest import manifest_url, open_url

    url = manifest_url(data_url)
    try:
        with open_url(url, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except (OSError, DataError) as err:
        log.warning("cannot read the data manifest %s for its hash: %s", url, err)
        return {"data.manifest_url": url, "data.manifest_sha256": "unavailable"}
    return {"data.manifest_url": url, "data.manifest_sha256": digest}


def experiment_id_for(client, cfg: Config, uri: str) -> str:
    """The configured experiment, created on first use. Local stores get `mlflow.artifact_location` (sqlite
    would otherwise write to ./mlruns); a remote server keeps its own (--artifacts-destination) unless the
    configured location is a URL such as s3://bucket/prefix."""
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = cfg.mlflow.artifact_location
    if "://" not in location:
        location = None if is_remote(uri) else Path(location).resolve().as_uri()
    try:
        return client.create_experiment(cfg.mlflow.experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


# the names MLflow's stores accept for metrics and tags; the server rejects a whole batch holding any other name,
# and the sender would retry that batch, and so hold back everything queued after it, until it gives up
INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def mlflow_name(name: str) -> str:
    """`name` as MLflow accepts it: every character outside letters, digits, '_', '-', '.', ' ', ':' and '/'
    (e.g. of a class name from a user's data set) becomes '_'; no leading '/', no '..'."""
    clean = INVALID_NAME_CHARS.sub("_", name).lstrip("/")
    while ".." in clean:
        clean = clean.replace("..", "._")
    return clean or "_"


_RENAMED_WARNED: set[str] = set()


def mlflow_names(items: dict[str, Any], kind: str) -> dict[str, Any]:
    renamed = {k: clean for k in items if (clean := mlflow_name(k)) != k}
    new = {k: v for k, v in renamed.items() if k not in _RENAMED_WARNED}
    if new:  # once per name, not at every step
        _RENAMED_WARNED.update(new)
        log.warning("MLflow %s names renamed to what MLflow accepts: %s", kind,
                    ", ".join(f"{k!r} → {v!r}" for k, v in new.items()))
    return {renamed.get(k, k): v for k, v in items.items()}


@contextlib.contextmanager
def module_tracking_uri(uri: str):
    """MLflow's module-level tracking URI set to `uri` inside the block only. Some MLflow 3 paths ignore the
    URI of the client they are called through and use the module-level one: the SQL registry store checks a
    `models:/m-…` source through a default MlflowClient, and `download_artifacts` of a `models:/` URI resolves
    the logged model the same way. With a local store other than the default `sqlite:///mlflow.db` both then
    fail ("Logged model with ID … not found", "Registered Model … not found"). Afterwards both the module-level
    URI and MLFLOW_TRACKING_URI are put back exactly as they were (set_tracking_uri exports the variable to
    every later subprocess)."""
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
