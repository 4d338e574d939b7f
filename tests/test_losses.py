"""Every loss term against values computed by hand on tiny tensors."""
import math
from dataclasses import replace

import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.losses import (L_area, L_binary, L_cls, L_delete, L_delete_tagged, L_erase, L_mask, L_negative,
                            L_paste, L_preserve, L_recon, L_tv, cls_targets, deleted, erase_schedule, erased,
                            foreground, gaussian_blur, mask_lets, preserved, reconstruction)
from trainer.objectives import objective


def _logit(p):
    return math.log(p / (1 - p))


def test_reconstruction_is_sum_of_masklets_times_imagelets():
    M = torch.tensor([[[[0.25]], [[0.75]]]])  # B=1, K=2, 1×1
    X = torch.tensor([[[[[1.0]], [[0.0]], [[0.5]]], [[[0.0]], [[1.0]], [[0.5]]]]])  # B, K, 3, 1, 1
    I_hat = reconstruction(M, X)
    assert I_hat.shape == (1, 3, 1, 1)
    assert torch.allclose(I_hat.flatten(), torch.tensor([0.25, 0.75, 0.5]))


def test_L_recon_is_mean_squared_error():
    I_hat = torch.tensor([[[[0.0, 1.0]]]])
    I = torch.tensor([[[[0.5, 0.5]]]])
    assert L_recon(I_hat, I).item() == pytest.approx(0.25)


def test_L_mask_by_hand():
    # K = 2 (class 0, one background component), 2×1 pixels, two images: y = [1], [0]
    M = torch.tensor([[[[0.5], [0.3]], [[0.5], [0.7]]],  # a = [0.4, 0.6]
                      [[[0.1], [0.1]], [[0.9], [0.9]]]])  # a = [0.1, 0.9]
    y = torch.tensor([[1.0], [0.0]])
    img1 = -math.log(0.4) - math.log(0.6)  # class present → push area 0.4 up; background area 0.6 → 1
    img2 = -math.log(0.9) - math.log(0.9)  # class absent: BCE(0.1, 0); background 0.9 → 1
    assert L_mask(M, y).item() == pytest.approx((img1 + img2) / 2, rel=1e-5)


def test_L_mask_sums_background_components():
    # K = 3: class 0 and two background components whose areas add up
    M = torch.tensor([[[[0.2]], [[0.5]], [[0.3]]]])
    y = torch.tensor([[0.0]])
    expected = -math.log(0.8) - math.log(0.8)
    assert L_mask(M, y).item() == pytest.approx(expected, rel=1e-5)


def test_cls_targets_one_hot_for_present_classes_zero_for_background():
    y = torch.tensor([[1.0, 0.0, 1.0]])
    t = cls_targets(y, K=5)
    expected = torch.zeros(1, 5, 3)
    expected[0, 0, 0] = 1
    expected[0, 2, 2] = 1
    assert torch.equal(t, expected)


def test_L_cls_by_hand_with_a_classifier_that_reads_mean_intensity():
    # g(img) = logit of its mean → for M_k ⊙ V_k the "probability" is the masked mean
    def g(images):
        p = images.mean(dim=(1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p)).unsqueeze(1)

    M = torch.tensor([[[[0.8]], [[0.2]]]])
    V = torch.ones(1, 2, 3, 1, 1)
    y = torch.tensor([[1.0]])
    # component 0: p = 0.8, target 1; background component 1: p = 0.2, target 0
    expected = (-math.log(0.8) - math.log(0.8)) / 2
    assert L_cls(g, M, V, y).item() == pytest.approx(expected, rel=1e-4)


def test_mask_sampling_modes():
    Z = torch.tensor([[[[2.0, -1.0]], [[0.0, 0.0]]]], requires_grad=True)
    soft = mask_lets(Z, "soft")
    assert torch.allclose(soft.sum(1), torch.ones(1, 1, 2))
    hard = mask_lets(Z, "straight_through")
    assert torch.equal(hard.detach(), torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]))
    hard[:, 0].sum().backward()
    assert Z.grad.abs().sum() > 0  # straight-through: gradient of the softmax
    gumbel = mask_lets(Z, "gumbel")
    assert set(gumbel.detach().unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="mask_sampling"):
        mask_lets(Z, "nope")


