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

from trainer.config import Config, ConfigError, find_config, load_config, merge_into, parse_override, with_overrides

SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "none")
METRICS = ("auto", "miou", "loss")


# The search space, one table: the name a sweep file uses → (the dotted config key it sets, the distribution of
# a bare [low, high], the default range). Any other config key is searchable by writing it under `search:`
# with its dotted name (e.g. `objective.area_weight: [4, 16]`); nothing else needs to change.
SEARCHABLE: dict[str, tuple[str, str, list]] = {
    "lambda_m": ("objective.lambda_m", "loguniform", [0.1, 10.0]),
    "lambda_c": ("objective.lambda_c", "loguniform", [0.1, 10.0]),
    "K": ("model.K", "components", [0, 0]),
}
# loguniform / uniform: floats in [low, high]; int: integers in [low, high]; components: K, integers in
# [low, high] where 0 stands for C + 1 and a bound may be written in C ("C+1", "2C+1"); choice: one of a list.
# A key not in SEARCHABLE given as a bare [low, high] is drawn by its field's type: float → uniform,
# int → int; any key may name its distribution: `{loguniform: [low, high]}`, `{choice: [a, b, c]}`.
DISTRIBUTIONS = ("loguniform", "uniform", "int", "components", "choice")
_NAME_OF_KEY = {key: name for name, (key, _, _) in SEARCHABLE.items()}


def search_name(name: str) -> str:
    """The parameter name a searched key goes by: the short name when it has one (objective.lambda_m →
    lambda_m), else the dotted config key itself."""
    return _NAME_OF_KEY.get(name, name)


def config_key(name: str) -> str:
    """The dotted config key a search parameter sets (lambda_m → objective.lambda_m)."""
    return SEARCHABLE[name][0] if name in SEARCHABLE else name


