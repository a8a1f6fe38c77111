"""Annotation → training targets.

Annotation convention (one label image per image):

========  =====================================  ===============================
value     instance mode (default)                semantic mode
========  =====================================  ===============================
0         not annotated: ignored by the loss     not annotated: ignored
1         background                             background
2, 3, …   one id per cell, each cell painted     class 1, class 2, …
          whole
========  =====================================  ===============================

Instance mode trains three classes: background (0), cell interior (1) and cell
boundary (2), a ring of ``boundary_width`` pixels inside each cell where it touches
background or another cell. Cell pixels whose neighbourhood holds unannotated pixels
are ignored instead, so a half-painted neighbourhood never teaches a wrong boundary.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cellfit.errors import CellfitError

__all__ = [
    "IGNORE",
    "INSTANCE_CLASSES",
    "annotation_from_mask",
    "class_counts",
    "instance_targets",
    "looks_like_mask",
    "make_targets",
    "n_classes_for",
    "semantic_targets",
]

IGNORE = 255
INSTANCE_CLASSES = ("background", "cell", "boundary")


def _footprint(width: int) -> np.ndarray:
    r = max(1, int(width))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + (1 if r == 1 else 0)


def instance_targets(annotation: np.ndarray, boundary_width: int = 1) -> np.ndarray:
    """Three-class target of one 2D annotation.

    Parameters
    ----------
    annotation : ndarray of int, shape (Y, X)
        0 = not annotated, 1 = background, >= 2 = cell ids.
    boundary_width : int
        Thickness of the boundary ring inside each cell, in pixels.

    Returns
    -------
    ndarray of uint8, shape (Y, X)
        0 background, 1 interior, 2 boundary, ``IGNORE`` (255) ignored.
    """
    ann = np.asarray(annotation)
    if ann.ndim != 2:
        raise ValueError(f"instance_targets takes a 2D annotation, got shape {ann.shape}")
    out = np.full(ann.shape, IGNORE, dtype=np.uint8)
    out[ann == 1] = 0
    cells = ann >= 2
    if not cells.any():
        return out
    fp = _footprint(boundary_width)
    a = ann.astype(np.int64, copy=False)
    # Pad with 0 (unannotated) so cells at the image edge are not given a boundary there.
    lo = ndi.minimum_filter(a, footprint=fp, mode="constant", cval=0)
    hi = ndi.maximum_filter(a, footprint=fp, mode="constant", cval=0)
    touches_unannotated = lo == 0
    differs = (lo != a) | (hi != a)
    out[cells] = 1
    out[cells & differs] = 2
    out[cells & touches_unannotated] = IGNORE
    return out


def semantic_targets(annotation: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Class target of one annotation in semantic mode.

    Returns ``annotation - 1`` (background 0, class k at k) with 0 mapped to ``IGNORE``.
    """
    ann = np.asarray(annotation)
    if n_classes is not None and ann.size and int(ann.max()) > n_classes:
        raise CellfitError(
            f"the annotation uses class value {int(ann.max())} but the model has only "
            f"{n_classes - 1} classes: train a new model (start fresh) for more classes."
        )
    if ann.size and int(ann.max()) >= IGNORE:
        raise CellfitError(
            f"the annotation uses class value {int(ann.max())}; semantic mode supports at most "
            f"{IGNORE - 2} classes: use instance mode for cell ids."
        )
    out = np.where(ann == 0, IGNORE, ann.astype(np.int64) - 1).astype(np.uint8)
    return out


def n_classes_for(mode: str, annotations: list[np.ndarray]) -> int:
    """Number of network outputs: 3 in instance mode, ``max(annotation)`` in semantic mode."""
    if mode == "instances":
        return len(INSTANCE_CLASSES)
    top = max((int(a.max()) for a in annotations if a.size), default=1)
    return max(2, top)


def make_targets(
    annotation: np.ndarray, mode: str, n_classes: int | None = None, boundary_width: int = 1
) -> np.ndarray:
    """Targets of a ``(..., Y, X)`` annotation, plane by plane, same shape, uint8."""
    ann = np.asarray(annotation)
    flat = ann.reshape(-1, *ann.shape[-2:])
    if mode == "instances":
        out = np.stack([instance_targets(a, boundary_width) for a in flat])
    elif mode == "semantic":
        out = semantic_targets(flat, n_classes)
    else:
        raise CellfitError(f"unknown mode {mode!r}: use 'instances' or 'semantic'.")
    return out.reshape(ann.shape)


def class_counts(targets: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Number of annotated pixels of each class over a list of targets, shape (n_classes,)."""
    counts = np.zeros(n_classes, dtype=np.int64)
    for t in targets:
        c = np.bincount(t.ravel(), minlength=256)
        counts += c[:n_classes]
    return counts


def annotation_from_mask(mask: np.ndarray) -> np.ndarray:
    """Turn a complete label mask (0 = background, 1..N = cells or classes) into the
    annotation convention (1 = background, 2..N+1), every pixel annotated."""
    mask = np.asarray(mask)
    if mask.size and int(mask.max()) >= np.iinfo(np.uint32).max:
        raise CellfitError("the mask has too many labels: relabel it 1..N first.")
    return np.where(mask > 0, mask.astype(np.uint32) + 1, 1).astype(np.uint32)


def looks_like_mask(annotation: np.ndarray) -> bool:
    """True when an annotation looks like a complete mask given by mistake (so 1 is
    probably a cell, not background): most pixels are 0, and the pixels labelled 1 form
    one compact, cell-sized object that touches at most two other labels, unlike
    background strokes (thin) or a background ring (touching the painted cells)."""
    a = np.asarray(annotation)
    if a.ndim != 2 or a.size == 0 or (a == 0).mean() < 0.3:
        return False
    sizes = np.bincount(a.ravel().astype(np.int64))
    cells = sizes[2:][sizes[2:] > 0]
    if len(cells) < 2 or len(sizes) < 2 or sizes[1] == 0:
        return False
    one = a == 1
    if not 0.2 <= sizes[1] / np.median(cells) <= 5:
        return False
    _, n = ndi.label(one)
    if n != 1:
        return False
    ys, xs = np.nonzero(one)
    h, w = int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1
    if min(h, w) < 0.3 * max(h, w) or sizes[1] < 0.4 * h * w:
        return False
    ring = ndi.binary_dilation(one) & ~one
    touching = np.setdiff1d(np.unique(a[ring]), [0, 1])
    return len(touching) <= 2