def test_preserved_and_deleted_by_hand():
    M_fg = torch.tensor([[[1.0, 0.25]]])
    I = torch.tensor([[[[1.0, 1.0]]]])
    F = torch.tensor([[[[0.0, 0.0]]]])
    assert torch.allclose(preserved(M_fg, I, F), torch.tensor([[[[1.0, 0.25]]]]))
    assert torch.allclose(deleted(M_fg, I, F), torch.tensor([[[[0.0, 0.75]]]]))


def test_preserve_delete_classifier_terms():
    def g(images):  # constant logit log(3) → p = 0.75
        return torch.full((images.shape[0], 1), math.log(3.0))

    P = torch.zeros(2, 3, 4, 4)
    y = torch.tensor([[1.0], [0.0]])
    assert L_preserve(g, P, y).item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-5)
    assert L_delete(g, P).item() == pytest.approx(-math.log(0.25), rel=1e-5)


def test_L_delete_tagged_ignores_untagged_rows():
    # row 0 tagged (keep target 1), row 1 untagged: only row 0's BCE(σ(log 3) = 0.75, 0) counts
    logits = torch.tensor([[math.log(3.0)], [5.0]])
    keep, delete = torch.tensor([[1.0], [0.0]]), torch.zeros(2, 1)
    assert L_delete_tagged(logits, keep, delete).item() == pytest.approx(-math.log(0.25), rel=1e-5)
    # the plain L_delete averages both rows (row 1: BCE(σ(5), 0) = softplus(5))
    both = (-math.log(0.25) + math.log1p(math.exp(5.0))) / 2
    assert L_delete(lambda _: logits, None, delete).item() == pytest.approx(both, rel=1e-5)
    # no tagged row: 0, and still differentiable
    logits.requires_grad_(True)
    none = L_delete_tagged(logits, torch.zeros(2, 1), delete)
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 1))


def _tiny_batch():
    """Network outputs, images and tags of one positive and one negative image, and a g that reads the
    mean intensity."""
    torch.manual_seed(0)
    out = {"mask_logits": torch.randn(2, 2, 8, 8), "imagelets": torch.rand(2, 2, 3, 8, 8)}
    I, y = torch.rand(2, 3, 8, 8), torch.tensor([[1.0], [0.0]])

    def g(images):
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)

    return out, I, y, g


def test_objective_without_delete_on_untagged_images():
    out, I, y, g = _tiny_batch()

    on = objective(out, I, y, g, ObjectiveConfig(delete_untagged=True))
    off = objective(out, I, y, g, ObjectiveConfig(delete_untagged=False))
    M_fg = foreground(mask_lets(out["mask_logits"]), 1)
    D0 = deleted(M_fg[:1], I[:1], gaussian_blur(I[:1], 10.0))
    assert off["L_delete"].item() == pytest.approx(L_delete(g, D0).item(), rel=1e-6)  # the positive alone
    assert on["L_delete"].item() != pytest.approx(off["L_delete"].item(), rel=1e-3)
    for term in ("L_preserve", "L_area", "L_tv", "L_recon"):
        assert off[term].item() == on[term].item()


def test_area_and_tv_by_hand():
    M_fg = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert L_area(M_fg).item() == pytest.approx(0.5)
    # vertical differences: 0, 0 → mean 0; horizontal: 1, 1 → mean 1
    assert L_tv(M_fg).item() == pytest.approx(1.0)
    # edge-aware: an image edge exactly where the mask changes lowers the cost by exp(-s·|ΔI|)
    I = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]] * 3]).reshape(1, 3, 2, 2)
    assert L_tv(M_fg, I, edge_aware=2.0).item() == pytest.approx(math.exp(-2.0), rel=1e-5)


def test_foreground_sums_class_components_only():
    M = torch.tensor([[[[0.2]], [[0.3]], [[0.5]]]])  # C = 2 classes, 1 background component
    assert foreground(M, 2).item() == pytest.approx(0.5)


def test_gaussian_blur_keeps_constants_and_smooths_edges():
    const = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, 2.0), const, atol=1e-6)
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1
    blurred = gaussian_blur(step, 2.0)
    assert 0.3 < blurred[0, 0, 0, 8].item() < 0.7
    assert blurred.sum().item() == pytest.approx(step.sum().item(), rel=0.02)


