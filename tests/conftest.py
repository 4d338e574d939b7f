"""Shared fixtures: one tiny toy-birds data set per test session.

The Debian source packages come from the wsssrec cache (`$WSSSREC_CACHE/debian`, else
`~/.cache/wsssrec/debian`); the first run fetches them with `apt-get download`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# paired=0: the session set has no test_paired (tests/test_data_toy_birds.py and tests/test_paired_eval.py build
# their own), so every other test sees the four splits it always had
TOY_ARGS = dict(seed=0, size=64, rho=0.9, maxcount=32, paired=0,
                counts={"train": 96, "val": 32, "test_aligned": 32, "test_conflict": 32})


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory) -> str:
    """Path of the manifest.json of a tiny toy-birds set (64 px; 96/32/32/32 samples; 32 per shard)."""
    from data_shards.toy_birds import build_toy_birds

    return build_toy_birds(str(tmp_path_factory.mktemp("toy_birds")), progress=False, **TOY_ARGS)


MULTI_ARGS = dict(seed=0, size=64, rho=0.9, maxcount=40,
                  counts={"train": 80, "val": 40, "test_aligned": 40, "test_conflict": 40})


@pytest.fixture(scope="session")
def toy_multi_dataset(tmp_path_factory) -> str:
    """Path of the manifest.json of a tiny toy-multi set (64 px; 80/40/40/40 samples; 40 per shard)."""
    from data_shards.toy_multi import build_toy_multi

    return build_toy_multi(str(tmp_path_factory.mktemp("toy_multi")), progress=False, **MULTI_ARGS)


def split_samples(manifest_path: str) -> dict:
    """split -> list of (meta, mask array or None) in shard order, read straight from the shards."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest

    out = {}
    for split, info in read_manifest(manifest_path).splits.items():
        out[split] = []
        for shard in info.shards:
            for raw in raw_samples(shard):
                mask = np.asarray(Image.open(io.BytesIO(raw["mask.png"]))) if "mask.png" in raw else None
                out[split].append((json.loads(raw["json"]), mask))
    return out


def folder_bytes(manifest_path: str) -> dict:
    """Every file of a built data set's folder, name -> bytes (for byte-identical rebuild checks)."""
    import os

    folder = os.path.dirname(manifest_path)
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def run_stage1(work, toy_dataset: str, run_name: str, *extra: str) -> subprocess.CompletedProcess:
    """`wsssrec train-classifier` on the toy-birds config at 64 px into <work>/runs/<run_name>, MLflow in
    <work>/mlflow.db, ZeRO 0, 2 threads; `extra` overrides after these. The finished process (not checked)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    args = ["-c", str(REPO / "configs/toy_birds.yaml"), f"data.url={toy_dataset}", "data.image_size=64",
            f"train.out_dir={work}/runs", f"train.run_name={run_name}",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", f"mlflow.artifact_location={work}/mlartifacts",
            f"train.deepspeed={REPO}/configs/deepspeed/zero0.json", *extra]
    return subprocess.run([sys.executable, "-m", "trainer", "train-classifier", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
