"""The networks: a shared encoder (the paper's from-scratch U-Net encoder or g's pretrained EfficientNet-Lite
trunk) under two decoders, the mask head f_m (K mask logits Z) and the decomposition head f_x (K image-lets X),
and the frozen classifier g."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig
from .effnet import EfficientNetLite
from . import speedups
from .losses import gaussian_blur


class LeakyReLU(nn.Module):
    """LeakyReLU(0.01) after a convolution; in place with the speed-up `inplace_act` (its input is the fresh
    convolution output; autograd differentiates leaky_relu_ from its result). No parameters: the state_dict keys are
    those of nn.LeakyReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.01, inplace=speedups.enabled("inplace_act"))


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convs with LeakyReLU(0.01) and no normalisation layer (paper)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), LeakyReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), LeakyReLU(),
    )


class UNetEncoder(nn.Module):
    """The paper's encoder, trained from scratch: features at strides 1, 2, ..., 2**depth."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.out_channels = [width * 2 ** i for i in range(depth + 1)]
        self.levels = nn.ModuleList(
            [conv_block(3, width)] + [conv_block(self.out_channels[i - 1], self.out_channels[i])
                                      for i in range(1, depth + 1)])
        self.divisor = 2 ** depth

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.levels[0](images)]
        for level in self.levels[1:]:
            feats.append(level(F.max_pool2d(feats[-1], 2)))
        return feats


class EfficientNetEncoder(nn.Module):
    """g's pretrained trunk as the encoder: the RGB image at stride 1, then strides 2 ... 32. Frozen (and kept
    in eval mode whatever `.train()` says) unless made trainable."""

    divisor = 32

    def __init__(self, trunk: EfficientNetLite, trainable: bool = False):
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        self.trunk._fc = nn.Identity()  # the classifier head is not part of the encoder
        self.out_channels = [3, *trunk.pyramid_channels]  # the decoders' skips follow g's arch
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        self.trunk.train(self.training and trainable)

    def train(self, mode: bool = True) -> "EfficientNetEncoder":
        self.training = mode
        self.trunk.train(mode and self.trainable)
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.trainable and not images.requires_grad and speedups.enabled("frozen_no_grad"):
            with torch.no_grad():  # nothing to differentiate: no autograd records
                return [images, *self.trunk.pyramid(images)]
        return [images, *self.trunk.pyramid(images)]


class DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient as a dense tensor in the input's memory format. After
    torch.cat the gradient of each part is a channel slice of the concatenation's, strided; the bilinear
    upsampling's backward takes a slow path on such a gradient (3× on a CPU at 48 → 96 px; the speed-up
    `dense_grads`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)


class UNetDecoder(nn.Module):
    """Projects the deepest features, then per level: ×2 upsample, concatenate the skip, conv_block.
    Returns the output and the intermediate maps by stride (the low-resolution image-let head reads them)."""

    def __init__(self, enc_channels: list[int], widths: list[int], bottleneck: int, out_channels: int):
        super().__init__()
        n_up = len(enc_channels) - 1
        if len(widths) != n_up:
            raise ValueError(f"model.decoder_widths needs {n_up} entries for this encoder, got {len(widths)}")
        self.project = nn.Sequential(nn.Conv2d(enc_channels[-1], bottleneck, 1), LeakyReLU())
        c_prev, stages = bottleneck, []
        for width, skip in zip(widths, reversed(enc_channels[:-1])):
            stages.append(conv_block(c_prev + skip, width))
            c_prev = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_prev, out_channels, 1)
        self.widths = list(widths)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        x = self.project(feats[-1])
        maps, stride = {}, 2 ** (len(feats) - 1)
        for stage, skip in zip(self.stages, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            if x.requires_grad and speedups.enabled("dense_grads"):
                x = DenseGrad.apply(x)
            x = stage(torch.cat([x, skip], dim=1))
            stride //= 2
            maps[stride] = x
        return self.head(x), maps


class Segmenter(nn.Module):
    """f_m and f_x over a shared encoder. forward → {"mask_logits": Z (B×K×H×W), "imagelets": X (B×K×3×H×W)}."""

    def __init__(self, cfg: ModelConfig, num_classes: int, trunk: EfficientNetLite | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.K = cfg.K or num_classes + 1
        if self.K < num_classes + 1:
            raise ConfigError(f"model.K = {cfg.K} but the data set has C = {num_classes} classes: K must be ≥ C + 1")
        if cfg.encoder == "efficientnet":
            if cfg.encoder_init == "imagenet":  # the trunk before stage 1 (g's arch): it never saw the biased data
                from .effnet import imagenet_state_dict, load_trunk

                arch = trunk.arch if trunk is not None else "lite0"
                trunk = EfficientNetLite(arch=arch)
                load_trunk(trunk, imagenet_state_dict(arch))
            if trunk is None:
                raise ValueError("model.encoder 'efficientnet' needs g's trunk")
            self.encoder = EfficientNetEncoder(trunk, trainable=cfg.encoder_trainable)
            widths = list(cfg.decoder_widths)
        else:
            self.encoder = UNetEncoder(cfg.width, cfg.depth)
            widths = list(reversed(self.encoder.out_channels[:-1]))
        enc = self.encoder.out_channels
        bottleneck = cfg.bottleneck if cfg.encoder == "efficientnet" else enc[-1]
        self.mask_decoder = UNetDecoder(enc, widths, bottleneck, self.K)  # f_m
        self.imagelet_head = cfg.imagelet_head
        self.imagelet_stride = cfg.imagelet_stride
        self.imagelet_sigma = cfg.imagelet_sigma
        if cfg.imagelet_head == "full":  # f_x: a second decoder on the shared encoder (paper)
            self.imagelet_decoder = UNetDecoder(enc, widths, bottleneck, 3 * self.K)
        elif cfg.imagelet_head == "local_mean":  # f_x without parameters: X_k redraws region k from its own pixels
            self.imagelet_decoder = None
        else:  # f_x: 1×1 conv on the mask decoder's coarse map; low frequency so it cannot copy the image
            strides = [2 ** (len(enc) - 2 - i) for i in range(len(widths))]
            if cfg.imagelet_stride not in strides:
                raise ConfigError(f"model.imagelet_stride must be one of {strides}, got {cfg.imagelet_stride}")
            self.imagelet_decoder = nn.Conv2d(widths[strides.index(cfg.imagelet_stride)], 3 * self.K, 1)
        self.divisor = self.encoder.divisor

    def check_size(self, height: int, width: int) -> None:
        if height % self.divisor or width % self.divisor:
            raise ConfigError(f"image size {height}×{width} does not fit this encoder: both sides must be "
                             f"multiples of {self.divisor} (set data.image_size accordingly)")

    def forward(self, images: torch.Tensor, imagelets: bool = True) -> dict[str, torch.Tensor]:
        """`imagelets` False: the mask logits only (the extra passes of L_paste and L_erase read nothing else)."""
        self.check_size(*images.shape[-2:])
        feats = self.encoder(images)
        mask_logits, maps = self.mask_decoder(feats)
        if not imagelets:
            return {"mask_logits": mask_logits}
        b, _, h, w = images.shape
        if self.imagelet_head == "local_mean":
            return {"mask_logits": mask_logits,
                    "imagelets": local_mean_imagelets(torch.softmax(mask_logits, dim=1), images, self.imagelet_sigma)}
        if self.imagelet_head == "full":
            raw, _ = self.imagelet_decoder(feats)
        else:
            raw = F.interpolate(self.imagelet_decoder(maps[self.imagelet_stride]), size=images.shape[-2:],
                                mode="bilinear", align_corners=False)
        imagelets = torch.sigmoid(raw).view(b, self.K, 3, h, w)
        return {"mask_logits": mask_logits, "imagelets": imagelets}

    def predict_labels(self, mask_logits: torch.Tensor, fg_threshold: float = 0.5) -> torch.Tensor:
        """argmax_k Z → labels: background components → 0, class component c < C → c + 1. With
        fg_threshold ≠ 0.5 a pixel keeps its class label only where the foreground mass Σ_{class k} M_k exceeds
        the threshold (for K = 2, 0.5 is exactly the argmax)."""
        labels = component_to_label(mask_logits.argmax(dim=1), self.num_classes)
        if fg_threshold == 0.5:
            return labels
        M_fg = torch.softmax(mask_logits, dim=1)[:, :self.num_classes].sum(dim=1)
        best_class = mask_logits[:, :self.num_classes].argmax(dim=1) + 1
        return torch.where(M_fg > fg_threshold, best_class, torch.zeros_like(labels))


def local_mean_imagelets(M: torch.Tensor, images: torch.Tensor, sigma: float) -> torch.Tensor:
    """X_k = G_σ * (M_k ⊙ I) / G_σ * M_k: the local mean colour of component k's own pixels (ReDO's "redraw
    each region from itself", at the lowest capacity). Î = Σ_k M_k X_k then matches I only where each pixel
    sits in the component whose local colour it shares, so L_recon pulls mask edges onto colour edges (a local
    Chan-Vese energy, Lankton & Tannenbaum 2008)."""
    B, K, H, W = M.shape
    weighted = (M.unsqueeze(2) * images.unsqueeze(1)).reshape(B, K * 3, H, W)
    num = gaussian_blur(weighted, sigma).view(B, K, 3, H, W)
    den = gaussian_blur(M, sigma).unsqueeze(2)
    return (num / den.clamp_min(1e-4)).clamp(0, 1)


def component_to_label(components: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.where(components < num_classes, components + 1, torch.zeros_like(components))


class FrozenClassifier(nn.Module):
    """g in stage 2: no gradients, eval mode always (BatchNorm statistics never move), whatever `.train()`
    callers do. Gradients still flow through g to its inputs."""

    def __init__(self, net: EfficientNetLite):
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        super().train(False)
        self.net.eval()

    def train(self, mode: bool = True) -> "FrozenClassifier":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def cam(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.cam(images)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def mask_logits(model, images: torch.Tensor, flip: bool, net_out: dict | None = None,
                scales: tuple[float, ...] | list[float] = (1.0,)) -> torch.Tensor:
    """The segmenter's mask logits for prediction; with `flip` the mean of the image's and its mirror image's
    (mirrored back), the flip test-time augmentation of WSSS evaluations. `scales`: multi-scale test-time
    augmentation, the mean over the scales of the (flip-averaged) logits of the batch resized by each scale, each
    resized back to the input size (`scaled_mask_logits`); (1.0,) is the input as it is. `net_out`: the forward
    on `images` already run (used for scale 1.0)."""
    if len(scales) == 1:
        return scaled_mask_logits(model, images, flip, float(scales[0]), net_out)
    total = None
    for scale in scales:
        logits = scaled_mask_logits(model, images, flip, float(scale), net_out)
        total = logits if total is None else total + logits
    return total / len(scales)


def scaled_mask_logits(model, images: torch.Tensor, flip: bool, scale: float = 1.0,
                       net_out: dict | None = None) -> torch.Tensor:
    """The (flip-averaged) mask logits of `images` resized by `scale` (bilinear), at the input's size. The
    resized batch is padded at the bottom and right with zeros to a multiple of the encoder's divisor (as the
    evaluation loader pads), predicted, cut back to the resized extent and resized to the input's H×W."""
    if scale == 1.0:
        logits = (net_out or model(images))["mask_logits"]
        if flip:
            logits = (logits + model(images.flip(-1))["mask_logits"].flip(-1)) / 2
        return logits
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    divisor = getattr(model, "divisor", 1)
    pad_h, pad_w = -size[0] % divisor, -size[1] % divisor
    if pad_h or pad_w:
        scaled = F.pad(scaled, (0, pad_w, 0, pad_h))
    logits = scaled_mask_logits(model, scaled, flip)[..., :size[0], :size[1]]
    return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
