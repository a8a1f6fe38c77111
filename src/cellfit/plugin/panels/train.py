"""2 Train: what to train and for how long, Train / Continue / Stop, and the live
preview and plot.

Train trains a new model or fine-tunes the one in memory (:meth:`TrainPanel.train_plan`)
on every annotated slice of the chosen image and of every other image that has a
'<name> annotation' layer, in a :class:`~cellfit.plugin.jobs.TrainJob`: a new run, with
its own warm-up and learning-rate schedule. A run stopped before its end leaves a
resume checkpoint (:attr:`CellfitState.stopped_run`), and Continue goes on with it
where it stopped (the engine's ``TrainConfig.resume``): the rest of its steps or time,
on what it was training on then.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from cellfit.devices import device_label, resolve_device
from cellfit.errors import CellfitError, worded
from cellfit.plugin._display import ENCODERS
from cellfit.plugin._layers import (
    annotated_planes,
    find_layer,
    labels_shape,
    layer_data,
    layer_stack_shape,
    place_above,
    plane_of,
    prediction_layers,
    show_prediction,
)
from cellfit.plugin._layout import WrapButton, WrapCheckBox, reveal
from cellfit.plugin._plot import TrainingPlot
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState, StoppedRun
from cellfit.plugin._tooltips import (
    CHOICES,
    LABELS,
    TIPS,
    TRAIN_BUTTON_TEXT,
    WHY_OFF,
    train_button_tip,
)
from cellfit.plugin.jobs import PredictResult, TrainJob, TrainResult, TrainUpdate
from cellfit.plugin.panels._base import Panel, combo, enable, first, row_label, shrinkable
from cellfit.starting import TrainPlan
from cellfit.targets import n_classes_for
from cellfit.train import (
    TrainConfig,
    class_iou_text,
    objects_text,
    scores_text,
    validation_text,
)

__all__ = ["TrainPanel"]

PATCH_SIZES = [128, 192, 256, 384, 512]
# one training step must stay short on a CPU so Stop acts at once and the preview
# comes early; a GPU takes larger patches in its stride (see docs/plugin.md)
DEFAULT_PATCH_CPU = 128
DEFAULT_PATCH_GPU = 256
#: the engine's defaults: "Train for" (its one training-length default, in seconds)
#: and the shortest time between two live previews
DEFAULT_SECONDS = int(TrainConfig().time_limit)
PREVIEW_EVERY = TrainConfig().preview_every
VAL_EVERY = 25  # validation points on the live plot (and best-model checkpoints)
CONTINUE_TIP = (
    "Go on with the training that was stopped, where it stopped: the rest of its steps "
    "or time, at the learning rate it had reached, on the annotation it was training on "
    "then (press Train more to train again on the annotation as it is now)."
)


def _device_words(device: str) -> str:
    """The engine's device phrase, e.g. "CUDA: NVIDIA H100 (80 GB)" or "CPU only"."""
    text = device_label(device)
    return "CPU only" if text.startswith("CPU only") else text


