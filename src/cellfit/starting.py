"""The generalist starting model shipped with cellfit, and the cell size it works at.

The starting model (``cellfit/data/starting_model.cellfit``, made by
``scripts/pretrain_starting_model.py``) was pretrained on synthetic microscopy and
openly licensed nuclei so that a handful of painted cells is enough to fine-tune it.
It works on cells about :attr:`ModelInfo.cell_diameter` (30) pixels across: images are
resized so that their cells are that big. When fine-tuning, the size comes from the
painted cells; when segmenting with the starting model itself it is given
(``--diameter``) or estimated from the image (:func:`estimate_diameter`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from cellfit.errors import CellfitError

__all__ = [
    "STARTING",
    "apply_diameter",
    "estimate_diameter",
    "is_starting",
    "median_diameter",
    "needs_diameter",
    "scale_for",
    "starting_model_path",
    "starting_model_problem",
]

#: the name that stands for the shipped starting model (``--init starting``)
STARTING = "starting"
#: names that mean "random weights" (``--init scratch``)
SCRATCH = ("scratch", "none", "")
#: smallest object kept, as a share of a typical cell's area
MIN_SIZE_FRACTION = 0.25


def starting_model_path() -> Path:
    """Where the shipped starting model is."""
    from cellfit.data import sample_path

    path = sample_path("starting_model.cellfit")
    if not path.is_file():
        raise CellfitError(
            "the starting model is missing from this cellfit installation: reinstall "
            "napari-cellfit, or train from scratch (--init scratch)."
        )
    return path


def is_starting(init: object) -> bool:
    """True for the names that stand for the shipped starting model."""
    return isinstance(init, str) and init.strip().lower() in (STARTING, "default", "generalist")


def is_scratch(init: object) -> bool:
    """True for None and the names that mean "start from random weights"."""
    return init is None or (isinstance(init, str) and init.strip().lower() in SCRATCH)


def starting_model_problem(info, mode: str, n_channels: int) -> str | None:
    """Why a starting model cannot be fine-tuned on this data (None if it can)."""
    if info.mode != mode:
        return (
            f"the starting model segments cells ({info.mode}); this training is in "
            f"{mode} mode"
        )
    ok = {info.in_channels, 1} | ({3, 4} if info.in_channels in (1, 3) else set())
    if n_channels not in ok:
        return (
            f"the starting model takes grayscale or RGB images; these have {n_channels} "
            "channels"
        )
    return None


def scale_for(cell_diameter: float, diameter: float) -> float:
    """Resize factor that makes cells ``diameter`` pixels across ``cell_diameter`` wide."""
    if not diameter or diameter <= 0 or not math.isfinite(diameter):
        raise CellfitError(
            f"a cell diameter of {diameter} pixels is not usable: give a positive number."
        )
    return round(float(np.clip(cell_diameter / diameter, 0.05, 4.0)), 4)


def min_size_for(diameter: float) -> int:
    """Smallest object kept (pixels) for cells ``diameter`` pixels across."""
    return max(16, int(MIN_SIZE_FRACTION * math.pi / 4 * diameter**2))


def needs_diameter(info) -> bool:
    """True for a model that works on cells of any size and has not been told how big
    the cells of the images are (the starting model before fine-tuning)."""
    return bool(info.cell_diameter) and not info.diameter


def apply_diameter(info, diameter: float):
    """A copy of ``info`` set up for images whose cells are ``diameter`` pixels across."""
    if not info.cell_diameter:
        raise CellfitError(
            "this model was trained at a fixed cell size and takes no cell diameter: "
            "leave --diameter out."
        )
    out = copy.deepcopy(info)
    out.scale = scale_for(info.cell_diameter, diameter)
    out.diameter = round(float(diameter), 1)
    out.postprocess = {**out.postprocess, "min_size": min_size_for(diameter)}
    return out


def median_diameter(labels: np.ndarray) -> tuple[float, int]:
    """Median equivalent diameter (pixels) of the objects of a label image, and their count."""
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes > 0]
    if len(sizes) == 0:
        return 0.0, 0
    return float(2 * np.sqrt(np.median(sizes) / np.pi)), len(sizes)


def estimate_diameter(
    model,
    info,
    plane: np.ndarray,
    device=None,
    candidates: tuple[float, ...] | None = None,
    max_side: int = 384,
) -> float:
    """Estimate the cell diameter (pixels) of a raw plane ``(C, Y, X)``.

    The network is run at several sizes; at the right one, the cells it finds are about
    ``info.cell_diameter`` model pixels across (at a wrong size it misses cells, breaks
    them up or merges them). Each try looks at a central crop of at most ``max_side``
    model pixels, so this costs a few small predictions.

    Raises :class:`CellfitError` when no cell is found at any size.
    """
    from cellfit.normalize import match_channels, normalize, resize_plane, scaled_shape
    from cellfit.postprocess import instances_from_probs
    from cellfit.predict import predict_plane

    target = float(info.cell_diameter or 30.0)
    if candidates is None:
        candidates = tuple(target * 2 ** (k / 2) for k in range(-2, 9))  # 15 .. 480 px
    plane = match_channels(np.asarray(plane)[None], info.in_channels)[0]
    normed = normalize(plane[None], info.normalization)[0]
    probe = copy.deepcopy(info)
    probe.normalization = {"method": "none"}
    probe.scale = 1.0
    best: tuple[float, float] | None = None
    for d in candidates:
        s = target / d
        side = int(max_side / s)
        y, x = normed.shape[-2:]
        y0, x0 = max(0, (y - side) // 2), max(0, (x - side) // 2)
        crop = normed[:, y0 : y0 + side, x0 : x0 + side]
        shape = scaled_shape(crop.shape[-2:], s)
        if min(shape) < 48:
            continue
        small = resize_plane(crop, shape) if abs(s - 1) > 1e-6 else crop
        probs = predict_plane(model, probe, small, device=device)
        labels = instances_from_probs(probs, min_size=max(4, int(0.02 * target**2)))
        found, n = median_diameter(labels)
        if n < 2 or (labels > 0).mean() > 0.85:  # nothing, or everything is "cell"
            continue
        miss = abs(math.log(found / target))
        # at the right size the cells found are as big as the cells it was trained on
        # (20-45 px); far from it (or on an image without cells) nothing is
        if miss <= math.log(1.6) and (best is None or miss < best[0]):
            best = (miss, found / s)
    if best is None:
        raise CellfitError(
            "no cells were found at any size to estimate their diameter: give the cell "
            "diameter in pixels (--diameter), or fine-tune on a few painted cells."
        )
    return round(best[1], 1)
