"""The cellfit dock widget: annotate → train → watch → correct → fine-tune → segment.

Everything that computes is an engine call made by a job of
:mod:`cellfit.plugin.workers`, run in a napari ``thread_worker`` so the viewer never
waits for it. This module only builds the controls, moves data between layers and
jobs, and turns results into layers and notifications.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import napari
import numpy as np
import torch
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from cellfit.devices import device_label
from cellfit.errors import CellfitError
from cellfit.model import ModelInfo, load_model, save_model
from cellfit.plugin._display import (
    ENCODERS,
    annotation_colormap,
    encoder_name,
    model_record_html,
    number,
    probability_colormap,
    software_opengl,
    user_runs,
)
from cellfit.plugin._plot import TrainingPlot
from cellfit.plugin.workers import (
    BatchJob,
    BatchResult,
    DiameterJob,
    DiameterResult,
    PredictJob,
    PredictResult,
    Progress,
    TrainJob,
    TrainResult,
    TrainUpdate,
    annotated_planes,
    count_annotation,
    gui_friendly_threads,
    lead_shape,
    plane_index,
    plane_of,
    planes_of,
    prediction_to_annotation,
)
from cellfit.predict import resolve_device
from cellfit.starting import needs_diameter, starting_model_path
from cellfit.train import TrainConfig

__all__ = ["CellfitWidget"]

LOSSES = [
    ("focal+dice", "Focal + Dice (recommended)"),
    ("ce+dice", "Cross-entropy + Dice"),
    ("focal+jaccard", "Focal + Jaccard"),
    ("focal+tversky", "Focal + Tversky"),
    ("focal", "Focal only"),
]
WEIGHTS = [
    ("balanced", "Balanced (recommended)"),
    ("none", "Equal"),
]
MODES = [
    ("instances", "Cells: one id per cell (instances)"),
    ("semantic", "Classes: each value is a class (semantic)"),
]
STARTS = [
    ("starting", "starting model"),
    ("scratch", "scratch (random)"),
]
START_TIP = (
    "What a new model starts from. The cellfit starting model has already seen many kinds "
    "of cells (fluorescent nuclei and cells, brightfield, stained tissue), so a handful of "
    "painted cells is enough to adapt it to yours; it takes grayscale or colour (RGB) "
    "images and segments cells. Scratch starts from random weights and needs more "
    "painting and more training."
)
PATCH_SIZES = [128, 192, 256, 384, 512]
# one training step must stay short on a CPU so Stop acts at once and the preview
# comes early; a GPU takes larger patches in its stride (see docs/plugin.md)
DEFAULT_PATCH_CPU = 128
DEFAULT_PATCH_GPU = 256
DEFAULT_SECONDS = 60
PREVIEW_EVERY = 3.0
VAL_EVERY = 25  # validation points on the live plot (and best-model checkpoints)
ANN_DTYPE = np.uint16
SMALL = "font-size: 11px; color: palette(mid);"

def _small(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setStyleSheet(SMALL)
    return lab


def _combo(items: list[tuple[str, str]], tip: str) -> QComboBox:
    box = QComboBox()
    _shrinkable(box)
    for value, text in items:
        box.addItem(text, value)
    box.setToolTip(tip)
    return box


def _shrinkable(box: QComboBox) -> None:
    """Let a combo box be narrower than its longest item (the dock stays narrow)."""
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(10)


def _device_words(device: str) -> str:
    """The engine's device phrase, e.g. "CUDA: NVIDIA H100 (80 GB)" or "CPU only"."""
    text = device_label(device)
    return "CPU only" if text.startswith("CPU only") else text


