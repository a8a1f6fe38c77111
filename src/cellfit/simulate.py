"""A simulated user who corrects a prediction, for measuring the correction loop.

After each round of training a user of cellfit looks at the prediction on the images
they painted and fixes the largest errors: a false object is painted as background, a
missed cell (or a cell merged into a neighbour) is painted whole. :func:`find_errors`
lists those errors against complete labels and :func:`correct` paints the largest
``n`` of them into a copy of the annotation, the way the plugin's brush would, so a
benchmark can measure what each round of corrections is worth (as Cellpose 2.0 did
for its human-in-the-loop training).

Nothing here is used by training or prediction; it only needs complete labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cellfit.metrics import iou_pairs

__all__ = ["Correction", "ErrorObject", "correct", "find_errors"]

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
