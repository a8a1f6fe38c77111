"""Where the model is unsure, and where painting would help most ("Paint here next").

* :func:`uncertainty_from_probs`: a map ``(Y, X)`` in [0, 1] of how unsure the model is
  of each pixel, from the probabilities of a test-time-augmented prediction.
* :func:`iter_uncertain` / :func:`predict_uncertain`: the prediction with test-time
  augmentation through the one tiled-inference core (:class:`cellfit.predict.PlanePredictor`),
  each finished plane's event carrying its probabilities and its uncertainty
  (:class:`UncertaintyEvent`).
* :func:`suggest_regions`: a ranked handful of boxes to paint next: uncertain,
  unpainted, and unlike what is already painted (:class:`Region`).
* :func:`rank_cells`: the predicted cells the model is least sure of, most doubtful
  first, so the user can accept or fix them one by one (:class:`DoubtfulCell`).

The measure (see :func:`uncertainty_from_probs` for the reasoning): the normalised
entropy of the mean of the test-time-augmented predictions. The entropy of a mean of
predictions is the mean entropy of each prediction (each view's own ambiguity) plus
their mutual information (how much the flipped and rotated views disagree), so both
kinds of doubt count; the average is what :class:`cellfit.predict.TileRunner` already
computes, so the map costs nothing beyond the test-time augmentation itself.

Pure numpy / scipy; nothing here trains or writes files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import expand_labels
from torch import nn

from cellfit.model import ModelInfo
from cellfit.predict import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    PlaneEvent,
    TileRunner,
    iter_predict,
)

__all__ = [
    "MAX_PAINTED",
    "DoubtfulCell",
    "Region",
    "UncertaintyEvent",
    "iter_uncertain",
    "predict_uncertain",
    "rank_cells",
    "region_size",
    "suggest_regions",
    "uncertainty_from_probs",
]

#: a box with more than this share of painted pixels counts as painted already
MAX_PAINTED = 0.05
#: a predicted cell with more than this share of painted pixels is left out of the ranking
CELL_PAINTED = 0.5
#: interior-versus-boundary doubt counts only where it is wider than this (pixels):
#: every cell edge has a thinner interior-to-boundary transition, which is no doubt
SEED_WIDTH = 5
#: the smallest feature spread that counts as a unit of novelty (features are on the
#: scale of the intensity range, 0..1): a uniform image has nothing new in it
NOVELTY_FLOOR = 0.02
_EPS = 1e-7


# ------------------------------------------------------------------ the measure
def _entropy2(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits (0..1) of probabilities ``p``."""
    p = np.clip(p, _EPS, 1 - _EPS)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def uncertainty_from_probs(probs: np.ndarray, mode: str) -> np.ndarray:
    """How unsure the model is of each pixel, from its (test-time-augmented) probabilities.

    Parameters
    ----------
    probs : ndarray, shape (K, Y, X)
        Class probabilities of one plane, best the mean over test-time-augmented
        views (:func:`iter_uncertain`); they need not sum exactly to 1.
    mode : {"instances", "semantic"}
        The model's mode (``ModelInfo.mode``).

    Returns
    -------
    ndarray of float32, shape (Y, X), in [0, 1]
        0: sure; 1: the classes are equally likely.

    Notes
    -----
    The measure is the normalised predictive entropy of the mean probabilities. For the
    mean ``p̄`` of augmented views ``p_t``, ``H(p̄) = mean_t H(p_t) + I``: the views' own
    ambiguity plus their mutual information ``I`` (their disagreement, the usual
    "model doubt" of ensembles and test-time augmentation). Both kinds of doubt are
    worth painting, so their sum is used, and it needs only the mean, which the
    tiled-inference core already averages.

    ``"semantic"``: the entropy over all K classes divided by log K.

    ``"instances"`` (classes background, interior, boundary): the boundary class is a
    thin ring drawn round every cell to split touching cells, so every cell edge
    passes from interior to boundary and the full 3-class entropy would draw a bright
    ring round every clean cell. The map is therefore made of the decisions that
    matter: the binary entropy of cell versus background (background against
    interior + boundary), and the binary entropy of interior versus boundary within
    the cell, kept only where it is wider than :data:`SEED_WIDTH` pixels (a grey
    opening removes the thin transition every edge has; a broad patch where the model
    cannot tell interior from boundary, as in a clump it cannot split, remains). The
    larger of the two is taken. A clean cell is then sure inside and out, with only
    the thin line where cell turns to background.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"uncertainty_from_probs takes (K, Y, X), got {probs.shape}")
    k = probs.shape[0]
    if k < 2:
        return np.zeros(probs.shape[1:], dtype=np.float32)
    probs = np.clip(probs, 0.0, None)
    total = probs.sum(axis=0)
    total[total <= 0] = 1.0
    if mode == "instances" and k == 3:
        p = probs / total
        fg = p[1] + p[2]
        u = _entropy2(fg)
        # interior versus boundary, given a cell there; thin transitions opened away
        seed = _entropy2(p[1] / np.maximum(fg, _EPS)) * fg
        seed = ndi.grey_opening(seed, size=(SEED_WIDTH, SEED_WIDTH))
        u = np.maximum(u, seed)
    else:
        p = np.clip(probs / total, _EPS, 1.0)
        u = -(p * np.log(p)).sum(axis=0) / np.log(k)
    return np.clip(u, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------- through the core
@dataclass
class UncertaintyEvent(PlaneEvent):
    """A :class:`~cellfit.predict.PlaneEvent` of a test-time-augmented prediction;
    ``uncertainty`` (``(Y, X)`` float32 in [0, 1], :func:`uncertainty_from_probs`) is
    set with ``probabilities`` on the event that completes a plane."""

    uncertainty: np.ndarray | None = None


def _tta_runner(runner: TileRunner | None) -> TileRunner | None:
    """``runner`` when it runs test-time augmentation; else one like it that does."""
    if runner is None or runner.tta:
        return runner
    return TileRunner(runner.model, runner.device, batch_size=runner.batch_size,
                      amp=runner.use_amp, tta=True)


def iter_uncertain(
    model: nn.Module,
    info: ModelInfo,
    planes: np.ndarray,
    stats: np.ndarray | None = None,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    runner: TileRunner | None = None,
    **kwargs,
) -> Iterator[UncertaintyEvent]:
    """:func:`cellfit.predict.iter_predict` with test-time augmentation, each finished
    plane's event carrying its uncertainty too.

    Parameters
    ----------
    planes : ndarray, shape (P, C, Y, X)
        Raw planes with the model's channels.
    runner : TileRunner, optional
        Used when it runs test-time augmentation; otherwise one like it that does is
        made (same device and batch size).
    kwargs
        As :func:`cellfit.predict.iter_predict` (``batch_size``, ``device``, ``amp``).

    Yields
    ------
    UncertaintyEvent
        Progress; ``probabilities`` ``(K, Y, X)`` and ``uncertainty`` ``(Y, X)`` on the
        event that completes a plane.
    """
    kwargs.pop("tta", None)
    for ev in iter_predict(model, info, planes, stats, tile=tile, overlap=overlap,
                           runner=_tta_runner(runner), tta=True, **kwargs):
        out = UncertaintyEvent(**{f.name: getattr(ev, f.name) for f in fields(ev)})
        if ev.probabilities is not None:
            out.uncertainty = uncertainty_from_probs(ev.probabilities, info.mode)
        yield out


def predict_uncertain(
    model: nn.Module,
    info: ModelInfo,
    plane: np.ndarray,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    runner: TileRunner | None = None,
    stats: np.ndarray | None = None,
    **kwargs,
) -> Iterator[UncertaintyEvent]:
    """The test-time-augmented prediction of one raw plane ``(C, Y, X)`` (the model's
    channels): progress events, the last one with ``probabilities`` ``(K, Y, X)`` and
    ``uncertainty`` ``(Y, X)``. ``stats``: normalisation percentiles ``(C, 2)`` (of the
    whole stack; from the plane when None). Other arguments as :func:`iter_uncertain`."""
    plane = np.asarray(plane)
    if plane.ndim != 3:
        raise ValueError(f"predict_uncertain takes (C, Y, X), got {plane.shape}")
    yield from iter_uncertain(model, info, plane[None], stats, tile=tile, overlap=overlap,
                              runner=runner, **kwargs)


# ------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Region:
    """One suggested box to paint, in image pixels: rows ``y0 .. y1 - 1``, columns
    ``x0 .. x1 - 1`` (half-open, as slices).

    ``rank`` 1 is the best suggestion. ``uncertainty`` is the box's mean uncertainty,
    ``novelty`` (0..1) how unlike the painted regions it looks (1 when nothing is
    painted or no image was given), ``score`` = ``uncertainty * (0.5 + 0.5 * novelty)``.
    """

    rank: int
    y0: int
    x0: int
    y1: int
    x1: int
    score: float
    uncertainty: float
    novelty: float

    @property
    def centre(self) -> tuple[float, float]:
        """``(y, x)`` of the box's centre."""
        return ((self.y0 + self.y1) / 2, (self.x0 + self.x1) / 2)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``."""
        return (self.y0, self.x0, self.y1, self.x1)

    @property
    def slices(self) -> tuple[slice, slice]:
        """The box as slices of a ``(Y, X)`` array."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))


