"""The MLflow model registry: register g (`wsssrec-classifier`) and the segmenter (`wsssrec-segmenter`) with
their lineage (config, metrics, data manifest and its hash, g's registry URI and version, git revision),
promote a version to an alias, list versions, and turn `models:/...` or `runs:/...` URIs into local model
folders with errors that name the model, the alias and the server."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .tracking import TrackingError, connect, manifest_fingerprint, module_tracking_uri, tracking_uri

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")
METRIC_TAG_PREFIX = "metric."


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


def load_predictor(uri: str, cache_dir: str | Path | None = None):
    """A segmenter or classifier predictor from a registry/run URI, a downloaded model folder, or a local
    checkpoint file (segmenter.pt); weights always load with weights_only=True."""
    from .pyfunc import SegmenterPredictor, load_model_dir

    path = Path(uri)
    if not is_model_uri(uri):
        if path.is_dir():
            return load_model_dir(path)
        if path.is_file():
            from .weights import load_segmenter

            model, cfg, classes = load_segmenter(path)
            if cfg.eval.gate_threshold <= 0:
                return SegmenterPredictor(model, cfg, classes)
            from .weights import load_frozen_g  # the gate's g: the checkpoint config's classifier.checkpoint

            _, g = load_frozen_g(cfg, len(classes))
            return SegmenterPredictor(model, cfg, classes, g=g, gate_threshold=cfg.eval.gate_threshold)
        raise FileNotFoundError(f"model {uri} is neither a models:/ or runs:/ URI nor an existing checkpoint "
                                "or model folder")
    if cache_dir:
        _, local = download(uri, Path(cache_dir) / "model")
        return load_model_dir(local)
    with tempfile.TemporaryDirectory(prefix="wsssrec-model-") as tmp:  # weights are read into memory
        _, local = download(uri, Path(tmp) / "model")
        return load_model_dir(local)


# ---- registering ----

def lineage_tags(cfg: Config, kind: str, weights: Path, g_lineage: dict[str, str] | None = None) -> dict[str, str]:
    from .files import git_revision

    tags = {"wsssrec.kind": kind, "weights_sha256": file_sha256(weights), "image_size": str(cfg.data.image_size),
            **manifest_fingerprint(cfg.data.url), **git_revision()}
    if kind == "segmenter":
        tags.update(g_lineage or {})
    return tags


def classifier_lineage(client, cfg: Config, weights: Path, resolved: dict[str, str] | None = None) -> dict[str, str]:
    """Which g a segmenter is trained against: its registry URI and version when it came from the registry
    (or when a registered version has the same weights), else the local checkpoint path; always its hash."""
    if resolved:
        return resolved
    digest = file_sha256(weights)
    lineage = {"classifier.checkpoint": str(weights), "classifier.weights_sha256": digest}
    mv = find_version_by_weights(client, cfg.mlflow.classifier_model, digest)
    if mv is not None:
        lineage.update({"classifier.model_uri": f"models:/{mv.name}/{mv.version}",
                        "classifier.model_version": str(mv.version)})
    return lineage


def find_version_by_weights(client, name: str, digest: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}' and tags.weights_sha256='{digest}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def resolve_classifier(cfg: Config) -> dict[str, str]:
    """`classifier.checkpoint=models:/NAME@ALIAS` (or /VERSION, runs:/...): download g's weights into the run
    folder and point the config at them; returns g's lineage tags (URI asked for, version, hash). A local
    path is left as it is (empty lineage: `classifier_lineage` finds it in the registry by hash later)."""
    from .files import run_dir

    uri = cfg.classifier.checkpoint
    if not is_model_uri(uri):
        return {}
    where = tracking_uri(cfg)
    ref = resolve(connect(where), uri, where)
    tag = f"{ref.name}-v{ref.version}" if ref.version else hashlib.sha1(uri.encode()).hexdigest()[:12]
    target = run_dir(cfg) / "registry" / tag
    weights = target / "data" / "classifier.pt"
    if not weights.is_file() or file_sha256(weights) != ref.tags.get("weights_sha256", file_sha256(weights)):
        _, target = download(ref.canonical, target, where)
    if not weights.is_file():
        raise RegistryError(f"{uri} ({ref.canonical}) is not a wsssrec classifier: no data/classifier.pt in it")
    cfg.classifier.checkpoint = str(weights)
    print(f"g from the registry: {uri} → {ref.canonical} ({weights})")
    return {"classifier.model_uri": ref.canonical, "classifier.model_uri_requested": uri,
            "classifier.model_version": ref.version or "", "classifier.weights_sha256": file_sha256(weights)}


def resolve_init_from(cfg: Config) -> dict[str, str]:
    """`model.init_from=models:/NAME@ALIAS` (or /VERSION, runs:/...): download that segmenter into the run
    folder and point the config at its segmenter.pt; a local path must exist. Returns the lineage the run and
    the registered model record: the URI asked for, the resolved version and its run, the weights' hash."""
    from .config import ConfigError
    from .files import run_dir

    uri = cfg.model.init_from
    if not uri:
        return {}
    if not is_model_uri(uri):
        if not Path(uri).is_file():
            raise ConfigError(f"model.init_from = {uri!r}: no such segmenter checkpoint (expected a segmenter.pt "
                              "path or a models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ URI)")
        return {"init_from": uri, "init_from.weights_sha256": file_sha256(uri)}
    where = tracking_uri(cfg)
    ref = resolve(connect(where), uri, where)
    tag = f"{ref.name}-v{ref.version}" if ref.version else hashlib.sha1(uri.encode()).hexdigest()[:12]
    target = run_dir(cfg) / "registry" / f"init-{tag}"
    weights = target / "data" / "segmenter.pt"
    if not weights.is_file() or file_sha256(weights) != ref.tags.get("weights_sha256", file_sha256(weights)):
        _, target = download(ref.canonical, target, where)
    if not weights.is_file():
        raise RegistryError(f"model.init_from {uri} ({ref.canonical}) is not a wsssrec segmenter: no "
                            "data/segmenter.pt in it")
    cfg.model.init_from = str(weights)
    print(f"init_from: {uri} → {ref.canonical} ({weights})")
    lineage = {"init_from": uri, "init_from.model_uri": ref.canonical, "init_from.model_version": ref.version,
               "init_from.run_id": ref.run_id, "init_from.weights_sha256": file_sha256(weights)}
    return {k: v for k, v in lineage.items() if v}  # a version registered from a file has no run


