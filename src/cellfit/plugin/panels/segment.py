"""3 Segment: the chosen image (all slices or the one on screen), a folder of TIFFs, and
the cell diameter a model that works on cells of any size must be told."""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from napari.layers import Image
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cellfit.errors import CellfitError
from cellfit.model import save_model
from cellfit.plugin._display import number
from cellfit.plugin._layers import (
    find_layer,
    layer_data,
    layer_stack_shape,
    plane_of,
    show_prediction,
)
from cellfit.plugin._layout import WrapCheckBox, flow_row
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import CHOICES, ROWS, TIPS, WHY_OFF
from cellfit.plugin.jobs import (
    BatchJob,
    BatchResult,
    DiameterJob,
    DiameterResult,
    PredictResult,
)
from cellfit.plugin.panels._base import Panel, combo, enable, first, row_label

__all__ = ["SegmentPanel"]


class SegmentPanel(Panel):
    """The Segment tab.

    ``starting_button`` (Use the starting model as is) is wired by the dock to the
    Model tab, which loads it. ``last_predict_result``, ``last_batch_result`` and
    ``last_diameter_result`` hold the last results (for tests and scripts).
    """

    def __init__(self, state: CellfitState, runner: JobRunner) -> None:
        super().__init__(state, runner)
        self.last_predict_result: PredictResult | None = None
        self.last_batch_result: BatchResult | None = None
        self.last_diameter_result: DiameterResult | None = None
        self._image_name = ""  # the image being segmented
        self._stack: tuple[int, ...] = ()  # its stack axes when segmenting started
        self._estimate_image = ""
        self._batch_tmp: Path | None = None

        lay = QVBoxLayout(self)
        self.starting_button = QPushButton("Use the starting model as is")
        self.starting_button.setToolTip(TIPS["use_starting"])
        lay.addWidget(self.starting_button)
        lay.addWidget(self._build_diameter())
        self.tta_check = WrapCheckBox(ROWS["tta"])
        self.tta_check.setChecked(self.state.tta)
        self.tta_check.setToolTip(TIPS["tta"])
        self.tta_check.toggled.connect(self._on_tta_changed)
        lay.addWidget(self.tta_check)
        lay.addWidget(self._build_image())
        lay.addWidget(self._build_folder())

        row = QHBoxLayout()
        self.seg_bar = QProgressBar()
        self.seg_bar.setRange(0, 1000)
        self.seg_bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(TIPS["cancel"])
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.seg_bar, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.seg_status = QLabel("")
        self.seg_status.setWordWrap(True)
        lay.addWidget(self.seg_status)
        lay.addStretch(1)

    def _build_diameter(self) -> QWidget:
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
        self.diameter_spin.setToolTip(TIPS["diameter"])
        self.diameter_spin.valueChanged.connect(self._on_diameter_changed)
        self.estimate_button = QPushButton("Estimate")
        self.estimate_button.setToolTip(TIPS["estimate"])
        self.estimate_button.clicked.connect(self.estimate_diameter)
        # the box and Estimate go on two lines in a narrow dock
        dform.addRow(row_label("diameter"), flow_row(self.diameter_spin, self.estimate_button))
        return self.diameter_box

    def _build_image(self) -> QGroupBox:
        box = QGroupBox("The selected image")
        form = QFormLayout(box)
        self.slices_combo = combo(CHOICES["slices"], TIPS["slices"])
        form.addRow(row_label("slices"), self.slices_combo)
        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(0, 100_000)
        self.min_size_spin.setValue(0)
        self.min_size_spin.setSpecialValueText("automatic")  # from your cells: its tooltip
        self.min_size_spin.setSuffix(" pixels")
        self.min_size_spin.setToolTip(TIPS["min_size"])
        self.min_size_spin.valueChanged.connect(self._on_min_size_changed)
        form.addRow(row_label("min_size"), self.min_size_spin)
        self.predict_button = QPushButton("Segment image")
        self.predict_button.setToolTip(TIPS["predict"])
        self.predict_button.clicked.connect(self.predict_image)
        form.addRow(self.predict_button)
        return box

    def _build_folder(self) -> QGroupBox:
        box = QGroupBox("A folder of TIFF files")
        form = QFormLayout(box)
        self.in_edit, in_row = self._folder_row(TIPS["inputs"])
        form.addRow(row_label("inputs"), in_row)
        self.out_edit, out_row = self._folder_row(TIPS["out"])
        form.addRow(row_label("out"), out_row)
        self.prob_check = WrapCheckBox("Also save probability maps")
        self.prob_check.setToolTip(TIPS["probabilities"])
        form.addRow(self.prob_check)
        self.overwrite_check = WrapCheckBox("Replace existing results")
        self.overwrite_check.setChecked(False)  # as `cellfit predict`: finished files are kept
        self.overwrite_check.setToolTip(TIPS["overwrite"])
        form.addRow(self.overwrite_check)
        self.measure_check = WrapCheckBox(ROWS["measure_batch"])
        self.measure_check.setToolTip(TIPS["measure_batch"])
        form.addRow(self.measure_check)
        self.batch_button = QPushButton("Segment folder")
        self.batch_button.setToolTip(TIPS["batch"])
        self.batch_button.clicked.connect(self.predict_folder)
        form.addRow(self.batch_button)
        # the files the last batch could not segment, each with its reason
        self.failed_label = QLabel()
        self.failed_label.setWordWrap(True)
        self.failed_list = QListWidget()
        self.failed_list.setWordWrap(True)
        # a line between one file and the next (alternating colours are unreadable in
        # napari's dark theme)
        self.failed_list.setStyleSheet(
            "QListWidget::item { border-bottom: 1px solid palette(mid); padding: 3px 0; }"
        )
        self.failed_list.setMaximumHeight(140)
        self.failed_list.setToolTip(TIPS["failed"])
        form.addRow(self.failed_label)
        form.addRow(self.failed_list)
        self.show_failed([])
        return box

    def show_failed(self, failed: list[tuple[str, str]]) -> None:
        """List the files a batch could not segment, each with its reason (hidden
        when none failed)."""
        self.failed_list.clear()
        for name, reason in failed:
            text = reason[:1].upper() + reason[1:]
            if name not in reason:
                text = f"{name}: {text}"
            item = QListWidgetItem(text)
            item.setToolTip(text)
            self.failed_list.addItem(item)
        n = len(failed)
        self.failed_label.setText(
            f"{n} file{'s were' if n != 1 else ' was'} not segmented:" if n else ""
        )
        self.failed_label.setVisible(bool(n))
        self.failed_list.setVisible(bool(n))

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

    # -------------------------------------------------- settings shared with Train
    def _on_diameter_changed(self, value: float) -> None:
        self.state.diameter = float(value) if value > 0 else None

    def _on_min_size_changed(self, value: int) -> None:
        self.state.min_size = int(value)

    def _on_tta_changed(self, checked: bool) -> None:
        self.state.tta = bool(checked)

    def _has_model(self) -> bool:
        """True when there is a model to segment with; otherwise say how to get one."""
        if not self.state.has_model:
            self.error(
                "There is no model yet: train one (Train tab), load a model file (Model "
                "tab) or press Use the starting model as is."
            )
            return False
        return True

    # ---------------------------------------------------------- the chosen image
    def predict_image(self) -> None:
        """Segment the selected image (all slices or the current one) in the background."""
        image = self.image_for_a_job()
        if image is None:
            return
        if not self._has_model():
            return
        which = None
        if layer_stack_shape(image) and self.slices_combo.currentData() == "current":
            which = [self.state.current_plane(image)]
        try:
            job = self.state.predict_job(image, which)
        except CellfitError as exc:
            self.error(str(exc))
            return
        self._image_name, self._stack = image.name, layer_stack_shape(image)
        self.seg_status.setText(f"Segmenting '{image.name}'…")
        self.runner.start("predict", job, self._on_predict_result, on_yield=self._on_progress,
                          bar=self.seg_bar, desc="cellfit: segmenting")

    def _on_progress(self, pr) -> None:
        if pr.notice:
            show_info(pr.notice)
        self.seg_status.setText(pr.text)
        self.runner.set_progress(pr.fraction)

    def _on_predict_result(self, result: PredictResult) -> None:
        self.last_predict_result = result
        if result.error:
            self.error(result.error)
            self.seg_status.setText(f"Segmentation failed: {result.error}")
            return
        if result.cancelled or result.labels is None or result.probability is None:
            self.seg_status.setText("Segmentation cancelled.")
            return
        image = find_layer(self.state.viewer, self._image_name, Image)
        if image is None or layer_stack_shape(image) != self._stack:
            self.seg_status.setText("The image was closed or changed before segmentation ended.")
            return
        if result.diameter is not None:  # estimated: shown, and used from now on
            self.diameter_spin.setValue(result.diameter)
        show_prediction(self.state.viewer, image, result.planes, result.probability,
                        result.labels, self.state.annotation_layer(),
                        colors=self.state.model_class_colors(),
                        class_prob=result.class_probability)
        n_cells = sum(len(np.unique(lab)) - (1 if (lab == 0).any() else 0) for lab in result.labels)
        info = self.state.info
        what = "cells" if info is None or info.mode == "instances" else "labelled regions"
        where = "" if len(result.planes) == 1 else f" in {len(result.planes)} slices"
        if self.state.model_needs_diameter() and self.state.diameter:
            where += f", cell diameter {self.state.diameter:g} pixels"
        text = (
            f"Segmented '{image.name}' in {result.seconds:.1f} s: {number(n_cells)} {what}"
            f"{where}. See the '{image.name} labels' and '{image.name} probability' layers."
        )
        self.seg_status.setText(text)
        show_info(text)

    # ----------------------------------------------------------- cell diameter
    def estimate_diameter(self) -> None:
        """Estimate the cell diameter on the slice on screen, in the background."""
        image = self.image_for_a_job()
        if image is None:
            return
        if not self._has_model():
            return
        if not self.state.model_needs_diameter():
            show_info(
                "This model learnt the size of your cells when it was trained: it needs "
                "no cell diameter."
            )
            return
        plane = self.state.current_plane(image)
        raw = plane_of(layer_data(image), plane, image.rgb)
        threads = self.state.threads(self.state.model_device())
        job = DiameterJob(self.state.model, self.state.info, raw, threads=threads)
        self._estimate_image = image.name
        self.seg_status.setText(f"Estimating the cell diameter on '{image.name}'…")
        self.runner.start("estimate", job, self._on_diameter_result, on_yield=self._on_progress,
                          bar=self.seg_bar, desc="cellfit: estimating the cell diameter")

    def _on_diameter_result(self, result: DiameterResult) -> None:
        self.last_diameter_result = result
        if result.error or result.diameter is None:
            msg = result.error or "The cell diameter could not be estimated."
            self.error(msg)
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

    # ------------------------------------------------------------------ folder
    def predict_folder(self) -> None:
        """Segment every TIFF of the input folder into the output folder (background)."""
        if self.refuse_while_busy():
            return
        src, dst = self.in_edit.text().strip(), self.out_edit.text().strip()
        if not self._has_model():
            return
        if not src:
            self.error("Choose the folder of TIFF images to segment (Images: Browse…).")
            return
        if not dst:
            self.error("Choose a folder for the results (Results to: Browse…).")
            return
        state = self.state
        if state.model_path is not None and state.model_saved:
            model_path = state.model_path
        else:  # the engine reads a model file: write the in-memory model to a temporary one
            # (removed when the batch ends). The same model always gives the same file, so
            # a rerun recognises the results it already made (by the file's digest).
            self._batch_tmp = Path(tempfile.mkdtemp(prefix="cellfit-"))
            model_path = save_model(self._batch_tmp / "model.cellfit", state.model, state.info)
        device = str(state.model_device())
        job = BatchJob(
            model_path,
            [src],
            dst,
            probabilities=self.prob_check.isChecked(),
            overwrite=self.overwrite_check.isChecked(),
            device=device,
            threads=state.threads(torch.device(device)),
            diameter=state.segment_diameter(),
            tta=state.tta,
            measure=self.measure_check.isChecked(),
        )
        self.show_failed([])
        self.seg_status.setText(f"Segmenting the TIFF files of {src}…")
        self.runner.start("batch", job, self._on_batch_result, on_yield=self._on_progress,
                          bar=self.seg_bar, desc="cellfit: segmenting a folder")

    def _on_batch_result(self, result: BatchResult) -> None:
        self.last_batch_result = result
        if self._batch_tmp is not None:
            shutil.rmtree(self._batch_tmp, ignore_errors=True)
            self._batch_tmp = None
        if result.error:
            self.error(result.error)
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
        if result.measured:
            text += _measured_text(result.flagged)
        self.seg_status.setText(text)
        show_info(text)
        self.show_failed(result.failed)
        if len(result.failed) == 1:
            name, reason = result.failed[0]
            self.warning(f"{name} was not segmented: {reason}")
        elif result.failed:
            names = ", ".join(name for name, _ in result.failed[:3])
            more = ", …" if len(result.failed) > 3 else ""
            self.warning(
                f"{len(result.failed)} files were not segmented ({names}{more}): the list "
                "under Segment folder (Segment tab) says why for each."
            )

    def cancel(self) -> None:
        """Cancel the running segmentation (finished files are kept)."""
        if self.runner.job is None:
            return
        self.runner.cancel()
        self.seg_status.setText("Cancelling…")

    # ---------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        busy = self.busy_why()
        image = self.state.image_layer()
        no_image = None if image is not None else WHY_OFF["no_image"]
        has_model = self.state.model is not None
        no_model = None if has_model else WHY_OFF["no_model"]
        enable(self.predict_button, first(busy, no_image, no_model), TIPS["predict"])
        enable(self.batch_button, first(busy, no_model), TIPS["batch"])
        self.starting_button.setVisible(not has_model)
        enable(self.starting_button, busy, TIPS["use_starting"])
        self.diameter_box.setVisible(self.state.model_needs_diameter())
        enable(self.diameter_spin, busy, TIPS["diameter"])
        enable(self.tta_check, busy, TIPS["tta"])
        enable(self.measure_check, busy, TIPS["measure_batch"])
        enable(self.estimate_button, first(busy, no_image), TIPS["estimate"])
        segmenting = self.runner.busy and self.runner.kind in ("predict", "batch")
        enable(self.cancel_button, None if segmenting else WHY_OFF["not_segmenting"],
               TIPS["cancel"])
        one = None if image is None or layer_stack_shape(image) else WHY_OFF["one_slice"]
        enable(self.slices_combo, first(busy, no_image, one), TIPS["slices"])


def _measured_text(flagged: list[tuple[str, str]]) -> str:
    """What a folder segmentation with measurements adds to its summary sentence."""
    text = " Cells measured: a _cells.csv table per file, and summary.csv (a row per file)"
    if not flagged:
        return text + "; nothing looks unusual."
    names = ", ".join(name for name, _ in flagged[:3]) + (", …" if len(flagged) > 3 else "")
    return text + f"; check first: {names} (summary.csv says why)."
