"""Process set-up shared by both training stages: distributed init (a single plain process gets world size 1),
seeding, run folders, atomic writes and the DeepSpeed engine."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Rank and world size. A plain `python -m trainer` run becomes a world of one on 127.0.0.1; under the
    `deepspeed` launcher or torchrun the environment is already set."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def deepspeed_config(cfg: Config, micro_batch: int) -> dict[str, Any]:
    """The experiment's DeepSpeed JSON with the micro-batch taken from the data config."""
    path = Path(cfg.train.deepspeed)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {cfg.train.deepspeed} does not exist (train.deepspeed)")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def make_engine(model: torch.nn.Module, lr: float, ds_config: dict[str, Any], weight_decay: float = 0.0):
    """deepspeed.initialize with torch's Adam over the trainable parameters (no extension build)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer
