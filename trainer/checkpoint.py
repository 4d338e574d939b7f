"""Training checkpoints through DeepSpeed, resumable after a crash. Every rank writes its ZeRO shard under
`<dir>/stepNNNNNNN/`; once all ranks have returned, rank 0 writes `complete.json` into that folder and points
`<dir>/latest` at it, so a half-written checkpoint is never resumed from. The newest `keep_last` are kept. At the
end of training the shards are gathered into one plain fp32 state_dict.

`complete.json` lists every file of the checkpoint with its size and SHA-256; a resume checks them before it
trusts the folder (a torn or damaged file makes `train.resume=auto` fall back to the previous intact
checkpoint). DeepSpeed's loaders unpickle with `torch.load(weights_only=False)`; ours run them with
`weights_only=True` and an allowlist of the few plain classes DeepSpeed stores, so a checkpoint folder cannot
run code."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .distributed import rng_state, seed_everything, set_rng_state
from .files import atomic_write_bytes, write_json
from .loop import LoopState

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
_TAG = re.compile(r"^step(\d{7,})$")
_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank optimizer shard files


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted or loaded; the message names the file and the way out."""


def tag(step: int) -> str:
    return f"step{step:07d}"


def files_of_rank(folder: Path, rank: int) -> list[Path]:
    """The entries of checkpoint `folder` that rank `rank` wrote: its own ZeRO shard files; rank 0 also
    everything that is not a per-rank shard (model states, complete.json)."""
    picked = []
    for path in sorted(folder.iterdir()):
        match = _RANK_FILE.match(path.name)
        if (match and int(match.group(1)) == rank) or (not match and rank == 0):
            picked.append(path)
    return picked


@dataclass
class CheckpointInfo:
    """What `complete.json` records about a checkpoint: enough to decide whether this run can load it."""
    path: Path
    step: int
    world_size: int
    zero_stage: int
    bf16: bool  # for the record: bf16 autocast keeps fp32 weights, so it does not change what loads
    universal: bool = False  # made by DeepSpeed's ds_to_universal: loads into any world size
    files: dict[str, dict[str, Any]] | None = field(default=None, repr=False)  # name → size, sha256; None: older

    @property
    def world_size_free(self) -> bool:
        """Stage-0 optimizer state is not partitioned, so any world size can load it."""
        return self.universal or self.zero_stage == 0


