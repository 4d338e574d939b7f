"""Evaluate every trial of a finished sweep on the test splits and print the table of docs/results.md
("Sweep" section): λ_m, λ_c, K → validation metric (from the sweep) and test mIoU (from `wsssrec eval`).

    python docs/eval_sweep.py runs/sweep/toy-birds-sweep -c configs/toy_birds.yaml classifier.checkpoint=runs/ref/g-seed0/classifier.pt
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    sweep = Path(sys.argv[1])
    overrides = sys.argv[2:]
    summary = json.loads((sweep / "summary.json").read_text())
    metric = summary["metric"]
    best = (summary.get("best") or {}).get("trial_id")
    lines = [f"| trial | λ_m | λ_c | K | rungs run | outcome | {metric} | test_aligned mIoU | test_conflict mIoU | "
             "test_conflict bird IoU | test_conflict neg FP |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["trials"]:
        trial = row["trial_id"]
        segmenter = sweep / "trials" / trial / "segmenter.pt"
        if not segmenter.is_file():
            print(f"{trial}: no segmenter.pt (the trial never reported a rung), left out", file=sys.stderr)
            continue
        out = sweep / "eval"
        results = out / trial / "eval" / "results.json"
        if not results.is_file():
            subprocess.run([sys.executable, "-m", "trainer", "eval", *overrides, f"train.out_dir={out}",
                            f"train.run_name={trial}", "eval.splits=[test_aligned,test_conflict]",
                            "mlflow.enabled=false", "--segmenter", str(segmenter)], check=True)
        res = json.loads(results.read_text())["splits"]
        method = {s: res[s]["methods"]["method"] for s in res}
        p, m = row["params"], row["metrics"]
        name = f"**{trial}** (best)" if trial == best else trial
        lines.append(f"| {name} | {p['lambda_m']:.3g} | {p['lambda_c']:.3g} | {p['K']} | {int(m.get('rung', 0))} | "
                     f"{row['outcome']} | {m.get(metric, float('nan')):.3f} | {method['test_aligned']['miou']:.3f} | "
                     f"{method['test_conflict']['miou']:.3f} | {method['test_conflict']['iou_1']:.3f} | "
                     f"{method['test_conflict']['negative_fp_area']:.3f} |")
    cam = {s: res[s]["methods"]["CAM"]["miou"] for s in res}
    lines.append(f"| CAM (same g) | | | | | | | {cam['test_aligned']:.3f} | {cam['test_conflict']:.3f} | | |")
    print("\n".join(lines))
    print(f"\nsweep time {summary['seconds']:.0f} s; registered: {summary.get('registered')}")


if __name__ == "__main__":
    main()
