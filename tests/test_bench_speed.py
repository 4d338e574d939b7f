"""The speed benchmarks run (their numbers live in docs/benchmarks.md, not in tests): bench/step.py and
bench/gpu.py in their dry mode, one step of every measurement on this machine's CPU; and the speed switches
of trainer/accel.py train like the plain step (same losses to fp tolerance)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.speedups import SPEEDUPS

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "numbers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--dry", "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_step_benchmark_measures_every_variant_and_checks_equal_losses(tmp_path):
    variants = ["float_batch", "no_speedups", *SPEEDUPS, "default", "channels_last"]
    result = _run("step.py", tmp_path, "--variants", *variants, "--override", "data.image_size=64")
    assert result["matmul_gflop_s"] > 0
    for stage in ("stage2", "stage1"):
        numbers = result["stages"][stage]
        assert numbers["flops_per_step"] > 1e8
        assert list(numbers["variants"]) == variants
        assert numbers["variants"]["float_batch"]["speedup"] == pytest.approx(1.0)  # the first is the base
        assert numbers["variants"]["no_speedups"]["over_no_speedups"] == pytest.approx(1.0)
        for variant in numbers["variants"].values():
            assert variant["img_s"] > 0 and variant["gflop_s"] > 0 and variant["flops_per_step"] > 1e8
        # the batch's layout, channels-last memory and the exact speed-ups are not another computation: the same
        # losses up to float rounding (which Adam's first, sign-like steps amplify a little)
        for name in variants[1:]:
            assert numbers["variants"][name]["max_rel_loss_diff"] < 1e-2, (stage, name)
    # the mask network's image-lets are no longer computed in the aux passes: less work, not only faster work
    stage2 = result["stages"]["stage2"]["variants"]
    assert stage2["aux_masks_only"]["flops_per_step"] < stage2["no_speedups"]["flops_per_step"]


@pytest.mark.slow
def test_gpu_script_runs_every_measurement_on_cpu(tmp_path):
    result = _run("gpu.py", tmp_path)
    assert {"96px/fp32", "224px/fp32"} <= set(result["stage2"])
    assert all(r["img_s"] > 0 for r in result["stage2"].values())
    assert set(result["loader"]) == {"0", "1"} and all(v > 0 for v in result["loader"].values())
    assert result["ddp_vs_zero2"]["ddp"] > 0 and result["ddp_vs_zero2"]["zero2_over_ddp"] > 0


def test_prepare_images_makes_uint8_batches_float_in_the_configured_layout():
    """The loader's uint8 batch becomes the float batch the old loader gave (x / 255, its strides kept); with
    train.channels_last the result is channels-last, values unchanged; a float batch passes through as it is."""
    import torch

    from trainer.accel import prepare_images
    from trainer.config import load_config

    hwc = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    batch = hwc.permute(0, 3, 1, 2)  # B x 3 x H x W view of the collated H x W x 3 arrays, as the loader gives it
    cfg = load_config(None)
    plain = prepare_images(batch, cfg, "cpu")
    assert plain.dtype == torch.float32 and plain.stride() == batch.stride()
    assert torch.equal(plain, batch.float() / 255.0) and float(plain.max()) <= 1.0
    floats = torch.rand(2, 3, 5, 6)
    assert prepare_images(floats, cfg) is floats
    cfg.train.channels_last = True
    last = prepare_images(torch.rand(2, 3, 5, 6), cfg)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(prepare_images(batch.contiguous(), cfg), plain)


def test_step_benchmark_batch_is_the_loaders():
    """bench/step.py's batch is what the loader hands the step: uint8 in the strides of the collated H×W×3
    arrays (channels-last); the float_batch variant's has the same values, contiguous float32 (the old loader)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import step as step_bench
    from trainer.config import load_config

    cfg = load_config(None, ["data.image_size=8"])
    loader = step_bench._batch(cfg, 4, torch.device("cpu"))["image"]
    old = step_bench._batch(cfg, 4, torch.device("cpu"), layout="float")["image"]
    assert loader.dtype == torch.uint8 and loader.is_contiguous(memory_format=torch.channels_last)
    assert old.dtype == torch.float32 and old.is_contiguous()
    assert torch.equal(old, loader.float() / 255.0)
