"""Self-training (trainer/selftrain.py, `objective.preset: self_train`): which teacher pixels become labels,
the ignore label in L_pseudo, and a tiny student that learns its teacher's confident masks through `wsssrec
train`."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.inference import MaskPrediction, PredictSettings
from trainer.losses import L_pseudo
from trainer.selftrain import confident_labels

from test_mlflow import REPO, wsssrec


def _prediction(fg: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> MaskPrediction:
    """C = 1, K = 2: the class component's probability is `fg` exactly."""
    logits = torch.stack([fg.log(), (1 - fg).log()], dim=1)
    return MaskPrediction(logits, labels, torch.full((fg.shape[0], 1), float("nan")), 1,
                          PredictSettings(flip=False, fg_threshold=threshold))


def test_confident_labels_ignore_the_uncertain_the_dropped_and_trust_the_tags():
    fg = torch.tensor([[[0.95, 0.60], [0.30, 0.05]],    # positive: sure fg, unsure, unsure, sure bg
                       [[0.95, 0.90], [0.80, 0.05]],    # positive, its region dropped by the gate
                       [[0.95, 0.95], [0.95, 0.95]]])   # negative (no tag): background whatever the teacher says
    labels = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    tags = torch.tensor([[1.0], [1.0], [0.0]])
    out = confident_labels(_prediction(fg, labels), tags, margin=0.25)
    assert out.tolist() == [[[1, 255], [255, 0]], [[255, 255], [255, 0]], [[0, 0], [0, 0]]]
    # the margin is measured from the foreground threshold in use
    fg = torch.tensor([[[0.95, 0.60], [0.30, 0.01]]])
    out = confident_labels(_prediction(fg, torch.tensor([[[1, 1], [1, 0]]]), threshold=0.2), tags[:1], 0.15)
    assert out.tolist() == [[[1, 1], [255, 0]]]  # 0.30 is within 0.15 of 0.2; 0.01 is not


def test_confident_labels_never_keep_an_untagged_class():
    fg = torch.full((1, 1, 2), 0.45)  # two classes, each 0.45; background 0.1
    logits = torch.stack([fg.log(), fg.log(), torch.full_like(fg, 0.1).log()], dim=1)
    pred = MaskPrediction(logits, torch.tensor([[[1, 2]]]), torch.full((1, 2), float("nan")), 2,
                          PredictSettings(flip=False))
    assert confident_labels(pred, torch.tensor([[1.0, 0.0]]), margin=0.1).tolist() == [[[1, 255]]]


def test_L_pseudo_ignores_255_and_is_zero_when_all_are():
    Z = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]], requires_grad=True)  # p(class) 0.75, 0.5
    assert L_pseudo(Z, torch.tensor([[[1, 255]]]), 1).item() == pytest.approx(-math.log(0.75), rel=1e-5)
    none = L_pseudo(Z, torch.tensor([[[255, 255]]]), 1)
    assert none.item() == 0.0
    none.backward()
    assert Z.grad is not None and float(Z.grad.abs().sum()) == 0.0


@pytest.mark.slow
def test_a_student_from_scratch_learns_its_teachers_confident_masks(toy_dataset, tmp_path):
    from trainer.config import load_config
    from trainer.data import eval_batches
    from trainer.selftrain import Teacher
    from trainer.weights import load_segmenter

    common = ["-c", str(REPO / "configs/toy_birds.yaml"), f"data.url={toy_dataset}", "data.image_size=64",
              f"train.out_dir={tmp_path}/runs", "train.threads=1", "mlflow.enabled=false", "classifier.epochs=1",
              f"train.deepspeed={REPO}/configs/deepspeed/zero0.json", "train.checkpoint_every=0",
              "data.batch_size=8", "eval.crf_iterations=0"]
    wsssrec("train-classifier", *common, "train.run_name=g", cwd=tmp_path)
    g_file = f"{tmp_path}/runs/g/classifier.pt"
    wsssrec("train", *common, f"classifier.checkpoint={g_file}", "train.run_name=teacher", "train.steps=40",
            cwd=tmp_path)
    teacher_file = f"{tmp_path}/runs/teacher/segmenter.pt"
    student = [*common, f"classifier.checkpoint={g_file}", "objective.preset=self_train",
               f"objective.teacher={teacher_file}", "train.run_name=student", "train.lr=0.003"]
    wsssrec("train", *student, "train.steps=40", cwd=tmp_path)
    cfg = load_config(None, [f"data.url={toy_dataset}", "data.image_size=64", f"classifier.checkpoint={g_file}",
                             *[a for a in student if a.startswith(("objective.", "eval."))]])
    teacher = Teacher.load(cfg, 1)
    model, _, _ = load_segmenter(f"{tmp_path}/runs/student/segmenter.pt")
    model.eval()
    agree = total = 0
    with torch.no_grad():
        for batch in eval_batches(cfg, "val"):
            target = teacher.pseudo_labels(batch["image"], batch["labels"])
            pred = model.predict_labels(model(batch["image"])["mask_logits"])
            keep = target != 255
            agree += int((pred[keep] == target[keep]).sum())
            total += int(keep.sum())
    assert total > 0 and agree / total > 0.85, agree / max(total, 1)
