"""The background jobs behind the dock: plain generators over engine calls, no Qt, no napari.

Each job wraps an engine generator (:meth:`cellfit.train.Trainer.run`,
:func:`cellfit.predict.iter_predict`, :func:`cellfit.batch.predict_files`), yields
progress the dock can show as it comes (:class:`cellfit.events.Progress`, or a
:class:`TrainUpdate` carrying the engine's :class:`~cellfit.train.TrainEvent`), and
ends by *returning* a result whose ``error`` is one sentence for the user instead of
raising. The dock runs ``job.run()`` through its job runner
(:mod:`cellfit.plugin._runner`, a napari ``thread_worker``); the tests drain the same
generators synchronously.

Engine errors name the setting they are about; the sentences here word it as the
dock's control is labelled (:data:`cellfit.plugin._tooltips.LABELS`).
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import logging
import os
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from cellfit.batch import predict_files
from cellfit.errors import CellfitError, fault, worded
from cellfit.events import Progress
from cellfit.file_prediction import FileEvent
from cellfit.io import ImageStack, check_finite, check_labels
from cellfit.measure import Measurer
from cellfit.model import ModelInfo
from cellfit.normalize import match_channels
from cellfit.plugin._tooltips import LABELS
from cellfit.postprocess import labels_from_probs, postprocess_settings
from cellfit.predict import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    iter_predict,
    predict_plane,
    prepare_planes,
)
from cellfit.starting import apply_diameter, estimate_diameter, needs_diameter
from cellfit.train import TrainConfig, Trainer, TrainEvent
from cellfit.uncertainty import DoubtfulCell, Region, iter_uncertain, rank_cells, suggest_regions

__all__ = [
    "BatchJob",
    "BatchResult",
    "DiameterJob",
    "DiameterResult",
    "MeasureJob",
    "MeasureResult",
    "PredictJob",
    "PredictResult",
    "SuggestJob",
    "SuggestResult",
    "TrainJob",
    "TrainResult",
    "TrainUpdate",
    "cell_probability",
    "fast_tile",
    "gui_friendly_threads",
    "objects_of",
    "torch_threads",
    "user_message",
]

log = logging.getLogger(__name__)

# -------------------------------------------------------------------- helpers
def cell_probability(probs: np.ndarray) -> np.ndarray:
    """What the probability layer shows: the chance that a pixel is not background,
    ``1 - p_background``, from probabilities ``(K, ..., Y, X)`` (float32, 0–1)."""
    return np.clip(1.0 - probs[0], 0.0, 1.0).astype(np.float32)


def user_message(exc: BaseException, what: str) -> str:
    """One sentence for the user about an exception raised while doing ``what``
    (an engine error names its setting as the dock labels it)."""
    if isinstance(exc, CellfitError):
        return worded(exc, LABELS)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return (
            f"{what} ran out of GPU memory: choose a smaller patch size or model size, "
            "or use the CPU."
        )
    if isinstance(exc, MemoryError):
        return (
            f"{what} ran out of memory: choose a smaller patch size, a smaller model, or "
            "segment fewer slices at once."
        )
    # a bug: one plain sentence; the exception's own text goes to the log (see _log)
    return fault(exc, what).worded(LABELS)


def fast_tile(shape: Sequence[int], scale: float = 1.0) -> int:
    """A tile side that covers a plane of ``shape`` (Y, X) in one tile up to ~960 pixels.

    The engine's default 512-pixel tiles plus its mirrored border margin run a
    512 x 512 plane as four overlapping tiles; one tile does the same work once. Larger
    planes get 1024-pixel tiles (run one at a time to bound memory).
    """
    side = max(int(s) for s in shape) * float(scale or 1.0) + 2 * DEFAULT_OVERLAP
    return int(min(1024, max(DEFAULT_TILE // 2, -(-side // 32) * 32)))


def _tile_batch(tile: int, batch_size: int) -> int:
    """Tiles run at once: one for the large tiles of :func:`fast_tile` (bounded memory)."""
    return 1 if tile > DEFAULT_TILE else batch_size


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (unchanged when None), restored afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def gui_friendly_threads(device: torch.device) -> int | None:
    """Torch threads for CPU training next to a live viewer (None: leave as is).

    One core is left to napari's event loop, so the viewer stays responsive while the
    model trains (see docs/plugin.md for the measurement behind this).
    """
    if device.type != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 2) - 1)


def _log(exc: BaseException, what: str) -> None:
    """A user error is logged in one line; anything else with its traceback."""
    if isinstance(exc, CellfitError):
        log.info("cellfit %s: %s", what, exc)
    else:
        log.exception("cellfit %s failed", what)


# ---------------------------------------------------------------------- train
@dataclass
class TrainUpdate:
    """What the dock shows after one training step.

    Attributes
    ----------
    event : TrainEvent
        The engine's event of the step (step, loss, elapsed, fraction, total steps,
        validation, best score, done / stopped, notice).
    time_limit : float or None
        The training time asked for (s), None when training for a number of steps.
    preview_plane : int or None
        The plane number of the live preview computed at this step (None: none was).
    probability, labels : ndarray, shape (Y, X), or None
        The preview: cell probability (0–1) and labels of ``preview_plane``.
    class_probability : ndarray, shape (K, Y, X), or None
        Semantic mode: the preview's probability of each class.
    """

    event: TrainEvent
    time_limit: float | None = None
    preview_plane: int | None = None
    probability: np.ndarray | None = None
    labels: np.ndarray | None = None
    class_probability: np.ndarray | None = None


@dataclass
class TrainResult:
    """The end of a training job: the trained model, or ``error`` (one sentence)."""

    model: torch.nn.Module | None = None
    info: ModelInfo | None = None
    record: dict = field(default_factory=dict)
    stopped: bool = False
    error: str | None = None
    summary: dict = field(default_factory=dict)


class TrainJob:
    """Train or fine-tune, with a live preview of one plane that can change while it runs.

    Parameters
    ----------
    images : list of ndarray, each (P, C, Y, X)
        The annotated planes of each image (already copied, so painting can go on).
    annotations : list of ndarray, each (P, Y, X)
    config : TrainConfig
        ``config.preview_every`` is the shortest time (s) between two previews.
    model, info : optional
        The current model, to fine-tune it instead of starting fresh.
    preview : (plane number, raw plane (C, Y, X)), optional
        The plane to preview; change it with :meth:`show_plane`.
    threads : int, optional
        Torch CPU threads while training (restored afterwards).
    postprocess : dict, optional
        Overrides of the model's post-processing settings for the preview labels.
    names : list of str, optional
        The image layers' names, one per image, for the sentence that says which image
        or annotation cannot be used.

    The preview is computed here between two training steps with the engine's
    :func:`~cellfit.predict.predict_plane` and the current weights, on one tile where the
    plane allows (see :func:`fast_tile`), and paced so it takes at most about a quarter
    of the time. No preview is computed for the last step: the dock then previews the
    model that training keeps (its best validated weights).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        annotations: Sequence[np.ndarray],
        config: TrainConfig,
        *,
        model: torch.nn.Module | None = None,
        info: ModelInfo | None = None,
        preview: tuple[int, np.ndarray] | None = None,
        threads: int | None = None,
        postprocess: dict | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.images = list(images)
        self.annotations = list(annotations)
        self.names = list(names) if names is not None else None
        self.config = config
        self.model = model
        self.info = info
        self.threads = threads
        self.postprocess = dict(postprocess or {})
        self.trainer: Trainer | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._preview = preview
        self.preview_every = float(config.preview_every)  # grows when previews are slow
        self.preview_seconds: list[float] = []  # time of each preview
        self.step_seconds: list[float] = []  # time of each engine step (validation included)
        self.stop_requested_at: float | None = None

    def stop(self) -> None:
        """Stop after the current step (safe to call from any thread, any time)."""
        if not self._stop.is_set():
            self.stop_requested_at = time.perf_counter()
        self._stop.set()
        if self.trainer is not None:
            self.trainer.stop()

    cancel = stop  # the runner stops any job with cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def show_plane(self, index: int, plane: np.ndarray | None) -> None:
        """Preview plane ``index`` (raw ``(C, Y, X)``) from now on; None: no preview."""
        with self._lock:
            self._preview = None if plane is None else (index, plane)

    def _compute_preview(self, trainer: Trainer) -> tuple[int, np.ndarray, np.ndarray] | None:
        """``(index, probabilities, plane)`` of the plane asked for (the plane with the
        model's channels); None: no preview asked for."""
        with self._lock:
            request = self._preview
        if request is None:
            return None
        index, raw = request
        t0 = time.perf_counter()
        plane = match_channels(raw[None], trainer.info.in_channels)[0]
        tile = fast_tile(plane.shape[-2:], trainer.info.scale)
        probs = predict_plane(
            trainer.model, trainer.info, plane, device=trainer.device, tile=tile,
            batch_size=_tile_batch(tile, 4),
        )
        trainer.model.train()
        self.preview_seconds.append(time.perf_counter() - t0)
        return index, probs, plane

    def _add_preview(self, update: TrainUpdate, trainer: Trainer) -> bool:
        """Compute the preview of the chosen plane into ``update``; False: no plane."""
        shown = self._compute_preview(trainer)
        if shown is None:
            return False
        update.preview_plane, probs, plane = shown
        update.probability = cell_probability(probs)
        post = postprocess_settings(trainer.info.postprocess, self.postprocess)
        update.labels = labels_from_probs(probs, trainer.info.mode, image=plane, **post)
        if trainer.info.mode == "semantic":
            update.class_probability = probs.astype(np.float32, copy=False)
        return True

    def run(self) -> Generator[TrainUpdate, None, TrainResult]:
        """Build the trainer and train, yielding a :class:`TrainUpdate` per step."""
        with torch_threads(self.threads):
            return (yield from self._run())

    def _run(self) -> Generator[TrainUpdate, None, TrainResult]:
        result = TrainResult()
        try:
            for k, image in enumerate(self.images):
                check_finite(image, f"the image{self._name(k, ' ')}")
            annotations = [
                check_labels(ann, f"the annotation{self._name(k, ' of ')}")
                for k, ann in enumerate(self.annotations)
            ]
            trainer = Trainer(
                self.images, annotations, self.config, model=self.model, info=self.info
            )
            self.trainer = trainer
            result.summary = dict(trainer.summary)
            n_before = len(self.info.training) if self.info is not None else 0
            yield from self._steps(trainer)
            if self._stop.is_set() and not self.step_seconds:
                # stopped before its first step: nothing was trained (and no record of
                # this run exists: the starting model's own would be read as this one's)
                result.stopped = True
                return result
            result.model = trainer.model
            result.info = trainer.info
            result.stopped = self._stop.is_set()
            if len(trainer.info.training) > n_before:
                result.record = trainer.info.training[-1]
        except Exception as exc:  # reported to the user as one sentence
            _log(exc, "training")
            result.error = user_message(exc, "training")
            if self.trainer is not None:  # keep what was learnt so far
                result.model, result.info = self.trainer.model, self.trainer.info
        return result

    def _name(self, k: int, joint: str) -> str:
        """``joint`` and image ``k``'s name in quotes ("" when names were not given)."""
        if not self.names or k >= len(self.names):
            return ""
        return f"{joint}'{self.names[k]}'"

    def _steps(self, trainer: Trainer) -> Iterator[TrainUpdate]:
        """The trainer's steps, each with a preview when one is due."""
        gen = trainer.run()
        first = True
        last_preview = -1e9
        try:
            while True:
                if self._stop.is_set():
                    if first:  # stopped before the first step: train nothing
                        break
                    trainer.stop()
                t_step = time.perf_counter()
                try:
                    event = next(gen)
                except StopIteration:
                    break
                self.step_seconds.append(time.perf_counter() - t_step)
                first = False
                update = TrainUpdate(event, time_limit=self.config.time_limit)
                now = time.perf_counter()
                due = now - last_preview >= self.preview_every
                wanted = due and not event.done and not self._stop.is_set()
                if wanted and self._add_preview(update, trainer):
                    cost = time.perf_counter() - now
                    self.preview_every = max(self.config.preview_every, 3.0 * cost)
                    last_preview = time.perf_counter()
                yield update
        finally:
            gen.close()


