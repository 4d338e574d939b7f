"""The binary case (C = 1) must compute exactly what it did before the multi-class extension (issue 7): every
objective's terms and the gradient reaching the mask logits, on fixed tensors, against numbers pinned from
the code at commit 8f84aec (before any multi-class change)."""
import pytest
import torch

from trainer import speedups
from trainer.config import ObjectiveConfig
from trainer.objectives import objective
from trainer.models import component_to_label


class TinyG:
    """A fixed, differentiable stand-in for g with C outputs: a linear read-out of channel means and of the
    mean of a centre-weighted map, so masks and fills change its logits."""

    def __init__(self, C: int):
        gen = torch.Generator().manual_seed(123)
        self.w = torch.randn(C, 4, generator=gen)
        self.b = torch.randn(C, generator=gen) * 0.1

    def __call__(self, images):
        feats = torch.cat([images.mean(dim=(2, 3)), (images[:, :, 2:-2, 2:-2] ** 2).mean(dim=(1, 2, 3))[:, None]], 1)
        return 3.0 * feats @ self.w.T + self.b

    def cam(self, images):
        maps = torch.einsum("bchw,kc->bkhw", images, self.w[:, :3]) - 1.0
        return self(images), maps


def segment_fn(K: int):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(K, 3, generator=gen)

    def segment(images):
        return {"mask_logits": 4.0 * torch.einsum("bchw,kc->bkhw", images, w)}

    return segment


def binary_case(K: int, cfg: ObjectiveConfig) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    B, H = 4, 12
    I = torch.rand(B, 3, H, H, generator=gen)
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    Z = (torch.randn(B, K, H, H, generator=gen) * 2).requires_grad_(True)
    X = torch.rand(B, K, 3, H, H, generator=gen)
    torch.manual_seed(0)  # gumbel sampling
    terms = objective({"mask_logits": Z, "imagelets": X}, I, y, TinyG(1), cfg, segment=segment_fn(K))
    terms["loss"].backward()
    values = {k: float(v.detach()) for k, v in terms.items()}
    values["grad_abs_sum"] = float(Z.grad.abs().sum())
    return values


CASES = {
    "paper-K2": (2, dict(preset="paper", lambda_m=1e-3, lambda_c=1e-3)),
    "paper-image-K3": (3, dict(preset="paper", cls_input="image", lambda_m=0.5, lambda_c=2.0, area_target=0.1)),
    "paper-st-K2": (2, dict(preset="paper", mask_sampling="straight_through")),
    "pd-default-K2": (2, dict(preset="preserve_delete", paste_weight=1.0)),
    "pd-K3-edge-shuffle": (3, dict(preset="preserve_delete", paste_weight=0.5, edge_aware_tv=3.0, fill="shuffle",
                                   fill_sigma=2.0, lambda_m=2.0, lambda_c=0.5)),
    "cam_pseudo-K2": (2, dict(preset="cam_pseudo", cam_threshold=0.3)),
}

# computed with this file's __main__ on the code at commit 8f84aec (before the multi-class change)
PINNED = {
    'cam_pseudo-K2': {
        'L_pseudo': 1.2487101554870605,
        'loss': 1.2487101554870605,
        'grad_abs_sum': 0.9948009252548218,
    },
    'paper-K2': {
        'L_recon': 0.14676125347614288,
        'L_mask': 1.4046257734298706,
        'L_cls': 0.5955824255943298,
        'loss': 0.14876146614551544,
        'grad_abs_sum': 0.03379358351230621,
    },
    'paper-image-K3': {
        'L_recon': 0.13563154637813568,
        'L_mask': 1.1671757698059082,
        'L_cls': 0.5902625918388367,
        'loss': 1.8997446298599243,
        'grad_abs_sum': 0.19374914467334747,
    },
    'paper-st-K2': {
        'L_recon': 0.1672147661447525,
        'L_mask': 1.3772833347320557,
        'L_cls': 0.5862575173377991,
        'loss': 2.130755662918091,
        'grad_abs_sum': 0.5547299981117249,
    },
    'pd-K3-edge-shuffle': {
        'L_preserve': 0.7864761352539062,
        'L_delete': 0.3365207314491272,
        'L_area': 0.33240464329719543,
        'L_tv': 0.28305843472480774,
        'L_recon': 0.13563154637813568,
        'loss': 8.090178489685059,
        'L_paste': 1.141662836074829,
        'grad_abs_sum': 3.8545031547546387,
    },
    'pd-default-K2': {
        'L_preserve': 0.7876414060592651,
        'L_delete': 0.3453023135662079,
        'L_area': 0.4974004328250885,
        'L_tv': 0.7838337421417236,
        'L_recon': 0.14676125347614288,
        'loss': 9.371193885803223,
        'L_paste': 2.399517059326172,
        'grad_abs_sum': 1.9811333417892456,
    },
}


@pytest.fixture
def no_speedups():
    """The exact speed-ups (trainer/speedups.py) off: the operations of the pinned code, in its order."""
    speedups.set_enabled([])
    yield
    speedups.set_enabled(speedups.SPEEDUPS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_binary_objective_values_unchanged(name, no_speedups):
    K, kwargs = CASES[name]
    got = binary_case(K, ObjectiveConfig(**kwargs))
    want = PINNED[name]
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():  # bitwise: same operations in the same order as before
        assert got[key] == value, (name, key, got[key] - value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_binary_objective_values_with_the_speedups_equal_up_to_rounding(name):
    """With every speed-up on (the default) the same values up to float rounding: the blur as matrix products sums
    the same terms in another order (L_delete of pd-default-K2 moves by 3e-8)."""
    K, kwargs = CASES[name]
    got = binary_case(K, ObjectiveConfig(**kwargs))
    for key, value in PINNED[name].items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)


def test_binary_label_mapping_unchanged():
    components = torch.tensor([[0, 1, 2, 1, 0]])
    assert component_to_label(components, 1).tolist() == [[1, 0, 0, 0, 1]]


if __name__ == "__main__":  # prints the numbers to pin
    for name in sorted(CASES):
        K, kwargs = CASES[name]
        print(f"    {name!r}: {binary_case(K, ObjectiveConfig(**kwargs))!r},")
