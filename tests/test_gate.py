"""The preserve gate (trainer/gate.py): g checks each predicted class region on its own."""
import math

import torch

from trainer.config import ObjectiveConfig
from trainer.gate import apply_gate, preserve_scores


class RedDetector(torch.nn.Module):
    """Class 0 logit = 20·(max over pixels of red − green − 0.6): 'sees' the class where pure red remains
    (the heavily blurred fill smears the square to a weak reddish tint, below 0.6)."""

    def forward(self, x):
        return (20 * ((x[:, 0] - x[:, 1]).flatten(1).amax(dim=1) - 0.6))[:, None]


def test_apply_gate_drops_only_low_scored_classes():
    pred = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [0, 2]]])
    scores = torch.tensor([[0.9, 0.2], [0.1, float("nan")]])
    out = apply_gate(pred, scores, 0.5)
    assert out.tolist() == [[[0, 1], [0, 0]], [[0, 0], [0, 2]]]
    assert apply_gate(pred, scores, 0.0).tolist() == pred.tolist()  # 0 = off


def test_preserve_scores_see_the_region_alone():
    # image 0: a red square on green, predicted exactly; image 1: same image, the prediction on green grass
    img = torch.zeros(2, 3, 16, 16)
    img[:, 1] = 1.0
    img[:, 0, 4:12, 4:12], img[:, 1, 4:12, 4:12] = 1.0, 0.0
    pred = torch.zeros(2, 16, 16, dtype=torch.long)
    pred[0, 4:12, 4:12] = 1
    pred[1, 0:4, 0:4] = 1
    cfg = ObjectiveConfig(fill_sigma=8.0)
    scores = preserve_scores(RedDetector(), img, pred, 1, cfg)
    assert scores[0, 0] > 0.5 > scores[1, 0]
    empty = preserve_scores(RedDetector(), img, torch.zeros_like(pred), 1, cfg)
    assert all(math.isnan(v) for v in empty.flatten().tolist())
    gated = apply_gate(pred, scores, 0.5)
    assert gated[0].sum() == 64 and gated[1].sum() == 0
