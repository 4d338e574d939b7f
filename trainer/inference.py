"""The one inference path, used by `wsssrec eval`, the sweeps' ranking, the registered model (pyfunc,
`mlflow models serve`) and `wsssrec predict`: mask logits (with the flip and multi-scale test-time
augmentations) → foreground threshold → labels → the preserve gate, at the model's input size; then, per image,
the same labels and the class probabilities at any size (logits resized bilinearly, the gate's decisions carried
over). Square models (the toy sets) see every image resized to `data.image_size`; with `data.resize: crop`
(real photos) an image is predicted at its own size, padded to a multiple of 32 and cut back, as eval does."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, EvalConfig, ObjectiveConfig
from .crf import CRFSettings, refine_logits
from .gate import absent_classes, apply_gate, preserve_scores, remove_classes
from .images import image_tensor, pad_to_multiple, resize_for_model
from .models import mask_logits

BATCH_SIZE = 16


@dataclass(frozen=True)
class PredictSettings:
    """How the method predicts: `eval.flip`, `eval.fg_threshold`, `eval.gate_threshold` (0: gate off),
    `eval.tag_threshold` (the tag gate: classes g's whole-image probability puts below it are removed before
    the CRF and the threshold; 0: off),
    `eval.scales` (multi-scale test-time augmentation; (1.0,): none), `eval.crf_*` (dense-CRF refinement of
    the averaged masks; off by default)."""
    flip: bool = True
    fg_threshold: float = 0.5
    gate_threshold: float = 0.0
    scales: tuple[float, ...] = (1.0,)
    crf: CRFSettings = CRFSettings()
    tag_threshold: float = 0.0

    @property
    def needs_g(self) -> bool:
        """Whether predicting needs the frozen classifier g (the preserve gate or the tag gate is on)."""
        return self.gate_threshold > 0 or self.tag_threshold > 0

    @classmethod
    def of(cls, ecfg: EvalConfig, **changes) -> "PredictSettings":
        values = {"flip": ecfg.flip, "fg_threshold": ecfg.fg_threshold, "gate_threshold": ecfg.gate_threshold,
                  "scales": tuple(float(s) for s in ecfg.scales), "crf": CRFSettings.of(ecfg),
                  "tag_threshold": ecfg.tag_threshold}
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

    def at_size(self, model, index: int, size: tuple[int, int], probabilities: bool = False,
                extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image `index` at `size` (H×W), from its logits resized once: the label map, gated by the scores
        computed at the model's size, and (with `probabilities`) the (C+1)×H×W class probabilities, label 0 =
        the background components' mass, where a region the gate dropped gives its probability to background.
        `extent` (h, w): the image fills only the top-left h×w of the input (the rest is padding): the logits
        are cut to it first, and not resized at all when it equals `size`."""
        full = self.logits[index:index + 1]
        if extent is not None:
            full = full[..., :extent[0], :extent[1]]
        if extent is None or tuple(full.shape[-2:]) != tuple(size):
            full = F.interpolate(full, size=size, mode="bilinear", align_corners=False)
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
    if settings.needs_g and g is None:
        raise ValueError("the preserve gate (gate_threshold > 0) and the tag gate (tag_threshold > 0) each needs g, "
                         "the frozen classifier")
    if settings.gate_threshold > 0 and objective is None:
        raise ValueError("the preserve gate (gate_threshold > 0) needs the objective config (its fill)")
    logits = mask_logits(model, images, settings.flip, net_out, settings.scales)
    if settings.tag_threshold > 0:
        logits = remove_classes(logits, absent_classes(g, images, settings.tag_threshold), C)
    logits = refine_logits(logits, images, C, settings.crf)
    labels = model.predict_labels(logits, settings.fg_threshold)
    scores = torch.full((images.shape[0], C), float("nan"))
    if settings.gate_threshold > 0:
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
        self.own_size = self.cfg.data.resize == "crop"  # real photos: predicted at their own size, padded
        self.pad_multiple = math.lcm(self.cfg.data.eval_pad_multiple, getattr(self.model, "divisor", 1))

    def model_inputs(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, list[int]]]:
        """The images as the model takes them, in groups of one input size: (batch, indices into `images`).
        Square models: one group, every image resized to image_size². Own-size models (`data.resize: crop`):
        each image padded with zeros at the bottom and right to a multiple of `data.eval_pad_multiple` (and of
        the encoder's divisor), as the evaluation loader pads; images of one padded size share a batch."""
        if not self.own_size:
            return [(torch.stack([resize_for_model(img, self.image_size) for img in images]), list(range(len(images))))]
        groups: dict[tuple[int, int], list[int]] = {}
        padded = [pad_to_multiple(image_tensor(img), self.pad_multiple) for img in images]
        for i, tensor in enumerate(padded):
            groups.setdefault(tuple(tensor.shape[-2:]), []).append(i)
        return [(torch.stack([padded[i] for i in idx]), idx) for idx in groups.values()]


@dataclass
class SegmenterPredictor(_Predictor):
    """The segmenter, and the frozen g with the preserve gate's threshold when a gate (preserve or tag) is on."""
    g: torch.nn.Module | None = None
    gate_threshold: float = 0.0
    kind: str = "segmenter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if PredictSettings.of(self.cfg.eval, gate_threshold=self.gate_threshold).needs_g and self.g is None:
            raise ValueError(f"the preserve gate (threshold {self.gate_threshold}) or the tag gate (threshold "
                             f"{self.cfg.eval.tag_threshold}) needs the frozen classifier g; none was given")
        if self.g is not None:
            self.g.eval()

    @torch.no_grad()
    def segment(self, images: list[np.ndarray], probabilities: bool = False,
                batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
        """Per image {"mask": H×W uint8 labels} (and "probabilities": (C+1)×H×W, label 0 = background) at
        the image's own size, predicted as `wsssrec eval` predicts (`predict_masks` on the image resized to
        the model's size, then the logits resized back; own-size models: on the padded image, then cut back)."""
        settings = PredictSettings.of(self.cfg.eval, gate_threshold=self.gate_threshold)
        out: list[dict[str, np.ndarray]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            rows: dict[int, dict[str, np.ndarray]] = {}
            for batch, indices in self.model_inputs(chunk):
                pred = predict_masks(self.model, batch, settings, self.g, self.cfg.objective)
                for j, i in enumerate(indices):
                    size = chunk[i].shape[:2]
                    labels, probs = pred.at_size(self.model, j, size, probabilities,
                                                 extent=size if self.own_size else None)
                    rows[i] = {"mask": labels.numpy().astype(np.uint8)}
                    if probs is not None:
                        rows[i]["probabilities"] = probs.numpy()
            out += [rows[i] for i in range(len(chunk))]
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
