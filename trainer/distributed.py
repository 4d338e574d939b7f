"""The process side of a training run: distributed init (a plain process becomes a world of one that listens
on no port but loopback),
threads, seeding and RNG state, and means over ranks."""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Rank and world size. A plain `python -m trainer` run becomes a world of one on 127.0.0.1; under the
    `deepspeed` launcher or torchrun the environment is already set. gloo on CPU, NCCL on GPU. A collective
    that waits longer than `timeout_s` (a peer died) raises instead of hanging."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
        for name in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):  # gloo's and tensorpipe's sockets on loopback
            os.environ.setdefault(name, "lo")
    import deepspeed

    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if alone:  # an in-memory store: env:// would start a TCPStore listening on every interface
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 timeout=timedelta(seconds=timeout_s))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
        release_shm_name(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shm_buffer_path(rank: int) -> Path:
    """The POSIX shared-memory file of DeepSpeed's CPU all-reduce for `rank` of this world (ops/csrc/cpu/comm/shm.cpp:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_name(rank: int, world: int) -> None:
    """DeepSpeed 0.19's CPU all-reduce, when every rank is on one machine (the launcher's LOCAL_SIZE equals the world
    size), creates a 67 MB shared-memory buffer per rank (`shm_buffer_path`) and never unlinks it: every launcher
    run left 67 MB of RAM per rank in /dev/shm after it ended (240 files, 16 GB of 24, on the development machine
    after a day of test runs). Each rank opens every other rank's buffer before
    `deepspeed.init_distributed` returns; after a barrier each rank unlinks its own name, so the memory stays mapped
    while the processes live and the kernel frees it when the last one exits, however it exits."""
    if os.environ.get("DS_ACCELERATOR") != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    torch.distributed.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)


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
