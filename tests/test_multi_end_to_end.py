"""A tiny multi-class run through the real entry point against a real `mlflow server`: a binary segmenter is
registered as the champion, g is fine-tuned on toy-multi, the segmenter starts from
models:/wsssrec-segmenter@champion, and eval writes per-class IoU, the confusion matrix, worst-class and
per-bias-group numbers. The registered multi-class model carries the lineage of the model it started from."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_mlflow import REPO, mlflow_server, wsssrec

SEG = "wsssrec-segmenter"


@pytest.fixture(scope="module")
def multi_run(toy_multi_dataset, toy_dataset, tmp_path_factory):
    from trainer.config import load_config
    from trainer.effnet import EfficientNetLite0
    from trainer.weights import build_segmenter, save_segmenter

    work = tmp_path_factory.mktemp("multi-e2e")
    server = mlflow_server(work / "server", str(work / "artifacts"))
    server.start()
    env = {"MLFLOW_TRACKING_URI": server.url}
    try:
        # a binary "champion": the toy-birds architecture with a (random) binary g, registered from its file
        binary_cfg = load_config(REPO / "configs/toy_birds.yaml", [f"data.url={toy_dataset}", "data.image_size=64"])
        torch.manual_seed(0)
        g_binary = EfficientNetLite0(num_classes=1)
        torch.save(g_binary.state_dict(), work / "g_binary.pt")
        binary_cfg.classifier.checkpoint = str(work / "g_binary.pt")
        save_segmenter(build_segmenter(binary_cfg, 1, g_binary), binary_cfg, ["bird"], work / "binary.pt")
        add = wsssrec("registry", "add", str(work / "binary.pt"), "--alias", "champion", cwd=work, env_extra=env)
        common = ["-c", str(REPO / "configs/toy_multi.yaml"), f"data.url={toy_multi_dataset}", "data.image_size=64",
                  f"train.out_dir={work}/runs", "train.run_name=multi", "eval.grid_images=4", "train.threads=1",
                  f"train.deepspeed={REPO}/configs/deepspeed/zero0.json", "data.eval_batch_size=20"]
        outputs = {
            "add": add,
            "stage1": wsssrec("train-classifier", *common, "classifier.epochs=2", cwd=work, env_extra=env),
            "stage2": wsssrec("train", *common, "train.steps=12", "data.batch_size=8", "train.log_every=4",
                              f"model.init_from=models:/{SEG}@champion", cwd=work, env_extra=env),
            "eval": wsssrec("eval", *common, cwd=work, env_extra=env),
        }
        from mlflow import MlflowClient

        client = MlflowClient(server.url, server.url)
        versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name='{SEG}'")}
        runs = client.search_runs([client.get_experiment_by_name("wsssrec").experiment_id])
        seg_run = next(r for r in runs if r.info.run_name == "multi-segmenter")
        eval_run = next(r for r in runs if r.info.run_name == "multi-eval")
        eval_artifacts = [a.path for a in client.list_artifacts(eval_run.info.run_id, "confusion")]
        yield (work / "runs" / "multi", outputs, versions, dict(seg_run.data.tags),
               (dict(eval_run.data.metrics), eval_artifacts))
    finally:
        server.stop()


def _truth_counts(manifest: str, split: str, labels: int) -> np.ndarray:
    """Pixels per true label over the split's positive images (ignore excluded), straight from the shards."""
    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest

    counts = np.zeros(labels, np.int64)
    for shard in read_manifest(manifest).split(split).shards:
        for raw in raw_samples(shard):
            if json.loads(raw["json"])["labels"]:
                mask = np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
                counts += np.bincount(mask[mask != 255].ravel(), minlength=labels)[:labels]
    return counts


