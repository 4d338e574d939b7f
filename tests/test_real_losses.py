"""The losses honour batch["valid"] of random-scale crops (issue 20): L_recon, the area priors, TV, the
background swap (L_paste), erase (L_erase), the negative bags and the CAM pseudo-label cross-entropy count only
pixels that are image, so the padding's content changes no loss; all-valid gives the same numbers as no
`valid`, and no `valid` (the toy sets) is computed exactly as before."""
import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.losses import (L_absent, L_area, L_erase, L_mask, L_negative, L_paste, L_pseudo, L_recon, L_tv, bce,
                            fill_image, gaussian_blur, mask_lets)
from trainer.objectives import objective

B, K, H, W = 3, 3, 10, 12


def _valid() -> torch.Tensor:
    """Image 0: the top-left 6 × 8 is image; image 1: all of it; image 2: the left 5 columns."""
    valid = torch.ones(B, H, W, dtype=torch.bool)
    valid[0, 6:], valid[0, :, 8:], valid[2, :, 5:] = False, False, False
    return valid


def _scramble(x: torch.Tensor, valid: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """x with every padded pixel (valid False) replaced by other values; x is B×H×W, B×N×H×W or B×K×3×H×W."""
    v = valid
    while v.dim() < x.dim():
        v = v.unsqueeze(1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * 3 - 1
    return torch.where(v.expand_as(x), x, noise.to(x.dtype))


def pointwise_segment(images: torch.Tensor) -> dict:
    """A mask network without spatial context (each pixel's logits from its own colour), so padding content cannot
    reach a valid pixel through a receptive field."""
    r, g, b = images.unbind(1)
    return {"mask_logits": torch.stack([4 * r - 2 * g, b - 0.5, torch.zeros_like(r)], dim=1)}


def test_no_valid_is_the_plain_mean_bit_for_bit():
    torch.manual_seed(0)
    I, I_hat = torch.rand(B, 3, H, W), torch.rand(B, 3, H, W)
    M = torch.softmax(torch.randn(B, K, H, W), dim=1)
    M_fg = M[:, 0]
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert torch.equal(L_recon(I_hat, I), ((I_hat - I) ** 2).mean())
    assert torch.equal(L_area(M_fg), M_fg.mean())
    dv, dh = (M_fg[:, 1:] - M_fg[:, :-1]).abs(), (M_fg[:, :, 1:] - M_fg[:, :, :-1]).abs()
    assert torch.equal(L_tv(M_fg), dv.mean() + dh.mean())
    a = M.mean(dim=(2, 3))
    expected_mask = (bce(a[:, :2], y).sum(1) + bce(a[:, 2:].sum(1), torch.ones(B))).mean()
    assert torch.equal(L_mask(M, y), expected_mask)
    assert torch.equal(fill_image(I, ObjectiveConfig()), gaussian_blur(I, 10.0))


def test_hand_computed_valid_means():
    M_fg = torch.tensor([[[0.2, 0.9, 0.4], [0.6, 0.1, 0.8]]])
    valid = torch.tensor([[[True, True, False], [True, True, False]]])
    assert L_area(M_fg, valid).item() == pytest.approx((0.2 + 0.9 + 0.6 + 0.1) / 4)
    # TV: only pairs of two valid pixels: vertical |0.6-0.2|, |0.1-0.9|; horizontal |0.9-0.2|, |0.1-0.6|
    assert L_tv(M_fg, valid=valid).item() == pytest.approx((0.4 + 0.8) / 2 + (0.7 + 0.5) / 2)
    I = torch.zeros(1, 3, 2, 3)
    I_hat = torch.full((1, 3, 2, 3), 0.5)
    I_hat[..., 2] = 9.0  # a huge error in the padding counts nowhere
    assert L_recon(I_hat, I, valid).item() == pytest.approx(0.25)
    y = torch.tensor([[0.0]])
    assert L_negative(M_fg, y, valid).item() == pytest.approx(
        float(-torch.log(1 - torch.tensor([0.2, 0.9, 0.6, 0.1])).mean()), rel=1e-5)
    # CAM pseudo-labels: the padded pixels are ignored by the cross-entropy
    Z = torch.randn(1, 2, 2, 3)
    labels = torch.tensor([[[1, 0, 1], [0, 1, 0]]])
    target = torch.tensor([0, 1, 1, 0])  # label 1 → component 0, label 0 → background component 1
    picked = Z[0].permute(1, 2, 0)[valid[0]]
    assert L_pseudo(Z, labels, 1, valid).item() == pytest.approx(
        float(torch.nn.functional.cross_entropy(picked, target)), rel=1e-6)


def test_padding_content_changes_no_pixel_loss():
    torch.manual_seed(1)
    valid = _valid()
    I, I_hat = torch.rand(B, 3, H, W), torch.rand(B, 3, H, W)
    M = torch.softmax(torch.randn(B, K, H, W), dim=1)
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    M2 = torch.where(valid.unsqueeze(1), M, torch.softmax(_scramble(torch.log(M), valid), dim=1))
    I2, I_hat2 = _scramble(I, valid), _scramble(I_hat, valid, seed=8)
    assert not torch.equal(M, M2) and not torch.equal(I, I2)
    pairs = [(L_recon(I_hat, I, valid), L_recon(I_hat2, I2, valid)),
             (L_area(M[:, 0], valid), L_area(M2[:, 0], valid)),
             (L_tv(M[:, 0], I, 2.0, valid), L_tv(M2[:, 0], I2, 2.0, valid)),
             (L_mask(M, y, 0.0, valid), L_mask(M2, y, 0.0, valid)),
             (L_absent(M, y, valid), L_absent(M2, y, valid)),
             (L_negative(M[:, 0], y, valid), L_negative(M2[:, 0], y, valid))]
    for before, after in pairs:
        assert torch.equal(before, after)
    # the fill is blurred from valid pixels only: the padding's values never reach it
    fill, fill2 = fill_image(I, ObjectiveConfig(fill_sigma=2.0), valid), fill_image(I2, ObjectiveConfig(fill_sigma=2.0),
                                                                                    valid)
    assert torch.allclose(fill, fill2, atol=1e-6)
    # and the padding would have changed each of them
    assert not torch.equal(L_recon(I_hat, I), L_recon(I_hat2, I2))
    assert not torch.equal(L_tv(M[:, 0]), L_tv(M2[:, 0]))


def test_paste_and_erase_ignore_the_padding():
    torch.manual_seed(2)
    valid = _valid()
    y = torch.tensor([[1.0], [0.0], [1.0]])  # positives 0 and 2 pasted on the negative 1
    I = torch.rand(B, 3, H, W)
    M_fg = torch.rand(B, H, W)
    M_fg[0, 7:, 9:] = 1.0  # a confident "object" inside image 0's padding: erasing it would dilate into the image
    fill = torch.rand(B, 3, H, W)
    I2, M_fg2, fill2 = _scramble(I, valid), _scramble(M_fg, valid).clamp(0, 1), _scramble(fill, valid, seed=9)
    paste = L_paste(pointwise_segment, I, y, M_fg, 1, valid)
    assert torch.equal(paste, L_paste(pointwise_segment, I2, y, M_fg2, 1, valid))
    erase = L_erase(pointwise_segment, None, I, y, M_fg, fill, 1, 2, valid)
    assert torch.equal(erase, L_erase(pointwise_segment, None, I2, y, M_fg2, fill2, 1, 2, valid))
    # all valid = no valid (the toy sets' numbers)
    everywhere = torch.ones(B, H, W, dtype=torch.bool)
    assert torch.allclose(L_paste(pointwise_segment, I, y, M_fg, 1, everywhere),
                          L_paste(pointwise_segment, I, y, M_fg, 1))
    assert torch.allclose(L_erase(pointwise_segment, None, I, y, M_fg, fill, 1, 2, everywhere),
                          L_erase(pointwise_segment, None, I, y, M_fg, fill, 1, 2))
    # by hand for the paste: positive 0 on negative 1, positive 2 on negative 1; pixels image in both count
    src = M_fg * valid
    losses, counts = [], []
    for p in (0, 2):
        composite = src[p] * I[p] + (1 - src[p]) * I[1]
        M_new = mask_lets(pointwise_segment(composite[None])["mask_logits"])[0, 0]
        both = valid[p] & valid[1]
        losses.append(bce(M_new, (src[p] > 0.5).float())[both].sum())
        counts.append(both.sum())
    assert paste.item() == pytest.approx(float(sum(losses) / sum(counts)), rel=1e-6)


def _objective_inputs(seed: int = 3):
    torch.manual_seed(seed)
    out = {"mask_logits": torch.randn(B, K - 1, H, W), "imagelets": torch.rand(B, K - 1, 3, H, W)}
    return out, torch.rand(B, 3, H, W), torch.tensor([[1.0], [0.0], [1.0]])


def mean_colour_g(images: torch.Tensor) -> torch.Tensor:
    """A classifier whose logit is a function of the mean colour of the whole image (padding included)."""
    return (5 * images[:, 0].mean(dim=(1, 2)) - 4 * images[:, 1].mean(dim=(1, 2)) - 0.5)[:, None]


CFG = ObjectiveConfig(paste_weight=1.0, erase_weight=1.0, erase_gate=False, negative_weight=0.5, fill_sigma=2.0,
                      edge_aware_tv=1.0)


def test_objective_ignores_what_the_network_says_in_the_padding():
    """preserve_delete with every pixel term on: mask logits and image-lets scrambled in the padding change no term,
    L_preserve and L_delete included (g sees the padding as the loader gave it, whatever the mask says there)."""
    valid = _valid()
    out, I, y = _objective_inputs()
    scrambled = {"mask_logits": _scramble(out["mask_logits"], valid), "imagelets": _scramble(out["imagelets"], valid)}
    before = objective(out, I, y, mean_colour_g, CFG, segment=pointwise_segment, valid=valid)
    after = objective(scrambled, I, y, mean_colour_g, CFG, segment=pointwise_segment, valid=valid)
    assert set(before) == {"L_preserve", "L_delete", "L_area", "L_tv", "L_recon", "L_negative", "L_paste", "L_erase",
                           "loss"}
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-6, atol=1e-7), name
    # the image's own padding content reaches g only (L_preserve, L_delete): every other term stays
    moved = objective(out, _scramble(I, valid), y, mean_colour_g, CFG, segment=pointwise_segment, valid=valid)
    for name in ("L_area", "L_tv", "L_recon", "L_negative", "L_paste", "L_erase"):
        assert torch.allclose(before[name], moved[name], rtol=1e-6, atol=1e-7), name
    paper = ObjectiveConfig(preset="paper")  # its pixel terms too (L_cls sees M ⊙ X through g, padding and all)
    a = objective(out, I, y, mean_colour_g, paper, valid=valid)
    b = objective(scrambled, I, y, mean_colour_g, paper, valid=valid)
    assert torch.equal(a["L_recon"], b["L_recon"]) and torch.allclose(a["L_mask"], b["L_mask"], rtol=1e-6)


def test_objective_all_valid_equals_no_valid():
    out, I, y = _objective_inputs(4)
    everywhere = torch.ones(B, H, W, dtype=torch.bool)
    for cfg in (CFG, ObjectiveConfig(), ObjectiveConfig(preset="paper")):
        plain = objective(out, I, y, mean_colour_g, cfg, segment=pointwise_segment)
        masked = objective(out, I, y, mean_colour_g, cfg, segment=pointwise_segment, valid=everywhere)
        assert plain.keys() == masked.keys()
        for name in plain:
            assert torch.allclose(plain[name], masked[name], rtol=1e-5, atol=1e-6), (cfg.preset, name)


def test_train_step_hands_the_batch_valid_to_the_objective():
    """trainer/train.py's step passes batch["valid"] on: the loss it backpropagates is the valid-aware one."""
    from trainer.config import Config
    from trainer.train import train_step

    valid = _valid()
    out, I, y = _objective_inputs(5)
    net = torch.nn.Conv2d(3, K - 1, 1)

    class Engine:
        device = torch.device("cpu")  # a DeepSpeed engine's device, where train_step puts the batch

        def __call__(self, images, imagelets=True):  # Segmenter.forward's switch (the aux passes ask for masks only)
            return {"mask_logits": net(images), "imagelets": out["imagelets"]} if imagelets else {
                "mask_logits": net(images)}

        def backward(self, loss):
            self.loss = loss

        def step(self):
            pass

    cfg = Config()
    cfg.objective = CFG
    engine = Engine()
    sums = train_step(engine, mean_colour_g, cfg, iter([{"image": I, "labels": y, "valid": valid}]), 1, 0)
    expected = objective(engine(I), I, y, mean_colour_g, CFG, segment=engine, step=0, valid=valid)
    unmasked = objective(engine(I), I, y, mean_colour_g, CFG, segment=engine, step=0)
    assert sums["L_recon"] == pytest.approx(expected["L_recon"].item(), rel=1e-6)
    assert sums["L_recon"] != pytest.approx(unmasked["L_recon"].item(), rel=1e-3)
    assert engine.loss.item() == pytest.approx(expected["loss"].item(), rel=1e-6)