def read_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint in folder `path`, or None when it is not complete (no marker, or a torn one)."""
    try:
        data = json.loads((path / COMPLETE).read_text())
        files = data.get("files")
        return CheckpointInfo(path=path, step=int(data["step"]), world_size=int(data["world_size"]),
                              zero_stage=int(data["zero_stage"]), bf16=bool(data["bf16"]),
                              files=None if files is None else {str(k): dict(v) for k, v in files.items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in checkpoint `folder` (what `complete.json` records)."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE}


def damage(info: CheckpointInfo) -> str | None:
    """Why the files of `info` differ from what its complete.json recorded (naming the file), or None when they
    match. A marker written before file lists existed is trusted as it is."""
    if info.files is None:
        return None
    for name, expected in sorted(info.files.items()):
        path = info.path / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{path} has {size} bytes, {expected.get('size')} were written (truncated or replaced)"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{path} does not match the SHA-256 recorded when it was written (damaged or replaced)"
    return None


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(message)


def complete_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [read_info(p) for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted((info for info in found if info is not None), key=lambda info: info.step)


def find_resume(directory: Path, resume: str) -> CheckpointInfo | None:
    """`train.resume`: "auto" → the newest complete checkpoint in `directory` (None: start fresh); "never" →
    start fresh, refusing to mix a new run into a folder that already holds one; else a checkpoint folder."""
    if resume in ("auto", ""):
        done = complete_checkpoints(directory)
        for info in reversed(done):
            problem = damage(info)
            if problem is None:
                return info
            _warn(f"checkpoint {info.path} is marked complete but {problem}; "
                  "falling back to the previous complete checkpoint")
        if done:
            _warn(f"no intact checkpoint left in {directory}; train.resume=auto starts this stage afresh")
        return None
    if resume == "never":
        done = complete_checkpoints(directory)
        if done:
            raise ConfigError(f"{directory} already holds checkpoints (newest: step {done[-1].step}) and "
                                  "train.resume=never: use another train.run_name or train.out_dir, or "
                                  "train.resume=auto to continue that run")
        return None
    path = Path(resume)
    if (path / "zero").is_dir() and not (path / COMPLETE).is_file():
        return CheckpointInfo(path=path, step=-1, world_size=-1, zero_stage=-1, bf16=False, universal=True)
    info = read_info(path)
    if info is None:
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint folder (expected "
                                f"{path / COMPLETE}, written once every rank has saved its part)")
    problem = damage(info)
    if problem is not None:
        raise CheckpointError(f"train.resume={resume}: {problem}; resume from another checkpoint (or "
                              "train.resume=auto, which falls back to the newest intact one)")
    return info


def check_compatible(info: CheckpointInfo, world_size: int, zero_stage: int) -> None:
    """Fail before loading, with the way out, when this run cannot load `info` as it is."""
    if info.universal:
        return
    if info.zero_stage != zero_stage:
        raise ConfigError(f"checkpoint {info.path} was written with ZeRO stage {info.zero_stage}; this run uses "
                          f"stage {zero_stage}. Use the same train.deepspeed, or convert it. " + conversion_hint(info))
    if info.world_size != world_size and not info.world_size_free:
        raise ConfigError(f"checkpoint {info.path} was written by {info.world_size} processes with ZeRO stage "
                          f"{info.zero_stage}, whose optimizer state is split {info.world_size} ways; this run has "
                          f"{world_size}. " + conversion_hint(info))


def conversion_hint(info: CheckpointInfo) -> str:
    universal = f"{info.path}_universal"
    return (f"Convert it into a universal checkpoint that loads into any number of processes: "
            f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {info.path} --output_folder "
            f"{universal}`, then relaunch with train.resume={universal} (see docs/distributed.md).")


def save_checkpoint(engine, directory: Path, step: int, client_state: dict[str, Any], keep_last: int,
                    zero_stage: int, bf16: bool) -> Path:
    """All ranks call this. The folder becomes visible to `find_resume` only after every rank has written
    its part; then older checkpoints beyond `keep_last` (and leftovers of crashed saves) are deleted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = directory / tag(step)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)  # a torn save of this step by an earlier, crashed run
    dist.barrier()
    engine.save_checkpoint(str(directory), tag=tag(step), client_state=client_state, save_latest=False)
    dist.barrier()  # every rank has returned from writing its files
    if rank == 0:
        info = CheckpointInfo(path=path, step=step, world_size=world, zero_stage=zero_stage, bf16=bf16,
                              files=file_list(path))
        write_json(path / COMPLETE, {k: v for k, v in asdict(info).items() if k not in ("path", "universal")})
        atomic_write_bytes(directory / "latest", tag(step).encode())  # DeepSpeed's own tools read this
        _prune(directory, keep_last, step)
    dist.barrier()
    return path


