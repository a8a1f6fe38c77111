"""Synthetic microscopy with exact labels: everything here is generated and needs no
licence.

Two generators:

:func:`synthetic_cells`
    small fluorescence-like images of bright elliptic nuclei, quick to make, for tests,
    the demo and the plugin's sample data; :func:`sparse_annotation` imitates a user's
    sparse painting from their complete labels.
:func:`scene`
    procedural images of cells in one of five looks, on which the starting model is
    pretrained (with openly licensed real images):

    ``fluo_nuclei``
        bright nuclei on a dark background (DNA stains such as DAPI or Hoechst): varied
        brightness, chromatin texture, nucleoli, a few very bright mitotic nuclei,
        dividing pairs, out-of-focus blur, illumination gradients, Poisson and read noise.
    ``fluo_cells``
        whole cells of a cytoplasmic stain: irregular outlines, a dimmer nucleus inside,
        dense and touching.
    ``brightfield``
        unstained cells that absorb a little light, with a thin refractive rim, RGB.
    ``phase``
        phase-contrast cells: dark bodies with bright halos around them.
    ``he``
        H&E-like stained tissue: hematoxylin (purple) nuclei on eosin (pink) stroma, RGB,
        built by Beer-Lambert mixing of the two stains' optical densities.

    Images are ``(Y, X)`` for one channel and ``(Y, X, 3)`` for RGB, in a random bit depth
    (8, 12 or 16 bit, or float), as real files are; labels are ``(Y, X)`` int32 with one id
    per cell.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["KINDS", "layout", "scene", "sparse_annotation", "synthetic_cells"]


# ------------------------------------------------------------ small test images
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


# ------------------------------------------------------- scenes for pretraining
KINDS: dict[str, float] = {
    "fluo_nuclei": 0.35,
    "fluo_cells": 0.12,
    "brightfield": 0.1,
    "phase": 0.18,
    "he": 0.25,
}
"""The looks :func:`scene` draws from, and how often (``kind=None``)."""


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered noise (texture and shading)."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), max(sigma, 0.5), mode="wrap")
    s = n.std()
    return n / s if s > 0 else n


def layout(
    rng: np.random.Generator,
    shape: tuple[int, int],
    diameter: float,
    density: float,
    irregularity: float = 0.1,
    elongation: float = 0.25,
    clustered: bool = False,
    touching: float = 0.5,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Instance labels of cells with smooth, random outlines.

    Parameters
    ----------
    diameter : float
        Median cell diameter in pixels (each cell varies about it by ±25%).
    density : float
        Target share of the image covered by cells (0-0.8).
    irregularity : float
        Amplitude of the outline's low-order wobble (0 = ellipses).
    elongation : float
        Up to this much longer than wide.
    clustered : bool
        Place cells in clumps rather than uniformly.
    touching : float
        0: cells keep apart; 1: cells press against each other.

    Returns
    -------
    labels : int32 array, 0 background, 1..N cells (overlaps split along the line where
        both outlines are equally far, so touching cells share a natural border)
    cells : list of (cy, cx, radius)
    """
    h, w = shape
    r_med = diameter / 2
    area = np.pi * r_med**2
    n_target = int(density * h * w / area)
    best = np.full(shape, np.inf, np.float32)
    labels = np.zeros(shape, np.int32)
    cells: list[tuple[float, float, float]] = []
    if clustered:
        k = max(1, n_target // rng.integers(4, 12))
        hubs = rng.uniform(0, 1, (k, 2)) * [h, w]
    min_gap = 1.05 - 0.45 * touching  # centre distance, in units of the two radii
    tries = 0
    while len(cells) < n_target and tries < n_target * 20:
        tries += 1
        r = r_med * float(np.exp(rng.normal(0, 0.18)))
        if clustered:
            cy, cx = hubs[rng.integers(len(hubs))] + rng.normal(0, 2.5 * r_med, 2)
        else:
            cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        if any(np.hypot(cy - y, cx - x) < min_gap * (r + q) for y, x, q in cells):
            continue
        cells.append((float(cy), float(cx), r))
    for i, (cy, cx, r) in enumerate(cells):
        a = r * (1 + elongation * rng.uniform(0, 1))
        b = r / np.sqrt(a / r)
        a = r * np.sqrt(a / r)
        t = rng.uniform(0, np.pi)
        y0, y1 = int(max(0, cy - 1.6 * r)), int(min(h, cy + 1.6 * r + 1))
        x0, x1 = int(max(0, cx - 1.6 * r)), int(min(w, cx + 1.6 * r + 1))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        theta = np.arctan2(v, u)
        wobble = np.ones_like(theta)
        for order in (2, 3, 4, 5):
            wobble += irregularity / order * rng.normal() * np.cos(order * theta + rng.uniform(0, 6.3))
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.clip(wobble, 0.5, None)
        sub_best = best[y0:y1, x0:x1]
        take = (rho < 1) & (rho < sub_best)
        sub_best[take] = rho[take]
        labels[y0:y1, x0:x1][take] = i + 1
    # relabel 1..N (cells outside the image or fully covered vanish) and drop slivers
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(6, 0.05 * area)
    keep[0] = False
    lut = np.zeros(len(sizes), np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1)
    labels = lut[labels]
    cells = [c for c, k in zip(cells, keep[1:]) if k]
    return labels, cells


def _specks(rng, shape, n: int, radius: tuple[float, float]) -> np.ndarray:
    """``n`` small round blobs (debris, blood cells, granules): a float map in [0, 1]."""
    h, w = shape
    out = np.zeros(shape)
    if n <= 0:
        return out
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    rs = rng.uniform(*radius, n)
    for y, x, r in zip(ys, xs, rs):
        R = int(np.ceil(r)) + 1
        y0, y1, x0, x1 = max(0, y - R), min(h, y + R + 1), max(0, x - R), min(w, x + R + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = np.clip(r + 0.5 - np.hypot(yy - y, xx - x), 0, 1)
        out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], disc)
    return out


