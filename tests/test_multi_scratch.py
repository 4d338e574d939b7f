"""Multi-class from scratch (issue 19): the per-class area bounds L_class_area on hand-computed tensors and
where the objective weighs it, the class-bias start of the mask head (`model.class_init_area`), and
`model.init_from_head: binary` (every class row of the K-way head from a binary model's foreground row)."""
import math

import pytest
import torch

from trainer.config import Config, ConfigError, ModelConfig, ObjectiveConfig, load_config
from trainer.losses import L_class_area
from trainer.models import Segmenter
from trainer.multiclass import binary_head_rows, class_bias_init
from trainer.objectives import objective
from trainer.weights import WeightsError, build_segmenter, init_from_checkpoint, save_segmenter


def _areas_case():
    """B = 2, C = 3, K = 4, 1×4 pixels; class areas (mean over the 4 pixels) written next to each row."""
    M = torch.zeros(2, 4, 1, 4)
    M[0, 0] = torch.tensor([[0.0, 0.0, 0.0, 0.04]])  # a = 0.01, tagged: 0.02 below a_min 0.03
    M[0, 1] = torch.tensor([[1.0, 1.0, 0.8, 0.0]])  # a = 0.70, tagged: 0.30 above a_max 0.4
    M[0, 2] = torch.tensor([[0.0, 0.0, 0.2, 0.2]])  # a = 0.10, untagged: pays 0.10 (absent_max 0)
    M[1, 0] = torch.tensor([[0.2, 0.2, 0.2, 0.2]])  # a = 0.20, tagged, inside the band: 0
    M[1, 1] = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # a = 0, untagged: 0
    M[1, 2] = torch.tensor([[0.1, 0.1, 0.0, 0.0]])  # a = 0.05, untagged: pays 0.05
    M[:, 3] = 1 - M[:, :3].sum(1)
    y = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return M, y


def test_L_class_area_by_hand():
    M, y = _areas_case()
    expected = ((0.02 + 0.30 + 0.10) + (0.0 + 0.0 + 0.05)) / 2
    assert L_class_area(M, y, a_min=0.03, a_max=0.4).item() == pytest.approx(expected, abs=1e-6)
    # an untagged class may keep up to absent_max before it pays: 0.10 → 0.04, 0.05 → 0
    expected_absent = ((0.02 + 0.30 + 0.04) + 0.0) / 2
    assert L_class_area(M, y, 0.03, 0.4, absent_max=0.06).item() == pytest.approx(expected_absent, abs=1e-6)


def test_L_class_area_log_floor_by_hand():
    M, y = _areas_case()
    # the tagged class 0 of image 0 (a = 0.01 < 0.03) pays log(0.03 / 0.01); the other terms are as before
    expected = ((math.log(3.0) + 0.30 + 0.10) + 0.05) / 2
    assert L_class_area(M, y, 0.03, 0.4, floor="log").item() == pytest.approx(expected, rel=1e-5)
    assert L_class_area(M, y, 0.0, 0.4, floor="log").item() == pytest.approx((0.40 + 0.05) / 2, rel=1e-5)
    # its pull on the area is 1/a = 100 per unit of a_c (the hinge's is 1): it grows as the class starves
    a = torch.tensor([[0.01]], requires_grad=True)
    L_class_area(a[:, :, None, None].expand(1, 1, 2, 2), torch.ones(1, 1), 0.03, 0.4, floor="log").backward()
    assert a.grad.item() == pytest.approx(-100.0, rel=1e-4)
    with pytest.raises(ValueError, match="class_area_floor must be hinge or log"):
        L_class_area(M, y, 0.03, 0.4, floor="square")


def test_L_class_area_counts_only_valid_pixels():
    M, y = _areas_case()
    valid = torch.tensor([[[True, True, False, False]], [[True, True, True, True]]])
    # image 0 over its first two pixels: class 0 a = 0 (0.03 below), class 1 a = 1.0 (0.6 above), class 2 a = 0
    expected = ((0.03 + 0.60 + 0.0) + 0.05) / 2
    assert L_class_area(M, y, 0.03, 0.4, valid=valid).item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(L_class_area(M, y, 0.03, 0.4, valid=None), L_class_area(M, y, 0.03, 0.4))


