"""Flip test-time augmentation of the method's mask logits (`eval.flip`, trainer/models.mask_logits)."""
import torch

from trainer.models import mask_logits


class LeftBiased(torch.nn.Module):
    """Foreground logit = pixel brightness + 1 on the left half of the input: a mask network that is not
    mirror-symmetric, so the flip average differs from the plain output in a computable way."""

    def forward(self, images):
        fg = images.mean(dim=1).clone()
        fg[..., : images.shape[-1] // 2] += 1.0
        return {"mask_logits": torch.stack([fg, torch.zeros_like(fg)], dim=1)}


def test_flip_averages_the_mirrored_prediction_back_in_place():
    images = torch.rand(2, 3, 4, 6)
    model = LeftBiased()
    plain = mask_logits(model, images, flip=False)
    assert torch.equal(plain, model(images)["mask_logits"])
    flipped = mask_logits(model, images, flip=True)
    # brightness term is mirror-equivariant (kept as is); the +1 of the left half becomes +0.5 everywhere
    expected_fg = images.mean(dim=1) + 0.5
    assert torch.allclose(flipped[:, 0], expected_fg, atol=1e-6)
    assert torch.equal(flipped[:, 1], torch.zeros_like(flipped[:, 1]))
    # a forward the caller already ran is reused, not recomputed
    reused = mask_logits(model, images, flip=False, net_out={"mask_logits": torch.ones(2, 2, 4, 6)})
    assert torch.equal(reused, torch.ones(2, 2, 4, 6))
