"""The sweep's search space is one table of dotted config keys: a new key is searched by naming it in the sweep
file only, the short names stay aliases, values reach the trial through the config's own override mechanism,
and nothing in tune/ changes a Config it was given."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, find_config, load_config, with_overrides
from tune.settings import config_key, dimensions, load_sweep, search_name
from tune.sweep import resolve_paths, search_space, start_points
from tune.trial import trial_config

REPO = Path(__file__).resolve().parent.parent


def sweep_file(tmp_path: Path, search: str, points: str = "[]") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"experiment: {REPO / 'configs/toy_birds.yaml'}\n"
                    f"sweep:\n  points_to_evaluate: {points}\n  search:\n{search}")
    return path


def samples(space: dict, n: int = 8) -> list[dict]:
    from ray.tune.search.variant_generator import generate_variants

    return [variant for _, variant in (next(generate_variants(space)) for _ in range(n))]


def test_a_new_key_is_searched_by_naming_it_in_the_yaml_only(tmp_path):
    path = sweep_file(tmp_path, "    objective.area_weight: [4.0, 16.0]\n"
                                "    objective.fill: {choice: [blur, shuffle]}\n"
                                "    objective.tv_weight: {loguniform: [0.1, 1.0]}\n",
                      points="[{lambda_m: 2.0, objective.area_weight: 5.0}]")
    sweep = load_sweep(path)
    names = [d.name for d in dimensions(sweep.settings.search)]
    assert names == ["lambda_m", "lambda_c", "K", "objective.area_weight", "objective.fill", "objective.tv_weight"]
    space = search_space(sweep.settings, num_classes=1)
    assert space["K"] == 2  # the default [0, 0] = C + 1, a constant
    base = sweep.experiment.to_dict()
    for variant in samples(space):
        assert 4.0 <= variant["objective.area_weight"] <= 16.0 and variant["objective.fill"] in ("blur", "shuffle")
        assert 0.1 <= variant["objective.tv_weight"] <= 1.0
        cfg = trial_config(base, variant, "t1")
        assert cfg["objective"]["area_weight"] == variant["objective.area_weight"]
        assert cfg["objective"]["fill"] == variant["objective.fill"]
        assert cfg["objective"]["lambda_m"] == variant["lambda_m"] and cfg["model"]["K"] == 2
    (point,) = start_points(sweep.settings, sweep.experiment, num_classes=1)
    assert point == {"lambda_m": 2.0, "lambda_c": 1.0, "K": 2, "objective.area_weight": 5.0, "objective.fill": "blur",
                     "objective.tv_weight": 0.5}  # completed with the experiment's own values


def test_the_same_key_from_an_override_or_a_nested_section(tmp_path):
    from_override = load_sweep(REPO / "configs/sweep_toy_birds.yaml", ["sweep.search.objective.area_weight=[4, 16]"])
    nested = load_sweep(sweep_file(tmp_path, "    objective:\n      area_weight: [4, 16]\n"))
    for sweep in (from_override, nested):
        assert sweep.settings.search["objective.area_weight"] == [4, 16]
        assert sweep.settings.search.lambda_m == [0.1, 10.0]  # the other defaults stay
        (dim,) = [d for d in dimensions(sweep.settings.search) if d.key == "objective.area_weight"]
        assert dim.distribution == "uniform"  # a float field given as [low, high]


def test_short_names_are_aliases_of_dotted_keys():
    assert config_key("lambda_m") == "objective.lambda_m" and config_key("K") == "model.K"
    assert search_name("objective.lambda_c") == "lambda_c" and search_name("objective.fill") == "objective.fill"
    sweep = load_sweep(REPO / "configs/sweep_toy_birds.yaml", ["sweep.search.objective.lambda_m=[0.5, 2]"])
    assert sweep.settings.search.lambda_m == [0.5, 2] and "objective.lambda_m" not in sweep.settings.search


@pytest.mark.parametrize("override, message", [
    ("sweep.search.objective.area_wieght=[1, 2]", "'objective.area_wieght' is not a config key"),
    ("sweep.search.model.width=[8.5, 16]", "must hold integers"),  # an int field
    ("sweep.search.objective.fill={choice: [blur, 3]}", "objective.fill"),
    ("sweep.search.objective.area_weight={loguniform: [0, 2]}", "log-uniform"),
    ("sweep.points_to_evaluate=[{objective.area_weight: 3}]", "points_to_evaluate"),  # not searched
])
def test_bad_entries_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(REPO / "configs/sweep_toy_birds.yaml", [override])


def test_with_overrides_returns_a_new_config():
    cfg = load_config(REPO / "configs/toy_birds.yaml")
    new = with_overrides(cfg, {"objective.lambda_m": 2, "model.K": 3, "train.steps": 7})
    assert (new.objective.lambda_m, new.model.K, new.train.steps) == (2.0, 3, 7)
    assert (cfg.objective.lambda_m, cfg.model.K, cfg.train.steps) == (1.0, 0, 600)
    with pytest.raises(ConfigError, match="model.K"):
        with_overrides(cfg, {"model.K": "three"})


def test_resolve_paths_does_not_change_its_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs/toy_birds.yaml", ["train.out_dir=runs", "mlflow.tracking_uri=sqlite:///m.db"])
    resolved = resolve_paths(cfg)
    assert cfg.train.out_dir == "runs" and cfg.mlflow.tracking_uri == "sqlite:///m.db"
    assert resolved.train.out_dir == str(tmp_path / "runs")
    assert resolved.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'm.db'}"
    assert Path(resolved.data.url).is_absolute() and Path(resolved.train.deepspeed).is_file()


def test_trial_config_takes_numpy_values_and_leaves_the_base():
    import numpy as np

    base = load_sweep(REPO / "configs/toy_birds.yaml").experiment.to_dict()
    cfg = trial_config(base, {"lambda_m": np.float64(0.25), "K": np.int64(3)}, "t2")
    assert cfg["objective"]["lambda_m"] == 0.25 and cfg["model"]["K"] == 3 and type(cfg["model"]["K"]) is int
    assert base["model"]["K"] == 0 and base["train"]["run_name"] == "toy-birds"


def test_log_params_batched_logs_more_than_one_batch(tmp_path):
    import mlflow

    from trainer.mlflow_params import log_params_batched

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("params", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000}
    log_params_batched(client, run.info.run_id, params)
    logged = client.get_run(run.info.run_id).data.params
    assert len(logged) == 251 and logged["p249"] == "249" and len(logged["long"]) == 6000


def test_configs_resolve_from_the_package_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("configs/sweep_toy_birds.yaml") == REPO / "configs/sweep_toy_birds.yaml"
    assert find_config("toy_birds.yaml") == REPO / "configs/toy_birds.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/toy_birds.yaml").write_text("train: {steps: 3}\n")
    assert find_config("configs/toy_birds.yaml") == Path("configs/toy_birds.yaml")  # the working directory wins
    assert load_config("configs/toy_birds.yaml").train.steps == 3
    assert find_config("configs/nothing.yaml") == Path("configs/nothing.yaml")  # not found: as given
    sweep = load_sweep("configs/sweep_toy_multi.yaml")  # the sweep file and its experiment from the package
    assert sweep.experiment.train.steps == 400 and sweep.experiment.data.url == "data/toy-multi/manifest.json"


def test_sweep_script_runs_as_a_file_from_any_folder(tmp_path):
    """`ray submit` copies tune/sweep.py to the head node and runs it as ~/sweep.py: the copy hands over to the
    installed tune.sweep (a bad override reaches its error message, exit 2, without starting Ray)."""
    copy = tmp_path / "sweep.py"
    copy.write_text((REPO / "tune/sweep.py").read_text())
    (tmp_path / "settings.py").write_text("raise SystemExit('a stray settings.py was imported')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(copy), "--config", "configs/sweep_toy_birds.yaml",
                           "sweep.searcher=grid"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sweep: error: sweep.searcher is 'grid'" in proc.stderr, proc.stderr[-2000:]
