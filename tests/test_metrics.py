"""Pixel and instance metrics on hand-made cases with hand-counted TP / FP / FN."""

from __future__ import annotations

import numpy as np
import pytest

from cellfit.metrics import (
    IOU_THRESHOLDS,
    aggregate_instance_metrics,
    instance_metrics,
    iou_pairs,
    pixel_metrics,
)


@pytest.mark.parametrize(("overlap", "matched"), [(19, 10), (18, 9), (14, 5), (10, 1), (9, 0)])
def test_default_thresholds_are_the_ten_from_0_5_to_0_95(overlap, matched):
    """A true object of 20 pixels and a prediction covering ``overlap`` of them (IoU
    overlap / 20): by default a pair is matched at each of the ten IoU thresholds
    0.5, 0.55, ..., 0.95 that it reaches, and AP@[.5:.95] is their mean."""
    truth = np.zeros((3, 24), np.int64)
    truth[1, 2:22] = 1
    pred = np.zeros_like(truth)
    pred[1, 2 : 2 + overlap] = 4
    m = instance_metrics(pred, truth)
    assert list(m) == list(IOU_THRESHOLDS)
    assert list(m) == pytest.approx([0.5 + 0.05 * i for i in range(10)])
    assert sum(r["tp"] for r in m.values()) == matched
    assert [r["tp"] for r in m.values()] == [1] * matched + [0] * (10 - matched)
    agg = aggregate_instance_metrics([m])
    assert agg["ap50"] == (1.0 if matched else 0.0)
    assert agg["ap50_95"] == pytest.approx(matched / 10)


