"""`train.select_split` (trainer/select.py): stage 2 scores its weights on a held-out split at every checkpoint step
and the last, and segmenter.pt is the best; the choice survives a resume. The scoring itself is `wsssrec eval`'s
(tests/test_cli_end_to_end.py::test_sweep_validation_scores_a_segmenter_as_eval_does pins it); here the scores
are scripted, so which step wins is known."""
from __future__ import annotations

import json

import pytest
import torch

from trainer import select
from trainer.config import ConfigError, load_config
from trainer.effnet import EfficientNetLite
from trainer.weights import read_segmenter_file


def _config(toy_dataset, tmp_path, steps: int, split: str = "val"):
    g_file = tmp_path / "g.pt"
    if not g_file.exists():  # an untrained g is enough: the scores are scripted
        torch.manual_seed(0)
        torch.save(EfficientNetLite(num_classes=1).state_dict(), g_file)
    return load_config("configs/toy_birds.yaml", [
        f"data.url={toy_dataset}", "data.image_size=64", "data.batch_size=4", f"train.out_dir={tmp_path}/runs",
        "train.run_name=sel", f"train.steps={steps}", "train.checkpoint_every=2", "train.keep_last=0",
        "train.threads=1", "mlflow.enabled=false", f"classifier.checkpoint={g_file}", f"train.select_split={split}",
        "eval.crf_iterations=0"])


@pytest.fixture
def scripted(monkeypatch):
    """split_scores returns the next scripted mIoU and records the step's weights it was shown."""
    calls = []

    def fake(model, g, cfg, split, num_labels, reference=None, device=None):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"miou": script[len(calls) - 1]}

    script: list[float] = []
    monkeypatch.setattr(select, "split_scores", fake)
    return script, calls


def _weights(path):
    return read_segmenter_file(path).state_dict


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_segmenter_pt_is_the_best_scored_step_and_a_resume_keeps_choosing(toy_dataset, tmp_path, scripted):
    from trainer.train import train_segmenter

    script, calls = scripted
    script += [0.30, 0.50]  # steps 2 and 4: step 4 is best
    train_segmenter(_config(toy_dataset, tmp_path, steps=4))
    run = tmp_path / "runs" / "sel"
    history = json.loads((run / "train_history.json").read_text())["selection"]
    assert history == {"split": "val", "scores": {"2": 0.30, "4": 0.50}, "step": 4, "score": 0.50}
    assert _same(_weights(run / "segmenter.pt"), calls[1]) and _same(_weights(run / "segmenter_last.pt"), calls[1])

    script += [0.40, 0.45]  # resumed from step 4 to 8: steps 6 and 8 score below step 4's 0.50
    train_segmenter(_config(toy_dataset, tmp_path, steps=8))
    history = json.loads((run / "train_history.json").read_text())["selection"]
    assert history["scores"] == {"2": 0.30, "4": 0.50, "6": 0.40, "8": 0.45}  # step 4 was not scored again
    assert history["step"] == 4 and len(calls) == 4
    assert _same(_weights(run / "segmenter.pt"), calls[1])  # step 4's weights, written by the first run
    assert _same(_weights(run / "segmenter_last.pt"), calls[3]) and not _same(calls[1], calls[3])
    best_file = read_segmenter_file(run / "segmenter.pt")
    assert best_file.config.train.select_split == "val" and best_file.classes == ["bird"]


def test_without_a_select_split_segmenter_pt_is_the_last_weights(toy_dataset, tmp_path, scripted):
    from trainer.train import train_segmenter

    _, calls = scripted
    train_segmenter(_config(toy_dataset, tmp_path, steps=2, split=""))
    run = tmp_path / "runs" / "sel"
    assert calls == [] and not (run / "segmenter_best.pt").exists() and not (run / "segmenter_last.pt").exists()
    assert json.loads((run / "train_history.json").read_text())["selection"] == {"split": "", "scores": {}}


def test_a_select_split_without_masks_is_refused_before_the_run_folder_is_touched(toy_dataset, tmp_path):
    from trainer.train import train_segmenter

    with pytest.raises(ConfigError, match=r"train.select_split='train'.*no masks"):
        train_segmenter(_config(toy_dataset, tmp_path, steps=2, split="train"))
    assert not (tmp_path / "runs" / "sel").exists()


@pytest.mark.parametrize("delta, scores, chosen", [
    (0.0, [0.30, 0.50, 0.45], 4),                 # strictly the best
    (0.02, [0.50, 0.49, 0.40], 4),                # 0.49 is within 0.02 of 0.50: the later step is kept
    (0.02, [0.30, 0.52, 0.49, 0.515], 8),         # within 0.02 of the best (0.52), the latest such step
    (0.02, [0.52, 0.49, 0.495], 2),               # never within 0.02 of step 2's 0.52
    (0.02, [float("nan"), 0.10], 4),              # a number beats a NaN (no positive image scored)
    (0.02, [0.20, float("nan")], 2),
])
def test_min_delta_keeps_the_latest_step_within_it_of_the_best(delta, scores, chosen):
    cfg = load_config("configs/toy_birds.yaml", [f"train.select_min_delta={delta}"])
    selector = select.Selector(cfg, ["bird"], None, None, {})
    for i, value in enumerate(scores):
        step = 2 * (i + 1)
        selector.record["scores"][str(step)] = value
        if selector.chooses(value):
            selector.record.update(step=step, score=value)
    assert selector.record["step"] == chosen
