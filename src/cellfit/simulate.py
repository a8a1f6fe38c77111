"""A simulated user who corrects a prediction, for measuring the correction loop.

After each round of training a user of cellfit looks at the prediction on the images
they painted and fixes the largest errors: a false object is painted as background, a
missed cell (or a cell merged into a neighbour) is painted whole. :func:`find_errors`
lists those errors against complete labels and :func:`correct` paints the largest
``n`` of them into a copy of the annotation, the way the plugin's brush would, so a
benchmark can measure what each round of corrections is worth (as Cellpose 2.0 did
for its human-in-the-loop training).

For "Paint here next" (:func:`cellfit.uncertainty.suggest_regions`) the simulated
user paints boxes instead: :func:`paint_regions` paints the truth inside each box,
:func:`random_regions` draws unpainted boxes at random, so a benchmark can compare
suggested with random boxes at equal effort.

Nothing here is used by training or prediction; it only needs complete labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cellfit.metrics import iou_pairs

__all__ = [
    "Correction", "ErrorObject", "correct", "find_errors", "paint_regions", "random_regions",
]

#: a predicted object matches a true cell at this IoU (as AP@0.5 counts them)
MATCH_IOU = 0.5


@dataclass(frozen=True)
class ErrorObject:
    """One error of a prediction.

    Attributes
    ----------
    kind : {"false", "missed"}
        ``false``: a predicted object that matches no cell and lies mostly on
        background; ``missed``: a true cell that no predicted object matches (not found,
        cut in pieces, or merged with a neighbour).
    label : int
        The predicted id (``false``) or the true id (``missed``).
    area : int
        Pixels of the object; the largest errors are corrected first.
    """

    kind: str
    label: int
    area: int


@dataclass(frozen=True)
class Correction:
    """What one round of corrections added.

    Attributes
    ----------
    annotation : ndarray
        The corrected annotation (a new array).
    cells : int
        Cells painted whole.
    background : int
        False objects painted as background.
    pixels : int
        Pixels whose annotation changed.
    """

    annotation: np.ndarray
    cells: int
    background: int
    pixels: int

    @property
    def strokes(self) -> int:
        """One stroke per correction."""
        return self.cells + self.background


def find_errors(pred: np.ndarray, truth: np.ndarray, annotation: np.ndarray) -> list[ErrorObject]:
    """The errors of ``pred`` against complete labels ``truth``, largest first.

    Errors the annotation already corrects are left out: a false object whose
    background pixels are all painted background, a missed cell already painted.

    Parameters
    ----------
    pred, truth : ndarray of int, shape (Y, X)
        Predicted and true instance labels (0 background).
    annotation : ndarray of int, shape (Y, X)
        The user's annotation so far (0 not annotated, 1 background, >= 2 cells).
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape or annotation.shape != truth.shape:
        raise ValueError(
            f"shapes differ: prediction {pred.shape}, truth {truth.shape}, "
            f"annotation {annotation.shape}"
        )
    pi, ti, iou = iou_pairs(pred, truth)
    good = iou >= MATCH_IOU
    matched_pred = set(pi[good].tolist())
    matched_true = set(ti[good].tolist())
    p_area = np.bincount(pred.ravel().astype(np.int64))
    t_area = np.bincount(truth.ravel().astype(np.int64))
    on_bg = np.bincount(pred[truth == 0].astype(np.int64), minlength=len(p_area))
    painted_bg = np.bincount(
        pred[(truth == 0) & (annotation == 1)].astype(np.int64), minlength=len(p_area)
    )
    painted_cell = np.bincount(
        truth[annotation >= 2].astype(np.int64), minlength=len(t_area)
    )
    errors = []
    for p in np.flatnonzero(p_area):
        if p == 0 or p in matched_pred:
            continue
        # mostly background, and background that is not yet painted as such
        if on_bg[p] * 2 >= p_area[p] and painted_bg[p] < on_bg[p]:
            errors.append(ErrorObject("false", int(p), int(p_area[p])))
    for t in np.flatnonzero(t_area):
        if t == 0 or t in matched_true:
            continue
        if painted_cell[t] * 2 < t_area[t]:
            errors.append(ErrorObject("missed", int(t), int(t_area[t])))
    errors.sort(key=lambda e: (-e.area, e.kind, e.label))
    return errors


def correct(
    annotation: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray,
    n: int = 10,
    ring: int = 4,
) -> Correction:
    """Paint the ``n`` largest errors of ``pred`` into a copy of ``annotation``.

    A false object: its pixels that are truth background are painted background (1),
    over unannotated pixels only. A missed cell: painted whole with a new id, with a
    ``ring``-pixel background ring on unannotated truth-background pixels, the way the
    first cells were painted. ``annotation`` is not modified.
    """
    ann = np.array(annotation, copy=True)
    truth = np.asarray(truth)
    errors = find_errors(pred, truth, ann)[: max(0, int(n))]
    next_id = max(2, int(ann.max()) + 1)
    cells = background = 0
    for e in errors:
        if e.kind == "false":
            where = (np.asarray(pred) == e.label) & (truth == 0) & (ann == 0)
            ann[where] = 1
            background += 1
        else:
            cell = truth == e.label
            if ring > 0:
                near = ndi.binary_dilation(cell, iterations=ring) & (truth == 0) & (ann == 0)
                ann[near] = 1
            ann[cell] = next_id
            next_id += 1
            cells += 1
    changed = int((ann != np.asarray(annotation)).sum())
    return Correction(ann, cells, background, changed)


