"""The generalist starting model shipped with cellfit, and the cell size it works at.

The starting model (``cellfit/data/starting_model.cellfit``, made by
``scripts/pretrain_starting_model.py``) was pretrained on synthetic microscopy and
openly licensed nuclei so that a handful of painted cells is enough to fine-tune it.
It works on cells about :attr:`ModelInfo.cell_diameter` (30) pixels across: images are
resized so that their cells are that big. When fine-tuning, the size comes from the
painted cells; when segmenting with the starting model itself it is given (the cell
diameter setting) or estimated from the image (:func:`estimate_diameter`).

What a training run starts from is its :class:`TrainPlan`, chosen by
:func:`choose_start` from the ``init`` setting and the model in memory, if any.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from cellfit.data import sample_path
from cellfit.errors import CellfitError
from cellfit.model import ModelInfo, read_model_info
from cellfit.normalize import match_channels, normalize, resize_plane, scaled_shape
from cellfit.postprocess import instances_from_probs
from cellfit.predict import predict_plane

__all__ = [
    "STARTING",
    "SizeTry",
    "StartChoice",
    "TrainPlan",
    "apply_diameter",
    "choose_start",
    "decide_diameter",
    "estimate_diameter",
    "is_scratch",
    "is_starting",
    "median_diameter",
    "needs_diameter",
    "plan_for_model",
    "scale_for",
    "size_tries",
    "starting_model_path",
    "starting_model_problem",
]

#: the name that stands for the shipped starting model (``init="starting"``)
STARTING = "starting"
#: semantic training from the starting model starts a new network from its learnt
#: features (all layers but the classes): see :class:`StartChoice`
SEMANTIC_FEATURES = True
#: names that mean "random weights" (``init="scratch"``)
SCRATCH = ("scratch", "none", "")
#: smallest object kept, as a share of a typical cell's area
MIN_SIZE_FRACTION = 0.25


class TrainPlan(StrEnum):
    """What a training run starts from.

    The values are the words used in settings and messages; a member equals its value
    (``TrainPlan.STARTING == "starting"``), so ``TrainConfig(init=TrainPlan.STARTING)``
    and ``init="starting"`` are the same setting and a model file stores plain words.
    """

    #: go on training a model (in memory or a file) made for the cells it was trained
    #: on; a smaller learning rate keeps what it learnt
    FINE_TUNE = "fine-tune"
    #: first training of a model (in memory or a file) that works on cells of any size
    #: (the starting model as loaded): images are resized to its cell size
    ADAPT = "adapt"
    #: a new model from the shipped starting model
    STARTING = "starting"
    #: a new model from random weights
    SCRATCH = "scratch"


@dataclass(frozen=True)
class StartChoice:
    """What a training run starts from, as :func:`choose_start` decided.

    Attributes
    ----------
    plan : TrainPlan
    init : str, path or None
        The model file to load (the starting model's path for ``STARTING``), or, when
        a model in memory is trained, the ``init`` setting as given; None for
        ``SCRATCH``.
    notice : str or None
        Why the run does not start where it was asked to (one sentence for the user),
        e.g. the starting model cannot take these images: training from scratch instead.
    features : path or None
        ``SCRATCH`` in semantic mode from the starting model: a new network whose
        layers, all but the last (the classes), start as the starting model's, which
        has learnt what cells, edges and textures look like (:data:`SEMANTIC_FEATURES`).
    """

    plan: TrainPlan
    init: str | os.PathLike | None = None
    notice: str | None = None
    features: Path | None = None


def plan_for_model(info: ModelInfo) -> TrainPlan:
    """``ADAPT`` for a model that works on cells of any size and has not been told how
    big the cells are (:func:`needs_diameter`), else ``FINE_TUNE``."""
    return TrainPlan.ADAPT if needs_diameter(info) else TrainPlan.FINE_TUNE


def choose_start(
    init: str | os.PathLike | None,
    mode: str,
    n_channels: int,
    model_info: ModelInfo | None = None,
) -> StartChoice:
    """Choose what a training run starts from.

    Parameters
    ----------
    init : str, path or None
        The ``init`` setting: a model file, a name of the starting model
        (:func:`is_starting`), or None / a name meaning random weights (:func:`is_scratch`).
    mode : {"instances", "semantic"}
        The training's mode.
    n_channels : int
        Channels of the training images.
    model_info : ModelInfo, optional
        The info of a model in memory to train (it is then trained, whatever ``init``).

    Returns
    -------
    StartChoice
        A model in memory: ``FINE_TUNE`` or ``ADAPT`` (:func:`plan_for_model`). The
        starting model: ``STARTING`` with its path, or, where it cannot take these
        images (:func:`starting_model_problem`), ``SCRATCH`` with a notice saying why.
        A model file: ``FINE_TUNE`` or ``ADAPT`` by its header. Else ``SCRATCH``.
    """
    init = None if is_scratch(init) else init
    if model_info is not None:
        return StartChoice(plan_for_model(model_info), init)
    if init is None:
        return StartChoice(TrainPlan.SCRATCH)
    if is_starting(init):
        path = starting_model_path()
        start_info = read_model_info(path)
        problem = starting_model_problem(start_info, mode, n_channels)
        if (problem and SEMANTIC_FEATURES and mode == "semantic"
                and not starting_model_problem(start_info, start_info.mode, n_channels)):
            return StartChoice(TrainPlan.SCRATCH, features=path)
        if problem:
            return StartChoice(TrainPlan.SCRATCH, None, f"{problem}: training from scratch instead")
        return StartChoice(TrainPlan.STARTING, path)
    return StartChoice(plan_for_model(read_model_info(init)), init)


def starting_model_path() -> Path:
    """Where the shipped starting model is."""
    path = sample_path("starting_model.cellfit")
    if not path.is_file():
        raise CellfitError(
            "the starting model is missing from this cellfit installation: reinstall "
            "napari-cellfit, or train from scratch (set {setting} to scratch).",
            setting="init",
        )
    return path


def is_starting(init: object) -> bool:
    """True for the names that stand for the shipped starting model."""
    return isinstance(init, str) and init.strip().lower() in (STARTING, "default", "generalist")


def is_scratch(init: object) -> bool:
    """True for None and the names that mean "start from random weights"."""
    return init is None or (isinstance(init, str) and init.strip().lower() in SCRATCH)


def starting_model_problem(info: ModelInfo, mode: str, n_channels: int) -> str | None:
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


def needs_diameter(info: ModelInfo) -> bool:
    """True for a model that works on cells of any size and has not been told how big
    the cells of the images are (the starting model before fine-tuning)."""
    return bool(info.cell_diameter) and not info.diameter


def apply_diameter(info: ModelInfo, diameter: float) -> ModelInfo:
    """A copy of ``info`` set up for images whose cells are ``diameter`` pixels across."""
    if not info.cell_diameter:
        raise CellfitError(
            "this model was trained at a fixed cell size and takes no cell diameter: "
            "leave {setting} out.",
            setting="diameter_option",
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
    model: nn.Module,
    info: ModelInfo,
    plane: np.ndarray,
    device: str | torch.device | None = None,
    candidates: tuple[float, ...] | None = None,
    max_side: int = 384,
) -> float:
    """Estimate the cell diameter (pixels) of a raw plane ``(C, Y, X)``.

    The network is run at several sizes; at the right one, the cells it finds are about
    ``info.cell_diameter`` model pixels across (at a wrong size it misses cells, breaks
    them up or merges them). Each try looks at a central crop of at most ``max_side``
    model pixels, so this costs a few small predictions.

    Parameters
    ----------
    model : nn.Module
        A model that works on cells of any size (``info.cell_diameter`` set); it is
        left in eval mode.
    info : ModelInfo
    plane : ndarray, shape (C, Y, X)
        Raw pixels, any channel count (matched to the model's).
    device : str or torch.device, optional
        Where to run; None: the device the model is on.
    candidates : tuple of float, optional
        The diameters (pixels) to try; by default ``cell_diameter`` times 2^(k/2) for
        k = -2 .. 8 (15 to 480 pixels for a 30-pixel model).
    max_side : int

    Returns
    -------
    float
        The diameter in image pixels, rounded to 0.1.

    Raises
    ------
    CellfitError
        When no cell is found at any size, or two sizes far apart fit about equally well
        (:func:`decide_diameter`); the message lists the sizes tried and asks for the cell
        diameter (``setting="diameter"``).
    """
    target = float(info.cell_diameter or 30.0)
    if candidates is None:
        candidates = tuple(target * 2 ** (k / 2) for k in range(-2, 9))  # 15 .. 480 px
    if device is None:
        device = next(model.parameters()).device
    try:
        tries = size_tries(model, info, plane, device, candidates, max_side)
    finally:
        model.eval()
    return decide_diameter(tries, candidates)


@dataclass(frozen=True)
class SizeTry:
    """What the network found when an image was resized for one candidate diameter.

    Attributes
    ----------
    diameter : float
        The candidate (image pixels).
    cells : int
        Objects found.
    found : float or None
        The diameter (image pixels) those objects imply; None if they were unusable
        (under two objects, or nearly the whole crop).
    weight : float
        How much this try is believed (0-1): the share of its objects that are as big as
        the cells the network was trained on, times their mean cell probability, times how
        close their median is to that size.
    """

    diameter: float
    cells: int
    found: float | None
    weight: float


#: implied diameters closer than this factor are the same answer
AGREE = 1.3
#: a second answer this far from the best (factor) and at least RIVAL times as well
#: supported makes the estimate undecided
APART, RIVAL = 1.6, 0.8
#: the least support an answer needs (one clear try has about 0.5)
MIN_SUPPORT = 0.1
#: a try votes only if it found at least this many cells (an image shrunk until a whole
#: colony is one cell-sized blob finds only a few: phase contrast, brightfield). Chosen on
#: synthetic scenes against 2 and 8 (``benchmarks/diameter.py``)
MIN_CELLS = 4


def size_tries(
    model: nn.Module,
    info: ModelInfo,
    plane: np.ndarray,
    device: str | torch.device,
    candidates: tuple[float, ...],
    max_side: int = 384,
) -> list[SizeTry]:
    """Run the network on a central crop at each candidate diameter (see
    :func:`estimate_diameter`)."""
    target = float(info.cell_diameter or 30.0)
    plane = match_channels(np.asarray(plane)[None], info.in_channels)[0]
    normed = normalize(plane[None], info.normalization)[0]
    probe = copy.deepcopy(info)
    probe.normalization = {"method": "none"}
    probe.scale = 1.0
    tries = []
    for d in candidates:
        s = target / d
        side = int(max_side / s)
        y, x = normed.shape[-2:]
        y0, x0 = max(0, (y - side) // 2), max(0, (x - side) // 2)
        crop = normed[:, y0 : y0 + side, x0 : x0 + side]
        shape = scaled_shape(crop.shape[-2:], s)
        if min(shape) < 48:
            continue
        resized = resize_plane(crop, shape) if abs(s - 1) > 1e-6 else crop
        probs = predict_plane(model, probe, resized, device=device)
        labels = instances_from_probs(probs, min_size=max(4, int(0.02 * target**2)))
        tries.append(_size_try(d, s, target, labels, probs))
    return tries


def _size_try(d: float, s: float, target: float, labels: np.ndarray, probs: np.ndarray) -> SizeTry:
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes > 0]
    n = len(sizes)
    if n < 2 or (labels > 0).mean() > 0.85:  # nothing, or everything is "cell"
        return SizeTry(round(d, 1), n, None, 0.0)
    diam = 2 * np.sqrt(sizes / np.pi)
    found = float(np.median(diam))
    miss = abs(math.log(found / target))
    if miss > math.log(1.6):  # far from the trained size: this size is wrong
        return SizeTry(round(d, 1), n, round(found / s, 1), 0.0)
    fitting = float(np.mean(np.abs(np.log(diam / target)) <= math.log(1.6)))
    cell_prob = probs[1] if probs.shape[0] > 1 else probs[0]
    confidence = float(ndi.mean(cell_prob, labels, index=np.arange(1, labels.max() + 1)).mean())
    weight = fitting * confidence * math.exp(-0.5 * (miss / 0.25) ** 2)
    return SizeTry(round(d, 1), n, round(found / s, 1), round(weight, 4))


def decide_diameter(
    tries: list[SizeTry], candidates: tuple[float, ...] | None = None, min_cells: int = MIN_CELLS
) -> float:
    """The diameter the tries agree on, rounded to 0.1 pixel.

    Every usable try votes for the diameter it implies, with its weight; the answer is
    the weighted (geometric) mean of the votes within a factor :data:`AGREE` of the
    best-supported one. Tries that found cells of the trained size only rarely or with
    little confidence (support under :data:`MIN_SUPPORT` in all) count as no cells, and
    tries that found fewer than ``min_cells`` objects do not vote.

    Raises
    ------
    CellfitError
        When no try found cells of a usable size, or when two diameters more than a factor
        :data:`APART` apart are about equally supported; the message gives the sizes
        considered and asks for the cell diameter (``setting="diameter"``).
    """
    tried = ", ".join(f"{d:.0f}" for d in (candidates or [t.diameter for t in tries]))
    votes = [
        (math.log(t.found), t.weight)
        for t in tries
        if t.found and t.weight > 0 and t.cells >= min_cells
    ]
    if not votes or sum(w for _, w in votes) < MIN_SUPPORT:
        raise CellfitError(
            f"no cells were found at any size (tried diameters of {tried} pixels) to "
            "estimate their diameter: set {setting}, or fine-tune on a few painted cells.",
            setting="diameter",
        )
    logs = np.array([v for v, _ in votes])
    weights = np.array([w for _, w in votes])
    near = np.abs(logs[:, None] - logs[None, :]) <= math.log(AGREE)
    support = near.astype(float) @ weights
    best = int(np.argmax(support))
    rivals = [
        i for i in range(len(votes))
        if abs(logs[i] - logs[best]) > math.log(APART) and support[i] >= RIVAL * support[best]
    ]
    if rivals:
        a, b = sorted((math.exp(logs[best]), math.exp(logs[rivals[0]])))
        raise CellfitError(
            f"the cell size is unclear: cells about {a:.0f} and about {b:.0f} pixels across "
            f"fit this image about equally well (tried diameters of {tried} pixels): set "
            "{setting} to the size you see, or fine-tune on a few painted cells.",
            setting="diameter",
        )
    mine = near[best]
    return round(float(math.exp(np.average(logs[mine], weights=weights[mine]))), 1)
