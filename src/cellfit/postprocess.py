"""Probability maps → labels.

Instance mode: seeded watershed. Seeds are connected regions of confident cell
interior; each grows over the cell area (interior + boundary, i.e. not background)
along falling interior probability, so touching cells separated by a boundary ring
become separate objects. Semantic mode: the most probable class per pixel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

__all__ = ["DEFAULT_MIN_SIZE", "classes_from_probs", "instances_from_probs", "labels_from_probs"]

DEFAULT_MIN_SIZE = 16


def instances_from_probs(
    probs: np.ndarray,
    fg_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_size: int = DEFAULT_MIN_SIZE,
) -> np.ndarray:
    """Instance labels from a ``(3, Y, X)`` map of background / interior / boundary.

    Parameters
    ----------
    probs : ndarray, shape (3, Y, X)
    fg_threshold : float
        A pixel belongs to a cell where ``1 - p_background`` exceeds this.
    seed_threshold : float
        Seeds are connected regions where ``p_interior`` exceeds this.
    min_size : int
        Objects (and seeds) smaller than this many pixels are dropped.

    Returns
    -------
    ndarray of int32, shape (Y, X)
        0 background, 1..N one id per cell.
    """
    p_bg, p_in = probs[0], probs[1]
    fg = (1.0 - p_bg) > fg_threshold
    seeds_mask = (p_in > seed_threshold) & fg
    markers, n = ndi.label(seeds_mask)
    if n == 0:
        return np.zeros(p_bg.shape, dtype=np.int32)
    if min_size > 1:
        markers = _drop_small(markers, max(1, min_size // 4))
    labels = watershed(-p_in, markers, mask=fg)
    if min_size > 1:
        labels = _drop_small(labels, min_size)
    return _relabel(labels)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def classes_from_probs(probs: np.ndarray) -> np.ndarray:
    """Class map from a ``(K, Y, X)`` map: 0 background, k = class k (uint8 or uint16)."""
    out = np.argmax(probs, axis=0)
    return out.astype(np.uint8 if probs.shape[0] <= 255 else np.uint16)


def labels_from_probs(probs: np.ndarray, mode: str, **kwargs) -> np.ndarray:
    """Labels of one plane: instances in instance mode, classes in semantic mode.

    ``kwargs`` go to :func:`instances_from_probs`; pass a model's ``info.postprocess``
    to use the settings learned with it (e.g. ``min_size``).
    """
    if mode == "instances":
        return instances_from_probs(probs, **kwargs)
    return classes_from_probs(probs)
