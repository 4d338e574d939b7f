"""The cost of g's network, Lite0 against Lite2 (`classifier.arch`), measured side by side in one run: parameters,
the FLOPs of one forward of g (torch.utils.flop_counter) at the image size, and the seconds of one stage-1 step
(trainer.classifier.classifier_step) and one stage-2 step (trainer.train.train_step, the segmenter on g's trunk
around the frozen g) through a real DeepSpeed engine, built by bench/step.py's runners from the same config.
Rounds interleave the archs, one timed block of each in turn, so a load change on a shared machine hits both
alike; the Lite2 / Lite0 time ratio is per round, the median is reported.

    OMP_NUM_THREADS=1 python bench/g_arch.py [--threads 1 --rounds 3 --steps 2 --stages stage1 stage2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from step import Stage1, Stage2, _config, interleaved_times, save_json  # noqa: E402  (bench/step.py)

ARCHS = ("lite0", "lite2")


def g_cost(cfg, arch: str, device: torch.device) -> dict:
    """Parameters (with the ImageNet head and with g's 1-class head) and the FLOPs of one forward of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.effnet import EfficientNetLite

    g = EfficientNetLite(num_classes=1, arch=arch).to(device).eval()
    size = cfg.data.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        g(torch.rand(1, 3, size, size, device=device))
    return {"parameters_imagenet": sum(p.numel() for p in EfficientNetLite(arch=arch).parameters()),
            "parameters_g": sum(p.numel() for p in g.parameters()),
            "gflops_forward": counter.get_total_flops() / 1e9}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_birds.yaml")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for both archs")
    parser.add_argument("--stages", nargs="*", default=["stage1", "stage2"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and arch")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classifier-batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--dry", action="store_true", help="one step of everything (a test that the script runs)")
    args = parser.parse_args(argv)
    if args.dry:
        args.rounds, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from trainer.distributed import init_distributed

    init_distributed()
    configs = {arch: _config(args.config, [f"classifier.arch={arch}", *args.override]) for arch in ARCHS}
    result = {"device": str(device), "threads": args.threads, "image_size": configs["lite0"].data.image_size,
              "g": {arch: g_cost(cfg, arch, device) for arch, cfg in configs.items()}, "stages": {}}
    print(f"{device}, {args.threads} thread(s), {result['image_size']} px")
    print("| arch | parameters (ImageNet head) | parameters (g, 1 class) | GFLOP per forward, 1 image |")
    print("|---|---|---|---|")
    for arch, c in result["g"].items():
        print(f"| {arch} | {c['parameters_imagenet']:,} | {c['parameters_g']:,} | {c['gflops_forward']:.3f} |")
    for stage in args.stages:
        kind, batch = (Stage1, args.classifier_batch) if stage == "stage1" else (Stage2, args.batch)
        runners = {arch: kind(cfg, device, batch) for arch, cfg in configs.items()}
        for runner in runners.values():  # warm-up
            runner.step()
        times = interleaved_times(runners, args.rounds, args.steps, device)
        ratio = statistics.median(b / a for a, b in zip(times["lite0"], times["lite2"]))
        result["stages"][stage] = {"batch": batch, "lite2_over_lite0": ratio,
                                   "s_per_step": {arch: statistics.median(t) for arch, t in times.items()}}
        seconds = result["stages"][stage]["s_per_step"]
        print(f"{stage} (batch {batch}): lite0 {seconds['lite0']:.3f} s/step, lite2 {seconds['lite2']:.3f} s/step, "
              f"lite2 / lite0 {ratio:.2f} (median of {args.rounds} rounds of {args.steps} steps)")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
