"""Training: a generator of progress events that can be stopped between steps.

>>> trainer = Trainer(images, annotations, TrainConfig(steps=200))   # doctest: +SKIP
>>> for event in trainer.run():                                       # doctest: +SKIP
...     print(event.step, event.loss, event.validation)
>>> trainer.save("cells.cellfit")                                     # doctest: +SKIP

The same generator is drained by the CLI (with a tqdm bar) and by the napari plugin
(inside a ``thread_worker``), and by the tests, synchronously.

The trainer is built in named stages (the shape of nnU-Net's trainer), which
:meth:`Trainer.initialize` calls in this order:

1. :meth:`~Trainer._check_config`: the settings and the number of images;
2. :meth:`~Trainer._prepare_inputs`: images as planes, annotations checked against them;
3. :meth:`~Trainer._build_network`: the model to train, from
   :func:`cellfit.starting.choose_start` (a model in memory or a file, the starting
   model, or random weights), on the device;
4. :meth:`~Trainer._learn_postprocess`: post-processing settings from the painted cells
   (:func:`cellfit.postprocess.settings_from_cells`);
5. :meth:`~Trainer.get_dataloaders`: normalised planes, targets, the validation split,
   the patch sampler and its prefetcher;
6. :meth:`~Trainer._compute_class_weights`, :meth:`~Trainer._build_loss`,
   :meth:`~Trainer.configure_optimizers` (AdamW, AMP on CUDA).

:meth:`Trainer.run` then repeats :meth:`Trainer.train_step` (with the learning-rate
schedule), :meth:`Trainer.validate` every ``val_every`` steps, and yields a
:class:`TrainEvent` per step. Before the last event :meth:`~Trainer._settle` chooses the
weights to keep (the best validated ones; the guard puts back the starting ones when
fine-tuning made the model worse on the held-back cells) and, when asked, calibrates
the post-processing thresholds on those cells; the record of the run is built by
:func:`cellfit.model.training_record`.

Interrupted work: with ``TrainConfig.checkpoint`` set, :meth:`Trainer.run` keeps a
resume checkpoint (:mod:`cellfit.checkpoint`) every ``checkpoint_every`` seconds and
when it is stopped between steps (:meth:`Trainer.stop`, or its consumer letting go),
and removes it when the run reaches its end. It holds the weights, the optimizer and
gradient-scaler state, the step, the loss list and training time, the validation
history and best weights, the weights the run started from, the model's description,
the random states (the patch sampler's generator, torch's) and a fingerprint of the
settings and data. The batch the prefetcher drew ahead is given back before each write
(the sampler's generator is put back to before it), so the run resumed from it
(``TrainConfig.resume``) draws the same patches at the same learning rates as the run
left alone, and ends with the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from cellfit.checkpoint import read_checkpoint, remove_checkpoint, write_checkpoint
from cellfit.devices import is_out_of_memory, resolve_device
from cellfit.errors import CellfitError
from cellfit.events import Progress
from cellfit.io import ImageStack, to_planes
from cellfit.losses import DEFAULT_LOSS, balanced_class_weights, build_loss, grouped_class_weights
from cellfit.measure import image_range, intensity_record
from cellfit.metrics import aggregate_instance_metrics, pixel_metrics
from cellfit.model import (
    DEFAULT_DECODER_CHANNELS,
    DEFAULT_ENCODER,
    ModelInfo,
    build_model,
    default_class_colors,
    is_color,
    load_model,
    save_model,
    training_record,
)
from cellfit.normalize import (
    DEFAULT_NORMALIZATION,
    match_channels,
    normalize,
    resize_plane,
    scaled_shape,
)
from cellfit.objectclass import (
    MIN_WHOLE_SHARE,
    best_threshold,
    examples_from_found,
    fit_classifier,
    fit_pixel_vote,
    foreground,
    painted_whole,
    with_ring,
)
from cellfit.postprocess import (
    annotated_instance_metrics,
    calibrate,
    postprocess_settings,
    settings_from_cells,
    solidity,
)
from cellfit.predict import predict_plane
from cellfit.sampling import (
    DEFAULT_FG_FRACTION,
    BatchPrefetcher,
    PatchSampler,
    split_annotations,
)
from cellfit.starting import MIN_SIZE_FRACTION, TrainPlan, choose_start, is_starting, scale_for
from cellfit.targets import IGNORE, INSTANCE_CLASSES, class_counts, make_targets, n_classes_for

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "TrainPlan",
    "Trainer",
    "annotation_summary",
    "class_iou_text",
    "class_ious",
    "class_settings",
    "config_dict",
    "data_digest",
    "objects_text",
    "scores_text",
    "train",
    "validation_text",
]

#: margin (pixels) around each annotated region cropped for validation
VAL_MARGIN = 32
#: a model fitted to cells of one size keeps it while the painted cells' median diameter
#: stays within this factor of it (cells of one kind seldom differ twofold in diameter)
SIZE_TOLERANCE = 1.5


#: semantic mode: cell-centred patches draw a painted class first (see PatchSampler)
SEMANTIC_CLASS_SAMPLING = False
#: semantic mode: "balanced" class weights from the pixels the sampler shows the loss
SEMANTIC_SAMPLED_WEIGHTS = False


@dataclass
class TrainConfig:
    """Settings of one training run (all have working defaults).

    Attributes
    ----------
    mode : {"instances", "semantic"}
    steps : int or None
        Stop after this many steps (None: no step limit).
    time_limit : float or None
        Stop after this many seconds (None: no time limit). Training stops at whichever
        of ``steps`` and ``time_limit`` comes first; at least one must be set (else
        :class:`Trainer` raises a :class:`CellfitError`). The default is 300 s and no
        step limit; to train for a number of steps alone give ``steps=N,
        time_limit=None``.
    init : str, path or TrainPlan, optional
        Where training starts (:func:`cellfit.starting.choose_start`): a model file to
        fine-tune, "starting" (:attr:`TrainPlan.STARTING`) for the shipped starting
        model, or None / "scratch" for random weights.
    encoder_weights : {"imagenet"} or path, optional
        Pretrained encoder weights for a fresh model.
    class_weights : "balanced", "none" or a list of floats
    fg_fraction : float
        Share of patches centred on a cell pixel.
    val_fraction : float
        Share of annotated cells held back for validation (none if fewer than 5 cells).
    val_every : int
        Validate every this many steps (and at the end).
    min_val_cells_for_best : int
        The best validated weights are kept only when at least this many cells were
        held back; with fewer, validation is too noisy to pick a checkpoint and the
        final weights are kept. The same number decides whether ``guard`` and
        ``calibrate`` act: on fewer than 10 cells one cell found or missed moves AP@0.5
        by 0.1 or more, so a difference between two models (or two thresholds) is as
        likely luck as a real change.
    class_names, class_colors : list of str, optional
        Semantic mode: the name and colour ("#rrggbb") of each class, background
        first (painted value k + 1 is class k), one per class of the model (None: "class
        1", "class 2", ... and :func:`cellfit.model.default_class_colors`). Kept in the
        model; given when fine-tuning, they rename and recolour its classes.
    encoder_lr_scale : float
        Learning rate of the encoder relative to the decoder (below 1 keeps a
        pretrained encoder close to where it started).
    scale : "auto" or float
        Resize factor applied to images before the network (model pixels per image
        pixel), stored in the model and applied again at prediction. "auto" shrinks
        images whose annotated cells are larger than ``1.5 * cell_diameter`` pixels
        across (median) so they become ``cell_diameter`` across: large cells then get
        more context per patch and training and prediction run faster. Never enlarges.
    min_size_fraction : float
        Predicted objects smaller than this fraction of the median annotated cell
        area are dropped (stored in the model; at least 16 pixels; objects cut by the
        image edge are kept down to a quarter of it). A quarter of a cell: cells of one
        kind seldom differ more than twofold in diameter, and smaller specks are debris.
    split_solidity : float
        When the annotated cells are this convex (median area / convex hull area), like
        nuclei, predicted blobs that look like two touching cells are cut at their
        waist (the model stores the median cell area for it, see
        :func:`cellfit.postprocess.split_merged`). 1 or more never splits.
    lr, finetune_lr : float
        Peak learning rate of a new model, and of fine-tuning an existing one (the
        starting model or the user's own; None: ``lr``). Smaller steps keep what the
        existing model knows.
    distill : float
        When fine-tuning, weight of a term that keeps the predictions on unannotated
        pixels close to the starting model's (0: off). Costs one more forward pass
        per step.
    preview_every : float
        Shortest time (s) between two live previews of the plugin (the trainer itself
        computes none).
    guard : bool
        When training starts from existing weights (a model file, the starting model or
        a model in memory) and at least ``min_val_cells_for_best`` cells were held back,
        score the starting and the trained weights on those cells at the end, and keep
        the starting ones (with their post-processing) when training made the model
        worse; the last :class:`TrainEvent`'s ``notice`` and the training record
        (``"guard"``) then say so in one sentence.
    classify : {"auto", "objects", "pixels"}
        Semantic mode: how classes are decided. "objects": each object found takes one
        class, that of the painted object it most resembles in shape, size, brightness
        and texture (:mod:`cellfit.objectclass`; for classes that are kinds of cell);
        "pixels": each pixel its likeliest class (for regions, such as kinds of
        tissue); "auto": "objects" when at least 75 % of the painted pieces were painted
        whole (the objects the model finds on them have about their outline), else
        "pixels". Decided at the end of each run; recorded as ``"objects"``.
    calibrate : bool
        In instance mode, with at least ``min_val_cells_for_best`` cells held back,
        choose ``fg_threshold``, ``seed_threshold`` and ``min_size`` of the model's
        post-processing (after the guard) to score best on the held-back cells
        (:func:`cellfit.postprocess.calibrate`; recorded as ``"calibration"``).
    checkpoint : path, optional
        Where to keep a resume checkpoint while training (:mod:`cellfit.checkpoint`; the
        command line uses ``<model>.resume``): written every ``checkpoint_every`` seconds
        of training and when a run is stopped between steps, removed when a run reaches
        its end. None: no checkpoint.
    checkpoint_every : float or None
        Seconds of training between two checkpoints (0: after every step; None: only
        when stopped).
    resume : bool
        Go on with the run saved in ``checkpoint`` where it stopped, instead of starting
        a new one: the same remaining steps, learning rates and patches as if it had
        never stopped. The images, annotations and settings (those in
        :data:`RESUME_FREE` aside) must be those of the saved run, else :class:`Trainer`
        raises a :class:`CellfitError`; the model is rebuilt from the checkpoint, so
        ``init`` need not exist any more.

    A :class:`Trainer` never changes its config.
    """

    mode: str = "instances"
    encoder: str = DEFAULT_ENCODER
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    loss: str = DEFAULT_LOSS
    class_weights: str | list[float] = "balanced"
    patch_size: int = 256
    batch_size: int | None = None
    steps: int | None = None
    time_limit: float | None = 300.0
    lr: float = 5e-3
    finetune_lr: float | None = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0
    warmup_steps: int = 5
    val_fraction: float = 0.2
    val_every: int = 50
    min_val_cells_for_best: int = 10
    fg_fraction: float = DEFAULT_FG_FRACTION
    boundary_width: int = 2
    augment: bool = True
    intensity_augment: str = "mild"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init: str | Path | None = None
    encoder_weights: str | None = None
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    class_names: list[str] | None = None
    class_colors: list[str] | None = None
    preview_every: float = 3.0
    scale: str | float = "auto"
    cell_diameter: float = 30.0
    min_size_fraction: float = MIN_SIZE_FRACTION
    split_solidity: float = 0.93
    distill: float = 0.0
    guard: bool = True
    calibrate: bool = False
    classify: str = "auto"
    checkpoint: str | Path | None = None
    checkpoint_every: float | None = 60.0
    resume: bool = False


#: semantic mode: how classes are decided (TrainConfig.classify)
CLASSIFY = ("auto", "objects", "pixels")
#: margin (pixels) around the painted area of a plane predicted to find its objects
OBJECTS_MARGIN = 32
#: classify "auto": the share of the run after which the model's objects decide whether
#: the rest of the run learns the background ring round painted objects (one value,
#: not tuned: late enough for the model to find objects, early enough to learn the ring)
RING_DECISION = 1 / 3

#: settings that may differ between a run and its resumption (where and how, not what)
RESUME_FREE = ("device", "amp", "preview_every", "checkpoint", "checkpoint_every", "resume")


@dataclass
class TrainEvent(Progress):
    """One step of training (a :class:`~cellfit.events.Progress`).

    Attributes
    ----------
    step : int
        Steps taken so far (by this trainer, over all its runs).
    loss : float
        Loss of the step.
    lr : float
        Learning rate of the decoder at the step.
    elapsed : float
        Seconds since the run started.
    total_steps : int or None
        The step limit of the run (None: a time limit alone).
    validation : dict or None
        Set on steps where validation ran: ``{"precision", "recall", "f1", "iou",
        "ap50", "score", "on_training", "per_class"}`` (pixel figures for the cell
        classes; ``ap50`` in instance mode).
    best_score : float or None
        The best validation score so far.
    done : bool
        The last event of the run.
    stopped : bool
        A stop was asked for (:meth:`Trainer.stop`).

    ``fraction`` (share of the step or time limit reached, whichever is further),
    ``text`` (filled in as "step 3 of 50: loss 0.412" when not given) and ``notice``
    (e.g. that the batch was halved after running out of memory) come from the base.
    """

    step: int
    loss: float
    lr: float
    elapsed: float
    total_steps: int | None = None
    validation: dict | None = None
    best_score: float | None = None
    done: bool = False
    stopped: bool = False

    def __post_init__(self) -> None:
        if not self.text:
            of = f" of {self.total_steps}" if self.total_steps else ""
            self.text = f"step {self.step}{of}: loss {self.loss:.3g}"


def _as_planes(image: ImageStack | np.ndarray) -> np.ndarray:
    if isinstance(image, ImageStack):
        return image.data
    arr = np.asarray(image)
    return arr if arr.ndim == 4 else to_planes(arr)[0]


def annotation_summary(annotations: Sequence[np.ndarray], mode: str) -> dict:
    """Counts that describe a set of annotations (for messages and the model record).

    Parameters
    ----------
    annotations : list of ndarray, each (..., Y, X)
        0 not annotated, 1 background, 2, 3, ... cells (instances) or classes (semantic).
    mode : {"instances", "semantic"}
        In semantic mode a cell is a connected region of one class.

    Returns
    -------
    dict
        ``median_cell_area`` (pixels), ``median_cell_diameter`` (of a disc of that
        area), ``median_cell_solidity`` (instance mode), ``images``, ``planes`` (with
        any annotation), ``cells``, ``background_pixels``, ``annotated_pixels``.
    """
    cells = 0
    background = 0
    annotated = 0
    planes = 0
    areas: list[int] = []
    solidities: list[float] = []
    for ann in annotations:
        flat = ann.reshape(-1, *ann.shape[-2:])
        for a in flat:
            if not a.any():
                continue
            planes += 1
            background += int((a == 1).sum())
            annotated += int((a != 0).sum())
            if mode == "instances":
                ids = np.where(a >= 2, a, 0)
            else:
                ids = ndi.label(a >= 2)[0]
            sizes = np.bincount(ids.ravel())[1:]
            sizes = sizes[sizes > 0]
            cells += len(sizes)
            areas.extend(int(v) for v in sizes)
            if mode == "instances" and len(sizes):
                present = np.bincount(ids.ravel()) > 0
                solidities.extend(float(v) for v in solidity(ids)[present][1:])
    diameter = float(2 * np.sqrt(np.median(areas) / np.pi)) if areas else 0.0
    return {
        "median_cell_area": float(np.median(areas)) if areas else 0.0,
        "median_cell_diameter": round(diameter, 1),
        "median_cell_solidity": round(float(np.median(solidities)), 3) if solidities else 0.0,
        "images": len(annotations),
        "planes": planes,
        "cells": cells,
        "background_pixels": background,
        "annotated_pixels": annotated,
    }


def scale_setting(config: TrainConfig, median_diameter: float) -> float:
    """The model's resize factor (``config.scale``, checked; "auto": shrink images whose
    painted cells, ``median_diameter`` pixels across, are over 1.5 times
    ``config.cell_diameter``, never enlarge)."""
    if config.scale != "auto":
        try:
            value = float(config.scale)
        except (TypeError, ValueError):
            raise CellfitError(
                f"scale {config.scale!r} is not understood: use auto or a number such as 0.5."
            ) from None
        if not 0.05 <= value <= 4:
            raise CellfitError(f"scale {value} is out of range: use a number from 0.05 to 4.")
        return value
    if median_diameter > 1.5 * config.cell_diameter:
        return round(max(0.125, config.cell_diameter / median_diameter), 4)
    return 1.0


def new_model_info(
    config: TrainConfig, planes: Sequence[np.ndarray], anns: Sequence[np.ndarray], scale: float
) -> ModelInfo:
    """The description of a new model for images ``(P, C, Y, X)`` and their
    annotations ``(P, Y, X)``, at resize factor ``scale``."""
    n_channels = planes[0].shape[1]
    if any(p.shape[1] != n_channels for p in planes):
        raise CellfitError(
            "the training images have different numbers of channels: give images "
            "that all have the same channels."
        )
    n_classes = n_classes_for(config.mode, list(anns))
    colors = None
    if config.mode == "instances":
        names = list(INSTANCE_CLASSES)
    else:
        names = ["background"] + [f"class {i}" for i in range(1, n_classes)]
        names, colors = class_settings(config, n_classes, names)
    return ModelInfo(
        scale=scale,
        encoder=config.encoder,
        in_channels=int(n_channels),
        n_classes=int(n_classes),
        mode=config.mode,
        class_names=names,
        class_colors=colors,
        decoder_channels=list(config.decoder_channels),
        normalization=dict(config.normalization),
        boundary_width=config.boundary_width,
    )



def class_settings(
    config: TrainConfig, n_classes: int, names: list[str], colors: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """The class names and colours of a semantic model of ``n_classes`` classes:
    ``config.class_names`` and ``config.class_colors`` where given (checked), else
    ``names`` and ``colors`` (None: the default colours).

    Raises
    ------
    CellfitError
        A list of the wrong length (one sentence that counts the painted classes), a
        name empty, too long or given twice, or a colour not "#rrggbb".
    """
    painted = f"{n_classes - 1} painted class{'es' if n_classes != 2 else ''} (values 2 to {n_classes})"
    given = config.class_names
    if given is not None:
        if len(given) != n_classes:
            raise CellfitError(
                f"{len(given) - 1} class name{'s were' if len(given) != 2 else ' was'} given "
                f"for {painted}: give one name for each class, in the order of their values."
            )
        bad = [n for n in given if not isinstance(n, str) or not 0 < len(n.strip()) <= 200]
        if bad:
            raise CellfitError(
                f"the class name {bad[0]!r} cannot be used: give names of 1 to 200 characters."
            )
        twice = sorted({n for n in given if given.count(n) > 1})
        if twice:
            raise CellfitError(
                f"the class name {twice[0]!r} is given twice: give each class its own name."
            )
        names = [n.strip() for n in given]
    colors = list(colors) if colors is not None else default_class_colors(n_classes)
    if config.class_colors is not None:
        if len(config.class_colors) != n_classes:
            raise CellfitError(
                f"{len(config.class_colors) - 1} class colours were given for {painted}: "
                "give one colour for each class, in the order of their values."
            )
        wrong = [c for c in config.class_colors if not is_color(str(c).lower())]
        if wrong:
            raise CellfitError(
                f"the class colour {wrong[0]!r} is not understood: give colours such as #e6194b."
            )
        colors = [str(c).lower() for c in config.class_colors]
    return names, colors


class Trainer:
    """Train (or fine-tune) a model on sparse annotations.

    Parameters
    ----------
    images : list of ImageStack or ndarray
        Each image as an :class:`ImageStack`, a ``(P, C, Y, X)`` array, or an array
        with axes guessed (``YX``, ``YXS``, ``ZYX``...).
    annotations : list of ndarray
        One annotation per image, covering it pixel for pixel: shape ``(Y, X)`` for a
        plane, ``(P, Y, X)`` (or any shape ending in ``(Y, X)`` with ``P`` planes in
        all) for a stack; unannotated planes are skipped.
    config : TrainConfig, optional
        Never changed by the trainer.
    model, info : optional, both or neither
        An already loaded model to fine-tune (the plugin keeps its model in memory).

    The constructor runs :meth:`initialize`; :meth:`run` trains.
    """

    def __init__(
        self,
        images: Sequence[ImageStack | np.ndarray],
        annotations: Sequence[np.ndarray],
        config: TrainConfig | None = None,
        *,
        model: nn.Module | None = None,
        info: ModelInfo | None = None,
    ) -> None:
        if (model is None) != (info is None):
            raise ValueError("give both model and info, or neither")
        self.config = config or TrainConfig()
        self.step = 0
        self.history: list[dict] = []  # brief validation figures, one per validation
        self.best_score: float | None = None
        self.best_validation: dict | None = None
        self.best_state: dict | None = None
        self.best_step = 0
        self._notices: list[str] = []
        #: the weights (CPU) and post-processing a run started from, for the guard
        self._start: tuple[dict, dict] | None = None
        #: how the current run ended (:meth:`_settle`): the record's "kept", "guard"...
        self._outcome: dict | None = None
        #: the one stop flag: set by :meth:`stop` (from any thread), read between steps
        self._stop = threading.Event()
        #: the checkpoint being resumed from (``config.resume``), while initialising
        self._saved: dict | None = None
        #: the saved run's loss list, clock and random state, for the next :meth:`run`
        self._resumed: dict | None = None
        #: the steps at which this run was resumed (recorded as ``"resumed_at"``)
        self.resumed_at: list[int] = []
        #: digest of the annotated planes and their annotations (checkpoints only)
        self.data_digest: str | None = None
        self.initialize(images, annotations, model, info)

    # ------------------------------------------------------------------ stages
    def initialize(
        self,
        images: Sequence[ImageStack | np.ndarray],
        annotations: Sequence[np.ndarray],
        model: nn.Module | None = None,
        info: ModelInfo | None = None,
    ) -> None:
        """Prepare everything training needs, stage by stage (see the module docstring)."""
        self._check_config(images, annotations)
        self.device = resolve_device(self.config.device)
        planes, anns = self._prepare_inputs(images, annotations)
        if self.config.checkpoint is not None:
            self.data_digest = data_digest(planes, anns)
        self._saved = self._read_resume() if self.config.resume else None
        self._build_network(planes, anns, model, info)
        if self._saved is None:  # a resumed model has its post-processing already
            self._learn_postprocess()
        self.get_dataloaders(planes, anns)
        self.class_weights = self._compute_class_weights()
        self.loss_fn = self._build_loss()
        self.configure_optimizers()
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None

    def _check_config(self, images: Sequence, annotations: Sequence) -> None:
        """The settings that can be checked before looking at the data."""
        cfg = self.config
        if cfg.mode not in ("instances", "semantic"):
            raise CellfitError(f"unknown mode {cfg.mode!r}: use 'instances' or 'semantic'.")
        if len(images) != len(annotations) or not images:
            raise CellfitError("give one annotation per image (and at least one image).")
        if not cfg.steps and not cfg.time_limit:
            raise CellfitError(
                "the training has no end: set {setting} or a number of steps.",
                setting="time_limit",
            )
        if cfg.resume and cfg.checkpoint is None:
            raise CellfitError("resuming needs the checkpoint of the interrupted training.")
        if cfg.classify not in CLASSIFY:
            raise CellfitError(
                f"unknown way to classify {cfg.classify!r}: use {', '.join(CLASSIFY)}.",
                setting="classify",
            )
        if cfg.mode == "instances" and (cfg.class_names or cfg.class_colors):
            raise CellfitError(
                "class names and colours are for semantic mode (classes); in instance mode "
                "every painted cell is of one kind: train in semantic mode to name classes."
            )

    def _prepare_inputs(
        self, images: Sequence[ImageStack | np.ndarray], annotations: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each image as planes ``(P, C, Y, X)`` and its annotation as ``(P, Y, X)``,
        checked to match and to hold something to learn; sets :attr:`summary`."""
        cfg = self.config
        planes = [_as_planes(im) for im in images]
        anns = []
        for k, (pl, ann) in enumerate(zip(planes, annotations)):
            ann = np.asarray(ann)
            expect = pl.shape[0] * pl.shape[2] * pl.shape[3]
            if ann.size != expect or ann.shape[-2:] != pl.shape[2:]:
                raise CellfitError(
                    f"annotation {k + 1} has shape {ann.shape} but its image has "
                    f"{pl.shape[0]} plane(s) of {pl.shape[2]}x{pl.shape[3]}: the annotation "
                    "must cover the image pixel for pixel."
                )
            anns.append(ann.reshape(pl.shape[0], *pl.shape[2:]))
        self.summary = annotation_summary(anns, cfg.mode)
        #: semantic mode: the raw planes ``(C, Y, X)`` with painted classes, and their
        #: annotation, from which each run learns its object classes
        self.class_planes = [
            (pl[i], ann[i]) for pl, ann in zip(planes, anns) if cfg.mode == "semantic"
            for i in range(pl.shape[0]) if (ann[i] >= 2).any()
        ]
        # the training images' intensities: a file unlike them is flagged after prediction
        self.intensity = intensity_record([image_range(pl) for pl in planes])
        if self.summary["annotated_pixels"] == 0:
            raise CellfitError(
                "no pixel is annotated: paint some cells (2, 3, ...) and some background (1) first."
            )
        if cfg.mode == "instances" and self.summary["cells"] == 0:
            raise CellfitError(
                "no cell is annotated (only background): paint at least one cell with a label of 2 or more."
            )
        if cfg.mode == "semantic" and not any((a >= 2).any() for a in anns):
            raise CellfitError(
                "no class is annotated (only background): paint some pixels with class 2 or more."
            )
        return planes, anns

    def _build_network(
        self,
        planes: list[np.ndarray],
        anns: list[np.ndarray],
        model: nn.Module | None,
        info: ModelInfo | None,
    ) -> None:
        """The model to train, its :class:`ModelInfo`, the learning rate and, when
        distilling, the frozen teacher, all on the device.

        Sets :attr:`plan` (:class:`TrainPlan`), :attr:`init` (the model file started
        from, None for random weights or a model in memory given without one),
        :attr:`model`, :attr:`info`, :attr:`fine_tuning`, :attr:`base_lr`, :attr:`teacher`.
        A resumed run takes all of these from its checkpoint
        (:meth:`_network_from_checkpoint`), whatever ``init``, ``model`` and ``info`` say.
        """
        cfg = self.config
        if self._saved is not None:
            self._network_from_checkpoint(self._saved)
        else:
            choice = choose_start(cfg.init, cfg.mode, planes[0].shape[1], info)
            self.plan = choice.plan
            self.init = choice.init
            if choice.notice:
                self._notices.append(choice.notice)
            if model is None and self.init is not None:
                model, info = load_model(self.init)
            if model is not None and info is not None:
                self._check_compatible(info, anns)
                self.info = copy.deepcopy(info)
                if self.info.mode == "semantic":  # renamed or recoloured classes
                    self.info.class_names, self.info.class_colors = class_settings(
                        cfg, self.info.n_classes, self.info.class_names, self.info.colors()
                    )
                self.model = model
                self._fit_cell_size()
            else:
                scale = scale_setting(cfg, self.summary["median_cell_diameter"])
                self.info = new_model_info(cfg, planes, anns, scale)
                torch.manual_seed(cfg.seed)
                if choice.features is not None:
                    self.model = self._network_with_features(choice.features)
                else:
                    self.model = build_model(self.info, cfg.encoder_weights)
        self.fine_tuning = self.plan is not TrainPlan.SCRATCH
        self.base_lr = (
            cfg.finetune_lr if self.fine_tuning and cfg.finetune_lr is not None else cfg.lr
        )
        self.teacher: nn.Module | None = None
        if self.fine_tuning and cfg.distill > 0:
            self.teacher = copy.deepcopy(self.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        for net in (self.model, self.teacher):
            if net is not None:
                net.to(self.device)
                if self.device.type == "cuda":
                    net.to(memory_format=torch.channels_last)

    def _network_with_features(self, path: Path) -> nn.Module:
        """A new network for :attr:`info`'s classes whose layers but the last start as
        the model at ``path`` (its encoder, decoder, channels and normalisation are
        taken over); the last layer, one output per class, starts at random."""
        start, start_info = load_model(path)
        for key in ("encoder", "decoder_channels", "in_channels", "normalization"):
            setattr(self.info, key, copy.deepcopy(getattr(start_info, key)))
        model = build_model(self.info)
        own = model.state_dict()
        taken = {k: v for k, v in start.state_dict().items()
                 if not k.startswith("segmentation_head.") and k in own and own[k].shape == v.shape}
        model.load_state_dict(taken, strict=False)
        self.features_from = "the starting model"
        return model

    def _learn_postprocess(self) -> None:
        """In instance mode, the smallest object kept and whether merged cells are cut,
        from the painted cells (stored in the model)."""
        cfg = self.config
        if self._keeps_cell_size():
            return
        if cfg.mode == "instances" and self.summary["median_cell_area"] > 0:
            self.info.postprocess = settings_from_cells(
                self.info.postprocess,
                self.summary["median_cell_area"],
                self.summary["median_cell_solidity"],
                min_size_fraction=cfg.min_size_fraction,
                split_solidity=cfg.split_solidity,
            )

    def get_dataloaders(self, planes: list[np.ndarray], anns: list[np.ndarray]) -> None:
        """Normalise each annotated plane once (resized to the model's scale), derive
        the targets, hold back the validation cells and set up the patch sampler.

        Sets :attr:`split`, :attr:`train_targets`, :attr:`val_images`,
        :attr:`val_annotations`, :attr:`sampler`, :attr:`batches` (the sampler's
        prefetcher) and :attr:`batch_size`.
        """
        cfg = self.config
        self.rng = np.random.default_rng(cfg.seed)
        norm_planes, train_anns = [], []
        scale = float(self.info.scale)
        for pl, ann in zip(planes, anns):
            pl = match_channels(pl, self.info.in_channels)
            keep = [i for i in range(pl.shape[0]) if ann[i].any()]
            normed = normalize(pl, self.info.normalization)
            for i in keep:
                img, a = normed[i], ann[i]
                if abs(scale - 1.0) > 1e-6:
                    shape = scaled_shape(a.shape, scale)
                    img = resize_plane(img, shape)
                    a = resize_plane(a[None], shape, order=0)[0]
                norm_planes.append(np.ascontiguousarray(img))
                train_anns.append(a)
        # a piece of a painted cell smaller than the smallest cell kept is a stray, not a
        # cell to hold back and score (classes come in regions of any size)
        stray = cfg.min_size_fraction if cfg.mode == "instances" else 0.0
        self.split = split_annotations(
            train_anns, cfg.val_fraction, seed=cfg.seed, stray_fraction=stray
        )
        #: classes of whole objects: a ring of background around each painted object
        self.ring = cfg.mode == "semantic" and (
            cfg.classify == "objects"
            or (cfg.classify == "auto" and bool(self.info.postprocess.get("objects")))
        )
        train_anns = [with_ring(a) for a in self.split.train] if self.ring else self.split.train
        self.train_targets = [self._targets(a) for a in train_anns]
        #: the step from which the ring was learnt (0: from the start; None: not)
        self.ring_from_step: int | None = self.step if self.ring else None
        #: "auto" decides on the ring during the run (:meth:`_decide_ring`)
        self.ring_pending = (
            cfg.mode == "semantic" and cfg.classify == "auto" and not self.ring
            and bool(self.class_planes)
        )
        self.val_annotations = self.split.val
        self.val_images = norm_planes
        if not any((t != IGNORE).any() for t in self.train_targets):
            raise CellfitError(
                "after deriving training targets no pixel is usable (cells touching only "
                "unannotated pixels): paint some background (1) around your cells."
            )
        self.sampler = PatchSampler(
            norm_planes,
            self.train_targets,
            patch_size=cfg.patch_size,
            fg_fraction=cfg.fg_fraction,
            augment=cfg.augment,
            seed=self.rng,
            intensity=cfg.intensity_augment,
            class_balanced=cfg.mode == "semantic" and SEMANTIC_CLASS_SAMPLING,
        )
        self.batches = _RewindableBatches(self.sampler, convert=self._to_tensors)
        self.batch_size = cfg.batch_size or (8 if self.device.type == "cuda" else 4)

    def _compute_class_weights(self) -> list[float] | None:
        """The loss's class weights from the setting and the training targets' class
        pixel counts (sets :attr:`class_counts`); None: unweighted."""
        cfg = self.config
        self.class_counts = class_counts(self.train_targets, self.info.n_classes)
        if isinstance(cfg.class_weights, str):
            if cfg.class_weights == "balanced":
                if cfg.mode == "semantic" and SEMANTIC_SAMPLED_WEIGHTS:
                    # balance what the loss sees: the classes' pixels in patches drawn
                    # as training draws them (class-balanced), not the painted counts
                    seen = self.sampler.class_frequencies(self.info.n_classes)
                    return balanced_class_weights(np.where(self.class_counts > 0, seen, 0))
                if cfg.mode == "semantic":  # background against the objects, then classes
                    return grouped_class_weights(self.class_counts)
                return balanced_class_weights(self.class_counts)
            if cfg.class_weights == "none":
                return None
            raise CellfitError(
                f"unknown class weighting {cfg.class_weights!r}: use balanced, none or a list of numbers."
            )
        weights = [float(w) for w in cfg.class_weights]
        if len(weights) != self.info.n_classes:
            raise CellfitError(
                f"{len(weights)} class weights were given for {self.info.n_classes} classes: "
                "give one weight per class."
            )
        return weights

    def _build_loss(self) -> nn.Module:
        """The loss (``config.loss`` with :attr:`class_weights`) on the device."""
        return build_loss(self.config.loss, self.class_weights).to(self.device)

    def configure_optimizers(self) -> None:
        """AdamW over two groups (encoder at ``encoder_lr_scale``, the rest at 1) and,
        on CUDA, autocast (bf16 where supported, else fp16 with a gradient scaler).

        Sets :attr:`optimizer`, :attr:`use_amp`, :attr:`amp_dtype`, :attr:`scaler`.
        """
        cfg = self.config
        enc_params = list(self.model.encoder.parameters())  # type: ignore[union-attr]
        enc_ids = {id(p) for p in enc_params}
        rest = [p for p in self.model.parameters() if id(p) not in enc_ids]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": enc_params, "lr_scale": cfg.encoder_lr_scale},
                {"params": rest, "lr_scale": 1.0},
            ],
            lr=self.base_lr,
            weight_decay=cfg.weight_decay,
        )
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16
            if self.use_amp and torch.cuda.is_bf16_supported()
            else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ helpers
    def _fit_cell_size(self) -> None:
        """A model for cells of any size: resize so the painted cells are the size it
        was trained for; a model already fitted to these cells keeps its size
        (:meth:`_keeps_cell_size`)."""
        diameter = self.summary["median_cell_diameter"]
        if self._keeps_cell_size():
            return
        if self.info.cell_diameter and diameter > 0:
            self.info.diameter = diameter
            self.info.scale = (
                scale_for(self.info.cell_diameter, diameter)
                if self.config.scale == "auto"
                else scale_setting(self.config, diameter)
            )

    def _keeps_cell_size(self) -> bool:
        """True when going on training a model already fitted to cells of this size: its
        scale and its size rules (``min_size``, ``split_area``) stay as they were.

        A correction round adds the cells the model got wrong, which are seldom typical
        ones (the largest errors catch the eye first), so the median of the painted
        cells drifts from round to round; refitting the size to it would show the model
        its images at another scale than it was just trained at, and move the smallest
        object kept with it. Only a change of more than :data:`SIZE_TOLERANCE` times in
        median diameter (other images, another magnification) refits the size.
        """
        fitted = self.info.diameter  # what its scale was set for, else what it was painted
        if not fitted and self.info.training:
            fitted = (self.info.training[-1].get("annotation") or {}).get("median_cell_diameter")
        diameter = self.summary["median_cell_diameter"]
        if self.plan is not TrainPlan.FINE_TUNE or not fitted or diameter <= 0:
            return False
        if "min_size" not in (self.info.postprocess or {}):
            return False
        ratio = diameter / float(fitted)
        return 1 / SIZE_TOLERANCE <= ratio <= SIZE_TOLERANCE

    def _targets(self, ann: np.ndarray) -> np.ndarray:
        return make_targets(ann, self.info.mode, self.info.n_classes, self.info.boundary_width)

    def _check_compatible(self, info: ModelInfo, anns: list[np.ndarray]) -> None:
        cfg = self.config
        if info.mode != cfg.mode:
            raise CellfitError(
                f"the starting model was trained in {info.mode} mode but this training is in "
                f"{cfg.mode} mode: use the same mode or start fresh."
            )
        if info.mode == "semantic":
            top = max(int(a.max()) for a in anns)
            if top > info.n_classes:
                raise CellfitError(
                    f"the annotation uses class value {top} but the starting model knows "
                    f"{info.n_classes - 1} classes: start fresh to add classes."
                )

    def stop(self) -> None:
        """Ask the running generator to stop before its next step (any thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called during the current run."""
        return self._stop.is_set()

    def _lr_factor(self, fraction: float) -> float:
        warm = self.config.warmup_steps
        if self.step < warm:
            return (self.step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    def _fraction(self, elapsed: float) -> float:
        cfg = self.config
        fr = []
        if cfg.steps:
            fr.append(self.step / cfg.steps)
        if cfg.time_limit:
            fr.append(elapsed / cfg.time_limit)
        return max(fr) if fr else 0.0

    def _limit_reached(self, steps: int, elapsed: float) -> bool:
        """True once ``steps`` steps of this run or ``elapsed`` seconds reach a limit."""
        cfg = self.config
        return (cfg.steps is not None and steps >= cfg.steps) or (
            cfg.time_limit is not None and elapsed >= cfg.time_limit
        )

    # ------------------------------------------------------------------- steps
    @property
    def prefetch(self) -> bool:
        """Whether the next batch is drawn in a background thread while a step computes."""
        return self.batches.enabled

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        self.batches.enabled = bool(value)

    def _to_tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A drawn batch as CPU tensors, pinned on CUDA (runs in the prefetch thread)."""
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its loss.

        On running out of device memory, the batch is halved and the step retried on
        the first half of the same patches (a notice says so); a single patch that does
        not fit raises a :class:`CellfitError`.
        """
        xb, yb = self.batches.next(self.batch_size)
        while True:
            try:
                return self._step_on(xb[: self.batch_size], yb[: self.batch_size])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            n = self.batch_size
            kind = self.device.type.upper()
            if n <= 1:
                p = self.config.patch_size
                raise CellfitError(
                    f"the {kind} device ran out of memory training on a single patch of "
                    f"{p}x{p} pixels: make {{setting}} smaller (e.g. 128), close other "
                    "programs that use the GPU, or train on the CPU.",
                    setting="patch_size",
                )
            self.batch_size = n // 2
            self._notices.append(
                f"out of {kind} memory with batches of {n} patches: "
                f"continuing with {self.batch_size}"
            )

    def _pop_notice(self) -> str | None:
        notices, self._notices = self._notices, []
        return "; ".join(notices) if notices else None

    def _step_on(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        xt = xb.to(self.device, non_blocking=True)
        yt = yb.to(self.device, non_blocking=True).long()
        if self.device.type == "cuda":
            xt = xt.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(xt)
        loss = self.loss_fn(logits.float(), yt)
        if self.teacher is not None:
            loss = loss + self.config.distill * self._distill_loss(xt, logits, yt)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _distill_loss(self, xt: torch.Tensor, logits: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        """KL divergence from the starting model's predictions on the pixels nobody
        annotated: what the user did not paint stays as the starting model had it."""
        free = yt == IGNORE
        if not bool(free.any()):
            return logits.sum() * 0.0
        with torch.no_grad(), torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        ):
            ref = torch.softmax(self.teacher(xt).float(), dim=1)
        logp = torch.log_softmax(logits.float(), dim=1)
        kl = (ref * (torch.log(ref.clamp_min(1e-6)) - logp)).sum(dim=1)
        return kl[free].mean()

    def _scheduled_step(self, elapsed: float) -> float:
        """Set the learning rate for this point of the run, take one step, count it."""
        factor = self._lr_factor(self._fraction(elapsed))
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * g["lr_scale"] * factor
        loss = self.train_step()
        if not math.isfinite(loss):
            raise CellfitError(
                "training diverged (the loss became infinite): lower the learning "
                "rate or check the image for extreme values."
            )
        self.step += 1
        return loss

    # -------------------------------------------------------------- validation
    def validate(self) -> dict:
        """Precision / recall / F1 / IoU of the cell classes and instance AP@0.5 on the
        held-back annotation (:func:`validation_scores`); {} when nothing is held back."""
        crops = validation_crops(self.val_images, self.val_annotations)
        scores = validation_scores(self.model, self.info, crops, self.device, self.split.on_training)
        self.model.train()
        return scores

    def _validate_and_keep_best(self) -> dict:
        """Validate; remember the figures and, when they are the best so far, the weights."""
        val = self.validate()
        if val:
            self.history.append({"step": self.step, **_brief(val)})
            if self.best_score is None or val["score"] >= self.best_score:
                self.best_score = val["score"]
                self.best_validation = val
                self.best_step = self.step
                self.best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                }
        return val

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> dict:
        """What a resumed run must share with the saved one: the settings (all but
        :data:`RESUME_FREE`) and the digest of the annotated planes."""
        settings = {k: v for k, v in config_dict(self.config).items() if k not in RESUME_FREE}
        return {"settings": json.loads(json.dumps(settings, default=str)), "data": self.data_digest}

    def _read_resume(self) -> dict:
        """The checkpoint to resume (``config.checkpoint``), checked against this run's
        settings and data; a :class:`CellfitError` in one sentence when it is missing,
        damaged or from another training."""
        path = Path(self.config.checkpoint)  # type: ignore[arg-type]
        saved = read_checkpoint(path)
        mine, theirs = self._fingerprint(), saved.get("fingerprint") or {}
        now, then = mine["settings"], theirs.get("settings") or {}
        changed = [k for k in now if now[k] != then.get(k)]
        if changed:
            words = "; ".join(
                f"{k.replace('_', ' ')} was {_shown(then.get(k))}, now {_shown(now[k])}"
                for k in changed[:3]
            )
            raise CellfitError(
                f"the interrupted training in {path} had other settings ({words}): resume "
                "with the same settings, or start a new training without resuming."
            )
        if theirs.get("data") != mine["data"]:
            raise CellfitError(
                f"the interrupted training in {path} was on other images or annotations: "
                "resume with the same ones, or start a new training without resuming."
            )
        return saved

    def _network_from_checkpoint(self, saved: dict) -> None:
        """The network of a resumed run as it started (its :class:`ModelInfo`, plan and
        starting weights, for the teacher), rebuilt from the checkpoint; the trained
        weights are put in by :meth:`_restore`."""
        self.plan = TrainPlan(saved["plan"])
        self.init = saved["init"]
        self.info = ModelInfo.from_json(saved["info"])
        self.model = build_model(self.info)
        self._load_weights(self.model, saved["start"] or saved["model"])

    def _load_weights(self, model: nn.Module, state: dict) -> None:
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError):
            raise CellfitError(
                f"the weights in {self.config.checkpoint} do not fit the network it describes "
                "(damaged or from another version): start a new training without resuming."
            ) from None

    def _restore(self, saved: dict) -> None:
        """Put back the state of a saved run (after :meth:`initialize` built the rest
        as for a new run): weights, optimizer and scaler, step, batch size, validation
        history and best weights, the sampler's random state; its loss list, clock and
        torch random state wait for :meth:`run`."""
        self.info = ModelInfo.from_json(saved["info"])
        self._load_weights(self.model, saved["model"])
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            if saved["scaler"] and self.scaler.is_enabled():
                self.scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, KeyError, ValueError):
            raise CellfitError(
                f"the optimizer state in {self.config.checkpoint} does not fit the network "
                "(damaged or from another version): start a new training without resuming."
            ) from None
        self.step = int(saved["step"])
        self.batch_size = int(saved["batch_size"])
        self.best_score = saved["best_score"]
        self.best_validation = saved["best_validation"]
        self.best_step = int(saved["best_step"])
        self.best_state = saved["best"]
        self.history = list(saved["history"])
        self.sampler.rng.bit_generator.state = saved["sampler_rng"]
        self.resumed_at = [*saved["resumed_at"], self.step]
        ring, ring_from, pending = saved.get("ring", [self.ring, self.ring_from_step,
                                                     self.ring_pending])
        self.ring_pending = bool(pending)
        if ring and not self.ring:
            self._apply_ring()
        self.ring_from_step = ring_from
        start = None
        if self.config.guard and self.fine_tuning and saved["start"] is not None:
            start = (saved["start"], saved["start_postprocess"])
        self._resumed = {
            "losses": saved["losses"],
            "elapsed": float(saved["elapsed"]),
            "run_start": int(saved["run_start"]),
            "torch_rng": saved["torch_rng"],
            "cuda_rng": saved["cuda_rng"],
            "start": start,
        }

    def _restore_torch_rng(self, resumed: dict) -> None:
        torch.set_rng_state(resumed["torch_rng"])
        if resumed["cuda_rng"] and self.device.type == "cuda":
            # on another number of GPUs the random state cannot be put back as it was
            with contextlib.suppress(RuntimeError, IndexError):
                torch.cuda.set_rng_state_all(resumed["cuda_rng"])

    def _checkpoint_state(self, losses: list[float], elapsed: float, run_start: int) -> dict:
        """Everything :meth:`_restore` needs to go on from here (see
        :mod:`cellfit.checkpoint` for the file)."""
        if self._start is not None:
            start = self._start[0]
        else:  # the teacher holds the starting weights when distilling without the guard
            start = self.teacher.state_dict() if self.teacher is not None else None
        return {
            "fingerprint": self._fingerprint(),
            "plan": str(self.plan),
            "init": str(self.init) if self.init is not None else None,
            "info": self.info.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "run_start": run_start,
            "elapsed": elapsed,
            "losses": list(losses),
            "batch_size": self.batch_size,
            "best_score": self.best_score,
            "best_validation": self.best_validation,
            "best_step": self.best_step,
            "best": self.best_state,
            "history": self.history,
            "start": start,
            "start_postprocess": self._start[1] if self._start is not None else None,
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "resumed_at": self.resumed_at,
            "ring": [bool(self.ring), self.ring_from_step, bool(self.ring_pending)],
        }

    def _checkpoint_due(self, since: float) -> bool:
        """True when ``since`` seconds since the last checkpoint call for another one."""
        cfg = self.config
        return (
            cfg.checkpoint is not None
            and cfg.checkpoint_every is not None
            and since >= cfg.checkpoint_every
        )

    def _save_checkpoint(self, losses: list[float], elapsed: float, run_start: int) -> bool:
        """Write the resume checkpoint (``config.checkpoint``; none: nothing). The batch
        drawn ahead is given back first, so the run resumed from here draws it again
        (and this run too: the patches stay the same). A write that fails leaves the
        previous checkpoint and queues a notice; training goes on. True: written."""
        if self.config.checkpoint is None:
            return False
        path = Path(self.config.checkpoint)
        self.batches.rewind()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(path, self._checkpoint_state(losses, elapsed, run_start))
        except OSError as exc:
            self._notices.append(
                f"could not write the resume checkpoint {path} ({exc.strerror or exc}): "
                "training goes on, but can resume only from an earlier point if interrupted"
            )
            return False
        return True

    # --------------------------------------------------------------------- run
    def run(self) -> Iterator[TrainEvent]:
        """Train, yielding a :class:`TrainEvent` after every step.

        Stops at the step or time limit (whichever comes first), when :meth:`stop` is
        called (before the next step), or when the consumer stops iterating; the best
        validated weights are then kept (when enough cells were held back) and the run
        is added to ``info.training``. A run that reaches its last event is also
        guarded and calibrated (:meth:`_settle`): its last event's ``notice`` says when
        the starting weights were put back.

        With ``config.checkpoint``, the state after the last complete step is saved
        every ``checkpoint_every`` seconds and when the run is stopped or let go of
        between steps (before the stop's validation, so the resumed run validates as the
        run left alone); a run resumed (``config.resume``) goes on from it. A run that
        ends at its limit removes the checkpoint; a new run removes an older run's.
        """
        cfg = self.config
        resumed, self._resumed = self._resumed, None
        self._stop.clear()
        self._outcome = None
        if resumed is None:
            torch.manual_seed(cfg.seed)
            self._start = self._snapshot() if cfg.guard and self.fine_tuning else None
            losses: list[float] = []
            start_step = self.step
            before = 0.0
            remove_checkpoint(cfg.checkpoint)  # an older run's: this run replaces it
        else:  # go on where the saved run stopped: its losses, clock, random state
            self._restore_torch_rng(resumed)
            self._start = resumed["start"]
            losses = list(resumed["losses"])
            start_step = resumed["run_start"]
            before = resumed["elapsed"]
        t0 = time.perf_counter() - before
        saved_at = before
        reached_end = False
        closed = False  # the consumer stopped iterating between two steps
        try:
            while True:
                # a stop request is honoured before the next step, not after it
                stopping = self._stop.is_set() and bool(losses)
                if stopping:  # the state after the last step, to go on from there
                    self._save_checkpoint(losses, time.perf_counter() - t0, start_step)
                else:
                    losses.append(self._scheduled_step(time.perf_counter() - t0))
                    if self._ring_due(time.perf_counter() - t0):
                        self._decide_ring()
                elapsed = time.perf_counter() - t0
                done = stopping or self._limit_reached(self.step - start_step, elapsed)
                val = None
                if done or self.step % max(1, cfg.val_every) == 0:
                    val = self._validate_and_keep_best()
                if done:  # before the last event, which carries the guard's sentence
                    self._settle()
                    if not stopping:  # the run is complete: nothing to resume
                        remove_checkpoint(cfg.checkpoint)
                elif self._checkpoint_due(elapsed - saved_at):
                    saved_at = time.perf_counter() - t0
                    self._save_checkpoint(losses, saved_at, start_step)
                event = TrainEvent(
                    step=self.step,
                    loss=losses[-1],
                    lr=self.optimizer.param_groups[-1]["lr"],
                    elapsed=time.perf_counter() - t0,
                    fraction=min(1.0, self._fraction(elapsed)),
                    total_steps=cfg.steps,
                    validation=val,
                    best_score=self.best_score,
                    done=done,
                    stopped=self._stop.is_set(),
                    notice=self._pop_notice(),
                )
                try:
                    yield event
                except GeneratorExit:
                    closed = not done
                    raise
                if done:
                    reached_end = True
                    break
        finally:
            if closed:
                self._save_checkpoint(losses, time.perf_counter() - t0, start_step)
            self._finish(losses, time.perf_counter() - t0, reached_end)

    def _settle(self) -> None:
        """Choose the weights the run ends with: the best validated ones (when enough
        cells were held back to trust them), unless the guard finds them worse than
        those the run started from; then calibrate the post-processing. Sets
        :attr:`_outcome` (the record's ``kept``, ``guard``, ``guard_scores``,
        ``calibration``)."""
        kept = self._keep_best()
        crops = []
        if self._enough_held_back():
            crops = list(validation_crops(self.val_images, self.val_annotations))
        # the kept best weights were scored on these crops by the last validation
        sentence, scores = self._guard(crops, self.best_score if kept.startswith("best") else None)
        if sentence:
            kept = "starting weights (training made them worse)"
        self._outcome = {
            "kept": kept,
            "guard": sentence,
            "guard_scores": scores,
            "calibration": self._calibrate(crops),
        }
        self.model.eval()

    def _enough_held_back(self) -> bool:
        """Enough cells were held back to tell two models apart (``min_val_cells_for_best``)."""
        return not self.split.on_training and (
            self.split.n_val_cells >= self.config.min_val_cells_for_best
        )

    def _keep_best(self) -> str:
        """Load the best validated weights when enough cells were held back; says which
        weights are kept."""
        if self.best_state is not None and self._enough_held_back():
            self.model.load_state_dict(self.best_state)
            return "best validated weights"
        return "final weights"

    def _snapshot(self) -> tuple[dict, dict]:
        """The model's weights (a CPU copy) and post-processing settings now."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return state, copy.deepcopy(self.info.postprocess)

    def _score(self, crops: list) -> float:
        """The validation score (AP@0.5, F1 in semantic mode) of the model as it is."""
        return float(validation_scores(self.model, self.info, crops, self.device).get("score", 0.0))

    def _guard(self, crops: list, trained: float | None = None) -> tuple[str | None, dict | None]:
        """Compare the trained weights with those the run started from on the held-back
        crops; restore the starting ones (weights and post-processing) if they score
        higher. ``trained`` is the trained weights' score on those crops when it is
        already known (None: scored here).

        Returns
        -------
        sentence : str or None
            For the user, when the starting weights were restored (also queued as the
            last event's notice).
        scores : dict or None
            ``{"start", "trained"}``; None when the guard did not run (training from
            scratch, ``guard`` off, or too few cells held back).
        """
        if self._start is None or not crops:
            return None, None
        if trained is None:
            trained = self._score(crops)
        trained_state, trained_post = self._snapshot()
        start_state, start_post = self._start
        self.model.load_state_dict(start_state)
        self.info.postprocess = copy.deepcopy(start_post)
        start = self._score(crops)
        scores = {"start": round(start, 4), "trained": round(trained, 4)}
        if trained >= start:
            self.model.load_state_dict(trained_state)
            self.info.postprocess = trained_post
            return None, scores
        metric = "AP@0.5" if self.info.mode == "instances" else "F1"
        notice = (
            f"this round of training made the model worse on the {self.split.n_val_cells} "
            f"cells held back for checking ({metric} {trained:.2f} against {start:.2f} "
            "before), so the model it started from was kept: paint more cells or correct "
            "more errors and train again"
        )
        self._notices.append(notice)
        return notice[0].upper() + notice[1:] + ".", scores

    def _calibrate(self, crops: list) -> dict | None:
        """In instance mode with ``calibrate`` on, set the thresholds and ``min_size`` of
        ``info.postprocess`` that score best on the held-back crops
        (:func:`cellfit.postprocess.calibrate`); returns the record's ``calibration``
        (None when it did not run)."""
        if not self.config.calibrate or self.info.mode != "instances" or not crops:
            return None
        probs = [_crop_probabilities(self.model, self.info, img, self.device) for img, _ in crops]
        found = calibrate(probs, [a for _, a in crops], self.info.postprocess, scale=self.info.scale)
        self.info.postprocess = found["settings"]
        return {
            "chosen": found["chosen"],
            "score": round(found["score"], 4),
            "default_score": round(found["default_score"], 4),
        }

    def _finish(self, losses: list[float], seconds: float, reached_end: bool) -> None:
        """Put the model in eval mode and add the run's record to ``info.training``; a
        run broken off before its last event (by its consumer or an error) keeps its best
        weights (when enough cells were held back to trust them), unchecked."""
        outcome = self._outcome or {
            "kept": self._keep_best(), "guard": None, "guard_scores": None, "calibration": None,
        }
        self.model.eval()
        cfg = self.config
        objects = self._learn_object_classes() if reached_end else None
        if is_starting(cfg.init) and self.init is not None:
            init = "cellfit starting model"
        elif getattr(self, "features_from", None):
            init = "cellfit starting model's features, new classes"
        else:
            init = str(self.init) if self.init is not None else None
        record = training_record(
            losses=losses,
            seconds=seconds,
            stopped_early=not reached_end or self._stop.is_set(),
            device=str(self.device),
            batch_size=self.batch_size,
            patch_size=cfg.patch_size,
            loss=cfg.loss,
            class_weights=self.class_weights,
            class_pixels=self.class_counts,
            validation=_brief(self.best_validation, classes=True) if self.best_validation else None,
            validation_history=self.history,
            validated_on="training annotation (fewer than 5 cells)"
            if self.split.on_training
            else _cells(self.split.n_val_cells, "held-back cell"),
            best_step=self.best_step,
            kept=outcome["kept"],
            best_score=self.best_score,
            annotation=self.summary,
            scale=self.info.scale,
            init=init,
            distill=cfg.distill if self.teacher is not None else None,
            lr=self.base_lr,
            encoder_weights=cfg.encoder_weights,
            seed=cfg.seed,
        )
        record.update({k: v for k, v in outcome.items() if k != "kept"})
        if objects is not None:
            record["objects"] = objects
        if getattr(self, "intensity", None):
            record["intensity"] = self.intensity
        if self.resumed_at:
            record["resumed_at"] = list(self.resumed_at)
        self.info.training.append(record)

    def _learn_object_classes(self) -> dict | None:
        """Semantic mode: decide whether classes go by whole objects
        (``config.classify``) and, if so, keep the painted examples each object found
        is compared with in ``info.postprocess["objects"]`` (:mod:`cellfit.objectclass`).
        The model finds the objects on the painted part of each plane with classes.
        Returns the record's ``"objects"``: ``{"by", "whole", "painted", "examples",
        "background_examples", "leave_one_out"}``."""
        cfg = self.config
        if cfg.mode != "semantic":
            return None
        self.info.postprocess.pop("objects", None)
        if cfg.classify == "pixels" or not self.class_planes:
            return {"by": "pixels", "whole": None, "painted": None}
        anns, images, founds, threshold, whole, painted = self._found_objects()
        by = cfg.classify
        if by == "auto":
            by = "objects" if painted and whole >= MIN_WHOLE_SHARE * painted else "pixels"
        out = {"by": by, "whole": whole, "painted": painted}
        if by == "pixels":
            return out
        feats, classes = [], []
        for image, ann, found in zip(images, anns, founds):
            f, k = examples_from_found(image, ann, found)
            if len(k):
                feats.append(f)
                classes.append(k)
        clf = (fit_classifier(np.concatenate(feats), np.concatenate(classes), threshold)
               if feats else None)
        if clf is None:
            return {**out, "by": "pixels"}
        clf.vote = fit_pixel_vote(images, anns, seed=cfg.seed or 0)
        self.info.postprocess["objects"] = clf.to_dict()
        loo = clf.leave_one_out()
        return {**out, "vote": clf.vote is not None,
                "ring": bool(self.ring), "ring_from_step": self.ring_from_step,
                "examples": int(len(clf.classes)),
                "background_examples": int((clf.classes == 0).sum()), "threshold": threshold,
                "leave_one_out": None if loo is None else round(loo, 3)}

    def _found_objects(self) -> tuple[list, list, list, float, int, int]:
        """The model's objects on the painted part of each plane with classes: the
        annotations, the planes (the model's channels), the objects found (at the
        outline threshold that fits the painted objects best), that threshold, and how
        many painted objects were painted whole of how many it could tell
        (:func:`cellfit.objectclass.painted_whole`)."""
        was_training = self.model.training
        anns, bg_probs, images = [], [], []
        for plane, ann in self.class_planes:
            plane = match_channels(plane[None], self.info.in_channels)[0]
            ys, xs = np.nonzero(ann)
            y0, x0 = max(0, ys.min() - OBJECTS_MARGIN), max(0, xs.min() - OBJECTS_MARGIN)
            y1, x1 = ys.max() + 1 + OBJECTS_MARGIN, xs.max() + 1 + OBJECTS_MARGIN
            probs = predict_plane(self.model, self.info, plane[:, y0:y1, x0:x1],
                                  tile=512, overlap=64, device=self.device)
            background = np.ones((1, *ann.shape), np.float32)  # outside the crop: nothing
            background[0, y0:y1, x0:x1] = probs[0]
            anns.append(ann)
            bg_probs.append(background)
            images.append(plane)
        self.model.train(was_training)
        # the outline that matches the painted objects best, then: were they whole?
        threshold, _ = best_threshold(anns, bg_probs)
        founds = [foreground(p, threshold) for p in bg_probs]
        whole, painted = painted_whole(anns, founds)
        return anns, images, founds, threshold, whole, painted

    def _ring_due(self, elapsed: float) -> bool:
        return self.ring_pending and self._fraction(elapsed) >= RING_DECISION

    def _decide_ring(self) -> None:
        """Classify "auto", a third into the run: when the model's objects so far show
        that the painted objects were painted whole, train the rest of the run with the
        background ring round them (:data:`cellfit.objectclass.RING`), as for
        "objects"."""
        self.ring_pending = False
        *_, whole, painted = self._found_objects()
        if painted and whole >= MIN_WHOLE_SHARE * painted:
            self._apply_ring()

    def _apply_ring(self) -> None:
        """From the next patch on, learn the ring of background round painted objects
        (the targets are changed in place, so the sampler sees them at once)."""
        self.ring = True
        self.ring_from_step = self.step
        for target, ann in zip(self.train_targets, self.split.train):
            target[...] = self._targets(with_ring(ann))

    def save(self, path: str | Path) -> Path:
        """Write the model file (the best weights and the training record)."""
        return save_model(path, self.model, self.info)


def validation_crops(
    images: Sequence[np.ndarray], annotations: Sequence[np.ndarray], margin: int = VAL_MARGIN
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(image (C, Y, X), annotation (Y, X))`` crops around each annotated region of
    the annotations (regions closer than 8 pixels are one), with ``margin`` pixels
    around."""
    for img, ann in zip(images, annotations):
        if not ann.any():
            continue
        regions, _n = ndi.label(ndi.binary_dilation(ann != 0, iterations=8))
        for sl in ndi.find_objects(regions):
            if sl is None:
                continue
            y0, y1 = max(sl[0].start - margin, 0), min(sl[0].stop + margin, ann.shape[0])
            x0, x1 = max(sl[1].start - margin, 0), min(sl[1].stop + margin, ann.shape[1])
            yield img[:, y0:y1, x0:x1], ann[y0:y1, x0:x1]