# ------------------------------------------------------------ diameter, predict
@dataclass
class DiameterResult:
    """The estimated cell diameter in pixels, or ``error`` (one sentence)."""

    diameter: float | None = None
    error: str | None = None
    seconds: float = 0.0


class DiameterJob:
    """Estimate the cell diameter of one raw plane ``(C, Y, X)`` with a model that works
    on cells of any size (a few small predictions at several sizes)."""

    def __init__(
        self, model: torch.nn.Module, info: ModelInfo, plane: np.ndarray, *,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.info = info
        self.plane = plane
        self.threads = threads

    def cancel(self) -> None:  # a few seconds at most: it runs to its end
        pass

    def run(self) -> Generator[Progress, None, DiameterResult]:
        with torch_threads(self.threads):
            return (yield from self._run())

    def _run(self) -> Generator[Progress, None, DiameterResult]:
        t0 = time.perf_counter()
        result = DiameterResult()
        try:
            yield Progress(text="Estimating the cell diameter…")
            check_finite(self.plane, "the image")
            result.diameter = estimate_diameter(self.model, self.info, self.plane)
        except Exception as exc:
            _log(exc, "diameter estimate")
            result.error = user_message(exc, "estimating the cell diameter")
        finally:
            result.seconds = time.perf_counter() - t0
        return result


@dataclass
class PredictResult:
    """Probabilities and labels of the predicted planes (``error``: one sentence)."""

    planes: list[int] = field(default_factory=list)
    probability: np.ndarray | None = None  # (n, Y, X) float32, cell probability
    labels: np.ndarray | None = None  # (n, Y, X) int32
    #: semantic mode, when asked for: (n, K, Y, X) float32, each class's probability
    class_probability: np.ndarray | None = None
    cancelled: bool = False
    error: str | None = None
    seconds: float = 0.0
    #: the cell diameter (pixels) estimated for a model that needs one and got none
    diameter: float | None = None


class PredictJob:
    """Segment some or all planes of one image with an in-memory model.

    Parameters
    ----------
    model, info
        The model (on its device) and its :class:`ModelInfo`.
    planes : ndarray, shape (P, C, Y, X)
        All planes of the image (normalisation statistics use the whole stack).
    which : list of int, optional
        The planes to predict (all when None).
    diameter : float, optional
        Cell diameter in pixels, for a model that works on cells of any size (the
        starting model before fine-tuning). Left out for such a model, it is estimated
        from the first plane to predict (``result.diameter``, and a progress notice).
    tta : bool
        Test-time augmentation: average over flipped and rotated copies of each tile
        (4 to 8 times slower; see :class:`cellfit.predict.TileRunner`).
    class_probability : bool
        Semantic mode: keep each class's probability (``result.class_probability``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: ModelInfo,
        planes: np.ndarray,
        which: Sequence[int] | None = None,
        *,
        postprocess: dict | None = None,
        batch_size: int = 4,
        threads: int | None = None,
        diameter: float | None = None,
        tta: bool = False,
        class_probability: bool = False,
    ) -> None:
        self.model = model
        self.info = info
        self.diameter = diameter
        self.tta = tta
        self.class_probability = class_probability and info.mode == "semantic"
        self.planes = planes
        self.which = list(range(planes.shape[0])) if which is None else [int(i) for i in which]
        self.postprocess = dict(postprocess or {})
        self.batch_size = batch_size
        self.threads = threads
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> Generator[Progress, None, PredictResult]:
        """Segment the planes, yielding progress after each batch of tiles."""
        with torch_threads(self.threads):
            return (yield from self._run())

    #: the job's name in the log, and in the words of an error ("… failed during …")
    _log_name, _doing = "prediction", "segmentation"

    def _new_result(self):
        return PredictResult(planes=list(self.which))

    def _checked_pixels(self) -> np.ndarray:
        """The pixels the job reads, checked for NaN and infinities."""
        return self.planes

    def _work(self, info: ModelInfo, result) -> Iterator[Progress]:
        return self._segment(info, result)

    def _run(self):
        t0 = time.perf_counter()
        result = self._new_result()
        try:
            check_finite(self._checked_pixels(), "the image")
            info = self.info
            if needs_diameter(info):
                info = yield from self._with_diameter(info, result)
            yield from self._work(info, result)
        except Exception as exc:
            _log(exc, self._log_name)
            result.error = user_message(exc, self._doing)
        finally:
            result.seconds = time.perf_counter() - t0
        return result

    def _with_diameter(self, info: ModelInfo, result: PredictResult) -> Iterator[Progress]:
        """``info`` set to the cell diameter given, or estimated (and said so)."""
        d = self.diameter
        if d is None:
            yield Progress(text="Estimating the cell diameter…")
            d = estimate_diameter(self.model, info, np.asarray(self.planes[self.which[0]]))
            result.diameter = d
            yield Progress(
                text=f"Cell diameter estimated at {d:g} pixels.",
                notice=f"Cell diameter estimated at {d:g} pixels; type another value "
                "under Cell diameter to change it.",
            )
        return apply_diameter(info, d)

    def _segment(self, info: ModelInfo, result: PredictResult) -> Iterator[Progress]:
        planes, stats = prepare_planes(ImageStack(self.planes), info)
        sel = planes[self.which]
        n, _, h, w = sel.shape
        prob = np.zeros((n, h, w), np.float32)
        labels = np.zeros((n, h, w), np.int32)
        classes = (
            np.zeros((n, info.n_classes, h, w), np.float32) if self.class_probability else None
        )
        yield Progress(text=f"Segmenting {_planes_text(n)}…")
        tile = fast_tile(sel.shape[-2:], info.scale)
        post = postprocess_settings(info.postprocess, self.postprocess)
        for ev in iter_predict(
            self.model, info, sel, stats, tile=tile,
            batch_size=_tile_batch(tile, self.batch_size), tta=self.tta,
        ):
            if self._cancel.is_set():
                result.cancelled = True
                return
            if ev.probabilities is not None:
                prob[ev.plane] = cell_probability(ev.probabilities)
                labels[ev.plane] = labels_from_probs(
                    ev.probabilities, info.mode, image=sel[ev.plane], **post
                )
                if classes is not None:
                    classes[ev.plane] = ev.probabilities
            text = f"Segmenting slice {ev.plane + 1} of {n}…" if n > 1 else "Segmenting…"
            yield Progress(fraction=ev.fraction, text=text)
        result.probability, result.labels = prob, labels
        result.class_probability = classes


def _planes_text(n: int) -> str:
    return "1 slice" if n == 1 else f"{n} slices"


# ------------------------------------------------------- where to paint next
@dataclass
class SuggestResult:
    """Where to paint next on one plane (``error``: one sentence).

    Attributes
    ----------
    plane : int
        The plane number the suggestions are for.
    uncertainty : ndarray, shape (Y, X), float32 in [0, 1]
        :func:`cellfit.uncertainty.uncertainty_from_probs` of the plane.
    probability, labels : ndarray, shape (Y, X), or None
        The plane's cell probability and labels, made here when no labels were given
        (the dock then shows them as its prediction); None when labels were given.
    objects : ndarray of int32, shape (Y, X)
        One id per predicted object: the instance labels, or in semantic mode the
        connected regions of each class.
    values : dict of int to int
        Semantic mode: the painted value of each object's class (class k: k + 1);
        empty in instance mode (an accepted cell gets a new id).
    regions : list of Region
        The ranked boxes to paint (:func:`cellfit.uncertainty.suggest_regions`).
    cells : list of DoubtfulCell
        The objects the model is least sure of (:func:`cellfit.uncertainty.rank_cells`);
        ``label`` is the id in ``objects``.
    diameter : float or None
        The cell diameter estimated for a model that needs one and got none.
    """

    plane: int = 0
    uncertainty: np.ndarray | None = None
    probability: np.ndarray | None = None
    labels: np.ndarray | None = None
    objects: np.ndarray | None = None
    values: dict[int, int] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    cells: list[DoubtfulCell] = field(default_factory=list)
    diameter: float | None = None
    cancelled: bool = False
    error: str | None = None
    seconds: float = 0.0


def objects_of(labels: np.ndarray, mode: str) -> tuple[np.ndarray, dict[int, int]]:
    """The objects of a predicted plane ``(Y, X)`` and the value painting each takes:
    instance labels as they are (no values: each gets a new id); a semantic class map
    (0 background, k class k) split into connected regions, each painted ``k + 1``."""
    lab = np.asarray(labels)
    if mode == "instances":
        return lab.astype(np.int32, copy=False), {}
    objects = np.zeros(lab.shape, np.int32)
    values: dict[int, int] = {}
    for k in np.unique(lab):
        if k <= 0:
            continue
        parts, n = ndi.label(lab == k)
        top = int(objects.max())
        objects[parts > 0] = parts[parts > 0] + top
        values.update({top + i: int(k) + 1 for i in range(1, n + 1)})
    return objects, values


class SuggestJob(PredictJob):
    """Where to paint next on one plane: the test-time-augmented prediction of plane
    ``plane`` (:func:`cellfit.uncertainty.iter_uncertain`), its uncertainty map, the
    ranked boxes to paint and the objects the model is least sure of.

    Parameters
    ----------
    planes : ndarray, shape (P, C, Y, X)
        All planes of the image (normalised with the whole stack's statistics).
    plane : int
        The plane to look at.
    annotation : ndarray, shape (Y, X)
        The plane's painting (0 not painted): boxes and cells mostly painted are left out.
    labels : ndarray, shape (Y, X), optional
        The plane's predicted labels (the dock's '<image> labels'); None or empty: made
        from this prediction with the model's post-processing.
    n_regions, n_cells : int
        At most this many boxes and objects.
    Other arguments as :class:`PredictJob` (``tta`` is always on).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: ModelInfo,
        planes: np.ndarray,
        plane: int,
        annotation: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        n_regions: int = 5,
        n_cells: int = 20,
        postprocess: dict | None = None,
        batch_size: int = 4,
        threads: int | None = None,
        diameter: float | None = None,
    ) -> None:
        super().__init__(model, info, planes, [plane], postprocess=postprocess,
                         batch_size=batch_size, threads=threads, diameter=diameter, tta=True)
        self.plane = int(plane)
        self.annotation = np.asarray(annotation)
        self.labels = None if labels is None or not np.any(labels) else np.asarray(labels)
        self.n_regions = n_regions
        self.n_cells = n_cells

    # run(): PredictJob's, predicting the plane and ranking where to paint
    _log_name, _doing = "suggestions", "finding where to paint"

    def _new_result(self) -> SuggestResult:
        return SuggestResult(plane=self.plane)

    def _checked_pixels(self) -> np.ndarray:
        return self.planes[self.plane]

    def _work(self, info: ModelInfo, result: SuggestResult) -> Iterator[Progress]:
        return self._suggest(info, result)

    def _suggest(self, info: ModelInfo, result: SuggestResult) -> Iterator[Progress]:
        planes, stats = prepare_planes(ImageStack(self.planes), info)
        sel = planes[self.which]
        text = "Looking where the model is unsure…"
        yield Progress(text=text)
        tile = fast_tile(sel.shape[-2:], info.scale)
        probs = None
        for ev in iter_uncertain(self.model, info, sel, stats, tile=tile,
                                 batch_size=_tile_batch(tile, self.batch_size)):
            if self._cancel.is_set():
                result.cancelled = True
                return
            if ev.probabilities is not None:
                probs, result.uncertainty = ev.probabilities, ev.uncertainty
            yield Progress(fraction=0.9 * ev.fraction, text=text)
        assert probs is not None and result.uncertainty is not None
        yield Progress(fraction=0.9, text="Choosing where to paint…")
        labels = self.labels
        if labels is None:
            post = postprocess_settings(info.postprocess, self.postprocess)
            labels = labels_from_probs(probs, info.mode, image=sel[0], **post)
            result.labels, result.probability = labels, cell_probability(probs)
        result.objects, result.values = objects_of(labels, info.mode)
        diameter = info.diameter or self.diameter
        result.regions = suggest_regions(result.uncertainty, self.annotation,
                                         np.asarray(self.planes[self.plane]),
                                         n=self.n_regions, diameter=diameter)
        result.cells = rank_cells(result.objects, result.uncertainty,
                                  annotation=self.annotation, n=self.n_cells)
        yield Progress(fraction=1.0, text="Done.")


