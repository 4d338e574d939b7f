"""Keep the best weights of stage 2 by a held-out split (`train.select_split`, e.g. val), as transformers'
`load_best_model_at_end` does with `metric_for_best_model`: at every checkpoint step and at the last step the
segmenter is scored on that split with the product's own inference (`eval.*`: flip, CRF, `eval.fg_threshold`,
`eval.gate_threshold`, `eval.tag_threshold`; thresholds are not searched here), by mIoU over the positive images
(`wsssrec eval`'s mIoU); the best so far is written to <run>/segmenter_best.pt, and at the end segmenter.pt is
the best one (the last weights stay in segmenter_last.pt). With `train.select_min_delta` > 0 later weights are
preferred: the kept step is the latest whose score is within min_delta of the best (Keras' EarlyStopping
`min_delta`), so a noise-sized val difference does not send the run back to an earlier step. The scores and the chosen step travel in every
checkpoint (a resumed run keeps choosing among all of them), in train_history.json and in MLflow
(`select/<split>_miou` per scored step, `select/step`, `select/<split>_miou_best`).

Why (docs/results.md, 2026-12-06 afternoon): on toy-birds the masks peak and then shrink or drift on some seeds,
and which step is best differs per seed; val picked the better of the kept checkpoints on every run measured."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import consolidated_state_dict
from .config import Config, ConfigError, ObjectiveConfig
from .data import eval_batches, split_has_masks
from .effnet import EfficientNetLite
from .evaluate import SplitScores
from .files import atomic_copy
from .inference import PredictSettings, predict_masks
from .metrics import SegmentationMeter
from .objectives import objective
from .weights import build_segmenter, save_segmenter

BEST_FILE, LAST_FILE = "segmenter_best.pt", "segmenter_last.pt"


def check_select_split(cfg: Config) -> None:
    """A named select split must exist in the data set and have masks (checked before any training)."""
    split = cfg.train.select_split
    if split and not split_has_masks(cfg, split):
        raise ConfigError(f"train.select_split={split!r}: that split of {cfg.data.url} has no masks to score "
                          "the segmenter on (name an evaluation split, e.g. val, or leave it empty)")


@torch.no_grad()
def split_scores(model, g, cfg: Config, split: str, num_labels: int, reference: ObjectiveConfig | None = None,
                 device: torch.device | None = None) -> dict[str, float]:
    """`wsssrec eval`'s scores of the method on `split` (mIoU, per-label IoU, boundary F at 2 px; predicted with the
    configured inference: `eval.flip`, `eval.fg_threshold`, the gates, the CRF) when the split has masks, and with
    `reference` the mean loss under those objective weights ("loss"; L_paste left out: it only exists in training)."""
    has_masks = split_has_masks(cfg, split)
    scored = SplitScores({"method": SegmentationMeter(num_labels)}, {"method": {}})
    weights = None if reference is None else replace(reference, paste_weight=0.0)
    loss_sum, images_seen = 0.0, 0
    for batch in tqdm(eval_batches(cfg, split), desc=f"score {split}", leave=False, dynamic_ncols=True):
        images, labels = batch["image"].to(device or "cpu"), batch["labels"].to(device or "cpu")
        out = model(images)
        if weights is not None:
            loss_sum += float(objective(out, images, labels, g, weights, training=False)["loss"]) * images.shape[0]
            images_seen += images.shape[0]
        if has_masks:
            pred = predict_masks(model, images, PredictSettings.of(cfg.eval), g, cfg.objective, out).labels
            scored.update({"method": pred.cpu()}, batch, num_labels)
    scores = {"loss": loss_sum / max(images_seen, 1)} if weights is not None else {}
    if has_masks:
        scores.update({**scored.meters["method"].summary(), **scored.boundary["method"].summary()})
    return scores


class Selector:
    """Scores the engine's weights on `train.select_split` at the steps it is called for (every rank calls it:
    gathering ZeRO-3 weights is collective) and keeps the best on rank 0. Its record ({"scores": {step: mIoU},
    "step", "score"}) lives in LoopState.selection, so it is saved with every checkpoint."""

    def __init__(self, cfg: Config, classes: list[str], g, out: Path, selection: dict):
        self.cfg, self.classes, self.g, self.out = cfg, classes, g, out
        self.split = cfg.train.select_split
        self.record = selection
        self.record.setdefault("split", self.split)
        self.record.setdefault("scores", {})

    @property
    def active(self) -> bool:
        return bool(self.split)

    def chooses(self, value: float) -> bool:
        """Whether weights scoring `value` (the latest scored) become the choice: the first, or within
        `train.select_min_delta` of the best score so far (so the latest step whose score is that close to the
        best is the one kept). A NaN score (no positive image scored) is never chosen over a number."""
        scores = [v for v in self.record["scores"].values() if not math.isnan(v)]
        if "step" not in self.record:
            return True
        if math.isnan(value):
            return False
        return value >= max(scores) - self.cfg.train.select_min_delta

    def score(self, engine, step: int, tracker=None) -> float | None:
        """Score the weights after `step` optimizer steps (once per step); write segmenter_best.pt when chosen.
        Rank 0 scores; the score is broadcast, so every rank keeps the same record (and makes the same calls)."""
        if not self.active or str(step) in self.record["scores"]:
            return None
        state = consolidated_state_dict(engine.module)
        rank0 = dist.get_rank() == 0
        result: list = [None]
        if rank0:
            model = build_segmenter(self.cfg, len(self.classes),
                                    EfficientNetLite(num_classes=len(self.classes), arch=self.cfg.classifier.arch))
            model.load_state_dict(state, strict=True)
            model.to(engine.device).eval()
            result[0] = split_scores(model, self.g, self.cfg, self.split, len(self.classes) + 1,
                                     device=engine.device)["miou"]
        dist.broadcast_object_list(result, src=0)
        value = float(result[0])
        self.record["scores"][str(step)] = value
        if self.chooses(value):
            self.record.update(step=step, score=value)
            if rank0:
                save_segmenter(state, self.cfg, self.classes, self.out / BEST_FILE)
        if rank0:
            if tracker is not None:
                tracker.log_metrics({f"select/{self.split}_miou": value}, step)
            print(f"\nselect: {self.split} mIoU {value:.4f} at step {step} (chosen: step {self.record['step']}, "
                  f"{self.record['score']:.4f})")
        dist.barrier()
        return value

    def final_path(self, path: Path) -> Path:
        """Where the last weights go: segmenter_last.pt when selecting (segmenter.pt becomes the chosen ones in
        `finish`), else `path` itself."""
        return self.out / LAST_FILE if self.active else path

    def finish(self, path: Path, tracker=None) -> None:
        """Rank 0, after the last weights were saved to `final_path`: segmenter.pt = the chosen ones."""
        if not self.active or dist.get_rank() != 0:
            return
        atomic_copy(self.out / BEST_FILE, path)
        if tracker is not None:
            tracker.log_metrics({"select/step": self.record["step"],
                                 f"select/{self.split}_miou_best": self.record["score"]}, self.record["step"])
        print(f"select: segmenter.pt is step {self.record['step']} ({self.split} mIoU {self.record['score']:.4f}); "
              f"the last weights are in {self.out / LAST_FILE}")
