"""Process set-up shared by both training stages: distributed init (a single plain process gets world size 1),
seeding and RNG state, run folders, atomic writes, the DeepSpeed config and engine, the resumable batch stream
and all-reduced metrics."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from .config import Config, ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Rank and world size. A plain `python -m trainer` run becomes a world of one on 127.0.0.1; under the
    `deepspeed` launcher or torchrun the environment is already set. gloo on CPU, NCCL on GPU. A collective
    that waits longer than `timeout_s` (a peer died) raises instead of hanging."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
    import deepspeed

    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states (saved per rank in every checkpoint)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or "default"
    path = Path(cfg.train.out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name then rename, so a half-written file is never visible under `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_resolved_config(cfg: Config, directory: Path) -> Path:
    path = directory / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    return path


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


def git_revision() -> dict[str, str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": "unknown", "git_dirty": "unknown"}
    return {"git_revision": rev or "unknown", "git_dirty": str(bool(dirty)).lower()}


def deepspeed_config_path(name: str) -> Path:
    """`train.deepspeed`: a JSON path (relative to the working directory or the repository), or the short
    names zero0 ... zero3 for configs/deepspeed/zeroN.json."""
    path = Path(name)
    if path.suffix != ".json" and len(path.parts) == 1:
        path = Path("configs/deepspeed") / f"{name}.json"
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
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


def epoch_batches(cfg: Config, batch_size: int) -> int:
    """Training micro-batches per epoch on this rank (the loader's own count, equal on every rank)."""
    from data_shards.loader import make_loader

    return len(make_loader(cfg.data.url, "train", image_size=cfg.data.image_size, batch_size=batch_size,
                           train=True, num_workers=cfg.data.num_workers))


def resumable_batches(cfg: Config, seed: int, batch_size: int, samples_seen: int = 0) -> Iterator[dict]:
    """The training stream of this rank, positioned after `samples_seen` images (all ranks together): it starts
    at the right epoch and skips the batches already used in it, so a resumed run sees the same data as an
    uninterrupted one (with the same world size; with another one, the same number of images per epoch)."""
    from .data import train_batches

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    consumed = samples_seen // (batch_size * world)
    epoch, skip = divmod(consumed, epoch_batches(cfg, batch_size))
    stream = train_batches(cfg, seed=seed, batch_size=batch_size, start_epoch=epoch)
    for _ in range(skip):
        next(stream)
    return stream


def all_reduce_mean(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The mean over all ranks of each value, in one collective (every rank must call it)."""
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
    return dict(zip(keys, flat.tolist()))



@dataclass
class LoopState:
    """Where a training loop stands; saved in every checkpoint's client_state."""
    step: int = 0  # optimizer steps done
    samples: int = 0  # training images consumed by all ranks together: the data position
    history: list = field(default_factory=list)  # all-reduced mean loss of every step


class StepMeter:
    """End-of-step bookkeeping of both training loops: advances the LoopState (step, data position, loss
    history) and returns the step's metrics as means over all ranks, with images/s per rank and in total."""

    def __init__(self, state: LoopState, images_per_step: int, world: int, prefix: str):
        self.state, self.images_per_step, self.world, self.prefix = state, images_per_step, world, prefix
        self.start, self.images = time.time(), 0

    def step(self, sums: dict[str, float]) -> dict[str, float]:
        self.images += self.images_per_step
        self.state.step += 1
        self.state.samples += self.images_per_step * self.world
        values = {f"{self.prefix}/{name}": value for name, value in sums.items()}
        values[f"{self.prefix}/images_per_s_rank"] = self.images / (time.time() - self.start)
        record = all_reduce_mean(values)  # every rank, every step: the logged numbers are means over ranks
        record[f"{self.prefix}/images_per_s"] = record[f"{self.prefix}/images_per_s_rank"] * self.world
        self.state.history.append(record[f"{self.prefix}/loss"])
        return record


def start_stage(cfg: Config) -> tuple[int, int, Path]:
    """Common start of both training stages: distributed init, threads, the same seed on every rank (same
    initial weights), the run folder with the resolved config written by rank 0. Returns rank, world, folder."""
    rank, world = init_distributed(cfg.train.dist_timeout_s)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    out = run_dir(cfg)
    if rank == 0:
        save_resolved_config(cfg, out)
    return rank, world, out
