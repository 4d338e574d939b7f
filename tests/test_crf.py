"""The dense-CRF refinement (trainer/crf.py) on tiny hand-made inputs: it pulls a blurred, shifted mask onto
the colour edge, keeps the logits' form, and is a no-op when off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.crf import CRFSettings, dense_crf, label_probabilities, refine_logits

SETTINGS = CRFSettings(iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=8, bilateral_srgb=13,
                       bilateral_compat=10)


def _two_colours(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((size, size, 3), np.uint8)
    image[:, : size // 2] = (200, 40, 40)
    image[:, size // 2:] = (40, 40, 200)
    truth = np.zeros((size, size), bool)
    truth[:, : size // 2] = True
    return image, truth


def _blurred_guess(size: int = 32, edge: int = 21, seed: int = 0) -> np.ndarray:
    """Foreground probability falling from 0.7 to 0.3 across columns edge-6 .. edge+6, plus noise: a
    CAM-like mask whose edge sits 5 px right of the colour edge."""
    cols = np.clip(0.7 - (np.arange(size) - (edge - 6)) * (0.4 / 12), 0.3, 0.7)
    fg = np.tile(cols, (size, 1)) + np.random.default_rng(seed).normal(0, 0.05, (size, size))
    fg = np.clip(fg, 0.05, 0.95)
    return np.stack([1 - fg, fg]).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_crf_pulls_the_mask_onto_the_colour_edge():
    image, truth = _two_colours()
    probs = _blurred_guess()
    before = _iou(probs.argmax(0) == 1, truth)
    refined = dense_crf(image, probs, SETTINGS)
    after = _iou(refined.argmax(0) == 1, truth)
    assert refined.shape == probs.shape and np.allclose(refined.sum(0), 1, atol=1e-4)
    assert before < 0.85 and after > 0.97


def test_refine_logits_keeps_the_logit_form_and_is_off_at_zero_iterations():
    image, truth = _two_colours()
    probs = torch.from_numpy(_blurred_guess())
    # K = 3 components for C = 1: class, two background components sharing the background mass
    logits = torch.stack([probs[1].log(), (probs[0] / 2).log(), (probs[0] / 2).log()])[None]
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert refine_logits(logits, images, 1, CRFSettings()) is logits
    out = refine_logits(logits, images, 1, SETTINGS)
    assert out.shape == logits.shape
    q = label_probabilities(out, 1)[0].numpy()
    assert np.allclose(q, dense_crf(image, label_probabilities(logits, 1)[0].numpy(), SETTINGS), atol=1e-4)
    labels = out.argmax(1)[0]  # component 0 = the class; the argmax is the CRF's decision
    assert _iou((labels == 0).numpy(), truth) > 0.97
    assert float(torch.softmax(out, 1)[0, 2].max()) < 1e-6  # the second background component holds nothing


def test_bad_inputs_are_named():
    image, _ = _two_colours()
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), _blurred_guess(), SETTINGS)
    with pytest.raises(ValueError, match="differ in size"):
        dense_crf(image[:16], _blurred_guess(), SETTINGS)


class ShiftedGuess(torch.nn.Module):
    """A mask network whose foreground logits are the blurred, shifted guess above, for any input."""
    num_classes = 1

    def forward(self, images):
        probs = torch.from_numpy(_blurred_guess()).expand(images.shape[0], 2, 32, 32)
        return {"mask_logits": torch.stack([probs[:, 1].log(), probs[:, 0].log()], dim=1)}

    def predict_labels(self, logits, fg_threshold=0.5):
        return (logits.argmax(1) == 0).long()


def test_the_inference_path_refines_when_eval_crf_is_on():
    from trainer.config import EvalConfig
    from trainer.inference import PredictSettings, predict_masks

    image, truth = _two_colours()
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).repeat(2, 1, 1, 1)
    off = predict_masks(ShiftedGuess(), images, PredictSettings.of(EvalConfig(flip=False)))
    ecfg = EvalConfig(flip=False, crf_iterations=10, crf_gaussian_sxy=1, crf_bilateral_sxy=8)
    on = predict_masks(ShiftedGuess(), images, PredictSettings.of(ecfg))
    assert PredictSettings.of(ecfg).crf == SETTINGS
    assert _iou(off.labels[0].numpy() == 1, truth) < 0.85 < 0.97 < _iou(on.labels[1].numpy() == 1, truth)
    assert torch.allclose(on.logits, refine_logits(off.logits, images, 1, SETTINGS))


def test_a_model_that_predicts_with_the_crf_asks_for_pydensecrf2_when_served():
    from trainer.config import load_config
    from trainer.pyfunc import _requirements

    assert not any(r.startswith("pydensecrf2") for r in _requirements(load_config(None, [])))
    assert "pydensecrf2==1.1" in _requirements(load_config(None, ["eval.crf_iterations=10"]))
