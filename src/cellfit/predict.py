"""Tiled prediction over 2D images, 3D stacks and time series.

Each plane is cut into tiles of ``tile`` pixels (a multiple of the encoder stride, 32)
that overlap by ``overlap`` pixels; tiles run through the network in batches and
their softmax outputs are blended with a Gaussian window, so seams do not show and
any image size works. Planes smaller than a tile are padded (reflect) to the stride.
Memory is bounded by one plane's probabilities plus one batch of tiles.

:func:`iter_predict` is a generator that yields :class:`PredictEvent` after each batch
of tiles, so callers can show progress and stop between batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellfit.errors import CellfitError
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
    "PredictEvent",
    "TileRunner",
    "blend_window",
    "iter_predict",
    "predict_plane",
    "predict_stack",
    "prepare_planes",
    "resolve_device",
    "tile_starts",
]

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the named device."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CellfitError(
            "--device cuda was asked for but PyTorch sees no CUDA GPU: use --device auto or cpu "
            "(run `cellfit devices` to see what PyTorch finds)."
        )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise CellfitError(
            "--device mps was asked for but this machine has no Apple GPU available: "
            "use --device auto or cpu."
        )
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise CellfitError(f"unknown device {device!r}: use auto, cpu, cuda or mps.")
    return torch.device(name)


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


def _round_up(n: int, m: int = STRIDE) -> int:
    return int(-(-n // m) * m)


@dataclass
class PredictEvent:
    """Progress of a prediction.

    ``probabilities`` is set (shape (K, Y, X), float32) on the event that completes a
    plane, and None otherwise.
    """

    plane: int
    n_planes: int
    tiles_done: int
    tiles_total: int
    probabilities: np.ndarray | None = None
    #: a message for the user, e.g. that the tile batch was halved after running out of memory
    notice: str | None = None

    @property
    def fraction(self) -> float:
        return (self.plane + self.tiles_done / max(1, self.tiles_total)) / max(1, self.n_planes)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA, and MPS's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class TileRunner:
    """Runs batches of tiles through the network and returns their softmax.

    AMP (bfloat16 where supported, else float16) and channels-last on CUDA. The batch
    size is automatic when None: on CUDA it is measured from the free GPU memory and
    the memory one tile takes, elsewhere it is 4. When the device runs out of memory,
    the batch is halved and retried (down to one tile), and a notice says so; the
    smaller batch is kept for the tiles that follow.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        *,
        batch_size: int | None = None,
        amp: bool = True,
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
        self.notices: list[str] = []

    def pop_notice(self) -> str | None:
        """The notices since the last call, joined, or None."""
        if not self.notices:
            return None
        text = "; ".join(self.notices)
        self.notices.clear()
        return text

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        ):
            return self.model(x).float().softmax(dim=1)

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
                        f"tile of {xt.shape[-2]}x{xt.shape[-1]} pixels: use a smaller --tile "
                        "(e.g. 256) or --device cpu."
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


