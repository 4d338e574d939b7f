"""The MLflow model registry: register g (`wsssrec-classifier`) and the segmenter (`wsssrec-segmenter`) with
their lineage (config, metrics, data manifest and its hash, g's registry URI and version, git revision),
promote a version to an alias and list versions. Model URIs are resolved in `model_uri`."""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import Config
from .loop import StageResult
from .model_uri import RegistryError, file_sha256, resolve
from .tracking import connect, manifest_fingerprint, tracking_uri

METRIC_TAG_PREFIX = "metric."


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
    from .weights import read_segmenter_file

    stored = read_segmenter_file(weights)
    g_path = Path(classifier or stored.config.classifier.checkpoint)
    cfg = replace(stored.config, mlflow=replace(stored.config.mlflow, tracking_uri=uri or tracking_uri()),
                  classifier=replace(stored.config.classifier, checkpoint=str(g_path)))  # also the gate's g
    g_lineage = ensure_classifier_registered(cfg, g_path) if g_path.is_file() else {}
    return register(cfg, "segmenter", stored.path, stored.classes, None, g_lineage=g_lineage, alias=alias)


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

# ---- glue for the drivers: one stage's result → one registered version ----

def register_stage(cfg: Config, result: StageResult, eval_run_id: str | None = None, alias: str | None = None):
    """Register what a stage made, linked to its run; a segmenter also carries g's lineage (and its
    `model.init_from`) and, given `eval_run_id`, the evaluation metrics (segmenter and g on every split)."""
    from .data import dataset_classes
    from .weights import classifier_path

    client = connect(tracking_uri(cfg))
    metrics: dict[str, float] = {}
    lineage = dict(result.lineage)
    if result.stage == "segmenter":
        g_keys = {k: v for k, v in lineage.items() if k.startswith("classifier.")}
        lineage.update(classifier_lineage(client, cfg, classifier_path(cfg), g_keys))
        if eval_run_id:
            metrics = {k: v for k, v in client.get_run(eval_run_id).data.metrics.items()
                       if "/method/" in k or "/g_" in k or "/CAM/miou" in k}
    return register(cfg, result.stage, result.weights, dataset_classes(cfg), result.run_id, metrics=metrics,
                    g_lineage=lineage, alias=alias)


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
