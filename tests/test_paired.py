"""The paired split's scores on hand-made masks (trainer/paired.py through evaluate.SplitScores), the eval
table's paired rows, and `wsssrec report`'s paired table and bias-tax arithmetic on hand-made results.json."""
import json

import pytest
import torch

from trainer import report
from trainer.eval_report import method_summaries, paired_table, results_table, split_metrics
from trainer.evaluate import SplitScores
from trainer.metrics import SegmentationMeter


def _masks():
    """Three pairs of 4 × 4 images (water, land): truth, prediction, tagged. Truth: the left two columns are
    bird (the negative pair: none). Pair 0: water exact, land only the top half of the bird. Pair 1: water all
    bird, land exact. Pair 2 (negative): water predicts 2 bird pixels, land none."""
    bird = torch.zeros(4, 4, dtype=torch.long)
    bird[:, :2] = 1
    top = torch.zeros_like(bird)
    top[:2, :2] = 1
    two = torch.zeros_like(bird)
    two[3, 2:] = 1
    empty = torch.zeros_like(bird)
    truth = [bird, bird, bird, bird, empty, empty]
    pred = [bird, top, torch.ones_like(bird), bird, two, empty]
    meta = [{"pair": p, "group": g, "labels": [0] if p < 2 else []} for p in range(3) for g in ("water", "land")]
    return torch.stack(truth), torch.stack(pred), meta


def _scored(batches) -> SplitScores:
    scored = SplitScores({"method": SegmentationMeter(2)}, {"method": {}})
    for truth, pred, meta in batches:
        labels = torch.tensor([[1.0] if m["labels"] else [0.0] for m in meta])
        scored.update({"method": pred}, {"mask": truth, "labels": labels, "meta": meta}, 2)
    return scored


def test_paired_gap_worst_group_and_per_pair_differences_hand_computed():
    truth, pred, meta = _masks()
    # two batches that split pair 1 across them: pairs are matched by id, not by batch
    scored = _scored([(truth[:3], pred[:3], meta[:3]), (truth[3:], pred[3:], meta[3:])])
    p = scored.pairs["method"].summary()
    water, land = p["groups"]["water"], p["groups"]["land"]
    # water pooled: bird TP 16 of union 24, background TP 8 of union 16; land: bird 12/16, background 16/20
    assert water["iou_1"] == pytest.approx(2 / 3) and water["background_iou"] == pytest.approx(1 / 2)
    assert water["miou"] == pytest.approx(7 / 12) and land["miou"] == pytest.approx((0.75 + 0.8) / 2)
    assert p["gap"] == ["water", "land"] and p["paired_gap"] == pytest.approx(7 / 12 - 0.775)
    # per image mIoU: pair 0 water 1, land (4/8 + 8/12) / 2 = 7/12; pair 1 water (8/16 + 0) / 2, land 1
    assert p["pair_gap_mean"] == pytest.approx(((1 - 7 / 12) + (0.25 - 1)) / 2)
    assert p["pair_gap_std"] == pytest.approx(7 / 12)
    assert p["positive_pairs"] == 2 and p["negative_pairs"] == 1
    assert p["pair_fp_gap"] == pytest.approx(2 / 16)
    assert p["worst_group"] == "water" and p["worst_group_miou"] == pytest.approx(7 / 12)
    # boundary F at 2 px: water pair 0 exact (1), pair 1 all bird (no predicted edge: 0); land 1 and 1
    assert water["boundary_f"] == pytest.approx(0.5) and land["boundary_f"] == pytest.approx(1.0)
    assert p["boundary_f_gap"] == pytest.approx(-0.5)
    assert water["images"] == 3 and water["positive_images"] == 2
    # the split's own meter pools both groups, as for every split
    whole = method_summaries(scored)["method"]
    assert whole["iou_1"] == pytest.approx(28 / 40) and whole["boundary_f"] == pytest.approx(0.75)


def test_identical_predictions_on_both_groups_give_zero_gaps():
    truth, pred, meta = _masks()
    same = pred.clone()
    same[1::2] = pred[0::2]  # land predicted exactly as water
    p = _scored([(truth, same, meta)]).pairs["method"].summary()
    assert p["paired_gap"] == 0 and p["pair_gap_mean"] == 0 and p["pair_gap_std"] == 0 and p["pair_fp_gap"] == 0
    assert p["worst_group"] == "tie" and p["worst_group_miou"] == p["groups"]["water"]["miou"]