@pytest.mark.slow
def test_results_have_per_class_iou_confusion_and_worst_class(multi_run, toy_multi_dataset):
    run, outputs, _, _, _ = multi_run
    results = json.loads((run / "eval" / "results.json").read_text())
    classes = results["classes"]
    assert classes == ["bird", "mammal", "fish", "fruit"]
    assert set(results["cam_thresholds"]) == set(classes)
    for split, res in results["splits"].items():
        assert set(res["classes"]) == {"method", "CAM", "all-background", "all-foreground"}
        truth = _truth_counts(toy_multi_dataset, split, 5)
        for method, report in res["classes"].items():
            confusion = np.asarray(report["confusion"])
            assert confusion.shape == (5, 5) and report["labels"] == ["background", *classes]
            assert np.array_equal(confusion.sum(1), truth), (split, method)  # every valid pixel counted once
            ious = report["per_class_iou"]
            assert set(ious) == set(classes) and all(0.0 <= v <= 1.0 for v in ious.values())
            tp = np.diag(confusion)[1:]
            union = confusion.sum(0)[1:] + confusion.sum(1)[1:] - tp
            assert np.allclose([ious[c] for c in classes], tp / union)
            assert report["worst_class_iou"] == min(ious.values()) and ious[report["worst_class"]] == min(ious.values())
            s = res["methods"][method]
            assert s["miou"] == pytest.approx(np.mean([s["background_iou"], *ious.values()]))
        assert all(v == 0.0 for v in res["classes"]["all-background"]["per_class_iou"].values())
        if split.startswith("test"):
            groups = res["bias_groups"]["method"]
            assert set(groups) == {"aligned", "conflict"} and all(0 <= g["miou"] <= 1 for g in groups.values())
        assert Path(res["confusion_png"]["method"]).is_file() and Path(res["confusion_png"]["CAM"]).is_file()
    md = (run / "eval" / "results.md").read_text()
    assert "| test_conflict | method |" in md and "Confusion (test_conflict, method" in md
    assert "fruit IoU" in md


@pytest.mark.slow
def test_init_from_the_champion_is_reported_and_recorded(multi_run):
    run, outputs, versions, seg_tags, _ = multi_run
    out = outputs["stage2"].stdout
    assert f"init_from: models:/{SEG}@champion → models:/{SEG}/1" in out
    assert "skipped mask_decoder.head.weight (2, 16, 1, 1) -> (5, 16, 1, 1)" in out
    record = json.loads((run / "init_from.json").read_text())
    assert record["skipped"] == ["mask_decoder.head.weight (2, 16, 1, 1) -> (5, 16, 1, 1)",
                                 "mask_decoder.head.bias (2,) -> (5,)"]
    # the frozen encoder is this run's g's trunk, kept; the decoders come from the binary champion
    assert record["kept"] and all(k.startswith("encoder.") for k in record["kept"]) and record["missing"] == []
    assert not any(k.startswith("encoder.") for k in record["loaded"])
    assert any(k.startswith("mask_decoder.") for k in record["loaded"])
    assert seg_tags["init_from.kept"] == str(len(record["kept"]))
    # the run and the registered multi-class version both name the binary version they started from
    assert seg_tags["init_from"] == f"models:/{SEG}@champion"
    assert seg_tags["init_from.model_uri"] == f"models:/{SEG}/1" and seg_tags["init_from.model_version"] == "1"
    assert versions["1"]["wsssrec.kind"] == "segmenter" and "init_from" not in versions["1"]
    assert versions["2"]["init_from.model_uri"] == f"models:/{SEG}/1"
    assert versions["2"]["init_from.weights_sha256"] == seg_tags["init_from.weights_sha256"]
    assert versions["2"]["init_from"] == f"models:/{SEG}@champion"


@pytest.mark.slow
def test_multi_class_metrics_and_confusion_pictures_logged(multi_run):
    run, outputs, _, _, (metrics, artifacts) = multi_run
    results = json.loads((run / "eval" / "results.json").read_text())
    for split in ("val", "test_aligned", "test_conflict"):
        report = results["splits"][split]["classes"]["method"]
        for name, value in report["per_class_iou"].items():
            assert metrics[f"{split}/method/iou_{name}"] == pytest.approx(value)
        assert metrics[f"{split}/method/worst_class_iou"] == pytest.approx(report["worst_class_iou"])
        assert f"confusion/confusion_{split}_method.png" in artifacts
    assert "conflict" in results["splits"]["test_conflict"]["bias_groups"]["CAM"]
    assert metrics["test_conflict/method/conflict/miou"] == pytest.approx(
        results["splits"]["test_conflict"]["bias_groups"]["method"]["conflict"]["miou"])
    assert "| test_conflict | CAM |" in outputs["eval"].stdout and "worst class" in outputs["eval"].stdout
