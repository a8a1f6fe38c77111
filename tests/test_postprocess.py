"""Probabilities → labels: the seeded watershed splits touching cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellfit.postprocess import (
    classes_from_probs,
    drop_small_objects,
    instances_from_probs,
    labels_from_probs,
    postprocess_settings,
    settings_from_cells,
)


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


def test_an_object_cut_by_the_image_edge_is_kept_down_to_a_quarter_of_min_size():
    cls = np.zeros((40, 40), np.int64)
    cls[0:4, 10:20] = 1  # 40 px on the edge: a cell the edge cut
    cls[20:24, 10:20] = 1  # 40 px inside: debris
    labels = instances_from_probs(_probs_from_classes(cls), min_size=100)
    assert labels.max() == 1
    assert (labels[0:4, 10:20] == 1).all() and (labels[20:24, 10:20] == 0).all()
    # under a quarter of min_size the edge does not save it
    assert instances_from_probs(_probs_from_classes(cls), min_size=200).max() == 0


def _merged_discs(r: float = 12.0, gap: float = 22.0, h: int = 60, w: int = 80):
    """Two overlapping discs predicted as one blob (interior, no boundary between)."""
    yy, xx = np.mgrid[:h, :w]
    d1 = np.hypot(yy - h / 2, xx - (w / 2 - gap / 2))
    d2 = np.hypot(yy - h / 2, xx - (w / 2 + gap / 2))
    return ((d1 <= r) | (d2 <= r)).astype(np.int64), d1 <= d2, np.pi * r * r


def test_given_the_cell_area_a_blob_of_two_convex_cells_is_cut_at_its_waist():
    cls, left, area = _merged_discs()
    probs = _probs_from_classes(cls)
    assert instances_from_probs(probs).max() == 1  # without the cell area: one object
    labels = instances_from_probs(probs, split_area=area)
    assert labels.max() == 2
    for side in (left, ~left):
        assert _best_iou(labels, side & (cls > 0)) > 0.9


@pytest.mark.parametrize(
    "shape",
    ["one disc", "an ellipse", "a kidney", "two cells far smaller than the cell area"],
)
def test_a_single_cell_is_not_cut(shape):
    yy, xx = np.mgrid[:60, :80]
    area = np.pi * 12.0**2
    if shape == "one disc":
        cls = np.hypot(yy - 30, xx - 40) <= 12
    elif shape == "an ellipse":  # convex, twice the cell area
        cls = ((yy - 30) / 10.0) ** 2 + ((xx - 40) / 29.0) ** 2 <= 1
    elif shape == "a kidney":  # a disc with a notch: not convex, one centre
        cls = (np.hypot(yy - 30, xx - 40) <= 16) & ~(np.hypot(yy - 30, xx - 58) <= 7)
    else:
        cls, _, small = _merged_discs(r=6.0, gap=10.0)
        area = 3 * small  # the blob is smaller than one cell: not two cells
    labels = instances_from_probs(_probs_from_classes(cls.astype(np.int64)), split_area=area)
    assert labels.max() == 1


def test_split_merged_leaves_convex_objects_and_the_input_alone():
    from cellfit.postprocess import split_merged

    cls, _, area = _merged_discs()
    labels = cls.astype(np.int32)
    before = labels.copy()
    out = split_merged(labels, area)
    np.testing.assert_array_equal(labels, before)
    assert out.max() == 2
    assert split_merged(labels, area * 3) is labels  # one cell's worth: nothing to cut


# ------------------------------------------------------------------ settings
def test_settings_learned_from_the_painted_cells():
    base = {"fg_threshold": 0.4, "split_area": 50}
    convex = settings_from_cells(base, 400.0, 0.95, min_size_fraction=0.25, split_solidity=0.93)
    assert convex == {"fg_threshold": 0.4, "min_size": 100, "split_area": 400}
    notched = settings_from_cells(base, 400.0, 0.9, min_size_fraction=0.25, split_solidity=0.93)
    assert notched == {"fg_threshold": 0.4, "min_size": 100}  # no cutting of merged blobs
    tiny = settings_from_cells({}, 20.0, 0.99, min_size_fraction=0.25, split_solidity=1.0)
    assert tiny == {"min_size": 16}  # at least 16 pixels; a solidity of 1 never splits
    assert base == {"fg_threshold": 0.4, "split_area": 50}  # not modified


def test_post_processing_overrides_are_merged_one_way():
    model = {"min_size": 100, "split_area": 400}
    assert postprocess_settings(model) == model and postprocess_settings(model) is not model
    assert postprocess_settings(model, None) == model
    assert postprocess_settings(model, {"min_size": 30}) == {"min_size": 30, "split_area": 400}
    assert postprocess_settings(model, {"min_size": None}) == model  # None: the model's
    assert postprocess_settings({}, {"fg_threshold": 0.3}) == {"fg_threshold": 0.3}
    assert model == {"min_size": 100, "split_area": 400}
    # planes resized by 0.5 (validation): areas scaled by 0.25, at least 4 pixels
    assert postprocess_settings(model, scale=0.5) == {"min_size": 25, "split_area": 100}
    assert postprocess_settings({"min_size": 10, "split_area": 0}, scale=0.1) == {
        "min_size": 4, "split_area": 0,
    }
    assert postprocess_settings({"min_size": 2}) == {"min_size": 2}  # no scale: as is


def test_drop_small_objects_keeps_edge_cells_down_to_at_edge():
    labels = np.zeros((20, 20), np.int32)
    labels[0:2, 0:3] = 1  # 6 px on the edge
    labels[8:10, 8:11] = 2  # 6 px inside
    labels[14:19, 14:19] = 3  # 25 px inside
    out = drop_small_objects(labels, 10, at_edge=5)
    assert set(np.unique(out)) == {0, 1, 3}
    assert set(np.unique(drop_small_objects(labels, 10))) == {0, 3}
    assert drop_small_objects(labels, 1) is labels  # nothing dropped: no copy