def _streaks(rng, shape, sigma: float) -> np.ndarray:
    """Fibres: noise smoothed much more along one direction than across, in [0, 1]."""
    n = rng.standard_normal(shape)
    across = max(0.7, sigma / rng.uniform(3, 8))
    n = ndi.gaussian_filter(n, (across, sigma), mode="wrap")
    n = ndi.rotate(n, rng.uniform(0, 180), reshape=False, mode="wrap", order=1)
    n = n / max(n.std(), 1e-9)
    return np.clip(np.abs(n) / 2.5, 0, 1)


def _interior(labels: np.ndarray) -> np.ndarray:
    """0 at a cell's border, rising to 1 at its centre (per cell)."""
    inside = labels > 0
    edges = ndi.morphological_gradient(labels, size=3) > 0
    d = ndi.distance_transform_edt(inside & ~edges)
    if not inside.any():
        return d
    peak = ndi.maximum(d, labels, index=np.arange(labels.max() + 1))
    peak = np.asarray(peak, np.float64)
    peak[peak == 0] = 1
    return np.clip(d / peak[labels], 0, 1)


def _acquire(rng, clean: np.ndarray, photons: float, read: float, gain_gradient: float) -> np.ndarray:
    """Shading, Poisson shot noise and read noise on an image in [0, 1]."""
    h, w = clean.shape[:2]
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    ang = rng.uniform(0, 2 * np.pi)
    shade = 1 + gain_gradient * ((np.cos(ang) * xx + np.sin(ang) * yy) - 0.5)
    shade = shade + 0.5 * gain_gradient * _smooth_noise(rng, (h, w), max(h, w) / 4)
    if clean.ndim == 3:
        shade = shade[..., None]
    img = np.clip(clean * shade, 0, None)
    img = rng.poisson(img * photons) / photons
    return img + rng.normal(0, read, img.shape)


