"""The pieces of benchmarks/suggest.py (issue #15, "Measure that it helps"): each strategy
gives k boxes of one side inside the images, the random one reproducible from its seed,
the largest-error boxes centred on the largest errors, equal effort accounting, and the
report writing its section and target verdict. No model is trained."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def sb():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "suggest.py"
    spec = importlib.util.spec_from_file_location("suggest_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _disc_truth(shape, centres, r):
    yy, xx = np.indices(shape)
    t = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        t[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return t


@pytest.fixture
def case():
    """Two training images with complete truth and a little painting."""
    rng = np.random.default_rng(0)
    shapes = [(160, 200), (128, 128)]
    truths = [
        _disc_truth(shapes[0], [(30, 30), (30, 100), (100, 60), (120, 160), (60, 170)], 8),
        _disc_truth(shapes[1], [(30, 30), (90, 90), (40, 100)], 8),
    ]
    anns = []
    for t in truths:
        a = np.zeros(t.shape, np.int32)
        a[t == 1] = 2  # the first cell painted
        anns.append(a)
    images = [(t > 0).astype(np.float32) + 0.1 * rng.random(t.shape, dtype=np.float32)
              for t in truths]
    return shapes, truths, anns, images


def _check_boxes(boxes, shapes, k, size):
    assert len(boxes) == k
    for i, (y0, x0, y1, x1) in boxes:
        assert y1 - y0 == size and x1 - x0 == size
        assert y0 >= 0 and x0 >= 0 and y1 <= shapes[i][0] and x1 <= shapes[i][1]


def _no_overlap(boxes):
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (i, p), (j, q) = boxes[a], boxes[b]
            if i == j:
                assert not (p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3])


def test_suggested_boxes_pool_top_k_by_score(sb, case):
    shapes, _truths, anns, images = case
    uncs = [np.zeros(s, np.float32) for s in shapes]
    uncs[0][100:140, 150:190] = 1.0  # a very unsure patch on image 0
    uncs[1][60:100, 60:100] = 0.6  # less unsure patches on image 1
    uncs[1][0:30, 80:120] = 0.5
    boxes = sb.suggested_boxes(uncs, anns, [None, None], 3, 40, None)
    _check_boxes(boxes, shapes, 3, 40)
    _no_overlap(boxes)
    # the best box covers the most unsure patch, on image 0; the pool spans both images
    assert boxes[0] == (0, (100, 150, 140, 190))
    assert {i for i, _ in boxes} == {0, 1}
    # with image content given (the novelty) still k boxes of the side
    boxes = sb.suggested_boxes(uncs, anns, images, 3, 40, 16.0)
    _check_boxes(boxes, shapes, 3, 40)


def test_random_boxes_reproducible_and_inside(sb, case):
    shapes, _truths, anns, _images = case
    a = sb.random_boxes(shapes, anns, 3, 40, [0, 1])
    b = sb.random_boxes(shapes, anns, 3, 40, [0, 1])
    c = sb.random_boxes(shapes, anns, 3, 40, [0, 2])
    assert a == b
    assert a != c
    _check_boxes(a, shapes, 3, 40)
    _no_overlap(a)
    for i, (y0, x0, y1, x1) in a:  # unpainted (at most 5% painted)
        assert (anns[i][y0:y1, x0:x1] != 0).mean() <= 0.05


def test_random_boxes_move_to_another_image_when_one_is_full(sb, case):
    shapes, _truths, anns, _images = case
    anns = [anns[0], np.ones_like(anns[1])]  # image 1 wholly painted
    for seed in range(5):
        boxes = sb.random_boxes(shapes, anns, 3, 40, [seed, 1])
        _check_boxes(boxes, shapes, 3, 40)
        assert all(i == 0 for i, _ in boxes)
        _no_overlap(boxes)


def test_error_boxes_centred_on_largest_errors(sb, case):
    shapes, truths, anns, _images = case
    preds = [t.copy() for t in truths]
    # errors: image 0 misses its cell 4 (a disc of radius 8), image 1 has a large false
    # object (radius 12) and misses its cell 3
    preds[0][preds[0] == 4] = 0
    preds[1][preds[1] == 3] = 0
    false = _disc_truth(shapes[1], [(100, 30)], 12)
    preds[1][false > 0] = 9
    boxes = sb.error_boxes(preds, truths, anns, 2, 32)
    _check_boxes(boxes, shapes, 2, 32)
    # the largest error first: the false object on image 1, centred on it
    i, (y0, x0, y1, x1) = boxes[0]
    assert i == 1 and abs((y0 + y1) / 2 - 100.5) <= 1 and abs((x0 + x1) / 2 - 30.5) <= 1
    # then one of the equal missed cells (image 0's cell 4 at (120, 160), image 1's cell 3
    # at (40, 100)): ties go to the lower image index
    i, (y0, x0, y1, x1) = boxes[1]
    assert i == 0 and abs((y0 + y1) / 2 - 120.5) <= 1 and abs((x0 + x1) / 2 - 160.5) <= 1


def test_error_boxes_stay_inside_the_image(sb, case):
    shapes, truths, anns, _images = case
    preds = [t.copy() for t in truths]
    preds[1][preds[1] == 1] = 0  # the painted cell: find_errors skips it
    preds[1][preds[1] == 2] = 0  # missed cell near the far corner (90, 90)
    boxes = sb.error_boxes(preds, truths, anns, 1, 100)
    _check_boxes(boxes, shapes, 1, 100)
    assert boxes[0][0] == 1


def test_paint_boxes_counts_effort(sb, case):
    _shapes, truths, anns, _images = case
    boxes = [(0, (90, 50, 110, 70)), (1, (20, 20, 40, 40))]
    new, effort = sb.paint_boxes(truths, anns, boxes)
    assert effort["boxes"] == 2
    # image 0: cell 3 (at (100, 60)) painted whole; image 1: cell 1 was painted already
    assert effort["cells"] == 1
    assert (new[0][truths[0] == 3] >= 2).all()
    assert effort["background"] == int(((truths[0][90:110, 50:70] == 0)).sum()
                                       + (truths[1][20:40, 20:40] == 0).sum())
    assert (anns[0][truths[0] == 3] == 0).all()  # the input is left alone


def test_box_side_from_painted_cells(sb):
    a = np.zeros((300, 300), np.int32)
    a[:10, :10] = 2  # 100 px: diameter 11.3 -> 3 diameters 34
    assert sb.box_side([(300, 300)], [a]) == 34
    assert sb.box_side([(300, 300), (20, 300)], [a, a[:20]]) == 20  # no larger than images


def test_target(sb):
    assert sb.target([0.5, 0.7, 0.8, 0.8, 0.8], [0.5, 0.55, 0.6, 0.65, 0.7]) == {
        "round": 1, "rounds": 4, "goal": 0.7, "met": True}
    t = sb.target([0.5, 0.55, 0.6, 0.7, 0.8], [0.5, 0.55, 0.6, 0.65, 0.7])
    assert t["round"] == 3 and t["met"] is False
    t = sb.target([0.5, 0.5, 0.5], [0.5, 0.6, 0.7])
    assert t["round"] is None and t["met"] is False
    # round 0 is shared: it never counts as reaching the goal
    t = sb.target([0.7, 0.6, 0.65], [0.6, 0.62, 0.68])
    assert t["round"] is None and t["met"] is False
    # random fell below round 0: undecided
    t = sb.target([0.8, 0.4], [0.8, 0.5])
    assert t["met"] is None and t["rounds"] == 1


def _row(rnd, ap, boxes=3):
    return {"round": rnd, "ap50": ap, "precision": ap, "recall": ap, "boxes": boxes if rnd else 0,
            "cells": 5 if rnd else 0, "background": 1000 if rnd else 0, "choose_seconds": 2.0}


def test_report_writes_section_and_plot(sb, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text(
        "# Benchmarks\n\n<!-- generalise:start -->\ng\n<!-- generalise:end -->\n\nnotes\n\n"
        "<!-- starting-compare:start -->\nc\n<!-- starting-compare:end -->\n")
    res = {"set": "toy", "seed": 0, "box": 40, "boxes": 3, "round0_steps": 10,
           "round_steps": 5, "device": "cpu", "command": "python benchmarks/suggest.py --x",
           "engine": "abc", "strategies": {
               "suggested": [_row(0, 0.5), _row(1, 0.7), _row(2, 0.75)],
               "random": [_row(0, 0.5), _row(1, 0.6), _row(2, 0.65)],
               "largest error": [_row(0, 0.5), _row(1, 0.8), _row(2, 0.85)]}}
    other = json.loads(json.dumps(res))
    other["set"] = "toy2"
    other["strategies"]["suggested"] = [_row(0, 0.5), _row(1, 0.55), _row(2, 0.6)]
    paths = []
    for r in (res, other):
        p = tmp_path / f"{r['set']}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    assert sb.main(["--report", *map(str, paths), "--docs", str(docs)]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert text.index(sb.MARK_START) > text.index("notes")  # after the generalise notes
    assert text.index(sb.MARK_END) < text.index("<!-- starting-compare:start -->")
    body = text[text.index(sb.MARK_START):text.index(sb.MARK_END)]
    assert "| toy | suggested | 1 | 0.500 | 0.700 | 0.750 | 6 | 10 | 2000 |" in body
    assert "- toy: **met**" in body and "at round 1" in body
    assert "- toy2: **not met**" in body
    assert "reported-on set" in body
    assert (docs / "suggest.png").stat().st_size > 0
    # a second report replaces the section, not adds one
    assert sb.main(["--report", str(paths[0]), "--docs", str(docs)]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert text.count(sb.MARK_START) == 1 and "toy2" not in text
