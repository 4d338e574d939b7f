"""Speed of the training steps, variant against variant, measured side by side in one run: stage-2 and stage-1
images/s of the product's own step functions (trainer.train.train_step, trainer.classifier.classifier_step,
through a real DeepSpeed engine at world size 1) for each speed switch on its own (trainer/speedups.py's exact
speed-ups, trainer/accel.py's channels-last / compile / bf16), the FLOPs of one step of each variant
(torch.utils.flop_counter) and the FLOP utilisation against a 2048² fp32 matmul on the same threads, and whether
each variant trains the same: the losses of a short run from the same weights and data against the first
variant's.

    OMP_NUM_THREADS=1 python bench/step.py [--threads 1 --rounds 5 --steps 3 --variants float_batch default ...]

Variants are config overrides (so the measured code is the product's): float_batch (the step as the Speed
issue measured it: a contiguous float32 batch, no exact speed-up, channels-last/compile/bf16 off), no_speedups
(the loader's uint8 batch since 2026-12-02, a B×3×H×W view of the collated H×W×3 arrays made float by the step;
no exact speed-up), one variant per exact speed-up alone (blur_matmul, aux_masks_only, aux_batched,
frozen_no_grad, bn_folded, native_pad, ...), default (the default config: all of them), without_<speed-up> (the
default with that one off: its gain on top of the others), channels_last (default + the
weights' layout), bf16 (channels-last + DeepSpeed's bf16 autocast of the engine's forward; measured on CUDA only),
compile (default + channels-last + torch.compile). "× no_speedups" is a speed-up's own gain. Rounds interleave
the variants, one timed block of each in turn, so a load change on a shared machine hits every variant alike;
ratios are per round, the median is reported. `--dry` runs every measurement for one step (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from trainer.speedups import SPEEDUPS  # noqa: E402

OFF = ["train.channels_last=false", "train.compile=false", "train.bf16=false"]
NONE = ["train.speedups=[]"]
VARIANTS = {
    # the step as the Speed issue measured it: a contiguous float32 batch, no exact speed-up
    "float_batch": OFF + NONE,
    "no_speedups": OFF + NONE,  # the loader's uint8 batch (2026-12-02), no exact speed-up
    # each exact speed-up of trainer/speedups.py on its own, over no_speedups
    **{name: OFF + [f"train.speedups=[{name}]"] for name in SPEEDUPS},
    "default": OFF,  # the default config: every exact speed-up on
    # the default with one exact speed-up off: what it adds on top of all the others
    **{f"without_{name}": OFF + [f"train.speedups=[{','.join(n for n in SPEEDUPS if n != name)}]"]
       for name in SPEEDUPS},
    "channels_last": ["train.channels_last=true", "train.compile=false", "train.bf16=false"],
    "bf16": ["train.channels_last=true", "train.compile=false", "train.bf16=true"],
    "compile": ["train.channels_last=true", "train.compile=true", "train.bf16=false"],
}

# the batch each variant gets: "loader" (uint8, channels-last strides: today's loader) or "float" (contiguous
# float32 of the same values: the loader before its uint8 batches)
LAYOUTS = {"float_batch": "float"}
DEFAULT_VARIANTS = ["float_batch", "no_speedups", *SPEEDUPS, "default", "compile"]


def bf16_supported(device: torch.device) -> bool:
    """bf16 is measured on CUDA only: on this project's CPUs (AVX-512 BF16, no AMX) one stage-2 step at 64 px,
    batch 2, with autocast over the whole step took over 5 minutes against 0.4 s in fp32 (kernels without a
    fast bf16 path; docs/benchmarks.md)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def matmul_gflops(device: torch.device, n: int = 2048, repeat: int = 3) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(runners: dict, rounds: int, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every runner, `rounds` times in turn (so a load change on a shared machine hits
    every runner alike): name -> one mean over `steps` steps per round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                runner.step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def _config(config: str, overrides: list[str]):
    from trainer.config import load_config

    return load_config(os.path.join(ROOT, config), ["mlflow.enabled=false", *overrides])


def _batch(cfg, batch_size: int, device: torch.device, seed: int = 0, layout: str = "loader") -> dict:
    """A fixed batch: half positives (a bright square on noise) and half negatives, as the loader gives it
    (`layout` "loader": uint8 in the strides of the collated H×W×3 arrays) or as it gave it before 2026-12-02
    ("float": contiguous float32, the same values)."""
    generator = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    images = torch.rand(batch_size, 3, size, size, generator=generator)
    labels = (torch.arange(batch_size) % 2).float()[:, None]
    images[::2, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.9
    hwc = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # the collated arrays
    images = hwc.permute(0, 3, 1, 2)  # what the loader hands the step (data_shards.loader)
    if layout == "float":
        images = images.float().div(255.0).contiguous()
    return {"image": images.to(device), "labels": labels.to(device), "key": [f"k{i}" for i in range(batch_size)]}


class Stage2:
    """The stage-2 step of one variant: a fresh segmenter (same weights for every variant) around a frozen g."""

    def __init__(self, cfg, device: torch.device, batch_size: int, layout: str = "loader"):
        from trainer.accel import prepare_modules
        from trainer.engine import deepspeed_config, make_engine
        from trainer.models import FrozenClassifier
        from trainer.weights import build_segmenter

        from trainer.classifier import build_classifier

        self.cfg, self.batch_size = cfg, batch_size
        torch.manual_seed(0)
        g_net = build_classifier(cfg.classifier, 1).to(device)  # ImageNet trunk, fresh head: the cost is the same
        self.g = FrozenClassifier(g_net)
        model = build_segmenter(cfg, 1, g_net).to(device)
        self.engine, _ = make_engine(model, cfg.train.lr, deepspeed_config(cfg, batch_size))
        prepare_modules(cfg, model, self.g)
        self.batch = _batch(cfg, batch_size, device, layout=layout)
        self.engine.train()

    def step(self, step: int = 300) -> float:
        from trainer import speedups
        from trainer.train import train_step

        speedups.configure(self.cfg)  # process-wide: each variant's own
        return train_step(self.engine, self.g, self.cfg, iter([self.batch]), 1, step)["loss"]


class Stage1:
    """The stage-1 step of one variant: g fine-tuned from the ImageNet trunk."""

    def __init__(self, cfg, device: torch.device, batch_size: int, layout: str = "loader"):
        from trainer.accel import prepare_modules
        from trainer.classifier import build_classifier
        from trainer.engine import deepspeed_config, make_engine

        self.cfg, self.batch_size = cfg, batch_size
        torch.manual_seed(0)
        net = build_classifier(cfg.classifier, 1).to(device)
        self.engine, _ = make_engine(net, cfg.classifier.lr, deepspeed_config(cfg, batch_size))
        prepare_modules(cfg, net)
        self.batch = _batch(cfg, batch_size, device, layout=layout)
        self.engine.train()

    def step(self, step: int = 0) -> float:
        from trainer import speedups
        from trainer.classifier import classifier_step

        speedups.configure(self.cfg)
        return classifier_step(self.engine, self.batch, self.cfg, (0, step, 0, 0))


def step_flops(runner) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        runner.step()
    return counter.get_total_flops()


def measure(stage: str, args, device: torch.device, variants: list[str]) -> dict:
    """img/s per variant (interleaved rounds), FLOPs per step, utilisation, and the loss curve check."""
    kind = Stage2 if stage == "stage2" else Stage1
    batch = args.batch if stage == "stage2" else args.classifier_batch
    runners = {v: kind(_config(args.config, VARIANTS[v] + args.override), device, batch, LAYOUTS.get(v, "loader"))
               for v in variants}
    losses = {}
    for v, runner in runners.items():  # from the same weights, the same random draws (g's dropout in stage 1)
        torch.manual_seed(1234)
        losses[v] = [runner.step(step) for step in range(args.check_steps)]
    flops = {v: step_flops(runner) for v, runner in runners.items()}  # the work each variant does
    for runner in runners.values():  # warm-up (compile happens here)
        runner.step()
    times = interleaved_times(runners, args.rounds, args.steps, device)
    base = variants[0]
    out = {"flops_per_step": flops[base], "batch": batch, "variants": {}}
    for v in variants:
        seconds = statistics.median(times[v])
        ratio = statistics.median(b / t for b, t in zip(times[base], times[v]))
        drift = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[v], losses[base]))
        out["variants"][v] = {"s_per_step": seconds, "img_s": batch / seconds, "speedup": ratio,
                              "flops_per_step": flops[v], "gflop_s": flops[v] / seconds / 1e9,
                              "max_rel_loss_diff": drift}
        if "no_speedups" in times:  # an exact speed-up's own gain: over the same step without any
            out["variants"][v]["over_no_speedups"] = statistics.median(
                b / t for b, t in zip(times["no_speedups"], times[v]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_birds.yaml")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every variant")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--stages", nargs="*", default=["stage2", "stage1"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    parser.add_argument("--check-steps", type=int, default=5, help="steps whose losses are compared")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classifier-batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--dry", action="store_true", help="one step of everything (a test that the script runs)")
    args = parser.parse_args(argv)
    if args.dry:
        args.rounds, args.steps, args.check_steps = 1, 1, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from trainer.distributed import init_distributed

    init_distributed()
    variants = [v for v in args.variants if v != "bf16" or bf16_supported(device)]
    if len(variants) < len(args.variants):
        print("bf16 skipped: measured on CUDA only (see bf16_supported)")
    peak = matmul_gflops(device)
    result = {"device": str(device), "threads": args.threads, "matmul_gflop_s": peak, "stages": {}}
    print(f"{device}, {args.threads} thread(s): 2048² fp32 matmul {peak:.1f} GFLOP/s")
    for stage in args.stages:
        res = measure(stage, args, device, variants)
        result["stages"][stage] = res
        print(f"\n{stage}: {res['flops_per_step'] / 1e9:.1f} GFLOP per step ({variants[0]}, fp32 count), "
              f"batch {res['batch']}")
        print(f"| variant | s/step | img/s | × {variants[0]} | × no_speedups | GFLOP/step | GFLOP/s | of matmul | "
              "max rel. loss diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        for v, r in res["variants"].items():
            own = f"{r['over_no_speedups']:.2f}" if "over_no_speedups" in r else "–"
            print(f"| {v} | {r['s_per_step']:.3f} | {r['img_s']:.1f} | {r['speedup']:.2f} | {own} | "
                  f"{r['flops_per_step'] / 1e9:.1f} | {r['gflop_s']:.1f} | {r['gflop_s'] / peak:.2f} | "
                  f"{r['max_rel_loss_diff']:.1e} |")
    save_json(args.json, result)
    return result


def save_json(path: str | None, result: dict) -> None:
    """The numbers as JSON too, when a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
