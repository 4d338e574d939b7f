"""The DeepSpeed side of a training run: the experiment's DeepSpeed config (micro-batch, accumulation, bf16
autocast), the engine with torch's Adam, and the ZeRO-3 patch that shares the fp32 master with the weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, find_config


def deepspeed_config_path(name: str) -> Path:
    """`train.deepspeed`: a JSON path (relative to the working directory, else among the packaged configs), or
    the short names zero0 ... zero3 for configs/deepspeed/zeroN.json."""
    path = Path(name)
    if path.suffix != ".json" and len(path.parts) == 1:
        path = Path("configs/deepspeed") / f"{name}.json"
    path = find_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {name} does not exist (train.deepspeed: a JSON file, or one "
                                "of zero0, zero1, zero2, zero3)")
    return path


def deepspeed_config(cfg: Config, micro_batch: int) -> dict[str, Any]:
    """The experiment's DeepSpeed JSON with the micro-batch from the data config and the `train.bf16` and
    `train.grad_accum` options applied. The global batch is micro-batch × accumulation × world size.

    bf16 is DeepSpeed's torch autocast: bf16 compute and gradient communication, fp32 weights and optimizer
    state. DeepSpeed's own "bf16"/"fp16" sections (half-precision weights) are refused: the frozen g and the
    pretrained trunk's input normalisation run in fp32 next to the engine, and mixed weights fail there."""
    path = deepspeed_config_path(cfg.train.deepspeed)
    ds = json.loads(path.read_text())
    for section in ("bf16", "fp16"):
        if ds.get(section, {}).get("enabled"):
            raise ConfigError(f"DeepSpeed config {path} enables {section!r} (half-precision weights), which this "
                              "trainer does not support: remove it and set train.bf16=true (bf16 autocast with "
                              "fp32 weights)")
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)
    if cfg.train.grad_accum > 0:
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds.setdefault("gradient_accumulation_steps", 1)
    if cfg.train.bf16:
        ds["torch_autocast"] = {**ds.get("torch_autocast", {}), "enabled": True, "dtype": "bfloat16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def make_engine(model: torch.nn.Module, lr: float, ds_config: dict[str, Any], weight_decay: float = 0.0,
                zero3_shared_master: bool = True):
    """deepspeed.initialize with torch's Adam over the trainable parameters (no extension build). Under
    ZeRO-3 with fp32 weights the master copy is shared with the weight partition (`share_zero3_master`)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if zero3_shared_master:
        freed = share_zero3_master(engine.optimizer)
        if freed and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(f"ZeRO-3: fp32 master weights shared with the weight partitions ({freed / 2 ** 20:.1f} MiB "
                  "freed per rank)")
    return engine, optimizer


def share_zero3_master(optimizer) -> int:
    """Drop ZeRO-3's second fp32 copy of the weights; returns the bytes freed on this rank.

    DeepSpeed's stage-3 optimizer keeps an fp32 "master" partition per sub-group next to the weight
    partition that the module's parameters live in. When the weights are fp32 on the optimizer's device the
    two are the same numbers, and `_create_fp32_partitions` (deepspeed/runtime/zero/stage3.py) means to reuse
    the partition ("we don't need another copy of the weights"), but it compares `tensor.device` with a
    device *string*, which a `torch.device` never equals, so 0.19.8 always clones: 4 more bytes per
    parameter and rank. Here each such master is replaced by the partition itself, with its Adam state moved
    over: the step then updates the partition in place and DeepSpeed's copy master → partition becomes a copy
    onto itself, the same arithmetic (a test compares both runs bitwise). Left alone: offloaded optimizers,
    NVMe swapping, and half-precision weights (their master must be a separate fp32 tensor)."""
    low_flats = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not low_flats or not masters or getattr(optimizer, "offload_optimizer", False) \
            or getattr(optimizer, "params_in_nvme_and_cpu", False):
        return 0
    inner, freed = optimizer.optimizer, 0
    for i, (low, master) in enumerate(zip(low_flats, masters)):
        if (low is master or low.dtype != master.dtype or low.device != master.device
                or low.shape != master.shape or not torch.equal(low, master)):
            continue
        low.ds_id = master.ds_id
        if master in inner.state:
            inner.state[low] = inner.state.pop(master)
        for group in inner.param_groups:
            group["params"] = [low if p is master else p for p in group["params"]]
        masters[i] = low
        freed += master.numel() * master.element_size()
    return freed
