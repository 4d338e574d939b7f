"""Evaluation of real photos (issue 20, trainer side): multi-scale + flip test-time augmentation through the one
inference path (`eval.scales`; [1.0] is today's prediction bit for bit), the mIoU of one global confusion matrix
over the split (`miou_all`) next to the pooled-over-positive-images IoU, prediction at an image's own size
padded to a multiple of 32 (eval, `wsssrec predict` and the pyfunc model alike) and picture grids without the
padding."""
import numpy as np
import pytest
import torch
from test_real_crop import _photo_dataset

from trainer.config import EvalConfig, load_config
from trainer.effnet import EfficientNetLite0
from trainer.inference import PredictSettings, SegmenterPredictor, predict_masks
from trainer.metrics import SegmentationMeter
from trainer.models import Segmenter, mask_logits


class WidthAndLeft(torch.nn.Module):
    """A hand-computable mask network: foreground logit = pixel brightness + 1 on the left half of its input +
    (its input's width) / 32, background logit 0. Not mirror-symmetric and not scale-invariant, so flip and
    scale averaging both show; `divisor` 8 (inputs padded to multiples of 8)."""

    divisor, num_classes = 8, 1
    predict_labels = Segmenter.predict_labels

    def forward(self, images):
        assert images.shape[-1] % self.divisor == 0 and images.shape[-2] % self.divisor == 0
        fg = images.mean(dim=1).clone()
        fg[..., : images.shape[-1] // 2] += 1.0
        fg = fg + images.shape[-1] / 32
        return {"mask_logits": torch.stack([fg, torch.zeros_like(fg)], dim=1)}


def _grey(value: float, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.full((1, 3, h, w), value)


def test_one_scale_is_todays_prediction_bit_for_bit():
    torch.manual_seed(0)
    cfg = load_config(None, ["data.image_size=64"])
    assert cfg.eval.scales == [1.0] and PredictSettings.of(cfg.eval).scales == (1.0,)
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)["mask_logits"]
        flipped = (plain + model(images.flip(-1))["mask_logits"].flip(-1)) / 2  # today's formula
        assert torch.equal(mask_logits(model, images, False), plain)
        assert torch.equal(mask_logits(model, images, True, scales=[1.0]), flipped)
        for flip, expected in ((False, plain), (True, flipped)):
            pred = predict_masks(model, images, PredictSettings.of(cfg.eval, flip=flip))
            assert torch.equal(pred.logits, expected)
            assert torch.equal(pred.labels, model.predict_labels(expected))


def test_scales_average_the_hand_computed_logits():
    model, c = WidthAndLeft(), 0.3
    left = torch.tensor([1.0] * 4 + [0.0] * 4).expand(8, 8)
    # scale 1: width 8. Scale 2: 16 × 16, its left half +1 and width 16; bilinear back to 8 × 8 averages column
    # pairs (2d, 2d+1), which lie on the same side: the same step, width term 0.5. Scale 0.5: 4 × 4 padded to
    # 8 × 8 (width term 0.25), the real 4 columns all in the left half (+1), cut and resized back: 1 everywhere.
    at = {1.0: c + left + 0.25, 2.0: c + left + 0.5, 0.5: torch.full((8, 8), c + 1 + 0.25)}
    for scales in ([1.0, 2.0], [0.5, 1.0, 2.0], [0.5]):
        logits = mask_logits(model, _grey(c), flip=False, scales=scales)
        assert logits.shape == (1, 2, 8, 8)
        expected = sum(at[s] for s in scales) / len(scales)
        assert torch.allclose(logits[0, 0], expected, atol=1e-6), scales
        assert torch.equal(logits[0, 1], torch.zeros(8, 8))
    # with flip each scale's left-half +1 becomes +0.5 everywhere (at scale 0.5 the mirrored input has the
    # image in its right half, so the real columns get +1 from one view and 0 from the other)
    logits = mask_logits(model, _grey(c), flip=True, scales=[0.5, 1.0, 2.0])
    assert torch.allclose(logits[0, 0], torch.full((8, 8), c + 0.5 + (0.25 + 0.25 + 0.5) / 3), atol=1e-6)
    # the same through the one inference path, with an image whose size is no multiple of the divisor at a scale
    pred = predict_masks(model, _grey(c, 8, 16), PredictSettings(flip=False, scales=(1.5,)))
    assert pred.logits.shape == (1, 2, 8, 16)  # 12 × 24 → padded to 16 × 24: width term 24 / 32
    assert torch.allclose(pred.logits[0, 0, :, 0], torch.full((8,), c + 1 + 0.75), atol=1e-6)


def test_eval_scales_config_is_checked():
    from trainer.config import ConfigError

    assert load_config(None, ["eval.scales=[0.5, 1, 1.5, 2]"]).eval.scales == [0.5, 1, 1.5, 2]
    assert PredictSettings.of(load_config(None, ["eval.scales=[1, 2]"]).eval).scales == (1.0, 2.0)
    for bad in ("eval.scales=[]", "eval.scales=[0.5, 0]", "eval.scales=[true]", "eval.scales=['a']"):
        with pytest.raises(ConfigError, match="eval.scales"):
            load_config(None, [bad])


# ---- the global confusion matrix ----

def test_global_miou_by_hand():
    meter = SegmentationMeter(3)
    truth = torch.tensor([[[0, 1, 1], [0, 2, 255]],   # positive image A
                          [[0, 0, 0], [0, 0, 255]]])  # negative image B
    pred = torch.tensor([[[0, 1, 0], [2, 2, 1]],
                         [[0, 1, 0], [0, 0, 2]]])
    meter.update(pred, truth, torch.tensor([True, False]))
    s = meter.summary()
    # all images, ignore excluded: (t, p) = (0,0)×5, (0,1), (0,2), (1,0), (1,1), (2,2)
    # IoU 0 = 5 / (7 + 6 - 5), IoU 1 = 1 / (2 + 2 - 1), IoU 2 = 1 / (1 + 2 - 1)
    assert s["background_iou_all"] == pytest.approx(5 / 8)
    assert s["all_iou_1"] == pytest.approx(1 / 3) and s["all_iou_2"] == pytest.approx(1 / 2)
    assert s["miou_all"] == pytest.approx((5 / 8 + 1 / 3 + 1 / 2) / 3)
    # the pooled IoU of the toy tables: image A only, unchanged
    assert s["background_iou"] == pytest.approx(1 / 3) and s["iou_1"] == pytest.approx(1 / 2)
    assert s["iou_2"] == pytest.approx(1 / 2) and s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    # the negative image's false-positive area over its own (non-ignore) pixels: 1 of 5
    assert s["negative_fp_area"] == pytest.approx(1 / 5)
    # a label nobody predicted nor has: NaN, left out of the mean (mmsegmentation's nanmean)
    four = SegmentationMeter(4)
    four.update(pred, truth, torch.tensor([True, False]))
    assert np.isnan(four.summary()["all_iou_3"]) and four.summary()["miou_all"] == pytest.approx(s["miou_all"])


def test_global_miou_equals_the_pooled_iou_without_negative_images():
    rng = np.random.default_rng(0)
    meter = SegmentationMeter(4)
    for _ in range(3):
        truth = torch.from_numpy(rng.integers(0, 4, (5, 9, 11)))
        truth[:, 0, :3] = 255
        pred = torch.from_numpy(rng.integers(0, 4, (5, 9, 11)))
        meter.update(pred, truth, torch.ones(5, dtype=torch.bool))
    s = meter.summary()
    assert s["miou_all"] == s["miou"] and s["background_iou_all"] == s["background_iou"]
    assert all(s[f"all_iou_{k}"] == s[f"iou_{k}"] for k in range(1, 4))


def test_toy_negatives_have_no_ignore_pixels_so_their_fp_area_is_unchanged(toy_dataset):
    """negative_fp_area now leaves out ignore (255) pixels, the padding of real-photo batches; toy-birds'
    negative images have none, so the toy tables' number is the same as before."""
    cfg = load_config(None, [f"data.url={toy_dataset}", "data.image_size=64"])
    from trainer.data import eval_batches

    for split in ("val", "test_conflict"):
        for batch in eval_batches(cfg, split):
            negative = batch["labels"].sum(1) == 0
            assert negative.any() and not (batch["mask"][negative] == 255).any()


# ---- own size: eval, predict and the pyfunc model the same way ----

def _crop_model(url: str | None = None, *extra: str):
    torch.manual_seed(0)
    overrides = ["data.resize=crop", "data.image_size=64", "eval.flip=true", "eval.scales=[1.0, 1.5]", *extra]
    cfg = load_config(None, ([f"data.url={url}"] if url else []) + overrides)
    return cfg, Segmenter(cfg.model, 2, trunk=EfficientNetLite0(num_classes=2)).eval()


def test_predictor_takes_odd_sizes_padded_and_cut_back():
    from trainer.images import image_tensor, pad_to_multiple

    cfg, model = _crop_model()
    predictor = SegmenterPredictor(model, cfg, ["cat", "dog"])
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((37, 51, 3), (20, 33, 3), (64, 64, 3),
                                                                      (37, 51, 3), (70, 9, 3))]
    rows = predictor.segment(images, probabilities=True, batch_size=4)
    settings = PredictSettings.of(cfg.eval)
    for image, row in zip(images, rows):
        h, w = image.shape[:2]
        assert row["mask"].shape == (h, w) and row["probabilities"].shape == (3, h, w)
        padded = pad_to_multiple(image_tensor(image), 32)
        assert padded.shape[1:] == (-(-h // 32) * 32, -(-w // 32) * 32)
        assert (padded[:, h:] == 0).all() and (padded[:, :, w:] == 0).all()
        expected = predict_masks(model, padded[None], settings)
        assert np.array_equal(row["mask"], expected.labels[0, :h, :w].numpy())
        probs = torch.softmax(expected.logits[0, :, :h, :w], dim=0)
        assert np.allclose(row["probabilities"][1:], probs[:2].numpy(), atol=1e-6)
    assert np.array_equal(rows[0]["mask"], rows[3]["mask"])  # same image, same mask, whatever shares its batch


def test_eval_predict_and_pyfunc_predict_alike_at_own_size(tmp_path):
    """An evaluation batch of one image (padded by the loader) and the predictor (padded by images.py) give the
    same labels; the pyfunc model's predict is the predictor's."""
    import pandas as pd

    from trainer.data import eval_batches
    from trainer.pyfunc import PyfuncModel

    url = _photo_dataset(tmp_path / "ds")
    cfg, model = _crop_model(url, "data.eval_batch_size=1")
    predictor = SegmenterPredictor(model, cfg, ["cat", "dog"])
    pyfunc = PyfuncModel(predictor)
    settings = PredictSettings.of(cfg.eval)
    seen = 0
    for batch in eval_batches(cfg, "val"):
        h, w = batch["size"][0].tolist()
        assert batch["image"].shape[-2] % 32 == 0 and batch["image"].shape[-1] % 32 == 0
        labels = predict_masks(model, batch["image"], settings).labels[0, :h, :w].numpy()
        pixels = (batch["image"][0, :, :h, :w].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(predictor.segment([pixels])[0]["mask"], labels)
        served = pyfunc.predict(pd.DataFrame({"pixels": [pixels]}))["mask"][0]
        assert np.array_equal(np.asarray(served), labels)
        seen += 1
    assert seen == 8


def test_square_predictor_unchanged():
    """The toy sets' predictor (data.resize square) still resizes to image_size² and the logits back."""
    import torch.nn.functional as F

    from trainer.images import resize_for_model

    torch.manual_seed(0)
    cfg = load_config(None, ["data.image_size=64"])
    model = Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1)).eval()
    image = np.random.default_rng(2).integers(0, 256, (37, 51, 3), dtype=np.uint8)
    row = SegmenterPredictor(model, cfg, ["bird"]).segment([image])[0]
    pred = predict_masks(model, resize_for_model(image, 64)[None], PredictSettings.of(cfg.eval))
    full = F.interpolate(pred.logits, size=(37, 51), mode="bilinear", align_corners=False)
    assert np.array_equal(row["mask"], model.predict_labels(full)[0].numpy())


# ---- picture grids without the padding ----

def test_grid_rows_are_cut_to_each_image_size(tmp_path):
    from PIL import Image

    from trainer.evaluate import add_grid_rows
    from trainer.viz import save_grid

    B, K, H, W = 2, 2, 64, 96
    batch = {"image": torch.rand(B, 3, H, W), "labels": torch.tensor([[1.0], [0.0]]),
             "mask": torch.full((B, H, W), 255), "size": torch.tensor([[40, 90], [64, 33]])}
    preds = {"method": torch.zeros(B, H, W, dtype=torch.long), "CAM": torch.zeros(B, H, W, dtype=torch.long)}
    net_out = {"mask_logits": torch.randn(B, K, H, W), "imagelets": torch.rand(B, K, 3, H, W)}
    rows: list = []
    add_grid_rows(rows, [1, 1], batch, preds, net_out, torch.rand(B, 1, H, W))
    assert [[cell.shape[:2] for cell in row] for row in rows] == [[(40, 90)] * 9, [(64, 33)] * 9]
    assert np.array_equal(rows[0][0], (batch["image"][0, :, :40, :90].permute(1, 2, 0).numpy() * 255 + 0.5)
                          .astype(np.uint8))
    path = save_grid(rows, tmp_path / "grid.png", K=K, scale=1)
    canvas = np.asarray(Image.open(path))
    assert canvas.shape[:2] == (16 + 2 * (64 + 2), 9 * (90 + 2))  # the cell box is the largest image
    top = 16 + 64 + 2  # row 2 starts here; its 33-px-wide image leaves the rest of the 90-px box empty
    assert np.array_equal(canvas[top:top + 64, :33], rows[1][0])
    assert (canvas[top:top + 64, 33:90] == 40).all()


def test_default_eval_config_keeps_one_scale():
    assert EvalConfig().scales == [1.0]