class CellfitWidget(QWidget):
    """One dock widget for the whole loop, in four tabs: Annotate, Train, Segment, Model.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari when the widget is opened from Plugins > cellfit.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # the model lives here, in memory, between trainings (so Train fine-tunes it)
        self.model: torch.nn.Module | None = None
        self.info: ModelInfo | None = None
        self.model_path: Path | None = None
        self.model_saved = True
        # the running job (one at a time)
        self.job: TrainJob | PredictJob | BatchJob | None = None
        self.job_kind: str | None = None
        self.worker = None
        self._pbar: progress | None = None
        self._job_started = 0.0
        self._train_image: str | None = None
        self._train_lead: tuple[int, ...] = ()
        self._preview_plane: int | None = None
        self._batch_tmp: Path | None = None
        self._predict_image_name = ""
        self._predict_lead: tuple[int, ...] = ()
        self._watched: Labels | None = None
        self._preview_after_training = False
        self._live = False
        self.last_train_result: TrainResult | None = None
        self.last_predict_result: PredictResult | None = None
        self.last_batch_result: BatchResult | None = None
        self.last_diameter_result: DiameterResult | None = None
        self._train_in_place = False
        self._estimate_image = ""
        self.first_preview_seconds: float | None = None
        self.stop_seconds: float | None = None

        # napari's progress bars, unless the CPU draws the window (see software_opengl);
        # None: decided when the first job starts
        self.napari_progress: bool | None = None
        self._last_ui = 0.0
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(250)
        self._count_timer.timeout.connect(self.update_counts)

        self._build()
        self._connect_viewer()
        app = QApplication.instance()
        if app is not None:  # quitting napari stops a running job instead of waiting for it
            app.aboutToQuit.connect(self.shutdown)
        self.refresh_layers()
        self._render_model()
        self._update_state()

    # ================================================================== layout
    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        inner = QWidget()
        scroll.setWidget(inner)
        outer.addWidget(scroll)
        lay = QVBoxLayout(inner)

        form = QFormLayout()
        self.image_combo = QComboBox()
        _shrinkable(self.image_combo)
        self.image_combo.setToolTip(
            "The image to annotate, train on, preview and segment (2D, 3D stack or time series)."
        )
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image:", self.image_combo)
        lay.addLayout(form)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        lay.addWidget(self.model_label)

        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_annotate(), "1 Annotate")
        self.tabs.addTab(self._build_train(), "2 Train")
        self.tabs.addTab(self._build_segment(), "3 Segment")
        self.tabs.addTab(self._build_model(), "Model")
        lay.addWidget(self.tabs)
        lay.addStretch(1)
        self.setMinimumWidth(300)

    def sizeHint(self) -> QSize:
        # napari sizes the dock from this: wide enough for every row without clipping
        hint = super().sizeHint()
        return QSize(max(hint.width(), 430), hint.height())

    def _build_annotate(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        self.create_button = QPushButton("Create annotation layer")
        self.create_button.setToolTip(
            "Add an empty Labels layer for the selected image, ready to paint: "
            "0 = not annotated (ignored), 1 = background, 2, 3, … = one id per cell."
        )
        self.create_button.clicked.connect(self.create_annotation_layer)
        lay.addWidget(self.create_button)

        form = QFormLayout()
        self.ann_combo = QComboBox()
        _shrinkable(self.ann_combo)
        self.ann_combo.setToolTip(
            "The Labels layer that holds your painting for this image. Only layers with "
            "the image's size are listed."
        )
        self.ann_combo.currentIndexChanged.connect(self._on_annotation_changed)
        form.addRow("Annotation:", self.ann_combo)
        lay.addLayout(form)

        row = QHBoxLayout()
        self.bg_button = QPushButton("Background brush")
        self.bg_button.setToolTip(
            "Paint background (label 1): around and between cells, and on empty areas. "
            "A few strokes are enough."
        )
        self.bg_button.clicked.connect(self.background_brush)
        self.cell_button = QPushButton("New cell")
        self.cell_button.setToolTip(
            "Pick the next free id and paint one whole cell with it. Press again for the next cell."
        )
        self.cell_button.clicked.connect(self.new_cell)
        self.erase_button = QPushButton("Eraser")
        self.erase_button.setToolTip("Erase back to 'not annotated' (0).")
        self.erase_button.clicked.connect(self.eraser)
        for b in (self.bg_button, self.cell_button, self.erase_button):
            row.addWidget(b)
        lay.addLayout(row)

        self.count_label = QLabel("No annotation yet.")
        self.count_label.setWordWrap(True)
        self.count_label.setToolTip("Updated as you paint. Training uses every annotated slice.")
        lay.addWidget(self.count_label)
        lay.addWidget(
            _small(
                "Paint a few cells whole, each with its own id (New cell), and some background "
                "around them. Unpainted pixels are ignored, so you never need to paint "
                "everything. In a stack, paint any slices you like. Tip: outline a cell, then "
                "fill it with the bucket (F)."
            )
        )

        box = QGroupBox("Correct a prediction")
        blay = QVBoxLayout(box)
        blay.addWidget(
            _small(
                "After training or segmenting, delete the wrong cells from the "
                "'… labels' layer (bucket fill with 0, or the eraser), then copy the "
                "rest into your annotation as new cells. Fix what is still wrong, and press "
                "Train again."
            )
        )
        self.ring_check = QCheckBox("Add a background ring around them")
        self.ring_check.setChecked(True)
        self.ring_check.setToolTip(
            "Marks the predicted background in a 2-pixel ring around each copied cell as "
            "background (1), so the cell's edge is learned too."
        )
        blay.addWidget(self.ring_check)
        self.copy_button = QPushButton("Use prediction as annotation")
        self.copy_button.setToolTip(
            "Copy the predicted cells of the current slice into the annotation, each with a "
            "new id. Cells you already painted and painted pixels are never overwritten. "
            "Undo with Ctrl+Z on the annotation layer."
        )
        self.copy_button.clicked.connect(self.use_prediction_as_annotation)
        blay.addWidget(self.copy_button)
        lay.addWidget(box)
        lay.addStretch(1)
        return page

    def _build_train(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        form = QFormLayout()
        self.start_combo = _combo(STARTS, START_TIP)
        self.start_combo.currentIndexChanged.connect(self._update_state)
        form.addRow("Start from:", self.start_combo)
        self.mode_combo = _combo(
            MODES,
            "Cells: every cell gets its own label (touching cells are separated). "
            "Classes: each painted value 2, 3, … is a kind of structure.",
        )
        form.addRow("Segment:", self.mode_combo)
        self.encoder_combo = _combo(
            ENCODERS,
            "The size of the network. Small is fast on a laptop CPU; larger ones can be "
            "more accurate given a GPU and more annotation.",
        )
        form.addRow("Model size:", self.encoder_combo)
        budget = QHBoxLayout()
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(1, 1_000_000)
        self.budget_spin.setValue(DEFAULT_SECONDS)
        self.budget_spin.setToolTip("How long to train. Stop ends it earlier at any time.")
        self.budget_unit = _combo(
            [("seconds", "seconds"), ("steps", "steps")],
            "Train for a time (recommended) or a number of steps (one step = one batch of patches).",
        )
        budget.addWidget(self.budget_spin)
        budget.addWidget(self.budget_unit)
        form.addRow("Train for:", budget)
        self.patch_combo = _combo(
            [(str(s), f"{s} × {s} pixels") for s in PATCH_SIZES],
            "The size of the image pieces the model learns from. Use at least a few cell "
            "diameters; smaller is faster on a CPU.",
        )
        on_gpu = resolve_device("auto").type != "cpu"
        default_patch = DEFAULT_PATCH_GPU if on_gpu else DEFAULT_PATCH_CPU
        self.patch_combo.setCurrentIndex(PATCH_SIZES.index(default_patch))
        form.addRow("Patch size:", self.patch_combo)
        self.loss_combo = _combo(
            LOSSES,
            "Focal + Dice copes with few cell pixels among much background; keep it unless "
            "you have a reason.",
        )
        form.addRow("Loss:", self.loss_combo)
        self.weights_combo = _combo(
            WEIGHTS,
            "Balanced gives rare classes (cells, their boundaries) more weight, so the model "
            "does not learn to call everything background.",
        )
        form.addRow("Class weights:", self.weights_combo)
        self.device_combo = QComboBox()
        _shrinkable(self.device_combo)
        self.device_combo.addItem(f"Automatic: {_device_words('auto')}", "auto")
        self.device_combo.addItem("CPU", "cpu")
        if torch.cuda.is_available():
            self.device_combo.addItem(device_label("cuda"), "cuda")
        self.device_combo.setToolTip(
            "Where to train and segment. Automatic uses a CUDA or Apple GPU when PyTorch "
            "finds one, else the CPU. On the CPU, training leaves one core free so napari "
            "stays responsive."
        )
        form.addRow("Device:", self.device_combo)
        lay.addLayout(form)

        self.preview_check = QCheckBox("Live preview while training")
        self.preview_check.setChecked(True)
        self.preview_check.setToolTip(
            f"Every few seconds (~{PREVIEW_EVERY:.0f} s), show the prediction for the slice "
            "on screen in the '<image> probability' and '<image> labels' layers."
        )
        lay.addWidget(self.preview_check)
        self.fresh_check = QCheckBox("Train a new model (forget the current one)")
        self.fresh_check.setToolTip(
            "Unticked, Train continues training (fine-tunes) the current model on your "
            "updated annotation. Ticked, a new model is trained, starting from what "
            "Start from says; save the current model first if you want to keep it."
        )
        self.fresh_check.toggled.connect(self._update_state)
        lay.addWidget(self.fresh_check)

        row = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.start_training)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; the best model so far is kept.")
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.train_button, 2)
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
        return page

    def _build_segment(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        self.starting_button = QPushButton("Use the starting model as is")
        self.starting_button.setToolTip(
            "Segment without training: use the cellfit starting model, which has seen many "
            "kinds of cells. Give the size of your cells below (or let it be estimated). "
            "If it misses cells, paint a few and Train: it adapts to your images."
        )
        self.starting_button.clicked.connect(self.use_starting_model)
        lay.addWidget(self.starting_button)
        self.diameter_box = QWidget()
        dform = QFormLayout(self.diameter_box)
        dform.setContentsMargins(0, 0, 0, 0)
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 5000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSingleStep(1.0)
        self.diameter_spin.setValue(0.0)
        self.diameter_spin.setSpecialValueText("estimate when segmenting")
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setToolTip(
            "How many pixels across a typical cell is in your images. This model works on "
            "cells of any size but must be told theirs; measure one with napari's ruler, "
            "or press Estimate. Not needed once the model is trained on your painted cells."
        )
        self.estimate_button = QPushButton("Estimate")
        self.estimate_button.setToolTip(
            "Estimate the cell diameter from the slice on screen (a few seconds). Check "
            "the result by segmenting; change it if cells come out split or merged."
        )
        self.estimate_button.clicked.connect(self.estimate_diameter)
        drow = QHBoxLayout()
        drow.addWidget(self.diameter_spin, 1)
        drow.addWidget(self.estimate_button)
        dform.addRow("Cell diameter:", drow)
        lay.addWidget(self.diameter_box)
        box = QGroupBox("The selected image")
        form = QFormLayout(box)
        self.slices_combo = _combo(
            [("all", "All slices"), ("current", "Current slice only")],
            "For a stack or time series: segment every slice, or only the one on screen.",
        )
        form.addRow("Slices:", self.slices_combo)
        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(0, 100_000)
        self.min_size_spin.setValue(0)
        self.min_size_spin.setSpecialValueText("automatic (from your cells)")
        self.min_size_spin.setSuffix(" pixels")
        self.min_size_spin.setToolTip(
            "Objects smaller than this are dropped (debris, noise). Automatic: a quarter of "
            "the typical size of the cells you annotated, as learned with the model."
        )
        form.addRow("Smallest cell:", self.min_size_spin)
        self.predict_button = QPushButton("Segment image")
        self.predict_button.setToolTip(
            "Adds (or updates) the layers '<image> probability' (0–1, how likely each pixel "
            "is part of a cell) and '<image> labels' (one id per cell)."
        )
        self.predict_button.clicked.connect(self.predict_image)
        form.addRow(self.predict_button)
        lay.addWidget(box)

        box = QGroupBox("A folder of TIFF files")
        form = QFormLayout(box)
        self.in_edit, in_row = self._folder_row("The folder of .tif / .tiff images to segment.")
        form.addRow("Images:", in_row)
        self.out_edit, out_row = self._folder_row(
            "Where to write <name>_labels.tif (and <name>_prob.tif). Must not be the "
            "image folder: inputs are never overwritten."
        )
        form.addRow("Results to:", out_row)
        self.prob_check = QCheckBox("Also save probability maps")
        self.prob_check.setToolTip("Writes <name>_prob.tif next to each <name>_labels.tif.")
        form.addRow(self.prob_check)
        self.overwrite_check = QCheckBox("Replace existing results")
        self.overwrite_check.setChecked(False)  # as `cellfit predict`: finished files are kept
        self.overwrite_check.setToolTip(
            "Ticked, results already in the output folder are replaced. Unticked, files "
            "whose results exist are skipped (to resume a batch)."
        )
        form.addRow(self.overwrite_check)
        self.batch_button = QPushButton("Segment folder")
        self.batch_button.setToolTip(
            "Segments every TIFF with the current model: the same engine as `cellfit predict`."
        )
        self.batch_button.clicked.connect(self.predict_folder)
        form.addRow(self.batch_button)
        lay.addWidget(box)

        row = QHBoxLayout()
        self.seg_bar = QProgressBar()
        self.seg_bar.setRange(0, 1000)
        self.seg_bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop segmenting; finished files are kept.")
        self.cancel_button.clicked.connect(self.stop)
        row.addWidget(self.seg_bar, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.seg_status = QLabel("")
        self.seg_status.setWordWrap(True)
        lay.addWidget(self.seg_status)
        lay.addStretch(1)
        return page

    def _folder_row(self, tip: str) -> tuple[QLineEdit, QWidget]:
        edit = QLineEdit()
        edit.setToolTip(tip)
        edit.setPlaceholderText("choose a folder…")
        button = QPushButton("Browse…")
        button.clicked.connect(lambda: self._browse_folder(edit))
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(edit, 1)
        h.addWidget(button)
        return edit, row

    def _browse_folder(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or "")
        if folder:
            edit.setText(folder)

    def _build_model(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        row = QHBoxLayout()
        self.save_button = QPushButton("Save model…")
        self.save_button.setToolTip(
            "Save the model to one .cellfit file (weights and training record). "
            "`cellfit predict` and this plugin can load it."
        )
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Load model…")
        self.load_button.setToolTip("Load a .cellfit model file, to segment or to fine-tune it.")
        self.load_button.clicked.connect(self._load_dialog)
        self.load_starting_button = QPushButton("Starting model")
        self.load_starting_button.setToolTip(
            "Make the cellfit starting model the current model, as shipped: to segment "
            "with it (give the cell diameter in Segment) or to fine-tune it."
        )
        self.load_starting_button.clicked.connect(self.use_starting_model)
        row.addWidget(self.save_button)
        row.addWidget(self.load_button)
        row.addWidget(self.load_starting_button)
        lay.addLayout(row)
        self.record_view = QTextBrowser()
        self.record_view.setOpenLinks(False)
        self.record_view.setMinimumHeight(260)
        lay.addWidget(self.record_view)
        return page

    # ========================================================== viewer & layers
    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "moved", "reordered"):
            getattr(ev, name).connect(self.refresh_layers)
        ev.inserted.connect(self._on_layer_inserted)
        for layer in self.viewer.layers:
            layer.events.name.connect(self.refresh_layers)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh_layers)

    def refresh_layers(self, event=None) -> None:
        """Refill the image and annotation lists from the viewer's layers."""
        current = self.image_combo.currentText()
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.metadata.get("cellfit") != "probability"
        ]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            # prefer the selected image layer, else the first one that is not our output
            active = self.viewer.layers.selection.active
            pick = active.name if isinstance(active, Image) else None
            pick = pick if pick in names else names[0]
            self.image_combo.setCurrentText(pick)
        self.image_combo.blockSignals(False)
        self._refresh_annotation_choices()
        self._update_state()

    def _refresh_annotation_choices(self) -> None:
        image = self.image_layer()
        current = self.ann_combo.currentText()
        self.ann_combo.blockSignals(True)
        self.ann_combo.clear()
        if image is not None:
            shape = self._labels_shape(image)
            names = [
                layer.name
                for layer in self.viewer.layers
                if isinstance(layer, Labels) and tuple(layer.data.shape) == shape
            ]
            default = f"{image.name} annotation"
            names.sort(key=lambda n: (n != default, n.endswith(" labels"), n))
            self.ann_combo.addItems(names)
            if current in names and current != "" and (default not in names or current == default):
                self.ann_combo.setCurrentText(current)
            elif default in names:
                self.ann_combo.setCurrentText(default)
        self.ann_combo.blockSignals(False)
        self._on_annotation_changed()

    def image_layer(self) -> Image | None:
        """The image layer chosen at the top of the widget."""
        return self._layer(self.image_combo.currentText(), Image)

    def annotation_layer(self) -> Labels | None:
        """The annotation layer chosen in the Annotate tab."""
        return self._layer(self.ann_combo.currentText(), Labels)

    @staticmethod
    def _data(layer: Image):
        return layer.data[0] if layer.multiscale else layer.data

    def _labels_shape(self, image: Image) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self._data(image).shape)
        return shape[:-1] if image.rgb else shape

    def _lead(self, image: Image) -> tuple[int, ...]:
        return lead_shape(self._data(image).shape, image.rgb)

    def current_plane(self, image: Image | None = None) -> int:
        """The flat number of the slice on screen, for ``image`` (0 for a 2D image)."""
        image = image or self.image_layer()
        if image is None:
            return 0
        lead = self._lead(image)
        if not lead:
            return 0
        pos = image.world_to_data(self.viewer.dims.point)
        return plane_index([round(float(c)) for c in pos[: len(lead)]], lead)

    def _plane_slices(self, image: Image, plane: int) -> tuple:
        lead = self._lead(image)
        return tuple(int(i) for i in np.unravel_index(plane, lead)) if lead else ()

    def _on_image_changed(self, *_args) -> None:
        self._refresh_annotation_choices()
        self._update_state()

    def _on_annotation_changed(self, *_args) -> None:
        layer = self.annotation_layer()
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.paint.disconnect(self._schedule_count)
                self._watched.events.data.disconnect(self._schedule_count)
            if layer is not None:
                layer.events.paint.connect(self._schedule_count)
                layer.events.data.connect(self._schedule_count)
            self._watched = layer
        self.update_counts()
        self._update_state()

    def _on_slice_changed(self, event=None) -> None:
        self._schedule_count()
        if self.job_kind == "train" and isinstance(self.job, TrainJob):
            image = self.image_layer()
            if image is None or image.name != self._train_image or not self.preview_check.isChecked():
                return
            plane = self.current_plane(image)
            if plane != self._preview_plane:
                self._preview_plane = plane
                self.job.show_plane(plane, plane_of(self._data(image), plane, image.rgb))

    # ================================================================ annotate
    def create_annotation_layer(self) -> Labels | None:
        """Add '<image> annotation' (or select it if it exists) with painting defaults."""
        image = self.image_layer()
        if image is None:
            show_error("Open an image first (File > Open, or File > Open Sample > cellfit).")
            return None
        name = f"{image.name} annotation"
        shape = self._labels_shape(image)
        if name in self.viewer.layers and tuple(self.viewer.layers[name].data.shape) == shape:
            layer = self.viewer.layers[name]
        else:
            if name in self.viewer.layers:
                name = f"{name} {len(self.viewer.layers)}"
            layer = self.viewer.add_labels(
                np.zeros(shape, ANN_DTYPE),
                name=name,
                scale=image.scale,
                translate=image.translate,
                opacity=0.7,
                colormap=annotation_colormap(),
                metadata={"cellfit": "annotation", "image": image.name},
            )
        layer.n_edit_dimensions = 2  # paint the slice on screen only
        ymax, xmax = shape[-2:]
        layer.brush_size = int(max(3, round(min(ymax, xmax) / 64)))
        layer.selected_label = self._next_free_id(layer)
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer
        self._refresh_annotation_choices()
        self.ann_combo.setCurrentText(layer.name)
        show_info(
            f"Paint cells on '{layer.name}': New cell for each cell, Background brush for "
            "background. Unpainted pixels are ignored."
        )
        return layer

    def _require_annotation(self) -> Labels | None:
        layer = self.annotation_layer()
        if layer is None:
            layer = self.create_annotation_layer()
        return layer

    @staticmethod
    def _next_free_id(layer: Labels) -> int:
        top = int(np.max(layer.data)) if layer.data.size else 0
        return max(top + 1, 2)

    def background_brush(self) -> None:
        """Select the annotation layer and paint background (1)."""
        layer = self._require_annotation()
        if layer is None:
            return
        layer.selected_label = 1
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer

    def new_cell(self) -> None:
        """Select the annotation layer and paint with the next free cell id."""
        layer = self._require_annotation()
        if layer is None:
            return
        new_id = self._next_free_id(layer)
        if layer.data.dtype.kind in "ui" and new_id > np.iinfo(layer.data.dtype).max:
            show_error(
                f"The annotation layer holds {layer.data.dtype} values and cannot take a cell "
                f"id above {new_id - 1}: no more cells can be added to it."
            )
            return
        layer.selected_label = new_id
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer

    def eraser(self) -> None:
        layer = self._require_annotation()
        if layer is None:
            return
        layer.mode = "erase"
        self.viewer.layers.selection.active = layer

    def _schedule_count(self, event=None) -> None:
        self._count_timer.start()

    def _mode(self) -> str:
        if self._train_plan() in ("fine-tune", "adapt") and self.info is not None:
            return self.info.mode
        return self.mode_combo.currentData()

    def _is_shipped_starting_model(self) -> bool:
        """True when the model in memory is the starting model as shipped."""
        if self.model_path is None or not self.model_saved:
            return False
        try:
            return self.model_path.resolve() == starting_model_path().resolve()
        except CellfitError:
            return False

    def _train_plan(self) -> str:
        """What Train does now.

        "fine-tune": go on training the model in memory (a smaller learning rate keeps
        what it learnt); "adapt": first training of the model in memory, which works on
        cells of any size (the starting model as loaded: the engine's settings);
        "starting" / "scratch": a new model from the starting model / random weights.
        """
        if self.model is not None and self.info is not None and not self.fresh_check.isChecked():
            return "adapt" if needs_diameter(self.info) else "fine-tune"
        return self.start_combo.currentData()

    def update_counts(self) -> None:
        """Show how much is annotated (the engine's counts)."""
        layer = self.annotation_layer()
        image = self.image_layer()
        if layer is None or image is None:
            self.count_label.setText("No annotation layer yet: press Create annotation layer.")
            return
        mode = self._mode()
        ann = np.asarray(layer.data)
        s = count_annotation(ann, mode)
        what = "cell" if mode == "instances" else "object"
        cells = f"{number(s['cells'])} {what}{'s' if s['cells'] != 1 else ''}"
        text = (
            f"Annotated: <b>{cells}</b> and <b>{number(s['background_pixels'])}</b> "
            "background pixels"
        )
        if self._lead(image):
            text += f" in {s['planes']} slice{'s' if s['planes'] != 1 else ''}"
            plane = self.current_plane(image)
            here = count_annotation(ann.reshape(-1, *ann.shape[-2:])[plane], mode)
            text += f" (this slice: {here['cells']} {what}{'s' if here['cells'] != 1 else ''})"
        text += "."
        if s["annotated_pixels"] and mode == "instances" and s["cells"] == 0:
            text += " Now paint some cells (New cell)."
        elif s["cells"] and s["background_pixels"] == 0:
            text += " Now paint some background (Background brush)."
        self.count_label.setText(text)

    def use_prediction_as_annotation(self) -> int:
        """Copy the predicted cells of the current slice into the annotation (undoable).

        Returns the number of cells copied.
        """
        image = self.image_layer()
        if image is None:
            show_error("Open an image first.")
            return 0
        pred = self._layer(f"{image.name} labels", Labels)
        if pred is None:
            show_error(
                f"There is no '{image.name} labels' layer yet: train (with live preview) or "
                "segment the image first."
            )
            return 0
        layer = self._require_annotation()
        if layer is None:
            return 0
        plane = self.current_plane(image)
        lead_idx = self._plane_slices(image, plane)
        old = np.asarray(layer.data[lead_idx])
        try:
            new, n = prediction_to_annotation(
                old, np.asarray(pred.data[lead_idx]), ring=2 if self.ring_check.isChecked() else 0
            )
        except CellfitError as exc:
            show_error(str(exc))
            return 0
        if n == 0:
            show_info(
                "No predicted cell to copy on this slice: they are all painted already or "
                "were deleted."
            )
            return 0
        yy, xx = np.nonzero(new != old)
        index = (*(np.full(yy.shape, i) for i in lead_idx), yy, xx)
        layer.data_setitem(index, new[yy, xx])  # one undoable edit (Ctrl+Z)
        layer.selected_label = self._next_free_id(layer)
        self.viewer.layers.selection.active = layer
        self.update_counts()
        show_info(
            f"Copied {n} predicted cell{'s' if n != 1 else ''} into '{layer.name}'. Fix what "
            "is wrong, then press Train to fine-tune."
        )
        return n

    # =================================================================== train
    def _train_config(self, plan: str = "scratch") -> TrainConfig:
        amount = int(self.budget_spin.value())
        by_time = self.budget_unit.currentData() == "seconds"
        config = TrainConfig(
            mode=self._mode(),
            encoder=self.encoder_combo.currentData(),
            loss=self.loss_combo.currentData(),
            class_weights=self.weights_combo.currentData(),
            patch_size=int(self.patch_combo.currentData()),
            time_limit=float(amount) if by_time else None,
            steps=None if by_time else amount,
            device=self.device_combo.currentData(),
            preview_every=PREVIEW_EVERY,
            val_every=VAL_EVERY,
        )
        # fine-tuning (the user's model or the starting model) runs at the engine's
        # smaller fine-tuning learning rate, which keeps what the model knows
        if plan == "starting" or (plan == "adapt" and self._is_shipped_starting_model()):
            # the engine's settings for fine-tuning the starting model; the engine loads
            # it (and trains from scratch instead, with a notice, where it cannot serve)
            config.init = "starting"
        elif plan == "scratch":
            config.init = "scratch"
        return config

    def _training_data(self, image: Image, annotation: Labels) -> tuple[list, list, list[str]]:
        """Annotated planes of the selected image, and of every other image layer that
        has a '<name> annotation' layer of its size."""
        pairs = [(image, annotation)]
        for other in self.viewer.layers:
            if not isinstance(other, Image) or other is image:
                continue
            ann = self._layer(f"{other.name} annotation", Labels)
            if ann is not None and tuple(ann.data.shape) == self._labels_shape(other):
                pairs.append((other, ann))
        images, anns, used = [], [], []
        for img, ann_layer in pairs:
            ann = np.asarray(ann_layer.data)
            idx = annotated_planes(ann)
            if idx.size == 0:
                continue
            data = self._data(img)
            images.append(np.stack([plane_of(data, int(p), img.rgb) for p in idx]))
            anns.append(ann.reshape(-1, *ann.shape[-2:])[idx].copy())
            used.append(img.name)
        return images, anns, used

    def start_training(self) -> None:
        """Train (or fine-tune the current model) in the background."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return
        image = self.image_layer()
        if image is None:
            show_error("Open an image first (File > Open, or File > Open Sample > cellfit).")
            return
        annotation = self.annotation_layer()
        if annotation is None:
            show_error(
                "There is no annotation yet: press Create annotation layer (Annotate tab) and "
                "paint a few cells and some background."
            )
            return
        images, anns, used = self._training_data(image, annotation)
        if not images:
            show_error(
                "Nothing is annotated yet: paint a few cells (New cell) and some background "
                "(Background brush), then press Train."
            )
            return
        plan = self._train_plan()
        config = self._train_config(plan)
        # the shipped starting model is loaded afresh by the engine; another model in
        # memory is trained in place
        fine_tune = plan == "fine-tune" or (plan == "adapt" and config.init is None)
        self._train_in_place = fine_tune
        try:
            device = resolve_device(config.device)
        except CellfitError as exc:
            show_error(str(exc))
            return
        preview = None
        self._preview_plane = None
        if self.preview_check.isChecked():
            plane = self.current_plane(image)
            preview = (plane, plane_of(self._data(image), plane, image.rgb))
            self._preview_plane = plane
        self._train_image = image.name
        self._train_lead = self._lead(image)
        job = TrainJob(
            images,
            anns,
            config,
            model=self.model if fine_tune else None,
            info=self.info if fine_tune else None,
            preview=preview,
            threads=gui_friendly_threads(device),
            postprocess=self._postprocess(),
        )
        self.plot.clear()
        self.first_preview_seconds = None
        self.stop_seconds = None
        what = {
            "fine-tune": "Fine-tuning the model",
            "adapt": "Fine-tuning the starting model",
            "starting": "Training a new model from the starting model",
        }.get(plan, "Training a new model from scratch")
        where = f"{len(used)} images" if len(used) > 1 else f"'{used[0]}'"
        self.train_status.setText(f"{what} on {where}: preparing…")
        self._start_job("train", job, f"cellfit: {what.lower()}", self._on_train_update,
                        self._on_train_result)
        if preview is not None:  # while the trainer gets ready in its thread
            self._prediction_layers(image)

    def _on_train_update(self, up: TrainUpdate) -> None:
        if up.notice:
            show_warning(f"Training: {up.notice}.")
        self.plot.add_loss(up.step, up.loss, redraw=False)
        v = up.validation
        if v:
            self.plot.add_validation(up.step, v.get("f1"), v.get("ap50"))
        # a fast GPU yields many steps a second: redraw text and plot ~5 times a second
        now = time.perf_counter()
        if not (v or up.probability is not None or up.done or now - self._last_ui > 0.2):
            return
        self._last_ui = now
        self.plot.update()
        if up.time_limit:
            budget = f"{up.elapsed:.0f} s of {up.time_limit:.0f} s"
        else:
            budget = f"{up.elapsed:.0f} s"
        steps = f"step {up.step}" + (f" of {up.total_steps}" if up.total_steps and not up.time_limit else "")
        text = f"Training: {steps}, {budget}, loss {up.loss:.3f}"
        best = self._best_scores()
        if best:
            text += f". Validation: {best}"
        if self.job is not None and self.job.stopping:
            text = "Stopping after this step… " + text
        self.train_status.setText(text + ".")
        if up.probability is not None and up.labels is not None and up.preview_plane is not None:
            if self.first_preview_seconds is None:
                self.first_preview_seconds = time.perf_counter() - self._job_started
            image = self._layer(self._train_image or "", Image)
            if image is not None and self._lead(image) == self._train_lead:
                self._show_prediction(image, [up.preview_plane], up.probability[None],
                                      up.labels[None])
        self._set_progress(up.fraction)

    def _best_scores(self) -> str:
        if not self.plot.val_steps:
            return ""
        f1, ap = self.plot.f1[-1], self.plot.ap50[-1]
        parts = []
        if np.isfinite(f1):
            parts.append(f"F1 {f1:.2f}")
        if np.isfinite(ap):
            parts.append(f"AP50 {ap:.2f}")
        return ", ".join(parts)

    def _on_train_result(self, result: TrainResult) -> None:
        self.last_train_result = result
        if result.error:
            show_error(result.error)
            self.train_status.setText(f"Training failed: {result.error}")
            return
        if result.model is None or result.info is None:
            self.train_status.setText("Training was stopped before the first step; nothing changed.")
            return
        self.model, self.info = result.model, result.info
        self.model_saved = False
        if not self._train_in_place:  # a new model: no file holds it yet
            self.model_path = None
        self._preview_after_training = self.preview_check.isChecked()
        self.fresh_check.setChecked(False)
        rec = result.record
        val = rec.get("validation") or {}
        scores = ", ".join(
            f"{name} {val[key]:.2f}" for key, name in (("f1", "F1"), ("ap50", "AP50")) if key in val
        )
        head = "Training stopped" if result.stopped else "Training finished"
        text = f"{head}: {rec.get('steps', 0)} steps in {rec.get('seconds', 0):.0f} s"
        if scores:
            text += f". Validation on {rec.get('validated_on', 'the annotation')}: {scores}"
        text += ". Correct the worst mistakes and press Train to fine-tune, or segment."
        self.train_status.setText(text)
        show_info(text)
        self._render_model()

    # ================================================================= predict
    def _has_model(self) -> bool:
        """True when there is a model to segment with; otherwise say how to get one."""
        if self.model is None or self.info is None:
            show_error(
                "There is no model yet: train one (Train tab), load a model file (Model "
                "tab) or press Use the starting model as is."
            )
            return False
        return True

    def predict_image(self) -> None:
        """Segment the selected image (all slices or the current one) in the background."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return
        image = self.image_layer()
        if image is None:
            show_error("Open an image first (File > Open, or File > Open Sample > cellfit).")
            return
        if not self._has_model():
            return
        which = None
        if self._lead(image) and self.slices_combo.currentData() == "current":
            which = [self.current_plane(image)]
        try:
            job = self._predict_job(image, which)
        except CellfitError as exc:
            show_error(str(exc))
            return
        self.seg_status.setText(f"Segmenting '{image.name}'…")
        self._start_job("predict", job, "cellfit: segmenting", self._on_progress,
                        self._on_predict_result)

    def _predict_job(self, image: Image, which: list[int] | None) -> PredictJob:
        """A job segmenting planes ``which`` (all when None) of ``image`` with the model."""
        assert self.model is not None and self.info is not None
        planes = planes_of(self._data(image), image.rgb)
        device = next(self.model.parameters()).device
        self._predict_image_name, self._predict_lead = image.name, self._lead(image)
        return PredictJob(
            self.model, self.info, planes, which,
            postprocess=self._postprocess(), threads=gui_friendly_threads(device),
            diameter=self._diameter() if self.model_needs_diameter() else None,
        )

    def model_needs_diameter(self) -> bool:
        """True when the model in memory works on cells of any size and must be told
        the cell diameter (the starting model before it is trained on painted cells)."""
        return self.info is not None and needs_diameter(self.info)

    def _diameter(self) -> float | None:
        """The cell diameter typed in the Segment tab (None: estimate it)."""
        value = float(self.diameter_spin.value())
        return value if value > 0 else None

    def estimate_diameter(self) -> None:
        """Estimate the cell diameter on the slice on screen, in the background."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return
        image = self.image_layer()
        if image is None:
            show_error("Open an image first (File > Open, or File > Open Sample > cellfit).")
            return
        if not self._has_model():
            return
        if not self.model_needs_diameter():
            show_info(
                "This model learnt the size of your cells when it was trained: it needs "
                "no cell diameter."
            )
            return
        plane = self.current_plane(image)
        raw = plane_of(self._data(image), plane, image.rgb)
        device = next(self.model.parameters()).device
        job = DiameterJob(self.model, self.info, raw, threads=gui_friendly_threads(device))
        self._estimate_image = image.name
        self.seg_status.setText(f"Estimating the cell diameter on '{image.name}'…")
        self._start_job("estimate", job, "cellfit: estimating the cell diameter",
                        self._on_progress, self._on_diameter_result)

    def _on_diameter_result(self, result: DiameterResult) -> None:
        self.last_diameter_result = result
        if result.error or result.diameter is None:
            msg = result.error or "The cell diameter could not be estimated."
            show_error(msg)
            self.seg_status.setText(f"No estimate: {msg}")
            return
        self.diameter_spin.setValue(result.diameter)
        text = (
            f"Cell diameter estimated at {result.diameter:g} pixels on "
            f"'{self._estimate_image}'. Segment to check it, and change "
            "it if cells come out split or merged."
        )
        self.seg_status.setText(text)
        show_info(text)

    def _postprocess(self) -> dict:
        """Overrides of the model's own post-processing (none when automatic)."""
        value = int(self.min_size_spin.value())
        return {"min_size": value} if value > 0 else {}

    def _on_progress(self, pr: Progress) -> None:
        if pr.notice:
            show_info(pr.notice)
        self.seg_status.setText(pr.text)
        self._set_progress(pr.fraction)

    def _on_predict_result(self, result: PredictResult) -> None:
        self.last_predict_result = result
        if result.error:
            show_error(result.error)
            self.seg_status.setText(f"Segmentation failed: {result.error}")
            return
        if result.cancelled or result.labels is None or result.probability is None:
            self.seg_status.setText("Segmentation cancelled.")
            return
        image = self._layer(self._predict_image_name, Image)
        if image is None or self._lead(image) != self._predict_lead:
            self.seg_status.setText("The image was closed or changed before segmentation ended.")
            return
        if result.diameter is not None:  # estimated: shown, and used from now on
            self.diameter_spin.setValue(result.diameter)
        self._show_prediction(image, result.planes, result.probability, result.labels)
        n_cells = sum(len(np.unique(lab)) - (1 if (lab == 0).any() else 0) for lab in result.labels)
        what = "cells" if self.info is None or self.info.mode == "instances" else "labelled regions"
        where = "" if len(result.planes) == 1 else f" in {len(result.planes)} slices"
        if self.model_needs_diameter() and self._diameter():
            where += f", cell diameter {self._diameter():g} pixels"
        text = (
            f"Segmented '{image.name}' in {result.seconds:.1f} s: {number(n_cells)} {what}"
            f"{where}. See the '{image.name} labels' and '{image.name} probability' layers."
        )
        self.seg_status.setText(text)
        show_info(text)

    def _layer(self, name: str, kind: type):
        """The layer called ``name`` if it is of type ``kind``, else None."""
        for layer in self.viewer.layers:
            if layer.name == name:
                return layer if isinstance(layer, kind) else None
        return None

    def _show_prediction(self, image: Image, planes: list[int], prob: np.ndarray,
                         labels: np.ndarray) -> None:
        """Write predicted planes into '<image> probability' and '<image> labels'."""
        prob_layer, lab_layer = self._prediction_layers(image)
        lead = self._lead(image)
        if not lead:
            prob_layer.data = prob[0]
            lab_layer.data = labels[0].astype(lab_layer.data.dtype, copy=False)
        else:
            pdata, ldata = prob_layer.data, lab_layer.data
            for k, plane in enumerate(planes):
                idx = self._plane_slices(image, plane)
                pdata[idx] = prob[k]
                ldata[idx] = labels[k]
            prob_layer.refresh()
            lab_layer.refresh()

    def _prediction_layers(self, image: Image) -> tuple[Image, Labels]:
        """'<image> probability' and '<image> labels', added (empty) if missing.

        Adding a layer takes napari a second or two when the CPU draws the window, so
        Train adds them at once rather than when the first preview arrives.
        """
        shape = self._labels_shape(image)
        active = self.viewer.layers.selection.active
        prob_layer = self._layer(f"{image.name} probability", Image)
        if prob_layer is None or tuple(prob_layer.data.shape) != shape:
            if prob_layer is not None:
                self.viewer.layers.remove(prob_layer)
            prob_layer = self.viewer.add_image(
                np.zeros(shape, np.float32),
                name=f"{image.name} probability",
                colormap=probability_colormap(),
                contrast_limits=(0.0, 1.0),
                blending="translucent",
                opacity=0.6,
                scale=image.scale,
                translate=image.translate,
                metadata={"cellfit": "probability", "image": image.name},
            )
            self._place_below_annotation(prob_layer)
        lab_layer = self._layer(f"{image.name} labels", Labels)
        if lab_layer is None or tuple(lab_layer.data.shape) != shape:
            if lab_layer is not None:
                self.viewer.layers.remove(lab_layer)
            lab_layer = self.viewer.add_labels(
                np.zeros(shape, np.int32),
                name=f"{image.name} labels",
                opacity=0.8,
                scale=image.scale,
                translate=image.translate,
                metadata={"cellfit": "prediction", "image": image.name},
            )
            lab_layer.contour = 1
            self._place_below_annotation(lab_layer)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        return prob_layer, lab_layer

    def _place_below_annotation(self, layer) -> None:
        ann = self.annotation_layer()
        if ann is None:
            return
        layers = self.viewer.layers
        src, dst = layers.index(layer), layers.index(ann)
        if src > dst:
            layers.move(src, dst)

    # =================================================================== batch
    def predict_folder(self) -> None:
        """Segment every TIFF of the input folder into the output folder (background)."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return
        src, dst = self.in_edit.text().strip(), self.out_edit.text().strip()
        if not self._has_model():
            return
        if not src:
            show_error("Choose the folder of TIFF images to segment (Images: Browse…).")
            return
        if not dst:
            show_error("Choose a folder for the results (Results to: Browse…).")
            return
        if self.model_path is not None and self.model_saved:
            model_path = self.model_path
        else:  # the engine reads a model file: write the in-memory model to a temporary one
            # (removed when the batch ends). The same model always gives the same file, so
            # a rerun recognises the results it already made (by the file's digest).
            self._batch_tmp = Path(tempfile.mkdtemp(prefix="cellfit-"))
            model_path = save_model(self._batch_tmp / "model.cellfit", self.model, self.info)
        device = str(next(self.model.parameters()).device)
        job = BatchJob(
            model_path,
            [src],
            dst,
            probabilities=self.prob_check.isChecked(),
            overwrite=self.overwrite_check.isChecked(),
            device=device,
            threads=gui_friendly_threads(torch.device(device)),
            diameter=self._diameter() if self.model_needs_diameter() else None,
        )
        self.seg_status.setText(f"Segmenting the TIFF files of {src}…")
        self._start_job("batch", job, "cellfit: segmenting a folder", self._on_progress,
                        self._on_batch_result)

    def _on_batch_result(self, result: BatchResult) -> None:
        self.last_batch_result = result
        if self._batch_tmp is not None:
            shutil.rmtree(self._batch_tmp, ignore_errors=True)
            self._batch_tmp = None
        if result.error:
            show_error(result.error)
            self.seg_status.setText(f"Folder segmentation failed: {result.error}")
            return
        parts = [f"{result.done} file{'s' if result.done != 1 else ''} segmented"]
        if result.skipped:
            parts.append(
                f"{result.skipped} skipped because their results exist (tick Replace existing "
                "results to redo them)"
            )
        if result.failed:
            parts.append(f"{len(result.failed)} failed")
        head = "Folder segmentation cancelled" if result.cancelled else "Folder done"
        text = f"{head}: {', '.join(parts)}, in {result.seconds:.0f} s. Results are in {result.out_dir}."
        self.seg_status.setText(text)
        show_info(text)
        for name, reason in result.failed:
            show_warning(f"{name} was not segmented: {reason}")

    # =================================================================== model
    def save_model_file(self, path: str | Path) -> Path | None:
        """Save the current model to ``path`` (a .cellfit file)."""
        if self.model is None or self.info is None:
            show_error("There is no model to save yet: train one first.")
            return None
        path = Path(path)
        if path.suffix == "":
            path = path.with_suffix(".cellfit")
        try:
            shipped = path.resolve() == starting_model_path().resolve()
        except CellfitError:
            shipped = False
        if shipped:
            show_error("That file is cellfit's own starting model: save under another name.")
            return None
        try:
            save_model(path, self.model, self.info)
        except (CellfitError, OSError) as exc:
            show_error(f"Could not save the model to {path}: {exc}")
            return None
        self.model_path, self.model_saved = path, True
        self._render_model()
        show_info(f"Saved the model to {path}.")
        return path

    def load_model_file(self, path: str | Path) -> bool:
        """Load a .cellfit model file; it becomes the current model (Train fine-tunes it)."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return False
        try:
            device = resolve_device(self.device_combo.currentData())
            model, info = load_model(path, device)
        except CellfitError as exc:
            show_error(str(exc))
            return False
        self.model, self.info = model, info
        self.model_path, self.model_saved = Path(path), True
        idx = self.mode_combo.findData(info.mode)
        if idx >= 0:
            self.mode_combo.setCurrentIndex(idx)
        self.fresh_check.setChecked(False)
        self._render_model()
        self._update_state()
        show_info(f"Loaded the model {Path(path).name}: Segment uses it, Train fine-tunes it.")
        return True

    def use_starting_model(self) -> bool:
        """Make the shipped starting model the current model, as it is (to segment with
        it, given the cell diameter, or to fine-tune it)."""
        if self.job is not None:
            show_info("Wait for the running job to finish, or press Stop.")
            return False
        if self.model is not None and not self.model_saved:
            show_error(
                "The current model is not saved: save it first (Model tab, Save model…), "
                "then switch to the starting model."
            )
            return False
        try:
            path = starting_model_path()
            model, info = load_model(path, resolve_device(self.device_combo.currentData()))
        except CellfitError as exc:
            show_error(str(exc))
            return False
        self.model, self.info = model, info
        self.model_path, self.model_saved = path, True
        idx = self.mode_combo.findData(info.mode)
        if idx >= 0:
            self.mode_combo.setCurrentIndex(idx)
        self.fresh_check.setChecked(False)
        self._render_model()
        self._update_state()
        show_info(
            "Using the cellfit starting model: give the cell diameter (or press Estimate) "
            "and Segment, or paint a few cells and Train to adapt it to your images."
        )
        return True

    def _save_dialog(self) -> None:
        start = str(self.model_path or Path.home() / "cells.cellfit")
        if self._is_shipped_starting_model():
            start = str(Path.home() / "cells.cellfit")
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the cellfit model", start, "cellfit model (*.cellfit);;All files (*)"
        )
        if path:
            self.save_model_file(path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a cellfit model", str(self.model_path or Path.home()),
            "cellfit model (*.cellfit *.safetensors);;All files (*)",
        )
        if path:
            self.load_model_file(path)

    def _render_model(self) -> None:
        self.model_label.setText(self._model_line())
        self.record_view.setHtml(model_record_html(self.info, self.model_path, self.model_saved))
        self._update_state()

    def _model_line(self) -> str:
        if self.info is None:
            return "<i>No model yet:</i> paint a few cells, then Train (or load a model in the Model tab)."
        last = self.info.training[-1] if self.info.training else {}
        runs = user_runs(self.info.training)
        val = last.get("validation") or {}
        score = f", last validation F1 {val['f1']:.2f}" if "f1" in val else ""
        where = self.model_path.name if self.model_path else "not saved"
        if self.model_path and not self.model_saved:
            where += ", changed since saved"
        if self._is_shipped_starting_model():
            return (
                "<b>Model:</b> the cellfit starting model, as shipped: it works on cells "
                "of any size (give their diameter in Segment); Train adapts it to yours."
            )
        size = ""
        if self.model_needs_diameter():
            size = " Works on cells of any size: give their diameter in Segment."
        return (
            f"<b>Model:</b> {encoder_name(self.info.encoder)}, {runs} training "
            f"run{'s' if runs != 1 else ''}{score} ({where}).{size}"
        )

    # =================================================================== jobs
    def _start_job(self, kind: str, job, desc: str, on_yield, on_return) -> None:
        self.job, self.job_kind = job, kind
        self._job_started = time.perf_counter()
        if kind != "preview":
            self._set_progress(0.0)
            if self.napari_progress is None:
                self.napari_progress = not software_opengl()
            if self.napari_progress:
                self._pbar = progress(total=1000, desc=desc)
        self._live = True  # False once the result is in: late progress is dropped
        worker = thread_worker(job.run, start_thread=False)()
        if on_yield is not None:
            worker.yielded.connect(partial(self._dispatch_yield, on_yield))
        worker.returned.connect(partial(self._dispatch_return, on_return))
        worker.errored.connect(self._on_worker_error)
        worker.finished.connect(self._on_job_finished)
        self.worker = worker
        self._update_state()
        worker.start()

    def _dispatch_yield(self, handler, value) -> None:
        # napari's progress bar processes Qt events when it moves, so the job's result
        # can arrive inside a progress handler: handlers move the bar last, and
        # progress that arrives after the result is ignored
        if self._live:
            handler(value)

    def _dispatch_return(self, handler, value) -> None:
        self._live = False
        handler(value)

    def _set_progress(self, fraction: float) -> None:
        value = round(min(max(fraction, 0.0), 1.0) * 1000)
        bar = self.train_bar if self.job_kind == "train" else self.seg_bar
        bar.setValue(value)
        if self._pbar is not None and value > self._pbar.n:
            self._pbar.update(value - self._pbar.n)

    def _on_worker_error(self, exc: Exception) -> None:  # jobs return errors; this is a bug
        show_error(f"cellfit stopped on an unexpected error ({type(exc).__name__}: {exc}).")

    def _on_job_finished(self) -> None:
        if isinstance(self.job, TrainJob) and self.job.stop_requested_at is not None:
            self.stop_seconds = time.perf_counter() - self.job.stop_requested_at
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.job_kind in ("train", "predict", "batch", "estimate"):
            bar = self.train_bar if self.job_kind == "train" else self.seg_bar
            bar.setValue(bar.maximum())
        self.job, self.job_kind, self.worker = None, None, None
        self._update_state()
        self.update_counts()
        if self._preview_after_training:
            self._preview_after_training = False
            self._preview_kept_model()

    def _preview_kept_model(self) -> None:
        """Refresh the preview of the current slice with the model training kept (its
        best validated weights), quietly, in the background."""
        image = self._layer(self._train_image or "", Image)
        if image is None or self.model is None or self.info is None:
            return
        try:
            job = self._predict_job(image, [self.current_plane(image)])
        except CellfitError:
            return
        self._start_job("preview", job, "", None, self._on_preview_result)

    def _on_preview_result(self, result: PredictResult) -> None:
        image = self._layer(self._predict_image_name, Image)
        if (result.error or result.labels is None or result.probability is None
                or image is None or self._lead(image) != self._predict_lead):
            return
        self._show_prediction(image, result.planes, result.probability, result.labels)

    def stop(self) -> None:
        """Stop training (after the current step) or cancel segmentation."""
        if self.job is None:
            return
        if isinstance(self.job, TrainJob):
            self.job.stop()
            self.train_status.setText("Stopping after this step (the best model so far is kept)…")
        else:
            self.job.cancel()
            self.seg_status.setText("Cancelling…")
        self._update_state()

    def shutdown(self) -> None:
        """Stop or cancel the running job (napari is closing)."""
        if self.job is not None:
            self.stop()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block (processing Qt events) until the running job ends; for scripts and tests."""
        end = time.perf_counter() + timeout
        while self.job is not None and time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.01)
        return self.job is None

    # =================================================================== state
    def _update_state(self, *_args) -> None:
        busy = self.job is not None
        has_image = self.image_layer() is not None
        has_ann = self.annotation_layer() is not None
        has_model = self.model is not None
        plan = self._train_plan()
        fine_tune = plan in ("fine-tune", "adapt")
        self.create_button.setEnabled(has_image)
        name = self.image_combo.currentText()
        self.create_button.setText(
            f"Create annotation layer for '{name}'" if name else "Create annotation layer"
        )
        for b in (self.bg_button, self.cell_button, self.erase_button):
            b.setEnabled(has_image)
        has_prediction = self._layer(f"{name} labels", Labels) is not None
        self.copy_button.setEnabled(
            has_image and has_prediction and not (busy and self.job_kind != "train")
        )
        self.train_button.setEnabled(not busy and has_image)
        self.train_button.setText("Train more (fine-tune)" if fine_tune else "Train")
        self.train_button.setToolTip({
            "fine-tune": "Continue training the current model on your updated annotation.",
            "adapt": "Teach the starting model your cells: it learns from every annotated "
                     "slice, including how big your cells are.",
            "starting": "Train a new model on every annotated slice, starting from the "
                        "cellfit starting model.",
        }.get(plan, "Train a new model on every annotated slice, from random weights."))
        self.stop_button.setEnabled(busy and self.job_kind == "train")
        self.fresh_check.setEnabled(has_model and not busy)
        self.start_combo.setEnabled(not busy and not fine_tune)
        self.start_combo.setToolTip(
            "Train fine-tunes the current model; tick Train a new model to start another."
            if fine_tune
            else START_TIP
        )
        self.mode_combo.setEnabled(not busy and not fine_tune)
        self.encoder_combo.setEnabled(not busy and plan == "scratch")
        if fine_tune:
            tip = "Fine-tuning keeps the current model's size; tick Train a new model to change it."
        elif plan == "starting":
            tip = ("The starting model has its own size (small and fast); choose Start from: "
                   "scratch to pick another.")
        else:
            tip = ("The size of the network. Small is fast on a laptop CPU; larger ones can be "
                   "more accurate given a GPU and more annotation.")
        self.encoder_combo.setToolTip(tip)
        for w in (self.budget_spin, self.budget_unit, self.patch_combo, self.loss_combo,
                  self.weights_combo, self.device_combo, self.preview_check):
            w.setEnabled(not busy)
        self.predict_button.setEnabled(not busy and has_image and has_model)
        self.batch_button.setEnabled(not busy and has_model)
        self.starting_button.setVisible(not has_model)
        self.starting_button.setEnabled(not busy)
        self.load_starting_button.setEnabled(not busy)
        self.diameter_box.setVisible(self.model_needs_diameter())
        self.diameter_spin.setEnabled(not busy)
        self.estimate_button.setEnabled(not busy and has_image)
        self.cancel_button.setEnabled(busy and self.job_kind in ("predict", "batch"))
        image = self.image_layer()
        self.slices_combo.setEnabled(not busy and image is not None and bool(self._lead(image)))
        self.save_button.setEnabled(has_model and not busy)
        self.load_button.setEnabled(not busy)
        if not has_ann and has_image and self.count_label.text() == "No annotation yet.":
            self.count_label.setText("No annotation layer yet: press Create annotation layer.")