def _prune(directory: Path, keep_last: int, newest: int) -> None:
    complete = complete_checkpoints(directory)
    doomed = [info.path for info in complete[:-keep_last]] if keep_last > 0 else []
    kept = {info.path for info in complete}
    for path in directory.iterdir():
        match = _TAG.match(path.name)
        if path.is_dir() and match and path not in kept and int(match.group(1)) < newest:
            doomed.append(path)  # an incomplete save from a crashed run
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def _safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoints besides tensors and containers (NumPy arrays of
    the saved RNG states, ZeRO's stage enum, loss scaler and fragment addresses): plain data, no code."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32")]
    return [np.ndarray, np.dtype, np._core.multiarray._reconstruct, *dtypes, ZeroStageEnum, LossScaler,
            DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads(where: Path):
    """Inside this block every `torch.load` (DeepSpeed's checkpoint engine, ZeRO-3 and universal-checkpoint
    readers all ask for weights_only=False) loads with weights_only=True and the allowlist above; anything
    else in the files is refused with a CheckpointError naming the folder."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as err:
            source = args[0] if args else kwargs.get("f", where)
            raise CheckpointError(f"checkpoint file {source} holds objects other than tensors and plain data, "
                                  f"which wsssrec does not unpickle (it could run code): {err}") from None

    with torch.serialization.safe_globals(_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def load_checkpoint(engine, info: CheckpointInfo) -> dict[str, Any]:
    """Load weights, optimizer and scheduler state into `engine` (all ranks call this), unpickling with
    weights_only=True; returns the client_state saved with it."""
    try:
        with weights_only_loads(info.path):
            _, client = engine.load_checkpoint(str(info.path.parent), tag=info.path.name,
                                               load_module_strict=True, load_optimizer_states=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot load the checkpoint in {info.path}: {err}") from None
    if client is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {info.path}")
    return client


@torch.no_grad()
def consolidated_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full fp32 state_dict of a model inside a DeepSpeed engine, on rank 0 (None on other ranks). ZeRO-3
    parameters are gathered; with bf16 or ZeRO the fp32 master weights are taken, not the bf16 copies. Every
    rank must call this (it runs collectives)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank() if dist.is_initialized() else 0
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        full = None
        if name in params and params[name].requires_grad:
            full = safe_get_full_fp32_param(params[name])  # master weights (ZeRO 1–3, bf16)
        if full is None and hasattr(value, "ds_id"):  # a frozen ZeRO-3 parameter: gather it
            with deepspeed.zero.GatheredParameters([value]):
                full = value.data.clone()
        if full is None:
            full = value.detach()
        if rank == 0:
            state[name] = (full.float() if full.is_floating_point() else full).cpu().clone()
    return state if rank == 0 else None


class Checkpointer:
    """Resume point, periodic and final checkpoints of one training stage (`train.resume`, `checkpoint_every`,
    `keep_last`). Build it before the engine: a universal checkpoint needs a DeepSpeed config switch."""

    def __init__(self, directory: Path, resume: str, every: int, keep_last: int, seed: int,
                 ds_config: dict[str, Any]):
        self.directory, self.every, self.keep_last, self.seed = directory, every, keep_last, seed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(ds_config.get("torch_autocast", {}).get("enabled", False))
        self.resume_from = find_resume(directory, resume)
        if self.resume_from is not None:
            check_compatible(self.resume_from, self.world, self.zero_stage)
            if self.resume_from.universal:
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.last_saved = self.resume_from.step if self.resume_from else -1

    def restore(self, engine) -> LoopState:
        """Load the resume point into `engine` and this process's RNGs; a fresh start seeds each rank apart."""
        if self.resume_from is None:
            seed_everything(self.seed + 100_003 * self.rank)
            return LoopState()
        client = load_checkpoint(engine, self.resume_from)
        state = LoopState(step=int(client["step"]), samples=int(client["samples"]),
                          history=list(client["history"]), selection=dict(client.get("selection", {})))
        if client.get("world_size") == self.world:
            set_rng_state(client["rng"][self.rank])
        else:  # another world size: the data order changes anyway; reseed reproducibly
            seed_everything(self.seed + 100_003 * self.rank + state.step)
        self.last_saved = state.step
        if self.rank == 0:
            print(f"resumed from {self.resume_from.path} at step {state.step} ({state.samples} images seen)")
        return state

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, engine, state: LoopState) -> Path | None:
        """Checkpoint `state` (all ranks call this); a step already saved is not written twice."""
        if state.step == self.last_saved:
            return None
        rngs = [None] * self.world
        dist.all_gather_object(rngs, rng_state())
        client = {"step": state.step, "samples": state.samples, "history": state.history,
                  "selection": state.selection,
                  "world_size": self.world, "rng": rngs,
                  # lets DeepSpeed's ds_to_universal convert this checkpoint for another world size
                  "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
        path = save_checkpoint(engine, self.directory, state.step, client, self.keep_last, self.zero_stage,
                               self.bf16)
        self.last_saved = state.step
        return path

    def finish(self, engine, state: LoopState) -> dict[str, torch.Tensor] | None:
        """The final checkpoint (unless this step is saved already), then the whole model as one fp32
        state_dict on rank 0 (None elsewhere). All ranks call this."""
        self.save(engine, state)
        return consolidated_state_dict(engine.module)
