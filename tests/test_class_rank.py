"""L_class_rank (issue 19): the ranked area bounds of the tagged classes (Fong et al. 2019) on hand-computed
tensors, its padding rule, its gradient on a diffuse component, and where the objective weighs it."""
import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.losses import L_class_area, L_class_rank
from trainer.objectives import objective


def _one_image():
    """B = 1, C = 2, K = 3, 2×5 pixels. Class 0 (tagged) sorted: 0.9 0.7 0.5 0.3 0.2 0.1 0.1 0 0 0; class 1
    untagged, with mass that L_class_rank must ignore."""
    M = torch.zeros(1, 3, 2, 5)
    M[0, 0] = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.0], [0.5, 0.2, 0.7, 0.0, 0.1]])
    M[0, 1] = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.5], [0.0, 0.5, 0.0, 0.5, 0.0]])
    M[0, 2] = 1 - M[0, :2].sum(0)
    return M, torch.tensor([[1.0, 0.0]])


def test_L_class_rank_by_hand():
    M, y = _one_image()
    # a_min 0.2 of 10 pixels: the top 2 (0.9, 0.7) should be 1: (0.01 + 0.09) / 2 = 0.05;
    # a_max 0.5: ranks 6-10 (0.1, 0.1, 0, 0, 0) should be 0: (0.01 + 0.01) / 5 = 0.004
    assert L_class_rank(M, y, a_min=0.2, a_max=0.5).item() == pytest.approx(0.054, abs=1e-6)
    # a fraction rounds up to whole pixels: a_min 0.25 → the top 3 (0.01 + 0.09 + 0.25) / 3
    assert L_class_rank(M, y, 0.25, 0.5).item() == pytest.approx(0.35 / 3 + 0.004, abs=1e-6)
    # the untagged class never counts; tagging it adds its own two parts: its top 2 are 0.5s (0.25 each), and
    # its tail, ranks 6-10, is the five 0s after its five 0.5s (0)
    both = L_class_rank(M, torch.ones(1, 2), 0.2, 0.5).item()
    assert both == pytest.approx(0.054 + 0.25, abs=1e-6)
    # a_max 0.4: both tails start at rank 5, 6 pixels: class 0's 0.2 0.1 0.1 0 0 0, class 1's last 0.5 and five 0s
    assert L_class_rank(M, torch.ones(1, 2), 0.2, 0.4).item() == pytest.approx(
        0.05 + 0.06 / 6 + 0.25 + 0.25 / 6, abs=1e-6)


def test_a_diffuse_component_pays_where_the_mean_area_bound_does_not():
    y = torch.ones(1, 1)
    diffuse = torch.full((1, 2, 10, 10), 0.5)
    diffuse[0, 0] = 0.1  # mean area 0.1, every pixel 0.1
    committed = torch.zeros(1, 2, 10, 10)
    committed[0, 0, :1] = 1.0  # mean area 0.1, one row sure
    for M in (diffuse, committed):  # the mean-area bound cannot tell them apart
        assert L_class_area(M, y, 0.1, 0.4).item() == pytest.approx(0.0, abs=1e-7)
    assert L_class_rank(committed, y, 0.1, 0.4).item() == pytest.approx(0.0, abs=1e-7)
    assert L_class_rank(diffuse, y, 0.1, 0.4).item() == pytest.approx(0.81 + 0.01, abs=1e-6)


def test_L_class_rank_counts_only_valid_pixels():
    M, y = _one_image()
    valid = torch.zeros(1, 2, 5, dtype=torch.bool)
    valid[0, 0] = True  # the first row only: 0.9 0.3 0.1 0 0 sorted
    # a_min 0.2 of 5 → top 1 (0.9): 0.01; a_max 0.4 → ranks 3-5 (0.1, 0, 0): 0.01 / 3
    assert L_class_rank(M, y, 0.2, 0.4, valid=valid).item() == pytest.approx(0.01 + 0.01 / 3, abs=1e-6)
    assert torch.equal(L_class_rank(M, y, 0.2, 0.5, valid=torch.ones(1, 2, 5, dtype=torch.bool)),
                       L_class_rank(M, y, 0.2, 0.5))


def test_L_class_rank_gradient_lifts_only_the_top_of_a_diffuse_tagged_component():
    M = torch.full((1, 2, 1, 10), 0.5)
    M[0, 0, 0] = torch.linspace(0.3, 0.1, 10)  # a gently falling component
    M.requires_grad_(True)
    L_class_rank(M, torch.ones(1, 1), 0.2, 0.5).backward()
    grad = M.grad[0, 0, 0]
    assert (grad[:2] < 0).all()  # the top 2 pushed up, by −2(1 − v)/2
    assert torch.allclose(grad[:2], -(1 - M.detach()[0, 0, 0, :2]))
    assert torch.all(grad[2:5] == 0)  # inside the band: free
    assert (grad[5:] > 0).all()  # the tail pushed down, by 2v/5
    assert torch.allclose(grad[5:], 2 * M.detach()[0, 0, 0, 5:] / 5)
    assert torch.all(M.grad[0, 1] == 0)  # background is not bounded


def _g(images):
    p = (2 * images[:, :2].mean(dim=(2, 3))).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def test_objective_weighs_L_class_rank_by_lambda_m_and_leaves_it_out_at_weight_0():
    torch.manual_seed(0)
    I = torch.rand(2, 3, 8, 8)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = {"mask_logits": torch.randn(2, 3, 8, 8), "imagelets": torch.rand(2, 3, 3, 8, 8)}
    off = objective(out, I, y, _g, ObjectiveConfig(fill_sigma=2.0, lambda_m=0.5, class_area_min=0.1))
    assert "L_class_rank" not in off and ObjectiveConfig().class_rank_weight == 0.0
    on = objective(out, I, y, _g, ObjectiveConfig(fill_sigma=2.0, lambda_m=0.5, class_area_min=0.1,
                                                  class_rank_weight=4.0))
    M = torch.softmax(out["mask_logits"], dim=1)
    assert on["L_class_rank"].item() == pytest.approx(L_class_rank(M, y, 0.1, 0.4).item(), rel=1e-6)
    assert on["L_class_rank"].item() > 0.1
    assert on["loss"].item() == pytest.approx(off["loss"].item() + 0.5 * 4.0 * on["L_class_rank"].item(), rel=1e-5)
