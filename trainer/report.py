"""`wsssrec report RUNS_DIR`: one table over many evaluated runs (`<name>-seed<S>/eval/results.json`), seeds
grouped as mean ± std, with the CAM and trivial rows of the same splits, and the training time of each run; the
paired split's table (each group's mIoU, the paired gap, the worst group); and with `--control NAME` (the same
pipeline trained without bias, ρ = 0.5) the bias tax of every other setting, scored on the same pairs:

- bias tax of a group = control mIoU − model mIoU on that group's images of the paired split (> 0: training on
  biased data costs that much); the worst group's tax likewise;
- bias effect on the gap = model paired gap − control paired gap (paired gap = water mIoU − land mIoU on the
  same pairs, trainer/paired.py): what the bias adds to the gap beyond background difficulty.

Differences are taken seed by seed over the seeds both settings have (mean ± std of the per-seed differences);
without a common seed, the difference of the means ± the root sum of squares of the two stds."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

SEED_RE = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")
COLUMNS = [("bird IoU", "iou_1"), ("boundary F", "boundary_f"), ("mIoU", "miou"), ("neg FP", "negative_fp_area")]
PAIRED_SPLIT = "test_paired"
BASELINES = ("all-background", "all-foreground", "CAM", "CAM-gated")  # CAM-gated: runs with the gate on


def collect(*runs_dirs: Path) -> dict[str, dict[int, dict]]:
    """{setting name: {seed: {"results": results.json, "seconds": training seconds}}} over one or more folders;
    the same run name in two folders is an error."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for runs_dir in runs_dirs:
        for results_path in sorted(Path(runs_dir).glob("*/eval/results.json")):
            run = results_path.parent.parent
            match = SEED_RE.match(run.name)
            name, seed = (match["name"], int(match["seed"])) if match else (run.name, 0)
            if seed in runs[name]:
                raise SystemExit(f"run {run.name} appears in two of the folders given ({runs_dir} is the second)")
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

    base = _baseline_setting(runs, order, baselines_from)
    for method in BASELINES:
        if any(_metric(r, splits[-1], method, "miou") is not None for r in base.values()):
            lines.append(row(method, base, method, seconds=False))
    for name in names:
        lines.append(row(name, runs[name], "method"))
    return "\n".join(lines) + "\n"


def _paired(run: dict, split: str, method: str) -> dict | None:
    """The paired summary (trainer/paired.py) of one run's `method` on `split`, or None."""
    paired = run["results"]["splits"].get(split, {}).get("paired", {}).get(method)
    return paired or None


def _paired_value(paired: dict | None, key: str) -> float | None:
    """A paired summary's number: a top-level key, or `group/metric` (e.g. water/miou); None when absent."""
    if paired is None:
        return None
    if "/" in key:
        group, metric = key.split("/", 1)
        return paired["groups"].get(group, {}).get(metric)
    return paired.get(key)


PAIRED_COLUMNS = [("water mIoU", "water/miou"), ("land mIoU", "land/miou"), ("paired gap", "paired_gap"),
                  ("per-pair gap", "pair_gap_mean"), ("worst group mIoU", "worst_group_miou"),
                  ("water boundary F", "water/boundary_f"), ("land boundary F", "land/boundary_f")]


def has_paired(runs: dict[str, dict[int, dict]], split: str = PAIRED_SPLIT) -> bool:
    return any(_paired(r, split, m) for seeds in runs.values() for r in seeds.values() for m in ("method", "CAM"))


