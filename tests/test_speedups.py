"""The exact speed-ups of trainer/speedups.py: each gives the values (and gradients) of the code it replaces, up to
float rounding, and stays out of the way where it would not be exact (BatchNorm in training mode, a trainable
encoder). Timings are bench/step.py's, not asserted here."""
import copy

import pytest
import torch

from trainer import speedups
from trainer.config import ConfigError, load_config
from trainer.effnet import EfficientNetLite0, SameConv2d, mirrored, relu6
from trainer.losses import AuxPass, blur_matrix, gaussian_blur, run_batched
from trainer.models import FrozenClassifier, Segmenter
from trainer.objectives import objective
from trainer.train import AuxSegment


@pytest.fixture
def switches():
    """Set the process-wide switches inside a test; the defaults (all on) come back afterwards."""
    yield speedups.set_enabled
    speedups.set_enabled(speedups.SPEEDUPS)


def _with(switches, names, fn):
    switches(names)
    return fn()


@pytest.mark.parametrize("shape, sigma", [((2, 5, 32, 32), 8.0), ((1, 3, 20, 36), 10.0), ((2, 2, 16, 16), 1.0),
                                          ((1, 1, 8, 8), 30.0)])  # the last: radius capped by the image size
def test_blur_matmul_equals_the_padded_convolutions_values_and_gradients(switches, shape, sigma):
    x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(*shape, dtype=torch.float64)

    def blur():
        out = gaussian_blur(x, sigma)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        return out.detach(), grad

    conv_out, conv_grad = _with(switches, [], blur)
    mm_out, mm_grad = _with(switches, ["blur_matmul"], blur)
    assert torch.allclose(mm_out, conv_out, atol=1e-12) and torch.allclose(mm_grad, conv_grad, atol=1e-12)


def test_blur_matrix_by_hand_and_usable_for_backward_after_an_evaluation():
    # n = 4, radius 1: row i = kernel (a, b, a) around i, index −1 → 1 and 4 → 2 (reflect)
    A = blur_matrix(4, 1, 1.0, torch.float64, torch.device("cpu"))
    k = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    a, b = (k / k.sum())[:2].tolist()
    expected = torch.tensor([[b, 2 * a, 0, 0], [a, b, a, 0], [0, a, b, a], [0, 0, 2 * a, b]], dtype=torch.float64)
    assert torch.allclose(A, expected)
    with torch.inference_mode():  # an evaluation builds (and caches) the matrix of a new size first ...
        blur_matrix(12, 3, 1.5, torch.float32, torch.device("cpu"))
    x = torch.rand(1, 1, 12, 12, requires_grad=True)
    speedups.set_enabled(["blur_matmul"])
    try:  # ... and a training step then saves it for backward: no "inference tensor" error
        gaussian_blur(x, 1.5).sum().backward()
    finally:
        speedups.set_enabled(speedups.SPEEDUPS)
    assert x.grad is not None and x.grad.shape == x.shape


def _frozen_net(seed=0):
    torch.manual_seed(seed)
    net = EfficientNetLite0(num_classes=1)
    with torch.no_grad():  # BatchNorm statistics and affine parameters that are not the identity
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net


def test_bn_folded_and_native_pad_give_g_the_same_logits_and_input_gradients(switches):
    g = FrozenClassifier(_frozen_net())
    x = torch.rand(3, 3, 64, 64, requires_grad=True)

    def run():
        out = g(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), grad

    base_out, base_grad = _with(switches, [], run)
    for names in (["bn_folded"], ["native_pad"], ["mirror_pad"], ["bn_folded", "native_pad", "mirror_pad"]):
        out, grad = _with(switches, names, run)
        assert torch.allclose(out, base_out, rtol=1e-4, atol=1e-4), names
        assert torch.allclose(grad, base_grad, rtol=1e-3, atol=1e-6), names


def test_bn_folded_leaves_training_mode_alone_and_folds_into_parameter_gradients(switches):
    net = _frozen_net()
    net.train()  # stage 1: batch statistics, running statistics updated: no folding
    x = torch.rand(4, 3, 32, 32)
    ref = copy.deepcopy(net)
    out = _with(switches, ["bn_folded"], lambda: (torch.manual_seed(1), net(x))[1])  # the same dropout draws
    ref_out = _with(switches, [], lambda: (torch.manual_seed(1), ref(x))[1])
    assert torch.equal(out, ref_out)
    assert torch.equal(net._bn0.running_mean, ref._bn0.running_mean)
    net.eval()  # evaluation of a g that still trains: gradients reach the conv and BatchNorm parameters alike
    ref.eval()
    _with(switches, ["bn_folded"], lambda: net(x).sum().backward())
    _with(switches, [], lambda: ref(x).sum().backward())
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name


def test_native_pad_only_where_same_padding_is_symmetric(switches):
    torch.manual_seed(0)
    for kernel, stride, size in [(3, 1, 9), (5, 1, 8), (3, 2, 8), (5, 2, 9), (3, 2, 7)]:
        conv = SameConv2d(2, 3, kernel, stride=stride, bias=False)
        x = torch.rand(1, 2, size, size)
        assert torch.allclose(_with(switches, ["native_pad"], lambda: conv(x)), _with(switches, [], lambda: conv(x)),
                              atol=1e-6), (kernel, stride, size)


