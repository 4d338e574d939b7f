"""Context decoupling in stage 1 (trainer/decouple.py): pairs drawn within the batch, the two composites on
hand-made images, the first-round segmenter's masks, its config and errors, and a real stage 1 through the
`wsssrec` entry point that saves the picture of what g was shown."""
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.decouple import Decoupler, decouple_batch, decouple_pairs
from trainer.effnet import EfficientNetLite
from trainer.losses import foreground, mask_lets
from trainer.models import mask_logits
from trainer.weights import WeightsError, build_segmenter, save_segmenter

REPO = Path(__file__).resolve().parent.parent


def _labels(tags):
    return torch.tensor(tags, dtype=torch.float32)[:, None]


def test_pairs_join_tagged_to_untagged_each_image_once():
    labels = _labels([1, 0, 1, 1, 0, 0, 0, 1, 1])  # 5 tagged, 4 untagged
    i, j = decouple_pairs(labels, 1.0, torch.Generator().manual_seed(0))
    assert len(i) == len(j) == 4
    assert labels[i].sum() == 4 and labels[j].sum() == 0
    assert len(set(i.tolist()) | set(j.tolist())) == 8  # no image in two pairs
    none = decouple_pairs(labels, 0.0, torch.Generator().manual_seed(0))
    assert len(none[0]) == len(none[1]) == 0
    only_tagged = decouple_pairs(_labels([1, 1]), 1.0, torch.Generator().manual_seed(0))
    assert len(only_tagged[0]) == 0


