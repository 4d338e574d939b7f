"""Model URIs: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/m-<id>` and `runs:/RUN/PATH` resolved
against the MLflow registry (errors that name the model, the alias and the server), downloaded into local
model folders, and the config's URI-valued keys (`classifier.checkpoint`, `model.init_from`,
`classifier.decouple_from`) turned into local files. Drivers (the CLI, the demo, a sweep trial) resolve once and
hand plain paths down."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config, ConfigError
from .files import run_dir
from .tracking import TrackingError, connect, module_tracking_uri, tracking_uri

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


class RegistryError(TrackingError):
    """A model URI that does not resolve: unknown model, version or alias."""


def is_model_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelRef:
    """A model URI resolved against the registry: `canonical` names one immutable version."""
    uri: str
    canonical: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _not_found(err: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower()


def resolve(client, uri: str, where: str) -> ModelRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest`, `models:/m-<id>` or
    `runs:/RUN/PATH` → one model version (RegistryError naming what is missing otherwise). `where` is the
    server's URI, for the messages."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if not _not_found(err):
                raise
            raise RegistryError(f"{uri}: no run {run_id!r} on the tracking server {where}") from None
        return ModelRef(uri, uri, run_id=run_id)
    match = MODEL_URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r} is not a model URI; expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                            "runs:/RUN_ID/PATH or a local path")
    name, alias, version = match["name"], match["alias"], match["version"]
    if name.startswith("m-") and not alias and not version:  # a logged model id (MLflow 3)
        try:
            logged = client.get_logged_model(name)
        except MlflowException as err:
            if not _not_found(err):
                raise
            raise RegistryError(f"{uri}: no logged model {name!r} on {where}") from None
        return ModelRef(uri, uri, run_id=logged.source_run_id, tags=dict(logged.tags))
    try:
        registered = client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise RegistryError(f"{uri}: no registered model {name!r} in the registry at {where} (registered: "
                            f"{', '.join(known) or 'none'})") from None
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version in (None, "latest"):
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise RegistryError(f"{uri}: model {name!r} has no versions yet")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as err:
        if not _not_found(err):
            raise
        if alias:
            aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(registered.aliases.items())) or "none"
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {aliases}); set one with "
                                f"`wsssrec registry promote {name} VERSION --alias {alias}`") from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{uri}: model {name!r} has no version {version!r} (versions: "
                            f"{', '.join(map(str, versions)) or 'none'})") from None
    return ModelRef(uri, f"models:/{name}/{mv.version}", name=name, version=str(mv.version), run_id=mv.run_id,
                    tags=dict(mv.tags))


def download(uri: str, dst: str | Path, uri_of_server: str | None = None) -> tuple[ModelRef, Path]:
    """Resolve `uri` and download that exact version's model folder into `dst` (replaced atomically, so
    concurrent ranks never see half a folder). Returns the reference and the folder."""
    import mlflow

    where = uri_of_server or tracking_uri()
    client = connect(where)
    ref = resolve(client, uri, where)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            with module_tracking_uri(where):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.canonical, dst_path=str(staging),
                                                                 tracking_uri=where, registry_uri=where))
        except Exception as err:  # noqa: BLE001 - name the model and the server, not a stack of retries
            raise TrackingError(f"downloading {uri} ({ref.canonical}) from {where} failed: {err}") from err
        if dst.exists():
            shutil.rmtree(dst, ignore_errors=True)
        os.replace(local, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ref, dst


def fetch_weights(cfg: Config, uri: str, folder_prefix: str, weights_file: str, what: str) -> tuple[ModelRef, Path]:
    """The weights file `data/<weights_file>` of model `uri`, downloaded into <run dir>/registry/ (kept and
    reused while its hash matches the registered one)."""
    where = tracking_uri(cfg)
    ref = resolve(connect(where), uri, where)
    tag = f"{ref.name}-v{ref.version}" if ref.version else hashlib.sha1(uri.encode()).hexdigest()[:12]
    target = run_dir(cfg) / "registry" / f"{folder_prefix}{tag}"
    weights = target / "data" / weights_file
    if not weights.is_file() or file_sha256(weights) != ref.tags.get("weights_sha256", file_sha256(weights)):
        download(ref.canonical, target, where)
    if not weights.is_file():
        raise RegistryError(f"{uri} ({ref.canonical}) is not a wsssrec {what}: no data/{weights_file} in it")
    return ref, weights


def resolve_classifier(cfg: Config) -> tuple[Config, dict[str, str]]:
    """`classifier.checkpoint=models:/NAME@ALIAS` (or /VERSION, runs:/...): download g's weights into the run
    folder; returns a config that points at them and g's lineage tags (URI asked for, version, hash). A local
    path is left as it is (empty lineage: `registry.classifier_lineage` finds it in the registry by hash)."""
    uri = cfg.classifier.checkpoint
    if not is_model_uri(uri):
        return cfg, {}
    ref, weights = fetch_weights(cfg, uri, "", "classifier.pt", "classifier")
    print(f"g from the registry: {uri} → {ref.canonical} ({weights})")
    lineage = {"classifier.model_uri": ref.canonical, "classifier.model_uri_requested": uri,
               "classifier.model_version": ref.version or "", "classifier.weights_sha256": file_sha256(weights)}
    return replace(cfg, classifier=replace(cfg.classifier, checkpoint=str(weights))), lineage


def resolve_segmenter_key(cfg: Config, key: str, folder_prefix: str) -> tuple[Config, dict[str, str]]:
    """A segmenter-valued config key (`model.init_from`, `classifier.decouple_from`) given as
    models:/NAME@ALIAS (or /VERSION, runs:/...): download that segmenter into the run folder; a local path must
    exist. Returns a config that points at the local segmenter.pt and the lineage the run and the registered
    model record under the key's last part: the URI asked for, the resolved version and its run, the hash."""
    section, name = key.split(".")
    uri = getattr(getattr(cfg, section), name)
    if not uri:
        return cfg, {}
    if not is_model_uri(uri):
        if not Path(uri).is_file():
            raise ConfigError(f"{key} = {uri!r}: no such segmenter checkpoint (expected a segmenter.pt "
                              "path or a models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ URI)")
        return cfg, {name: uri, f"{name}.weights_sha256": file_sha256(uri)}
    ref, weights = fetch_weights(cfg, uri, folder_prefix, "segmenter.pt", "segmenter")
    print(f"{name}: {uri} → {ref.canonical} ({weights})")
    lineage = {name: uri, f"{name}.model_uri": ref.canonical, f"{name}.model_version": ref.version,
               f"{name}.run_id": ref.run_id, f"{name}.weights_sha256": file_sha256(weights)}
    resolved = replace(cfg, **{section: replace(getattr(cfg, section), **{name: str(weights)})})
    return resolved, {k: v for k, v in lineage.items() if v}  # a version registered from a file has no run


def resolve_init_from(cfg: Config) -> tuple[Config, dict[str, str]]:
    """`model.init_from` as a local segmenter.pt, and its lineage (`resolve_segmenter_key`)."""
    return resolve_segmenter_key(cfg, "model.init_from", "init-")


def resolve_decouple_from(cfg: Config) -> tuple[Config, dict[str, str]]:
    """`classifier.decouple_from` (stage 1's first-round segmenter) as a local segmenter.pt, and its lineage."""
    return resolve_segmenter_key(cfg, "classifier.decouple_from", "decouple-")
