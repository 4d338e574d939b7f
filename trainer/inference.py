"""The one inference path, used by `wsssrec eval`, the sweeps' ranking, the registered model (pyfunc,
`mlflow models serve`) and `wsssrec predict`: mask logits (with the flip test-time augmentation) →
foreground threshold → labels → the preserve gate, at the model's size; then, per image, the same labels and
the class probabilities at any size (logits resized bilinearly, the gate's decisions carried over)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, EvalConfig, ObjectiveConfig
from .gate import apply_gate, preserve_scores
from .images import resize_for_model
from .models import mask_logits

BATCH_SIZE = 16


@dataclass(frozen=True)
class PredictSettings:
    """How the method predicts: `eval.flip`, `eval.fg_threshold`, `eval.gate_threshold` (0: gate off)."""
    flip: bool = True
    fg_threshold: float = 0.5
    gate_threshold: float = 0.0

    @classmethod
    def of(cls, ecfg: EvalConfig, **changes) -> "PredictSettings":
        values = {"flip": ecfg.flip, "fg_threshold": ecfg.fg_threshold, "gate_threshold": ecfg.gate_threshold}
        return cls(**{**values, **changes})


@dataclass
class MaskPrediction:
    """A batch predicted at the model's size: mask logits B×K×h×w, gated labels B×h×w, and the preserve
    gate's scores B×C (NaN: no region of that class, or the gate is off)."""
    logits: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    num_classes: int
    settings: PredictSettings

    @property
    def dropped(self) -> torch.Tensor:
        """B×C: the class regions the gate dropped to background (NaN compares False)."""
        return self.scores < self.settings.gate_threshold

    def at_size(self, model, index: int, size: tuple[int, int], probabilities: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image `index` at `size` (H×W), from its logits resized once: the label map, gated by the scores
        computed at the model's size, and (with `probabilities`) the (C+1)×H×W class probabilities, label 0 =
        the background components' mass, where a region the gate dropped gives its probability to background."""
        full = F.interpolate(self.logits[index:index + 1], size=size, mode="bilinear", align_corners=False)
        labels = apply_gate(model.predict_labels(full, self.settings.fg_threshold), self.scores[index:index + 1],
                            self.settings.gate_threshold)[0]
        if not probabilities:
            return labels, None
        C = self.num_classes
        comp = torch.softmax(full[0], dim=0)  # K components: the first C are the classes
        probs = torch.cat([comp[C:].sum(0, keepdim=True), comp[:C]])
        for c in self.dropped[index].nonzero().flatten().tolist():
            probs[0] += probs[c + 1]
            probs[c + 1] = 0
        return labels, probs


@torch.no_grad()
def predict_masks(model, images: torch.Tensor, settings: PredictSettings, g=None,
                  objective: ObjectiveConfig | None = None, net_out: dict | None = None) -> MaskPrediction:
    """The method's prediction for a batch at the model's size. With the gate on, the frozen `g` scores each
    predicted class region on its own (with `objective`'s fill). `net_out`: the forward on `images` already run."""
    C = model.num_classes
    logits = mask_logits(model, images, settings.flip, net_out)
    labels = model.predict_labels(logits, settings.fg_threshold)
    scores = torch.full((images.shape[0], C), float("nan"))
    if settings.gate_threshold > 0:
        if g is None or objective is None:
            raise ValueError("the preserve gate (gate_threshold > 0) needs the frozen classifier g and the "
                             "objective config (its fill)")
        scores = preserve_scores(g, images, labels, C, objective)
        labels = apply_gate(labels, scores, settings.gate_threshold)
    return MaskPrediction(logits, labels, scores, C, settings)


# ---- predictors: a loaded model that segments or classifies plain images ----

@dataclass
class _Predictor:
    """A loaded model in eval mode with its config, classes and input size."""
    model: torch.nn.Module
    cfg: Config
    classes: list[str]

    def __post_init__(self) -> None:
        self.model.eval()
        self.image_size = self.cfg.data.image_size


@dataclass
class SegmenterPredictor(_Predictor):
    """The segmenter, and the frozen g with the preserve gate's threshold when the gate is on."""
    g: torch.nn.Module | None = None
    gate_threshold: float = 0.0
    kind: str = "segmenter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_threshold > 0 and self.g is None:
            raise ValueError(f"the preserve gate (threshold {self.gate_threshold}) needs the frozen classifier g; "
                             "none was given")
        if self.g is not None:
            self.g.eval()

    @torch.no_grad()
    def segment(self, images: list[np.ndarray], probabilities: bool = False,
                batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
        """Per image {"mask": H×W uint8 labels} (and "probabilities": (C+1)×H×W, label 0 = background) at
        the image's own size, predicted as `wsssrec eval` predicts (`predict_masks` on the image resized to
        the model's size, then the logits resized back)."""
        settings = PredictSettings.of(self.cfg.eval, gate_threshold=self.gate_threshold)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([resize_for_model(img, self.image_size) for img in chunk])
            pred = predict_masks(self.model, batch, settings, self.g, self.cfg.objective)
            for i, img in enumerate(chunk):
                labels, probs = pred.at_size(self.model, i, img.shape[:2], probabilities)
                row = {"mask": labels.numpy().astype(np.uint8)}
                if probs is not None:
                    row["probabilities"] = probs.numpy()
                out.append(row)
        return out


@dataclass
class ClassifierPredictor(_Predictor):
    kind: str = "classifier"

    @torch.no_grad()
    def classify(self, images: list[np.ndarray], batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
        """Per image {"probabilities": σ(g(image)) over the C classes}."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([resize_for_model(img, self.image_size) for img in images[start:start + batch_size]])
            out += [{"probabilities": p.numpy()} for p in torch.sigmoid(self.model(batch))]
        return out
