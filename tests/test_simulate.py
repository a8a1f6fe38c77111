"""The simulated user of the correction-loop benchmark adds exactly what it claims."""

import numpy as np

from cellfit.simulate import correct, find_errors


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _case():
    shape = (64, 96)
    truth = np.zeros(shape, np.int32)
    truth[_disk(shape, 16, 16, 6)] = 1  # found
    truth[_disk(shape, 16, 48, 8)] = 2  # missed (large)
    truth[_disk(shape, 48, 16, 4)] = 3  # missed (small)
    pred = np.zeros(shape, np.int32)
    pred[_disk(shape, 16, 16, 6)] = 1
    pred[_disk(shape, 48, 70, 7)] = 2  # false object on background
    pred[_disk(shape, 50, 40, 3)] = 3  # small false object
    ann = np.zeros(shape, np.uint16)
    ann[_disk(shape, 16, 16, 6)] = 2  # the one cell painted so far
    return truth, pred, ann


def test_errors_are_listed_largest_first_with_their_kind():
    truth, pred, ann = _case()
    errors = find_errors(pred, truth, ann)
    assert [(e.kind, e.label) for e in errors] == [
        ("missed", 2), ("false", 2), ("missed", 3), ("false", 3)]
    assert [e.area for e in errors] == sorted((e.area for e in errors), reverse=True)
    assert errors[0].area == int((truth == 2).sum())


def test_correct_paints_only_the_n_largest_and_counts_them():
    truth, pred, ann = _case()
    before = ann.copy()
    c = correct(ann, pred, truth, n=2, ring=2)
    np.testing.assert_array_equal(ann, before)  # the input is not modified
    assert (c.cells, c.background, c.strokes) == (1, 1, 2)
    new = c.annotation
    # the missed cell, whole, with a new id, and a background ring on truth background
    ids = np.unique(new[truth == 2])
    assert len(ids) == 1 and ids[0] == 3
    ring = (new == 1) & ~np.isin(pred, [2])
    assert ring.any() and (truth[ring] == 0).all()
    # the false object painted background, only where the truth is background
    assert (new[pred == 2] == 1).all()
    # the two smaller errors are untouched
    assert (new[truth == 3] == 0).all() and (new[pred == 3] == 0).all()
    assert c.pixels == int((new != before).sum())


def test_corrected_errors_are_not_listed_again():
    truth, pred, ann = _case()
    c = correct(ann, pred, truth, n=4, ring=0)
    assert (c.cells, c.background) == (2, 2)
    assert find_errors(pred, truth, c.annotation) == []
    again = correct(c.annotation, pred, truth, n=4)
    assert again.strokes == 0 and again.pixels == 0


def test_a_merged_pair_is_two_missed_cells():
    shape = (40, 60)
    truth = np.zeros(shape, np.int32)
    truth[10:30, 10:30] = 1
    truth[10:30, 30:50] = 2
    pred = np.where(truth > 0, 1, 0)  # both cells as one object (and a little more):
    pred[30:32, 10:50] = 1  # IoU under 0.5 with each
    errors = find_errors(pred, truth, np.zeros(shape, np.uint16))
    assert sorted((e.kind, e.label) for e in errors) == [("missed", 1), ("missed", 2)]


def test_an_object_covering_the_whole_image_is_an_error_too():
    """No pixel of background in the prediction (or the truth) loses no object."""
    shape = (20, 20)
    pred = np.ones(shape, np.int32)  # one false object over the whole empty image
    errors = find_errors(pred, np.zeros(shape, np.int32), np.zeros(shape, np.uint16))
    assert [(e.kind, e.label, e.area) for e in errors] == [("false", 1, 400)]
    truth = np.ones(shape, np.int32)  # one cell over the whole image, not found
    errors = find_errors(np.zeros(shape, np.int32), truth, np.zeros(shape, np.uint16))
    assert [(e.kind, e.label) for e in errors] == [("missed", 1)]
