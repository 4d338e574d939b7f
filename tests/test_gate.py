"""The preserve gate (trainer/gate.py): g checks each predicted class region on its own."""
import math
from pathlib import Path

import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.gate import apply_gate, preserve_scores

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toy_birds.yaml")


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


def _red_square_and_grass(size: int):
    """uint8 H×W×3: a red square on green grass, and grass alone."""
    import numpy as np

    grass = np.zeros((size, size, 3), dtype=np.uint8)
    grass[..., 1] = 255
    square = grass.copy()
    square[size // 4:3 * size // 4, size // 4:3 * size // 4] = (255, 0, 0)
    return square, grass


def test_registered_predictor_gates_as_eval_does():
    """The pyfunc predictor with the gate on predicts eval's gated label map (trainer.inference.predict_masks): the
    region on grass, which g does not recognise, drops to background; the one holding the square stays."""
    import numpy as np

    from trainer.config import load_config
    from trainer.effnet import EfficientNetLite0
    from trainer.images import resize_for_model
    from trainer.inference import PredictSettings, SegmenterPredictor, predict_masks
    from trainer.models import Segmenter

    torch.manual_seed(0)
    # fg threshold 0.01: the untrained segmenter marks (nearly) every pixel foreground, so the gate decides
    cfg = load_config(CONFIG, ["data.image_size=64", "eval.fg_threshold=0.01", "eval.gate_threshold=0.5"])
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1)).eval()
    square, grass = _red_square_and_grass(64)
    batch = torch.stack([resize_for_model(img, 64) for img in (square, grass)])
    expected = predict_masks(model, batch, PredictSettings(cfg.eval.flip, 0.01, 0.5), RedDetector(),
                             cfg.objective).labels
    ungated = predict_masks(model, batch, PredictSettings(cfg.eval.flip, 0.01)).labels
    assert (ungated > 0).float().mean() > 0.9  # both images predicted foreground before the gate
    assert (expected[0] > 0).float().mean() > 0.9 and expected[1].sum() == 0

    gated = SegmenterPredictor(model, cfg, ["bird"], g=RedDetector(), gate_threshold=0.5)
    rows = gated.segment([square, grass], probabilities=True)
    for row, want in zip(rows, expected):
        assert np.array_equal(row["mask"], want.numpy())
    assert np.allclose(rows[1]["probabilities"][0], 1.0) and np.all(rows[1]["probabilities"][1] == 0)
    # at another size the gate still drops the grass region (scored at the model's size)
    assert SegmenterPredictor(model, cfg, ["bird"], g=RedDetector(), gate_threshold=0.5).segment(
        [np.ascontiguousarray(grass[:48])])[0]["mask"].sum() == 0
    # without the gate the same predictor keeps both regions
    plain = SegmenterPredictor(model, cfg, ["bird"]).segment([square, grass])
    assert all((row["mask"] > 0).mean() > 0.9 for row in plain)
    with pytest.raises(ValueError, match="needs the frozen classifier g"):
        SegmenterPredictor(model, cfg, ["bird"], gate_threshold=0.5)


def test_gate_threshold_outside_0_1_is_rejected():
    from trainer.config import ConfigError, load_config

    for bad in ("eval.gate_threshold=1.0", "eval.gate_threshold=-0.1", "eval.fg_threshold=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(CONFIG, [bad])


# ---- the tag gate (eval.tag_threshold): g's whole-image prediction removes the classes it does not see ----

def test_remove_classes_moves_an_absent_class_mass_to_background():
    from trainer.gate import remove_classes

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))[:, :, None, None]  # B=2, C=2, K=3
    absent = torch.tensor([[False, True], [False, False]])
    probs = torch.softmax(remove_classes(logits, absent, 2), dim=1)[:, :, 0, 0]
    assert probs[0].tolist() == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)  # class 1's 0.3 went to background
    assert probs[1].tolist() == pytest.approx([0.1, 0.6, 0.3], abs=1e-6)  # nothing absent: unchanged
    assert remove_classes(logits, torch.zeros(2, 2, dtype=torch.bool), 2) is logits


def test_tag_gate_in_eval_and_in_the_registered_predictor():
    """With eval.tag_threshold 0.5 the grass image, where g sees no red, loses its (untrained, everywhere)
    foreground; the square keeps it; the predictor predicts what predict_masks does, and needs g."""
    import numpy as np

    from trainer.config import load_config
    from trainer.effnet import EfficientNetLite0
    from trainer.images import resize_for_model
    from trainer.inference import PredictSettings, SegmenterPredictor, predict_masks
    from trainer.models import Segmenter

    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["data.image_size=64", "eval.fg_threshold=0.01", "eval.tag_threshold=0.5",
                               "eval.crf_iterations=0"])
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1)).eval()
    square, grass = _red_square_and_grass(64)
    batch = torch.stack([resize_for_model(img, 64) for img in (square, grass)])
    settings = PredictSettings.of(cfg.eval)
    assert settings.needs_g and not PredictSettings.of(cfg.eval, tag_threshold=0.0).needs_g
    pred = predict_masks(model, batch, settings, RedDetector())
    assert (pred.labels[0] > 0).float().mean() > 0.9 and pred.labels[1].sum() == 0
    with pytest.raises(ValueError, match="the tag gate .* needs g"):
        predict_masks(model, batch, settings)
    rows = SegmenterPredictor(model, cfg, ["bird"], g=RedDetector()).segment([square, grass], probabilities=True)
    for row, want in zip(rows, pred.labels):
        assert np.array_equal(row["mask"], want.numpy())
    assert np.allclose(rows[1]["probabilities"][0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="tag gate .* needs the frozen classifier g"):
        SegmenterPredictor(model, cfg, ["bird"])
