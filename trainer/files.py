"""Files of a run: the run folder, atomic writes (a half-written file is never visible under its name), the
resolved config and the git revision."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_name(cfg: Config) -> str:
    """The one run-name rule: `train.run_name`, or "run"."""
    return cfg.train.run_name or "run"


def stage_run_name(cfg: Config, stage: str) -> str:
    """The MLflow run name of a stage: `<run name>-classifier|segmenter|eval`."""
    return f"{run_name(cfg)}-{stage}"


def run_path(cfg: Config) -> Path:
    """The run folder, `train.out_dir`/<run name>, without creating it."""
    return Path(cfg.train.out_dir) / run_name(cfg)


def run_dir(cfg: Config) -> Path:
    """The run folder, created when missing."""
    path = run_path(cfg)
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


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary name: `dst` is never visible half-written."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
