"""`wsssrec report RUNS_DIR`: one table over many evaluated runs (`<name>-seed<S>/eval/results.json`), seeds
grouped as mean ± std, with the CAM and trivial rows of the same splits, and the training time of each run."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

SEED_RE = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")
COLUMNS = [("bird IoU", "iou_1"), ("mIoU", "miou"), ("neg FP", "negative_fp_area")]


def collect(runs_dir: Path) -> dict[str, dict[int, dict]]:
    """{setting name: {seed: {"results": results.json, "seconds": training seconds}}}."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for results_path in sorted(Path(runs_dir).glob("*/eval/results.json")):
        run = results_path.parent.parent
        match = SEED_RE.match(run.name)
        name, seed = (match["name"], int(match["seed"])) if match else (run.name, 0)
        history = run / "train_history.json"
        seconds = json.loads(history.read_text()).get("seconds") if history.is_file() else None
        runs[name][seed] = {"results": json.loads(results_path.read_text()), "seconds": seconds}
    return runs


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _metric(run: dict, split: str, method: str, key: str) -> float | None:
    split_res = run["results"]["splits"].get(split)
    if split_res is None or method not in split_res["methods"]:
        return None
    return split_res["methods"][method].get(key)


def table(runs: dict[str, dict[int, dict]], splits=("test_aligned", "test_conflict"),
          order: list[str] | None = None, baselines_from: str | None = None) -> str:
    """Markdown: one row per setting (method row), plus CAM (and CAM through the preserve gate, where those
    runs used it) and trivial rows taken from `baselines_from` (default: the first setting), all as mean ± std
    over the seeds present."""
    names = [n for n in (order or sorted(runs)) if n in runs]
    head = ["setting", "seeds", "train s"]
    for split in splits:
        short = split.replace("test_", "")
        head += [f"{label} {short}" for label, _ in COLUMNS]
    head.append("mIoU gap (aligned − conflict)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, seeds: dict[int, dict], method: str, seconds: bool = True) -> str:
        cells = [label, ",".join(str(s) for s in sorted(seeds))]
        secs = [r["seconds"] for r in seeds.values() if r["seconds"]]
        cells.append(f"{np.mean(secs):.0f}" if secs and seconds else "–")
        for split in splits:
            for _, key in COLUMNS:
                cells.append(_fmt([_metric(r, split, method, key) for r in seeds.values()]))
        gaps = [(_metric(r, splits[0], method, "miou") or np.nan) - (_metric(r, splits[-1], method, "miou") or np.nan)
                for r in seeds.values()]
        cells.append(_fmt(gaps))
        return "| " + " | ".join(cells) + " |"

    base = runs[baselines_from] if baselines_from in runs else (runs[names[0]] if names else {})
    for method in ("all-background", "all-foreground", "CAM", "CAM-gated"):  # CAM-gated: runs with the gate on
        if any(_metric(r, splits[-1], method, "miou") is not None for r in base.values()):
            lines.append(row(method, base, method, seconds=False))
    for name in names:
        lines.append(row(name, runs[name], "method"))
    return "\n".join(lines) + "\n"


def g_table(runs: dict[str, dict[int, dict]], splits=("val", "test_aligned", "test_conflict")) -> str:
    seeds: dict[int, dict] = {}
    for per_seed in runs.values():
        for seed, run in per_seed.items():
            seeds.setdefault(seed, run)
    lines = ["| g of seed | " + " | ".join(f"accuracy {s}" for s in splits) + " |", "|---|" + "---|" * len(splits)]
    for seed, run in sorted(seeds.items()):
        cells = [f"{run['results']['splits'][s]['g']['accuracy']:.3f}" if s in run["results"]["splits"] else "–"
                 for s in splits]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="wsssrec report", description=__doc__)
    parser.add_argument("runs_dir")
    parser.add_argument("--order", nargs="*", help="setting names in table order")
    parser.add_argument("--baselines-from", help="setting whose runs give the CAM and trivial rows")
    args = parser.parse_args(argv)
    runs = collect(Path(args.runs_dir))
    if not runs:
        raise SystemExit(f"no */eval/results.json under {args.runs_dir}")
    print(table(runs, order=args.order, baselines_from=args.baselines_from))
    print(g_table(runs))