def test_a_split_without_pair_metadata_has_no_paired_scores_and_same_meters():
    truth, pred, meta = _masks()
    plain = [{"labels": m["labels"], "background": m["group"]} for m in meta]
    scored, paired = _scored([(truth, pred, plain)]), _scored([(truth, pred, meta)])
    assert scored.pairs == {}
    assert method_summaries(scored) == method_summaries(paired)


def _result_with_paired() -> dict:
    truth, pred, meta = _masks()
    scored = _scored([(truth, pred, meta)])
    result = {"g": {"accuracy": 1.0}, "methods": method_summaries(scored),
              "paired": {"method": scored.pairs["method"].summary()}}
    return {"classes": ["bird"], "cam_threshold": 0.3, "cam_threshold_split": "val", "splits": {"test_paired": result}}


def test_eval_table_shows_boundary_f_and_the_paired_rows():
    results = _result_with_paired()
    table = results_table(results)
    assert "| split | method | g acc | bird IoU | boundary F | bg IoU | mIoU | mIoU all | neg FP area |" in table
    assert "| test_paired | method | 1.000 | 0.700 | 0.750 |" in table
    summary = results["splits"]["test_paired"]["methods"]["method"]
    assert f"| {summary['miou']:.3f} | {summary['miou_all']:.3f} | {summary['negative_fp_area']:.3f} |" in table
    rows = paired_table(results).splitlines()
    assert rows[0].startswith("| split | method | water mIoU | land mIoU | paired gap (water − land) | per-pair gap")
    assert rows[2] == ("| test_paired | method | 0.583 | 0.775 | -0.192 | -0.167 ± 0.583 (2 pairs) | 0.500 | 1.000 | "
                       "water 0.583 |")
    metrics = split_metrics("test_paired", results["splits"]["test_paired"])
    assert metrics["test_paired/method/boundary_f"] == pytest.approx(0.75)
    assert metrics["test_paired/method/water/miou"] == pytest.approx(7 / 12)
    assert metrics["test_paired/method/land/boundary_f"] == pytest.approx(1.0)
    assert metrics["test_paired/method/paired_gap"] == pytest.approx(7 / 12 - 0.775)
    assert metrics["test_paired/method/worst_group_miou"] == pytest.approx(7 / 12)


# ---- wsssrec report: the paired table and the bias tax on hand-made results.json files ----

def _paired_summary(water: float, land: float, water_f: float = 0.5, land_f: float = 0.4) -> dict:
    worst = "water" if water < land else "land"
    return {"groups": {"water": {"miou": water, "boundary_f": water_f}, "land": {"miou": land, "boundary_f": land_f}},
            "gap": ["water", "land"], "paired_gap": water - land, "pair_gap_mean": water - land - 0.001,
            "pair_gap_std": 0.2, "worst_group": worst, "worst_group_miou": min(water, land)}


def _write_run(root, name: str, water: float, land: float, conflict_miou: float, g_accuracy: float = 0.9,
               **boundary) -> None:
    folder = root / name / "eval"
    folder.mkdir(parents=True)
    method = {"iou_1": 0.5, "miou": conflict_miou, "negative_fp_area": 0.02, "boundary_f": 0.6}
    results = {"splits": {
        "test_conflict": {"g": {"accuracy": g_accuracy},
                          "methods": {"method": method, "CAM": {**method, "miou": 0.5}}},
        "test_paired": {"g": {"accuracy": g_accuracy}, "methods": {"method": method},
                        "paired": {"method": _paired_summary(water, land, **boundary),
                                   "CAM": _paired_summary(0.6, 0.5)}}}}
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def runs_dir(tmp_path):
    _write_run(tmp_path, "rho05-seed0", 0.84, 0.73, 0.70, water_f=0.55, land_f=0.45)
    _write_run(tmp_path, "rho05-seed1", 0.82, 0.71, 0.72, water_f=0.55, land_f=0.45)
    _write_run(tmp_path, "rho09-seed0", 0.76, 0.66, 0.66, g_accuracy=0.8, water_f=0.50, land_f=0.40)
    _write_run(tmp_path, "rho09-seed1", 0.78, 0.64, 0.68, water_f=0.52, land_f=0.40)
    _write_run(tmp_path, "other-seed5", 0.80, 0.70, 0.69)
    return tmp_path