def test_L_class_area_gradient_pushes_a_starved_tagged_class_up():
    M, y = _areas_case()
    M = M.clone().requires_grad_(True)
    L_class_area(M, y, 0.03, 0.4).backward()
    # d/dM of relu(a_min − a) with a = mean of 4 pixels, / B = 2 images: −1/8 per pixel of image 0, class 0
    assert torch.allclose(M.grad[0, 0], torch.full((1, 4), -1 / 8))
    assert torch.allclose(M.grad[0, 1], torch.full((1, 4), 1 / 8))  # above a_max: pushed down
    assert torch.allclose(M.grad[1, 0], torch.zeros(1, 4))  # inside the band: no pull either way
    assert torch.allclose(M.grad[:, 3], torch.zeros(2, 1, 4))  # background components are not bounded


def _g(images):
    p = (2 * images[:, :2].mean(dim=(2, 3))).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def test_objective_weighs_L_class_area_by_lambda_m_and_leaves_it_out_at_weight_0():
    torch.manual_seed(0)
    I = torch.rand(2, 3, 8, 8)
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = {"mask_logits": torch.randn(2, 3, 8, 8), "imagelets": torch.rand(2, 3, 3, 8, 8)}
    off = objective(out, I, y, _g, ObjectiveConfig(fill_sigma=2.0, lambda_m=0.5))
    assert "L_class_area" not in off and ObjectiveConfig().class_area_weight == 0.0
    cfg = ObjectiveConfig(fill_sigma=2.0, lambda_m=0.5, class_area_weight=6.0, class_area_min=0.6, class_area_max=0.9)
    on = objective(out, I, y, _g, cfg)
    M = torch.softmax(out["mask_logits"], dim=1)
    assert on["L_class_area"].item() == pytest.approx(L_class_area(M, y, 0.6, 0.9).item(), rel=1e-6)
    assert on["loss"].item() == pytest.approx(off["loss"].item() + 0.5 * 6.0 * on["L_class_area"].item(), rel=1e-5)


def test_class_area_keys_are_checked():
    with pytest.raises(ConfigError, match="class_area_min"):
        load_config(None, ["objective.class_area_min=0.5", "objective.class_area_max=0.2"])
    with pytest.raises(ConfigError, match="model.class_init_area"):
        load_config(None, ["model.class_init_area=1.5"])
    with pytest.raises(ConfigError, match="model.init_from_head"):
        load_config(None, ["model.init_from_head=copy"])


# ---- the class-bias start ----

def _unet_cfg(K: int = 0, **model) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(encoder="unet", width=4, depth=2, K=K, imagelet_head="local_mean", **model)
    return cfg


def test_class_bias_init_starts_each_class_at_the_target_area():
    head = torch.nn.Conv2d(8, 6, 1)  # C = 4, K = 6: two background components
    torch.nn.init.zeros_(head.weight)
    class_bias_init(head, 4, 0.05)
    M = torch.softmax(head(torch.randn(1, 8, 3, 3)), dim=1)
    assert torch.allclose(M[0, :4], torch.full((4, 3, 3), 0.05))
    assert torch.allclose(M[0, 4:], torch.full((2, 3, 3), 0.4))  # (1 − 4·0.05) / 2
    assert head.bias.tolist() == pytest.approx([math.log(0.05)] * 4 + [math.log(0.4)] * 2)
    with pytest.raises(ValueError, match=r"class_init_area = 0.3.*\(0, 0.250\)"):
        class_bias_init(head, 4, 0.3)


