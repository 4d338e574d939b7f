"""Issue 19: how a trained toy-multi segmenter's masks are turned into labels, measured on cached probabilities.
Rules: argmax over the K components (today's), and per-class foreground thresholds chosen on val (each class's
threshold by the two-label mIoU over the val images tagged with it, as CAM's per-class thresholds are chosen;
then the strongest class above its own threshold), each with and without the dense CRF.
usage: .venv/bin/python docs/multi_decode.py RUN [RUN ...]   (RUN: runs/multi/NAME-seedS, with segmenter.pt)"""
import json
import sys

import torch

from trainer.config import load_config
from trainer.crf import label_probabilities
from trainer.data import eval_batches
from trainer.evaluate import CAM_THRESHOLDS
from trainer.inference import PredictSettings, predict_masks
from trainer.metrics import SegmentationMeter
from trainer.multiclass import PerClassThresholdSearch, cam_labels_per_class
from trainer.weights import load_frozen_g, load_segmenter

torch.set_num_threads(1)
SPLITS = ("val", "test_conflict")


@torch.no_grad()
def cached(cfg, model, g, split, crf):
    """Per batch: (class probabilities B×C×h×w, label 0 excluded; argmax labels; truth; tags)."""
    settings = PredictSettings.of(cfg.eval, crf=PredictSettings.of(cfg.eval).crf if crf else
                                  PredictSettings().crf, fg_threshold=0.5, gate_threshold=0.0)
    out = []
    for batch in eval_batches(cfg, split):
        pred = predict_masks(model, batch["image"], settings, g)
        probs = label_probabilities(pred.logits, model.num_classes)
        out.append((probs[:, 1:], pred.labels, batch["mask"], batch["labels"]))
    return out


def score(batches, labels_of, num_labels):
    meter = SegmentationMeter(num_labels)
    for probs, argmax, truth, tags in batches:
        meter.update(labels_of(probs, argmax), truth, tags.sum(1) > 0)
    s = meter.summary()
    return s["miou"], [float(v) for v in meter.iou()[1:]]


for run in sys.argv[1:]:
    cfg = load_config("configs/toy_multi.yaml", ["data.url=data/toy-multi-96/manifest.json", "train.threads=1",
                                                 f"classifier.checkpoint={run.rsplit('/', 1)[0]}/g96e4-seed0/classifier.pt"])
    _, g = load_frozen_g(cfg, 4)
    model, _, _ = load_segmenter(f"{run}/segmenter.pt")
    model.eval()
    C = model.num_classes
    for crf in (False, True):
        cache = {split: cached(cfg, model, g, split, crf) for split in SPLITS}
        search = PerClassThresholdSearch(C, CAM_THRESHOLDS)
        for probs, _, truth, tags in cache["val"]:
            search.update(probs, truth, tags)
        thresholds, _ = search.best()
        rows = {"argmax": lambda p, a: a, "per-class thresholds": lambda p, a: cam_labels_per_class(p, thresholds)}
        for name, rule in rows.items():
            res = {split: score(cache[split], rule, C + 1) for split in SPLITS}
            print(json.dumps({"run": run, "crf": crf, "rule": name, "thresholds": thresholds if "per" in name else None,
                              **{f"{s}_miou": round(r[0], 3) for s, r in res.items()},
                              "test_conflict_class_iou": [round(v, 3) for v in res["test_conflict"][1]]}), flush=True)
