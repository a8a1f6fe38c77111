"""What the tabs of the dock share: the viewer, the chosen image and annotation, the
model in memory and the segmentation settings that training's preview uses too.
No Qt here (napari's layer types only).

One :class:`CellfitState` is made by :class:`~cellfit.plugin.widgets.CellfitWidget`
and handed to every panel. Panels read it freely; they change the model only through
:meth:`CellfitState.set_model` (then tell the dock, which refreshes the other panels).
Whether a job runs is the job runner's (:mod:`cellfit.plugin._runner`).

A training run stopped before its end can go on where it stopped (the Train tab's
Continue): the state keeps it as a :class:`StoppedRun`, whose resume checkpoint lives in
a temporary folder of the state's own, until the model in memory changes otherwise.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from napari.layers import Image, Labels

from cellfit.checkpoint import remove_checkpoint
from cellfit.errors import CellfitError
from cellfit.model import ModelInfo, default_class_colors
from cellfit.plugin._layers import (
    MAX_CLASS_PROBABILITY_BYTES,
    find_layer,
    layer_data,
    plane_under_cursor,
    planes_of,
)
from cellfit.plugin.jobs import PredictJob, gui_friendly_threads
from cellfit.starting import needs_diameter, starting_model_path
from cellfit.train import TrainConfig

__all__ = ["CellfitState", "StoppedRun"]


@dataclass
class StoppedRun:
    """A training run stopped before its end, which can go on where it stopped.

    Attributes
    ----------
    images, annotations : list of ndarray
        What it trained on (copies taken when it started): ``(P, C, Y, X)`` and
        ``(P, Y, X)``; going on needs the very same.
    config : TrainConfig
        Its settings; ``config.checkpoint`` is its resume checkpoint.
    image_name : str
        The image layer it was started on (for the live preview).
    in_place : bool
        It trained the model in memory further (rather than a new model).
    step : int
        Steps taken when it stopped.
    """

    images: list[np.ndarray]
    annotations: list[np.ndarray]
    config: TrainConfig
    image_name: str
    in_place: bool
    step: int = 0

    @property
    def can_continue(self) -> bool:
        """Its checkpoint is there to go on from."""
        return self.config.checkpoint is not None and Path(self.config.checkpoint).is_file()


@dataclass
class CellfitState:
    """The dock's shared state.

    Attributes
    ----------
    viewer : napari.viewer.Viewer
    image_name, annotation_name : str
        The layers chosen at the top of the dock and in the Annotate tab ("" for none).
    model, info
        The model in memory and its record (None before the first training or load);
        Train fine-tunes it, Segment uses it.
    model_path : Path or None
        The file the model came from or was saved to.
    model_saved : bool
        False once the model in memory differs from ``model_path``.
    min_size : int
        Smallest cell (pixels) typed in the Segment tab; 0: the model's own setting.
    diameter : float or None
        Cell diameter (pixels) typed in the Segment tab; None: estimate it.
    tta : bool
        Segment (the image and folders) with test-time augmentation, as ticked in the
        Segment tab (the training preview never uses it: it must stay fast).
    threads : callable
        Torch CPU threads for a job on a device (None: leave torch's setting); the
        benchmark ``benchmarks/gui_latency.py`` swaps it to compare settings.
    stopped_run : StoppedRun or None
        The training that made the model in memory, when it was stopped before its end
        (it can go on where it stopped); None otherwise.
    class_names, class_colors : list of str
        Semantic mode: the name and colour ("#rrggbb") of each class, background first
        (painted value k + 1 is class k), as set in the dock's class list; they go into
        the training's :class:`TrainConfig` and are taken from a semantic model loaded
        or trained.
    """

    viewer: Any
    image_name: str = ""
    annotation_name: str = ""
    model: torch.nn.Module | None = None
    info: ModelInfo | None = None
    model_path: Path | None = None
    model_saved: bool = True
    min_size: int = 0
    diameter: float | None = None
    tta: bool = False
    threads: Callable[[torch.device], int | None] = field(default=gui_friendly_threads)
    stopped_run: StoppedRun | None = None
    class_names: list[str] = field(default_factory=lambda: ["background", "class 1"])
    class_colors: list[str] = field(default_factory=lambda: default_class_colors(2))
    _scratch: Path | None = field(default=None, init=False, repr=False)

    # ----------------------------------------------------------------- layers
    def image_layer(self) -> Image | None:
        """The image layer chosen at the top of the dock (None: none)."""
        return find_layer(self.viewer, self.image_name, Image)

    def annotation_layer(self) -> Labels | None:
        """The annotation layer chosen in the Annotate tab (None: none)."""
        return find_layer(self.viewer, self.annotation_name, Labels)

    def current_plane(self, image: Image | None = None) -> int:
        """The flat number of the slice on screen for ``image`` (default: the chosen
        image; 0 for a 2D image or none)."""
        image = image or self.image_layer()
        return 0 if image is None else plane_under_cursor(self.viewer, image)

    # ---------------------------------------------------------------- classes
    def classes_for(self, n_classes: int) -> tuple[list[str], list[str]]:
        """The names and colours of ``n_classes`` classes (background first): those set,
        then "class k" and the default palette."""
        defaults = default_class_colors(n_classes)
        names = [*self.class_names[:n_classes]]
        names += [f"class {k}" for k in range(len(names), n_classes)]
        colors = [*self.class_colors[:n_classes]]
        colors += defaults[len(colors):]
        return names, colors

    def set_class(self, k: int, name: str | None = None, color: str | None = None) -> None:
        """Name or colour class ``k`` (0 background); the list grows to hold it. A
        semantic model in memory that has the class is renamed or recoloured too (and
        counts as not saved)."""
        self.class_names, self.class_colors = self.classes_for(max(k + 1, len(self.class_names)))
        if name is not None:
            self.class_names[k] = name
        if color is not None:
            self.class_colors[k] = color
        info = self.info
        if info is not None and info.mode == "semantic" and k < info.n_classes:
            colors = info.colors()
            if name is not None:
                info.class_names[k] = name
            if color is not None:
                colors[k] = color
            info.class_colors = colors
            self.model_saved = False

    def model_class_colors(self) -> list[str] | None:
        """The colours of the classes of the semantic model in memory (background
        first; None for an instance model or none)."""
        if self.info is None or self.info.mode != "semantic":
            return None
        return self.classes_for(self.info.n_classes)[1]

    def adopt_classes(self, info: ModelInfo) -> None:
        """Take the class names and colours of a semantic model (loaded or trained)."""
        if info.mode == "semantic":
            names, colors = list(info.class_names), info.colors()
            # classes named in the dock beyond the model's stay
            self.class_names = names + self.class_names[len(names):]
            self.class_colors = colors + self.class_colors[len(colors):]

    # ------------------------------------------------------------------ model
    @property
    def has_model(self) -> bool:
        return self.model is not None and self.info is not None

    def set_model(
        self,
        model: torch.nn.Module,
        info: ModelInfo,
        path: Path | None,
        saved: bool,
        stopped_run: StoppedRun | None = None,
    ) -> None:
        """Make ``model`` the model in memory; ``stopped_run``: the training that made it
        was stopped before its end and can go on (any other stopped run is forgotten)."""
        self.model, self.info = model, info
        self.model_path, self.model_saved = path, saved
        if stopped_run is None:
            self.forget_stopped_run()
        self.stopped_run = stopped_run

    def forget_stopped_run(self) -> None:
        """No stopped training goes on any more: its checkpoint is deleted."""
        if self.stopped_run is not None:
            remove_checkpoint(self.stopped_run.config.checkpoint)
        self.stopped_run = None

    def checkpoint_path(self) -> Path:
        """Where the dock's training keeps its resume checkpoint: in a temporary folder
        of this state's own, deleted with the state (or when Python exits)."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="cellfit-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch / "training.resume"

    def model_device(self) -> torch.device:
        """The device the model in memory is on (call only with a model)."""
        assert self.model is not None
        return next(self.model.parameters()).device

    def model_needs_diameter(self) -> bool:
        """True when the model in memory works on cells of any size and must be told
        the cell diameter (the starting model before it is trained on painted cells)."""
        return self.info is not None and needs_diameter(self.info)

    def is_shipped_starting_model(self) -> bool:
        """True when the model in memory is the starting model as shipped."""
        if self.model_path is None or not self.model_saved:
            return False
        try:
            return self.model_path.resolve() == starting_model_path().resolve()
        except CellfitError:
            return False

    def postprocess_overrides(self) -> dict:
        """Overrides of the model's own post-processing (none when automatic)."""
        return {"min_size": self.min_size} if self.min_size > 0 else {}

    def segment_diameter(self) -> float | None:
        """The cell diameter to segment with: the one typed for a model that needs one,
        None to estimate it (or for a model that needs none)."""
        return self.diameter if self.model_needs_diameter() else None

    def predict_job(self, image: Image, which: list[int] | None) -> PredictJob:
        """A job segmenting planes ``which`` (all when None) of ``image`` with the model
        in memory and the Segment tab's settings (call only with a model)."""
        assert self.model is not None and self.info is not None
        planes = planes_of(layer_data(image), image.rgb)
        return PredictJob(
            self.model, self.info, planes, which,
            postprocess=self.postprocess_overrides(),
            threads=self.threads(self.model_device()),
            diameter=self.segment_diameter(),
            tta=self.tta,
            class_probability=self.info.mode == "semantic"
            and planes.shape[0] * self.info.n_classes * planes[0, 0].size * 4
            <= MAX_CLASS_PROBABILITY_BYTES,
        )