def test_build_segmenter_with_class_init_area_changes_only_the_head_bias():
    torch.manual_seed(3)
    plain = build_segmenter(_unet_cfg(), 4, None)
    torch.manual_seed(3)
    biased = build_segmenter(_unet_cfg(class_init_area=0.06), 4, None)
    a, b = plain.state_dict(), biased.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["mask_decoder.head.bias"]  # no random draw spent
    torch.manual_seed(0)
    areas = torch.softmax(biased(torch.rand(4, 3, 16, 16))["mask_logits"], dim=1).mean(dim=(0, 2, 3))
    fresh = torch.softmax(plain(torch.rand(4, 3, 16, 16))["mask_logits"], dim=1).mean(dim=(0, 2, 3))
    assert torch.allclose(areas[:4], torch.full((4,), 0.06), atol=0.02)  # near the target, not 1/K = 0.2
    assert fresh[:4].sum() > 0.7 and areas[:4].sum() < 0.3  # fresh: M_fg ≈ 1 − 1/K = 0.8 at the start


# ---- init_from a binary model, head included ----

def test_binary_head_rows():
    assert binary_head_rows(4, 5, 2) == [0, 0, 0, 0, 1]
    assert binary_head_rows(2, 5, 3) == [0, 0, 1, 2, 1]  # background rows in turn
    with pytest.raises(ValueError, match="at least 2 rows"):
        binary_head_rows(2, 3, 1)


@pytest.mark.parametrize("K", [0, 7])
def test_init_from_binary_head_gives_every_class_the_binary_foreground_logits(tmp_path, K):
    torch.manual_seed(0)
    binary = build_segmenter(_unet_cfg(), 1, None)
    path = tmp_path / "segmenter.pt"
    save_segmenter(binary, Config(), ["bird"], path)
    torch.manual_seed(1)
    multi = build_segmenter(_unet_cfg(K=K), 4, None)
    report = init_from_checkpoint(multi, path, head="binary")
    assert report["skipped"] == [] and report["missing"] == []
    rows = [0] * 4 + [1] * (multi.K - 4)
    assert report["copied"] == [f"mask_decoder.head.weight rows {rows}", f"mask_decoder.head.bias rows {rows}"]
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z_binary = binary(images)["mask_logits"]
        z_multi = multi(images)["mask_logits"]
    for c in range(4):
        # step 0: each class is the binary foreground (to float rounding: a 5-row conv sums in another order)
        assert torch.allclose(z_multi[:, c], z_binary[:, 0], atol=1e-6, rtol=0), c
    for k in range(4, multi.K):
        assert torch.allclose(z_multi[:, k], z_binary[:, 1], atol=1e-6, rtol=0), k
    # so the predicted foreground is exactly the binary one (labels: some class where the binary said bird)
    assert torch.equal(multi.predict_labels(z_multi) > 0, binary.predict_labels(z_binary) > 0)


def test_init_from_binary_head_skip_keeps_the_fresh_head(tmp_path):
    torch.manual_seed(0)
    save_segmenter(build_segmenter(_unet_cfg(), 1, None), Config(), ["bird"], tmp_path / "binary.pt")
    torch.manual_seed(1)
    multi = build_segmenter(_unet_cfg(), 4, None)
    fresh = multi.mask_decoder.head.weight.detach().clone()
    report = init_from_checkpoint(multi, tmp_path / "binary.pt")
    assert "copied" not in report and len(report["skipped"]) == 2
    assert torch.equal(multi.mask_decoder.head.weight, fresh)


def test_init_from_binary_head_refuses_a_multi_class_source(tmp_path):
    save_segmenter(build_segmenter(_unet_cfg(), 2, None), Config(), ["a", "b"], tmp_path / "two.pt")
    torch.save(build_segmenter(_unet_cfg(), 1, None).state_dict(), tmp_path / "bare.pt")
    multi = build_segmenter(_unet_cfg(), 4, None)
    with pytest.raises(WeightsError, match=r"needs a binary segmenter.pt .*two.pt has 2 classes"):
        init_from_checkpoint(multi, tmp_path / "two.pt", head="binary")
    with pytest.raises(WeightsError, match="bare state_dict"):
        init_from_checkpoint(multi, tmp_path / "bare.pt", head="binary")


