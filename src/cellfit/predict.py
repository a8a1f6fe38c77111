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

    @property
    def fraction(self) -> float:
        return (self.plane + self.tiles_done / max(1, self.tiles_total)) / max(1, self.n_planes)


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
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
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
    """
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    if stats is None and info.normalization.get("method", "percentile") == "percentile":
        stats = percentiles(
            planes, float(info.normalization["low"]), float(info.normalization["high"])
        )
    tile = _round_up(max(tile, STRIDE))
    overlap = int(min(max(overlap, 0), tile // 2))
    margin = max(overlap // 2, 8)
    model.eval()
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
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
        for b0 in range(0, len(coords), batch_size):
            batch = coords[b0 : b0 + batch_size]
            x = np.stack([plane[:, y : y + th, x0 : x0 + tw] for y, x0 in batch])
            xt = torch.from_numpy(x).to(device)
            if device.type == "cuda":
                xt = xt.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(
                device.type, dtype=amp_dtype, enabled=use_amp
            ):
                prob = model(xt).float().softmax(dim=1)
            prob_np = prob.cpu().numpy()
            for (y, x0), pr in zip(batch, prob_np):
                key = (y == 0, y + th >= H, x0 == 0, x0 + tw >= W)
                window = windows.get(key)
                if window is None:
                    window = windows[key] = blend_window(th, tw, flat=key)
                acc[:, y : y + th, x0 : x0 + tw] += pr * window
                wsum[y : y + th, x0 : x0 + tw] += window
            done += len(batch)
            if done < len(coords):
                yield PredictEvent(p, n_planes, done, len(coords))
        acc /= wsum[None]
        probs = acc[:, m : m + h, m : m + w]
        if probs.shape[1:] != full_shape:
            probs = resize_plane(probs, full_shape)
        yield PredictEvent(p, n_planes, done, len(coords), probs)


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
