"""`wsssrec eval` on a toy-birds build with test_paired, through the real evaluate() (a random g and segmenter,
MLflow off): every prediction kind gets its paired scores and boundary F, the trivial rows' paired gaps are
exactly 0 (identical masks), the other splits' numbers are the same with and without the paired split, and a
data set built before the split is evaluated without it (a warning), unless the split is not optional."""
import json
import logging

import pytest
import torch

from conftest import TOY_ARGS
from trainer.config import ConfigError, load_config

REPO_CONFIG = "configs/toy_birds.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_shards.toy_birds import build_toy_birds
    from trainer.effnet import EfficientNetLite0
    from trainer.weights import build_segmenter, save_segmenter

    work = tmp_path_factory.mktemp("paired-eval")
    small = {"train": 8, "val": 16, "test_aligned": 16, "test_conflict": 16}
    manifest = build_toy_birds(str(work / "data"), progress=False, **{**TOY_ARGS, "counts": small, "paired": 8})
    with open(manifest) as f:
        doc = json.load(f)  # the same shards, as a build from before the paired split lists them
    del doc["splits"]["test_paired"]
    for split in doc["splits"].values():
        split["shards"] = [str(work / "data" / name) for name in split["shards"]]
    (work / "old").mkdir()
    (work / "old" / "manifest.json").write_text(json.dumps(doc))
    torch.manual_seed(0)
    g = EfficientNetLite0(num_classes=1)
    torch.save(g.state_dict(), work / "g.pt")
    cfg = _config(work, manifest)
    save_segmenter(build_segmenter(cfg, 1, g), cfg, ["bird"], work / "segmenter.pt")
    return work, manifest


def _config(work, manifest, *extra):
    return load_config(REPO_CONFIG, [f"data.url={manifest}", "data.image_size=64", f"train.out_dir={work}/runs",
                                     "mlflow.enabled=false", "train.threads=1", "eval.grid_images=2",
                                     f"classifier.checkpoint={work}/g.pt",
                                     "eval.gate_threshold=0.5",  # the gate on: CAM-gated is one of the kinds
                                     *extra])


@pytest.fixture(scope="module")
def evaluated(setup):
    from trainer.evaluate import evaluate

    work, manifest = setup
    new = evaluate(_config(work, manifest, "train.run_name=new"), segmenter_file=work / "segmenter.pt")
    return work, new


def test_every_kind_has_paired_scores_and_boundary_f(evaluated):
    work, results = evaluated
    assert list(results["splits"]) == ["val", "test_aligned", "test_paired", "test_conflict"]
    paired = results["splits"]["test_paired"]["paired"]
    assert set(paired) == {"method", "CAM", "CAM-gated", "all-background", "all-foreground"}
    for kind, p in paired.items():
        assert p["gap"] == ["water", "land"] and p["positive_pairs"] == 4 and p["negative_pairs"] == 4, kind
        assert p["groups"]["water"]["images"] == p["groups"]["land"]["images"] == 8
        assert p["paired_gap"] == pytest.approx(p["groups"]["water"]["miou"] - p["groups"]["land"]["miou"])
    for kind in ("all-background", "all-foreground"):  # the same masks on both sides, the same prediction
        assert paired[kind]["paired_gap"] == 0 and paired[kind]["pair_gap_mean"] == 0, kind
        assert paired[kind]["worst_group"] == "tie", kind
    for split, res in results["splits"].items():
        assert "paired" not in res or split == "test_paired"
        for kind, summary in res["methods"].items():
            assert 0 <= summary["boundary_f"] <= 1, (split, kind)
        assert res["methods"]["all-foreground"]["boundary_f"] == 0  # no edge inside the image, none found
    saved = json.loads((work / "runs" / "new" / "eval" / "results.json").read_text())
    assert saved["splits"]["test_paired"]["paired"]["method"]["worst_group"] in ("water", "land", "tie")
    table = (work / "runs" / "new" / "eval" / "results.md").read_text()
    assert "| test_paired | method | " in table and "paired gap (water − land)" in table


def test_a_build_without_the_paired_split_is_evaluated_without_it_and_the_same(setup, evaluated, caplog):
    from trainer.evaluate import evaluate

    work, _ = setup
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        old = evaluate(_config(work, work / "old" / "manifest.json", "train.run_name=old"),
                       segmenter_file=work / "segmenter.pt")
    assert "split 'test_paired' of eval.splits is not in" in caplog.text and "--only test_paired" in caplog.text
    assert list(old["splits"]) == ["val", "test_aligned", "test_conflict"]
    new = evaluated[1]
    for split in old["splits"]:  # the paired split changes no other number
        assert old["splits"][split]["methods"] == new["splits"][split]["methods"], split
        assert old["splits"][split]["g"] == new["splits"][split]["g"], split
    for key in ("cam_threshold", "fg_threshold", "gate_threshold"):
        assert old[key] == new[key]


def test_a_missing_split_that_is_not_optional_is_still_an_error(setup):
    from data_shards.errors import DataError
    from trainer.evaluate import evaluate

    work, _ = setup
    cfg = _config(work, work / "old" / "manifest.json", "eval.optional_splits=[]")
    with pytest.raises((DataError, ConfigError), match=r"has no split 'test_paired'"):
        evaluate(cfg, segmenter_file=work / "segmenter.pt")
