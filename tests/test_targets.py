"""Annotation → targets: background / interior / boundary / ignored, and semantic classes.

Expected maps are written out by hand (B background, I interior, E edge/boundary,
X ignored, U unannotated) rather than recomputed with filters.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellfit.errors import CellfitError
from cellfit.targets import (
    IGNORE,
    class_counts,
    instance_targets,
    make_targets,
    n_classes_for,
    semantic_targets,
)

B, I, E, X = 0, 1, 2, IGNORE  # noqa: E741


def grid(text: str) -> np.ndarray:
    """Parse a small picture: one row per line, one character per pixel."""
    rows = [r.split() for r in text.strip().splitlines()]
    return np.array([[int(v) for v in r] for r in rows])


def test_single_cell_surrounded_by_background():
    ann = np.ones((9, 9), np.uint16)
    ann[2:7, 2:7] = 2  # a 5x5 cell
    t = instance_targets(ann)
    assert t.dtype == np.uint8
    expected = np.full((9, 9), B, np.uint8)
    expected[2:7, 2:7] = E  # one-pixel ring where the cell touches background
    expected[3:6, 3:6] = I
    np.testing.assert_array_equal(t, expected)


def test_two_touching_cells_get_a_boundary_on_both_sides():
    ann = grid(
        """
        1 1 1 1 1 1 1 1 1 1
        1 1 1 1 1 1 1 1 1 1
        1 1 2 2 2 3 3 3 3 1
        1 1 2 2 2 3 3 3 3 1
        1 1 2 2 2 3 3 3 3 1
        1 1 2 2 2 3 3 3 3 1
        1 1 2 2 2 3 3 3 3 1
        1 1 1 1 1 1 1 1 1 1
        """
    )
    expected = grid(
        """
        0 0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0
        0 0 2 2 2 2 2 2 2 0
        0 0 2 1 2 2 1 1 2 0
        0 0 2 1 2 2 1 1 2 0
        0 0 2 1 2 2 1 1 2 0
        0 0 2 2 2 2 2 2 2 0
        0 0 0 0 0 0 0 0 0 0
        """
    )
    np.testing.assert_array_equal(instance_targets(ann), expected)


def test_cell_edge_facing_unannotated_pixels_is_ignored_not_boundary():
    # columns 0-1 are not annotated; the cell's left column touches them
    ann = np.ones((9, 9), np.uint16)
    ann[:, :2] = 0
    ann[2:7, 2:7] = 5
    t = instance_targets(ann)
    expected = np.full((9, 9), B, np.uint8)
    expected[:, :2] = X  # unannotated stays ignored
    expected[2:7, 2:7] = E
    expected[3:6, 3:6] = I
    expected[2:7, 2] = X  # edge pixels facing unannotated: ignored, not boundary
    np.testing.assert_array_equal(t, expected)
    assert not (t[2:7, 2] == E).any()


def test_diagonal_contact_with_unannotated_is_ignored():
    ann = np.ones((7, 7), np.uint16)
    ann[1:6, 1:6] = 2
    ann[0, 0] = 0  # one unannotated pixel touching the cell's corner diagonally
    t = instance_targets(ann)
    assert t[1, 1] == X
    assert t[1, 2] == E and t[2, 1] == E  # their neighbourhood holds no 0
    assert t[0, 0] == X


def test_cell_pixels_between_background_and_unannotated_are_ignored():
    # a half-painted neighbourhood never teaches a boundary
    ann = grid(
        """
        1 1 1 1 1
        1 2 2 2 0
        1 2 2 2 0
        1 2 2 2 0
        1 1 1 1 1
        """
    )
    expected = grid(
        """
        0 0 0 0 0
        0 2 2 255 255
        0 2 1 255 255
        0 2 2 255 255
        0 0 0 0 0
        """
    )
    np.testing.assert_array_equal(instance_targets(ann), expected)


def test_cell_at_the_image_border_has_no_boundary_along_the_border():
    ann = np.ones((7, 7), np.uint16)
    ann[:4, :4] = 2  # cell in the top-left corner, cut by the image edge
    t = instance_targets(ann)
    expected = np.full((7, 7), B, np.uint8)
    expected[:4, :4] = E
    expected[1:3, 1:3] = I
    expected[0, :4] = X  # the image edge is not a cell edge: those pixels are ignored
    expected[:4, 0] = X
    np.testing.assert_array_equal(t, expected)
    # the edge facing background (row 3, column 3) is boundary
    assert (t[3, 1:4] == E).all() and (t[1:4, 3] == E).all()


def test_cell_filling_the_whole_image_has_interior_and_no_boundary():
    ann = np.full((6, 6), 2, np.uint16)
    t = instance_targets(ann)
    assert not (t == E).any()
    assert (t[1:5, 1:5] == I).all()
    assert (t[0] == X).all() and (t[:, -1] == X).all()


def test_boundary_width_two_gives_a_two_pixel_ring():
    ann = np.ones((11, 11), np.uint16)
    ann[2:9, 2:9] = 7  # a 7x7 cell
    t = instance_targets(ann, boundary_width=2)
    expected = np.full((11, 11), B, np.uint8)
    expected[2:9, 2:9] = E
    expected[4:7, 4:7] = I
    np.testing.assert_array_equal(t, expected)


def test_only_background_and_unannotated():
    ann = np.array([[0, 1], [1, 0]])
    np.testing.assert_array_equal(instance_targets(ann), [[X, B], [B, X]])


def test_large_cell_ids_are_fine():
    ann = np.ones((9, 9), np.uint32)
    ann[2:7, 2:7] = 70000
    t = instance_targets(ann)
    assert (t[3:6, 3:6] == I).all() and t[2, 2] == E


def test_make_targets_works_plane_by_plane_on_a_stack():
    a = np.ones((9, 9), np.uint16)
    a[2:7, 2:7] = 2
    b = np.zeros((9, 9), np.uint16)
    b[4, 4] = 1
    stack = np.stack([a, b])
    t = make_targets(stack, "instances")
    assert t.shape == (2, 9, 9) and t.dtype == np.uint8
    np.testing.assert_array_equal(t[0], instance_targets(a))
    np.testing.assert_array_equal(t[1], instance_targets(b))
    assert (t[1] == X).sum() == 80 and t[1, 4, 4] == B


def test_make_targets_rejects_an_unknown_mode():
    with pytest.raises(CellfitError, match="unknown mode"):
        make_targets(np.ones((4, 4)), "panoptic")


def test_instance_targets_wants_2d():
    with pytest.raises(ValueError):
        instance_targets(np.ones((2, 4, 4)))


# ------------------------------------------------------------------- semantic
def test_semantic_targets_shift_classes_and_ignore_zero():
    ann = np.array([[0, 1, 2], [3, 1, 0]], np.uint16)
    t = semantic_targets(ann)
    assert t.dtype == np.uint8
    np.testing.assert_array_equal(t, [[X, 0, 1], [2, 0, X]])
    np.testing.assert_array_equal(make_targets(ann, "semantic", n_classes=3), t)


def test_semantic_single_class():
    ann = np.array([[1, 2], [0, 2]])
    assert n_classes_for("semantic", [ann]) == 2  # background + 1 class
    np.testing.assert_array_equal(semantic_targets(ann, 2), [[0, 1], [X, 1]])


def test_semantic_many_classes_31():
    # values 1 (background) .. 32 (class 31), plus unannotated pixels
    ann = np.arange(33, dtype=np.uint16).reshape(3, 11)
    assert n_classes_for("semantic", [ann]) == 32
    t = make_targets(ann, "semantic", n_classes=32)
    assert t.flat[0] == X
    np.testing.assert_array_equal(t.ravel()[1:], np.arange(32))
    counts = class_counts([t], 32)
    np.testing.assert_array_equal(counts, np.ones(32))
    # instance mode always has three outputs
    assert n_classes_for("instances", [ann]) == 3


def test_semantic_class_beyond_the_model_is_an_error():
    ann = np.array([[1, 5]])
    with pytest.raises(CellfitError, match=r"class value 5 .* only 3 classes"):
        semantic_targets(ann, n_classes=4)


def test_semantic_class_values_past_the_ignore_value_are_refused():
    ann = np.array([[1, 300]], np.uint16)
    with pytest.raises(CellfitError, match="at most 253 classes"):
        semantic_targets(ann)


def test_class_counts_counts_only_annotated_pixels():
    t1 = np.array([[0, 0, 1], [2, X, X]], np.uint8)
    t2 = np.array([[1, 1, X]], np.uint8)
    np.testing.assert_array_equal(class_counts([t1, t2], 3), [2, 3, 1])
