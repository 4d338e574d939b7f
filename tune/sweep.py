"""Ray Tune sweep over the search table of tune/settings.py (λ_m, λ_c and K by default; any config key can be
added in the sweep file): every trial trains stage 2 as a Ray Train TorchTrainer (DeepSpeed inside) against one
shared g, ASHA stops weak trials between rungs, MLflow holds a parent run with one nested run per
trial, and the best segmenter is registered (alias `champion` only if it beats the current one).

    python tune/sweep.py --config configs/sweep_toy_birds.yaml [key.sub=value ...] [--num-samples N] [--resume]
    ray submit deploy/cluster.yaml tune/sweep.py -- --config configs/sweep_toy_birds.yaml

Overrides `sweep.x=v` set the sweep (configs/sweep_toy_birds.yaml documents each key); all others the experiment."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a file: `python tune/sweep.py`, or `ray submit`, which copies this file to the head node and runs
    # it there as ~/sweep.py. Hand over to the installed package's tune.sweep, so the code that runs is the
    # cluster's own, and drop this file's folder from the path (tune/'s modules must not shadow top-level ones).
    import runpy

    sys.path.pop(0)
    try:
        runpy.run_module("tune.sweep", run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as err:
        if err.name != "tune":
            raise
        sys.exit("sweep: error: the wsssrec package is not installed here (pip install -e . in the checkout, "
                 "or run `python -m tune.sweep` from it)")
    sys.exit(0)

import yaml  # noqa: E402  (after the script launcher above)

from trainer.config import Config  # noqa: E402
from tune.settings import (Dimension, Sweep, SweepConfig, component_range, config_value, dimensions,  # noqa: E402
                           load_sweep, settings_dict)

STATE = "sweep.json"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API client looks first


# Where a cluster's shared places are (the cluster YAMLs set them; MLFLOW_TRACKING_URI names the tracking server)
WORKDIR_ENV = "WSSSREC_WORKDIR"  # the folder a sweep's relative paths resolve against; default: the working dir
STORAGE_ENV = "WSSSREC_STORAGE"  # sweep.storage_path when the sweep leaves it empty; default: runs/ray


def _absolute(value: str) -> str:
    """A local path made absolute against $WSSSREC_WORKDIR (a cluster's shared disk: `ray submit` runs the
    sweep in the remote user's home) or else the working directory; URLs stay as they are."""
    if not value or "://" in value:
        return value
    return str((Path(os.environ.get(WORKDIR_ENV) or ".") / value).resolve())


def resolve_paths(cfg: Config) -> Config:
    """The config with every local path absolute (a new Config): trials run in Ray worker processes with other
    working directories. Relative paths resolve against $WSSSREC_WORKDIR when it is set (see _absolute)."""
    from trainer.config import with_overrides
    from trainer.engine import deepspeed_config_path

    paths = {"data.url": _absolute(cfg.data.url), "train.out_dir": _absolute(cfg.train.out_dir),
             "train.deepspeed": str(deepspeed_config_path(cfg.train.deepspeed).resolve())}
    if not cfg.classifier.checkpoint.startswith(("models:/", "runs:/")):
        paths["classifier.checkpoint"] = _absolute(cfg.classifier.checkpoint)
    if cfg.classifier.init not in ("imagenet", "none", ""):
        paths["classifier.init"] = _absolute(cfg.classifier.init)
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        paths["mlflow.tracking_uri"] = "sqlite:///" + _absolute(uri[len("sqlite:///"):])
    if "://" not in cfg.mlflow.artifact_location:
        paths["mlflow.artifact_location"] = _absolute(cfg.mlflow.artifact_location)
    return with_overrides(cfg, paths)


# ---- the shared g ----

def shared_classifier(cfg, sweep_dir: Path) -> tuple[str, dict[str, str]]:
    """(what trials set as classifier.checkpoint, g's lineage). A models:/ URI is pinned to its version; a
    path is used as it is; no checkpoint → stage 1 runs once here (and registers g when the config says so).
    With a remote tracking server trials pull a registered g by URI, so cluster nodes need no shared disk."""
    from trainer.model_uri import is_model_uri, resolve
    from trainer.registry import classifier_lineage
    from trainer.tracking import connect, is_remote, tracking_uri

    where = tracking_uri(cfg)
    if is_model_uri(cfg.classifier.checkpoint):
        ref = resolve(connect(where), cfg.classifier.checkpoint, where)
        lineage = {"classifier.model_uri": ref.canonical, "classifier.model_uri_requested": cfg.classifier.checkpoint,
                   "classifier.model_version": ref.version or "",
                   "classifier.weights_sha256": ref.tags.get("weights_sha256", "")}
        if is_remote(where):
            return ref.canonical, lineage  # each trial pulls this exact version
        from trainer.model_uri import download

        _, folder = download(ref.canonical, sweep_dir / "g-registry", where)  # once, for every trial
        return str(folder / "data" / "classifier.pt"), lineage
    path = Path(cfg.classifier.checkpoint) if cfg.classifier.checkpoint else sweep_dir / "g" / "classifier.pt"
    if cfg.classifier.checkpoint and not path.is_file():
        raise FileNotFoundError(f"classifier.checkpoint {path} does not exist")
    if not path.is_file():
        train_shared_classifier(cfg, sweep_dir)
    if not cfg.mlflow.enabled:
        return str(path), {"classifier.checkpoint": str(path)}
    lineage = classifier_lineage(connect(where), cfg, path)
    if is_remote(where) and "classifier.model_uri" in lineage:
        return lineage["classifier.model_uri"], lineage
    return str(path), lineage


def train_shared_classifier(cfg, sweep_dir: Path) -> None:
    """Stage 1 once for the whole sweep, through the `wsssrec` CLI in its own process (its own DeepSpeed
    world, and it registers g like `wsssrec train-classifier` does)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    config_path = sweep_dir / "g-config.yaml"
    resolved = cfg.to_dict()
    resolved["train"].update(out_dir=str(sweep_dir), run_name="g", resume="auto")
    resolved["classifier"]["checkpoint"] = ""
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    print(f"stage 1: training the sweep's shared g in {sweep_dir / 'g'}", flush=True)
    subprocess.run([sys.executable, "-m", "trainer", "train-classifier", "-c", str(config_path)], check=True)


# ---- MLflow parent run ----

def open_parent_run(cfg, settings: SweepConfig, lineage: dict[str, str], previous: str | None) -> dict[str, str]:
    from trainer.config import flatten
    from trainer.files import git_revision
    from trainer.mlflow_params import log_params_batched
    from trainer.tracking import connect, experiment_id_for, manifest_fingerprint, tracking_uri

    uri = tracking_uri(cfg)
    client = connect(uri)
    experiment_id = experiment_id_for(client, cfg, uri)
    if previous:
        client.update_run(previous, status="RUNNING")
        return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": previous, "sweep": settings.name}
    tags = {"wsssrec.kind": "sweep", **git_revision(), **manifest_fingerprint(cfg.data.url), **lineage}
    run = client.create_run(experiment_id, run_name=settings.name, tags=tags)
    params = {**flatten(cfg.to_dict()), **flatten(settings_dict(settings), "sweep.")}
    log_params_batched(client, run.info.run_id, params)
    return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": run.info.run_id, "sweep": settings.name}


# ---- Ray Tune ----

def search_space(settings: SweepConfig, num_classes: int) -> dict[str, Any]:
    """Tune's param_space from the sweep's search table: one entry per searched name, a constant where the
    range is a single value."""
    return {dim.name: _domain(dim, num_classes) for dim in dimensions(settings.search)}


def _domain(dim: Dimension, num_classes: int) -> Any:
    from ray import tune

    if dim.distribution == "choice":
        return dim.values[0] if len(dim.values) == 1 else tune.choice(dim.values)
    if dim.distribution in ("components", "int"):
        low, high = (component_range(dim.values, num_classes, dim.name) if dim.distribution == "components"
                     else (int(v) for v in dim.values))
        return low if low == high else tune.randint(low, high + 1)
    low, high = (float(v) for v in dim.values)
    if low == high:
        return low
    return tune.loguniform(low, high) if dim.distribution == "loguniform" else tune.uniform(low, high)


def start_points(settings: SweepConfig, cfg, num_classes: int) -> list[dict[str, Any]]:
    """sweep.points_to_evaluate completed with the experiment's values; K 0 → C + 1."""
    dims = dimensions(settings.search)
    points = []
    for point in settings.points_to_evaluate:
        full = {**{dim.name: config_value(cfg, dim.key) for dim in dims}, **point}
        for dim in dims:
            if dim.distribution == "components":
                full[dim.name] = int(full[dim.name]) or num_classes + 1
            elif dim.distribution == "int":
                full[dim.name] = int(full[dim.name])
            elif dim.distribution != "choice":
                full[dim.name] = float(full[dim.name])
        points.append(full)
    return points


def concurrency(settings: SweepConfig, resources: dict[str, float]) -> int:
    """Trials at once: `sweep.max_concurrent`, or with 0 as many as the cluster's CPUs (and GPUs) hold whole
    trials, each a trial process (`trial_cpus`) plus its Ray Train workers. Without this limit Tune starts
    every pending trial's process, they take all CPUs, and no trial's workers can ever be placed."""
    if settings.max_concurrent > 0:
        return settings.max_concurrent
    per_trial = settings.trial_cpus + settings.workers * settings.cpus_per_worker
    limit = int(resources.get("CPU", 0) // per_trial) if per_trial > 0 else settings.num_samples
    if settings.use_gpu:
        limit = min(limit, int(resources.get("GPU", 0) // settings.workers))
    if limit < 1:
        from trainer.config import ConfigError

        raise ConfigError(f"one trial needs {per_trial:g} CPUs (sweep.trial_cpus + sweep.workers × "
                          f"sweep.cpus_per_worker){' and ' + str(settings.workers) + ' GPUs' if settings.use_gpu else ''}"
                          f" but the Ray cluster has {resources.get('CPU', 0):g} CPUs and "
                          f"{resources.get('GPU', 0):g} GPUs")
    return limit


def make_searcher(settings: SweepConfig, points: list[dict[str, Any]], space: dict[str, Any],
                  max_concurrent: int = 0):
    if settings.searcher == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            from trainer.config import ConfigError

            raise ConfigError("sweep.searcher=optuna needs Optuna: pip install 'wsssrec[tune]'") from err
        from ray.tune.search.sample import Domain

        searched = {k for k, v in space.items() if isinstance(v, Domain)}  # Optuna's points hold only these
        points = [{k: v for k, v in point.items() if k in searched} for point in points]
        return OptunaSearch(points_to_evaluate=points or None, seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=settings.seed,
                                 max_concurrent=max_concurrent)


def trainable(base: dict[str, Any], plan: dict[str, Any], settings: SweepConfig):
    from ray import tune

    from tune.trial import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, base=base, plan=plan), {"cpu": settings.trial_cpus})


def init_ray(settings: SweepConfig) -> None:
    import ray

    # Ray Train gives a trial's workers 60 s to start by default, too short on a busy machine
    env = {"env_vars": {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning",
                        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
                            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")}}
    # A busy machine can take minutes to start Ray's processes; Ray's default waits (60 s for the raylet,
    # 30 s for its agents) then abort the sweep before it begins.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "600")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "600000")
    address = settings.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        # The dashboard serves the state API that Ray Train's PlacementGroupCleaner asks whether a stopped
        # trial's controller is gone. Without an address that client looks for "the" Ray on the machine and
        # fails with "Found multiple active Ray instances" when another local Ray runs, so the stopped trial's
        # CPUs are never freed. Pin it to this Ray's dashboard: Ray's processes inherit the variable.
        from trainer.distributed import free_port

        port = free_port()
        api = f"http://127.0.0.1:{port}"
        os.environ[API_SERVER_ENV] = api
        env["env_vars"][API_SERVER_ENV] = api
        ray.init(num_cpus=settings.ray_num_cpus or None, runtime_env=env, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port)


# ---- the sweep ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tune/sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="sweep file (configs/sweep_toy_birds.yaml) or experiment config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value; sweep.key=value for the sweep settings")
    parser.add_argument("--num-samples", type=int, help="trials (same as sweep.num_samples=N)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of this name: finished trials are kept, the "
                             "unfinished ones resume from their last reported rung")
    return parser.parse_intermixed_args(argv)  # overrides may follow --num-samples N


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The whole sweep; returns its summary (best trial, registry decision, per-trial rows)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from trainer.config import config_from_dict
    from trainer.data import dataset_classes
    from trainer.files import write_json
    from tune.record import SweepRecorder
    from tune.trial import rung_ends
    from tune.validate import resolve_metric

    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"sweep.num_samples={args.num_samples}"] if args.num_samples else [])
    sweep: Sweep = load_sweep(args.config, overrides)
    settings = sweep.settings
    cfg = resolve_paths(sweep.experiment)
    classes = dataset_classes(cfg)
    metric, mode = resolve_metric(cfg, settings.split, settings.metric)
    sweep_dir = Path(cfg.train.out_dir) / settings.name
    storage = _absolute(settings.storage_path or os.environ.get(STORAGE_ENV) or "runs/ray")
    experiment_path = f"{storage.rstrip('/')}/{settings.name}"
    state_path = sweep_dir / STATE
    if args.resume:
        if not (state_path.is_file() and tune.Tuner.can_restore(experiment_path)):
            raise FileNotFoundError(f"no sweep {settings.name!r} to resume: {state_path} or the Tune experiment "
                                    f"{experiment_path} is missing (start it without --resume)")
        state = json.loads(state_path.read_text())
        base, plan = state["base"], state["plan"]
        cfg = config_from_dict({**base, "mlflow": state["mlflow_config"]})
        print(f"resuming sweep {settings.name} from {experiment_path} (its saved settings and base config apply)")
    else:
        if state_path.is_file() or tune.Tuner.can_restore(experiment_path):
            raise FileExistsError(f"sweep {settings.name!r} already exists ({state_path}, {experiment_path}): "
                                  "continue it with --resume, or name a new one with sweep.name=...")
        checkpoint, lineage = shared_classifier(cfg, sweep_dir)
        base = cfg.to_dict()
        base["classifier"]["checkpoint"] = checkpoint
        base["train"]["out_dir"] = str(sweep_dir / "trials")
        plan = {"rung_ends": rung_ends(cfg.train.steps, settings.rungs), "split": settings.split,
                "reference_objective": base["objective"], "workers": settings.workers,
                "use_gpu": settings.use_gpu, "cpus_per_worker": settings.cpus_per_worker,
                "train_storage": f"{storage.rstrip('/')}/{settings.name}-train"}
        state = {"base": base, "plan": plan, "mlflow_config": base["mlflow"], "lineage": lineage,
                 "metric": metric, "mode": mode, "settings": settings_dict(settings), "parent": None,
                 "searched": [dim.name for dim in dimensions(settings.search)]}
    tracking = None
    if cfg.mlflow.enabled:
        tracking = open_parent_run(cfg, settings, state["lineage"], state.get("parent"))
        state["parent"] = tracking["parent_run_id"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(state_path, state)

    init_ray(settings)
    limit = concurrency(settings, ray.cluster_resources())
    print(f"at most {limit} trial(s) at once")
    started = time.time()
    recorder = SweepRecorder(sweep_dir / "trials.json", len(plan["rung_ends"]), plan["split"], base, tracking)
    if args.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable(base, plan, settings), resume_unfinished=True,
                                   resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="rung", max_t=settings.rungs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor) if settings.scheduler == "asha" else None
        points = start_points(settings, cfg, len(classes))
        space = search_space(settings, len(classes))
        tuner = tune.Tuner(
            trainable(base, plan, settings),
            param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        search_alg=make_searcher(settings, points, space, limit),
                                        num_samples=settings.num_samples,
                                        max_concurrent_trials=limit if settings.searcher == "optuna" else None),
            run_config=tune.RunConfig(name=settings.name, storage_path=storage, callbacks=[recorder],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    tuner.fit()
    seconds = time.time() - started
    outcomes = SweepRecorder(sweep_dir / "trials.json", len(plan["rung_ends"]), plan["split"], base, None)
    return finish(outcomes, state, tracking, classes, seconds)


def finish(recorder, state: dict[str, Any], tracking: dict[str, str] | None, classes: list[str],
           seconds: float) -> dict[str, Any]:
    """Table, best trial, registry decision, parent run closed; the summary is also written to sweep.json's
    folder as summary.json."""
    from trainer.config import config_from_dict
    from trainer.files import write_json
    from tune.trial import trial_config

    metric, mode, settings = state["metric"], state["mode"], state["settings"]
    rows = [{**row, "params": _ordered(row["params"], state.get("searched", []))} for row in recorder.rows()]
    print(results_table(rows, metric))
    unfinished = [r["trial_id"] for r in rows if r["outcome"] == "unfinished"]
    summary: dict[str, Any] = {"metric": metric, "mode": mode, "seconds": seconds, "trials": rows,
                               "unfinished": unfinished, "best": None, "registered": None}
    sweep_dir = Path(state["base"]["train"]["out_dir"]).parent
    if unfinished:
        write_json(sweep_dir / "summary.json", summary)
        if tracking:
            _close_parent(tracking, "KILLED", {})
        print(f"sweep {settings['name']} interrupted with {len(unfinished)} unfinished trial(s); continue it "
              f"with --resume")
        return summary
    scored = [r for r in rows if metric in r["metrics"]]
    finalists = [r for r in scored if r["outcome"] == "complete"] or scored
    if not finalists:
        write_json(sweep_dir / "summary.json", summary)
        if tracking:
            _close_parent(tracking, "FAILED", {})
        raise RuntimeError(f"sweep {settings['name']}: no trial reported {metric}; see the trial errors above")
    pick = max if mode == "max" else min
    best = pick(finalists, key=lambda r: r["metrics"][metric])
    value = best["metrics"][metric]
    summary["best"] = best
    version_text = "not registered"
    if tracking and settings["register"]:
        from ray.train import Checkpoint

        from tune.champion import register_winner

        trial_cfg = trial_config(state["base"], best["params"], best["trial_id"])
        trial_cfg["mlflow"] = state["mlflow_config"]
        cfg = config_from_dict(trial_cfg)
        with Checkpoint(best["checkpoint_path"]).as_directory() as folder:
            decision = register_winner(cfg, Path(folder) / "segmenter.pt", classes, best.get("run_id"), metric,
                                       value, mode, {k: v for k, v in best["metrics"].items() if "/" in k},
                                       state["lineage"])
        summary["registered"] = decision.__dict__
        version_text = f"registered {cfg.mlflow.segmenter_model} v{decision.version} as {decision.alias} " \
                       f"({decision.reason})"
    if tracking:
        tags = {"best_trial": best["trial_id"]}
        if summary["registered"]:
            tags["registered.segmenter"] = f"v{summary['registered']['version']}@{summary['registered']['alias']}"
        _close_parent(tracking, "FINISHED", {f"best/{metric}": value, "sweep_seconds": seconds}, tags)
    write_json(sweep_dir / "summary.json", summary)
    print(f"best trial {best['trial_id']}: {' '.join(f'{k}={_shown(v)}' for k, v in best['params'].items())} "
          f"{metric}={value:.4f} ({best['outcome']}); {version_text}")
    return summary


def _close_parent(tracking: dict[str, str], status: str, metrics: dict[str, float],
                  tags: dict[str, str] | None = None) -> None:
    from trainer.tracking import connect

    client = connect(tracking["uri"])
    for key, value in metrics.items():
        client.log_metric(tracking["parent_run_id"], key, value)
    for key, value in (tags or {}).items():
        client.set_tag(tracking["parent_run_id"], key, value)
    client.set_terminated(tracking["parent_run_id"], status)


def _ordered(params: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A trial's values in the order of the search table (Tune hands them over sorted by name)."""
    return {**{name: params[name] for name in names if name in params}, **params}


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def results_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Markdown: one row per trial, its searched values, rungs, the metric, the boundary F at 2 px of the same
    split and prediction kind (when the metric is an mIoU), the mean training loss and the outcome."""
    names = list(rows[0]["params"]) if rows else []
    boundary = metric.rsplit("/", 1)[0] + "/boundary_f" if metric.endswith("/miou") else None
    extra = ["boundary F"] if boundary else []
    head = ["trial", *names, "rungs", metric, *extra, "train/loss", "outcome"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def number(m: dict[str, Any], key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "-"

    for row in rows:
        p, m = row["params"], row["metrics"]
        cells = [row["trial_id"], *(_shown(p.get(name, "-")) for name in names), str(int(m.get("rung", 0))),
                 number(m, metric), *([number(m, boundary)] if boundary else []), number(m, "train/loss"),
                 row["outcome"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from data_shards.errors import DataError
    from trainer.config import ConfigError
    from trainer.tracking import TrackingError

    previous_api = os.environ.get(API_SERVER_ENV)  # init_ray pins it; restored for callers that go on in-process

    try:
        run(argv)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, TrackingError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if previous_api is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous_api


if __name__ == "__main__":
    main()
