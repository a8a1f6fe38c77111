"""The one tiled-inference core: every prediction in cellfit passes through here.

Training validation, the plugin's live preview and Segment, ``cellfit predict`` (one
file, folders, huge planes) and the dask cluster path all run
:class:`PlanePredictor`, so they cut the same tiles and blend them alike.

Each plane is normalised, resized to the model's cell scale, given a mirrored margin
(so border pixels see the same context whatever the tiling) and padded to the encoder
stride; it is cut into tiles of ``tile`` pixels (a multiple of 32) that overlap by
``overlap`` pixels; tiles run through the network in batches (:class:`TileRunner`:
AMP and channels-last on CUDA, out-of-memory halving, optional test-time augmentation)
and their softmax outputs are blended with a Gaussian window on the model's device.
Tiles are batched across consecutive planes, so a stack of small slices still fills a
batch; memory holds the planes in flight, never the stack. Huge 2D planes stream row
band by row band (:meth:`PlanePredictor.predict_rows`).

:func:`iter_predict`, :func:`predict_plane` and :func:`predict_stack` are the short
forms for planes in memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellfit.devices import is_out_of_memory, resolve_device
from cellfit.errors import CellfitError
from cellfit.events import Progress, share_done
from cellfit.io import ImageStack, to_planes
from cellfit.model import STRIDE, ModelInfo
from cellfit.normalize import (
    match_channels,
    normalize,
    percentiles,
    resize_plane,
    scaled_shape,
)

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "Geometry",
    "PlaneEvent",
    "PlanePredictor",
    "TileRunner",
    "TileTransform",
    "blend_window",
    "iter_predict",
    "plane_geometry",
    "predict_plane",
    "predict_planes",
    "predict_stack",
    "prepare_planes",
    "round_up",
    "stack_percentiles",
    "tile_starts",
    "tta_transforms",
]

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
#: planes in flight (padded pixels) when batching tiles across planes
FLIGHT_PIXELS = 2**26


# ------------------------------------------------------------------------ geometry
def round_up(n: int, m: int = STRIDE) -> int:
    """``n`` rounded up to a multiple of ``m`` (the encoder stride by default)."""
    return int(-(-n // m) * m)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _gauss(n: int, sigma_scale: float) -> np.ndarray:
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    s = max(sigma_scale * n, 1e-6)
    g = np.exp(-0.5 * (x / s) ** 2)
    return g / g.max()


def blend_window(
    h: int,
    w: int,
    sigma_scale: float = 0.125,
    flat: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> np.ndarray:
    """Separable Gaussian weights of a ``(h, w)`` tile, peak 1, never below 1e-3.

    ``flat`` = (top, bottom, left, right): sides that lie on the image border keep
    full weight up to the edge, so no other tile's edge can dominate there.
    """
    gy, gx = _gauss(h, sigma_scale), _gauss(w, sigma_scale)
    top, bottom, left, right = flat
    if top:
        gy[: h // 2] = 1.0
    if bottom:
        gy[h // 2 :] = 1.0
    if left:
        gx[: w // 2] = 1.0
    if right:
        gx[w // 2 :] = 1.0
    return np.maximum(np.outer(gy, gx), 1e-3).astype(np.float32)


@dataclass
class Geometry:
    """The tiling of one (model-space) plane of ``h`` x ``w``.

    A mirrored margin ``m`` on every side, then padding up to the stride where the
    plane is smaller than a tile, give the padded plane of ``H`` x ``W``; tiles of
    ``th`` x ``tw`` start at rows ``ys`` and columns ``xs`` of it. ``idx_y`` /
    ``idx_x`` give the plane row / column of each padded row / column.
    """

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

    @property
    def coords(self) -> list[tuple[int, int]]:
        """``(y, x)`` of every tile, row by row."""
        return [(y, x) for y in self.ys for x in self.xs]

    def on_border(self, y: int, x: int) -> tuple[bool, bool, bool, bool]:
        """Which sides (top, bottom, left, right) of the tile at ``(y, x)`` lie on the
        padded plane's border (see :func:`blend_window`)."""
        return (y == 0, y + self.th >= self.H, x == 0, x + self.tw >= self.W)

    @property
    def key(self) -> tuple:
        return (self.H, self.W, self.th, self.tw, tuple(self.ys), tuple(self.xs))