def test_L_paste_targets_the_hardened_source_mask_on_negative_backgrounds():
    I = torch.rand(2, 3, 4, 4)
    y = torch.tensor([[1.0], [0.0]])
    M_fg = torch.zeros(2, 4, 4)
    M_fg[0, :2] = 0.9  # the positive image's mask: top half
    seen = {}

    def segment(images):
        seen["images"] = images
        logits = torch.zeros(images.shape[0], 2, 4, 4)  # p = 0.5 everywhere
        return {"mask_logits": logits}

    value = L_paste(segment, I, y, M_fg, num_classes=1)
    assert value.item() == pytest.approx(math.log(2), rel=1e-5)  # BCE(0.5, t) = log 2 for any t
    composite = seen["images"][0]
    assert torch.allclose(composite[:, 2:], I[1, :, 2:])  # bottom: the negative image
    assert torch.allclose(composite[:, :2], 0.9 * I[0, :, :2] + 0.1 * I[1, :, :2])
    # no negatives in the batch → 0
    assert L_paste(segment, I, torch.ones(2, 1), M_fg, 1).item() == 0.0
    assert seen["images"].shape[0] == 1  # the zero-weighted forward still ran (equal forwards per rank)


def test_erased_fills_the_hardened_dilated_mask():
    I, fill = torch.rand(1, 3, 7, 7), torch.full((1, 3, 7, 7), -1.0)
    M_fg = torch.zeros(1, 7, 7)
    M_fg[0, 3, 3] = 0.9
    M_fg[0, 0, 6] = 0.4  # below 0.5: kept
    E = erased(M_fg, I, fill, dilate=1)
    gone = (E == -1.0).all(dim=1)[0]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[2:5, 2:5] = True  # one pixel grown by 1 in every direction
    assert torch.equal(gone, expected)
    assert torch.equal(E[0][:, ~expected], I[0][:, ~expected])
    assert torch.equal(erased(M_fg, I, fill, dilate=0)[0, :, 3, 3], fill[0, :, 3, 3])


def test_L_erase_counts_only_positives_that_g_reads_as_empty():
    I, fill = torch.rand(3, 3, 4, 4), torch.zeros(3, 3, 4, 4)
    y = torch.tensor([[1.0], [0.0], [1.0]])
    M_fg = torch.zeros(3, 4, 4)
    seen = {}

    def segment(images):
        seen["images"] = images
        logits = torch.zeros(2, 2, 4, 4)
        logits[0, 0] = _logit(0.2) / 2  # softmax over 2 components: p_fg = σ(z0 − z1) = 0.2
        logits[0, 1] = -_logit(0.2) / 2
        logits[1, 0], logits[1, 1] = _logit(0.7) / 2, -_logit(0.7) / 2
        return {"mask_logits": logits[:images.shape[0]]}

    def g_says(values):
        return lambda images: torch.tensor(values).unsqueeze(1)

    # g reads the first erased positive as empty, the second still as a bird: only the first counts
    value = L_erase(segment, g_says([-3.0, 3.0]), I, y, M_fg, fill, num_classes=1, dilate=0)
    assert value.item() == pytest.approx(-math.log(0.8), rel=1e-5)
    assert seen["images"].shape[0] == 2 and torch.equal(seen["images"][1], I[2])  # positives only
    both = L_erase(segment, g_says([-3.0, -3.0]), I, y, M_fg, fill, num_classes=1, dilate=0)
    assert both.item() == pytest.approx((-math.log(0.8) - math.log(0.3)) / 2, rel=1e-5)
    assert L_erase(segment, g_says([3.0, 3.0]), I, y, M_fg, fill, 1, 0).item() == 0.0
    ungated = L_erase(segment, None, I, y, M_fg, fill, num_classes=1, dilate=0)  # erase_gate: false
    assert ungated.item() == pytest.approx(both.item(), rel=1e-6)
    # no positive in the batch → 0, after one zero-weighted forward (equal forwards per rank)
    assert L_erase(segment, g_says([]), I, torch.zeros(3, 1), M_fg, fill, 1, 0).item() == 0.0
    assert seen["images"].shape[0] == 1


