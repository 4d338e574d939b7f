"""Training checkpoints are checked before they are trusted (issue 21, item 2): complete.json lists each file's
size and SHA-256, a damaged newest checkpoint makes `train.resume=auto` fall back to the previous intact one
with a warning that names the file, and DeepSpeed's loaders never unpickle code."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(directory: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint leaves it: files, then complete.json with their list."""
    from trainer.checkpoint import COMPLETE, file_list

    path = directory / f"step{step:07d}"
    path.mkdir(parents=True)
    torch.save({"w": torch.full((64,), float(step))}, path / "mp_rank_00_model_states.pt")
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(256))
    (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 2, "bf16": False,
                                             "files": file_list(path)}))
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_auto_resume_falls_back_past_a_truncated_model_file(tmp_path, caplog):
    from trainer.checkpoint import find_resume

    for step in (4, 8, 12):
        _checkpoint(tmp_path, step)
    bad = tmp_path / "step0000012" / "mp_rank_00_model_states.pt"
    _truncate(bad)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        info = find_resume(tmp_path, "auto")
    assert info.step == 8
    assert str(bad) in caplog.text and "truncated" in caplog.text and "falling back" in caplog.text


def test_same_size_damage_is_caught_by_the_checksum(tmp_path, caplog):
    from trainer.checkpoint import find_resume

    _checkpoint(tmp_path, 4)
    shard = _checkpoint(tmp_path, 8) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(256))  # same size, other bytes
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert find_resume(tmp_path, "auto").step == 4
    assert str(shard) in caplog.text and "SHA-256" in caplog.text


def test_no_intact_checkpoint_left_starts_fresh_only_for_auto(tmp_path, caplog):
    from trainer.checkpoint import CheckpointError, find_resume

    path = _checkpoint(tmp_path, 4)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert find_resume(tmp_path, "auto") is None
    assert "is missing" in caplog.text and "afresh" in caplog.text
    with pytest.raises(CheckpointError, match=r"train\.resume=.*step0000004.*zero_pp_rank_0_mp_rank_00_optim"
                                              r"_states\.pt is missing"):
        find_resume(tmp_path, str(path))


def test_markers_without_a_file_list_still_resume(tmp_path):
    """Checkpoints written before complete.json carried file lists stay resumable."""
    from trainer.checkpoint import find_resume

    path = tmp_path / "step0000004"
    path.mkdir()
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (path / "complete.json").write_text('{"step": 4, "world_size": 1, "zero_stage": 0, "bf16": false}')
    assert find_resume(tmp_path, "auto").step == 4


class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_deepspeed_style_loads_run_with_weights_only(tmp_path):
    """DeepSpeed's checkpoint engine calls torch.load(..., weights_only=False); inside our load it cannot run
    the pickled code of a checkpoint someone handed over."""
    from trainer.checkpoint import CheckpointError, weights_only_loads

    marker = tmp_path / "code-ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": _Bomb(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt holds objects other than tensors"):
        with weights_only_loads(tmp_path):
            torch.load(path, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"  # restored


ENGINE_SCRIPT = r"""
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from trainer.distributed import init_distributed
init_distributed(120)
import deepspeed
from trainer.checkpoint import Checkpointer, CheckpointError, file_list, COMPLETE, weights_only_loads
from trainer.loop import LoopState

directory = Path(sys.argv[1])
def engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)[0]

ds = {"zero_optimization": {"stage": 2}}
eng = engine()
saver = Checkpointer(directory, "auto", 1, 5, 0, ds)
state = saver.restore(eng)
for step in (1, 2):
    loss = eng(torch.ones(2, 4)).sum(); eng.backward(loss); eng.step()
    state.step, state.samples = step, 2 * step
    state.history.append(float(loss))
    saver.save(eng, state)
model_file = directory / "step0000002" / "mp_rank_00_model_states.pt"
model_file.write_bytes(model_file.read_bytes()[:100])  # torn after complete.json was written

eng = engine()
resumed = Checkpointer(directory, "auto", 1, 5, 0, ds)
print("RESUMED", resumed.restore(eng).step)

# a hand-over: step 1's model file replaced by a pickle that runs code, its complete.json made to match
class Bomb:
    def __reduce__(self):
        return (Path.touch, (directory / "code-ran",))
folder = directory / "step0000001"
with weights_only_loads(folder):  # our own safe load of the file this script just wrote
    blob = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
blob["payload"] = Bomb()
torch.save(blob, folder / "mp_rank_00_model_states.pt")
marker = __import__("json").loads((folder / COMPLETE).read_text())
marker["files"] = file_list(folder)
(folder / COMPLETE).write_text(__import__("json").dumps(marker))
try:
    Checkpointer(directory, str(folder), 1, 5, 0, ds).restore(engine())
except CheckpointError as err:
    print("REFUSED", err)
print("CODE RAN" if (directory / "code-ran").exists() else "NO CODE RAN")
"""


@pytest.mark.slow
def test_real_engine_resumes_past_a_torn_checkpoint_and_never_unpickles_code(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RESUMED 1" in out and "step0000002/mp_rank_00_model_states.pt has 100 bytes" in out
    assert "REFUSED" in out and "holds objects other than tensors" in out
    assert "NO CODE RAN" in out