#: a box with more than this share of painted pixels counts as painted already (as
#: :data:`cellfit.uncertainty.MAX_PAINTED`)
MAX_PAINTED = 0.05


def paint_regions(
    truth: np.ndarray,
    annotation: np.ndarray,
    regions: Sequence[tuple[int, int, int, int]],
) -> tuple[np.ndarray, dict]:
    """Paint the truth inside each box into a copy of ``annotation``, as a user would.

    Every true cell with a pixel inside a box is painted whole (also where it crosses
    the box's edge), with a new id, or with the id already painted on most of its
    painted pixels when the user had begun it; truth background inside the boxes is
    painted background (1). Pixels already painted keep their value. ``annotation`` is
    not modified.

    Parameters
    ----------
    truth : ndarray of int, shape (Y, X)
        Complete instance labels (0 background).
    annotation : ndarray of int, shape (Y, X)
        The annotation so far (0 not painted, 1 background, >= 2 one id per cell).
    regions : sequence of (y0, x0, y1, x1)
        Half-open boxes (a :class:`cellfit.uncertainty.Region`'s ``box``), clipped to
        the image.

    Returns
    -------
    annotation : ndarray
        The new annotation (the input's dtype, widened when new ids need it).
    effort : dict
        ``cells`` (cells that got new painted pixels), ``background`` (background
        pixels painted), ``pixels`` (pixels changed), ``regions`` (boxes painted).
    """
    truth = np.asarray(truth)
    annotation = np.asarray(annotation)
    if truth.shape != annotation.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and annotation {annotation.shape} must be "
                         "the same (Y, X)")
    ann = annotation.astype(np.promote_types(annotation.dtype, np.int32), copy=True)
    h, w = truth.shape
    inside = np.zeros(truth.shape, dtype=bool)
    n_regions = 0
    for y0, x0, y1, x1 in regions:
        y0, x0 = max(0, int(y0)), max(0, int(x0))
        y1, x1 = min(h, int(y1)), min(w, int(x1))
        if y1 > y0 and x1 > x0:
            inside[y0:y1, x0:x1] = True
            n_regions += 1
    free = ann == 0
    background = inside & (truth == 0) & free
    ann[background] = 1
    next_id = max(2, int(ann.max()) + 1)
    cells = 0
    boxes = ndi.find_objects(truth.astype(np.int64, copy=False))
    for t in np.unique(truth[inside & (truth != 0)]):
        sl = boxes[int(t) - 1]
        cell = truth[sl] == t
        sub = ann[sl]
        todo = cell & (sub == 0)
        if not todo.any():
            continue
        ids = sub[cell & (sub >= 2)]
        if ids.size:
            vals, counts = np.unique(ids, return_counts=True)
            cid = vals[np.argmax(counts)]
        else:
            cid = next_id
            next_id += 1
        sub[todo] = cid
        cells += 1
    changed = int((ann != annotation).sum())
    return ann, {"cells": cells, "background": int(background.sum()), "pixels": changed,
                 "regions": n_regions}


def random_regions(
    shape: tuple[int, int],
    annotation: np.ndarray,
    n: int,
    size: int,
    rng: np.random.Generator | int | None = None,
    *,
    max_painted: float = MAX_PAINTED,
    tries: int = 200,
) -> list[tuple[int, int, int, int]]:
    """Up to ``n`` random boxes ``(y0, x0, y1, x1)`` (half-open) of side ``size``
    (clipped to the image), each with at most ``max_painted`` of its pixels painted in
    ``annotation`` and none overlapping another: the boxes a user would paint without
    suggestions. Fewer when no more fit after ``tries`` draws per box."""
    h, w = int(shape[0]), int(shape[1])
    ann = np.asarray(annotation)
    if ann.shape != (h, w):
        raise ValueError(f"annotation {ann.shape} is not of shape {(h, w)}")
    rng = np.random.default_rng(rng)
    side = int(max(1, min(int(size), h, w)))
    s = np.zeros((h + 1, w + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(ann != 0, axis=0), axis=1)
    out: list[tuple[int, int, int, int]] = []
    for _ in range(max(0, int(n))):
        for _ in range(tries):
            y0 = int(rng.integers(0, h - side + 1))
            x0 = int(rng.integers(0, w - side + 1))
            y1, x1 = y0 + side, x0 + side
            painted = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
            if painted > max_painted * side * side:
                continue
            if any(a < y1 and y0 < c and b < x1 and x0 < d for a, b, c, d in out):
                continue
            out.append((y0, x0, y1, x1))
            break
    return out
