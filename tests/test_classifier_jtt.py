"""Just Train Twice in stage 1 (trainer/classifier.py): the error set of a short ERM pass, the weighted loss of
the real pass, its config checks, and a real two-pass stage 1 through the `wsssrec` entry point."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.classifier import jtt_loss, jtt_weights, misclassified
from trainer.config import ConfigError, load_config


class FixedLogits(torch.nn.Module):
    """A stand-in g whose logit for each image is its first pixel (so a test sets g's answer per image)."""

    def forward(self, images):
        return images[:, :1, 0, 0]


def _batch(logits, labels, keys, backgrounds, padded=None):
    images = torch.zeros(len(keys), 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor(logits)
    batch = {"image": images, "labels": torch.tensor(labels, dtype=torch.float32)[:, None], "key": keys,
             "meta": [{"background": b} for b in backgrounds]}
    if padded is not None:
        batch["padded"] = torch.tensor(padded)
    return batch


def test_misclassified_lists_the_wrong_keys_and_counts_groups():
    batches = [
        _batch([3.0, -3.0, 3.0], [1, 1, 0], ["a", "b", "c"], ["water", "land", "water"]),  # b, c wrong
        _batch([-3.0, 0.1, -3.0], [0, 1, 1], ["d", "e", "b"], ["land", "water", "land"], [False, False, True]),
    ]
    wrong, groups = misclassified(FixedLogits(), iter(batches))
    assert wrong == ["b", "c"]  # the padded repeat of b is neither counted nor listed twice
    assert groups == {"negative/land": [0, 1], "negative/water": [1, 1], "positive/land": [1, 1],
                      "positive/water": [0, 2]}


def test_misclassified_without_background_metadata_groups_by_tag_only():
    batch = _batch([-1.0, -1.0], [1, 0], ["x", "y"], ["", ""])
    batch["meta"] = [{}, {}]
    wrong, groups = misclassified(FixedLogits(), iter([batch]))
    assert wrong == ["x"] and groups == {"negative": [0, 1], "positive": [1, 1]}


def test_weights_and_loss_by_hand():
    logits = torch.tensor([[0.0], [2.0], [-1.0], [1.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    keys = ["p", "q", "r", "s"]
    assert jtt_weights(keys, {"q", "s"}, 5.0).tolist() == [1.0, 5.0, 1.0, 5.0]
    per = [math.log(2), 2 + math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), math.log1p(math.exp(-1))]
    mean_weight = 1.5
    expected = (per[0] + 5 * per[1] + per[2] + 5 * per[3]) / 4 / mean_weight
    got = jtt_loss(logits, labels, keys, frozenset({"q", "s"}), 5.0, mean_weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    plain = jtt_loss(logits, labels, keys, frozenset(), 5.0, 1.0)
    assert torch.equal(plain, F.binary_cross_entropy_with_logits(logits, labels))


def test_jtt_config_is_checked():
    with pytest.raises(ConfigError, match="classifier.jtt_epochs"):
        load_config(None, ["classifier.jtt_epochs=-1"])
    with pytest.raises(ConfigError, match="classifier.jtt_upweight"):
        load_config(None, ["classifier.jtt_upweight=0.5"])


def _stage1(work, toy_dataset, *extra):
    from tests.conftest import run_stage1

    proc = run_stage1(work, toy_dataset, "jtt", "classifier.epochs=2", "classifier.jtt_epochs=1",
                      "classifier.jtt_upweight=20", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_pass_stage1_writes_the_error_set_and_reuses_it_on_resume(toy_dataset, tmp_path):
    from tests.conftest import TOY_ARGS

    first = _stage1(tmp_path, toy_dataset)
    run = tmp_path / "runs" / "jtt"
    record = json.loads((run / "jtt_error_set.json").read_text())
    train_images = TOY_ARGS["counts"]["train"]
    assert record["images"] == train_images and record["epochs"] == 1
    assert sum(g["total"] for g in record["groups"].values()) == train_images
    assert sum(g["wrong"] for g in record["groups"].values()) == len(record["keys"])
    assert all(key.startswith("train-") for key in record["keys"])
    assert set(record["groups"]) <= {"positive/water", "positive/land", "negative/water", "negative/land"}
    assert f"JTT error set: {len(record['keys'])} of {train_images}" in first.stdout
    assert (run / "classifier.pt").is_file()
    assert (run / "classifier_jtt_checkpoints").is_dir() and (run / "classifier_checkpoints").is_dir()
    mtime = (run / "jtt_error_set.json").stat().st_mtime_ns
    second = _stage1(tmp_path, toy_dataset, "train.resume=auto")
    assert "JTT error set:" not in second.stdout  # the first pass is not repeated
    assert (run / "jtt_error_set.json").stat().st_mtime_ns == mtime
