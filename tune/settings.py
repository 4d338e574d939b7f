"""What a sweep is: the experiment config every trial starts from, plus the `sweep:` settings (search space,
searcher, ASHA, Ray Train workers per trial, storage). A sweep file names its experiment config; a plain
experiment config is a sweep with the default settings. `sweep.x=v` overrides go to the sweep, all other
`key.sub=value` overrides to the experiment."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import Config, ConfigError, _merge, load_config, parse_override

SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "none")
METRICS = ("auto", "miou", "loss")


@dataclass
class SearchSpace:
    """λ_m and λ_c are drawn log-uniformly from [low, high]; K uniformly from the integers [low, high]
    (0 stands for C + 1; components beyond C + 1 are extra background components; a bound may also be written
    relative to the data set's C, e.g. ["C+1", "2C+1"]). low == high fixes a value."""
    lambda_m: list = field(default_factory=lambda: [0.1, 10.0])
    lambda_c: list = field(default_factory=lambda: [0.1, 10.0])
    K: list = field(default_factory=lambda: [0, 0])


@dataclass
class SweepConfig:
    name: str = "sweep"  # Tune experiment name: <storage_path>/<name>, runs under <train.out_dir>/<name>
    num_samples: int = 8
    searcher: str = "random"  # "random" | "optuna" (TPE; pip install 'wsssrec[tune]')
    seed: int = 0
    points_to_evaluate: list = field(default_factory=list)  # settings tried first: [{lambda_m, lambda_c, K}]
    scheduler: str = "asha"  # "asha" (stop weak trials between rungs) | "none" (every trial runs to the end)
    metric: str = "auto"  # "miou" (validation mIoU), "loss" (validation loss), "auto": mIoU if the split has masks
    split: str = "val"  # the validation split ASHA and the registry compare on
    rungs: int = 4  # train.steps is run in this many pieces; ASHA decides after each
    grace_period: int = 1  # ASHA: rungs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each milestone
    max_concurrent: int = 0  # trials at once; 0 = as many as the resources allow
    workers: int = 1  # Ray Train workers (DeepSpeed ranks) per trial
    use_gpu: bool = False  # one GPU per worker (NCCL); CPU workers use gloo
    cpus_per_worker: float = 1.0
    trial_cpus: float = 0.5  # the Tune trial process that launches the trial's TorchTrainer
    storage_path: str = "runs/ray"  # Ray's experiment and checkpoint storage: a shared path or s3://...
    ray_address: str = ""  # "" → $RAY_ADDRESS, else a new local Ray; "auto" joins the running cluster
    ray_num_cpus: int = 0  # a new local Ray only: CPUs it may schedule (0 = the machine's count)
    register: bool = True  # register the best trial's segmenter (champion if it beats the current one)
    search: SearchSpace = field(default_factory=SearchSpace)


@dataclass
class Sweep:
    settings: SweepConfig
    experiment: Config
    source: str  # the file it came from, for messages


def _check(settings: SweepConfig) -> None:
    if settings.searcher not in SEARCHERS:
        raise ConfigError(f"sweep.searcher is {settings.searcher!r}; expected one of {', '.join(SEARCHERS)}")
    if settings.scheduler not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler is {settings.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    if settings.metric not in METRICS:
        raise ConfigError(f"sweep.metric is {settings.metric!r}; expected one of {', '.join(METRICS)}")
    for key in ("num_samples", "rungs", "grace_period", "workers"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"sweep.{key} must be at least 1, got {getattr(settings, key)}")
    if settings.reduction_factor < 2:
        raise ConfigError(f"sweep.reduction_factor must be at least 2, got {settings.reduction_factor}")
    if settings.trial_cpus <= 0:
        raise ConfigError("sweep.trial_cpus must be > 0 (Ray schedules a trial only with some CPU)")
    for key in ("lambda_m", "lambda_c", "K"):
        value = getattr(settings.search, key)
        numeric = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        if key == "K" and isinstance(value, list) and len(value) == 2 and not numeric:
            if all(isinstance(v, (int, float)) or (isinstance(v, str) and K_EXPRESSION.match(v)) for v in value):
                continue  # bounds in C: ordered once C is known (k_range)
            raise ConfigError(f"sweep.search.K bounds are integers or expressions in C such as 'C+1' or "
                              f"'2C+1', got {value!r}")
        if not (isinstance(value, list) and len(value) == 2 and numeric and value[0] <= value[1]):
            raise ConfigError(f"sweep.search.{key} must be [low, high] with low <= high, got {value!r}")
    for key in ("lambda_m", "lambda_c"):
        if getattr(settings.search, key)[0] <= 0:
            raise ConfigError(f"sweep.search.{key} is log-uniform: low must be > 0, "
                              f"got {getattr(settings.search, key)}")
    if not all(isinstance(v, str) or float(v).is_integer() for v in settings.search.K):
        raise ConfigError(f"sweep.search.K must hold integers, got {settings.search.K}")
    for point in settings.points_to_evaluate:
        if not isinstance(point, dict) or not set(point) <= {"lambda_m", "lambda_c", "K"}:
            raise ConfigError(f"sweep.points_to_evaluate entries are {{lambda_m, lambda_c, K}} mappings, got {point!r}")


K_EXPRESSION = re.compile(r"^\s*(\d*)\s*C\s*(?:([+-])\s*(\d+))?\s*$")


def k_bound(value: int | float | str, num_classes: int) -> int:
    """One K bound as an integer: 0 → C + 1; an expression "aC+b" (e.g. "C+1", "2C+1") → a·C + b."""
    if isinstance(value, str):
        match = K_EXPRESSION.match(value)
        if not match:
            raise ConfigError(f"sweep.search.K bound {value!r} is not an integer or an expression like '2C+1'")
        offset = int(match[3] or 0) * (-1 if match[2] == "-" else 1)
        return int(match[1] or 1) * num_classes + offset
    return int(value) or num_classes + 1


def k_range(settings: SweepConfig, num_classes: int) -> tuple[int, int]:
    """The searched K as integers, 0 resolved to C + 1; below C + 1 is an error naming the key."""
    low, high = (k_bound(v, num_classes) for v in settings.search.K)
    if low < num_classes + 1:
        raise ConfigError(f"sweep.search.K = {settings.search.K}: K must be at least C + 1 = {num_classes + 1} "
                          f"(C = {num_classes} classes; components beyond C + 1 are background)")
    return low, max(low, high)


def load_sweep(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """A sweep file (top-level `experiment:` and `sweep:`), or an experiment config swept with the default
    settings; `sweep.*` overrides go to the sweep settings, the rest to the experiment."""
    settings = SweepConfig()
    experiment_path: Path | None = Path(path) if path else None
    experiment_overrides: list[str] = []
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "sweep" in data:
            unknown = set(data) - {"experiment", "overrides", "sweep"}
            if unknown:
                raise ConfigError(f"sweep config {path} has unknown top-level keys {sorted(unknown)} (a sweep file "
                                  "holds `experiment:` (a config path), `overrides:` (a list) and `sweep:`)")
            _merge(settings, data["sweep"] or {}, "sweep.")
            experiment_path = (path.parent / data["experiment"]) if data.get("experiment") else None
            experiment_overrides = [str(o) for o in data.get("overrides") or []]
    for text in overrides:
        parsed = parse_override(text)
        if "sweep" in parsed:
            _merge(settings, parsed["sweep"], "sweep.")
        else:
            experiment_overrides.append(text)
    _check(settings)
    return Sweep(settings, load_config(experiment_path, experiment_overrides), str(path or "defaults"))


def settings_dict(settings: SweepConfig) -> dict[str, Any]:
    return asdict(settings)

