"""The GPU numbers, in one prepared script for a lent CUDA machine (about 5 minutes on one H100/H200-class GPU):

1. stage-2 images/s and peak GPU memory of the product's training step (bench/step.py's runners: a real
   DeepSpeed engine at world size 1) at 96 px (configs/toy_birds.yaml) and at the reference size
   (configs/reference_224.yaml, the ~30 M-parameter 224² model), in fp32 and in bf16 autocast;
2. the loader's images/s with 4, 8 and 16 DataLoader workers on synthetic JPEG shards at the reference size,
   against the step's consumption (how many steps the loader can feed);
3. DeepSpeed ZeRO-2 against plain DistributedDataParallel at world size 1, same model and batches
   (bench/scaling.py's variants), interleaved rounds.

    python bench/gpu.py [--json gpu.json]          # on the GPU machine
    python bench/gpu.py --dry                      # every measurement for one step, on CPU (the test suite)

Prints absolute numbers and ratios; nothing needs a network.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import scaling  # noqa: E402  (bench/scaling.py)
import step as step_bench  # noqa: E402  (bench/step.py)

SIZES = {"96px": ("configs/toy_birds.yaml", []), "224px": ("configs/reference_224.yaml", [])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(runner, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps (after one warm-up step)."""
    runner.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def stage2_rates(args, device: torch.device) -> dict:
    """img/s and peak memory for each size × precision."""
    out = {}
    for size, (config, overrides) in SIZES.items():
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not step_bench.bf16_supported(device):
                continue
            cfg = step_bench._config(config, [*step_bench.VARIANTS["bf16" if precision == "bf16" else "channels_last"],
                                              *overrides, *args.override])
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            runner = step_bench.Stage2(cfg, device, args.batch)
            seconds = timed_steps(runner, args.steps, device)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            out[f"{size}/{precision}"] = {"img_s": args.batch / seconds, "s_per_step": seconds,
                                          "peak_gib": peak / 2 ** 30, "batch": args.batch}
            del runner
    return out


def synthetic_shards(folder: str, count: int, size: int) -> str:
    """`count` JPEGs of smooth random colour fields at `size`² in shards with a manifest; returns its URL."""
    from data_shards.manifest import write_manifest
    from data_shards.writer import ShardWriter, encode_jpeg, make_sample

    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, "train", maxcount=256)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
        writer.write(make_sample(f"s{i:06d}", encode_jpeg(image), {"labels": [i % 2]}))
    return write_manifest(folder, ["thing"], {"train": writer.close()})


def loader_rates(args, size: int) -> dict[int, float]:
    from data_shards.loader import LoaderOptions, make_loader

    with tempfile.TemporaryDirectory(prefix="wsssrec-gpu-bench-") as folder:
        url = synthetic_shards(folder, args.loader_images, size)
        rates = {}
        for workers in args.workers:
            loader = make_loader(url, "train", LoaderOptions(image_size=size, batch_size=args.batch, train=True,
                                                             seed=0, epoch=0, num_workers=workers))
            start = time.perf_counter()
            images = sum(len(batch["key"]) for batch in loader)
            rates[workers] = images / (time.perf_counter() - start)
    return rates


def ddp_vs_zero2(args, device: torch.device) -> dict:
    """Interleaved steps of plain DDP and DeepSpeed ZeRO-2 at world size 1 (96 px); img/s and the ratio."""
    cfg = scaling._config(SIZES["96px"][0], [f"data.batch_size={args.batch}", *args.override])
    g_net, g = scaling._frozen_g()
    g.to(device)
    batches = scaling._batches(cfg, 0, max(args.steps, 1), device)
    variants = {mode: scaling._variant(mode, cfg, g_net, device) for mode in ("ddp", "zero2")}
    seconds = dict.fromkeys(variants, 0.0)
    for mode, (forward, backward_step, _) in variants.items():  # warm-up
        scaling._train_step(forward, backward_step, g, cfg, batches[0])
    ratios = []
    for _ in range(args.rounds):
        round_s = {}
        for mode, (forward, backward_step, _) in variants.items():
            _sync(device)
            start = time.perf_counter()
            for batch in batches:
                scaling._train_step(forward, backward_step, g, cfg, batch)
            _sync(device)
            round_s[mode] = time.perf_counter() - start
            seconds[mode] += round_s[mode]
        ratios.append(round_s["ddp"] / round_s["zero2"])
    images = args.batch * len(batches) * args.rounds
    return {mode: images / s for mode, s in seconds.items()} | {"zero2_over_ddp": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--loader-images", type=int, default=4096)
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--json")
    parser.add_argument("--dry", action="store_true", help="one step of everything, on whatever device there is")
    args = parser.parse_args(argv)
    if args.dry:
        args.steps, args.rounds, args.batch, args.workers, args.loader_images = 1, 1, 2, [0, 1], 16
        args.override = [*args.override, "data.image_size=64"]
        SIZES["224px"] = ("configs/reference_224.yaml", ["data.image_size=64", "model.width=8"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from trainer.distributed import init_distributed

    init_distributed()
    result: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    result["stage2"] = stage2_rates(args, device)
    for key, r in result["stage2"].items():
        print(f"stage 2 {key}: {r['img_s']:.1f} img/s (batch {r['batch']}), peak {r['peak_gib']:.2f} GiB")
    loader_size = 64 if args.dry else 224
    result["loader"] = loader_rates(args, loader_size)
    consumption = result["stage2"].get("224px/bf16", result["stage2"]["224px/fp32"])["img_s"]
    for workers, rate in result["loader"].items():
        print(f"loader at {loader_size} px, {workers} workers: {rate:.0f} img/s = {rate / consumption:.1f}× the "
              f"224-px step's consumption ({consumption:.0f} img/s)")
    result["ddp_vs_zero2"] = ddp_vs_zero2(args, device)
    d = result["ddp_vs_zero2"]
    print(f"world 1, 96 px: DDP {d['ddp']:.1f} img/s, ZeRO-2 {d['zero2']:.1f} img/s, ZeRO-2/DDP {d['zero2_over_ddp']:.2f}")
    step_bench.save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
