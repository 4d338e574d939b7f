"""Wall time of an ASHA sweep against the same trials all run to the end, side by side in one run: the same
search space, seed and trial settings (so the same λ_m, λ_c, K in the same order), one trial at a time, one
shared g trained before either sweep. Prints the tuning-loop time of each, their ratio, and each sweep's best
trial (goal: ASHA ≤ 0.5× the full time with the same best).

    python bench/sweep.py [--samples 8] [--rungs 8] [--steps 160] [--reduction-factor 2] [--size 64] [--out DIR]
    python bench/sweep.py --experiment toy-birds --g runs/ref/g-seed0/classifier.pt --together [--out DIR]

`tiny` (the default) builds a small toy set and a small model; `toy-birds` runs configs/sweep_toy_birds.yaml as
it is (data/toy-birds from `make demo`, its rungs and steps) against a g you give. `--together` runs the two
sweeps at the same time, each one trial at a time on one thread, so both see the same machine load while both
run (the full sweep then finishes alone, which only flatters the full sweep); without it they run one after
the other.

ASHA saves whole rungs, while every trial pays a fixed start (a Ray Train worker group, DeepSpeed, data) either
way; the rungs must outweigh that start for ASHA to pay off, as they do in a real sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sweep(work: Path, name: str, scheduler: str, common: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "tune" / "sweep.py"), "--config", str(REPO / "configs/sweep_toy_birds.yaml"),
           *common, f"sweep.name={name}", f"sweep.scheduler={scheduler}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sweep {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((work / "runs" / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("tiny", "toy-birds"), default="tiny")
    parser.add_argument("--g", default="", help="classifier.pt of the shared g (toy-birds; tiny trains one)")
    parser.add_argument("--together", action="store_true", help="run the ASHA and the full sweep concurrently")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rungs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA's (sweep.reduction_factor)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="", help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="wsssrec-bench-sweep-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    store = [f"train.out_dir={work}/runs", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
             f"mlflow.artifact_location={work}/mlartifacts", f"sweep.storage_path={work}/ray",
             f"sweep.num_samples={args.samples}", f"sweep.reduction_factor={args.reduction_factor}",
             "sweep.max_concurrent=1", "sweep.ray_num_cpus=2", "sweep.register=false", "sweep.seed=0"]
    if args.experiment == "toy-birds":
        manifest = REPO / "data" / "toy-birds" / "manifest.json"
        if not manifest.is_file():
            raise SystemExit(f"{manifest} does not exist: build it first (make demo, or `python -m data_shards`)")
        g = Path(args.g).resolve()
        if not g.is_file():
            raise SystemExit(f"--g {args.g!r}: expected the classifier.pt of a trained g (wsssrec train-classifier)")
        common = [f"data.url={manifest}", *store, f"classifier.checkpoint={g}"]
        shape = "configs/sweep_toy_birds.yaml's trials"
    else:
        from data_shards.toy_birds import build_toy_birds

        manifest = work / "toy" / "manifest.json"
        if not manifest.is_file():
            build_toy_birds(str(work / "toy"), seed=0, size=args.size, rho=0.9, maxcount=64, progress=False,
                            counts={"train": 192, "val": 64, "test_aligned": 32, "test_conflict": 32})
        common = [f"data.url={manifest}", f"data.image_size={args.size}", "data.batch_size=8",
                  "data.eval_batch_size=32", "model.decoder_widths=[8,8,8,8,8]", "model.bottleneck=8",
                  "classifier.epochs=1", f"train.steps={args.steps}", "train.lr=0.01", f"sweep.rungs={args.rungs}",
                  *store]
        g = work / "runs" / "g-for-bench" / "g" / "classifier.pt"
        if not g.is_file():  # a 1-trial sweep trains the shared g once, outside the timed runs
            sweep(work, "g-for-bench", "none", [*common, "sweep.num_samples=1", "sweep.rungs=1"])
        common.append(f"classifier.checkpoint={g}")
        shape = f"{args.samples} trials × {args.rungs} rungs × {args.steps // args.rungs} steps, {args.size} px"
    if args.together:  # a fresh sqlite DB created by two processes at once crashes MLflow's migration
        import mlflow

        mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db").search_experiments()
    runs: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(scheduler: str, name: str) -> None:
        try:
            runs[scheduler] = sweep(work, f"{name}-{os.getpid()}", scheduler, common)
        except BaseException as exc:  # noqa: BLE001 - reported below, after both threads end
            errors.append(exc)

    jobs = [threading.Thread(target=one, args=a) for a in (("asha", "bench-asha"), ("none", "bench-full"))]
    for job in jobs:
        job.start()
        if not args.together:
            job.join()
    for job in jobs:
        job.join()
    if errors:
        raise SystemExit(str(errors[0]))
    runs = {k: runs[k] for k in ("asha", "none")}
    print(f"{shape}, one trial at a time, {'both sweeps together' if args.together else 'one sweep after the other'}"
          f" (work folder {work})")
    print("| sweep | tuning loop s | trials stopped early | rungs run | best trial (λ_m, λ_c, K) | best metric |")
    print("|---|---|---|---|---|---|")
    for scheduler, result in runs.items():
        best = result["best"]
        p = best["params"]
        stopped = sum(t["outcome"] == "stopped_early" for t in result["trials"])
        rungs = sum(int(t["metrics"].get("rung", 0)) for t in result["trials"])
        print(f"| {scheduler} | {result['seconds']:.0f} | {stopped} | {rungs} | {p['lambda_m']:.3g}, "
              f"{p['lambda_c']:.3g}, {p['K']} | {result['metric']} {best['metrics'][result['metric']]:.4f} |")
    asha, full = runs["asha"], runs["none"]
    same = asha["best"]["params"] == full["best"]["params"]
    print(f"ASHA / full wall time: {asha['seconds'] / full['seconds']:.2f}; same best trial: {same}")


if __name__ == "__main__":
    main()