def test_share_of_pairs_follows_p_and_repeats_with_the_seed():
    labels = _labels([1, 0] * 1000)
    i, _ = decouple_pairs(labels, 0.3, torch.Generator().manual_seed(5))
    assert len(i) / 1000 == pytest.approx(0.3, abs=0.04)
    again, _ = decouple_pairs(labels, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(i, again)


def test_composites_by_hand():
    """Tagged image 0 is red with a 2×2 object (fg 1) in an 8×8 frame and a half-sure pixel (fg 0.5); untagged
    image 1 is blue; image 2 (tagged, unpaired: only one untagged) stays as it is."""
    images = torch.zeros(3, 3, 8, 8)
    images[0, 0] = 1.0
    images[1, 2] = 1.0
    images[2, 1] = 1.0
    labels = _labels([1, 0, 1])
    fg = torch.zeros(3, 8, 8)
    fg[0, 3:5, 3:5] = 1.0
    fg[0, 0, 7] = 0.5
    fg[2] = 1.0
    generator = torch.Generator().manual_seed(0)
    out, out_labels, (i, j) = decouple_batch(images, labels, fg, 1.0, 1, generator)
    assert j.tolist() == [1] and i.tolist() in ([0], [2])
    if i.tolist() == [2]:  # the draw paired the other tagged image: redo with the first one alone
        out, out_labels, (i, j) = decouple_batch(images[:2], labels[:2], fg[:2], 1.0, 1, generator)
    assert i.tolist() == [0] and j.tolist() == [1]
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    # objects moved: the object red on the blue context; the half-sure pixel half and half
    assert torch.equal(out[0, :, 3, 3], red) and torch.equal(out[0, :, 0, 0], blue)
    assert torch.allclose(out[0, :, 0, 7], (red + blue) / 2)
    # context left: red everywhere but the object grown by 1 pixel (2×2 → 4×4), which is blue; the half-sure
    # pixel is below 0.5, so it stays
    grown = torch.zeros(8, 8, dtype=torch.bool)
    grown[2:6, 2:6] = True
    assert torch.equal(out[1].permute(1, 2, 0)[grown], blue.expand(16, 3))
    assert torch.equal(out[1].permute(1, 2, 0)[~grown], red.expand(48, 3))
    assert torch.equal(out_labels, labels[:len(out)])  # tags stay with their slot: objects tagged, context not
    assert torch.equal(images[0, 0], torch.ones(8, 8))  # the input is not written


def _segmenter(tmp_path, classes=("bird",), size=64):
    cfg = load_config(REPO / "configs/toy_birds.yaml", [f"data.image_size={size}"])
    torch.manual_seed(0)
    model = build_segmenter(cfg, len(classes), EfficientNetLite(num_classes=len(classes)))
    path = tmp_path / "segmenter.pt"
    save_segmenter(model, cfg, list(classes), path)
    return path, model.eval()


def test_decoupler_uses_the_segmenters_flip_averaged_foreground(tmp_path):
    path, model = _segmenter(tmp_path)
    decoupler = Decoupler(path, ["bird"], 1.0, 0)
    torch.manual_seed(1)
    images = torch.rand(4, 3, 64, 64)
    labels = _labels([1, 0, 1, 0])
    with torch.no_grad():
        fg = foreground(mask_lets(mask_logits(model, images, flip=True)), 1)
    assert torch.allclose(decoupler.foreground(images), fg, atol=1e-6)
    out, _, (i, j) = decoupler(images, labels, seed=3)
    assert len(i) == 2
    for a, b in zip(i.tolist(), j.tolist()):
        m = fg[a]
        assert torch.allclose(out[a], m * images[a] + (1 - m) * images[b], atol=1e-5)
    odd = torch.rand(2, 3, 70, 90)  # sides that are not multiples of 32: padded as evaluation pads, cut back
    padded = torch.nn.functional.pad(odd, (0, 6, 0, 26))
    with torch.no_grad():
        expected = foreground(mask_lets(mask_logits(model, padded, flip=True)), 1)[..., :70, :90]
    assert torch.allclose(decoupler.foreground(odd), expected, atol=1e-6)
    same, _, _ = decoupler(images, labels, seed=3)
    assert torch.equal(out, same)
    untouched, _, pairs = decoupler(images, _labels([1, 1, 1, 1]), seed=3)  # no untagged image: nothing to do
    assert untouched is images and len(pairs[0]) == 0


def test_decoupler_refuses_a_segmenter_of_other_classes(tmp_path):
    path, _ = _segmenter(tmp_path, classes=("bird", "fish"))
    with pytest.raises(WeightsError, match=r"decouple_from .*\['bird', 'fish'\].*\['bird'\]"):
        Decoupler(path, ["bird"], 0.5, 2)


def test_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="classifier.decouple_p"):
        load_config(None, ["classifier.decouple_p=1.5"])
    with pytest.raises(ConfigError, match="classifier.decouple_dilate"):
        load_config(None, ["classifier.decouple_dilate=-1"])


def _stage1(work, toy_dataset, *extra):
    from tests.conftest import run_stage1

    return run_stage1(work, toy_dataset, "cda", "classifier.epochs=1", *extra)


@pytest.mark.slow
def test_stage1_with_a_first_round_segmenter(toy_dataset, tmp_path):
    missing = _stage1(tmp_path, toy_dataset, f"classifier.decouple_from={tmp_path}/nowhere.pt")
    assert missing.returncode != 0
    assert "classifier.decouple_from" in missing.stderr and "no such segmenter checkpoint" in missing.stderr
    path, _ = _segmenter(tmp_path)
    proc = _stage1(tmp_path, toy_dataset, f"classifier.decouple_from={path}", "classifier.decouple_p=1.0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "cda"
    assert (run / "classifier.pt").is_file()
    picture = Image.open(run / "decouple_examples.png")
    assert picture.width == 4 * 64 * 2 and picture.height % (64 * 2) == 0 and picture.height >= 64 * 2
    import mlflow

    # a client, not mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI in os.environ, which every later test's
    # subprocess would inherit (and log there instead of to its own database)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("wsssrec").experiment_id])
    tags = runs[0].data.tags
    assert tags["decouple.from"] == str(path) and tags["decouple.p"] == "1.0"
    assert len(tags["decouple_from.weights_sha256"]) == 64
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "decouple_examples.png" in artifacts