def validation_scores(
    model: nn.Module,
    info: ModelInfo,
    crops: Iterable[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
    on_training: bool = False,
) -> dict:
    """Scores of a model on annotated crops.

    Parameters
    ----------
    model, info
        The model; ``info.scale`` and ``info.normalization`` are taken as already
        applied to the crops.
    crops : iterable of (ndarray (C, Y, X), ndarray (Y, X))
        Normalised, scaled planes and their raw annotations (0 not annotated).
    device : torch.device
    on_training : bool
        Stored as ``"on_training"`` (the crops are the training annotation).

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``iou`` (means over the cell classes present;
        in instance mode cell against background), ``per_class`` (the full table),
        ``ap50`` (instance mode: instance AP at IoU 0.5 with the model's
        post-processing), ``score`` (``ap50``, else ``f1``) and ``on_training``;
        {} without annotated crops.
    """
    instances = info.mode == "instances"
    post = postprocess_settings(info.postprocess, scale=info.scale)
    preds, targs, inst = [], [], []
    for img, a in crops:
        probs = _crop_probabilities(model, info, img, device)
        t = make_targets(a, info.mode, info.n_classes, info.boundary_width)
        pred_cls = probs.argmax(0)
        if instances:
            # cell (interior or boundary) against background
            t = np.where(t == IGNORE, IGNORE, (t > 0).astype(np.uint8))
            pred_cls = (pred_cls > 0).astype(np.uint8)
            inst.append(annotated_instance_metrics(probs, a, post))
        preds.append(pred_cls.ravel())
        targs.append(t.ravel())
    if not preds:
        return {}
    k = 2 if instances else info.n_classes
    names = ["background", "cell"] if instances else info.class_names
    pm = pixel_metrics(np.concatenate(preds), np.concatenate(targs), k, names)
    fg = [pm[n] for n in names[1:] if pm[n]["support"] > 0] or [pm[names[1]]]
    out = {key: float(np.mean([f[key] for f in fg])) for key in ("precision", "recall", "f1", "iou")}
    out["per_class"] = pm
    if inst:
        agg = aggregate_instance_metrics(inst)
        out["ap50"] = agg["ap50"]
        out["score"] = agg["ap50"]
    else:
        out["score"] = out["f1"]
    out["on_training"] = on_training
    return out


def _crop_probabilities(
    model: nn.Module, info: ModelInfo, img: np.ndarray, device: torch.device
) -> np.ndarray:
    """The model's probabilities ``(K, Y, X)`` on a validation crop, which is already
    normalised and resized to the model's scale."""
    probe = copy.copy(info)
    probe.normalization = {"method": "none"}
    probe.scale = 1.0
    return predict_plane(model, probe, img, tile=512, overlap=64, device=device)


def scores_text(validation: dict | None) -> str:
    """The validation scores in short words, for progress: "pixels right F1 0.97, cells
    matched AP50 0.80" ("" without scores). F1 scores the pixels (cell or background,
    or each class, told apart); AP50 the cells (found one for one)."""
    val = validation or {}
    parts = []
    if isinstance(val.get("f1"), (int, float)) and math.isfinite(val["f1"]):
        parts.append(f"pixels right F1 {val['f1']:.2f}")
    if isinstance(val.get("ap50"), (int, float)) and math.isfinite(val["ap50"]):
        parts.append(f"cells matched AP50 {val['ap50']:.2f}")
    return ", ".join(parts)


def validation_text(record: dict) -> str:
    """What a training run's validation found, in one clause for the user (the command
    line's last line and the dock's Train tab say the same): what it was measured on,
    the scores and what they mean. "" when the run was not validated.

    >>> validation_text({"validated_on": "6 held-back cells",
    ...                  "validation": {"f1": 0.99, "ap50": 0.25}})  # doctest: +NORMALIZE_WHITESPACE
    'Validation on 6 held-back cells: pixels right F1 0.99, cells matched AP50 0.25
    (1 is perfect; F1: cell and background pixels told apart, AP50: cells found one for
    one, at least half overlapping, missed and extra cells counting against it)'
    """
    val = record.get("validation") or {}
    scores = scores_text(val)
    if not scores:
        return ""
    on = record.get("validated_on") or "the annotation"
    if "ap50" in val:
        meaning = (
            "F1: cell and background pixels told apart, AP50: cells found one for one, "
            "at least half overlapping, missed and extra cells counting against it"
        )
    else:
        meaning = "F1: each pixel's class told right"
    text = f"Validation on {on}: {scores} (1 is perfect; {meaning})"
    by_class = class_iou_text(val)
    return f"{text}. {by_class}" if by_class else text


def objects_text(record: dict, flag: str = "give --classify objects") -> str:
    """How a semantic run decided its classes, in one sentence for the user ("" for
    instance runs): by whole objects, or pixel by pixel and why; ``flag`` names the
    setting that asks for objects.

    >>> objects_text({"objects": {"by": "objects", "whole": 9, "painted": 10,
    ...                           "examples": 12, "background_examples": 2}})
    'Classes by whole objects: each object found takes the class of the most alike of 12 painted objects (2 of them false objects painted as background)'
    >>> objects_text({"objects": {"by": "objects", "vote": True, "examples": 12,
    ...                           "background_examples": 0}})
    'Classes by whole objects: each object found takes the class most of its pixels look like, learnt from the painted pixels of 12 objects'
    >>> objects_text({"objects": {"by": "pixels", "whole": 1, "painted": 10}})
    'Classes pixel by pixel: 1 of 10 painted pieces were painted whole (give --classify objects to class whole objects anyway)'
    """
    obj = record.get("objects")
    if not obj:
        return ""
    if obj["by"] == "objects":
        n, bg = obj.get("examples", 0), obj.get("background_examples", 0)
        extra = f" ({bg} of them false objects painted as background)" if bg else ""
        if obj.get("vote"):
            return ("Classes by whole objects: each object found takes the class most of its "
                    f"pixels look like, learnt from the painted pixels of {n} objects{extra}")
        return ("Classes by whole objects: each object found takes the class of the most "
                f"alike of {n} painted objects{extra}")
    if obj.get("painted"):
        return (f"Classes pixel by pixel: {obj['whole']} of {obj['painted']} painted pieces "
                f"were painted whole ({flag} to class whole objects anyway)")
    return "Classes pixel by pixel"


def class_ious(validation: dict | None) -> dict[str, float]:
    """The IoU of each class but background measured by a validation (semantic mode),
    in class order: from its ``class_iou`` (a training record) or ``per_class`` (a
    :class:`TrainEvent`; classes with no held-back pixel left out)."""
    val = validation or {}
    if isinstance(val.get("class_iou"), dict):
        return {str(k): float(v) for k, v in val["class_iou"].items() if _is_figure(v)}
    table = val.get("per_class")
    if not isinstance(table, dict) or "ap50" in val:
        return {}
    return {
        name: float(row["iou"])
        for name, row in list(table.items())[1:]
        if row.get("support", 0) > 0 and _is_figure(row.get("iou"))
    }


def _is_figure(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def class_iou_text(validation: dict | None, most: int = 5) -> str:
    """The per-class IoU of a semantic validation in one short sentence: every class
    when there are at most ``most``, else the ``most`` worst and the mean ("" in
    instance mode or without figures).

    >>> class_iou_text({"class_iou": {"nucleus": 0.9, "mitosis": 0.25}})
    'IoU by class: nucleus 0.90, mitosis 0.25'
    >>> class_iou_text({"class_iou": {f"c{i}": i / 10 for i in range(1, 8)}}, most=2)
    'IoU by class, the 2 worst of 7: c1 0.10, c2 0.20; mean 0.40'
    """
    ious = class_ious(validation)
    if not ious:
        return ""
    if len(ious) <= most:
        return "IoU by class: " + ", ".join(f"{n} {v:.2f}" for n, v in ious.items())
    worst = sorted(ious.items(), key=lambda kv: kv[1])[:most]
    mean = sum(ious.values()) / len(ious)
    listed = ", ".join(f"{n} {v:.2f}" for n, v in worst)
    return f"IoU by class, the {most} worst of {len(ious)}: {listed}; mean {mean:.2f}"


def _cells(n: int, what: str) -> str:
    """``n`` and ``what``, plural unless one: "1 held-back cell", "6 held-back cells"."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def _brief(val: dict | None, classes: bool = False) -> dict:
    """Validation figures rounded to 4 digits, without the per-class table (with
    ``classes``, the IoU of each class measured, as ``class_iou``, in semantic mode)."""
    if not val:
        return {}
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in val.items() if k != "per_class"}
    ious = class_ious(val) if classes else {}
    if ious:
        out["class_iou"] = {n: round(v, 4) for n, v in ious.items()}
    return out


def train(
    images: Sequence[ImageStack | np.ndarray],
    annotations: Sequence[np.ndarray],
    config: TrainConfig | None = None,
) -> Iterator[TrainEvent]:
    """Shorthand: ``Trainer(images, annotations, config).run()``."""
    return Trainer(images, annotations, config).run()


def config_dict(config: TrainConfig) -> dict:
    """A JSON-friendly view of a :class:`TrainConfig`."""
    d = asdict(config)
    d["init"] = str(d["init"]) if d["init"] else None
    d["checkpoint"] = str(d["checkpoint"]) if d["checkpoint"] else None
    return d


def data_digest(planes: Sequence[np.ndarray], annotations: Sequence[np.ndarray]) -> str:
    """A digest (SHA-256, hex) of what training learns from: each annotated plane of
    images ``(P, C, Y, X)`` and its annotation ``(P, Y, X)``, with their positions,
    shapes and types. A resumed run must have the same."""
    h = hashlib.sha256()
    for k, (pl, ann) in enumerate(zip(planes, annotations)):
        for i in range(ann.shape[0]):
            if not ann[i].any():
                continue
            for a in (np.ascontiguousarray(pl[i]), np.ascontiguousarray(ann[i])):
                h.update(f"{k}:{i}:{a.dtype.str}:{a.shape};".encode())
                h.update(a.tobytes())
    return h.hexdigest()


def _shown(value) -> str:
    """A setting's value in a sentence (None as "none")."""
    return "none" if value is None else str(value)


class _RewindableBatches(BatchPrefetcher):
    """The trainer's :class:`~cellfit.sampling.BatchPrefetcher`, which remembers the
    sampler's random state before each draw, so that a batch drawn ahead can be given
    back before a checkpoint (:meth:`rewind`): the checkpoint then holds the random
    state before that batch, and the run resumed from it draws the same batch."""

    #: the sampler's ``bit_generator.state`` before the last draw
    before: dict | None = None

    def draw(self, n: int):
        self.before = self.sampler.rng.bit_generator.state
        return super().draw(n)

    def rewind(self) -> None:
        """Drop the batch drawn ahead (waiting for it) and put the sampler's random
        state back to before it: the next :meth:`next` draws the same batch again."""
        if self.pending:
            self.discard()
            if self.before is not None:
                self.sampler.rng.bit_generator.state = self.before
