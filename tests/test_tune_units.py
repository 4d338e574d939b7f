"""The sweep's pieces without Ray running: config loading and overrides, the search space, rung split, the
champion decision, and which checkpoint files each rank uploads."""
import json
from pathlib import Path

import pytest

from trainer.config import ConfigError
from tune.champion import beats, decide
from tune.settings import SweepConfig, k_range, load_sweep
from tune.sweep import results_table
from tune.trial import rung_ends, stage_checkpoint, trial_config

REPO = Path(__file__).resolve().parent.parent


def test_sweep_file_names_its_experiment_and_splits_overrides():
    sweep = load_sweep(REPO / "configs/sweep_toy_birds.yaml",
                       ["sweep.num_samples=3", "train.steps=40", "sweep.search.lambda_m=[0.5, 2]", "model.K=0"])
    assert sweep.settings.num_samples == 3 and sweep.settings.search.lambda_m == [0.5, 2]
    assert sweep.experiment.train.steps == 40  # CLI beats the file's `overrides`
    assert sweep.experiment.objective.paste_weight == 1.0  # from configs/toy_birds.yaml
    assert sweep.experiment.objective.erase_weight == 3.0 and not sweep.experiment.objective.erase_gate
    assert (sweep.experiment.objective.erase_start, sweep.experiment.objective.erase_ramp) == (100, 100)
    assert sweep.settings.points_to_evaluate == [{"lambda_m": 1.0, "lambda_c": 1.0, "K": 0}]


def test_file_overrides_apply_without_cli():
    assert load_sweep(REPO / "configs/sweep_toy_birds.yaml").experiment.train.steps == 400


def test_plain_experiment_config_is_a_sweep_with_defaults():
    sweep = load_sweep(REPO / "configs/toy_birds.yaml", ["sweep.searcher=optuna"])
    assert sweep.settings.searcher == "optuna" and sweep.settings.rungs == SweepConfig().rungs
    assert sweep.experiment.train.steps == 600


