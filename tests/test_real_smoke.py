"""CPU smoke run of configs/voc.yaml shrunk by overrides (issue 20): a tiny generated VOCdevkit in VOC's exact
layout (tests/test_real_voc.py's fixture, grown to 8 train_aug and 2 val images of odd sizes) converted with
`wsssrec data convert voc --train-list`, stage 1 and stage 2 through the real `deepspeed` launcher with 2
processes for a few steps (random-scale crops, batch["valid"] in the losses), `wsssrec eval` at each image's own
size with the config's multi-scale + flip (global-confusion mIoU reported), both models registered on a real
`mlflow server`, and `wsssrec predict` with the registered segmenter on images whose sizes are no multiple of 32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_distributed import BIN, _finish, _free_port
from test_mlflow import mlflow_server
from test_real_voc import _save_palette_png, _xml, make_vocdevkit

from data_shards.convert import VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
# (id, W, H, classes): more train_aug images for 2 ranks × 2 shards, one more val image
EXTRA_TRAIN = [("2008_000200", 50, 37, ["dog"]), ("2008_000201", 45, 61, ["cat", "person"]),
               ("2008_000202", 70, 43, ["car"]), ("2008_000203", 33, 33, ["dog", "chair"]),
               ("2008_000204", 58, 40, ["person"]), ("2008_000205", 41, 52, ["bird"])]
EXTRA_VAL = [("2011_003300", 47, 35, ["dog"])]


def _grow(voc: Path) -> None:
    """Add the extra ids with a JPEG, an Annotations XML and a palette mask (one box per class)."""
    for n, (image_id, w, h, names) in enumerate(EXTRA_TRAIN + EXTRA_VAL):
        rng = np.random.default_rng(100 + n)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for k, name in enumerate(names):
            y0, x0 = 2 + 3 * k, 3 + 4 * k
            mask[y0:y0 + h // 2, x0:x0 + w // 2] = VOC_CLASSES.index(name) + 1
            pixels[y0:y0 + h // 2, x0:x0 + w // 2] = (40 * k + 200, 30, 60)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml([(name, 0) for name in names]))
        folder = "SegmentationClassAug" if (image_id, w, h, names) in EXTRA_TRAIN else "SegmentationClass"
        _save_palette_png(mask, voc / folder / f"{image_id}.png")
    lists = voc / "ImageSets" / "Segmentation"
    train = lists / "train_aug.txt"
    train.write_text(train.read_text() + "".join(f"{i}\n" for i, *_ in EXTRA_TRAIN))
    val = lists / "val.txt"
    val.write_text(val.read_text() + "".join(f"{i}\n" for i, *_ in EXTRA_VAL))


def _run(args: list, log: Path, cwd: Path, env: dict, timeout: float = 400) -> str:
    proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _finish(proc, log, timeout=timeout)
    return log.read_text()


@pytest.mark.slow
def test_voc_config_shrunk_trains_evaluates_and_registers(tmp_path):
    import mlflow

    voc = make_vocdevkit(tmp_path)
    _grow(voc)
    work = tmp_path / "work"
    work.mkdir()
    server = mlflow_server(tmp_path / "mlflow", str(tmp_path / "mlflow-artifacts"))
    server.start()
    try:
        env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": server.url}
        data = tmp_path / "voc-tiny"
        out = _run([sys.executable, "-m", "trainer", "data", "convert", "voc", "--root", tmp_path / "VOCdevkit",
                    "--out", data, "--train-list", "train_aug.txt", "--maxcount", "2"], work / "convert.log", work, env)
        manifest = json.loads((data / "manifest.json").read_text())
        assert manifest["splits"]["train"]["samples"] == 8 and len(manifest["splits"]["train"]["shards"]) == 4
        assert manifest["splits"]["val"]["samples"] == 2 and len(manifest["classes"]) == 20, out
        shrink = [f"data.url={data}", "data.image_size=64", "data.batch_size=2", "data.eval_batch_size=2",
                  "data.num_workers=0", "data.shuffle_buffer=8", "train.steps=3", "train.bf16=false",
                  "train.checkpoint_every=0", "train.log_every=1", "train.threads=1", "train.dist_timeout_s=300",
                  f"train.out_dir={work}/runs", "train.run_name=voc-smoke", "classifier.epochs=1",
                  "classifier.batch_size=2", "eval.grid_images=2"]
        config = ["-c", REPO / "configs" / "voc.yaml"]
        for stage in ("train-classifier", "train"):
            log = work / f"{stage}.log"
            text = _run([BIN / "deepspeed", "--num_accelerators", 2, "--master_port", _free_port(), "--module",
                         "trainer", stage, *config, *shrink], log, work, env)
            assert text.count("exits successfully") == 2, f"both ranks must finish {stage}:\n{text[-3000:]}"
        run = work / "runs" / "voc-smoke"
        history = json.loads((run / "train_history.json").read_text())
        assert history["world_size"] == 2 and len(history["loss"]) == 3
        assert all(np.isfinite(history["loss"]))
        resolved = (run / "config.yaml").read_text()
        assert "resize: crop" in resolved and "zero1" in resolved

        text = _run([sys.executable, "-m", "trainer", "eval", *config, *shrink], work / "eval.log", work, env)
        results = json.loads((run / "eval" / "results.json").read_text())
        val = results["splits"]["val"]["methods"]
        for method in ("method", "CAM", "all-background", "all-foreground"):
            assert 0.0 <= val[method]["miou_all"] <= 1.0, (method, val[method])
        # VOC's val images all carry tags: the global confusion matrix is the pooled one
        assert val["method"]["miou_all"] == pytest.approx(val["method"]["miou"])
        grid = Image.open(results["splits"]["val"]["grid"])
        assert grid.size[0] > 0

        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        classifier = client.get_model_version("wsssrec-classifier", "1")
        segmenter = client.get_model_version("wsssrec-segmenter", "1")
        assert classifier.status == segmenter.status == "READY"
        eval_run = client.search_runs([client.get_experiment_by_name("wsssrec").experiment_id],
                                      filter_string="attributes.run_name = 'voc-smoke-eval'")
        assert eval_run and "val/method/miou_all" in eval_run[0].data.metrics

        images = tmp_path / "photos"
        images.mkdir()
        sizes = [(45, 61), (70, 43), (33, 33)]  # W × H, none a multiple of 32
        for n, (w, h) in enumerate(sizes):
            Image.fromarray(np.random.default_rng(n).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                images / f"p{n}.jpg")
        _run([sys.executable, "-m", "trainer", "predict", "--model", "models:/wsssrec-segmenter/1", "--images",
              images, "--out", tmp_path / "masks"], work / "predict.log", work, env)
        for n, (w, h) in enumerate(sizes):
            mask = np.asarray(Image.open(tmp_path / "masks" / f"p{n}.png"))
            assert mask.shape == (h, w) and mask.max() <= 20
    finally:
        server.stop()
