"""Intensity normalisation and channel matching.

The method is stored in the model file, so prediction normalises exactly as training
did. Percentile normalisation maps the ``low`` percentile of each channel to 0 and the
``high`` percentile to 1, per image, which makes 8-bit, 16-bit and float images alike.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize

from cellfit.errors import CellfitError

__all__ = [
    "DEFAULT_NORMALIZATION",
    "MAX_SAMPLES",
    "match_channels",
    "normalize",
    "percentiles",
    "resize_plane",
    "sample_steps",
    "scaled_shape",
]

DEFAULT_NORMALIZATION: dict = {"method": "percentile", "low": 1.0, "high": 99.8}
#: most pixels a channel that percentile sampling reads (see :func:`percentiles`)
MAX_SAMPLES = 4_000_000


def sample_steps(n_planes: int, height: int, width: int) -> tuple[int, int]:
    """``(step, plane_step)``: percentiles of a stack of ``n_planes`` planes of
    ``height x width`` pixels are taken on every ``step``-th row and column of every
    ``plane_step``-th plane, at most about :data:`MAX_SAMPLES` pixels a channel."""
    pixels = n_planes * height * width
    step = max(1, int(np.ceil(np.sqrt(pixels / MAX_SAMPLES))))
    plane_step = max(1, int(np.ceil(pixels / (step * step) / MAX_SAMPLES)))
    return step, plane_step


def percentiles(planes: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-channel ``(low, high)`` percentiles of a ``(P, C, Y, X)`` array, shape (C, 2).

    Large stacks are subsampled on a regular grid (at most ~4 million pixels a channel).
    """
    p, c, h, w = planes.shape
    step, pstep = sample_steps(p, h, w)
    out = np.empty((c, 2), dtype=np.float64)
    for ch in range(c):
        sample = np.asarray(planes[::pstep, ch, ::step, ::step], dtype=np.float64)
        out[ch] = np.percentile(sample, [low, high])
    return out


def normalize(
    planes: np.ndarray, method: dict | None = None, stats: np.ndarray | None = None
) -> np.ndarray:
    """Normalise a ``(P, C, Y, X)`` image to float32.

    Parameters
    ----------
    planes : ndarray, shape (P, C, Y, X)
    method : dict
        ``{"method": "percentile", "low": 1.0, "high": 99.8}`` (default) or
        ``{"method": "none"}``.
    stats : ndarray, shape (C, 2), optional
        Precomputed percentiles (e.g. of the whole stack when normalising one slice).

    Returns
    -------
    ndarray, shape (P, C, Y, X), float32
    """
    method = method or DEFAULT_NORMALIZATION
    kind = method.get("method", "percentile")
    x = np.asarray(planes, dtype=np.float32)
    if kind == "none":
        return x
    if kind != "percentile":
        raise CellfitError(
            f"the model asks for normalisation {kind!r}, which this cellfit does not know: "
            "update cellfit or retrain the model."
        )
    if stats is None:
        stats = percentiles(planes, float(method["low"]), float(method["high"]))
    lo = stats[:, 0].astype(np.float32)[None, :, None, None]
    hi = stats[:, 1].astype(np.float32)[None, :, None, None]
    scale = np.where(hi - lo > 1e-6, hi - lo, np.float32(1.0))
    return (x - lo) / scale


def match_channels(planes: np.ndarray, n_channels: int) -> np.ndarray:
    """Give a ``(P, C, Y, X)`` image the model's number of channels.

    Grayscale into an RGB model is repeated over the channels; RGB(A) into a grayscale
    model is averaged (alpha dropped). Any other mismatch is an error.
    """
    c = planes.shape[1]
    if c == n_channels:
        return planes
    if c == 4 and n_channels in (1, 3):
        planes = planes[:, :3]
        c = 3
        if n_channels == 3:
            return planes
    if c == 1:
        return np.repeat(planes, n_channels, axis=1)
    if n_channels == 1 and c == 3:
        return planes.mean(axis=1, keepdims=True, dtype=np.float32)
    raise CellfitError(
        f"the image has {c} channels but the model was trained on {n_channels}: "
        f"give images with {n_channels} channel(s) or train a model on these."
    )


def resize_plane(plane: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize a ``(C, Y, X)`` plane to ``shape`` (anti-aliased when shrinking; order 0
    for label images, which keeps their values)."""
    if tuple(plane.shape[-2:]) == tuple(shape):
        return plane
    if order == 0:
        return resize(
            plane, (plane.shape[0], *shape), order=0, preserve_range=True, anti_aliasing=False
        ).astype(plane.dtype)
    shrinking = shape[0] < plane.shape[-2] or shape[1] < plane.shape[-1]
    out = resize(
        plane.astype(np.float32, copy=False),
        (plane.shape[0], *shape),
        order=order,
        preserve_range=True,
        anti_aliasing=shrinking,
    )
    return out.astype(np.float32)


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Plane shape after scaling by ``scale`` (at least 1 pixel a side)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))
