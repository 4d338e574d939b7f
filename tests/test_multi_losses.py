"""Multi-class (C > 1) objective terms on hand-computed tensors, and the component → label mapping with
extra background components."""
import math

import pytest
import torch

from trainer.cam import cam_labels
from trainer.config import ModelConfig, ObjectiveConfig
from trainer.losses import L_absent, L_mask, L_paste, L_preserve, L_tv, classifier_rows, deleted, foreground, preserved
from trainer.models import Segmenter, component_to_label
from trainer.objectives import objective

ln = math.log


def _two_pixel_case():
    """1×2 image: pixel 0 pure red (class 0's object), pixel 1 pure green (class 1's). K = 3, C = 2."""
    I = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # B=1, 3, 1, 2
    M = torch.tensor([[[[0.8, 0.1]], [[0.1, 0.6]], [[0.1, 0.3]]]])  # B=1, K=3, 1, 2
    y = torch.tensor([[1.0, 1.0]])
    return I, M, y


def g_channel_means(images):
    """Class c's probability = 2 × mean of colour channel c (red → class 0, green → class 1)."""
    p = (2 * images[:, :2].mean(dim=(2, 3))).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def test_classifier_rows_one_per_tagged_class_and_one_per_untagged_image():
    M = torch.rand(3, 4, 2, 2)
    M = M / M.sum(1, keepdim=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    M_fg = foreground(M, 3)
    image, rows, keep, drop = classifier_rows(M, M_fg, y)
    assert image.tolist() == [0, 0, 1, 2]
    assert torch.equal(rows[0], M[0, 0]) and torch.equal(rows[1], M[0, 2]) and torch.equal(rows[3], M[2, 1])
    assert torch.allclose(rows[2], M[1, :3].sum(0))  # untagged image: the whole foreground
    assert keep.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert drop.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_per_class_preserve_and_delete_by_hand():
    I, M, y = _two_pixel_case()
    image, rows, keep, drop = classifier_rows(M, foreground(M, 2), y)
    fill = torch.zeros_like(I)
    # P_0 = M_0 ⊙ I: red mean 0.4 → p 0.8, green mean 0.05 → p 0.1; target (1, 0)
    # P_1 = M_1 ⊙ I: p (0.1, 0.6); target (0, 1)
    expected_preserve = (-ln(0.8) - ln(0.9) - ln(0.9) - ln(0.6)) / 4
    P = preserved(rows, I[image], fill[image])
    assert L_preserve(g_channel_means, P, keep).item() == pytest.approx(expected_preserve, rel=1e-4)
    # D_0 = (1 − M_0) ⊙ I: p (0.2, 0.9), target y − e_0 = (0, 1); D_1: p (0.9, 0.4), target (1, 0)
    D = deleted(rows, I[image], fill[image])
    expected_delete = (-ln(0.8) - ln(0.9) - ln(0.9) - ln(0.6)) / 4
    assert L_preserve(g_channel_means, D, drop).item() == pytest.approx(expected_delete, rel=1e-4)


def test_objective_prefers_each_class_on_its_own_component():
    """The same two masks, once on the right components and once swapped: the classifier terms tell them apart
    (the binary M_fg terms could not: M_fg is the same)."""
    torch.manual_seed(0)
    I = torch.zeros(2, 3, 8, 8)
    I[0, 0, :, :4] = 1.0  # image 0: a red object (class 0) on the left, a green one (class 1) on the right
    I[0, 1, :, 4:] = 1.0
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # image 1: black, untagged
    right = torch.full((2, 3, 8, 8), -10.0)
    right[0, 0, :, :4] = 10.0
    right[0, 1, :, 4:] = 10.0
    right[:, 2] = torch.where(right[:, :2].amax(1) > 0, -10.0, 10.0)
    swapped = right[:, [1, 0, 2]]
    cfg = ObjectiveConfig(preset="preserve_delete", fill_sigma=2.0)
    X = torch.rand(2, 3, 3, 8, 8)
    good = objective({"mask_logits": right, "imagelets": X}, I, y, g_channel_means, cfg)
    bad = objective({"mask_logits": swapped, "imagelets": X}, I, y, g_channel_means, cfg)
    assert good["L_area"].item() == pytest.approx(bad["L_area"].item())
    assert good["L_preserve"] < bad["L_preserve"] - 1.0
    assert good["L_delete"] < bad["L_delete"] - 1.0


def test_L_absent_by_hand():
    M = torch.zeros(2, 3, 1, 2)  # C = 2, K = 3
    M[0, 0] = torch.tensor([[0.5, 0.1]])  # image 0 tagged class 1 only: class 0's area 0.3 is absent area
    M[0, 1] = torch.tensor([[0.2, 0.8]])
    M[1, 0] = torch.tensor([[0.4, 0.0]])  # image 1 untagged: 0.2 + 0.1
    M[1, 1] = torch.tensor([[0.2, 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert L_absent(M, y).item() == pytest.approx((0.3 + 0.3) / 2)


def test_multi_class_tv_sums_class_components():
    # class 0 changes once horizontally, class 1 never; a boundary between two classes costs TV in both
    M = torch.zeros(1, 3, 2, 2)
    M[0, 0, :, 0] = 1.0
    M[0, 1, :, 1] = 1.0
    cfg = ObjectiveConfig(preset="preserve_delete", fill_sigma=1.0)
    t = objective({"mask_logits": torch.log(M.clamp_min(1e-9)), "imagelets": torch.rand(1, 3, 3, 2, 2)},
                  torch.rand(1, 3, 2, 2), torch.tensor([[1.0, 1.0]]), g_channel_means, cfg)
    assert t["L_tv"].item() == pytest.approx(L_tv(M[:, 0]).item() + L_tv(M[:, 1]).item(), rel=1e-5)
    assert t["L_tv"].item() == pytest.approx(2.0, rel=1e-5)  # M_fg is constant 1: its TV would be 0


def test_L_paste_checks_each_class():
    I = torch.rand(2, 3, 2, 2)
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    source = torch.zeros(2, 2, 2, 2)
    source[0, 0, 0] = 0.9  # class 0 on the top row, class 1 on the bottom row
    source[0, 1, 1] = 0.9

    def segment(images):  # returns class 0 everywhere (p ≈ 1): right on the top row, wrong on the bottom
        logits = torch.full((images.shape[0], 3, 2, 2), -20.0)
        logits[:, 0] = 20.0
        return {"mask_logits": logits}

    value = L_paste(segment, I, y, source, num_classes=2)
    # class 0: target (1,1,0,0) vs ≈1 everywhere → two pixels at −ln ε; class 1: target (0,0,1,1) vs ≈0 → two more
    eps_cost = -ln(1e-6)
    assert value.item() == pytest.approx(4 * eps_cost / 8, rel=1e-3)


def test_paper_L_mask_with_two_classes_and_two_background_components():
    M = torch.tensor([[[[0.1]], [[0.4]], [[0.2]], [[0.3]]]])  # C = 2, K = 4
    y = torch.tensor([[0.0, 1.0]])
    expected = -ln(0.9) - ln(0.4) - ln(0.5)  # absent → 0; present → up; background 0.2 + 0.3 → 1
    assert L_mask(M, y).item() == pytest.approx(expected, rel=1e-5)


def test_component_to_label_with_extra_background_components():
    components = torch.tensor([[0, 1, 2, 3, 4, 1]])  # C = 2, K = 5: components 2, 3, 4 are background
    assert component_to_label(components, 2).tolist() == [[1, 2, 0, 0, 0, 2]]


def test_segmenter_predicts_labels_from_extra_background_components():
    model = Segmenter(ModelConfig(encoder="unet", width=4, depth=2, K=5, imagelet_head="local_mean"), num_classes=2)
    assert model.K == 5
    Z = torch.full((1, 5, 1, 4), -5.0)
    Z[0, 0, 0, 0] = 5.0  # class 0
    Z[0, 1, 0, 1] = 5.0  # class 1
    Z[0, 3, 0, 2] = 5.0  # a second background component
    Z[0, 4, 0, 3] = 5.0  # a third
    assert model.predict_labels(Z).tolist() == [[[1, 2, 0, 0]]]
    # with a foreground threshold: the best class where Σ class mass exceeds it
    Z2 = torch.zeros(1, 5, 1, 1)
    Z2[0, 1] = 1.5  # softmax: class mass (1 + e^1.5) / (e^1.5 + 4) ≈ 0.65, class 1 the larger
    assert model.predict_labels(Z2, 0.6).tolist() == [[[2]]]
    assert model.predict_labels(Z2, 0.7).tolist() == [[[0]]]
    with pytest.raises(Exception, match="K must be ≥ C \\+ 1"):
        Segmenter(ModelConfig(encoder="unet", width=4, depth=2, K=2, imagelet_head="local_mean"), num_classes=2)


def test_cam_labels_pick_the_strongest_class():
    scores = torch.tensor([[[[0.9, 0.2, 0.1]], [[0.3, 0.7, 0.2]]]])  # C = 2
    assert cam_labels(scores, 0.5).tolist() == [[[1, 2, 0]]]
