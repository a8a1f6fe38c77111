"""Small synthetic fluorescence-like images with known cells (tests, demo, sample data)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["sparse_annotation", "synthetic_cells"]


def synthetic_cells(
    shape: tuple[int, int] = (128, 128),
    n_cells: int = 12,
    radius: tuple[float, float] = (6.0, 11.0),
    touching: bool = True,
    noise: float = 0.05,
    seed: int = 0,
    dtype: type = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """Bright elliptic "nuclei" on a dark, noisy background.

    Returns
    -------
    image : ndarray, shape ``shape``, ``dtype``
    labels : ndarray of int32, shape ``shape``
        0 background, 1..N one id per cell (touching cells are split by nearest centre).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros(shape, np.int32)
    centres = []
    k = 0
    for _ in range(n_cells * 30):
        if k >= n_cells:
            break
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
        min_d = 1.6 * r if touching else 2.4 * r
        if any(np.hypot(cy - y, cx - x) < min_d for y, x, _ in centres):
            continue
        a = r * rng.uniform(0.8, 1.2)
        b = r * rng.uniform(0.8, 1.2)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        k += 1
        labels[inside & (labels == 0)] = k
        centres.append((cy, cx, k))
    if touching and centres:
        # split overlaps by nearest centre so touching cells share a straight border
        fg = labels > 0
        d = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx, _ in centres])
        nearest = np.argmin(d, axis=0) + 1
        labels = np.where(fg, nearest, 0).astype(np.int32)
    img = np.zeros(shape, np.float64)
    for i in range(1, k + 1):
        img[labels == i] = rng.uniform(0.5, 1.0)
    # a dim gap between touching cells, as in real nuclei
    edge = ndi.morphological_gradient(labels, size=3) > 0
    img[edge & (labels > 0)] *= 0.6
    img = ndi.gaussian_filter(img, 1.0) + 0.1
    img = img * (1 + 0.2 * (xx / w))  # illumination gradient
    img = img + rng.normal(0, noise, shape)
    img = np.clip(img, 0, None)
    if np.issubdtype(dtype, np.integer):
        top = 255 if dtype == np.uint8 else 4000
        img = img / img.max() * top
    return img.astype(dtype), labels


def sparse_annotation(
    labels: np.ndarray,
    fraction: float = 0.3,
    ring: int = 4,
    strokes: int = 3,
    seed: int = 0,
    min_cells: int = 1,
) -> np.ndarray:
    """Imitate a user's sparse annotation from complete instance labels.

    A random ``fraction`` of the cells is painted whole (ids 2, 3, ...), a background
    ring of ``ring`` pixels around them and ``strokes`` short background strokes are
    painted 1, everything else is 0 (not annotated).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    ids = np.setdiff1d(np.unique(labels), [0])
    n = max(min_cells, int(round(fraction * len(ids))))
    chosen = rng.choice(ids, size=min(n, len(ids)), replace=False) if len(ids) else []
    ann = np.zeros(labels.shape, np.uint16)
    sel = np.isin(labels, chosen)
    if ring > 0:
        near = ndi.binary_dilation(sel, iterations=ring)
        ann[near & (labels == 0)] = 1
    for j, cid in enumerate(chosen):
        ann[labels == cid] = j + 2
    h, w = labels.shape
    bg = labels == 0
    for _ in range(strokes):
        y, x = rng.integers(0, h), rng.integers(0, w)
        length = max(8, min(h, w) // 4)
        horizontal = rng.random() < 0.5
        for t in range(length):
            yy, xx = (y, min(w - 1, x + t)) if horizontal else (min(h - 1, y + t), x)
            y0, y1 = max(0, yy - 1), min(h, yy + 2)
            x0, x1 = max(0, xx - 1), min(w, xx + 2)
            patch = bg[y0:y1, x0:x1] & (ann[y0:y1, x0:x1] == 0)
            ann[y0:y1, x0:x1][patch] = 1
    return ann
