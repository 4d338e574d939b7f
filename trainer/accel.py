"""Speed switches of the training steps and of inference, each measured in bench/step.py: channels-last memory
for the networks and their inputs (`train.channels_last`), `torch.compile` in place (`train.compile`, module
keys unchanged so checkpoints and segmenter.pt stay the same), and bf16 autocast over the whole step, g
included (`train.bf16`; DeepSpeed's torch_autocast alone covers only the engine's forward)."""
from __future__ import annotations

import contextlib

import torch

from .config import Config


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def prepare_modules(cfg: Config, *modules: torch.nn.Module, zero_stage: int = 0) -> None:
    """Put `modules` in the configured memory format and compile them in place. Call it after the DeepSpeed
    engine is built (its start-up broadcast views each parameter as bytes, which needs contiguous memory); under
    ZeRO 1-3 the parameters are views of flat partitions and keep their layout (the inputs still change)."""
    for module in modules:
        if zero_stage == 0:
            module.to(memory_format=memory_format(cfg))
        if cfg.train.compile:
            module.compile(dynamic=False)


def prepare_images(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """A batch in the configured memory format (a no-op when it already is)."""
    return images.contiguous(memory_format=memory_format(cfg)) if images.dim() == 4 else images


def autocast(cfg: Config, device: torch.device | str = "cpu"):
    """bf16 autocast over a training step when `train.bf16` is on, else nothing."""
    if not cfg.train.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
