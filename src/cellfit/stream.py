"""Streamed prediction: planes one after another, huge planes row band by row band.

The ordinary path (:meth:`PlanePredictor.predict`) predicts a stack plane by plane
exactly as :func:`cellfit.predict.iter_predict` does (same tiles, mirrored margin and
Gaussian blending), but batches tiles across consecutive planes (a stack of small
slices still fills a GPU batch) and blends on the model's device. Memory holds the
planes in flight, never the stack.

Huge 2D planes (:meth:`PlanePredictor.predict_rows`) never exist whole in memory:
the image is read row band by row band, tiles run one tile row at a time on the same
global grid as the ordinary path, and a rolling accumulator one tile high gives out
finished probability rows, so memory grows with the image's width only. Instance
labels of such planes come from :class:`BlockLabeller`: a seeded watershed in blocks
with an overlapping halo, whose ids are merged across block seams by overlap, so a
cell lying on a seam keeps one id.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage as ndi

from cellfit.model import STRIDE, ModelInfo
from cellfit.normalize import match_channels, normalize, resize_plane, scaled_shape
from cellfit.predict import TileRunner, blend_window, tile_starts

__all__ = [
    "BlockLabeller",
    "Geometry",
    "NormRows",
    "PlanePredictor",
    "PlaneResult",
    "ResizeRows",
    "RowStream",
    "plane_geometry",
    "stack_stats",
]

#: planes in flight (padded pixels) when batching tiles across planes
_FLIGHT_PIXELS = 2**26


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
    from cellfit.normalize import _MAX_SAMPLES

    p = img.n_planes
    h, w = img.plane_shape
    step = max(1, int(np.ceil(np.sqrt(p * h * w / _MAX_SAMPLES))))
    pstep = max(1, int(np.ceil(p * h * w / (step * step) / _MAX_SAMPLES)))
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


# ------------------------------------------------------------------------ geometry
def _round_up(n: int, m: int = STRIDE) -> int:
    return int(-(-n // m) * m)


@dataclass
class Geometry:
    """Tiling of one (model-space) plane of ``h`` x ``w``, as in ``iter_predict``:
    a mirrored margin ``m``, padding to the stride, tiles ``th`` x ``tw`` at
    ``ys`` x ``xs`` on the padded plane of ``H`` x ``W``; ``idx_y`` / ``idx_x`` map
    padded rows / columns to plane rows / columns."""

    h: int
    w: int
    m: int
    th: int
    tw: int
    H: int
    W: int
    ys: list[int]
    xs: list[int]
    idx_y: np.ndarray
    idx_x: np.ndarray
    mode: str

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)


def plane_geometry(h: int, w: int, tile: int, overlap: int) -> Geometry:
    tile = _round_up(max(tile, STRIDE))
    overlap = int(min(max(overlap, 0), tile // 2))
    m = max(overlap // 2, 8)
    mode = "reflect" if min(h, w) > 1 else "edge"
    th, tw = min(tile, _round_up(h + 2 * m)), min(tile, _round_up(w + 2 * m))
    ph, pw = max(th - h - 2 * m, 0), max(tw - w - 2 * m, 0)
    # np.pad works axis by axis, so padding index vectors reproduces the padded plane
    idx_y = np.pad(np.pad(np.arange(h), (m, m), mode=mode), (0, ph), mode=mode)
    idx_x = np.pad(np.pad(np.arange(w), (m, m), mode=mode), (0, pw), mode=mode)
    H, W = len(idx_y), len(idx_x)
    return Geometry(
        h, w, m, th, tw, H, W,
        tile_starts(H, th, overlap), tile_starts(W, tw, overlap), idx_y, idx_x, mode,
    )


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


# ------------------------------------------------------------------------- predictor
@dataclass
class PlaneResult:
    """A finished plane (``probs`` ``(K, Y, X)``) or, with ``probs`` None, progress."""

    key: object
    probs: np.ndarray | None
    tiles_done: int = 0
    tiles_total: int = 0
    notice: str | None = None


@dataclass
class _Plane:
    key: object
    plane: torch.Tensor  # padded, normalised (C, H, W), on the model's device
    geo: Geometry
    full_shape: tuple[int, int]
    coords: list[tuple[int, int]]
    acc: torch.Tensor
    wsum: torch.Tensor
    next: int = 0
    done: int = 0
    extra: dict = field(default_factory=dict)


class PlanePredictor:
    """Tiled prediction for streams of planes and for huge planes.

    Same tiles, margin and blending as :func:`cellfit.predict.iter_predict`; the
    network runs through a :class:`cellfit.predict.TileRunner` (batch size, AMP,
    out-of-memory halving).
    """

    def __init__(
        self, model, info: ModelInfo, runner: TileRunner, *, tile: int = 512, overlap: int = 64
    ) -> None:
        self.model, self.info, self.runner = model, info, runner
        self.tile, self.overlap = tile, overlap
        self.device = runner.device
        self._windows: dict = {}
        model.eval()

    @property
    def scale(self) -> float:
        return float(getattr(self.info, "scale", 1.0) or 1.0)

    def model_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Plane shape the network sees for an image plane of ``shape``."""
        if abs(self.scale - 1.0) > 1e-6:
            return scaled_shape(shape, self.scale)
        return tuple(shape)

    def _window(self, th: int, tw: int, key: tuple) -> torch.Tensor:
        k = (th, tw, key)
        win = self._windows.get(k)
        if win is None:
            win = self._windows[k] = torch.from_numpy(blend_window(th, tw, flat=key)).to(
                self.device
            )
        return win

    def _batch_size(self, tile_shape: tuple[int, int, int]) -> int:
        if self.runner.batch_size is None:
            self.runner.batch_size = self.runner.auto_batch_size(tile_shape)
        return self.runner.batch_size

    # ---------------------------------------------------------------- ordinary planes
    def _start(self, key, raw: np.ndarray, stats) -> _Plane:
        info = self.info
        plane = normalize(
            match_channels(raw[None], info.in_channels), info.normalization, stats
        )[0]
        full_shape = tuple(plane.shape[1:])
        mshape = self.model_shape(full_shape)
        if mshape != full_shape:
            plane = resize_plane(plane, mshape)
        geo = plane_geometry(*mshape, self.tile, self.overlap)
        # mirrored margin and stride padding on the model's device: tiles are cut there
        dev = self.device
        plane = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32)).to(dev)
        plane = plane.index_select(1, torch.from_numpy(geo.idx_y).to(dev))
        plane = plane.index_select(2, torch.from_numpy(geo.idx_x).to(dev))
        acc = torch.zeros((info.n_classes, geo.H, geo.W), dtype=torch.float32, device=self.device)
        wsum = torch.zeros((geo.H, geo.W), dtype=torch.float32, device=self.device)
        coords = [(y, x) for y in geo.ys for x in geo.xs]
        return _Plane(key, plane, geo, full_shape, coords, acc, wsum)

    def _finish(self, rec: _Plane) -> np.ndarray:
        g = rec.geo
        rec.acc /= rec.wsum[None]
        probs = rec.acc[:, g.m : g.m + g.h, g.m : g.m + g.w].cpu().numpy()
        if probs.shape[1:] != rec.full_shape:
            probs = resize_plane(probs, rec.full_shape)
        return np.ascontiguousarray(probs, dtype=np.float32)

    def predict(
        self, planes: Iterable[tuple[object, np.ndarray]], stats: np.ndarray | None
    ) -> Iterator[PlaneResult]:
        """Probabilities of each ``(key, raw plane (C, Y, X))``, in order.

        Yields a :class:`PlaneResult` with ``probs`` for each finished plane, and
        progress results (``probs`` None) after batches inside large planes.
        """
        pending: deque[_Plane] = deque()
        it = iter(planes)
        exhausted = False
        queued = 0
        in_flight = 0
        while True:
            while not exhausted and (
                not pending
                or (queued < (self.runner.batch_size or 1) and in_flight < _FLIGHT_PIXELS)
            ):
                try:
                    key, raw = next(it)
                except StopIteration:
                    exhausted = True
                    break
                rec = self._start(key, raw, stats)
                pending.append(rec)
                queued += len(rec.coords)
                in_flight += rec.geo.H * rec.geo.W
                self._batch_size((rec.plane.shape[0], rec.geo.th, rec.geo.tw))
            if not pending:
                return
            bs = self.runner.batch_size or 1
            batch: list[tuple[_Plane, tuple[int, int]]] = []
            shape = None
            for rec in pending:
                if rec.next >= len(rec.coords):
                    continue
                tshape = (rec.geo.th, rec.geo.tw)
                if shape is None:
                    shape = tshape
                elif tshape != shape:
                    break
                take = min(bs - len(batch), len(rec.coords) - rec.next)
                batch.extend((rec, c) for c in rec.coords[rec.next : rec.next + take])
                rec.next += take
                if len(batch) >= bs:
                    break
            th, tw = shape
            x = torch.stack([r.plane[:, y : y + th, x0 : x0 + tw] for r, (y, x0) in batch])
            out = self.runner(x)
            notice = self.runner.pop_notice()
            for (r, (y, x0)), pr in zip(batch, out):
                g = r.geo
                key = (y == 0, y + th >= g.H, x0 == 0, x0 + tw >= g.W)
                win = self._window(th, tw, key)
                r.acc[:, y : y + th, x0 : x0 + tw] += pr * win
                r.wsum[y : y + th, x0 : x0 + tw] += win
                r.done += 1
            queued -= len(batch)
            while pending and pending[0].done == len(pending[0].coords):
                rec = pending.popleft()
                in_flight -= rec.geo.H * rec.geo.W
                probs = self._finish(rec)
                yield PlaneResult(rec.key, probs, rec.done, len(rec.coords), notice)
                notice = None
            if pending and (notice or pending[0].done):
                head = pending[0]
                yield PlaneResult(head.key, None, head.done, len(head.coords), notice)

    # ---------------------------------------------------------------------- huge planes
    def predict_rows(self, source, key: object = None) -> Iterator:
        """Model-space probability rows of one plane read band by band from ``source``
        (``.shape == (C, h, w)``, ``.rows(a, b)`` normalised rows in model space).

        Yields ``(r0, r1, probs (K, r1 - r0, w))`` in order, and a :class:`PlaneResult`
        (progress) after each tile row. Memory: one tile row of the padded plane.
        """
        _c, h, w = source.shape
        g = plane_geometry(h, w, self.tile, self.overlap)
        k = self.info.n_classes
        th, tw = g.th, g.tw
        bs = self._batch_size((source.shape[0], th, tw))
        acc = torch.zeros((k, th, g.W), dtype=torch.float32, device=self.device)
        wsum = torch.zeros((th, g.W), dtype=torch.float32, device=self.device)
        done, total = 0, g.n_tiles
        for i, y in enumerate(g.ys):
            need = g.idx_y[y : y + th]
            lo, hi = int(need.min()), int(need.max()) + 1
            band = np.asarray(source.rows(lo, hi), dtype=np.float32)
            band = np.ascontiguousarray(band[:, need - lo][:, :, g.idx_x])
            notices = []
            for b0 in range(0, len(g.xs), bs):
                xs = g.xs[b0 : b0 + bs]
                x = np.stack([band[:, :, x0 : x0 + tw] for x0 in xs])
                out = self.runner(torch.from_numpy(x))
                bs = self.runner.batch_size or bs
                n = self.runner.pop_notice()
                if n:
                    notices.append(n)
                for x0, pr in zip(xs, out):
                    key_ = (y == 0, y + th >= g.H, x0 == 0, x0 + tw >= g.W)
                    win = self._window(th, tw, key_)
                    acc[:, :, x0 : x0 + tw] += pr * win
                    wsum[:, x0 : x0 + tw] += win
                done += len(xs)
            nxt = g.ys[i + 1] if i + 1 < len(g.ys) else g.H
            n_fin = nxt - y
            # padded rows y .. nxt are final: crop the margin, hand them out
            r0, r1 = max(y, g.m), min(nxt, g.m + h)
            if r1 > r0:
                fin = acc[:, r0 - y : r1 - y, g.m : g.m + w] / wsum[r0 - y : r1 - y, g.m : g.m + w]
                yield (r0 - g.m, r1 - g.m, fin.cpu().numpy())
            acc = torch.roll(acc, -n_fin, dims=1)
            wsum = torch.roll(wsum, -n_fin, dims=0)
            acc[:, th - n_fin :] = 0
            wsum[th - n_fin :] = 0
            yield PlaneResult(key, None, done, total, "; ".join(notices) or None)


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
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

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