class TrainPanel(Panel):
    """The Train tab.

    Attributes read by tests and benchmarks: ``last_result`` (the last
    :class:`~cellfit.plugin.jobs.TrainResult`), ``first_preview_seconds`` (Train to
    the first live preview on screen) and ``stop_seconds`` (Stop to training ended).
    """

    #: a validation's figures (``TrainEvent.validation`` or the record's), for the
    #: class list's IoU column
    validated = Signal(object)

    def __init__(self, state: CellfitState, runner: JobRunner) -> None:
        super().__init__(state, runner)
        self.job: TrainJob | None = None
        self.last_result: TrainResult | None = None
        self.first_preview_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._image_name: str | None = None  # the image trained on (its preview)
        self._stack: tuple[int, ...] = ()  # its stack axes when training started
        self._preview_plane: int | None = None
        self._preview_stack: tuple[int, ...] = ()  # stack axes of the kept model's preview
        self._in_place = False  # the model in memory is trained (not a new one)
        self._run: StoppedRun | None = None  # the running training, should it be stopped
        self._preview_after = False  # preview the kept model once the job ended
        self._made_layers: list = []  # the preview layers this training added
        self._last_validation: dict | None = None  # the run's latest validation
        self._last_ui = 0.0
        runner.finished.connect(self._on_finished)

        lay = QVBoxLayout(self)
        lay.addLayout(self._build_settings())
        self.preview_check = WrapCheckBox("Live preview while training")
        self.preview_check.setChecked(True)
        self.preview_check.setToolTip(TIPS["preview"].format(seconds=PREVIEW_EVERY))
        lay.addWidget(self.preview_check)
        self.fresh_check = WrapCheckBox("Train a new model (forget the current one)")
        self.fresh_check.setToolTip(TIPS["fresh"])
        self.fresh_check.toggled.connect(self.update_controls)
        lay.addWidget(self.fresh_check)

        row = QHBoxLayout()
        self.train_button = WrapButton("Train")  # "Train more (fine-tune)": 2 lines if narrow
        self.train_button.clicked.connect(self.start_training)
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip(CONTINUE_TIP)
        self.continue_button.clicked.connect(self.continue_training)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip(TIPS["stop"])
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.train_button, 2)
        row.addWidget(self.continue_button, 1)
        row.addWidget(self.stop_button, 1)
        lay.addLayout(row)
        self.train_bar = QProgressBar()
        self.train_bar.setRange(0, 1000)
        self.train_bar.setTextVisible(False)
        lay.addWidget(self.train_bar)
        self.train_status = QLabel("Not trained yet.")
        self.train_status.setWordWrap(True)
        lay.addWidget(self.train_status)
        self.plot = TrainingPlot()
        lay.addWidget(self.plot)
        lay.addStretch(1)

    def _build_settings(self) -> QFormLayout:
        form = QFormLayout()
        self.start_combo = combo(CHOICES["start"], TIPS["start"])
        self.start_combo.currentIndexChanged.connect(self.update_controls)
        form.addRow(row_label("start"), self.start_combo)
        self.mode_combo = combo(CHOICES["mode"], TIPS["mode"])
        form.addRow(row_label("mode"), self.mode_combo)
        self.classify_combo = combo(CHOICES["classify"], TIPS["classify"])
        form.addRow(row_label("classify"), self.classify_combo)
        self.mode_combo.currentIndexChanged.connect(self.update_controls)
        self.encoder_combo = combo(ENCODERS, TIPS["encoder"])
        form.addRow(row_label("encoder"), self.encoder_combo)
        budget = QHBoxLayout()
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(1, 1_000_000)
        self.budget_spin.setValue(DEFAULT_SECONDS)
        self.budget_spin.setToolTip(TIPS["budget"])
        self.budget_unit = combo(CHOICES["budget_unit"], TIPS["budget_unit"])
        self.budget_unit.setMinimumContentsLength(len("seconds"))  # next to the number
        budget.addWidget(self.budget_spin)
        budget.addWidget(self.budget_unit)
        form.addRow(row_label("budget"), budget)
        self.patch_combo = combo(
            [(str(s), f"{s} × {s} px") for s in PATCH_SIZES], TIPS["patch_size"]
        )
        on_gpu = resolve_device("auto").type != "cpu"
        default_patch = DEFAULT_PATCH_GPU if on_gpu else DEFAULT_PATCH_CPU
        self.patch_combo.setCurrentIndex(PATCH_SIZES.index(default_patch))
        form.addRow(row_label("patch_size"), self.patch_combo)
        self.loss_combo = combo(CHOICES["loss"], TIPS["loss"])
        form.addRow(row_label("loss"), self.loss_combo)
        self.weights_combo = combo(CHOICES["class_weights"], TIPS["class_weights"])
        form.addRow(row_label("class_weights"), self.weights_combo)
        self.device_combo = shrinkable()
        self.device_combo.addItem(f"Auto: {_device_words('auto')}", "auto")
        self.device_combo.addItem("CPU", "cpu")
        if torch.cuda.is_available():
            self.device_combo.addItem(device_label("cuda"), "cuda")
        self.device_combo.setToolTip(TIPS["device"])
        form.addRow(row_label("device"), self.device_combo)
        return form

    # ------------------------------------------------------------- the settings
    def device_choice(self) -> str:
        """The device chosen ("auto", "cpu", "cuda"): for training and for loading models."""
        return self.device_combo.currentData()

    def train_plan(self) -> TrainPlan:
        """What Train does now: fine-tune or adapt the model in memory unless Train a
        new model is ticked, else what Start from says (see :class:`TrainPlan`)."""
        if self.state.has_model and not self.fresh_check.isChecked():
            return TrainPlan.ADAPT if self.state.model_needs_diameter() else TrainPlan.FINE_TUNE
        return TrainPlan(self.start_combo.currentData())

    def training_mode(self) -> str:
        """What the painted values mean: the mode of the model Train goes on with, else
        the Segment choice of this tab ("instances" or "semantic")."""
        if self.train_plan() in (TrainPlan.FINE_TUNE, TrainPlan.ADAPT) and self.state.info:
            return self.state.info.mode
        return self.mode_combo.currentData()

    def adopt_loaded_model(self) -> None:
        """A model was loaded: Train goes on with it, in its mode."""
        assert self.state.info is not None
        idx = self.mode_combo.findData(self.state.info.mode)
        if idx >= 0:
            self.mode_combo.setCurrentIndex(idx)
        self.fresh_check.setChecked(False)

    def train_config(self, plan: TrainPlan = TrainPlan.SCRATCH) -> TrainConfig:
        """The engine's settings for ``plan`` from the controls of this tab."""
        amount = int(self.budget_spin.value())
        by_time = self.budget_unit.currentData() == "seconds"
        # fine-tuning (the user's model or the starting model) runs at the engine's
        # smaller fine-tuning learning rate, which keeps what the model knows
        init = None  # the model in memory, trained in place
        if plan == TrainPlan.STARTING or (
            plan == TrainPlan.ADAPT and self.state.is_shipped_starting_model()
        ):
            # the engine's settings for fine-tuning the starting model; the engine loads
            # it (and trains from scratch instead, with a notice, where it cannot serve)
            init = TrainPlan.STARTING
        elif plan == TrainPlan.SCRATCH:
            init = TrainPlan.SCRATCH
        return TrainConfig(
            mode=self.training_mode(),
            encoder=self.encoder_combo.currentData(),
            loss=self.loss_combo.currentData(),
            class_weights=self.weights_combo.currentData(),
            patch_size=int(self.patch_combo.currentData()),
            time_limit=float(amount) if by_time else None,
            steps=None if by_time else amount,
            device=self.device_choice(),
            preview_every=PREVIEW_EVERY,
            val_every=VAL_EVERY,
            init=init,
            classify=self.classify_combo.currentData(),
        )

    def with_classes(self, config: TrainConfig, annotations: list[np.ndarray]) -> TrainConfig:
        """``config`` with the class names and colours of the dock's class list
        (semantic mode): one per class of the model trained on (the model in memory
        when it goes on with it, else the values painted in ``annotations``)."""
        if config.mode != "semantic":
            return config
        info = self.state.info
        if config.init is None and info is not None and info.mode == "semantic":
            n = info.n_classes  # the model in memory, trained further
        else:
            n = n_classes_for("semantic", [np.asarray(a) for a in annotations])
        names, colors = self.state.classes_for(n)
        return replace(config, class_names=names, class_colors=colors)

    def training_data(self, image: Image, annotation: Labels) -> tuple[list, list, list[str]]:
        """Annotated planes of ``image``, and of every other image layer that has a
        '<name> annotation' layer of its size: images ``(P, C, Y, X)``, annotations
        ``(P, Y, X)`` and the names of the images used."""
        viewer = self.state.viewer
        pairs = [(image, annotation)]
        for other in viewer.layers:
            if not isinstance(other, Image) or other is image:
                continue
            ann = find_layer(viewer, f"{other.name} annotation", Labels)
            if ann is not None and tuple(ann.data.shape) == labels_shape(other):
                pairs.append((other, ann))
        images, anns, used = [], [], []
        for img, ann_layer in pairs:
            ann = np.asarray(ann_layer.data)
            idx = annotated_planes(ann)
            if idx.size == 0:
                continue
            data = layer_data(img)
            images.append(np.stack([plane_of(data, int(p), img.rgb) for p in idx]))
            anns.append(ann.reshape(-1, *ann.shape[-2:])[idx].copy())
            used.append(img.name)
        return images, anns, used

    # -------------------------------------------------------------------- train
    def start_training(self) -> None:
        """Train (or fine-tune the current model) in the background."""
        image = self.image_for_a_job()
        if image is None:
            return
        annotation = self.state.annotation_layer()
        if annotation is None:
            self.error(
                "There is no annotation yet: press Create annotation layer (Annotate tab) and "
                "paint a few cells and some background."
            )
            return
        images, anns, used = self.training_data(image, annotation)
        if not images:
            self.error(
                "Nothing is annotated yet: paint a few cells (New cell) and some background "
                "(Background brush), then press Train."
            )
            return
        plan = self.train_plan()
        # a stopped run leaves a checkpoint for Continue (none is written on time: the
        # dock cannot go on after a crash anyway)
        config = replace(
            self.with_classes(self.train_config(plan), anns),
            checkpoint=self.state.checkpoint_path(),
            checkpoint_every=None,
        )
        # the shipped starting model is loaded afresh by the engine; another model in
        # memory is trained in place
        in_place = plan == TrainPlan.FINE_TUNE or (plan == TrainPlan.ADAPT and config.init is None)
        what = {
            TrainPlan.FINE_TUNE: "Fine-tuning the model",
            TrainPlan.ADAPT: "Fine-tuning the starting model",
            TrainPlan.STARTING: "Training a new model from the starting model",
        }.get(plan, "Training a new model from scratch")
        where = f"{len(used)} images" if len(used) > 1 else f"'{used[0]}'"
        run = StoppedRun(images, anns, config, image.name, in_place)
        self._start_job(run, image, f"{what} on {where}: preparing…", what)

    def continue_training(self) -> None:
        """Go on with the stopped training where it stopped (:attr:`CellfitState.stopped_run`)."""
        run = self.state.stopped_run
        if run is None or self.refuse_while_busy():
            return
        if not run.can_continue:
            self.state.forget_stopped_run()
            self.update_controls()
            self.error(
                "The stopped training cannot go on any more (its checkpoint is gone): "
                "press Train to train again."
            )
            return
        image = find_layer(self.state.viewer, run.image_name, Image)
        resumed = replace(run, config=replace(run.config, resume=True))
        status = f"Continuing the stopped training from step {run.step}…"
        self._start_job(resumed, image, status, "Continuing the training")

    def _start_job(self, run: StoppedRun, image: Image | None, status: str, what: str) -> None:
        """Start training ``run``: a new run (the model in memory trained further when
        ``run.in_place``), or the stopped one going on (``run.config.resume``: the
        engine rebuilds the model from the checkpoint); the live preview on ``image``
        (None: no preview)."""
        config = run.config
        try:
            device = resolve_device(config.device)
        except CellfitError as exc:
            self.error(str(exc))
            return
        if not config.resume:  # a new run replaces a stopped one; its plot starts afresh
            self.state.forget_stopped_run()
            self.plot.clear()
            self._last_validation = None
        in_place = run.in_place and not config.resume
        self._in_place = run.in_place
        self._run = run
        preview = None
        self._preview_plane = None
        if self.preview_check.isChecked() and image is not None:
            plane = self.state.current_plane(image)
            preview = (plane, plane_of(layer_data(image), plane, image.rgb))
            self._preview_plane = plane
        self._image_name = run.image_name
        self._stack = layer_stack_shape(image) if image is not None else ()
        self.job = TrainJob(
            run.images,
            run.annotations,
            config,
            model=self.state.model if in_place else None,
            info=self.state.info if in_place else None,
            preview=preview,
            threads=self.state.threads(device),
            postprocess=self.state.postprocess_overrides(),
        )
        self.first_preview_seconds = None
        self.stop_seconds = None
        self.train_status.setText(status)
        self.runner.start(
            "train", self.job, self._on_result, on_yield=self._on_update,
            bar=self.train_bar, desc=f"cellfit: {what.lower()}",
        )
        reveal(self.plot)  # a short window: the dock scrolls to the progress and the plot
        self._made_layers = []
        if preview is not None:  # while the trainer gets ready in its thread
            viewer, annotation = self.state.viewer, self.state.annotation_layer()
            had = list(viewer.layers)
            layers = prediction_layers(viewer, image, annotation)
            self._made_layers = [layer for layer in layers if layer not in had]
            # the preview shows above the painting (which may hold every predicted
            # cell after Use prediction as annotation)
            place_above(viewer, layers, annotation)

    def on_slice_changed(self) -> None:
        """The viewer moved to another slice: preview that one from now on."""
        if self.runner.kind != "train" or self.job is None:
            return
        image = self.state.image_layer()
        if image is None or image.name != self._image_name or not self.preview_check.isChecked():
            return
        plane = self.state.current_plane(image)
        if plane != self._preview_plane:
            self._preview_plane = plane
            self.job.show_plane(plane, plane_of(layer_data(image), plane, image.rgb))

    def _on_update(self, up: TrainUpdate) -> None:
        ev = up.event
        if ev.notice:
            self.warning(f"Training: {worded(ev.notice, LABELS)}.")
        self.plot.add_loss(ev.step, ev.loss, redraw=False)
        v = ev.validation
        if v:
            self.plot.add_validation(ev.step, v.get("f1"), v.get("ap50"))
            self._last_validation = v
            self.validated.emit(v)
        # a fast GPU yields many steps a second: redraw text and plot ~5 times a second
        now = time.perf_counter()
        if not (v or up.probability is not None or ev.done or now - self._last_ui > 0.2):
            return
        self._last_ui = now
        self.plot.update()
        self.train_status.setText(self._status_text(up))
        if up.probability is not None and up.labels is not None and up.preview_plane is not None:
            if self.first_preview_seconds is None:
                self.first_preview_seconds = time.perf_counter() - self.runner.started_at
            image = find_layer(self.state.viewer, self._image_name or "", Image)
            if image is not None and layer_stack_shape(image) == self._stack:
                classes = up.class_probability
                colors = None if classes is None else self.state.classes_for(len(classes))[1]
                show_prediction(self.state.viewer, image, [up.preview_plane],
                                up.probability[None], up.labels[None],
                                self.state.annotation_layer(), colors=colors,
                                class_prob=None if classes is None else classes[None])
        self.runner.set_progress(ev.fraction)

    def _status_text(self, up: TrainUpdate) -> str:
        ev = up.event
        if up.time_limit:
            budget = f"{ev.elapsed:.0f} s of {up.time_limit:.0f} s"
        else:
            budget = f"{ev.elapsed:.0f} s"
        steps = f"step {ev.step}"
        if ev.total_steps and not up.time_limit:
            steps += f" of {ev.total_steps}"
        text = f"Training: {steps}, {budget}, loss {ev.loss:.3f}"
        best = self._best_scores()
        if best:
            text += f". Validation: {best}"
        by_class = class_iou_text(self._last_validation, most=3)
        if by_class:
            text += f". {by_class}"
        if self.job is not None and self.job.stopping:
            text = "Stopping after this step… " + text
        return text + "."

    def _best_scores(self) -> str:
        if not self.plot.val_steps:
            return ""
        return scores_text({"f1": self.plot.f1[-1], "ap50": self.plot.ap50[-1]})

    def _on_result(self, result: TrainResult) -> None:
        self.last_result = result
        made, self._made_layers = self._made_layers, []
        if result.error or result.model is None or result.info is None:
            # failed, or stopped before its first step: the layers it added go again
            # (never a layer the user had)
            for layer in made:
                if layer in self.state.viewer.layers:
                    self.state.viewer.layers.remove(layer)
        if result.error:
            self.error(result.error)
            self.train_status.setText(f"Training failed: {result.error}")
            return
        if result.model is None or result.info is None:
            self.train_status.setText("Training was stopped before the first step; nothing changed.")
            return
        # a new model: no file holds it yet
        path = self.state.model_path if self._in_place else None
        run = self._run
        stopped = None
        if result.stopped and run is not None and run.can_continue:
            stopped = replace(
                run,
                config=replace(run.config, resume=False),
                step=int(result.record.get("steps", 0)),
            )
        self.state.set_model(result.model, result.info, path, saved=False, stopped_run=stopped)
        self._preview_after = self.preview_check.isChecked()
        self.fresh_check.setChecked(False)
        rec = result.record
        head = "Training stopped" if result.stopped else "Training finished"
        text = f"{head}: {rec.get('steps', 0)} steps in {rec.get('seconds', 0):.0f} s"
        checked = validation_text(rec)  # the command line's words too
        if rec.get("validation"):
            self.validated.emit(rec["validation"])
        if checked:
            text += f". {checked}"
        if objects_text(rec):
            text += f". {objects_text(rec, flag='choose Classes are: Kinds of object')}"
        if rec.get("guard"):  # the model it started from was kept
            text += f". {rec['guard']}"
        elif stopped is not None:
            text += (
                ". Press Continue to go on where it stopped, or correct the worst "
                "mistakes and press Train to fine-tune, or segment."
            )
        else:
            text += ". Correct the worst mistakes and press Train to fine-tune, or segment."
        self.train_status.setText(text)
        show_info(text)
        self.model_changed.emit()

    def stop(self) -> None:
        """Stop training after the current step (the best model so far is kept)."""
        if self.runner.kind != "train":
            return
        self.runner.cancel()
        self.train_status.setText("Stopping after this step (the best model so far is kept)…")

    # -------------------------------------------- the kept model, previewed after
    def _on_finished(self, kind: str) -> None:
        if kind == "train" and self.job is not None:
            if self.job.stop_requested_at is not None:
                self.stop_seconds = time.perf_counter() - self.job.stop_requested_at
            self.job = None
        if self._preview_after:
            self._preview_after = False
            self._preview_kept_model()

    def _preview_kept_model(self) -> None:
        """Refresh the preview of the current slice with the model training kept (its
        best validated weights), quietly, in the background."""
        image = find_layer(self.state.viewer, self._image_name or "", Image)
        if image is None or not self.state.has_model:
            return
        self._preview_stack = layer_stack_shape(image)
        try:
            job = self.state.predict_job(image, [self.state.current_plane(image)])
        except CellfitError:
            return
        self.runner.start("preview", job, partial(self._on_preview_result, image.name))

    def _on_preview_result(self, image_name: str, result: PredictResult) -> None:
        image = find_layer(self.state.viewer, image_name, Image)
        if (result.error or result.labels is None or result.probability is None
                or image is None or layer_stack_shape(image) != self._preview_stack):
            return
        show_prediction(self.state.viewer, image, result.planes, result.probability,
                        result.labels, self.state.annotation_layer(),
                        colors=self.state.model_class_colors(),
                        class_prob=result.class_probability)

    # ---------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        busy = self.busy_why()
        no_image = None if self.state.image_layer() is not None else WHY_OFF["no_image"]
        plan = self.train_plan()
        goes_on = plan in (TrainPlan.FINE_TUNE, TrainPlan.ADAPT)
        # "more" only for a model trained on painted cells (here, or a file loaded)
        self.train_button.setText(TRAIN_BUTTON_TEXT.get(str(plan), "Train"))
        enable(self.train_button, first(busy, no_image), train_button_tip(str(plan)))
        stopped = None if self.state.stopped_run is not None else WHY_OFF["no_stopped_run"]
        enable(self.continue_button, first(busy, stopped), CONTINUE_TIP)
        training = self.runner.busy and self.runner.kind == "train"
        enable(self.stop_button, None if training else WHY_OFF["not_training"], TIPS["stop"])
        no_model = None if self.state.model is not None else WHY_OFF["no_model_fresh"]
        enable(self.fresh_check, first(busy, no_model), TIPS["fresh"])
        keeps = WHY_OFF["fine_tune_keeps"] if goes_on else None
        enable(self.start_combo, first(busy, keeps), TIPS["start"])
        enable(self.mode_combo, first(busy, keeps), TIPS["mode"])
        classes = None if self.training_mode() == "semantic" else WHY_OFF["classes_only"]
        enable(self.classify_combo, first(busy, classes), TIPS["classify"])
        if goes_on:
            tip = TIPS["encoder_fine_tune"]
        elif plan == TrainPlan.STARTING:
            tip = TIPS["encoder_starting"]
        else:
            tip = TIPS["encoder"]
        own_size = None if plan == TrainPlan.SCRATCH else tip
        enable(self.encoder_combo, first(busy, own_size), TIPS["encoder"] if own_size else tip)
        for w, key in ((self.budget_spin, "budget"), (self.budget_unit, "budget_unit"),
                       (self.patch_combo, "patch_size"), (self.loss_combo, "loss"),
                       (self.weights_combo, "class_weights"), (self.device_combo, "device")):
            enable(w, busy, TIPS[key])
        enable(self.preview_check, busy, TIPS["preview"].format(seconds=PREVIEW_EVERY))