# ---------------------------------------------------------------------- batch
@dataclass
class BatchResult:
    """Counts of a folder batch; ``failed`` holds ``(file name, reason)`` pairs."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_files: int = 0
    out_dir: str = ""
    cancelled: bool = False
    error: str | None = None
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)
    #: with ``measure``: ``<name>_cells.csv`` per file and ``summary.csv`` were written;
    #: ``flagged`` holds ``(file name, what looks wrong)``, the most suspicious first
    measured: bool = False
    flagged: list[tuple[str, str]] = field(default_factory=list)


class BatchJob:
    """Segment every TIFF of a folder into an output folder: the CLI's engine function,
    :func:`cellfit.batch.predict_files`, with progress and cancel.

    ``diameter`` (pixels) is for a model that works on cells of any size; left out for
    such a model, the engine estimates it from the first file (a progress notice says so).
    ``tta`` averages over flipped and rotated copies (4 to 8 times slower).
    ``measure`` measures every cell into ``<name>_cells.csv`` beside its labels and
    writes the run's ``summary.csv`` with what to check first (``cellfit predict
    --measure``; instance models only).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        inputs: Sequence[str | os.PathLike],
        out_dir: str | os.PathLike,
        *,
        probabilities: bool = False,
        overwrite: bool = False,
        device: str = "auto",
        threads: int | None = None,
        diameter: float | None = None,
        tta: bool = False,
        measure: bool = False,
    ) -> None:
        self.diameter = diameter
        self.tta = tta
        self.measure = measure
        self.model_path = Path(model_path)
        self.inputs = [Path(p) for p in inputs]
        self.out_dir = Path(out_dir)
        self.probabilities = probabilities
        self.overwrite = overwrite
        self.device = device
        self.threads = threads
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> Generator[Progress, None, BatchResult]:
        """Segment the files, yielding progress after each slice and file."""
        with torch_threads(self.threads):
            return (yield from self._run())

    def _run(self) -> Generator[Progress, None, BatchResult]:
        t0 = time.perf_counter()
        result = BatchResult(out_dir=str(self.out_dir))
        gen = None
        try:
            gen = predict_files(
                self.model_path,
                self.inputs,
                self.out_dir,
                probabilities=self.probabilities,
                overwrite=self.overwrite,
                device=self.device,
                diameter=self.diameter,
                tta=self.tta,
                measure=self.measure,
            )
            yield Progress(text="Loading the model…")
            summaries = []
            for ev in gen:
                if getattr(ev, "summary", None) is not None:
                    summaries.append(ev.summary)
                notice = None
                if ev.notice:
                    text = worded(ev.notice, LABELS)
                    notice = text[:1].upper() + text[1:] + "."
                    result.notices.append(notice)
                _count(result, ev)
                yield Progress(fraction=ev.fraction, text=ev.text, notice=notice)
                if self._cancel.is_set():
                    result.cancelled = True
                    break
            if self.measure and not result.cancelled:
                result.measured = True
                # the engine sets each file's flags once the last file is in
                flagged = [s for s in summaries if s.flags]
                flagged.sort(key=lambda s: -sum(f.severity for f in s.flags))
                result.flagged = [(s.file, "; ".join(f.text for f in s.flags)) for s in flagged]
        except Exception as exc:
            _log(exc, "batch")
            result.error = user_message(exc, "the folder segmentation")
        finally:
            if gen is not None:
                gen.close()  # outputs are written atomically: no half-written file stays
            result.seconds = time.perf_counter() - t0
        return result


