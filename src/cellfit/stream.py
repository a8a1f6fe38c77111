"""Streaming pieces for planes that never exist whole in memory.

Huge 2D planes are read row band by row band: :func:`stack_stats` samples a lazy
stack's normalisation percentiles without reading it at once; :class:`NormRows` and
:class:`ResizeRows` give normalised (and rescaled) rows of a plane band by band, as
the tiled-inference core (:meth:`cellfit.predict.PlanePredictor.predict_rows`) asks
for them; :class:`RowStream` gives random access to rows a generator produces in
order. Instance labels of such planes come from :class:`BlockLabeller`: a seeded
watershed in blocks with an overlapping halo, whose ids are merged across block
seams by overlap, so a cell lying on a seam keeps one id.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cellfit.model import ModelInfo
from cellfit.normalize import match_channels, normalize, sample_steps

__all__ = [
    "BlockLabeller",
    "NormRows",
    "ResizeRows",
    "RowStream",
    "stack_stats",
]


# --------------------------------------------------------------------------- stats
def stack_stats(img, info: ModelInfo) -> np.ndarray | None:
    """Normalisation percentiles of a whole (lazy) stack, without reading it at once.

    Samples exactly the pixels :func:`cellfit.normalize.percentiles` samples from the
    stack in memory (a regular grid over planes, rows and columns), so streamed and
    in-memory prediction normalise alike.
    """
    norm = info.normalization
    if norm.get("method", "percentile") != "percentile":
        return np.zeros((info.in_channels, 2))
    p = img.n_planes
    h, w = img.plane_shape
    step, pstep = sample_steps(p, h, w)
    band = max(step, (2**24 // max(1, w * img.n_channels)) // step * step)
    parts = []
    for q in range(0, p, pstep):
        rows = []
        for r0 in range(0, h, band):
            raw = img.rows(q, r0, min(h, r0 + band))
            raw = match_channels(raw[None], info.in_channels)[0]
            rows.append(np.asarray(raw[:, ::step, ::step], dtype=np.float64))
        parts.append(np.concatenate(rows, axis=1))
    sample = np.stack(parts)  # (P', C, h', w')
    out = np.empty((sample.shape[1], 2), dtype=np.float64)
    for ch in range(sample.shape[1]):
        out[ch] = np.percentile(sample[:, ch], [float(norm["low"]), float(norm["high"])])
    return out


# ----------------------------------------------------------------------- row sources
class NormRows:
    """Normalised rows (the model's channels, float32) of plane ``p`` of an image."""

    def __init__(self, img, p: int, info: ModelInfo, stats: np.ndarray | None) -> None:
        self.img, self.p, self.info, self.stats = img, p, info, stats
        self.shape = (info.in_channels, *img.plane_shape)

    def rows(self, a: int, b: int) -> np.ndarray:
        raw = match_channels(self.img.rows(self.p, a, b)[None], self.info.in_channels)
        return normalize(raw, self.info.normalization, self.stats)[0]


class ResizeRows:
    """Rows of ``source`` (shape ``(C, h, w)``) resized to ``(C, *out_shape)``, band by band.

    Equals :func:`cellfit.normalize.resize_plane` on the whole plane (same Gaussian
    anti-aliasing when shrinking, same bilinear grid-mode interpolation, same mirrored
    borders): each band reads enough rows around it that the band's edges never
    matter. Requests must come in increasing order of their first row.
    """

    def __init__(self, source, out_shape: tuple[int, int]) -> None:
        self.source = source
        c, h, w = source.shape
        self.shape = (c, *out_shape)
        self.fy, self.fx = h / out_shape[0], w / out_shape[1]
        shrinking = out_shape[0] < h or out_shape[1] < w
        self.sigma = (
            (0.0, max(0.0, (self.fy - 1) / 2), max(0.0, (self.fx - 1) / 2))
            if shrinking
            else (0.0, 0.0, 0.0)
        )
        self.rad = int(4.0 * self.sigma[1] + 0.5) if self.sigma[1] > 0 else 0

    def rows(self, a: int, b: int) -> np.ndarray:
        c, h, _w = self.source.shape
        c0 = (a + 0.5) * self.fy - 0.5
        c1 = (b - 0.5) * self.fy - 0.5
        lo = max(0, math.floor(c0) - 2 - self.rad)
        hi = min(h, math.ceil(c1) + 3 + self.rad)
        band = np.asarray(self.source.rows(lo, hi), dtype=np.float32)
        if any(s > 0 for s in self.sigma):
            band = ndi.gaussian_filter(band, self.sigma, mode="mirror")
        out = ndi.affine_transform(
            band,
            np.array([1.0, self.fy, self.fx]),
            offset=np.array([0.0, a * self.fy + 0.5 * self.fy - 0.5 - lo, 0.5 * self.fx - 0.5]),
            output_shape=(c, b - a, self.shape[2]),
            output=np.float32,
            order=1,
            mode="mirror",
            prefilter=False,
        )
        return out


class RowStream:
    """Random access (in increasing order) to rows produced in order by a generator
    of ``(r0, r1, rows)``; other items the generator yields (progress) are kept in
    :attr:`side` for the consumer. Rows before the last request's first row are
    dropped."""

    def __init__(self, gen: Iterator, shape: tuple[int, int, int]) -> None:
        self.gen = gen
        self.shape = shape
        self.side: list = []
        self._parts: deque[tuple[int, int, np.ndarray]] = deque()
        self._end = 0

    def rows(self, a: int, b: int) -> np.ndarray:
        while self._end < b:
            item = next(self.gen)
            if isinstance(item, tuple):
                r0, r1, arr = item
                if r1 > r0:
                    self._parts.append((r0, r1, arr))
                    self._end = r1
            else:
                self.side.append(item)
        while self._parts and self._parts[0][1] <= a:
            self._parts.popleft()
        pieces = [
            arr[:, max(a, r0) - r0 : min(b, r1) - r0]
            for r0, r1, arr in self._parts
            if r1 > a and r0 < b
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def drain(self) -> None:
        """Run the generator to its end (collecting side items)."""
        for item in self.gen:
            if not isinstance(item, tuple):
                self.side.append(item)


# -------------------------------------------------------------------- block labels
def _match_pairs(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """Pairs ``(id_a, id_b)`` of objects that are the same object in two labelings of
    one region: intersection over union at least ``min_iou`` (so at most one partner)."""
    a = a.ravel().astype(np.int64)
    b = b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    ua, ca = np.unique(a[a > 0], return_counts=True)
    ub, cb = np.unique(b[b > 0], return_counts=True)
    pairs, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    sa = ca[np.searchsorted(ua, pairs[:, 0])]
    sb = cb[np.searchsorted(ub, pairs[:, 1])]
    iou = counts / (sa + sb - counts)
    return pairs[iou >= min_iou]


class BlockLabeller:
    """Instance labels of a huge plane computed in blocks, consistent across seams.

    Block row by block row (each fed the probability rows of its blocks plus a
    ``halo`` above and below), every block is labelled with its halo, its core is
    handed out with ids made unique by an offset, and the labels both neighbours
    computed over the band along each seam are compared: objects that are the same
    (IoU at least 0.5) are merged. :meth:`lut` gives the final id of every raw id.
    With a halo wider than a cell, the result equals labelling the whole plane.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        block: int,
        halo: int,
        label_fn: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = int(block)
        self.halo = int(min(halo, block))
        self.label_fn = label_fn
        self.n_rows = -(-self.shape[0] // self.block)
        self.n_cols = -(-self.shape[1] // self.block)
        self.offset = 0
        self._pairs: list[np.ndarray] = []
        self._present: list[np.ndarray] = []
        self._bottom: dict[int, np.ndarray] = {}

    def band(self, i: int) -> tuple[int, int, int, int]:
        """Rows ``(lo, hi)`` block row ``i`` must be fed, and its core rows ``(r0, r1)``."""
        r0 = i * self.block
        r1 = min(self.shape[0], r0 + self.block)
        return max(0, r0 - self.halo), min(self.shape[0], r1 + self.halo), r0, r1

    def feed(self, i: int, probs: np.ndarray) -> np.ndarray:
        """Label block row ``i`` from its rows ``probs`` ``(K, hi - lo, X)``; returns its
        core rows ``(r1 - r0, X)`` with raw (unique, not yet merged) ids, uint32."""
        lo, hi, r0, r1 = self.band(i)
        hb, x_total = self.halo, self.shape[1]
        core = np.zeros((r1 - r0, x_total), np.uint32)
        prev_right = None
        bottom: dict[int, np.ndarray] = {}
        for j in range(self.n_cols):
            c0 = j * self.block
            c1 = min(x_total, c0 + self.block)
            e0, e1 = max(0, c0 - hb), min(x_total, c1 + hb)
            lab = self.label_fn(probs[:, :, e0:e1]).astype(np.int64)
            n = int(lab.max())
            lab[lab > 0] += self.offset
            self.offset += n
            core[:, c0:c1] = lab[r0 - lo : r1 - lo, c0 - e0 : c1 - e0]
            if j > 0 and prev_right is not None:  # seam with the block on the left
                mine = lab[r0 - lo : r1 - lo, max(0, c0 - hb) - e0 : min(x_total, c0 + hb) - e0]
                self._pairs.append(_match_pairs(prev_right, mine))
            prev_right = lab[r0 - lo : r1 - lo, c1 - e0 : min(x_total, c1 + hb) - e0]
            prev_right = np.concatenate(
                [lab[r0 - lo : r1 - lo, max(0, c1 - hb) - e0 : c1 - e0], prev_right], axis=1
            )
            if i > 0 and j in self._bottom:  # seam with the block above
                mine = lab[: min(hi, r0 + hb) - lo, c0 - e0 : c1 - e0]
                self._pairs.append(_match_pairs(self._bottom[j], mine))
            if r1 < self.shape[0]:
                bottom[j] = lab[max(lo, r1 - hb) - lo : hi - lo, c0 - e0 : c1 - e0]
        self._bottom = bottom
        self._present.append(np.unique(core))
        return core

    def lut(self) -> tuple[np.ndarray, int]:
        """``(lut, n)``: final id ``lut[raw]`` (0 stays 0; ids 1..n, in raw order)."""
        n_nodes = self.offset + 1
        pairs = np.concatenate(self._pairs) if self._pairs else np.zeros((0, 2), np.int64)
        graph = coo_matrix(
            (np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_nodes, n_nodes)
        )
        n_comp, comp = connected_components(graph, directed=False)
        # number the objects that appear in some block's core 1..n, in raw-id order
        used = np.zeros(n_comp, bool)
        for ids in self._present:
            used[comp[ids]] = True
        used[comp[0]] = False
        first = np.full(n_comp, n_nodes, np.int64)
        np.minimum.at(first, comp, np.arange(n_nodes))
        order = np.argsort(first[used], kind="stable")
        new = np.zeros(n_comp, np.uint32)
        new[np.flatnonzero(used)[order]] = np.arange(1, int(used.sum()) + 1, dtype=np.uint32)
        return new[comp], int(used.sum())
