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


# ------------------------------------------------------- painting suggested boxes
def test_paint_regions_paints_the_truth_inside_boxes_whole_cells_new_ids():
    from cellfit.simulate import paint_regions

    truth = np.zeros((40, 60), np.int32)
    truth[5:15, 5:15] = 1  # inside the box
    truth[18:26, 18:30] = 2  # crosses the box's edge
    truth[30:36, 40:50] = 3  # outside
    truth[2:8, 30:38] = 4  # outside, already painted
    ann = np.zeros_like(truth)
    ann[2:8, 30:38] = 7
    ann[0, 0] = 1
    before = ann.copy()
    new, effort = paint_regions(truth, ann, [(0, 0, 20, 20)])
    assert np.array_equal(ann, before)  # the input is untouched
    box = (slice(0, 20), slice(0, 20))
    # inside the box: background painted 1, cells painted with ids >= 2
    assert np.array_equal(new[box] == 1, truth[box] == 0)
    # whole cells, one id each, new ids not colliding with the painted 7
    for t in (1, 2):
        ids = np.unique(new[truth == t])
        assert len(ids) == 1 and ids[0] >= 2 and ids[0] != 7
    assert new[truth == 1][0] != new[truth == 2][0]
    assert (new[18:26, 20:30] != 0).all()  # cell 2 outside the box too
    # nothing else: outside the box only the whole cells and what was painted
    outside = np.ones(truth.shape, bool)
    outside[box] = False
    outside &= ~np.isin(truth, (1, 2))
    assert np.array_equal(new[outside], ann[outside])
    assert effort["cells"] == 2 and effort["regions"] == 1
    assert effort["background"] == int((truth[box] == 0).sum()) - 1  # (0, 0) was painted
    assert effort["pixels"] == int((new != ann).sum())
    # a cell begun by the user is finished with the user's id
    begun = ann.copy()
    begun[5:8, 5:15] = 9
    again, effort = paint_regions(truth, begun, [(0, 0, 20, 20)])
    assert (again[truth == 1] == 9).all() and effort["cells"] == 2


def test_random_regions_are_unpainted_non_overlapping_and_inside():
    from cellfit.simulate import random_regions

    ann = np.zeros((200, 240), np.int32)
    ann[:100, :120] = 3
    boxes = random_regions(ann.shape, ann, 5, 30, np.random.default_rng(0))
    assert len(boxes) == 5
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        assert y0 >= 0 and y1 <= 200 and x0 >= 0 and x1 <= 240
        assert (y1 - y0, x1 - x0) == (30, 30)
        assert (ann[y0:y1, x0:x1] != 0).mean() <= 0.05
        for a, b, c, d in boxes[i + 1 :]:
            assert not (a < y1 and y0 < c and b < x1 and x0 < d)
    assert random_regions(ann.shape, np.ones_like(ann), 3, 30, 0) == []
    assert random_regions((10, 10), np.zeros((10, 10)), 1, 30, 0) == [(0, 0, 10, 10)]
