"""Stage-1 colour augmentation (trainer/classifier.colour_augment): grayscale or permuted channels, drawn
deterministically, never a no-op permutation, never touching pixel positions."""
import pytest
import torch

from trainer.classifier import colour_augment
from trainer.config import ConfigError, load_config


def _images(n=64):
    torch.manual_seed(0)
    return torch.rand(n, 3, 5, 7)


def _kinds(images, out):
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    same = (out == images).flatten(1).all(dim=1)
    return gray, same


def test_off_returns_the_batch_unchanged():
    images = _images()
    assert colour_augment(images, 0.0, 0.0, 1) is images


def test_grayscale_is_the_luma_of_each_pixel():
    images = _images(4)
    out = colour_augment(images, 1.0, 0.0, 1)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c], luma)


def test_channel_shuffle_permutes_channels_and_never_keeps_rgb():
    images = _images()
    out = colour_augment(images, 0.0, 1.0, 1)
    for i in range(images.shape[0]):
        perm = [next(j for j in range(3) if torch.equal(out[i, c], images[i, j])) for c in range(3)]
        assert sorted(perm) == [0, 1, 2] and perm != [0, 1, 2]


def test_shares_follow_the_probabilities_and_repeat_with_the_seed():
    images = _images(2000)
    out = colour_augment(images, 0.3, 0.5, 7)
    gray, same = _kinds(images, out)
    shuffled = ~gray & ~same
    assert gray.float().mean().item() == pytest.approx(0.3, abs=0.04)
    assert shuffled.float().mean().item() == pytest.approx(0.7 * 0.5, abs=0.04)
    again = colour_augment(images, 0.3, 0.5, 7)
    assert torch.equal(out, again)


def test_probabilities_outside_0_1_are_config_errors():
    with pytest.raises(ConfigError, match="classifier.grayscale_p"):
        load_config(None, ["classifier.grayscale_p=1.5"])
