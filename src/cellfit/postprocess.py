"""Probability maps → labels.

Instance mode: seeded watershed. Seeds are connected regions of confident cell
interior; each grows over the cell area (interior + boundary, i.e. not background)
along falling interior probability, so touching cells separated by a boundary ring
become separate objects. Two shape rules follow:

- an object cut by the image edge is only a part of a cell, so it is kept down to a
  quarter of ``min_size``;
- given the typical area of one cell (``split_area``, set when the painted cells are
  convex, like nuclei), a blob that is larger than one cell and not convex, with two
  or more centres in its distance map, is cut along its waist: two touching nuclei
  the network did not separate.

Semantic mode: the most probable class per pixel, or, for a model whose classes are
kinds of whole objects, one class per object found (:mod:`cellfit.objectclass`).

The settings of these rules travel with a model (``ModelInfo.postprocess``, learned
from the painted cells by :func:`settings_from_cells`); :func:`postprocess_settings`
puts a user's overrides on top of them, and :func:`calibrate` chooses the thresholds
that score best on cells held back from training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.measure import regionprops
from skimage.segmentation import watershed

from cellfit.metrics import aggregate_instance_metrics, instance_metrics
from cellfit.objectclass import ObjectClassifier, classify_objects, foreground

__all__ = [
    "DEFAULT_MIN_SIZE",
    "MIN_SIZE_FACTORS",
    "SPLIT_SOLIDITY",
    "THRESHOLDS",
    "annotated_instance_metrics",
    "calibrate",
    "classes_from_probs",
    "drop_small_objects",
    "instances_from_probs",
    "labels_from_probs",
    "postprocess_settings",
    "settings_from_cells",
    "solidity",
    "split_merged",
]

DEFAULT_MIN_SIZE = 16
#: Objects less solid than this (area / convex hull area) may be two cells.
SPLIT_SOLIDITY = 0.9
#: ... when they are also this much larger than one cell.
SPLIT_MIN_AREA = 1.1
#: Centres closer than this fraction of a cell's diameter are one cell.
SPLIT_MIN_DISTANCE = 0.4
#: Centres this shallow (distance to the edge, fraction of a diameter) are no cell.
SPLIT_MIN_DEPTH = 0.15
#: The foreground and seed thresholds :func:`calibrate` tries.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: ... and the multiples of the learned ``min_size``.
MIN_SIZE_FACTORS = (0.5, 1.0, 2.0)


def instances_from_probs(
    probs: np.ndarray,
    fg_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_size: int = DEFAULT_MIN_SIZE,
    split_area: float | None = None,
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
        Objects (and seeds) smaller than this many pixels are dropped; objects cut by
        the image edge are kept down to a quarter of it.
    split_area : float, optional
        Typical area of one cell (pixels). When given, merged convex cells are split
        (:func:`split_merged`).

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
        markers = drop_small_objects(markers, max(1, min_size // 4))
    labels = _seeded_watershed(p_in, markers, fg)
    if split_area:
        labels = split_merged(labels, split_area)
    if min_size > 1:
        labels = drop_small_objects(labels, min_size, max(1, min_size // 4))
    return _relabel(labels)


def solidity(labels: np.ndarray) -> np.ndarray:
    """Area / convex hull area of each object of ``labels`` (index 0 unused)."""
    out = np.ones(int(labels.max()) + 1)
    for r in regionprops(labels):
        out[r.label] = r.solidity
    return out


def split_merged(labels: np.ndarray, cell_area: float) -> np.ndarray:
    """Cut blobs that look like two or more touching convex cells along their waists.

    A blob is cut when it is larger than ``SPLIT_MIN_AREA`` cells of ``cell_area``
    pixels, less solid than ``SPLIT_SOLIDITY``, and its distance map (distance to the
    blob's edge) has two or more peaks at least ``SPLIT_MIN_DISTANCE`` cell diameters
    apart and ``SPLIT_MIN_DEPTH`` diameters deep; the pieces are the watershed of the
    distance map from those peaks. Convex or single-peaked objects are kept as they are.
    """
    if cell_area <= 0 or labels.max() == 0:
        return labels
    diameter = 2.0 * np.sqrt(cell_area / np.pi)
    out = None
    next_id = int(labels.max()) + 1
    for r in regionprops(labels):
        if r.area < SPLIT_MIN_AREA * cell_area or r.solidity >= SPLIT_SOLIDITY:
            continue
        blob = np.pad(r.image, 1)
        dist = ndi.distance_transform_edt(blob)
        peaks = peak_local_max(
            dist,
            min_distance=max(1, int(SPLIT_MIN_DISTANCE * diameter)),
            threshold_abs=SPLIT_MIN_DEPTH * diameter,
            exclude_border=False,
            labels=blob.astype(np.int32),
        )
        if len(peaks) < 2:
            continue
        markers = np.zeros(blob.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = watershed(-dist, markers, mask=blob)[1:-1, 1:-1]
        if out is None:
            out = labels.copy()
        view = out[r.slice]
        for k in range(2, len(peaks) + 1):
            view[(pieces == k) & r.image] = next_id
            next_id += 1
    return labels if out is None else out


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


def drop_small_objects(labels: np.ndarray, min_size: int, at_edge: int | None = None) -> np.ndarray:
    """Drop objects under ``min_size`` pixels; those touching the image edge are only
    dropped under ``at_edge`` pixels (the edge cut them).

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X)
        0 background, one id per object.
    min_size : int
    at_edge : int, optional
        The smallest object kept where it touches the image edge (None: ``min_size``).

    Returns
    -------
    ndarray
        ``labels`` itself when nothing is dropped, else a copy with the dropped
        objects set to 0 (ids are not renumbered).
    """
    if labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    too_small = sizes < min_size
    if at_edge is not None:
        on_edge = np.zeros(len(sizes), dtype=bool)
        for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            on_edge[side] = True
        too_small &= ~on_edge | (sizes < at_edge)
    too_small[0] = False
    if too_small.any():
        labels = labels.copy()
        labels[too_small[labels]] = 0
    return labels



def _relabel(labels: np.ndarray) -> np.ndarray:
    present = np.bincount(labels.ravel()) > 0  # the ids in use, without sorting pixels
    present[0] = False
    lut = np.zeros(len(present), dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels]


def classes_from_probs(probs: np.ndarray) -> np.ndarray:
    """Class map from a ``(K, Y, X)`` map: 0 background, k = class k (uint8 or uint16),
    each pixel its likeliest class."""
    dtype = np.uint8 if probs.shape[0] <= 255 else np.uint16
    return np.argmax(probs, axis=0).astype(dtype)


def labels_from_probs(
    probs: np.ndarray, mode: str, image: np.ndarray | None = None, **kwargs
) -> np.ndarray:
    """Labels of one plane: instances in instance mode, classes in semantic mode.

    ``kwargs`` go to :func:`instances_from_probs`; pass a model's ``info.postprocess``
    to use the settings learned with it (e.g. ``min_size``). A semantic model whose
    classes are whole objects (``objects`` in its settings, see
    :mod:`cellfit.objectclass`) gives each object found one class, decided from the
    object's shape and the raw plane ``image`` ``(C, Y, X)`` under it; without the image
    its pixels are classed one by one.
    """
    if mode == "instances":
        return instances_from_probs(probs, **kwargs)
    if kwargs.get("objects") and image is not None:
        clf = ObjectClassifier.from_dict(kwargs["objects"])
        return classify_objects(image, foreground(probs, clf.threshold), clf, probs.shape[0])
    return classes_from_probs(probs)


def settings_from_cells(
    base: Mapping,
    cell_area: float,
    cell_solidity: float,
    *,
    min_size_fraction: float,
    split_solidity: float,
) -> dict:
    """The post-processing settings a model learns from its painted cells.

    Parameters
    ----------
    base : mapping
        The model's settings so far (``ModelInfo.postprocess``); other keys are kept.
    cell_area : float
        Median area of the painted cells (pixels, at the model's scale).
    cell_solidity : float
        Median solidity (area / convex hull area) of the painted cells.
    min_size_fraction : float
        ``min_size`` is this share of ``cell_area`` (at least :data:`DEFAULT_MIN_SIZE`).
    split_solidity : float
        Cells at least this solid (convex, like nuclei) set ``split_area`` to
        ``cell_area``, so merged pairs are cut (:func:`split_merged`); less solid cells
        remove it.

    Returns
    -------
    dict
        ``base`` with ``min_size`` and, for convex cells, ``split_area``.

    Examples
    --------
    >>> settings_from_cells({"split_area": 50}, 400.0, 0.95, min_size_fraction=0.25,
    ...                     split_solidity=0.93)
    {'min_size': 100, 'split_area': 400}
    >>> settings_from_cells({"split_area": 50}, 400.0, 0.8, min_size_fraction=0.25,
    ...                     split_solidity=0.93)
    {'min_size': 100}
    """
    settings = {**base, "min_size": max(DEFAULT_MIN_SIZE, int(min_size_fraction * cell_area))}
    settings.pop("split_area", None)
    if cell_solidity >= split_solidity:
        settings["split_area"] = int(cell_area)  # convex cells: cut merged blobs
    return settings


def postprocess_settings(
    base: Mapping,
    overrides: Mapping | None = None,
    *,
    scale: float | None = None,
) -> dict:
    """The keyword arguments of :func:`instances_from_probs` to use.

    Parameters
    ----------
    base : mapping
        A model's own settings (``ModelInfo.postprocess``).
    overrides : mapping, optional
        The user's settings; each one given replaces the model's (a value of None
        keeps the model's).
    scale : float, optional
        For planes resized by ``scale`` (model pixels per image pixel, as during
        validation): the areas ``min_size`` and ``split_area`` are scaled by
        ``scale ** 2``, and kept at 4 pixels or more.

    Returns
    -------
    dict
        A new dict; the inputs are not modified.

    Examples
    --------
    >>> postprocess_settings({"min_size": 100, "split_area": 400}, {"min_size": 30})
    {'min_size': 30, 'split_area': 400}
    >>> postprocess_settings({"min_size": 100}, {"min_size": None})
    {'min_size': 100}
    >>> postprocess_settings({"min_size": 100, "split_area": 400}, scale=0.5)
    {'min_size': 25, 'split_area': 100}
    """
    settings = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if scale is not None:
        if "min_size" in settings:
            settings["min_size"] = max(4, int(settings["min_size"] * scale**2))
        if settings.get("split_area"):
            settings["split_area"] = max(4, int(settings["split_area"] * scale**2))
    return settings


def annotated_instance_metrics(probs: np.ndarray, annotation: np.ndarray, settings: Mapping) -> dict:
    """Instance figures at IoU 0.5 of one plane's prediction against a partial annotation.

    Parameters
    ----------
    probs : ndarray, shape (3, Y, X)
        Background / interior / boundary probabilities.
    annotation : ndarray of int, shape (Y, X)
        0 not annotated, 1 background, 2, 3, ... one id per cell.
    settings : mapping
        Keyword arguments of :func:`instances_from_probs`, in the plane's pixels.

    Returns
    -------
    dict
        :func:`cellfit.metrics.instance_metrics` at 0.5; predicted objects lying mostly
        on unannotated pixels are not counted (they may be cells nobody painted).
    """
    truth = np.where(annotation >= 2, annotation, 0)
    pred = instances_from_probs(probs, **settings)
    return instance_metrics(pred, truth, (0.5,), region=annotation != 0)


def calibrate(
    probs_list: Sequence[np.ndarray],
    annotations: Sequence[np.ndarray],
    base: Mapping,
    *,
    scale: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    min_size_factors: Sequence[float] = MIN_SIZE_FACTORS,
) -> dict:
    """The ``fg_threshold``, ``seed_threshold`` and ``min_size`` that score best
    (AP@0.5) on annotated planes, the network's probabilities computed once.

    Parameters
    ----------
    probs_list : list of ndarray, each (3, Y, X)
        Probabilities of each plane (e.g. the crops around cells held back from training).
    annotations : list of ndarray, each (Y, X)
        Their partial annotations (0 not annotated, 1 background, >= 2 cells).
    base : mapping
        The model's settings (``ModelInfo.postprocess``); ``min_size`` (default
        :data:`DEFAULT_MIN_SIZE`) is the one learned from the painted cells.
    scale : float, optional
        The planes were resized by ``scale`` (as during validation): the areas are
        converted with :func:`postprocess_settings` to score, and the settings returned
        stay in the model's units, as ``base`` is.
    thresholds : sequence of float
        The values tried for both thresholds.
    min_size_factors : sequence of float
        The multiples of ``base``'s ``min_size`` tried.

    Returns
    -------
    dict
        ``settings`` (``base`` with the chosen values), ``chosen`` (``fg_threshold``,
        ``seed_threshold``, ``min_size``), ``score`` (AP@0.5 with them) and
        ``default_score`` (with ``base``'s own values, 0.5 / 0.5 where it has none). A
        tie keeps the value nearest ``base``'s, so only a real gain changes the model.

    Examples
    --------
    >>> probs = np.zeros((3, 20, 20)); probs[0] = 1.0
    >>> probs[:, 5:15, 5:15] = np.array([0.6, 0.4, 0.0])[:, None, None]  # a dim cell
    >>> ann = np.ones((20, 20), int); ann[5:15, 5:15] = 2
    >>> out = calibrate([probs], [ann], {"min_size": 16})
    >>> out["chosen"]["fg_threshold"], out["chosen"]["seed_threshold"], out["score"]
    (0.3, 0.3, 1.0)
    >>> out["default_score"]
    0.0
    """
    current = {
        "fg_threshold": float(base.get("fg_threshold", 0.5)),
        "seed_threshold": float(base.get("seed_threshold", 0.5)),
        "min_size": int(base.get("min_size", DEFAULT_MIN_SIZE)),
    }
    sizes = sorted({max(1, int(round(current["min_size"] * f))) for f in min_size_factors})
    candidates = [
        {"fg_threshold": float(fg), "seed_threshold": float(seed), "min_size": size}
        for fg in thresholds
        for seed in thresholds
        for size in sizes
    ]

    def distance(c: dict) -> tuple:
        """How far a candidate is from the current values (ties go to the nearest)."""
        changed = sum(c[k] != current[k] for k in current)
        return (
            changed,
            abs(c["fg_threshold"] - current["fg_threshold"])
            + abs(c["seed_threshold"] - current["seed_threshold"]),
            abs(np.log2(c["min_size"] / current["min_size"])) if current["min_size"] > 0 else 0,
        )

    def score(c: dict) -> float:
        settings = postprocess_settings({**base, **c}, scale=scale)
        per_plane = [annotated_instance_metrics(p, a, settings) for p, a in zip(probs_list, annotations)]
        return float(aggregate_instance_metrics(per_plane)["ap50"]) if per_plane else 0.0

    default_score = score(current)
    best, best_score = current, default_score
    for c in sorted(candidates, key=distance):
        if c == current:
            continue
        s = score(c)
        if s > best_score:
            best, best_score = c, s
    return {
        "settings": {**base, **best},
        "chosen": dict(best),
        "score": best_score,
        "default_score": default_score,
    }