def register(cfg: Config, kind: str, weights: str | Path, classes: list[str], run_id: str | None,
             metrics: dict[str, float] | None = None, g_lineage: dict[str, str] | None = None,
             alias: str | None = None, extra_files: dict[str, str | Path] | None = None):
    """Log `weights` as a wsssrec model of `run_id` and register it under the configured name; the version
    carries the config (config.yaml + the run's params), metrics (tags metric.* + metrics.json), the data
    manifest (tags + manifest.json), g's lineage (segmenter), git revision and the signature."""
    from .pyfunc import log_model
    from .tracking import experiment_id_for

    client = connect(tracking_uri(cfg))
    name = cfg.mlflow.classifier_model if kind == "classifier" else cfg.mlflow.segmenter_model
    weights = Path(weights)
    metrics = dict(metrics or {})
    if run_id:
        run = client.get_run(run_id)
        metrics = {**run.data.metrics, **metrics}
        experiment_id = run.info.experiment_id
    else:
        experiment_id = experiment_id_for(client, cfg, tracking_uri(cfg))
    tags = lineage_tags(cfg, kind, weights, g_lineage)
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(extra_files or {})
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (Path(tmp) / "lineage.json").write_text(json.dumps(tags, indent=2, sort_keys=True))
        files.update({"metrics.json": Path(tmp) / "metrics.json", "lineage.json": Path(tmp) / "lineage.json"})
        manifest = tags.get("data.manifest_url", "")
        if manifest and "://" not in manifest and Path(manifest).is_file():
            files["manifest.json"] = manifest
        from .weights import classifier_path

        gate_weights = classifier_path(cfg) if kind == "segmenter" else None  # carried when the gate is on
        version = str(log_model(client, kind=kind, weights=weights, cfg=cfg, classes=classes,
                                experiment_id=experiment_id, run_id=run_id, registered_model_name=name, tags=tags,
                                extra_files=files, gate_weights=gate_weights).version)
    for key, value in {**tags, **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in metrics.items()}}.items():
        client.set_model_version_tag(name, version, key, value)
    source = f"run {run_id}" if run_id else f"checkpoint {weights}"
    g_text = f" against g {g_lineage.get('classifier.model_uri', g_lineage.get('classifier.checkpoint'))}" \
        if kind == "segmenter" and g_lineage else ""
    client.update_model_version(name, version, description=f"{kind} from {source}{g_text}; data "
                                f"{tags.get('data.manifest_url')} (sha256 {tags.get('data.manifest_sha256', '')[:12]})")
    if run_id:
        for key in ("classifier.model_uri", "classifier.model_version", "classifier.weights_sha256"):
            if key in tags:
                client.set_tag(run_id, key, tags[key])
        client.set_tag(run_id, f"registered.{kind}", f"models:/{name}/{version}")
    if alias:
        client.set_registered_model_alias(name, alias, version)
    print(f"registered {kind}: models:/{name}/{version}" + (f" (alias {alias}: models:/{name}@{alias})" if alias else ""))
    return client.get_model_version(name, version)