def region_size(shape: tuple[int, int], size: int | None = None,
                diameter: float | None = None) -> int:
    """The side of suggested boxes: ``size``, else about three cell diameters (at least
    32 px), else 64 px; never larger than the image."""
    if size is None:
        size = max(32, int(round(3 * diameter))) if diameter else 64
    return int(max(1, min(int(size), *shape)))


def _starts(n: int, size: int, stride: int) -> np.ndarray:
    """Box starts every ``stride`` along ``n`` pixels, the last one flush with the end."""
    s = list(range(0, n - size + 1, stride))
    if s[-1] != n - size:
        s.append(n - size)
    return np.asarray(s, dtype=np.int64)


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column (float64)."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])
    return s


def _box_means(a: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Means of ``a`` (Y, X) over boxes ``h`` x ``w`` at rows ``ys`` x columns ``xs``:
    ``(len(ys), len(xs))``."""
    s = _integral(a)
    y0, x0 = ys[:, None], xs[None, :]
    tot = s[y0 + h, x0 + w] - s[y0, x0 + w] - s[y0 + h, x0] + s[y0, x0]
    return tot / float(h * w)


def _features(image: np.ndarray, scale: float) -> list[np.ndarray]:
    """Multiscale texture features of ``image`` (C, Y, X): per channel, at three scales
    from ``scale``, the Gaussian-smoothed intensity, the gradient magnitude and the
    scale-normalised magnitude of the Laplacian of Gaussian."""
    out = []
    for ch in image:
        ch = ch.astype(np.float32, copy=False)
        lo, hi = np.percentile(ch[:: max(1, ch.shape[0] // 256), :: max(1, ch.shape[1] // 256)],
                               (1, 99.8))
        ch = (ch - lo) / max(float(hi - lo), 1e-6)
        for s in (scale, 2 * scale, 4 * scale):
            out.append(ndi.gaussian_filter(ch, s))
            out.append(ndi.gaussian_gradient_magnitude(ch, s) * s)
            out.append(np.abs(ndi.gaussian_laplace(ch, s)) * s * s)
    return out


def _shrink(a: np.ndarray, f: int) -> np.ndarray:
    """``a`` (C, Y, X) averaged over ``f`` x ``f`` blocks (the ragged edge dropped)."""
    if f <= 1:
        return a
    c, y, x = a.shape
    y, x = (y // f) * f, (x // f) * f
    return a[:, :y, :x].reshape(c, y // f, f, x // f, f).mean(axis=(2, 4), dtype=np.float32)


def _novelty(image: np.ndarray, ys, xs, size: int, reference: np.ndarray,
             diameter: float | None) -> np.ndarray:
    """Novelty (0..1) of every box: the distance of its features (mean and spread of
    :func:`_features` over the box) to the nearest ``reference`` box's, the features
    standardised over all boxes (a unit at least :data:`NOVELTY_FLOOR`), the distance
    as root mean square per feature, capped at 1 (one standard deviation per feature
    on average counts as wholly unlike)."""
    f = max(1, size // 16)  # features on a coarser grid: boxes stay >= 16 of its pixels wide
    small = _shrink(image, f)
    scale = max(0.7, (diameter or 8.0) / 8.0 / f)
    n = size // f
    sy = np.minimum(ys // f, small.shape[1] - n)
    sx = np.minimum(xs // f, small.shape[2] - n)
    cols = []
    for feat in _features(small, scale):
        m = _box_means(feat, sy, sx, n, n)
        m2 = _box_means(feat * feat, sy, sx, n, n)
        cols += [m, np.sqrt(np.maximum(m2 - m * m, 0.0))]
    x = np.stack([c.ravel() for c in cols], axis=1)
    # standardised, but differences under 2% of the intensity range never count as new
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), NOVELTY_FLOOR)
    ref = x[reference.ravel()]
    if len(ref) > 4096:
        ref = ref[np.linspace(0, len(ref) - 1, 4096).astype(int)]
    d, _ = cKDTree(ref).query(x, k=1)
    d = d / np.sqrt(x.shape[1])
    return np.clip(d, 0.0, 1.0).reshape(len(ys), len(xs))


def suggest_regions(
    uncertainty: np.ndarray,
    annotation: np.ndarray,
    image: np.ndarray | None = None,
    *,
    n: int = 5,
    size: int | None = None,
    diameter: float | None = None,
    max_painted: float = MAX_PAINTED,
    stride: int | None = None,
) -> list[Region]:
    """A ranked handful of boxes where painting would help most: uncertain, unpainted,
    and unlike what is already painted.

    Parameters
    ----------
    uncertainty : ndarray, shape (Y, X)
        :func:`uncertainty_from_probs` of the plane, in [0, 1].
    annotation : ndarray of int, shape (Y, X)
        The user's painting: 0 not painted, anything else painted.
    image : ndarray, shape (C, Y, X) or (Y, X), optional
        The plane's pixels, for the novelty; None: novelty 1 everywhere.
    n : int
        At most this many boxes (fewer when fewer unpainted boxes fit).
    size : int, optional
        Side of the boxes in pixels; default :func:`region_size` (3 cell diameters, at
        least 32 px; 64 px without a diameter), never larger than the image.
    diameter : float, optional
        Cell diameter in pixels, for the default size and the scale of the features.
    max_painted : float
        Boxes with more than this share of painted pixels are left out.
    stride : int, optional
        Step between candidate boxes (default a quarter of ``size``).

    Returns
    -------
    list of Region
        Best first (``rank`` 1, 2, ...), none overlapping another, all inside the image.

    Notes
    -----
    Candidate boxes lie on a grid (``stride`` apart); their mean uncertainty and
    painted share come from summed-area tables, so a 2048² plane takes seconds.
    ``score = uncertainty * (0.5 + 0.5 * novelty)``: the model's doubt comes first (a
    sure region teaches little however new it looks), and a region unlike anything
    painted counts up to twice as much as one like the painted regions, which still
    counts half (the model is unsure there even so). Novelty is the distance of the
    box's texture features (smoothed intensity, gradient magnitude and Laplacian of
    Gaussian at three scales, per channel, their mean and spread over the box) to the
    nearest painted box's (one holding more than ``max_painted`` painted pixels, or any
    painted pixel when no box holds that many), standardised, capped at 1. Boxes are
    then taken greedily by score, skipping any that overlaps one already taken.
    """
    unc = np.asarray(uncertainty, dtype=np.float32)
    if unc.ndim != 2:
        raise ValueError(f"suggest_regions takes an uncertainty (Y, X), got {unc.shape}")
    ann = np.asarray(annotation)
    if ann.shape != unc.shape:
        raise ValueError(f"annotation {ann.shape} and uncertainty {unc.shape} differ in shape")
    if n <= 0 or unc.size == 0:
        return []
    side = region_size(unc.shape, size, diameter)
    step = int(stride) if stride else max(1, side // 4)
    ys, xs = _starts(unc.shape[0], side, step), _starts(unc.shape[1], side, step)
    mean_u = _box_means(np.nan_to_num(unc), ys, xs, side, side)
    painted = _box_means(ann != 0, ys, xs, side, side)
    free = painted <= max_painted
    novelty = np.ones_like(mean_u)
    if image is not None and (ann != 0).any():
        img = np.asarray(image)
        if img.ndim == 2:
            img = img[None]
        if img.shape[1:] != unc.shape:
            raise ValueError(f"image {img.shape} and uncertainty {unc.shape} differ in shape")
        reference = painted > max_painted
        if not reference.any():
            reference = painted > 0
        novelty = _novelty(img, ys, xs, side, reference, diameter)
    score = mean_u * (0.5 + 0.5 * novelty)
    iy, ix = np.nonzero(free)
    order = np.lexsort((ix, iy, -score[iy, ix]))  # best first; ties top-left first
    chosen: list[Region] = []
    taken = np.empty((0, 4), dtype=np.int64)
    for k in order:
        y0, x0 = int(ys[iy[k]]), int(xs[ix[k]])
        y1, x1 = y0 + side, x0 + side
        if len(taken) and np.any((taken[:, 0] < y1) & (y0 < taken[:, 2])
                                 & (taken[:, 1] < x1) & (x0 < taken[:, 3])):
            continue
        j, i = iy[k], ix[k]
        chosen.append(Region(len(chosen) + 1, y0, x0, y1, x1, float(score[j, i]),
                             float(mean_u[j, i]), float(novelty[j, i])))
        taken = np.vstack([taken, [[y0, x0, y1, x1]]])
        if len(chosen) >= n:
            break
    return chosen


# ------------------------------------------------------------------ doubtful cells
@dataclass(frozen=True)
class DoubtfulCell:
    """A predicted cell the model is unsure of.

    ``rank`` 1 is the most doubtful; ``label`` its id in the labels; ``score`` its
    mean uncertainty (0..1) over the cell and a thin ring round it; ``(y, x)`` its
    centre; ``bbox`` ``(y0, x0, y1, x1)`` its half-open bounding box.
    """

    rank: int
    label: int
    score: float
    y: float
    x: float
    bbox: tuple[int, int, int, int]


def rank_cells(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    *,
    annotation: np.ndarray | None = None,
    n: int | None = None,
    ring: int = 2,
    max_painted: float = CELL_PAINTED,
) -> list[DoubtfulCell]:
    """The predicted cells the model is least sure of, most doubtful first.

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X)
        Predicted instance labels (0 background).
    uncertainty : ndarray, shape (Y, X)
        :func:`uncertainty_from_probs` of the same plane.
    annotation : ndarray of int, shape (Y, X), optional
        The user's painting (0 not painted); cells with more than ``max_painted`` of
        their pixels painted are left out (the user has dealt with them).
    n : int, optional
        At most this many cells (all when None).
    ring : int
        Pixels round each cell that count with it (where a cell's outline is in doubt
        the doubt lies just outside it as much as inside).

    Returns
    -------
    list of DoubtfulCell
        Scored by the mean uncertainty over the cell and its ring (ring pixels go to
        the nearest cell, :func:`skimage.segmentation.expand_labels`); ties by id.
    """
    lab = np.asarray(labels)
    unc = np.asarray(uncertainty, dtype=np.float64)
    if lab.shape != unc.shape or lab.ndim != 2:
        raise ValueError(f"labels {lab.shape} and uncertainty {unc.shape} must be the same (Y, X)")
    lab = lab.astype(np.int64, copy=False)
    if lab.size == 0 or lab.max() <= 0:
        return []
    top = int(lab.max())
    area = np.bincount(lab.ravel(), minlength=top + 1)
    grown = expand_labels(lab, ring) if ring > 0 else lab
    g_area = np.bincount(grown.ravel(), minlength=top + 1)
    g_sum = np.bincount(grown.ravel(), weights=np.nan_to_num(unc).ravel(), minlength=top + 1)
    score = g_sum / np.maximum(g_area, 1)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    if annotation is not None:
        ann = np.asarray(annotation)
        if ann.shape != lab.shape:
            raise ValueError(f"annotation {ann.shape} and labels {lab.shape} differ in shape")
        painted = np.bincount(lab[ann != 0], minlength=top + 1)
        ids = ids[painted[ids] <= max_painted * area[ids]]
    ids = ids[np.lexsort((ids, -score[ids]))]
    if n is not None:
        ids = ids[: max(0, int(n))]
    yy, xx = np.indices(lab.shape)
    cy = np.bincount(lab.ravel(), weights=yy.ravel(), minlength=top + 1) / np.maximum(area, 1)
    cx = np.bincount(lab.ravel(), weights=xx.ravel(), minlength=top + 1) / np.maximum(area, 1)
    boxes = ndi.find_objects(lab)
    out = []
    for r, i in enumerate(ids, start=1):
        sl = boxes[i - 1]
        out.append(DoubtfulCell(r, int(i), float(score[i]), float(cy[i]), float(cx[i]),
                                (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
    return out