@pytest.mark.parametrize("kernel, stride, size", [(3, 1, 9), (5, 1, 8), (1, 1, 6), (3, 2, 8), (3, 2, 7), (5, 2, 8),
                                                  (5, 2, 9), (3, 2, 2), (5, 2, 3), (3, 2, 1)])
def test_a_mirrored_same_convolution_is_the_mirror_of_the_convolution(switches, kernel, stride, size):
    # every SAME case EfficientNet meets (odd and even sizes, stride 1 and 2, the 2 × 2 and 3 × 3 maps of 64 and
    # 96 px): conv(mirror(x)) in the mirrored domain = mirror(conv(x)), forward and gradients
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride=stride, bias=True)
    x = torch.rand(2, 2, size, size + 1, dtype=torch.float64, requires_grad=True)
    conv = conv.double()
    switches([])
    out = conv(x)
    grads = torch.autograd.grad((out * out).sum(), (x, conv.weight))
    with mirrored():
        m_out = conv(x.flip(-2, -1)).flip(-2, -1)
    m_grads = torch.autograd.grad((m_out * m_out).sum(), (x, conv.weight))
    assert m_out.shape == out.shape
    assert torch.allclose(m_out, out, atol=1e-12)
    for a, b in zip(m_grads, grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_mirror_pad_gives_the_same_cam_maps_and_stage_one_gradients(switches):
    net = _frozen_net().eval()
    x = torch.rand(2, 3, 96, 96)
    base_logits, base_maps = _with(switches, [], lambda: net.cam(x))
    logits, maps = _with(switches, ["mirror_pad"], lambda: net.cam(x))
    assert maps.shape == base_maps.shape == (2, 1, 3, 3)
    assert torch.allclose(logits, base_logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(maps, base_maps, rtol=1e-4, atol=1e-5)  # flipped back: the same cell, not its mirror
    assert not torch.allclose(base_maps, base_maps.flip(-2, -1), atol=1e-3)  # (which would be told apart)
    # stage 1: BatchNorm's batch statistics, dropout and the weight gradients are mirror-invariant too (in float64:
    # a random 16-block net in float32 amplifies rounding through batch statistics of 2 images)
    net, x = net.double().train(), x.double()
    ref = copy.deepcopy(net)
    _with(switches, ["mirror_pad"], lambda: (torch.manual_seed(1), net(x))[1].sum().backward())
    _with(switches, [], lambda: (torch.manual_seed(1), ref(x))[1].sum().backward())
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), name
    assert net._conv_stem.weight.grad.abs().max() > 0.1  # gradients that are there to compare
    assert torch.allclose(net._bn0.running_mean, ref._bn0.running_mean, atol=1e-12)


def test_inplace_relu6_under_autograd_is_exact_and_copies_nothing(switches):
    x = torch.tensor([-1.0, 0.0, 0.5, 6.0, 7.0, 3.0], requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    switches([])
    base = torch.nn.functional.relu6(x * 1.0)
    (base_grad,) = torch.autograd.grad(base, x, grad)
    switches(["inplace_act"])
    fresh = x * 1.0
    out = relu6(fresh)
    assert out.data_ptr() == fresh.data_ptr()  # in place
    (fast_grad,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, base) and torch.equal(fast_grad, base_grad)
    assert fast_grad.tolist() == [0.0, 0.0, 3.0, 0.0, 0.0, 6.0]  # hardtanh's rule: 0 at x ≤ 0 and x ≥ 6


def _segmenter(trainable=False):
    cfg = load_config("configs/toy_birds.yaml", [f"model.encoder_trainable={str(trainable).lower()}"])
    torch.manual_seed(0)
    net = _frozen_net()
    return cfg, Segmenter(cfg.model, 1, trunk=net), FrozenClassifier(net)


def test_masks_only_forward_and_frozen_no_grad_give_the_same_mask_logits(switches):
    _, model, _ = _segmenter()
    model.train()
    images = torch.rand(2, 3, 64, 64)
    full = _with(switches, [], lambda: model(images))
    masks = _with(switches, ["frozen_no_grad"], lambda: model(images, imagelets=False))
    assert set(masks) == {"mask_logits"} and torch.equal(masks["mask_logits"], full["mask_logits"])
    feats = _with(switches, ["frozen_no_grad"], lambda: model.encoder(images))
    assert not any(f.requires_grad for f in feats[1:])  # no autograd records for a frozen encoder
    trainable = _segmenter(trainable=True)[1]
    assert all(f.requires_grad for f in _with(switches, ["frozen_no_grad"], lambda: trainable.encoder(images))[1:])


class CountingEngine(torch.nn.Module):
    """The engine's role for AuxSegment: forwards to the model, counting calls and batch sizes."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, []

    def forward(self, images, **kwargs):
        self.calls.append(len(images))
        return self.module(images, **kwargs)


def _step_terms(model, g, cfg, names, switches, images, labels):
    switches(names)
    model.zero_grad()
    engine = CountingEngine(model)
    terms = objective(engine(images), images, labels, g, cfg.objective, segment=AuxSegment(engine), step=300)
    terms["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return {k: v.item() for k, v in terms.items()}, grads, engine.calls


def test_aux_passes_share_one_forward_with_the_same_terms_and_gradients(switches):
    cfg, model, g = _segmenter()
    model.train()
    images, labels = torch.rand(6, 3, 64, 64), torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [1.0]])
    assert cfg.objective.paste_weight > 0 and cfg.objective.erase_weight > 0  # the default has both passes
    base, base_grads, base_calls = _step_terms(model, g, cfg, [], switches, images, labels)
    terms, grads, calls = _step_terms(model, g, cfg, ["aux_batched", "aux_masks_only"], switches, images, labels)
    assert base_calls == [6, 4, 4] and calls == [6, 8]  # the paste and erase passes (4 positives each): one forward
    assert set(terms) == set(base) and "L_paste" in terms and "L_erase" in terms
    for name, value in base.items():
        assert terms[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert len(grads) == len(base_grads) > 0
    for a, b in zip(grads, base_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_aux_passes_stay_apart_when_batchnorm_trains(switches):
    cfg, model, g = _segmenter(trainable=True)  # a trainable encoder: BatchNorm uses each batch's statistics
    model.train()
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    _, _, calls = _step_terms(model, g, cfg, list(speedups.SPEEDUPS), switches, images, labels)
    assert calls == [4, 2, 2]
    sizes = []  # the model itself as `segment` (no AuxSegment): read from its modules too
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(len(args[0])), with_kwargs=True)
    switches(list(speedups.SPEEDUPS))
    objective(model(images), images, labels, g, cfg.objective, segment=model, step=300)
    assert sizes == [4, 2, 2]


def test_dense_grads_hands_the_upsampling_a_dense_gradient_of_the_same_values(switches):
    from trainer.models import DenseGrad

    x = torch.rand(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    seen = []
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    part = DenseGrad.apply(up)
    part.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=torch.channels_last)))
    up.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=torch.channels_last)))
    both = torch.cat([part, torch.rand(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)], dim=1)
    weights = torch.rand_like(both)
    (both * weights).sum().backward()
    # after the cat the part's gradient is a strided channel slice; DenseGrad's backward makes it dense
    assert seen == [False, True]
    expected = torch.autograd.grad(
        (torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
         * weights[:, :4]).sum(), x)[0]
    assert torch.allclose(x.grad, expected, atol=1e-6)
    _assert_same_decoder_grads(switches, "dense_grads", rtol=1e-4, atol=1e-7)


def test_inplace_act_gives_the_same_values_and_gradients_in_training_and_eval(switches):
    net = _frozen_net()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    for mode in (True, False):  # stage 1 (BatchNorm on batch statistics) and g in stage 2 (eval, folded)
        net.train(mode)

        def run():
            net.zero_grad()
            torch.manual_seed(3)  # the same dropout draws
            out = net(x)
            (grad,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
            out.sum().backward()
            return out.detach(), grad, [p.grad.clone() for p in net.parameters()]

        base = _with(switches, ["bn_folded"], run)
        fast = _with(switches, ["bn_folded", "inplace_act"], run)
        assert torch.allclose(fast[0], base[0], atol=1e-6) and torch.allclose(fast[1], base[1], atol=1e-7)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast[2], base[2]))
    _assert_same_decoder_grads(switches, "inplace_act", rtol=1e-5, atol=1e-8)


def _assert_same_decoder_grads(switches, name: str, rtol: float, atol: float) -> None:
    """The mask decoder's parameter gradients of one loss on a tiny segmenter, with speed-up `name` alone and
    without any."""
    _, model, _ = _segmenter()
    images = torch.rand(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(images, imagelets=False)["mask_logits"].square().mean().backward()
        return [p.grad.clone() for p in model.mask_decoder.parameters()]

    fast, base = _with(switches, [name], grads), _with(switches, [], grads)
    assert len(fast) == len(base) > 0
    for a, b in zip(fast, base):
        assert torch.allclose(a, b, rtol=rtol, atol=atol)


def test_run_batched_splits_the_logits_back_to_each_pass():
    seen = []

    def segment(images):
        seen.append(images.shape[0])
        return {"mask_logits": images[:, :1] * 2}

    a, b = torch.ones(2, 3, 4, 4), torch.full((3, 3, 4, 4), 5.0)
    out = run_batched([AuxPass(a, lambda z: z.mean()), AuxPass(b, lambda z: z.sum())], segment)
    assert seen == [5] and out[0].item() == 2.0 and out[1].item() == 10.0 * 3 * 16


def test_unknown_speedup_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"train.speedups.*'warp'.*blur_matmul"):
        load_config("configs/toy_birds.yaml", ["train.speedups=[warp]"])
    assert load_config("configs/toy_birds.yaml").train.speedups == list(speedups.SPEEDUPS)