def config_value(cfg: Config, key: str) -> Any:
    """The value of the dotted `key` in `cfg`."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


class SearchSpace(dict):
    """Search parameter name → its range as written in the sweep file: [low, high], or a one-key mapping
    {distribution: values}. λ_m and λ_c default to log-uniform [0.1, 10], K to [0, 0] (= C + 1); low == high
    fixes a value. The short names are also attributes (`space.lambda_m`) for the code that has always
    used them."""

    @classmethod
    def defaults(cls) -> "SearchSpace":
        return cls({name: list(default) for name, (_, _, default) in SEARCHABLE.items()})

    def updated(self, written: Any, prefix: str = "sweep.search.") -> "SearchSpace":
        """A new space: this one with the entries of `written` (a `search:` mapping, dotted keys or nested
        sections) added or replaced."""
        if not isinstance(written, dict):
            raise ConfigError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {written!r}")
        new = SearchSpace(self)
        for name, value in written.items():
            if isinstance(value, dict) and not _is_distribution(value):
                new = SearchSpace(new.updated({f"{name}.{k}": v for k, v in value.items()}, prefix))
            else:
                new[search_name(str(name))] = value
        return new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in self:
            raise AttributeError(name)
        return self[name]

    def __setattr__(self, name: str, value: Any) -> None:
        self[search_name(name)] = value


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


@dataclass(frozen=True)
class Dimension:
    """One searched parameter, checked: its Tune name, the config key it sets, its distribution and values."""
    name: str
    key: str
    distribution: str
    values: list  # [low, high], or the choices


def dimensions(space: SearchSpace) -> list[Dimension]:
    """The checked search space; a bad entry is a ConfigError naming `sweep.search.<name>`."""
    return [_dimension(name, written) for name, written in space.items()]


def _dimension(name: str, written: Any) -> Dimension:
    where = f"sweep.search.{name}"
    key = config_key(name)
    try:
        default = config_value(Config(), key)
    except AttributeError:
        raise ConfigError(f"{where}: {key!r} is not a config key (searchable: any key of the experiment "
                          f"config, e.g. objective.area_weight, or {', '.join(SEARCHABLE)})") from None
    if _is_distribution(written):
        (distribution, values), = written.items()
    elif name in SEARCHABLE:
        distribution, values = SEARCHABLE[name][1], written
    else:
        distribution = "int" if isinstance(default, int) and not isinstance(default, bool) else "uniform"
        values = written
    if distribution == "choice":
        if not (isinstance(values, list) and values):
            raise ConfigError(f"{where} is a choice: a non-empty list of values, got {values!r}")
        for value in values:
            with_overrides(Config(), {key: value})  # each choice must fit the key's type (ConfigError names it)
        return Dimension(name, key, distribution, list(values))
    if distribution == "components":
        _check_components(where, values)
        return Dimension(name, key, distribution, list(values))
    numeric = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values)
    if not (isinstance(values, list) and len(values) == 2 and numeric and values[0] <= values[1]):
        raise ConfigError(f"{where} must be [low, high] with low <= high, got {values!r}")
    if distribution == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where} is log-uniform: low must be > 0, got {values}")
    if distribution == "int" and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"{where} must hold integers, got {values}")
    for value in values:
        with_overrides(Config(), {key: int(value) if distribution == "int" else float(value)})
    return Dimension(name, key, distribution, list(values))


def _check_components(where: str, values: Any) -> None:
    """K bounds: integers (0 = C + 1) or expressions in C, ordered when both are integers."""
    if not (isinstance(values, list) and len(values) == 2):
        raise ConfigError(f"{where} must be [low, high] with low <= high, got {values!r}")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numbers:
        if values[0] > values[1]:
            raise ConfigError(f"{where} must be [low, high] with low <= high, got {values!r}")
        if not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{where} must hold integers, got {values}")
        return
    if not all((isinstance(v, (int, float)) and float(v).is_integer()) or (isinstance(v, str) and K_EXPRESSION.match(v))
               for v in values):
        raise ConfigError(f"{where} bounds are integers or expressions in C such as 'C+1' or '2C+1', got {values!r}")


@dataclass
class SweepConfig:
    name: str = "sweep"  # Tune experiment name: <storage_path>/<name>, runs under <train.out_dir>/<name>
    num_samples: int = 8
    searcher: str = "random"  # "random" | "optuna" (TPE; pip install 'wsssrec[tune]')
    seed: int = 0
    points_to_evaluate: list = field(default_factory=list)  # settings tried first: [{lambda_m: 1, K: 0, ...}]
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
    storage_path: str = ""  # Ray's experiment and checkpoint storage: a shared path or s3://...;
    #                          "" → $WSSSREC_STORAGE (the cluster YAMLs set it), else runs/ray
    ray_address: str = ""  # "" → $RAY_ADDRESS, else a new local Ray; "auto" joins the running cluster
    ray_num_cpus: int = 0  # a new local Ray only: CPUs it may schedule (0 = the machine's count)
    register: bool = True  # register the best trial's segmenter (champion if it beats the current one)
    search: SearchSpace = field(default_factory=SearchSpace.defaults)  # see SEARCHABLE


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
    names = [d.name for d in dimensions(settings.search)]
    for point in settings.points_to_evaluate:
        if not isinstance(point, dict) or not {search_name(str(k)) for k in point} <= set(names):
            raise ConfigError(f"sweep.points_to_evaluate entries are mappings of searched names "
                              f"({', '.join(names)}), got {point!r}")


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
    return component_range(settings.search.K, num_classes)


def component_range(bounds: list, num_classes: int, name: str = "K") -> tuple[int, int]:
    """A `components` range as integers, 0 resolved to C + 1; below C + 1 is an error naming the key."""
    low, high = (k_bound(v, num_classes) for v in bounds)
    if low < num_classes + 1:
        raise ConfigError(f"sweep.search.{name} = {bounds}: K must be at least C + 1 = {num_classes + 1} "
                          f"(C = {num_classes} classes; components beyond C + 1 are background)")
    return low, max(low, high)


def load_sweep(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """A sweep file (top-level `experiment:` and `sweep:`), or an experiment config swept with the default
    settings; `sweep.*` overrides go to the sweep settings, the rest to the experiment."""
    settings = SweepConfig()
    experiment_path: Path | None = Path(path) if path else None
    experiment_overrides: list[str] = []
    if path:
        path = find_config(path)  # configs/... also from the installed package (e.g. under `ray submit`)
        if not path.is_file():
            raise ConfigError(f"sweep config {path} does not exist")
        experiment_path = path
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "sweep" in data:
            unknown = set(data) - {"experiment", "overrides", "sweep"}
            if unknown:
                raise ConfigError(f"sweep config {path} has unknown top-level keys {sorted(unknown)} (a sweep file "
                                  "holds `experiment:` (a config path), `overrides:` (a list) and `sweep:`)")
            _merge_sweep(settings, data["sweep"] or {})
            experiment_path = (path.parent / data["experiment"]) if data.get("experiment") else None
            experiment_overrides = [str(o) for o in data.get("overrides") or []]
    for text in overrides:
        parsed = parse_override(text)
        if "sweep" in parsed:
            _merge_sweep(settings, parsed["sweep"])
        else:
            experiment_overrides.append(text)
    _check(settings)
    return Sweep(settings, load_config(experiment_path, experiment_overrides), str(path or "defaults"))


def _merge_sweep(settings: SweepConfig, updates: Any) -> None:
    """`sweep:` settings into `settings`; `search:` entries are added to the space, not replacing it."""
    if isinstance(updates, dict) and "search" in updates:
        updates = dict(updates)
        settings.search = settings.search.updated(updates.pop("search") or {})
    merge_into(settings, updates, "sweep.")
    settings.points_to_evaluate = [{search_name(str(k)): v for k, v in point.items()} if isinstance(point, dict)
                                   else point for point in settings.points_to_evaluate]


def settings_dict(settings: SweepConfig) -> dict[str, Any]:
    return asdict(settings)

