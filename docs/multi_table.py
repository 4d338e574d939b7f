"""Issue 19: the toy-multi table of docs/results.md from runs/multi/*/eval/results.json.
usage: .venv/bin/python docs/multi_table.py SPLIT RUN [RUN ...]   (a RUN ending in -seed* glob: mean ± std)"""
import glob
import json
import statistics
import sys

split, runs = sys.argv[1], sys.argv[2:]


def row(method, d):
    m = d["splits"][split]["methods"][method]
    return [m["miou"], *[m[f"iou_{c + 1}"] for c in range(len(d["classes"]))], m["background_iou"],
            m["boundary_f"], m["negative_fp_area"]]


header = False
for pattern in runs:
    paths = sorted(glob.glob(f"runs/multi/{pattern}/eval/results.json"))
    if not paths:
        continue
    data = [json.load(open(p)) for p in paths]
    if not header:  # the classes of the first run's data set (results.json "classes")
        classes = data[0]["classes"]
        print(f"| run ({split}) | seeds | mIoU | " + " | ".join(f"{c} IoU" for c in classes) +
              " | bg IoU | boundary F | neg FP | CAM mIoU |")
        print("|---" * (len(classes) + 7) + "|")
        header = True
    rows = [row("method", d) for d in data]
    cam = statistics.mean(d["splits"][split]["methods"]["CAM"]["miou"] for d in data)
    cells = []
    for values in zip(*rows):
        cells.append(f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""))
    seeds = ",".join(p.split("-seed")[-1].split("/")[0] for p in paths)
    print(f"| {pattern} | {seeds} | " + " | ".join(cells) + f" | {cam:.3f} |")
