"""IoU against hand-made cases; config precedence and errors that name the key."""
import math

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.metrics import SegmentationMeter


def test_iou_hand_made_case_with_ignore():
    truth = torch.tensor([[[1, 1, 0, 0], [1, 255, 0, 0]]])
    pred = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 0]]])
    meter = SegmentationMeter(2)
    meter.update(pred, truth, torch.tensor([True]))
    # valid pixels: 7 (one ignore). fg: truth {0,1,4}, pred {0,4,6} → tp 2, union 4
    # bg: truth {2,3,5,7}→ idx (0,2),(0,3),(1,2),(1,3); pred bg at (0,1),(0,2),(0,3),(1,3) → tp 3, union 5
    s = meter.summary()
    assert s["iou_1"] == pytest.approx(2 / 4)
    assert s["background_iou"] == pytest.approx(3 / 5)
    assert s["miou"] == pytest.approx((0.5 + 0.6) / 2)


def test_iou_pools_pixels_over_images_not_mean_of_images():
    meter = SegmentationMeter(2)
    big = torch.ones(1, 4, 4, dtype=torch.long)
    small = torch.zeros(1, 4, 4, dtype=torch.long)
    small[0, 0, 0] = 1
    meter.update(big, big, torch.tensor([True]))  # perfect on 16 fg pixels
    meter.update(torch.zeros_like(small), small, torch.tensor([True]))  # misses 1 fg pixel
    assert meter.summary()["iou_1"] == pytest.approx(16 / 17)


def test_negative_images_count_false_positive_area_not_iou():
    meter = SegmentationMeter(2)
    pred = torch.zeros(1, 2, 2, dtype=torch.long)
    pred[0, 0, 0] = 1
    meter.update(pred, torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([False]))
    s = meter.summary()
    assert s["negative_fp_area"] == pytest.approx(0.25)
    assert meter.confusion.sum() == 0
    assert math.isnan(s["iou_1"])


def test_config_precedence_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 50\nobjective:\n  lambda_m: 1e-3\n")
    cfg = load_config(path, ["train.steps=7", "model.decoder_widths=[8,8,8,8,8]"])
    assert cfg.train.steps == 7
    assert cfg.objective.lambda_m == pytest.approx(1e-3)
    assert cfg.model.decoder_widths == [8, 8, 8, 8, 8]
    assert cfg.data.image_size == 96  # default kept


def test_config_base_inheritance():
    cfg = load_config("configs/toy_birds_paper.yaml")
    assert cfg.objective.preset == "paper"
    assert cfg.model.encoder == "unet"
    assert cfg.toy.train == 2000  # from the base file


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.steps=many", "'train.steps' expects int"),
    ("objective.preset=magic", "'objective.preset' is 'magic'; expected one of paper, preserve_delete, cam_pseudo"),
    ("data.image_size=0", "'data.image_size' must be positive"),
    ("train.steps", "not of the form key.sub=value"),
    ("objective.erase_dilate=-2", "'objective.erase_dilate' must be ≥ 0 (0 = off), got -2"),
    ("objective.erase_start=-1", "'objective.erase_start' is a number of training steps, ≥ 0; got -1"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")


def test_stored_configs_from_older_versions_still_load():
    from trainer.config import Config, config_from_dict

    stored = Config().to_dict()
    stored["eval"]["mask_threshold"] = 0.5  # a key an older version wrote
    with pytest.raises(ConfigError, match="mask_threshold"):
        config_from_dict(stored)
    assert config_from_dict(stored, strict=False).eval.fg_threshold == 0.5