def prepare_planes(
    image: ImageStack | np.ndarray, info: ModelInfo, axes: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Planes ``(P, C, Y, X)`` with the model's channels, and their normalisation stats.

    Stats are computed once over the whole stack, so every slice is normalised alike.
    """
    planes = image.data if isinstance(image, ImageStack) else to_planes(np.asarray(image), axes)[0]
    planes = match_channels(planes, info.in_channels)
    norm = info.normalization
    if norm.get("method", "percentile") == "percentile":
        stats = percentiles(planes, float(norm["low"]), float(norm["high"]))
    else:
        stats = np.zeros((planes.shape[1], 2))
    return planes, stats


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
) -> Iterator[PredictEvent]:
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
        across calls); made from ``model``, ``device``, ``batch_size``, ``amp`` when None.
    """
    if runner is None:
        runner = TileRunner(model, device, batch_size=batch_size, amp=amp)
    if stats is None and info.normalization.get("method", "percentile") == "percentile":
        stats = percentiles(
            planes, float(info.normalization["low"]), float(info.normalization["high"])
        )
    tile = _round_up(max(tile, STRIDE))
    overlap = int(min(max(overlap, 0), tile // 2))
    margin = max(overlap // 2, 8)
    model.eval()
    n_planes = planes.shape[0]
    for p in range(n_planes):
        plane = normalize(planes[p : p + 1], info.normalization, stats)[0]
        full_shape = plane.shape[1:]
        scale = float(getattr(info, "scale", 1.0) or 1.0)
        if abs(scale - 1.0) > 1e-6:
            plane = resize_plane(plane, scaled_shape(full_shape, scale))
        _c, h, w = plane.shape
        # a mirrored margin gives pixels at the image border the same context whatever
        # the tiling; then pad up to the stride where the plane is smaller than a tile
        m = margin
        mode = "reflect" if min(h, w) > 1 else "edge"
        plane = np.pad(plane, ((0, 0), (m, m), (m, m)), mode=mode)
        th, tw = min(tile, _round_up(h + 2 * m)), min(tile, _round_up(w + 2 * m))
        ph, pw = max(th - h - 2 * m, 0), max(tw - w - 2 * m, 0)
        if ph or pw:
            plane = np.pad(plane, ((0, 0), (0, ph), (0, pw)), mode=mode)
        H, W = plane.shape[1:]
        ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
        coords = [(y, x) for y in ys for x in xs]
        windows: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        acc = np.zeros((info.n_classes, H, W), dtype=np.float32)
        wsum = np.zeros((H, W), dtype=np.float32)
        done = 0
        b0 = 0
        while b0 < len(coords):
            step = runner.batch_size or runner.auto_batch_size((plane.shape[0], th, tw))
            runner.batch_size = step
            batch = coords[b0 : b0 + step]
            b0 += len(batch)
            x = np.stack([plane[:, y : y + th, x0 : x0 + tw] for y, x0 in batch])
            prob_np = runner(torch.from_numpy(x)).cpu().numpy()
            for (y, x0), pr in zip(batch, prob_np):
                key = (y == 0, y + th >= H, x0 == 0, x0 + tw >= W)
                window = windows.get(key)
                if window is None:
                    window = windows[key] = blend_window(th, tw, flat=key)
                acc[:, y : y + th, x0 : x0 + tw] += pr * window
                wsum[y : y + th, x0 : x0 + tw] += window
            done += len(batch)
            if done < len(coords):
                yield PredictEvent(p, n_planes, done, len(coords), notice=runner.pop_notice())
        acc /= wsum[None]
        probs = acc[:, m : m + h, m : m + w]
        if probs.shape[1:] != full_shape:
            probs = resize_plane(probs, full_shape)
        yield PredictEvent(p, n_planes, done, len(coords), probs, notice=runner.pop_notice())


def predict_plane(
    model: nn.Module, info: ModelInfo, image: np.ndarray, **kwargs
) -> np.ndarray:
    """Probabilities ``(K, Y, X)`` of one normalised-or-raw plane ``(C, Y, X)``."""
    if image.ndim != 3:
        raise ValueError(f"predict_plane takes (C, Y, X), got {image.shape}")
    out = None
    for ev in iter_predict(model, info, image[None], **kwargs):
        if ev.probabilities is not None:
            out = ev.probabilities
    assert out is not None
    return out


def predict_stack(
    model: nn.Module,
    info: ModelInfo,
    image: ImageStack | np.ndarray,
    axes: str | None = None,
    **kwargs,
) -> np.ndarray:
    """Probabilities ``(P, K, Y, X)`` for every plane of an image or stack."""
    planes, stats = prepare_planes(image, info, axes)
    if planes.shape[0] == 0:
        raise CellfitError("the image has no planes to predict: give a non-empty image.")
    out = np.empty((planes.shape[0], info.n_classes, *planes.shape[2:]), dtype=np.float32)
    for ev in iter_predict(model, info, planes, stats, **kwargs):
        if ev.probabilities is not None:
            out[ev.plane] = ev.probabilities
    return out
