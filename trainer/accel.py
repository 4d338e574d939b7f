"""Speed switches of the training steps and of inference, each measured in bench/step.py: channels-last memory
for the networks and their inputs (`train.channels_last`), `torch.compile` in place (`train.compile`, module
keys unchanged so checkpoints and segmenter.pt stay the same). bf16 (`train.bf16`) stays DeepSpeed's
torch_autocast of the engine's forward: autocast over the whole step, g included, made a CPU step take minutes
(bf16 kernels without a fast path on CPUs without AMX)."""
from __future__ import annotations

import torch

from data_shards.loader import as_float

from . import speedups
from .config import Config


def prepare_modules(cfg: Config, *modules: torch.nn.Module, zero_stage: int = 0) -> None:
    """Put `modules` in the configured memory format and compile them in place. Call it after the DeepSpeed
    engine is built (its start-up broadcast views each parameter as bytes, which needs contiguous memory); under
    ZeRO 1-3 the parameters are views of flat partitions and keep their layout (the inputs still change)."""
    speedups.configure(cfg)  # the exact speed-ups (trainer/speedups.py), process-wide
    for module in modules:
        if cfg.train.channels_last and zero_stage == 0:  # off: the modules are left exactly as they are
            module.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            module.compile(dynamic=False)


def prepare_images(images: torch.Tensor, cfg: Config, device: torch.device | str | None = None) -> torch.Tensor:
    """A batch on the engine's `device` (a uint8 batch is moved first and made float there: a quarter of the
    bytes over PCIe) in the configured memory format (a no-op on the CPU and when it already is)."""
    if device is not None and images.device != torch.device(device):
        images = images.to(device, non_blocking=True)
    images = as_float(images)
    if not cfg.train.channels_last or images.dim() != 4:
        return images  # off: the batch is left exactly as it is (a contiguous copy would change the arithmetic)
    return images.contiguous(memory_format=torch.channels_last)
