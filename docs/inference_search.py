"""Choose the inference levers of issue 18 on `val` (never on a test split): dense-CRF settings and
multi-scale test-time augmentation, for trained segmenters, each scored by method mIoU, bird IoU and boundary F
through the one inference path (trainer.inference.predict_masks with eval's flip, threshold and gate).

    python docs/inference_search.py -c configs/toy_birds.yaml data.url=data/toy-birds/manifest.json \
        --runs runs/bias/rho09-seed0 runs/bias/rho09-seed1 --g-of runs/bias/g-toy-birds-seed0 ...

Prints one row per setting: mean over the given runs (each run with its own g) of val mIoU, bird IoU, boundary F.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.boundary import BoundaryMeter  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.crf import CRFSettings  # noqa: E402
from trainer.data import dataset_classes, eval_batches  # noqa: E402
from trainer.inference import PredictSettings, predict_masks  # noqa: E402
from trainer.metrics import SegmentationMeter  # noqa: E402
from trainer.weights import load_frozen_g, load_segmenter  # noqa: E402

SETTINGS = {
    "plain": {},
    "scales 0.75,1,1.25": {"scales": (0.75, 1.0, 1.25)},
    "scales 1,1.25,1.5": {"scales": (1.0, 1.25, 1.5)},
    **{f"crf sxy{sxy} srgb{srgb} w{w}": {"crf": CRFSettings(10, 1.0, 3.0, sxy, srgb, w)}
       for sxy, srgb, w in itertools.product((8, 16, 32), (13, 30), (5, 10))},
    # round 2 around the best of round 1 (sxy 16, srgb 13, w 10 on rho09-seed0's val)
    **{f"crf sxy{sxy} srgb{srgb} w{w}": {"crf": CRFSettings(10, 1.0, 3.0, sxy, srgb, w)}
       for sxy, srgb, w in ((16, 8, 10), (16, 13, 15), (16, 13, 20), (24, 13, 10), (24, 13, 15), (12, 13, 10))},
    "crf sxy16 srgb13 w10, 5 iterations": {"crf": CRFSettings(5, 1.0, 3.0, 16, 13, 10)},
    # round 3 (2026-12-02, gate off as in the default since, all three rho09 seeds): wider and stronger kernels
    **{f"crf sxy{sxy} srgb{srgb} w{w}": {"crf": CRFSettings(10, 1.0, 3.0, sxy, srgb, w)}
       for sxy, srgb, w in ((16, 13, 10), (24, 13, 20), (32, 13, 10), (32, 13, 20), (24, 20, 10), (24, 20, 20),
                            (16, 20, 10), (16, 8, 20), (48, 13, 10), (32, 8, 20))},
    "crf sxy16 srgb13 w10, 20 iterations": {"crf": CRFSettings(20, 1.0, 3.0, 16, 13, 10)},
    "crf sxy16 srgb13 w10, gaussian 3 px": {"crf": CRFSettings(10, 3.0, 3.0, 16, 13, 10)},
}


@torch.no_grad()
def score(cfg, model, g, settings: PredictSettings, split: str) -> dict:
    meter, boundary = SegmentationMeter(2), BoundaryMeter(2)
    for batch in eval_batches(cfg, split):
        pred = predict_masks(model, batch["image"], settings, g, cfg.objective).labels
        positive = batch["labels"].sum(1) > 0
        meter.update(pred, batch["mask"], positive)
        boundary.update(pred, batch["mask"], positive)
    out = meter.summary()
    return {"miou": out["miou"], "iou": out["iou_1"], "bf": boundary.summary()["boundary_f"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders holding segmenter.pt")
    parser.add_argument("--g-of", nargs="+", required=True, help="the g run folder of each run (classifier.pt)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--only", nargs="*", default=None, help="setting names to score (default: all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    names = args.only or list(SETTINGS)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for run, g_dir in zip(args.runs, args.g_of):
        cfg = load_config(args.config, [*args.overrides, f"classifier.checkpoint={g_dir}/classifier.pt"])
        torch.set_num_threads(1)
        g_net, g = load_frozen_g(cfg, len(dataset_classes(cfg)))
        model, _, _ = load_segmenter(Path(run) / "segmenter.pt", g_net)
        model.eval()
        for name in names:
            start = time.time()
            settings = PredictSettings.of(cfg.eval, **SETTINGS[name])
            rows[name].append(score(cfg, model, g, settings, args.split))
            print(f"{run} {name}: {rows[name][-1]} ({time.time() - start:.0f} s)", flush=True)
    print(f"\n| setting ({args.split}, mean over {len(args.runs)} runs) | mIoU | bird IoU | boundary F |\n|---|---|---|---|")
    for name, values in rows.items():
        mean = {k: np.mean([v[k] for v in values]) for k in values[0]}
        print(f"| {name} | {mean['miou']:.3f} | {mean['iou']:.3f} | {mean['bf']:.3f} |")


if __name__ == "__main__":
    main()