def test_bias_tax_arithmetic_over_common_seeds(runs_dir):
    taxes = report.bias_tax(report.collect(runs_dir), control="rho05")
    assert set(taxes) == {"rho09", "other"}
    tax = taxes["rho09"]
    # water: 0.84 − 0.76, 0.82 − 0.78; land: 0.07 both; gap: model (0.10, 0.14) − control (0.11, 0.11)
    assert tax["water/miou"][:2] == pytest.approx((0.06, 0.02)) and tax["water/miou"][2] == [0, 1]
    assert tax["land/miou"][:2] == pytest.approx((0.07, 0.0))
    assert tax["worst_group_miou"][:2] == pytest.approx((0.07, 0.0))  # land is the worst group of both
    assert tax["water/boundary_f"][:2] == pytest.approx((0.04, 0.01))
    assert tax["gap_effect"][:2] == pytest.approx((0.01, 0.02))
    # no common seed: difference of the means, stds combined (control water 0.83 ± 0.01, other 0.80 ± 0)
    other = taxes["other"]
    assert other["water/miou"][:2] == pytest.approx((0.03, 0.01)) and other["water/miou"][2] == []


def test_report_prints_paired_and_bias_tax_tables(runs_dir, capsys):
    report.main([str(runs_dir), "--control", "rho05", "--order", "rho05", "rho09"])
    out = capsys.readouterr().out
    assert "| setting | seeds | train s | bird IoU aligned | boundary F aligned |" in out
    assert "Paired split test_paired" in out
    assert "| rho09 | 0,1 | 0.770 ± 0.010 | 0.650 ± 0.010 | 0.120 ± 0.020 |" in out
    assert "| CAM | 0,1 | 0.600 ± 0.000 | 0.500 ± 0.000 | 0.100 ± 0.000 |" in out
    assert "Bias tax against the control 'rho05' on test_paired" in out
    assert ("| rho09 | 0,1 | +0.060 ± 0.020 | +0.070 ± 0.000 | +0.070 ± 0.000 | +0.040 ± 0.010 | +0.050 ± 0.000 "
            "| +0.010 ± 0.020 |") in out


def test_report_g_table_follows_the_baseline_setting(runs_dir, capsys):
    """Two g families in one folder (the ρ = 0.5 and the ρ = 0.9 g of seed 0): the g rows are the baseline
    setting's, not whichever setting comes first."""
    report.main([str(runs_dir), "--baselines-from", "rho09"])
    out = capsys.readouterr().out
    assert "g of the setting 'rho09'" in out and "| 0 | – | – | 0.800 |" in out and "\n| 5 | " not in out
    report.main([str(runs_dir)])  # default: the first setting in sorted order, "other" (seed 5 only)
    out = capsys.readouterr().out
    assert "g of the setting 'other'" in out and "| 5 | – | – | 0.900 |" in out and "\n| 0 | – | – |" not in out


def test_report_control_errors_name_the_settings(runs_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"control setting 'nosuch' has no test_paired scores \(settings: other, "
                                         r"rho05, rho09\)"):
        report.main([str(runs_dir), "--control", "nosuch"])
    with pytest.raises(SystemExit, match="appears in two of the folders"):
        report.main([str(runs_dir), str(runs_dir)])


def test_report_reads_old_results_without_paired_or_boundary_keys(tmp_path, capsys):
    folder = tmp_path / "old-seed0" / "eval"
    folder.mkdir(parents=True)
    method = {"iou_1": 0.5, "miou": 0.7, "negative_fp_area": 0.02}
    (folder / "results.json").write_text(json.dumps(
        {"splits": {"test_conflict": {"g": {"accuracy": 0.9}, "methods": {"method": method}}}}))
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| old | 0 | – | – | – | – | – | 0.500 | – | 0.700 | 0.020 | – |" in out
    assert "Paired split" not in out


def test_wsssrec_report_command_passes_control_and_order(runs_dir, capsys):
    from trainer.cli import main

    main(["report", str(runs_dir), "--control", "rho05", "--order", "rho09"])
    out = capsys.readouterr().out
    assert "| rho09 | 0,1 | +0.060 ± 0.020 |" in out and "| other |" not in out.split("Bias tax")[1]
