"""Boundary F-score (trainer/boundary.py) on hand-made masks: shifts within and beyond the 2-pixel tolerance,
empty predictions, all-background truth, the disk-shaped tolerance, ignore pixels, classes, the meter."""
import numpy as np
import pytest
import torch

from trainer.boundary import BoundaryMeter, boundary_counts, boundary_f, disk, precision_recall_f, region_boundary


def square(top: int, left: int, side: int = 20, size: int = 40, label: int = 1) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top:top + side, left:left + side] = label
    return mask


def scores(pred, truth, num_labels=2, tolerance=2):
    p, r, f = precision_recall_f(*boundary_counts(pred[None], truth[None], num_labels, tolerance))
    return float(p[0]), float(r[0]), float(f[0])


def test_boundary_is_the_one_pixel_inner_contour_and_not_the_image_border():
    edge = region_boundary(square(10, 10)[None] > 0)[0]
    assert int(edge.sum()) == 4 * 20 - 4  # the square's outer ring of pixels
    assert edge[10, 10:30].all() and edge[29, 10:30].all() and edge[10:30, 10].all() and edge[10:30, 29].all()
    assert not edge[11:29, 11:29].any()
    corner = torch.zeros(40, 40, dtype=torch.bool)
    corner[:10, :10] = True  # touches the image's top and left borders: only its right and bottom sides count
    assert int(region_boundary(corner[None])[0].sum()) == 10 + 10 - 1


def test_square_shifted_by_one_pixel_scores_one_at_tolerance_two():
    assert scores(square(10, 11), square(10, 10)) == (1.0, 1.0, 1.0)
    assert scores(square(11, 11), square(10, 10)) == (1.0, 1.0, 1.0)  # diagonal: √2 px away


def test_square_shifted_by_four_pixels_hand_computed():
    # truth ring: rows 10/29, columns 10/29 (76 px); prediction ring: columns 14..33 (76 px). Within 2 px of
    # the truth ring: top and bottom rows, columns 14..31 (18 + 18; columns 30, 31 are 1 and 2 px from the
    # truth corner column 29), the left side at rows 11, 12, 27, 28 (1 or 2 px below / above the truth's top
    # and bottom rows); the right side (column 33) is 4 px from column 29. 40 of 76, the same both ways.
    p, r, f = scores(square(10, 14), square(10, 10))
    assert p == pytest.approx(40 / 76) and r == pytest.approx(40 / 76) and f == pytest.approx(40 / 76)
    assert scores(square(10, 14), square(10, 10), tolerance=4) == (1.0, 1.0, 1.0)
    assert scores(square(10, 14), square(10, 10), tolerance=0)[2] == pytest.approx(32 / 76)  # top/bottom overlap


def test_tolerance_is_a_disk_of_radius_two():
    assert disk(2).sum() == 13  # (dy, dx) with dy² + dx² ≤ 4
    truth = torch.zeros(20, 20, dtype=torch.long)
    truth[10, 10] = 1  # a one-pixel region is its own boundary
    near, far = torch.zeros_like(truth), torch.zeros_like(truth)
    near[12, 10] = 1  # 2 px away
    far[12, 11] = 1  # √5 px away: inside a 5 × 5 square, outside the disk
    assert scores(near, truth) == (1.0, 1.0, 1.0)
    assert scores(far, truth) == (0.0, 0.0, 0.0)


def test_empty_prediction_and_all_background_truth():
    empty = torch.zeros(40, 40, dtype=torch.long)
    assert scores(empty, square(10, 10)) == (1.0, 0.0, 0.0)  # nothing predicted: precision 1, recall 0
    assert scores(square(10, 10), empty) == (0.0, 1.0, 0.0)  # a mask on a bird-free image
    assert scores(empty, empty) == (1.0, 1.0, 1.0)  # nothing to find, nothing predicted
    everything = torch.ones(40, 40, dtype=torch.long)  # all-foreground has no boundary inside the image
    assert scores(everything, square(10, 10)) == (1.0, 0.0, 0.0)


def test_predicted_boundary_on_ignore_pixels_is_left_out():
    truth = square(10, 10, side=20)
    grown = square(9, 9, side=22)
    truth[(grown == 1) & (truth == 0)] = 255  # a one-pixel ignore rim around the square
    _, predicted, found, true = (int(v[0]) for v in boundary_counts(grown[None], truth[None], 2, 2))
    assert predicted == 0 and true == 76 and found == 76  # the edge sits on the rim: not counted, still found
    assert scores(grown, truth) == (1.0, 1.0, 1.0)
    # the 4-px shift again: 2 of its 76 edge pixels ((10, 30) and (29, 30)) lie on the rim, both hits before
    p, r, _ = scores(square(10, 14), truth)
    assert p == pytest.approx(38 / 74) and r == pytest.approx(40 / 76)


def test_classes_match_only_their_own_boundary():
    truth = square(10, 10, label=2)
    assert scores(square(10, 10, label=1), truth, num_labels=3) == (0.0, 0.0, 0.0)
    assert scores(square(10, 10, label=2), truth, num_labels=3) == (1.0, 1.0, 1.0)


def test_meter_averages_positive_images_and_returns_every_image():
    truth = torch.stack([square(10, 10), square(10, 10), torch.zeros(40, 40, dtype=torch.long)])
    pred = torch.stack([square(10, 11), square(10, 14), square(10, 10)])
    meter = BoundaryMeter(2)
    per_image = meter.update(pred, truth, torch.tensor([True, True, False]))
    assert per_image.tolist() == pytest.approx([1.0, 40 / 76, 0.0])
    summary = meter.summary()
    assert summary["boundary_f"] == pytest.approx((1 + 40 / 76) / 2)
    assert summary["boundary_precision"] == pytest.approx((1 + 40 / 76) / 2)
    assert np.isnan(BoundaryMeter(2).summary()["boundary_f"])
    assert boundary_f(square(10, 11), square(10, 10)).tolist() == [1.0]


def test_padding_of_a_padded_batch_is_no_edge():
    truth = torch.full((40, 40), 255, dtype=torch.long)
    truth[:30, :30] = 0
    truth[10:30, 10:30] = 1  # touches the real image's bottom-right corner (30 × 30, padded to 40 × 40)
    pred = truth.clone()
    pred[truth == 255] = 1  # the prediction runs on into the padding, as a network's does
    meter = BoundaryMeter(2)
    assert meter.update(pred[None], truth[None], torch.tensor([True]), sizes=[(30, 30)]).tolist() == [1.0]
    assert BoundaryMeter(2).update(pred[None], truth[None], torch.tensor([True]))[0] < 1  # the padding's edge
