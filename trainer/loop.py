"""What both training loops share: the start of a stage (distributed init, threads, seed, run folder with the
resolved config) and the end-of-step bookkeeping (loop state, metrics as means over ranks, images/s)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.manifest import read_manifest

from .config import Config
from .distributed import all_reduce_mean, init_distributed, seed_everything, set_threads
from .files import run_dir, save_resolved_config


@dataclass(frozen=True)
class StageResult:
    """What a stage made: its weights file, its MLflow run (None when tracking is off or on ranks > 0) and
    the lineage tags the registry records with it (g's registry version, `model.init_from`)."""
    stage: str  # "classifier" | "segmenter"
    weights: Path
    run_id: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass
class LoopState:
    """Where a training loop stands; saved in every checkpoint's client_state."""
    step: int = 0  # optimizer steps done
    samples: int = 0  # training images consumed by all ranks together: the data position
    history: list = field(default_factory=list)  # all-reduced mean loss of every step
    selection: dict = field(default_factory=dict)  # train.select_split's scores and choice (trainer/select.py)


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


def check_stage_inputs(cfg: Config) -> None:
    """What every stage reads first, checked before anything is written into its run folder (which may hold
    a finished run): the data manifest must be readable. Raises DataError naming the URL."""
    read_manifest(cfg.data.url)


def start_stage(cfg: Config) -> tuple[int, int, Path]:
    """Common start of both training stages: the inputs checked (`check_stage_inputs`: a failing command
    leaves the run folder as it was), distributed init, threads, the same seed on every rank (same initial
    weights), the run folder with the resolved config written by rank 0. Returns rank, world, folder."""
    check_stage_inputs(cfg)
    rank, world = init_distributed(cfg.train.dist_timeout_s)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    out = run_dir(cfg)
    if rank == 0:
        save_resolved_config(cfg, out)
    return rank, world, out