# ---- L_cam: g's confident CAM labels as a warm-up of the components ----

def test_confident_cam_labels_trust_peaks_and_empty_regions_only():
    from trainer.cam import confident_cam_labels

    scores = torch.tensor([[[[0.9, 0.5, 0.1, 0.3]], [[0.2, 0.7, 0.15, 0.05]]]])  # C = 2, 1×4 pixels
    # px 0: class 0 above high → 1; px 1: class 1 at 0.7 > 0.6 → 2; px 2: both below low → 0; px 3: 0.3 → ignored
    assert confident_cam_labels(scores, high=0.6, low=0.2).tolist() == [[[1, 2, 0, 255]]]


def test_cam_schedule_fades_linearly_to_zero():
    from trainer.losses import cam_schedule

    cfg = ObjectiveConfig(cam_weight=2.0, cam_steps=100)
    assert [cam_schedule(cfg, s) for s in (0, 25, 99, 100, 300)] == pytest.approx([1.0, 0.75, 0.01, 0.0, 0.0])
    assert cam_schedule(ObjectiveConfig(cam_weight=2.0), 10_000) == 1.0  # cam_steps 0: constant
    assert cam_schedule(cfg, None) == 1.0


class _CamG:
    """A g whose CAM is class 0 on the left half and class 1 on the right half of every image (maps 2×2,
    upsampled), with logits that read the mean of the first two channels."""

    def __call__(self, images):
        return images[:, :2].mean(dim=(2, 3))

    def cam(self, images):
        maps = torch.zeros(images.shape[0], 2, 1, 2)
        maps[:, 0, 0, 0] = 1.0
        maps[:, 1, 0, 1] = 1.0
        return self(images), maps


def test_objective_adds_L_cam_as_cross_entropy_to_the_confident_labels_and_it_fades():
    from trainer.losses import L_pseudo

    torch.manual_seed(0)
    out = {"mask_logits": torch.randn(2, 3, 4, 4), "imagelets": torch.rand(2, 3, 3, 4, 4)}
    I, y = torch.rand(2, 3, 4, 4), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    g = _CamG()
    base = ObjectiveConfig(preset="preserve_delete", fill_sigma=1.0)
    on = ObjectiveConfig(preset="preserve_delete", fill_sigma=1.0, cam_weight=3.0, cam_steps=10, cam_high=0.6,
                         cam_low=0.2)
    segment = lambda images: out  # noqa: E731 (the training-only terms need a mask network)
    without = objective(out, I, y, g, base, segment=segment, step=5)
    t = objective(out, I, y, g, on, segment=segment, step=5)
    # labels by hand: CAM upsampled bilinearly from 1×2 to 4×4 is (1, 0.75, 0.25, 0) across for class 0 and the
    # mirror image for class 1; image 1 is not tagged with class 1, so its class-1 CAM is 0
    labels = torch.tensor([[[1, 1, 2, 2]] * 4, [[1, 1, 255, 0]] * 4])
    assert t["L_cam"].item() == pytest.approx(L_pseudo(out["mask_logits"], labels, 2).item(), rel=1e-6)
    assert t["loss"].item() == pytest.approx((without["loss"] + 3.0 * 0.5 * t["L_cam"]).item(), rel=1e-6)
    assert "L_cam" not in without
    assert "L_cam" not in objective(out, I, y, g, on, segment=segment, step=10)  # faded out: not computed
    assert "L_cam" not in objective(out, I, y, g, on, training=False, segment=segment, step=5)


def test_cam_thresholds_are_checked():
    with pytest.raises(ConfigError, match="'objective.cam_low' ≤ 'objective.cam_high'"):
        load_config(None, ["objective.cam_low=0.7", "objective.cam_high=0.6"])
    with pytest.raises(ConfigError, match="'objective.cam_steps' is a number of training steps"):
        load_config(None, ["objective.cam_steps=-3"])