def register_file(weights: str | Path, alias: str | None = None, uri: str | None = None,
                  classifier: str | None = None):
    """Register a segmenter.pt written earlier (its stored config and classes; g's lineage from `classifier`
    or the stored classifier.checkpoint, registered too when the registry does not hold it yet)."""
    import torch

    from .config import config_from_dict

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {weights} does not exist")
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "classes" not in blob:
        raise RegistryError(f"{weights} is not a wsssrec segmenter.pt (no stored config and classes)")
    cfg = config_from_dict(blob["config"], strict=False)
    cfg.mlflow.tracking_uri = uri or tracking_uri()
    g_path = Path(classifier or cfg.classifier.checkpoint)
    cfg.classifier.checkpoint = str(g_path)  # g's lineage, and the preserve gate's g when the gate is on
    g_lineage = ensure_classifier_registered(cfg, g_path) if g_path.is_file() else {}
    return register(cfg, "segmenter", weights, list(blob["classes"]), None, g_lineage=g_lineage, alias=alias)


def promote(name: str, version: str, alias: str, uri: str | None = None) -> str:
    """Point `alias` of model `name` at `version` (checking both exist); returns the alias URI."""
    where = uri or tracking_uri()
    client = connect(where)
    ref = resolve(client, f"models:/{name}/{version}", where)
    client.set_registered_model_alias(name, alias, ref.version)
    return f"models:/{name}@{alias}"