def plane_geometry(h: int, w: int, tile: int, overlap: int) -> Geometry:
    """The :class:`Geometry` of a ``h`` x ``w`` plane cut into ``tile`` px tiles that
    overlap by ``overlap`` px (tile rounded up to the stride, overlap at most half)."""
    tile = round_up(max(tile, STRIDE))
    overlap = int(min(max(overlap, 0), tile // 2))
    m = max(overlap // 2, 8)
    mode = "reflect" if min(h, w) > 1 else "edge"
    th, tw = min(tile, round_up(h + 2 * m)), min(tile, round_up(w + 2 * m))
    ph, pw = max(th - h - 2 * m, 0), max(tw - w - 2 * m, 0)
    # np.pad works axis by axis, so padding index vectors reproduces the padded plane
    idx_y = np.pad(np.pad(np.arange(h), (m, m), mode=mode), (0, ph), mode=mode)
    idx_x = np.pad(np.pad(np.arange(w), (m, m), mode=mode), (0, pw), mode=mode)
    H, W = len(idx_y), len(idx_x)
    return Geometry(
        h, w, m, th, tw, H, W,
        tile_starts(H, th, overlap), tile_starts(W, tw, overlap), idx_y, idx_x, mode,
    )


# --------------------------------------------------------------------------- events
@dataclass
class PlaneEvent(Progress):
    """Progress of a prediction: ``tiles_done`` of ``tiles_total`` tiles of ``plane``
    (the plane's key: its index in :func:`iter_predict`). ``probabilities``
    (``(K, Y, X)`` float32) is set on the event that completes the plane."""

    plane: object = None
    tiles_done: int = 0
    tiles_total: int = 0
    probabilities: np.ndarray | None = None


# ----------------------------------------------------------- test-time augmentation
@dataclass(frozen=True)
class TileTransform:
    """One symmetry of the square applied to tiles ``(N, C, h, w)``: swap the rows and
    columns (``transpose``), then flip the dimensions in ``flips`` (-2: rows, -1:
    columns). :meth:`invert` maps an output of the transformed tiles back."""

    transpose: bool = False
    flips: tuple[int, ...] = ()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            x = x.transpose(-2, -1)
        return x.flip(self.flips) if self.flips else x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        if self.flips:
            y = y.flip(self.flips)
        return y.transpose(-2, -1) if self.transpose else y


def tta_transforms(square: bool = False) -> list[TileTransform]:
    """The transforms of test-time augmentation, the identity first: the 4 flips
    (none, rows, columns, both); for ``square`` tiles all 8 symmetries of the square
    (the same 4 after swapping rows and columns: the 90° rotations and the two
    diagonal mirrors)."""
    flips = [(), (-2,), (-1,), (-2, -1)]
    return [TileTransform(t, f) for t in ((False, True) if square else (False,)) for f in flips]


# --------------------------------------------------------------------------- network
class TileRunner:
    """Runs batches of tiles through the network and returns their softmax.

    AMP (bfloat16 where supported, else float16) and channels-last on CUDA. The batch
    size is automatic when None: on CUDA it is measured from the free GPU memory and
    the memory one tile takes, elsewhere it is 4. When the device runs out of memory,
    the batch is halved and retried (down to one tile), and a notice says so; the
    smaller batch is kept for the tiles that follow.

    With ``tta`` (test-time augmentation) each batch also runs flipped (and, for square
    tiles, rotated) (:func:`tta_transforms`): every output is mapped back and the
    softmax outputs are averaged, 4 (or 8) times the work.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        *,
        batch_size: int | None = None,
        amp: bool = True,
        tta: bool = False,
    ) -> None:
        if device is None:
            device = next(model.parameters()).device
        self.model = model
        self.device = resolve_device(device)
        self.use_amp = amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.batch_size = int(batch_size) if batch_size else None
        self.tta = bool(tta)
        self.notices: list[str] = []

    def pop_notice(self) -> str | None:
        """The notices since the last call, joined, or None."""
        if not self.notices:
            return None
        text = "; ".join(self.notices)
        self.notices.clear()
        return text

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().softmax(dim=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        ):
            if not self.tta:
                return self._softmax(x)
            transforms = tta_transforms(square=x.shape[-2] == x.shape[-1])
            acc = None
            for t in transforms:
                p = t.invert(self._softmax(t.apply(x)))
                acc = p.contiguous() if acc is None else acc.add_(p)
            return acc.div_(len(transforms))

    def auto_batch_size(self, tile_shape: tuple[int, int, int]) -> int:
        """Tiles per batch for tiles of ``(C, h, w)``: from free memory on CUDA, else 4."""
        if self.device.type != "cuda":
            return 4
        dev = self.device
        try:
            torch.cuda.empty_cache()
            free, _total = torch.cuda.mem_get_info(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            probe = torch.zeros((2, *tile_shape), device=dev)
            self._forward(probe)
            per_tile = max((torch.cuda.max_memory_allocated(dev) - base) / 2, 1)
            del probe
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            torch.cuda.empty_cache()
            return 1
        n = int(0.6 * free / per_tile)
        n = 1 << max(0, min(n, 64).bit_length() - 1)  # a power of two, 1..64
        return max(1, n)

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Softmax ``(N, K, h, w)`` (float32, on the device) of tiles ``(N, C, h, w)``."""
        xt = torch.as_tensor(x)
        if self.batch_size is None:
            self.batch_size = self.auto_batch_size(tuple(xt.shape[1:]))
        outs = []
        i = 0
        while i < xt.shape[0]:
            n = self.batch_size
            try:
                outs.append(self._forward(xt[i : i + n].to(self.device, non_blocking=True)))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                outs_keep = outs  # results so far stay valid
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if n <= 1:
                    raise CellfitError(
                        f"the {self.device.type.upper()} device ran out of memory on a single "
                        f"tile of {xt.shape[-2]}x{xt.shape[-1]} pixels: make {{setting}} smaller "
                        "(e.g. 256) or run on the CPU.",
                        setting="tile",
                    ) from None
                self.batch_size = max(1, n // 2)
                self.notices.append(
                    f"out of {self.device.type.upper()} memory with batches of {n} tiles: "
                    f"retrying with {self.batch_size}"
                )
                outs = outs_keep
                continue
            i += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _runner(model: nn.Module, runner: TileRunner | None, tta: bool, **kwargs) -> TileRunner:
    """``runner`` (which must run test-time augmentation when ``tta`` asks for it), or a
    new one for ``model`` (``kwargs`` as :class:`TileRunner`)."""
    if runner is None:
        return TileRunner(model, tta=tta, **kwargs)
    if tta and not runner.tta:
        raise ValueError("tta=True with a TileRunner made without it: give tta to the runner")
    return runner


# ------------------------------------------------------------------------- predictor
@dataclass
class _Plane:
    key: object
    plane: torch.Tensor  # padded, normalised (C, H, W), on the model's device
    geo: Geometry
    full_shape: tuple[int, int]
    coords: list[tuple[int, int]]
    acc: torch.Tensor
    next: int = 0
    done: int = 0


class PlanePredictor:
    """The tiled-inference core: probabilities of planes in memory, of streams of
    planes, and of huge planes read row band by row band.

    Parameters
    ----------
    model : nn.Module
        The network (put in eval mode here).
    info : ModelInfo
        Its settings: channels, classes, normalisation, cell scale.
    runner : TileRunner, optional
        Runs the batches of tiles; made from ``model`` (on its device, 4 tiles a
        batch off CUDA) when None.
    tile, overlap : int
        Tile side (rounded up to a multiple of 32) and overlap in pixels.
    tta : bool
        Test-time augmentation (see :class:`TileRunner`), for the runner made here
        (a runner given must have been made with ``tta=True`` to ask for it here).
    """

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        runner: TileRunner | None = None,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tta: bool = False,
    ) -> None:
        self.model, self.info = model, info
        self.runner = _runner(model, runner, tta)
        self.tile, self.overlap = tile, overlap
        self.device = self.runner.device
        self._windows: dict = {}
        self._inverse: tuple[tuple, torch.Tensor] | None = None
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

    def _inverse_weights(self, geo: Geometry) -> torch.Tensor:
        """1 / (sum of the tiles' windows) over the padded plane, kept for the last
        geometry (the planes of a stack share it)."""
        if self._inverse is not None and self._inverse[0] == geo.key:
            return self._inverse[1]
        wsum = torch.zeros((geo.H, geo.W), dtype=torch.float32, device=self.device)
        for y, x in geo.coords:
            wsum[y : y + geo.th, x : x + geo.tw] += self._window(geo.th, geo.tw, geo.on_border(y, x))
        inv = wsum.reciprocal_()
        self._inverse = (geo.key, inv)
        return inv

    def _batch_size(self, tile_shape: tuple[int, int, int]) -> int:
        if self.runner.batch_size is None:
            self.runner.batch_size = self.runner.auto_batch_size(tile_shape)
        return self.runner.batch_size

    def _blend(self, acc: torch.Tensor, geo: Geometry, y: int, y_acc: int, x: int,
               probs: torch.Tensor) -> None:
        """Add one tile's probabilities, weighted by its window, into ``acc`` (whose
        row ``y_acc`` is padded row ``y``)."""
        win = self._window(geo.th, geo.tw, geo.on_border(y, x))
        acc[:, y_acc : y_acc + geo.th, x : x + geo.tw].addcmul_(probs, win)

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
        acc = torch.zeros((info.n_classes, geo.H, geo.W), dtype=torch.float32, device=dev)
        return _Plane(key, plane, geo, full_shape, geo.coords, acc)

    def _finish(self, rec: _Plane) -> np.ndarray:
        g = rec.geo
        inv = self._inverse_weights(g)[g.m : g.m + g.h, g.m : g.m + g.w]
        crop = rec.acc[:, g.m : g.m + g.h, g.m : g.m + g.w]
        if self.device.type == "cpu":  # one pass, straight into the array handed out
            probs = np.empty(crop.shape, dtype=np.float32)
            torch.mul(crop, inv, out=torch.from_numpy(probs))
        else:
            probs = (crop * inv).cpu().numpy()
        rec.acc = rec.plane = None  # free them before a resize allocates
        if probs.shape[1:] != rec.full_shape:
            probs = resize_plane(probs, rec.full_shape)
        return probs

    def predict(
        self, planes: Iterable[tuple[object, np.ndarray]], stats: np.ndarray | None
    ) -> Iterator[PlaneEvent]:
        """Probabilities of each ``(key, raw plane (C, Y, X))``, in order.

        Yields a :class:`PlaneEvent` with ``probabilities`` for each finished plane,
        and progress events (``probabilities`` None) after batches inside large planes.
        ``stats`` are the normalisation percentiles ``(C, 2)`` (of the whole stack).
        """
        pending: deque[_Plane] = deque()
        it = iter(planes)
        exhausted = False
        queued = 0
        in_flight = 0
        while True:
            while not exhausted and (
                not pending
                or (queued < (self.runner.batch_size or 1) and in_flight < FLIGHT_PIXELS)
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
            batch = self._next_batch(pending)
            th, tw = batch[0][0].geo.th, batch[0][0].geo.tw
            x = torch.stack([r.plane[:, y : y + th, x0 : x0 + tw] for r, (y, x0) in batch])
            out = self.runner(x)
            notice = self.runner.pop_notice()
            for (r, (y, x0)), pr in zip(batch, out):
                self._blend(r.acc, r.geo, y, y, x0, pr)
                r.done += 1
            del out, x
            queued -= len(batch)
            while pending and pending[0].done == len(pending[0].coords):
                rec = pending.popleft()
                in_flight -= rec.geo.H * rec.geo.W
                n = len(rec.coords)
                probs = self._finish(rec)
                yield PlaneEvent(plane=rec.key, tiles_done=n, tiles_total=n,
                                 probabilities=probs, notice=notice)
                notice = None
            if pending and (notice or pending[0].done):
                head = pending[0]
                yield PlaneEvent(plane=head.key, tiles_done=head.done,
                                 tiles_total=len(head.coords), notice=notice)

    def _next_batch(self, pending: deque[_Plane]) -> list[tuple[_Plane, tuple[int, int]]]:
        """Up to a batch of the next tiles, across planes while their tiles match."""
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
        return batch

    # ---------------------------------------------------------------------- huge planes
    def predict_rows(self, source, key: object = None) -> Iterator:
        """Model-space probability rows of one plane read band by band from ``source``
        (``.shape == (C, h, w)``, ``.rows(a, b)`` normalised rows in model space).

        Yields ``(r0, r1, probs (K, r1 - r0, w))`` in order, and a :class:`PlaneEvent`
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
                    self._blend(acc, g, y, 0, x0, pr)
                    wsum[:, x0 : x0 + tw] += self._window(th, tw, g.on_border(y, x0))
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
            yield PlaneEvent(plane=key, tiles_done=done, tiles_total=total,
                             fraction=done / max(1, total), notice="; ".join(notices) or None)


# ------------------------------------------------------------------- short forms
def prepare_planes(
    image: ImageStack | np.ndarray, info: ModelInfo, axes: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Planes ``(P, C, Y, X)`` with the model's channels, and their normalisation stats.

    Stats are computed once over the whole stack, so every slice is normalised alike.
    """
    planes = image.data if isinstance(image, ImageStack) else to_planes(np.asarray(image), axes)[0]
    planes = match_channels(planes, info.in_channels)
    return planes, stack_percentiles(planes, info)


def stack_percentiles(planes: np.ndarray, info: ModelInfo) -> np.ndarray:
    """The model's normalisation percentiles ``(C, 2)`` of planes ``(P, C, Y, X)``
    (zeros when the model does not normalise by percentiles)."""
    norm = info.normalization
    if norm.get("method", "percentile") == "percentile":
        return percentiles(planes, float(norm["low"]), float(norm["high"]))
    return np.zeros((planes.shape[1], 2))


def iter_predict(
    model: nn.Module,
    info: ModelInfo,
    planes: np.ndarray,
    stats: np.ndarray | None = None,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int | None = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
    runner: TileRunner | None = None,
    tta: bool = False,
) -> Iterator[PlaneEvent]:
    """Predict probabilities plane by plane, yielding progress after each batch of tiles.

    Parameters
    ----------
    planes : ndarray, shape (P, C, Y, X)
        Raw planes with the model's channel count (see :func:`prepare_planes`).
    stats : ndarray, shape (C, 2), optional
        Normalisation percentiles; computed from ``planes`` when None.
    tile, overlap : int
        Tile side (rounded up to a multiple of 32) and overlap in pixels.
    batch_size : int or None
        Tiles per batch; None: automatic (see :class:`TileRunner`).
    runner : TileRunner, optional
        Runs the batches (and keeps a batch size halved after running out of memory
        across calls); made from ``model``, ``device``, ``batch_size``, ``amp``, ``tta``
        when None.
    tta : bool
        Test-time augmentation: average the prediction over flipped (and, for square
        tiles, rotated) copies of each tile, 4 to 8 times the work (see
        :class:`TileRunner`). A runner given runs with its own setting (it must
        have been made with ``tta=True`` to ask for it here).

    Yields
    ------
    PlaneEvent
        ``plane`` is the plane's index; ``probabilities`` ``(K, Y, X)`` is set on the
        event that completes it; ``fraction`` is the share of the planes done.
    """
    runner = _runner(model, runner, tta, device=device, batch_size=batch_size, amp=amp)
    if stats is None:
        stats = stack_percentiles(planes, info)
    n = planes.shape[0]
    core = PlanePredictor(model, info, runner, tile=tile, overlap=overlap)
    for ev in core.predict(((p, planes[p]) for p in range(n)), stats):
        ev.fraction = share_done(ev.plane, n, ev.tiles_done, ev.tiles_total)
        yield ev


def predict_planes(
    model: nn.Module,
    info: ModelInfo,
    planes: np.ndarray,
    stats: np.ndarray | None = None,
    **kwargs,
) -> np.ndarray:
    """Probabilities ``(P, K, Y, X)`` of raw planes ``(P, C, Y, X)`` with the model's
    channels (keyword arguments as :func:`iter_predict`)."""
    if planes.shape[0] == 0:
        raise CellfitError("the image has no planes to predict: give a non-empty image.")
    out = np.empty((planes.shape[0], info.n_classes, *planes.shape[2:]), dtype=np.float32)
    for ev in iter_predict(model, info, planes, stats, **kwargs):
        if ev.probabilities is not None:
            out[ev.plane] = ev.probabilities
    return out


def predict_plane(
    model: nn.Module, info: ModelInfo, image: np.ndarray, **kwargs
) -> np.ndarray:
    """Probabilities ``(K, Y, X)`` of one raw plane ``(C, Y, X)`` with the model's
    channels (keyword arguments as :func:`iter_predict`)."""
    if image.ndim != 3:
        raise ValueError(f"predict_plane takes (C, Y, X), got {image.shape}")
    return predict_planes(model, info, image[None], **kwargs)[0]


def predict_stack(
    model: nn.Module,
    info: ModelInfo,
    image: ImageStack | np.ndarray,
    axes: str | None = None,
    **kwargs,
) -> np.ndarray:
    """Probabilities ``(P, K, Y, X)`` for every plane of an image or stack, in any
    layout (``axes`` as :func:`cellfit.io.to_planes`; keyword arguments as
    :func:`iter_predict`)."""
    planes, stats = prepare_planes(image, info, axes)
    return predict_planes(model, info, planes, stats, **kwargs)
