"""One sweep trial: stage 2 as a Ray Train `TorchTrainer` with N workers (DeepSpeed inside each), for the
trial's searched values (λ_m, λ_c, K, ...). `train.steps` is run in `rungs` pieces; each piece resumes from
the previous one's DeepSpeed checkpoint (`train.resume`), is validated on rank 0 and reported to Ray Train with a checkpoint,
which `TuneReportCallback` hands to Tune, so ASHA can stop the trial between pieces. A restored trial (same
trial id, so the same Train run name) continues after its last reported piece."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any



def rung_ends(steps: int, rungs: int) -> list[int]:
    """The optimizer step at which each piece ends: `steps` split as evenly as integers allow."""
    if steps < rungs:
        from trainer.config import ConfigError

        raise ConfigError(f"train.steps={steps} cannot be split into sweep.rungs={rungs} pieces; use "
                          f"train.steps >= {rungs} or fewer rungs")
    return [round(steps * (r + 1) / rungs) for r in range(rungs)]


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The experiment config of one trial: the sweep's base with the trial's searched values (each set on its
    config key, tune/settings.py SEARCHABLE), its own run folder and checkpoints only at piece ends. MLflow is
    the sweep driver's job, so the trial's stages do not log."""
    from trainer.config import config_from_dict, with_overrides

    from .settings import config_key

    values = {config_key(name): value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
              for name, value in params.items()}
    values.update({"train.run_name": trial_id, "train.resume": "auto", "train.checkpoint_every": 0,
                   "train.keep_last": 1, "mlflow.enabled": False})
    return with_overrides(config_from_dict(base), values).to_dict()


def run_trial(params: dict[str, Any], base: dict[str, Any], plan: dict[str, Any]) -> None:
    """The Tune trainable: build and fit this trial's TorchTrainer; its reports reach Tune through
    TuneReportCallback. `plan` holds the sweep-wide settings (see sweep.trial_plan)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    resources = {"CPU": plan["cpus_per_worker"], **({"GPU": 1} if plan["use_gpu"] else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": trial_config(base, params, trial_id), **plan},
        scaling_config=ScalingConfig(num_workers=plan["workers"], use_gpu=plan["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(name=trial_id, storage_path=plan["train_storage"], callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0)))
    trainer.fit()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Every Ray Train worker: train piece after piece, rank 0 validates, all ranks report (a barrier) with
    their share of the DeepSpeed checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    from trainer.config import ObjectiveConfig, config_from_dict, with_overrides
    from trainer.files import run_dir
    from trainer.model_uri import resolve_classifier, resolve_init_from
    from trainer.train import train_segmenter

    from .validate import validation_metrics

    cfg, g_lineage = resolve_classifier(config_from_dict(loop_config["cfg"]))  # every rank needs g's weights as a file
    cfg, init_lineage = resolve_init_from(cfg)  # the same for model.init_from
    lineage = {**g_lineage, **init_lineage}
    reference = ObjectiveConfig(**loop_config["reference_objective"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    ends = loop_config["rung_ends"]
    done_step = restore_point(run_dir(cfg) / "checkpoints", ray.train.get_checkpoint(),
                              copy=context.get_local_rank() == 0)
    previous_end = 0
    for rung, end in enumerate(ends, 1):
        if end <= done_step:
            previous_end = end
            continue
        started = time.time()
        cfg = with_overrides(cfg, {"train.steps": end})
        segmenter = train_segmenter(cfg, lineage=lineage).weights
        metrics: dict[str, Any] = {}
        if rank == 0:
            metrics = validation_metrics(cfg, segmenter, loop_config["split"], reference)
            losses = json.loads((run_dir(cfg) / "train_history.json").read_text())["loss"][previous_end:end]
            metrics.update({"rung": rung, "train_steps": end, "rung_seconds": time.time() - started,
                            "train/loss": sum(losses) / max(len(losses), 1)})
        with tempfile.TemporaryDirectory(prefix="wsssrec-rung-") as staging:
            stage_checkpoint(run_dir(cfg), end, rank, Path(staging))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging),
                             checkpoint_dir_name=f"rung_{rung:03d}_step_{end:07d}")
        previous_end = end


def stage_checkpoint(run: Path, step: int, rank: int, staging: Path) -> None:
    """This rank's share of the piece's checkpoint: its own ZeRO shard files; rank 0 also the rest (model
    states, complete.json) and segmenter.pt. Ray Train merges every rank's share into one folder, so ranks
    on different nodes each upload what only they wrote."""
    from trainer.checkpoint import files_of_rank, tag

    target = staging / "checkpoints" / tag(step)
    target.mkdir(parents=True)
    for path in files_of_rank(run / "checkpoints" / tag(step), rank):
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)
    if rank == 0:
        shutil.copy2(run / "segmenter.pt", staging / "segmenter.pt")


def restore_point(local: Path, checkpoint, copy: bool) -> int:
    """The step this trial's training has reported (0 for a new trial). A reported checkpoint that is newer
    than the local ones (a trial restored on another node) is copied in by one process per node (`copy`),
    where `train.resume=auto` finds it."""
    import torch.distributed as dist

    from trainer.checkpoint import complete_checkpoints

    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            reported = complete_checkpoints(Path(folder) / "checkpoints")
            if reported:
                newest, present = reported[-1], complete_checkpoints(local)
                step = newest.step
                if copy and (not present or present[-1].step < step):
                    local.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(local / newest.path.name, ignore_errors=True)
                    shutil.copytree(newest.path, local / newest.path.name)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank starts training before its node holds the checkpoint
    return step
