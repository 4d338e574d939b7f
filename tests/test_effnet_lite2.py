"""g as EfficientNet-Lite2 (`classifier.arch=lite2`): the compound scaling of the Lite builder, the arch found
from a checkpoint's tensors and checked against the config, the segmenter's decoders on Lite2's pyramid, and the
real `wsssrec` entry points (stage 1, stage 2, the registry, `wsssrec predict`) rebuilding a Lite2 model.
(The shipped ImageNet weights against the reference implementation: tests/test_models.py, for every arch.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import CHOICES, Config, load_config
from trainer.effnet import (ARCHS, LITE0_STAGES, EfficientNetLite, imagenet_state_dict, lite_stages, load_trunk,
                            round_filters, trunk_arch)
from trainer.models import Segmenter
from trainer.weights import load_classifier, load_segmenter

REPO = Path(__file__).resolve().parent.parent
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def test_lite2_is_lite0_scaled_by_width_1_1_and_depth_1_2():
    """round_filters (divisor 8, never 10 % down) and ceil repeats, first and last stage and the stem fixed, as
    efficientnet_lite_builder.py and the shipped Lite2 weights have it."""
    assert CHOICES["classifier.arch"] == ARCHS == ("lite0", "lite2")
    assert Config().classifier.arch == "lite0"
    assert lite_stages("lite0") == LITE0_STAGES
    lite2 = lite_stages("lite2")
    assert [s[0] for s in lite2] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.2 × [2, 2, 3, 3, 4]) inside, ends fixed
    assert [s[5] for s in lite2] == [16, 24, 48, 88, 120, 208, 352]
    assert [s[4] for s in lite2] == [32, 16, 24, 48, 88, 120, 208]  # stem stays 32
    assert [s[1:4] for s in lite2] == [s[1:4] for s in LITE0_STAGES]  # kernels, strides, expansions unchanged
    assert round_filters(112, 1.1) == 120 and round_filters(40, 1.1) == 48 and round_filters(16, 1.1) == 16
    net = EfficientNetLite(arch="lite2")
    assert len(net._blocks) == 21 and net.tap_blocks == (0, 3, 6, 14)
    assert net.pyramid_channels == (16, 24, 48, 120, 1280)
    assert net._dropout.p == 0.3 and EfficientNetLite()._dropout.p == 0.2
    assert sum(p.numel() for p in net.parameters()) == 6_092_072  # the shipped state dict's parameter count
    with torch.no_grad():
        feats = net.eval().pyramid(torch.rand(1, 3, 96, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 48, 48), (24, 24, 24), (48, 12, 12), (120, 6, 6),
                                                  (1280, 3, 3)]
    with pytest.raises(ValueError, match="arch 'lite1' is not known; expected one of lite0, lite2"):
        EfficientNetLite(arch="lite1")


def test_checkpoint_arch_is_found_from_its_tensors_and_checked(tmp_path):
    lite2_imagenet = imagenet_state_dict("lite2")
    assert trunk_arch(lite2_imagenet) == "lite2" and trunk_arch(imagenet_state_dict("lite0")) == "lite0"
    assert trunk_arch({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}) is None
    with pytest.raises(ValueError, match="does not match EfficientNet-Lite0.*holds an EfficientNet-Lite2 trunk "
                                         r"\(classifier.arch=lite2\)"):
        load_trunk(EfficientNetLite(num_classes=1), lite2_imagenet)

    g = EfficientNetLite(num_classes=1, arch="lite2")
    load_trunk(g, lite2_imagenet)
    path = tmp_path / "classifier.pt"
    torch.save(g.state_dict(), path)
    loaded = load_classifier(path, 1)  # what pyfunc and predict call: no config at hand
    assert loaded.arch == "lite2"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in g.state_dict().items())
    assert load_classifier(path, 1, "lite2").arch == "lite2"
    with pytest.raises(ValueError, match=f"classifier checkpoint {path} holds an EfficientNet-Lite2 but "
                                         "classifier.arch is lite0: set classifier.arch=lite2"):
        load_classifier(path, 1, "lite0")
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an EfficientNet-Lite network of any known arch"):
        load_classifier(tmp_path / "other.pt", 1)


def test_segmenter_decoders_take_lite2_pyramid():
    cfg = load_config("configs/toy_birds.yaml", ["data.image_size=64"])
    g = EfficientNetLite(num_classes=1, arch="lite2")
    model = Segmenter(cfg.model, 1, trunk=g)
    assert model.encoder.out_channels == [3, 16, 24, 48, 120, 1280]
    # the first decoder stage concatenates the upsampled bottleneck with the 120-channel stride-16 skip
    assert model.mask_decoder.stages[0][0].in_channels == cfg.model.bottleneck + 120
    assert model.mask_decoder.stages[-1][0].in_channels == cfg.model.decoder_widths[-2] + 3
    out = model(torch.rand(2, 3, 64, 64))
    assert out["mask_logits"].shape == (2, 2, 64, 64) and out["imagelets"].shape == (2, 2, 3, 64, 64)
    # encoder_init=imagenet: g's arch before stage 1, with that arch's shipped weights
    pre = Segmenter(load_config("configs/toy_birds.yaml", ["model.encoder_init=imagenet"]).model, 1, trunk=g)
    assert pre.encoder.trunk.arch == "lite2"
    imagenet = imagenet_state_dict("lite2")
    assert torch.equal(pre.encoder.trunk._blocks[20]._project_conv.weight, imagenet["_blocks.20._project_conv.weight"])


def wsssrec(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env={**os.environ, **THREADS},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"wsssrec {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_lite2_pipeline_trains_registers_and_predicts(toy_dataset, tmp_path):
    """Stage 1 and stage 2 with classifier.arch=lite2 at 64 px for a few steps, then `wsssrec predict` on the
    registered segmenter (which carries its gate's g): the same Lite2 networks come back, and the masks equal
    those of the segmenter.pt loaded here."""
    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest
    from trainer.predict import load_predictor

    db = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["-c", str(REPO / "configs/toy_birds.yaml"), f"data.url={toy_dataset}", "data.image_size=64",
              f"train.out_dir={tmp_path}/runs", "train.run_name=lite2", f"mlflow.tracking_uri={db}",
              f"mlflow.artifact_location={tmp_path}/mlartifacts", "eval.grid_images=2", "train.threads=1",
              f"train.deepspeed={REPO}/configs/deepspeed/zero0.json", "classifier.arch=lite2",
              "eval.gate_threshold=0.5"]  # the gate on (off by default since the CRF): the model carries g
    wsssrec("train-classifier", *common, "classifier.epochs=1", cwd=tmp_path)
    run = tmp_path / "runs" / "lite2"
    g_state = torch.load(run / "classifier.pt", weights_only=True)
    assert trunk_arch(g_state) == "lite2" and g_state["_fc.weight"].shape == (1, 1280)
    wsssrec("train", *common, "train.steps=3", "train.checkpoint_every=0", cwd=tmp_path)

    model, cfg, classes = load_segmenter(run / "segmenter.pt")
    assert cfg.classifier.arch == "lite2" and classes == ["bird"]
    assert model.encoder.trunk.arch == "lite2" and model.encoder.out_channels == [3, 16, 24, 48, 120, 1280]
    assert torch.equal(model.encoder.trunk._blocks[20]._project_conv.weight, g_state["_blocks.20._project_conv.weight"])

    images = tmp_path / "images"
    images.mkdir()
    shard = read_manifest(toy_dataset).splits["test_conflict"].shards[0]
    for i, raw in zip(range(3), raw_samples(shard)):
        (images / f"img{i}.jpg").write_bytes(raw["jpg"])
    wsssrec("predict", "--model", "models:/wsssrec-segmenter/1", "--images", str(images), "--out",
            str(tmp_path / "masks"), "--tracking-uri", db, cwd=tmp_path)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI's conv arithmetic, so masks compare exactly
    try:
        predictor = load_predictor(str(run / "segmenter.pt"))
        assert predictor.g is not None and predictor.g.net.arch == "lite2"  # the gate's g
        pixels = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.jpg"))]
        expected = [row["mask"] for row in predictor.segment(pixels)]
    finally:
        torch.set_num_threads(threads)
    written = [np.asarray(Image.open(tmp_path / "masks" / f"img{i}.png")) for i in range(3)]
    for want, got in zip(expected, written):
        assert got.shape == want.shape == (64, 64)
        np.testing.assert_array_equal(got, want)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "mlartifacts").rglob("wsssrec.json")]
    assert {m["kind"] for m in metas} == {"classifier", "segmenter"}
    assert all(m["config"]["classifier"]["arch"] == "lite2" for m in metas)


@pytest.mark.slow
def test_arch_benchmark_runs_and_counts_what_the_docs_cite(tmp_path):
    """bench/g_arch.py (docs/method.md's numbers) in its dry mode: the parameter counts and the FLOPs of g at
    96 px as docs/method.md cites them, one timed stage-1 step of each arch."""
    out = tmp_path / "numbers.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "g_arch.py"), "--dry", "--json", str(out),
                           "--stages", "stage1", "--classifier-batch", "4"], cwd=tmp_path,
                          env={**os.environ, **THREADS}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    g = result["g"]
    assert result["image_size"] == 96
    assert g["lite0"]["parameters_imagenet"] == 4_652_008 and g["lite2"]["parameters_imagenet"] == 6_092_072
    assert g["lite0"]["parameters_g"] == 3_372_289 and g["lite2"]["parameters_g"] == 4_812_353
    assert round(g["lite0"]["gflops_forward"], 3) == 0.141 and round(g["lite2"]["gflops_forward"], 3) == 0.211
    stage1 = result["stages"]["stage1"]
    assert stage1["batch"] == 4 and all(s > 0 for s in stage1["s_per_step"].values())