def list_versions(names: list[str] | None = None, uri: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, source run, g lineage and key metrics."""
    where = uri or tracking_uri()
    client = connect(where)
    known = sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name)
    missing = [n for n in names or [] if n not in {m.name for m in known}]
    if missing:
        raise RegistryError(f"no registered model {', '.join(map(repr, missing))} in the registry at {where} "
                            f"(registered: {', '.join(m.name for m in known) or 'none'})")
    models = [m for m in known if not names or m.name in names]
    rows = []
    for model in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: -int(v.version)):
            rows.append({"name": model.name, "version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                         "run_id": mv.run_id or "", "created": mv.creation_timestamp, "tags": dict(mv.tags)})
    return rows


def key_metrics(tags: dict[str, str]) -> str:
    """The few metrics `registry ls` shows: segmenter mIoU per split, g accuracy per split."""
    wanted = [k for k in sorted(tags) if k.startswith(METRIC_TAG_PREFIX)
              and (k.endswith("/method/miou") or re.search(r"/g_accuracy$", k))]
    if not wanted:
        wanted = [k for k in sorted(tags) if k.startswith(METRIC_TAG_PREFIX) and k.endswith("loss")]
    return " ".join(f"{k[len(METRIC_TAG_PREFIX):]}={float(tags[k]):.3f}" for k in wanted[:6])


def format_versions(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no registered models"
    lines = [f"{'model':<22} {'ver':>4}  {'aliases':<12} {'run':<12} {'g':<28} metrics"]
    for row in rows:
        tags = row["tags"]
        g = tags.get("classifier.model_uri", "") if tags.get("wsssrec.kind") == "segmenter" else ""
        lines.append(f"{row['name']:<22} {row['version']:>4}  {','.join(row['aliases']) or '-':<12} "
                     f"{row['run_id'][:12]:<12} {g or '-':<28} {key_metrics(tags)}")
    return "\n".join(lines)


# ---- glue for the CLI: one stage's run → one registered version ----

def stage_run_name(cfg: Config, stage: str) -> str:
    """The run name the stages give their MLflow runs (`<run_name>-classifier|segmenter|eval`)."""
    return f"{cfg.train.run_name or 'run'}-{stage}"


def forget_stage_run(cfg: Config, stage: str) -> None:
    """Drop the run record an earlier command left, so a stage's record is always this command's run."""
    from .tracking import run_record_path

    run_record_path(cfg, stage_run_name(cfg, stage)).unlink(missing_ok=True)


def stage_run_id(cfg: Config, stage: str) -> str | None:
    from .tracking import read_run_record

    record = read_run_record(cfg, stage_run_name(cfg, stage))
    return record["run_id"] if record else None


def register_stage(cfg: Config, kind: str, weights: str | Path, g_lineage: dict[str, str] | None = None,
                   eval_run_id: str | None = None, alias: str | None = None):
    """Register what stage `kind` just wrote, linked to its run; a segmenter also carries g's lineage and,
    given `eval_run_id`, the evaluation metrics (segmenter and g on every split)."""
    from .weights import classifier_path
    from .data import dataset_classes

    where = tracking_uri(cfg)
    client = connect(where)
    metrics: dict[str, float] = {}
    if kind == "segmenter":
        g_lineage = classifier_lineage(client, cfg, classifier_path(cfg), g_lineage)
        init_record = Path(weights).parent / "init_from.json"  # written by a run started with model.init_from
        if cfg.model.init_from and init_record.is_file():
            g_lineage = {**g_lineage, **json.loads(init_record.read_text())["lineage"]}
        if eval_run_id:
            metrics = {k: v for k, v in client.get_run(eval_run_id).data.metrics.items()
                       if "/method/" in k or "/g_" in k or "/CAM/miou" in k}
    return register(cfg, kind, weights, dataset_classes(cfg), stage_run_id(cfg, kind), metrics=metrics,
                    g_lineage=g_lineage, alias=alias)


def ensure_classifier_registered(cfg: Config, weights: Path, alias: str | None = None) -> dict[str, str]:
    """g's lineage; registers a g checkpoint that no registered version holds yet (e.g. from an older run),
    so that every registered segmenter can point at its g in the registry."""
    client = connect(tracking_uri(cfg))
    lineage = classifier_lineage(client, cfg, weights)
    if "classifier.model_uri" not in lineage:
        from .data import dataset_classes

        mv = register(cfg, "classifier", weights, dataset_classes(cfg), None, alias=alias)
        lineage.update({"classifier.model_uri": f"models:/{mv.name}/{mv.version}",
                        "classifier.model_version": str(mv.version)})
    return lineage


def export_sample_images(cfg: Config, out: Path, count: int = 8) -> Path:
    """A few images of the last evaluation split as plain JPEGs, so the printed predict command runs as is."""
    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest

    out.mkdir(parents=True, exist_ok=True)
    split = read_manifest(cfg.data.url).split(cfg.eval.splits[-1])
    written = 0
    for shard in split.shards:
        for sample in raw_samples(shard):
            if written >= count:
                return out
            (out / f"{sample['__key__'].replace('/', '_')}.jpg").write_bytes(sample["jpg"])
            written += 1
    return out


def predict_hint(cfg: Config, version) -> str:
    """The command that segments images with the segmenter the demo just registered."""
    from .files import run_dir

    samples = export_sample_images(cfg, run_dir(cfg) / "sample_images")
    uri = tracking_uri(cfg)
    env = "" if uri == "sqlite:///mlflow.db" else f"MLFLOW_TRACKING_URI={uri} "
    script = Path(sys.executable).parent / "wsssrec"  # `make demo` runs from .venv, which may not be on PATH
    command = "wsssrec" if shutil.which("wsssrec") == str(script) or not script.exists() else os.path.relpath(script)
    return (f"segmenter registered as models:/{version.name}/{version.version} with alias champion; segment "
            f"images with it:\n  {env}{command} predict --model models:/{version.name}@champion --images {samples} "
            f"--out {run_dir(cfg) / 'predicted'}")
