"""Stage 2: train the segmenter (f_m, f_x) against the frozen classifier g through DeepSpeed. One readable loop:
batch → forward → objective terms → backward → step, with checkpoints, MLflow metrics and a progress bar."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from .classifier import classifier_path, load_classifier
from .config import Config
from .data import dataset_classes, train_batches
from .losses import objective
from .models import FrozenClassifier, Segmenter, count_parameters
from .runtime import (atomic_torch_save, deepspeed_config, init_distributed, make_engine, run_dir,
                      save_resolved_config, seed_everything, set_threads, write_json)
from .tracking import Tracker


def build_segmenter(cfg: Config, num_classes: int, g_net) -> Segmenter:
    return Segmenter(cfg.model, num_classes, trunk=g_net if cfg.model.encoder == "efficientnet" else None)


def load_frozen_g(cfg: Config, num_classes: int):
    path = classifier_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist: run `wsssrec train-classifier` "
                                "first or set classifier.checkpoint=PATH")
    net = load_classifier(path, num_classes)
    return net, FrozenClassifier(net)


def segmenter_checkpoint(cfg: Config) -> Path:
    return run_dir(cfg) / "segmenter.pt"


def save_segmenter(model: Segmenter, cfg: Config, classes: list[str], path: Path) -> None:
    atomic_torch_save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "classes": classes}, path)


def load_segmenter(path: str | Path, g_net=None) -> tuple[Segmenter, Config, list[str]]:
    """Rebuild the segmenter class from our package and load plain tensors (weights_only=True)."""
    from .config import config_from_dict
    from .effnet import EfficientNetLite0

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(blob["config"])
    classes = list(blob["classes"])
    trunk = g_net if g_net is not None else EfficientNetLite0(num_classes=len(classes))
    model = build_segmenter(cfg, len(classes), trunk)
    model.load_state_dict(blob["state_dict"], strict=True)
    return model, cfg, classes


def train_segmenter(cfg: Config, parent_run_id: str | None = None) -> Path:
    rank, world = init_distributed()
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    out = run_dir(cfg)
    save_resolved_config(cfg, out)
    classes = dataset_classes(cfg)
    g_net, g = load_frozen_g(cfg, len(classes))
    model = build_segmenter(cfg, len(classes), g_net)
    model.check_size(cfg.data.image_size, cfg.data.image_size)
    engine, optimizer = make_engine(model, cfg.train.lr, deepspeed_config(cfg, cfg.data.batch_size))
    ckpt_dir = out / "checkpoints"
    start_step = 0
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start_step = int(client["step"]) if client else 0
    tracker = Tracker(cfg, f"{cfg.train.run_name or 'run'}-segmenter", active=rank == 0,
                      parent_run_id=parent_run_id)
    tracker.set_tags({"trainable_parameters": count_parameters(model, True),
                      "parameters": count_parameters(model)})
    batches = train_batches(cfg, seed=cfg.train.seed + 1, start_epoch=0)
    engine.train()
    g.train()  # a no-op by construction: g stays in eval mode
    bar = tqdm(range(start_step, cfg.train.steps), desc="stage 2: segmenter", disable=rank != 0,
               dynamic_ncols=True, initial=start_step, total=cfg.train.steps)
    start, history = time.time(), []
    for step in bar:
        if step == cfg.model.encoder_unfreeze_step and hasattr(model.encoder, "set_trainable"):
            model.encoder.set_trainable(True)
            optimizer.add_param_group({"params": list(model.encoder.parameters()), "lr": cfg.train.lr * 0.1})
        batch = next(batches)
        images, labels = batch["image"], batch["labels"]
        terms = objective(engine(images), images, labels, g, cfg.objective, segment=engine)
        engine.backward(terms["loss"])
        engine.step()
        images_per_s = (step + 1 - start_step) * images.shape[0] * world / (time.time() - start)
        bar.set_postfix(loss=f"{terms['loss'].item():.4f}", img_s=f"{images_per_s:.1f}")
        record = {f"train/{k}": v.item() for k, v in terms.items()}
        history.append(record["train/loss"])
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            tracker.log_metrics({**record, "train/images_per_s": images_per_s}, step)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step + 1:07d}", client_state={"step": step + 1})
    path = segmenter_checkpoint(cfg)
    if rank == 0:
        save_segmenter(model, cfg, classes, path)
        write_json(out / "train_history.json", {"loss": history, "seconds": time.time() - start})
        tracker.log_artifact(out / "config.yaml")
        tracker.finish()
        print(f"stage 2 done: segmenter saved to {path} ({time.time() - start:.0f} s)")
    return path