# ------------------------------------------------------------------ pixel metrics
def test_pixel_metrics_hand_counted():
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    target = np.array([0, 1, 1, 1, 255, 2, 0, 255])
    # annotated pairs (pred, target): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); two ignored
    m = pixel_metrics(pred, target, 4, ["bg", "a", "b", "c"])
    assert list(m) == ["bg", "a", "b", "c"]
    # class bg: TP 1, FP 1, FN 1
    assert m["bg"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "iou": 1 / 3, "support": 2}
    )
    # class a: TP 2, FP 0 (the ignored pixel predicted a does not count), FN 1
    assert m["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "iou": 2 / 3, "support": 3}
    )
    # class b: TP 1, FP 1, FN 0
    assert m["b"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "iou": 0.5, "support": 1}
    )
    # class c never occurs: zeros, not NaN
    assert m["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0, "support": 0}


def test_pixel_metrics_2d_and_default_names():
    pred = np.array([[1, 1], [0, 0]])
    target = np.array([[1, 0], [0, 0]])
    m = pixel_metrics(pred, target, 2)
    assert set(m) == {"0", "1"}
    assert m["1"]["precision"] == pytest.approx(0.5)
    assert m["1"]["recall"] == pytest.approx(1.0)
    assert m["0"]["recall"] == pytest.approx(2 / 3)


def test_pixel_metrics_all_background_prediction_has_zero_recall():
    """The collapse cellfit must detect: high accuracy, zero recall."""
    target = np.zeros(1000, np.int64)
    target[:20] = 1
    pred = np.zeros(1000, np.int64)
    m = pixel_metrics(pred, target, 2)
    assert m["1"]["recall"] == 0.0 and m["1"]["f1"] == 0.0
    assert m["0"]["precision"] == pytest.approx(0.98)


# --------------------------------------------------------------- instance metrics
def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Three true cells of 16 px; four predictions.

    P1 = T1 exactly (IoU 1); P2 inside T2, 13 of 16 px (IoU 13/16 = 0.8125);
    P4 inside T3, 10 of 16 px (IoU 10/16 = 0.625); P3 touches nothing (false positive).
    """
    truth = np.zeros((20, 20), np.int32)
    truth[0:4, 0:4] = 1
    truth[0:4, 10:14] = 2
    truth[10:14, 10:14] = 3
    pred = np.zeros((20, 20), np.int32)
    pred[0:4, 0:4] = 1
    pred[0:4, 10:13] = 2
    pred[0, 13] = 2
    pred[15:19, 0:4] = 3
    pred[10:12, 10:14] = 4
    pred[12, 10:12] = 4
    return pred, truth


def test_iou_pairs_hand_case():
    pred, truth = _hand_case()
    pi, ti, iou = iou_pairs(pred, truth)
    got = {(int(p), int(t)): float(v) for p, t, v in zip(pi, ti, iou)}
    assert got == pytest.approx({(1, 1): 1.0, (2, 2): 13 / 16, (4, 3): 10 / 16})


@pytest.mark.parametrize(
    ("th", "tp", "fp", "fn"),
    [
        (0.5, 3, 1, 0),
        (0.55, 3, 1, 0),
        (0.6, 3, 1, 0),
        (0.65, 2, 2, 1),
        (0.7, 2, 2, 1),
        (0.75, 2, 2, 1),
        (0.8, 2, 2, 1),
        (0.85, 1, 3, 2),
        (0.9, 1, 3, 2),
        (0.95, 1, 3, 2),
    ],
)
def test_instance_metrics_hand_counted(th, tp, fp, fn):
    pred, truth = _hand_case()
    m = instance_metrics(pred, truth)[th]
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert m["precision"] == pytest.approx(tp / 4)
    assert m["recall"] == pytest.approx(tp / 3)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["ap"] == pytest.approx(tp / (tp + fp + fn))


def test_instance_metrics_do_not_depend_on_label_values():
    pred, truth = _hand_case()
    lut_p = np.array([0, 40, 7, 1000, 3])
    lut_t = np.array([0, 9, 65000, 2])
    a = instance_metrics(pred, truth)
    b = instance_metrics(lut_p[pred], lut_t[truth])
    assert a == b


def test_instance_metrics_match_one_to_one():
    # one prediction covering two true cells (IoU 1/2 with each) matches one at most
    truth = np.zeros((10, 10), np.int32)
    truth[0:4, 0:3] = 1
    truth[0:4, 3:6] = 2
    pred = np.zeros_like(truth)
    pred[0:4, 0:6] = 1  # a merge: IoU 12/24 = 0.5 with each
    m = instance_metrics(pred, truth, thresholds=(0.3, 0.6))
    assert (m[0.3]["tp"], m[0.3]["fp"], m[0.3]["fn"]) == (1, 0, 1)  # one cell, not two
    assert (m[0.6]["tp"], m[0.6]["fp"], m[0.6]["fn"]) == (0, 1, 2)


def test_instance_metrics_empty_images():
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 1
    m = instance_metrics(empty, empty)[0.5]
    assert (m["tp"], m["fp"], m["fn"], m["f1"], m["ap"]) == (0, 0, 0, 1.0, 1.0)
    m = instance_metrics(empty, one)[0.5]  # nothing found
    assert (m["tp"], m["fp"], m["fn"], m["recall"], m["f1"], m["ap"]) == (0, 0, 1, 0.0, 0.0, 0.0)
    m = instance_metrics(one, empty)[0.5]  # only a false positive
    assert (m["tp"], m["fp"], m["fn"], m["precision"], m["ap"]) == (0, 1, 0, 0.0, 0.0)


def test_instance_metrics_region_drops_predictions_outside_the_annotation():
    pred, truth = _hand_case()
    region = np.zeros(truth.shape, bool)
    region[:14] = True  # P3 (rows 15-18) lies outside
    m = instance_metrics(pred, truth, thresholds=(0.5,), region=region)[0.5]
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    assert m["ap"] == 1.0


def test_instance_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        instance_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_aggregate_pools_counts_over_images():
    pred, truth = _hand_case()
    perfect = np.zeros((10, 10), np.int32)
    perfect[1:4, 1:4] = 1
    perfect[6:9, 6:9] = 2
    per = [instance_metrics(pred, truth), instance_metrics(perfect, perfect)]
    agg = aggregate_instance_metrics(per)
    # at 0.5: TP 3 + 2, FP 1 + 0, FN 0 + 0
    assert agg["per_threshold"][0.5]["tp"] == 5
    assert agg["ap50"] == pytest.approx(5 / 6)
    assert agg["f1_50"] == pytest.approx(10 / 11)
    assert agg["precision_50"] == pytest.approx(5 / 6)
    assert agg["recall_50"] == pytest.approx(1.0)
    # pooled AP per threshold: (3+2)/(6), (2+2)/(5+2)... averaged over the ten thresholds
    ap = [5 / 6] * 3 + [4 / (4 + 2 + 1)] * 4 + [3 / (3 + 3 + 2)] * 3
    assert agg["ap50_95"] == pytest.approx(np.mean(ap))
    # pooling is not the mean of per-image AP
    assert agg["ap50"] != pytest.approx((3 / 4 + 1.0) / 2)


def test_aggregate_single_image_equals_its_metrics():
    pred, truth = _hand_case()
    agg = aggregate_instance_metrics([instance_metrics(pred, truth)])
    assert agg["ap50"] == pytest.approx(3 / 4)
    assert agg["f1_50"] == pytest.approx(6 / 7)
    assert agg["ap50_95"] == pytest.approx((3 * 3 / 4 + 4 * 2 / 5 + 3 * 1 / 6) / 10)


def test_aggregate_of_nothing_is_empty():
    assert aggregate_instance_metrics([]) == {}


def test_instance_metrics_region_may_be_a_0_1_mask():
    """An integer 0/1 mask means the same as a boolean one (it used to be used as
    indices, silently dropping correct predictions)."""
    pred, truth = _hand_case()
    region = np.zeros(truth.shape, np.uint8)
    region[:14] = 1
    as_bool = instance_metrics(pred, truth, thresholds=(0.5,), region=region.astype(bool))
    assert instance_metrics(pred, truth, thresholds=(0.5,), region=region) == as_bool
