"""Probabilities → labels: the seeded watershed splits touching cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellfit.postprocess import classes_from_probs, instances_from_probs, labels_from_probs


def _touching_discs(h: int = 64, w: int = 72, r: float = 13.0, gap: float = 22.0):
    """Two discs whose centres are ``gap`` apart (< 2r: they overlap), split by the
    perpendicular bisector, and a three-class probability map of them: interior,
    a one-pixel boundary ring where a disc meets background or the other disc,
    background."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx1 = h / 2, w / 2 - gap / 2
    cx2 = w / 2 + gap / 2
    d1 = np.hypot(yy - cy, xx - cx1)
    d2 = np.hypot(yy - cy, xx - cx2)
    truth = np.zeros((h, w), np.int32)
    truth[(d1 <= r) | (d2 <= r)] = np.where(d1 <= d2, 1, 2)[(d1 <= r) | (d2 <= r)]
    edge = (ndi.maximum_filter(truth, size=3) != ndi.minimum_filter(truth, size=3)) & (truth > 0)
    cls = np.where(truth == 0, 0, np.where(edge, 2, 1))
    return truth, cls


def _probs_from_classes(cls: np.ndarray, confidence: float = 0.9, blur: float = 0.0):
    k = 3
    probs = np.full((k, *cls.shape), (1 - confidence) / (k - 1), np.float32)
    for c in range(k):
        probs[c][cls == c] = confidence
    if blur:
        probs = np.stack([ndi.gaussian_filter(p, blur) for p in probs])
        probs /= probs.sum(0, keepdims=True)
    return probs


def _best_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    best = 0.0
    for lab in np.setdiff1d(np.unique(labels), [0]):
        obj = labels == lab
        best = max(best, (obj & mask).sum() / (obj | mask).sum())
    return best


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_watershed_splits_two_touching_discs(blur):
    truth, cls = _touching_discs()
    # the discs really touch: one connected foreground region
    assert ndi.label(truth > 0)[1] == 1
    labels = instances_from_probs(_probs_from_classes(cls, blur=blur))
    assert labels.dtype == np.int32
    assert labels.shape == truth.shape
    assert sorted(np.unique(labels)) == [0, 1, 2]
    for t in (1, 2):
        assert _best_iou(labels, truth == t) > 0.85
    # the two objects are different cells, not one cell and a fragment
    assert _best_iou(labels == 1, truth == 1) != _best_iou(labels == 1, truth == 2)
    # background stays background
    assert (labels[truth == 0] == 0).mean() > 0.97


def test_without_a_boundary_the_touching_discs_stay_one_object():
    """The boundary class is what separates them (so the test above can fail)."""
    truth, cls = _touching_discs()
    cls = np.where(cls == 2, 1, cls)  # interior everywhere on the cells
    labels = instances_from_probs(_probs_from_classes(cls))
    assert sorted(np.unique(labels)) == [0, 1]
    assert _best_iou(labels, truth > 0) > 0.95


def test_boundary_pixels_are_given_to_cells():
    _truth, cls = _touching_discs()
    labels = instances_from_probs(_probs_from_classes(cls))
    # the boundary ring is cell area (not background): it is assigned to an object
    assert (labels[cls == 2] > 0).mean() > 0.95


def test_small_objects_are_dropped():
    cls = np.zeros((40, 40), np.int64)
    cls[5:15, 5:15] = 1  # 100 px
    cls[30:33, 30:33] = 1  # 9 px
    probs = _probs_from_classes(cls)
    labels = instances_from_probs(probs, min_size=16)
    assert labels.max() == 1 and (labels[5:15, 5:15] == 1).all()
    assert (labels[30:33, 30:33] == 0).all()
    labels = instances_from_probs(probs, min_size=1)
    assert labels.max() == 2


def test_labels_are_consecutive():
    cls = np.zeros((40, 80), np.int64)
    for x0 in (2, 22, 42, 62):
        cls[10:25, x0 : x0 + 12] = 1
    cls[2:4, 35:37] = 1  # a 4-px speck, first in raster order, dropped by min_size
    labels = instances_from_probs(_probs_from_classes(cls))
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2, 3, 4])


def test_no_cell_gives_empty_labels():
    probs = _probs_from_classes(np.zeros((16, 20), np.int64))
    labels = instances_from_probs(probs)
    assert labels.shape == (16, 20) and labels.dtype == np.int32 and labels.max() == 0


def test_uncertain_interior_gives_no_seed():
    cls = np.zeros((30, 30), np.int64)
    cls[5:20, 5:20] = 1
    probs = _probs_from_classes(cls, confidence=0.45)  # p_interior 0.45 < 0.5
    assert instances_from_probs(probs).max() == 0
    assert instances_from_probs(probs, fg_threshold=0.4, seed_threshold=0.4).max() == 1


def test_classes_from_probs_argmax_and_dtype():
    probs = np.zeros((4, 2, 3), np.float32)
    probs[0] = 0.1
    probs[2, 0, :] = 0.9
    probs[3, 1, 2] = 0.95
    out = classes_from_probs(probs)
    np.testing.assert_array_equal(out, [[2, 2, 2], [0, 0, 3]])
    assert out.dtype == np.uint8
    many = np.zeros((300, 1, 2), np.float32)
    many[299, 0, 1] = 1.0
    out = classes_from_probs(many)
    assert out.dtype == np.uint16 and out.tolist() == [[0, 299]]


def test_labels_from_probs_follows_the_mode():
    _truth, cls = _touching_discs()
    probs = _probs_from_classes(cls)
    np.testing.assert_array_equal(
        labels_from_probs(probs, "instances"), instances_from_probs(probs)
    )
    np.testing.assert_array_equal(labels_from_probs(probs, "semantic"), cls)
