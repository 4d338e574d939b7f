"""Self-training, the usual last stage of WSSS pipelines (IRN, ReCAM, 1-stage-wseg): a segmenter learns by
cross-entropy from a frozen teacher's refined, confident masks, with the uncertain pixels ignored.

`objective.preset: self_train` with `objective.teacher` (a segmenter.pt, usually stage 2's) turns `wsssrec
train` into that stage: every training batch is labelled on the fly by the teacher through the one inference
path (`eval`'s flip, scales, CRF, foreground threshold and preserve gate, so the labels are what `wsssrec eval`
would predict), then restricted by the image's tags, and the student (started from the teacher with
`model.init_from`, or from scratch) fits them with `L_pseudo`.

Which pixels are labels: on an image without tags, every pixel is background (the tags say so). On a tagged
image, a pixel is ignored (255) where the teacher's foreground mass is within `objective.self_margin` of the
foreground threshold, or where the preserve gate dropped the region it belongs to (the teacher saw a class
there but g did not recognise it alone), or where the teacher predicts a class the image is not tagged with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config, ConfigError, ObjectiveConfig
from .crf import label_probabilities
from .inference import PredictSettings, predict_masks
from .metrics import IGNORE
from .models import Segmenter
from .weights import load_frozen_g, load_segmenter


@dataclass
class Teacher:
    """A frozen segmenter, the classifier g that gates it, and how it predicts."""
    model: Segmenter
    g: torch.nn.Module
    settings: PredictSettings
    objective: ObjectiveConfig
    margin: float

    @classmethod
    def load(cls, cfg: Config, num_classes: int) -> "Teacher | None":
        """The teacher of `objective.preset: self_train` (None for every other preset)."""
        if cfg.objective.preset != "self_train":
            return None
        if not cfg.objective.teacher:
            raise ConfigError("objective.preset self_train needs objective.teacher: the segmenter.pt whose masks "
                              "the student learns (e.g. stage 2's runs/<run>/segmenter.pt)")
        g_net, g = load_frozen_g(cfg, num_classes)
        model, _, _ = load_segmenter(cfg.objective.teacher, g_net)
        if model.num_classes != num_classes:
            raise ConfigError(f"objective.teacher {cfg.objective.teacher} segments {model.num_classes} classes; "
                              f"the data set has {num_classes}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, g, PredictSettings.of(cfg.eval), cfg.objective, cfg.objective.self_margin)

    def to(self, device) -> "Teacher":
        self.model.to(device)
        self.g.to(device)
        return self

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return confident_labels(predict_masks(self.model, images, self.settings, self.g, self.objective),
                                tags, self.margin)


def confident_labels(pred, tags: torch.Tensor, margin: float) -> torch.Tensor:
    """B×H×W pseudo-labels from a MaskPrediction: 0 background, c + 1 class c, 255 ignored (see the module)."""
    C, threshold = pred.num_classes, pred.settings.fg_threshold
    labels = pred.labels
    fg_mass = 1.0 - label_probabilities(pred.logits, C)[:, 0]
    allowed = torch.cat([torch.ones_like(tags[:, :1]), tags], dim=1).bool()  # label 0 is always allowed
    untagged = ~torch.gather(allowed, 1, labels.flatten(1)).view_as(labels)
    dropped = (labels == 0) & (fg_mass > threshold)  # the gate's drops
    uncertain = (fg_mass - threshold).abs() < margin
    positive = (tags.sum(1) > 0)[:, None, None]
    labels = torch.where(uncertain | dropped | untagged, torch.full_like(labels, IGNORE), labels)
    return torch.where(positive, labels, torch.zeros_like(labels))