def _quantise(rng, img: np.ndarray) -> np.ndarray:
    """Write the image as a camera would: 8, 12 or 16 bit, sometimes float."""
    depth = rng.choice(["uint8", "uint12", "uint16", "float"], p=[0.35, 0.25, 0.3, 0.1])
    if depth == "float":
        return (img * rng.uniform(0.5, 1000)).astype(np.float32)
    top = {"uint8": 255, "uint12": 4095, "uint16": 65535}[depth]
    fill = rng.uniform(0.25, 1.05)  # how much of the range the brightest cell uses
    offset = rng.uniform(0, 0.06) * top
    q = np.clip(np.round(img / max(np.percentile(img, 99.9), 1e-6) * fill * top + offset), 0, top)
    return q.astype(np.uint8 if depth == "uint8" else np.uint16)


def _unlabelled(rng, shape, d, n, inside) -> np.ndarray:
    """What a fluorescence image shows besides its labelled cells (added, not labelled):
    small bright debris and dim, blurred cells out of the focal plane."""
    out = np.zeros(shape)
    if rng.random() < 0.6:  # debris: much smaller than a cell, dim to very bright
        k = int(rng.integers(1, 4 + max(1, n) // 2))
        specks = _specks(rng, shape, k, (0.04 * d, 0.14 * d))
        out += rng.uniform(0.3, 3.0) * ndi.gaussian_filter(specks, 0.7)
    if rng.random() < 0.4:  # out-of-focus cells: a cell's size, blurred and dim
        k = int(rng.integers(1, 6))
        blobs = _specks(rng, shape, k, (0.3 * d, 0.5 * d))
        out += rng.uniform(0.08, 0.35) * ndi.gaussian_filter(blobs, rng.uniform(d / 6, d / 3))
    return out * ~inside


def _fluo_nuclei(rng, shape, d):
    labels, cells = layout(
        rng, shape, d,
        density=rng.uniform(0.05, 0.55),
        irregularity=rng.uniform(0.0, 0.2),
        elongation=rng.uniform(0.0, 0.6),
        clustered=rng.random() < 0.3,
        touching=rng.uniform(0, 1),
    )
    n = labels.max()
    bright = np.exp(rng.normal(0, rng.uniform(0.1, 0.6), n + 1))
    mitotic = rng.random(n + 1) < rng.uniform(0, 0.08)
    bright[mitotic] *= rng.uniform(2, 5)
    bright[0] = 0
    interior = _interior(labels)
    edge_dim = rng.uniform(0, 0.6)
    body = bright[labels] * (1 - edge_dim * (1 - interior) ** 2)
    texture = rng.uniform(0, 0.45)
    body = body * np.clip(1 + texture * _smooth_noise(rng, shape, rng.uniform(1, d / 6)), 0.2, None)
    # nucleoli: dark spots inside some nuclei
    if rng.random() < 0.6 and n:
        spots = np.zeros(shape)
        for cy, cx, r in cells:
            for _ in range(rng.integers(0, 4)):
                y = int(cy + rng.normal(0, r / 3))
                x = int(cx + rng.normal(0, r / 3))
                if 0 <= y < shape[0] and 0 <= x < shape[1]:
                    spots[y, x] = 1
        spots = ndi.gaussian_filter(spots, max(1.0, d / 14))
        spots /= max(spots.max(), 1e-9)
        body = body * (1 - rng.uniform(0.2, 0.6) * spots)
    body = body * (labels > 0)
    # out-of-focus haze
    haze = rng.uniform(0, 0.3) * ndi.gaussian_filter(body, d / 2)
    img = ndi.gaussian_filter(body, rng.uniform(0.4, max(0.5, d / 12))) + haze
    img = img / max(np.percentile(img[labels > 0], 95) if n else 1.0, 1e-6)
    img = img + _unlabelled(rng, shape, d, n, labels > 0)
    background = rng.uniform(0.0, 0.25)
    img = img + background
    return _acquire(rng, img, photons=np.exp(rng.uniform(np.log(8), np.log(3000))),
                    read=rng.uniform(0, 0.03), gain_gradient=rng.uniform(0, 0.6)), labels


def _fluo_cells(rng, shape, d):
    labels, _ = layout(
        rng, shape, d,
        density=rng.uniform(0.3, 0.75),
        irregularity=rng.uniform(0.15, 0.45),
        elongation=rng.uniform(0.2, 1.0),
        clustered=rng.random() < 0.4,
        touching=rng.uniform(0.5, 1),
    )
    n = labels.max()
    bright = np.exp(rng.normal(0, 0.4, n + 1))
    bright[0] = 0
    interior = _interior(labels)
    body = bright[labels] * (0.5 + 0.5 * interior ** rng.uniform(0.3, 1.5))
    nucleus_dim = rng.uniform(0, 0.6)
    body = body * (1 - nucleus_dim * (interior > 0.6))
    body = body * np.clip(1 + rng.uniform(0.1, 0.5) * _smooth_noise(rng, shape, rng.uniform(1, 3)), 0.1, None)
    body = body * (labels > 0)
    img = ndi.gaussian_filter(body, rng.uniform(0.5, 2.0))
    img = img / max(np.percentile(img[labels > 0], 95) if n else 1.0, 1e-6) + rng.uniform(0, 0.2)
    img = img + _unlabelled(rng, shape, d, n, labels > 0)
    return _acquire(rng, img, photons=np.exp(rng.uniform(np.log(10), np.log(2000))),
                    read=rng.uniform(0, 0.03), gain_gradient=rng.uniform(0, 0.5)), labels


def _brightfield(rng, shape, d):
    labels, _ = layout(
        rng, shape, d,
        density=rng.uniform(0.1, 0.6),
        irregularity=rng.uniform(0.05, 0.35),
        elongation=rng.uniform(0, 0.6),
        clustered=rng.random() < 0.4,
        touching=rng.uniform(0, 1),
    )
    inside = (labels > 0).astype(np.float64)
    interior = _interior(labels)
    absorb = rng.uniform(0.08, 0.5) * inside * (0.6 + 0.4 * interior)
    absorb = absorb * np.clip(1 + 0.4 * _smooth_noise(rng, shape, rng.uniform(1, 3)), 0, None)
    edge = ndi.gaussian_gradient_magnitude(inside, rng.uniform(0.7, 1.5))
    rim = rng.uniform(-0.6, 0.6) * edge / max(edge.max(), 1e-6)
    grey = rng.uniform(0.6, 0.9) * (1 - absorb) + 0.25 * rim
    grey = ndi.gaussian_filter(grey, rng.uniform(0.3, 1.2))
    tint = rng.uniform(0.85, 1.0, 3)
    img = grey[..., None] * tint
    return _acquire(rng, img, photons=np.exp(rng.uniform(np.log(50), np.log(5000))),
                    read=rng.uniform(0, 0.02), gain_gradient=rng.uniform(0, 0.4)), labels


def _phase(rng, shape, d):
    """Phase contrast (and, with the sign flipped, defocused brightfield) of flat adherent
    cells: the image is roughly a high-pass of the cells' optical thickness, which gives
    dark bodies, dark granules, thin bright edges and bright halos; cells can be spread
    and spindly or rounded and thick (dividing or detached)."""
    labels, _ = layout(
        rng, shape, d,
        density=rng.uniform(0.1, 0.65),
        irregularity=rng.uniform(0.1, 0.6),
        elongation=rng.uniform(0, 3.5),
        clustered=rng.random() < 0.5,
        touching=rng.uniform(0.2, 1),
    )
    n = labels.max()
    inside = (labels > 0).astype(np.float64)
    interior = _interior(labels)
    thick = rng.uniform(0.3, 1.0, n + 1) * np.exp(rng.normal(0, 0.25, n + 1))
    rounded = rng.random(n + 1) < rng.uniform(0, 0.12)
    thick[rounded] *= rng.uniform(2, 4)
    thick[0] = 0
    body = thick[labels] * (0.35 + 0.65 * interior ** rng.uniform(0.3, 1.5))
    grains = _specks(rng, shape, int(rng.uniform(0, 2) * n), (0.5, max(0.8, d / 25)))
    body = body * (1 + rng.uniform(0, 0.6) * grains) * inside
    body = body * np.clip(1 + 0.3 * _smooth_noise(rng, shape, rng.uniform(1, 3)), 0, None)
    debris = _specks(rng, shape, int(rng.integers(0, 3 + n)), (0.5, max(1.0, 0.1 * d)))
    body = body + rng.uniform(0.3, 1.5) * debris * (1 - inside)
    halo = rng.uniform(2.0, max(2.5, d / 3))
    high = body - ndi.gaussian_filter(body, halo)
    sign = -1.0 if rng.random() < 0.85 else 1.0  # positive phase / defocused brightfield
    img = 0.5 + sign * rng.uniform(0.25, 0.8) * high + 0.03 * rng.uniform(0, 1) * body
    img = ndi.gaussian_filter(img, rng.uniform(0.3, 1.0))
    return _acquire(rng, np.clip(img, 0.02, None), photons=np.exp(rng.uniform(np.log(200), np.log(5000))),
                    read=rng.uniform(0, 0.02), gain_gradient=rng.uniform(0, 0.4)), labels


_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])


