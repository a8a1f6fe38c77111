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
    labels = _seeded_watershed(p_in, markers, fg)
    if min_size > 1:
        labels = _drop_small(labels, min_size)
    return _relabel(labels)


def _seeded_watershed(p_in: np.ndarray, markers: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """``watershed(-p_in, markers, mask=fg)``, flooding only where it can matter.

    Flooding never leaves a connected region of ``fg`` (the watershed's connectivity,
    1, is ``ndi.label``'s), so a region holding one seed becomes that seed's object
    whole, and a region holding none stays 0: only regions with two or more seeds
    (touching cells) go through the watershed, in one call.
    """
    regions, n_regions = ndi.label(fg)
    if n_regions == 0:
        return np.zeros(fg.shape, dtype=np.int32)
    at = markers > 0
    # the distinct (region, seed) pairs: a seed lies in one region (seeds are inside fg)
    pairs = np.unique(regions[at].astype(np.int64) * (int(markers.max()) + 1) + markers[at])
    region_of, seed_of = np.divmod(pairs, int(markers.max()) + 1)
    n_seeds = np.bincount(region_of, minlength=n_regions + 1)
    lut = np.zeros(n_regions + 1, dtype=np.int32)
    one = n_seeds[region_of] == 1
    lut[region_of[one]] = seed_of[one]
    labels = lut[regions]
    crowded = n_seeds >= 2
    if crowded.any():
        mask = crowded[regions]
        flooded = watershed(-p_in, np.where(mask, markers, 0), mask=mask)
        labels[mask] = flooded[mask]
    return labels


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
    present = np.bincount(labels.ravel()) > 0  # the ids in use, without sorting pixels
    present[0] = False
    lut = np.zeros(len(present), dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
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
