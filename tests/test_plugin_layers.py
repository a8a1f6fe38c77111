"""The dock's layer helpers: the plane arithmetic of stacks and copying a prediction
into an annotation (plain arrays, no viewer needed)."""

from __future__ import annotations

import hashlib

import numpy as np


def test_layer_layout_helpers():
    from cellfit.plugin._layers import (
        plane_number,
        plane_of,
        planes_of,
        stack_position,
        stack_shape,
    )

    assert stack_shape((5, 3, 64, 80)) == (5, 3)
    assert stack_shape((64, 80, 3), rgb=True) == ()
    assert plane_number((2, 1), (5, 3)) == 7
    assert plane_number((), ()) == 0
    assert plane_number((9, 9), (5, 3)) == 14  # clipped to the last plane
    assert stack_position(7, (5, 3)) == (2, 1) and stack_position(0, ()) == ()
    stack = np.arange(4 * 6 * 7).reshape(4, 6, 7)
    assert planes_of(stack).shape == (4, 1, 6, 7)
    np.testing.assert_array_equal(plane_of(stack, 2)[0], stack[2])
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[..., 1] = 5
    assert planes_of(rgb, rgb=True).shape == (1, 3, 6, 7)
    assert plane_of(rgb, 0, rgb=True)[1].max() == 5


def _digest(a: np.ndarray) -> str:
    """The array's bytes, shape and dtype, hashed: equal only for an unchanged array."""
    return hashlib.sha256(repr((a.shape, a.dtype.str)).encode() + a.tobytes()).hexdigest()


def test_prediction_to_annotation_copies_only_new_cells():
    from cellfit.plugin._layers import prediction_to_annotation

    ann = np.zeros((12, 12), np.uint16)
    ann[1:4, 1:4] = 2  # a painted cell
    ann[8:12, 0:3] = 1  # painted background
    pred = np.zeros((12, 12), np.int32)
    pred[1:4, 1:5] = 1  # overlaps the painted cell: skipped
    pred[6:9, 6:9] = 5  # new
    pred[9:12, 1:5] = 9  # new, partly over painted background: only free pixels written
    before = {"ann": _digest(ann), "pred": _digest(pred)}
    new, n = prediction_to_annotation(ann, pred, ring=1)
    # the caller's arrays are untouched (the dock hands in the layers' own data): the
    # result is a new array, not a view of the annotation
    assert {"ann": _digest(ann), "pred": _digest(pred)} == before
    assert new is not ann and not np.shares_memory(new, ann)
    assert n == 2
    assert set(np.unique(new[6:9, 6:9])) == {3}
    assert new[1, 4] == 0  # the skipped cell is not copied
    np.testing.assert_array_equal(new[8:12, 0:3], ann[8:12, 0:3])  # painted pixels kept
    assert new[11, 4] == 4  # free pixels of the second new cell
    assert new[5, 7] == 1 and new[9, 7] == 1  # the ring
    assert new.dtype == ann.dtype
    copied = _digest(new)
    same, none = prediction_to_annotation(new, pred, ring=1)
    assert none == 0
    np.testing.assert_array_equal(same, new)
    # nothing to copy: still a new array, and the input untouched
    assert same is not new and not np.shares_memory(same, new)
    same[0, 0] = 7
    assert _digest(new) == copied and _digest(pred) == before["pred"]


def test_annotated_planes_and_counts():
    from cellfit.plugin._layers import annotated_planes, count_annotation

    ann = np.zeros((2, 3, 10, 10), np.uint16)
    ann[0, 2, 1:4, 1:4] = 2
    ann[1, 0, 5:9, 5:9] = 1
    ann[1, 0, 0:2, 0:2] = 3
    np.testing.assert_array_equal(annotated_planes(ann), [2, 3])
    counts = count_annotation(ann)
    assert counts["cells"] == 2 and counts["planes"] == 2
    assert counts["background_pixels"] == 16



def test_prediction_layers_are_kept_or_replaced_by_shape_and_put_below_the_annotation(
    make_napari_viewer,
):
    from cellfit.plugin._layers import prediction_layers

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((20, 30), np.float32), name="img")
    annotation = viewer.add_labels(np.zeros((20, 30), np.uint16), name="img annotation")
    prob, lab = prediction_layers(viewer, image, annotation)
    assert prob.data.shape == lab.data.shape == (20, 30) and lab.contour == 1
    names = [layer.name for layer in viewer.layers]
    assert names.index("img probability") < names.index("img annotation")
    assert names.index("img labels") < names.index("img annotation")
    assert viewer.layers.selection.active is annotation  # the selection stays
    # the same shape again: the same layers
    assert prediction_layers(viewer, image, annotation) == (prob, lab)
    # the image now has another shape: both layers are made again, at the new shape
    image.data = np.zeros((24, 16), np.float32)
    prob2, lab2 = prediction_layers(viewer, image, annotation)
    assert prob2 is not prob and lab2 is not lab
    assert prob2.data.shape == lab2.data.shape == (24, 16)
    assert prob not in viewer.layers and lab not in viewer.layers


def test_prediction_to_annotation_copies_classes_as_their_painted_values():
    from cellfit.plugin._layers import prediction_to_annotation

    classes = np.zeros((12, 20), np.uint8)
    classes[1:4, 1:4] = 3  # a region of class 3: painted value 4
    classes[6:10, 6:9] = 1  # class 1, painted 2
    classes[6:10, 14:18] = 2  # class 2, touching a painted pixel: left alone
    ann = np.zeros((12, 20), np.uint8)
    ann[8, 15] = 3
    ann[0, 19] = 1
    new, n = prediction_to_annotation(ann, classes, ring=1, semantic=True)
    assert n == 2
    assert (new[1:4, 1:4] == 4).all() and (new[6:10, 6:9] == 2).all()
    assert (new[6:10, 14:18] == np.where(ann[6:10, 14:18] == 3, 3, 0)).all()
    assert new[0, 19] == 1 and new[4, 2] == 1  # the ring: background next to a copied region
    assert ann.max() == 3 and ann.sum() == 4  # the input is untouched
    # as cells (instance mode) the same map would give new ids instead
    cells, _ = prediction_to_annotation(ann, classes, ring=0)
    assert cells[2, 2] != 4 or cells[7, 7] != 2