def paired_table(runs: dict[str, dict[int, dict]], split: str = PAIRED_SPLIT, order: list[str] | None = None,
                 baselines_from: str | None = None) -> str:
    """Markdown: the paired split per setting (method row) and the baselines of `baselines_from`: each group's
    mIoU and boundary F, the paired gap (water − land, pooled), the mean per-pair gap, the worst group's mIoU
    (and which group it is, for most seeds), mean ± std over seeds."""
    names = [n for n in (order or sorted(runs)) if n in runs]
    head = ["setting", "seeds", *[label for label, _ in PAIRED_COLUMNS], "worst group"]
    lines = [f"Paired split {split} (the same layouts on water and on land):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, seeds: dict[int, dict], method: str) -> str:
        found = {seed: _paired(r, split, method) for seed, r in seeds.items()}
        found = {seed: p for seed, p in found.items() if p}
        cells = [label, ",".join(str(s) for s in sorted(found)) or "–"]
        cells += [_fmt([_paired_value(p, key) for p in found.values()]) for _, key in PAIRED_COLUMNS]
        worst = [p["worst_group"] for p in found.values()]
        cells.append(max(set(worst), key=worst.count) if worst else "–")
        return "| " + " | ".join(cells) + " |"

    base = _baseline_setting(runs, order, baselines_from)
    for method in BASELINES:
        if any(_paired(r, split, method) for r in base.values()):
            lines.append(row(method, base, method))
    for name in names:
        lines.append(row(name, runs[name], "method"))
    return "\n".join(lines) + "\n"


def difference(control: dict[int, float], model: dict[int, float]) -> tuple[float, float, list[int]] | None:
    """control − model: over the common seeds the mean and std of the per-seed differences; without one, the
    difference of the means and the root sum of squares of the two stds. Returns (mean, std, seeds used) or
    None when either side has no value."""
    control = {s: v for s, v in control.items() if v is not None and np.isfinite(v)}
    model = {s: v for s, v in model.items() if v is not None and np.isfinite(v)}
    if not control or not model:
        return None
    common = sorted(set(control) & set(model))
    if common:
        diffs = [control[s] - model[s] for s in common]
        return float(np.mean(diffs)), float(np.std(diffs)), common
    mean = float(np.mean(list(control.values())) - np.mean(list(model.values())))
    return mean, float(np.hypot(np.std(list(control.values())), np.std(list(model.values())))), []


def _fmt_difference(diff) -> str:
    if diff is None:
        return "–"
    mean, std, seeds = diff
    return f"{mean:+.3f} ± {std:.3f}" if len(seeds) != 1 else f"{mean:+.3f}"


TAX_COLUMNS = [("bias tax water", "water/miou"), ("bias tax land", "land/miou"),
               ("bias tax worst group", "worst_group_miou"), ("bias tax boundary F water", "water/boundary_f"),
               ("bias tax boundary F land", "land/boundary_f")]


def bias_tax(runs: dict[str, dict[int, dict]], control: str, split: str = PAIRED_SPLIT, method: str = "method"
             ) -> dict[str, dict[str, tuple | None]]:
    """{setting: {column key: (mean, std, seeds) or None}} for every setting but `control`: the bias tax
    (control − model) of each TAX_COLUMNS key, and "gap_effect" = model paired gap − control paired gap."""
    if control not in runs:
        raise SystemExit(f"control setting {control!r} is not among the runs ({', '.join(sorted(runs)) or 'none'})")

    def values(name: str, key: str) -> dict[int, float]:
        return {seed: _paired_value(_paired(r, split, method), key) for seed, r in runs[name].items()}

    out = {}
    for name in sorted(runs):
        if name == control:
            continue
        out[name] = {key: difference(values(control, key), values(name, key)) for _, key in TAX_COLUMNS}
        out[name]["gap_effect"] = difference(values(name, "paired_gap"), values(control, "paired_gap"))
    return out


def bias_tax_table(runs: dict[str, dict[int, dict]], control: str, split: str = PAIRED_SPLIT,
                   order: list[str] | None = None) -> str:
    """Markdown: `bias_tax` per setting, with the seeds each difference used."""
    taxes = bias_tax(runs, control, split)
    names = [n for n in (order or sorted(taxes)) if n in taxes]
    head = ["setting", "seeds", *[label for label, _ in TAX_COLUMNS], "bias effect on the gap"]
    lines = [(f"Bias tax against the control {control!r} on {split} (control − model per group; bias effect on "
              "the gap = model paired gap − control paired gap; mean ± std over the seeds both have):"), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        tax = taxes[name]
        used = next((d[2] for d in tax.values() if d is not None), None)
        seeds = ",".join(str(s) for s in used) if used else ("means" if used == [] else "–")
        cells = [name, seeds, *[_fmt_difference(tax[key]) for _, key in TAX_COLUMNS],
                 _fmt_difference(tax["gap_effect"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _baseline_name(runs: dict[str, dict[int, dict]], order: list[str] | None, baselines_from: str | None) -> str:
    """The setting whose CAM, trivial and g rows every table shows: `baselines_from`, else the first setting."""
    names = [n for n in (order or sorted(runs)) if n in runs]
    return baselines_from if baselines_from in runs else (names[0] if names else "")


def _baseline_setting(runs: dict[str, dict[int, dict]], order: list[str] | None,
                      baselines_from: str | None) -> dict[int, dict]:
    return runs.get(_baseline_name(runs, order, baselines_from), {})


def g_table(runs: dict[str, dict[int, dict]], splits=("val", "test_aligned", "test_conflict"),
            order: list[str] | None = None, baselines_from: str | None = None) -> str:
    """Markdown: g's accuracy per seed, from the same setting as the baseline rows (a folder can hold settings
    trained with different g's, e.g. a ρ = 0.9 and a ρ = 0.5 g of the same seed)."""
    base = _baseline_setting(runs, order, baselines_from)
    lines = [f"g of the setting {_baseline_name(runs, order, baselines_from)!r}", "",
             "| g of seed | " + " | ".join(f"accuracy {s}" for s in splits) + " |", "|---|" + "---|" * len(splits)]
    for seed, run in sorted(base.items()):
        cells = [f"{run['results']['splits'][s]['g']['accuracy']:.3f}" if s in run["results"]["splits"] else "–"
                 for s in splits]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="wsssrec report", description=__doc__)
    parser.add_argument("runs_dir", nargs="+", help="folder(s) holding <name>-seed<S>/eval/results.json")
    parser.add_argument("--order", nargs="*", help="setting names in table order")
    parser.add_argument("--baselines-from", help="setting whose runs give the CAM and trivial rows")
    parser.add_argument("--control", help="setting trained without bias (ρ = 0.5): prints every other "
                                          "setting's bias tax on the paired split")
    parser.add_argument("--paired-split", default=PAIRED_SPLIT, help="the paired evaluation split")
    args = parser.parse_args(argv)
    runs = collect(*[Path(d) for d in args.runs_dir])
    if not runs:
        raise SystemExit(f"no */eval/results.json under {', '.join(args.runs_dir)}")
    print(table(runs, order=args.order, baselines_from=args.baselines_from))
    if has_paired(runs, args.paired_split):
        print(paired_table(runs, args.paired_split, order=args.order, baselines_from=args.baselines_from))
    if args.control:
        if not any(_paired(r, args.paired_split, "method") for r in runs.get(args.control, {}).values()):
            raise SystemExit(f"control setting {args.control!r} has no {args.paired_split} scores (settings: "
                             f"{', '.join(sorted(runs))}); add the split to its data set (`wsssrec data toy-birds "
                             f"--out FOLDER --only test_paired`) and run `wsssrec eval` again")
        print(bias_tax_table(runs, args.control, args.paired_split, order=args.order))
    print(g_table(runs, order=args.order, baselines_from=args.baselines_from))
