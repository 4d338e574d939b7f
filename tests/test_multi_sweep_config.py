"""configs/sweep_toy_multi.yaml: K searched from C + 1 to 2C + 1, written relative to the data set's C."""
import pytest

from trainer.config import ConfigError
from tune.settings import SweepConfig, k_bound, k_range, load_sweep


def test_toy_multi_sweep_k_range_is_relative_to_C():
    sweep = load_sweep("configs/sweep_toy_multi.yaml")
    assert sweep.experiment.data.url == "data/toy-multi/manifest.json"
    assert sweep.experiment.train.steps == 400
    assert k_range(sweep.settings, 4) == (5, 9)
    assert k_range(sweep.settings, 1) == (2, 3)
    assert sweep.settings.search.lambda_m == [0.1, 10.0] and sweep.settings.search.lambda_c == [0.1, 10.0]


def test_k_bounds():
    assert [k_bound(v, 4) for v in (0, 7, "C+1", "2C+1", "C", "3C-2", " 2 C + 1 ")] == [5, 7, 5, 9, 4, 10, 9]
    settings = SweepConfig()
    settings.search.K = ["C", "2C+1"]
    with pytest.raises(ConfigError, match="at least C \\+ 1 = 5"):
        k_range(settings, 4)
    with pytest.raises(ConfigError, match="sweep.search.K"):
        load_sweep("configs/sweep_toy_multi.yaml", ["sweep.search.K=[C+1, lots]"])


def test_toy_multi_sweep_searches_the_per_class_terms():
    from tune.settings import dimensions
    from tune.sweep import search_space, start_points

    sweep = load_sweep("configs/sweep_toy_multi.yaml")
    dims = {d.key: (d.distribution, d.values) for d in dimensions(sweep.settings.search)}
    assert dims["objective.class_area_weight"] == ("loguniform", [1.0, 32.0])
    assert dims["objective.class_area_min"] == ("uniform", [0.02, 0.12])
    assert dims["model.class_init_area"] == ("uniform", [0.02, 0.12])
    assert dims["objective.class_area_floor"] == ("choice", ["hinge", "log"])
    assert dims["objective.class_rank_weight"] == ("loguniform", [0.5, 8.0])
    assert dims["objective.cam_weight"] == ("loguniform", [0.3, 3.0])
    assert dims["objective.cam_steps"] == ("choice", [0, 150, 300])
    assert dims["objective.cam_high"] == ("uniform", [0.5, 0.8])
    assert len(search_space(sweep.settings, 4)) == len(dims)
    # the first trial is the experiment's own setting, per-class terms included
    first = start_points(sweep.settings, sweep.experiment, 4)[0]
    own = {d.key: first[d.name] for d in dimensions(sweep.settings.search)}
    assert own["objective.class_area_weight"] == 8.0 and own["objective.class_area_min"] == 0.08
    assert own["objective.class_area_floor"] == "log" and own["model.class_init_area"] == 0.08
    assert own["objective.area_weight"] == 2.0 and own["objective.class_rank_weight"] == 2.0
    assert own["objective.cam_weight"] == 1.0 and own["objective.cam_steps"] == 150 and own["objective.cam_high"] == 0.6
