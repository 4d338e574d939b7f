"""Register a sweep's best segmenter and decide its alias: `champion` only when it beats the current champion
on the same validation metric over the same data (manifest hash and image size), else `challenger`. A
champion that cannot be compared (another data set, or no such metric) keeps its alias."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import Config
from trainer.registry import METRIC_TAG_PREFIX, register
from trainer.tracking import connect, tracking_uri


@dataclass
class Decision:
    version: str
    alias: str  # "champion" | "challenger"
    reason: str


def beats(value: float, current: float, mode: str) -> bool:
    """Strictly better, at the precision the registry keeps metric tags (6 significant digits)."""
    value, current = float(f"{value:.6g}"), float(f"{current:.6g}")
    return value > current if mode == "max" else value < current


def decide(champion_tags: dict[str, str] | None, new_tags: dict[str, str], metric: str, value: float,
           mode: str) -> tuple[str, str]:
    """(alias, reason) for a new version with `new_tags` against the current champion's tags (None: no
    champion yet)."""
    if champion_tags is None:
        return "champion", "no champion yet"
    for key in ("data.manifest_sha256", "image_size"):
        if champion_tags.get(key) != new_tags.get(key):
            return "challenger", (f"the champion was validated on other data ({key} {champion_tags.get(key)} vs "
                                  f"{new_tags.get(key)}): not comparable, promote by hand if wanted")
    current = champion_tags.get(METRIC_TAG_PREFIX + metric)
    if current is None:
        return "challenger", f"the champion has no {metric} to compare with: promote by hand if wanted"
    if beats(value, float(current), mode):
        return "champion", f"{metric} {value:.4f} beats the champion's {float(current):.4f}"
    return "challenger", f"{metric} {value:.4f} does not beat the champion's {float(current):.4f}"


def register_winner(cfg: Config, weights: Path, classes: list[str], run_id: str | None, metric: str,
                    value: float, mode: str, metrics: dict[str, float], g_lineage: dict[str, str]) -> Decision:
    """Register `weights` as a new segmenter version of the trial's run and point the alias it earns at it."""
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri(cfg))
    name = cfg.mlflow.segmenter_model
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None  # no such model or no champion yet
    version = register(cfg, "segmenter", weights, classes, run_id, metrics={**metrics, metric: value},
                       g_lineage=g_lineage)
    alias, reason = decide(dict(champion.tags) if champion else None, dict(version.tags), metric, value, mode)
    client.set_registered_model_alias(name, alias, version.version)
    return Decision(str(version.version), alias, reason)