@pytest.mark.parametrize("override, message", [
    ("sweep.searcher=grid", "sweep.searcher"),
    ("sweep.metric=accuracy", "sweep.metric"),
    ("sweep.search.lambda_c=[0, 1]", "log-uniform"),
    ("sweep.search.K=[3, 2]", "low <= high"),
    ("sweep.search.K=[2.5, 3]", "integers"),
    ("sweep.rungs=0", "sweep.rungs"),
    ("sweep.nonsense=1", "sweep.nonsense"),
    ("sweep.points_to_evaluate=[{lambda_x: 1}]", "points_to_evaluate"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(REPO / "configs/sweep_toy_birds.yaml", [override])


def test_unknown_top_level_key_in_sweep_file(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(f"experiment: {REPO / 'configs/toy_birds.yaml'}\nsweep: {{}}\ntrain: {{steps: 3}}\n")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_sweep(bad)


def test_k_range_resolves_zero_and_refuses_too_few_components():
    settings = SweepConfig()
    settings.search.K = [0, 4]
    assert k_range(settings, num_classes=1) == (2, 4)
    settings.search.K = [1, 3]
    with pytest.raises(ConfigError, match="at least C \\+ 1 = 2"):
        k_range(settings, num_classes=1)


def test_rung_ends_split_steps_evenly():
    assert rung_ends(12, 3) == [4, 8, 12]
    assert rung_ends(10, 4) == [2, 5, 8, 10]
    with pytest.raises(ConfigError, match="train.steps=2"):
        rung_ends(2, 3)


def test_trial_config_sets_searched_values_and_its_own_run():
    base = load_sweep(REPO / "configs/toy_birds.yaml").experiment.to_dict()
    cfg = trial_config(base, {"lambda_m": 0.5, "lambda_c": 2, "K": 3}, "abc_00001")
    assert (cfg["objective"]["lambda_m"], cfg["objective"]["lambda_c"], cfg["model"]["K"]) == (0.5, 2.0, 3)
    assert cfg["train"]["run_name"] == "abc_00001" and cfg["train"]["checkpoint_every"] == 0
    assert cfg["mlflow"]["enabled"] is False and base["mlflow"]["enabled"] is True  # the base is not changed


@pytest.mark.parametrize("value, current, mode, expected", [
    (0.70, 0.60, "max", True), (0.60, 0.70, "max", False), (0.65, 0.65, "max", False),
    (0.30, 0.40, "min", True), (0.40, 0.30, "min", False),
    (0.6500001, 0.65, "max", False),  # equal at the registry's 6 significant digits: no promotion
])
def test_beats_is_strict(value, current, mode, expected):
    assert beats(value, current, mode) is expected


def test_champion_decision():
    data = {"data.manifest_sha256": "abc", "image_size": "64"}
    metric = "val/method/miou"
    assert decide(None, data, metric, 0.5, "max")[0] == "champion"
    champion = {**data, f"metric.{metric}": "0.6"}
    assert decide(champion, data, metric, 0.7, "max")[0] == "champion"
    alias, reason = decide(champion, data, metric, 0.5, "max")
    assert alias == "challenger" and "does not beat" in reason
    alias, reason = decide({**champion, "data.manifest_sha256": "other"}, data, metric, 0.9, "max")
    assert alias == "challenger" and "other data" in reason
    assert decide(data, data, metric, 0.9, "max")[0] == "challenger"  # no metric to compare with


def test_each_rank_stages_only_its_own_shards(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step0000008"
    step.mkdir(parents=True)
    for name in ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "complete.json"]:
        (step / name).write_text(name)
    (run / "segmenter.pt").write_text("weights")
    staged = {}
    for rank in (0, 1):
        staging = tmp_path / f"rank{rank}"
        stage_checkpoint(run, 8, rank, staging)
        staged[rank] = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    assert staged[1] == ["checkpoints/step0000008/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert staged[0] == ["checkpoints/step0000008/complete.json", "checkpoints/step0000008/mp_rank_00_model_states.pt",
                         "checkpoints/step0000008/zero_pp_rank_0_mp_rank_00_optim_states.pt", "segmenter.pt"]
    assert not set(staged[0]) & set(staged[1])  # Ray Train merges the shares: no file twice


def test_restore_point_copies_a_newer_reported_checkpoint(tmp_path):
    from ray.train import Checkpoint

    from tune.trial import restore_point

    reported = tmp_path / "reported" / "checkpoints" / "step0000008"
    reported.mkdir(parents=True)
    (reported / "complete.json").write_text(json.dumps({"step": 8, "world_size": 1, "zero_stage": 0, "bf16": False}))
    (reported / "mp_rank_00_model_states.pt").write_text("x")
    local = tmp_path / "run" / "checkpoints"
    assert restore_point(local, None, copy=True) == 0
    assert restore_point(local, Checkpoint.from_directory(str(tmp_path / "reported")), copy=True) == 8
    assert (local / "step0000008" / "mp_rank_00_model_states.pt").read_text() == "x"


@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_searchers_try_the_given_points_first_then_sample_the_space(searcher):
    from tune.sweep import make_searcher, search_space

    settings = SweepConfig(searcher=searcher, seed=3)
    settings.search.lambda_m, settings.search.lambda_c, settings.search.K = [0.1, 10], [0.5, 0.5], [0, 4]
    space = search_space(settings, num_classes=1)
    assert space["lambda_c"] == 0.5  # low == high: a constant
    first = {"lambda_m": 1.0, "lambda_c": 0.5, "K": 2}
    found = []
    if searcher == "optuna":
        search = make_searcher(settings, [first], space)
        search.set_search_properties("val/method/miou", "max", space)
        found = [{**space, **search.suggest(f"t{i}")} for i in range(6)]  # Tune adds the constants
    else:
        from ray.tune.search.variant_generator import generate_variants

        search = make_searcher(settings, [first], space)
        assert search._points_to_evaluate == [first]
        found = [first] + [variant for _, variant in
                           (next(generate_variants(space)) for _ in range(5))]
    assert found[0] == first
    for config in found[1:]:
        assert 0.1 <= config["lambda_m"] <= 10 and config["lambda_c"] == 0.5
        assert config["K"] in (2, 3, 4)


def test_concurrency_fits_whole_trials_into_the_cluster():
    from trainer.config import ConfigError
    from tune.sweep import concurrency

    # 2 CPUs, a trial = 0.5 (trial process) + 1 worker × 1 CPU: one trial at a time, never 4 half-started ones
    assert concurrency(SweepConfig(), {"CPU": 2.0}) == 1
    assert concurrency(SweepConfig(workers=2, trial_cpus=0.5, cpus_per_worker=1.0), {"CPU": 16.0}) == 6
    assert concurrency(SweepConfig(max_concurrent=3), {"CPU": 2.0}) == 3  # explicit wins
    gpu = SweepConfig(workers=2, use_gpu=True, cpus_per_worker=1.0)
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ConfigError, match="needs 2.5 CPUs"):
        concurrency(SweepConfig(workers=2), {"CPU": 2.0})


def test_results_table_shows_the_metric_and_its_boundary_f():
    rows = [{"trial_id": "a1", "params": {"lambda_m": 0.5, "K": 3}, "outcome": "complete",
             "metrics": {"rung": 3, "val/method/miou": 0.71234, "val/method/boundary_f": 0.4567, "train/loss": 2.5}},
            {"trial_id": "b2", "params": {"lambda_m": 2.0, "K": 4}, "outcome": "stopped_early",
             "metrics": {"rung": 1, "val/method/miou": 0.3}}]
    lines = results_table(rows, "val/method/miou").splitlines()
    assert lines[0] == "| trial | lambda_m | K | rungs | val/method/miou | boundary F | train/loss | outcome |"
    assert lines[2] == "| a1 | 0.5 | 3 | 3 | 0.7123 | 0.4567 | 2.5000 | complete |"
    assert lines[3] == "| b2 | 2 | 4 | 1 | 0.3000 | - | - | stopped_early |"
    loss_lines = results_table(rows, "val/loss").splitlines()  # a loss metric has no boundary F column
    assert loss_lines[0] == "| trial | lambda_m | K | rungs | val/loss | train/loss | outcome |"