def _stain(rng, vector: np.ndarray) -> np.ndarray:
    """A stain's optical-density colour, varied as staining and scanners vary."""
    v = np.clip(vector + rng.normal(0, 0.07, 3), 0.02, None)
    return v / np.linalg.norm(v)


def _he(rng, shape, d):
    """H&E tissue: hematoxylin nuclei (solid or vesicular with a nucleolus, round or
    spindle) in eosin cytoplasm with vacuoles, fibrous stroma, fat and lumens (white), red
    blood cells and small dark debris (not labelled)."""
    labels, cells = layout(
        rng, shape, d,
        density=rng.uniform(0.1, 0.55),
        irregularity=rng.uniform(0.05, 0.35),
        elongation=rng.uniform(0, 3.0 if rng.random() < 0.3 else 1.5),  # spindles in stroma
        clustered=rng.random() < 0.5,
        touching=rng.uniform(0.2, 1),
    )
    n = labels.max()
    inside = labels > 0
    interior = _interior(labels)
    dose = np.exp(rng.normal(0, 0.35, n + 1))
    vesicular = rng.random(n + 1) < rng.uniform(0, 0.4)
    dose[0] = 0
    chromatin = np.clip(1 + rng.uniform(0.05, 0.35) * _smooth_noise(rng, shape, rng.uniform(0.7, 2.5)), 0.2, None)
    rim = (1 - interior) ** 1.5
    profile = np.where(vesicular[labels], 0.35 + 0.65 * rim, 0.75 + 0.25 * interior)
    h_conc = rng.uniform(0.6, 2.2) * dose[labels] * chromatin * profile * inside
    if n and vesicular.any():  # nucleoli: one dark dot in the middle of vesicular nuclei
        dots = np.zeros(shape)
        for i, (cy, cx, r) in enumerate(cells, start=1):
            y, x = int(cy + rng.normal(0, r / 5)), int(cx + rng.normal(0, r / 5))
            if vesicular[i] and 0 <= y < shape[0] and 0 <= x < shape[1] and labels[y, x] == i:
                dots[y, x] = 1
        dots = ndi.gaussian_filter(dots, max(0.8, d / 16))
        h_conc = h_conc + 1.2 * dots / max(dots.max(), 1e-9)
    # cytoplasm around the nuclei, with vacuoles
    dist = ndi.distance_transform_edt(~inside)
    reach = rng.uniform(0.15, 0.9) * d * np.clip(1 + 0.3 * _smooth_noise(rng, shape, d / 2), 0.3, None)
    cyto = (dist < reach) & ~inside
    vacuoles = _specks(rng, shape, int(rng.uniform(0, 3) * n), (0.08 * d, 0.3 * d)) * cyto
    # stroma: fibres with white gaps (lumens, fat, tears)
    fibres = _streaks(rng, shape, rng.uniform(3, 12))
    gaps = _smooth_noise(rng, shape, rng.uniform(4, 3 * d)) > rng.uniform(0.4, 2.0)
    stroma = ~cyto & ~inside
    e_conc = np.where(cyto, rng.uniform(0.2, 0.8) * (1 - 0.9 * vacuoles), 0.0)
    e_conc = e_conc + stroma * ~gaps * rng.uniform(0.2, 0.9) * (0.3 + fibres)
    e_conc = e_conc + inside * rng.uniform(0.05, 0.3)
    h_conc = h_conc + cyto * rng.uniform(0, 0.2) * (1 - vacuoles) + rng.uniform(0, 0.08)
    # stroma and cytoplasm often take up some hematoxylin too (purple-pink tissue)
    h_conc = h_conc + ~inside * rng.uniform(0, 0.35) * (0.5 + fibres) * ~gaps
    # red blood cells (eosin-dense discs) and dark debris, not labelled
    free = ~inside
    if rng.random() < 0.4:
        rbc = _specks(rng, shape, int(rng.integers(3, 40)), (0.12 * d, 0.22 * d)) * free
        e_conc = e_conc + rng.uniform(0.8, 2.0) * rbc
    if rng.random() < 0.5:
        dark = _specks(rng, shape, int(rng.integers(1, 4 + n // 3)), (0.04 * d, 0.12 * d)) * free
        h_conc = h_conc + rng.uniform(0.8, 2.0) * dark
    e_conc = e_conc * rng.uniform(0.3, 0.9)
    od = h_conc[..., None] * _stain(rng, _HEMATOXYLIN) + e_conc[..., None] * _stain(rng, _EOSIN)
    od = ndi.gaussian_filter(od * rng.uniform(0.6, 1.4), (rng.uniform(0.4, 1.2),) * 2 + (0,))
    img = np.exp(-od)
    return _acquire(rng, img, photons=np.exp(rng.uniform(np.log(100), np.log(5000))),
                    read=rng.uniform(0, 0.015), gain_gradient=rng.uniform(0, 0.3)), labels


_MAKERS = {
    "fluo_nuclei": _fluo_nuclei,
    "fluo_cells": _fluo_cells,
    "brightfield": _brightfield,
    "phase": _phase,
    "he": _he,
}


def scene(
    kind: str | None = None,
    shape: tuple[int, int] = (256, 256),
    diameter: float = 30.0,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """One synthetic microscopy image with its instance labels.

    Parameters
    ----------
    kind : one of :data:`KINDS`, or None to draw one (with the weights in KINDS)
    shape : (Y, X)
    diameter : median cell diameter in pixels
    seed : int or Generator

    Returns
    -------
    image : (Y, X) for fluorescence and phase, (Y, X, 3) for brightfield and H&E; uint8,
        uint16 or float32
    labels : (Y, X) int32, one id per cell
    kind : the look that was drawn
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if kind is None:
        names = list(KINDS)
        p = np.array([KINDS[k] for k in names])
        kind = str(rng.choice(names, p=p / p.sum()))
    if kind not in _MAKERS:
        raise ValueError(f"unknown scene kind {kind!r}: use one of {', '.join(_MAKERS)}.")
    img, labels = _MAKERS[kind](rng, tuple(shape), float(diameter))
    if kind in ("brightfield", "he") and rng.random() < (0.5 if kind == "brightfield" else 0.15):
        img = img.mean(axis=-1)  # the same sample, photographed on a grey camera
    return _quantise(rng, img), labels, kind