def _count(result: BatchResult, ev: FileEvent) -> None:
    result.n_files = ev.n_files
    if ev.status == "done":
        result.done += 1
    elif ev.status == "skipped":
        result.skipped += 1
    elif ev.status == "failed":
        reason = worded(ev.error, LABELS) if ev.error is not None else "unknown error"
        # the file's name is enough in the dock's list (the folder is the one chosen)
        result.failed.append((ev.path.name, reason.replace(str(ev.path), ev.path.name)))


# -------------------------------------------------------------------- measure
@dataclass
class MeasureResult:
    """The measurements of the measured planes (``table``: column name → values, the
    columns of :func:`cellfit.measure.table_columns`), or ``error`` (one sentence)."""

    table: dict[str, np.ndarray] | None = None
    planes: list[int] = field(default_factory=list)
    cancelled: bool = False
    error: str | None = None
    seconds: float = 0.0


class MeasureJob:
    """Measure the cells of a label image, plane after plane: the engine's
    :class:`cellfit.measure.Measurer` (:func:`cellfit.measure.measure_plane` per plane),
    reading one plane of the labels and of the image at a time (a lazy stack is never
    loaded whole).

    Parameters
    ----------
    labels : array, shape stack axes + (Y, X)
        Instance labels (a Labels layer's array).
    image : array, shape stack axes + (Y, X) [+ (RGB,)], optional
        The raw intensities, of the labels' size (None: shapes only).
    rgb : bool
        ``image`` ends with a colour axis.
    which : list of int, optional
        The plane numbers to measure (row-major over the stack axes; all when None).
    pixel_size, unit
        The size of a pixel (y, x) in ``unit``, for calibrated columns (None: pixels).
    """

    def __init__(
        self,
        labels,
        image=None,
        *,
        rgb: bool = False,
        which: Sequence[int] | None = None,
        pixel_size: tuple[float, float] | None = None,
        unit: str | None = None,
    ) -> None:
        self.labels = labels
        self.image = image
        self.rgb = rgb
        self.stack = tuple(int(s) for s in labels.shape[:-2])
        n = int(np.prod(self.stack)) if self.stack else 1
        self.which = list(range(n)) if which is None else [int(i) for i in which]
        self.pixel_size = pixel_size
        self.unit = unit
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> Generator[Progress, None, MeasureResult]:
        """Measure the planes, yielding progress after each."""
        t0 = time.perf_counter()
        result = MeasureResult()
        try:
            measurer = Measurer(pixel_size=self.pixel_size, unit=self.unit)
            n = len(self.which)
            yield Progress(text=f"Measuring the cells of {_planes_text(n)}…")
            for k, plane in enumerate(self.which):
                if self._cancel.is_set():
                    result.cancelled = True
                    break
                position = tuple(np.unravel_index(plane, self.stack)) if self.stack else ()
                labels = np.asarray(self.labels[position])
                image = None
                if self.image is not None:
                    image = np.asarray(self.image[position])
                    image = np.moveaxis(image, -1, 0) if self.rgb else image
                    check_finite(image, "the image")
                measurer.add(labels, image, plane=plane)
                result.planes.append(plane)
                text = f"Measured slice {k + 1} of {n}…" if n > 1 else "Measured."
                yield Progress(fraction=(k + 1) / n, text=text)
            result.table = measurer.table()
        except Exception as exc:
            _log(exc, "measurement")
            result.error = user_message(exc, "measuring the cells")
        finally:
            result.seconds = time.perf_counter() - t0
        return result