def test_objective_totals_are_weighted_sums_of_their_terms():
    out, I, y, g = _tiny_batch()

    paper = ObjectiveConfig(preset="paper", lambda_m=0.1, lambda_c=0.01)
    t = objective(out, I, y, g, paper)
    assert t["loss"].item() == pytest.approx((t["L_recon"] + 0.1 * t["L_mask"] + 0.01 * t["L_cls"]).item())
    pd = ObjectiveConfig(preset="preserve_delete", lambda_m=2.0, lambda_c=3.0, area_weight=8, tv_weight=0.5,
                         recon_weight=10)
    t = objective(out, I, y, g, pd)
    expected = (3.0 * (t["L_preserve"] + t["L_delete"]) + 2.0 * (8 * t["L_area"] + 0.5 * t["L_tv"])
                + 10 * t["L_recon"])
    assert t["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    def segment(images):
        return {"mask_logits": torch.zeros(images.shape[0], 2, 8, 8)}

    with_erase = replace(pd, erase_weight=0.25)
    t = objective(out, I, y, lambda images: -torch.ones(images.shape[0], 1), with_erase, segment=segment)
    assert t["L_erase"].item() == pytest.approx(math.log(2), rel=1e-5)
    rest = 3.0 * (t["L_preserve"] + t["L_delete"]) + 2.0 * (8 * t["L_area"] + 0.5 * t["L_tv"]) + 10 * t["L_recon"]
    assert t["loss"].item() == pytest.approx((rest + 0.25 * t["L_erase"]).item(), rel=1e-6)
    assert "L_erase" not in objective(out, I, y, g, with_erase, training=False, segment=segment)


def test_L_negative_is_pixel_bce_to_zero_on_untagged_images_only():
    # image 0 tagged (its mask does not count), images 1 and 2 untagged: mask 0.5 everywhere / 0.9 on 1 of 4 px
    M_fg = torch.tensor([[[0.9, 0.9], [0.9, 0.9]], [[0.5, 0.5], [0.5, 0.5]], [[0.9, 0.0], [0.0, 0.0]]])
    y = torch.tensor([[1.0], [0.0], [0.0]])
    expected = (4 * -math.log(0.5) + -math.log(0.1)) / 8
    assert L_negative(M_fg, y).item() == pytest.approx(expected, rel=1e-4)
    # two classes: untagged means no class at all; an image with any tag is not a negative bag
    y2 = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    assert L_negative(M_fg, y2).item() == pytest.approx(-math.log(0.5), rel=1e-4)
    none = L_negative(M_fg.requires_grad_(), torch.ones(3, 1))
    assert none.item() == 0.0 and none.requires_grad  # no negative in the batch: 0 with a graph


def _assert_objective_adds(term: str, weight_field: str, weight: float) -> None:
    """Off by default; with `weight_field` = weight the term is present and adds λ_m · weight · term."""
    out, I, y, g = _tiny_batch()
    base = ObjectiveConfig(preset="preserve_delete", lambda_m=0.5)
    without = objective(out, I, y, g, base)
    t = objective(out, I, y, g, replace(base, **{weight_field: weight}))
    assert term not in without and t[term].item() > 0
    assert t["loss"].item() == pytest.approx((without["loss"] + 0.5 * weight * t[term]).item(), rel=1e-6)


def test_objective_adds_L_negative_with_lambda_m():
    _assert_objective_adds("L_negative", "negative_weight", 4.0)


def test_L_binary_by_hand_and_in_the_objective():
    # 4·mean(M(1 − M)): hard pixels cost 0, a 0.5 pixel 1, a 0.25 pixel 0.75
    M_fg = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    assert L_binary(M_fg).item() == pytest.approx((0 + 0 + 1.0 + 0.75) / 4)
    valid = torch.tensor([[[True, True], [False, True]]])  # the 0.5 pixel is padding
    assert L_binary(M_fg, valid).item() == pytest.approx(0.75 / 3)
    _assert_objective_adds("L_binary", "binary_weight", 2.0)


def test_erase_schedule_waits_then_ramps_linearly():
    cfg = ObjectiveConfig(erase_start=20, erase_ramp=4)
    assert [erase_schedule(cfg, s) for s in (0, 19, 20, 21, 22, 23, 24, 500)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    start5 = ObjectiveConfig(erase_start=5)
    assert erase_schedule(start5, 4) == 0 and erase_schedule(start5, 5) == 1
    assert erase_schedule(ObjectiveConfig(), 0) == 1  # defaults: on from the first step, as before the schedule
    assert erase_schedule(cfg, None) == 1  # outside a training loop


def test_area_schedule_holds_then_relaxes_linearly_and_weighs_L_area():
    from trainer.losses import area_schedule

    cfg = ObjectiveConfig(area_weight=8.0, area_relax_start=20, area_relax_ramp=4, area_relax_weight=4.0)
    assert [area_schedule(cfg, s) for s in (0, 19, 20, 21, 23, 24, 900)] == [8, 8, 7, 6, 4, 4, 4]
    assert area_schedule(cfg, None) == 8  # outside a training loop: the configured weight
    assert area_schedule(ObjectiveConfig(area_weight=8.0), 10_000) == 8  # area_relax_start 0: never relaxes
    at_once = ObjectiveConfig(area_weight=8.0, area_relax_start=5, area_relax_weight=2.0)
    assert (area_schedule(at_once, 4), area_schedule(at_once, 5)) == (8, 2)
    out, I, y, g = _tiny_batch()
    early = objective(out, I, y, g, cfg, training=False, step=0)
    late = objective(out, I, y, g, cfg, training=False, step=100)  # λ_m = 1: the loss moves by (4 − 8)·L_area
    assert late["loss"].item() == pytest.approx((early["loss"] - 4.0 * early["L_area"]).item(), rel=1e-6)


def test_objective_scales_L_erase_by_its_schedule():
    out, I, y, _ = _tiny_batch()

    def segment(images):
        return {"mask_logits": torch.zeros(images.shape[0], 2, 8, 8)}

    def g(images):
        return -torch.ones(images.shape[0], 1)

    cfg = ObjectiveConfig(preset="preserve_delete", erase_weight=2.0, erase_start=10, erase_ramp=4)
    before = objective(out, I, y, g, cfg, segment=segment, step=9)
    assert "L_erase" not in before  # not even computed: no mask-network pass before the start
    for step, factor in ((10, 0.25), (12, 0.75), (300, 1.0)):
        t = objective(out, I, y, g, cfg, segment=segment, step=step)
        assert t["L_erase"].item() == pytest.approx(math.log(2), rel=1e-5)
        assert t["loss"].item() == pytest.approx((before["loss"] + 2.0 * factor * t["L_erase"]).item(), rel=1e-6)


def test_L_pseudo_maps_labels_to_components():
    from trainer.losses import L_pseudo

    Z = torch.tensor([[[[math.log(3.0)]], [[0.0]]]])  # component 0 (class): p = 0.75
    assert L_pseudo(Z, torch.tensor([[[1]]]), 1).item() == pytest.approx(-math.log(0.75), rel=1e-5)
    assert L_pseudo(Z, torch.tensor([[[0]]]), 1).item() == pytest.approx(-math.log(0.25), rel=1e-5)


def test_cam_pseudo_labels_come_from_tag_gated_cam():
    from trainer.cam import cam_labels, cam_scores

    class FakeG:
        def cam(self, images):
            maps = torch.zeros(images.shape[0], 1, 2, 2)
            maps[:, 0, 0, 0] = 4.0
            maps[:, 0, 1, 1] = -1.0
            return torch.full((images.shape[0], 1), -5.0), maps  # g itself says "absent"

    images = torch.zeros(2, 3, 2, 2)
    by_g = cam_scores(FakeG(), images)
    assert by_g.sum() == 0  # gated by g's prediction
    by_tag = cam_scores(FakeG(), images, tags=torch.tensor([[1.0], [0.0]]))
    assert by_tag[0, 0, 0, 0] == pytest.approx(1.0) and by_tag[0, 0, 1, 1] == 0 and by_tag[1].sum() == 0
    assert cam_labels(by_tag, 0.5).tolist() == [[[1, 0], [0, 0]], [[0, 0], [0, 0]]]


def test_L_erase_with_two_classes_targets_every_class_component():
    I, fill = torch.rand(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a positive of each class
    M_fg = torch.zeros(2, 4, 4)

    def segment(images):  # K = 3: two classes and one background component, 1/3 each
        return {"mask_logits": torch.zeros(images.shape[0], 3, 4, 4)}

    value = L_erase(segment, None, I, y, M_fg, fill, num_classes=2, dilate=1)
    assert value.item() == pytest.approx(-math.log(2 / 3), rel=1e-5)  # BCE(1/3, 0) on both class components
    g = lambda images: torch.tensor([[-2.0, -2.0], [-2.0, 1.0]])  # the second still reads as class 1
    assert L_erase(segment, g, I, y, M_fg, fill, 2, 1).item() == pytest.approx(-math.log(2 / 3), rel=1e-5)
