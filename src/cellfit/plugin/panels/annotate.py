"""1 Annotate: the annotation layer of the chosen image, its brushes, what is painted,
copying a prediction into the annotation to correct it, and where to paint next
(:mod:`cellfit.plugin.panels.suggest`)."""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Callable

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from cellfit.errors import CellfitError
from cellfit.plugin._display import number
from cellfit.plugin._layers import (
    add_annotation_layer,
    count_annotation,
    find_layer,
    labels_shape,
    layer_stack_shape,
    next_free_id,
    prediction_to_annotation,
    stack_position,
)
from cellfit.plugin._layout import WrapButton, WrapCheckBox, flow_row
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import TIPS, WHY_OFF
from cellfit.plugin.panels._base import (
    NO_IMAGE,
    Panel,
    enable,
    first,
    row_label,
    shrinkable,
    small_label,
)
from cellfit.plugin.panels.suggest import SuggestPanel

__all__ = ["AnnotatePanel"]

NO_LAYER = "No annotation layer yet: press Create annotation layer."


#: what to paint, by mode (instances: cells; semantic: classes)
HOW = {
    "instances": "Paint a few cells whole, each with its own id (New cell), and some background "
    "around them. Unpainted pixels are ignored, so you never need to paint everything. In a "
    "stack, paint any slices you like. Tip: outline a cell, then fill it with the bucket (F).",
    "semantic": "Pick a class in the list above and paint a few of its objects or regions, "
    "then the next class; paint some background too. Unpainted pixels are ignored, so you "
    "never need to paint everything. Every class needs some painted pixels, the rare ones "
    "too. Tip: outline an object, then fill it with the bucket (F).",
}
#: how to correct a prediction, by mode
CORRECT = {
    "instances": "After training or segmenting, delete the wrong cells from the '… labels' "
    "layer (bucket fill with 0, or the eraser), then copy the rest into your annotation as "
    "new cells. Fix what is still wrong, and press Train again.",
    "semantic": "After training or segmenting, delete the wrong regions from the '… labels' "
    "layer (bucket fill with 0, or the eraser), then copy the rest into your annotation "
    "with their classes. Repaint what has the wrong class, and press Train again.",
}


class AnnotatePanel(Panel):
    """The Annotate tab.

    Parameters
    ----------
    state, runner
        The dock's shared state and job runner.
    training_mode : callable
        What the painted values mean now, "instances" or "semantic" (the Train tab's
        choice, or the mode of the model Train goes on with): the counts follow it.
    """

    def __init__(
        self, state: CellfitState, runner: JobRunner, training_mode: Callable[[], str]
    ) -> None:
        super().__init__(state, runner)
        self.training_mode = training_mode
        self._watched: Labels | None = None
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(250)
        self._count_timer.timeout.connect(self.update_counts)
        runner.finished.connect(self.update_counts)

        lay = QVBoxLayout(self)
        self.create_button = WrapButton("Create annotation layer")
        self.create_button.setToolTip(TIPS["create"])
        self.create_button.clicked.connect(self.create_annotation_layer)
        lay.addWidget(self.create_button)

        form = QFormLayout()
        self.ann_combo = shrinkable()
        self.ann_combo.setToolTip(TIPS["annotation"])
        self.ann_combo.currentIndexChanged.connect(self._on_annotation_changed)
        form.addRow(row_label("annotation"), self.ann_combo)
        lay.addLayout(form)

        self.bg_button = QPushButton("Background brush")
        self.bg_button.setToolTip(TIPS["background"])
        self.bg_button.clicked.connect(self.background_brush)
        self.cell_button = QPushButton("New cell")
        self.cell_button.setToolTip(TIPS["new_cell"])
        self.cell_button.clicked.connect(self.new_cell)
        self.erase_button = QPushButton("Eraser")
        self.erase_button.setToolTip(TIPS["eraser"])
        self.erase_button.clicked.connect(self.eraser)
        # the brushes go on two lines in a narrow dock
        lay.addWidget(flow_row(self.bg_button, self.cell_button, self.erase_button))

        self.count_label = QLabel("No annotation yet.")
        self.count_label.setWordWrap(True)
        self.count_label.setToolTip(TIPS["counts"])
        lay.addWidget(self.count_label)
        self.how_label = small_label(HOW["instances"])
        lay.addWidget(self.how_label)
        lay.addWidget(self._build_correct())
        # where to paint next: the model's doubt, boxes to paint, cells to accept
        self.suggest_panel = SuggestPanel(
            state, runner, require_annotation=self._require_annotation,
            painted=self.update_counts,
        )
        self.suggest_panel.said.connect(self.said)
        lay.addWidget(self.suggest_panel)
        lay.addStretch(1)

    def _build_correct(self) -> QGroupBox:
        box = QGroupBox("Correct a prediction")
        blay = QVBoxLayout(box)
        self.correct_label = small_label(CORRECT["instances"])
        blay.addWidget(self.correct_label)
        self.ring_check = WrapCheckBox("Add a background ring around them")
        self.ring_check.setChecked(True)
        self.ring_check.setToolTip(TIPS["ring"])
        blay.addWidget(self.ring_check)
        self.copy_button = QPushButton("Use prediction as annotation")
        self.copy_button.setToolTip(TIPS["copy"])
        self.copy_button.clicked.connect(self.use_prediction_as_annotation)
        blay.addWidget(self.copy_button)
        return box

    # ------------------------------------------------------- the annotation layer
    def annotation_layer(self) -> Labels | None:
        """The annotation layer chosen in this tab."""
        return self.state.annotation_layer()

    def refresh_choices(self) -> None:
        """Refill the annotation list: the Labels layers of the chosen image's size,
        '<image> annotation' first (and chosen when the choice is not another one).

        '<image> labels', where the dock writes its segmentation, is never offered: it
        is overwritten by every training preview and segmentation, and picking it
        would count predicted cells as painted ones ("use prediction as annotation"
        copies it into the annotation instead)."""
        image = self.state.image_layer()
        current = self.ann_combo.currentText()
        self.ann_combo.blockSignals(True)
        self.ann_combo.clear()
        if image is not None:
            shape = labels_shape(image)
            names = [
                layer.name
                for layer in self.state.viewer.layers
                if isinstance(layer, Labels)
                and tuple(layer.data.shape) == shape
                and layer.name != f"{image.name} labels"
            ]
            default = f"{image.name} annotation"
            names.sort(key=lambda n: (n != default, n))
            self.ann_combo.addItems(names)
            if current in names and current != "" and (default not in names or current == default):
                self.ann_combo.setCurrentText(current)
            elif default in names:
                self.ann_combo.setCurrentText(default)
        self.ann_combo.blockSignals(False)
        self._on_annotation_changed()

    def _on_annotation_changed(self, *_args) -> None:
        self.state.annotation_name = self.ann_combo.currentText()
        layer = self.annotation_layer()
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.paint.disconnect(self.schedule_count)
                self._watched.events.data.disconnect(self.schedule_count)
            if layer is not None:
                layer.events.paint.connect(self.schedule_count)
                layer.events.data.connect(self.schedule_count)
            self._watched = layer
        self.update_counts()
        self.update_controls()

    def create_annotation_layer(self) -> Labels | None:
        """Add '<image> annotation' (or select it if it exists) with painting defaults."""
        viewer = self.state.viewer
        image = self.state.image_layer()
        if image is None:
            self.error(NO_IMAGE)
            return None
        name = f"{image.name} annotation"
        shape = labels_shape(image)
        if name in viewer.layers and tuple(viewer.layers[name].data.shape) == shape:
            layer = viewer.layers[name]
        else:
            if name in viewer.layers:
                name = f"{name} {len(viewer.layers)}"
            layer = add_annotation_layer(viewer, image, name)
        layer.n_edit_dimensions = 2  # paint the slice on screen only
        ymax, xmax = shape[-2:]
        layer.brush_size = int(max(3, round(min(ymax, xmax) / 64)))
        layer.selected_label = next_free_id(layer)
        layer.mode = "paint"
        viewer.layers.selection.active = layer
        self.refresh_choices()
        self.ann_combo.setCurrentText(layer.name)
        if self.training_mode() == "semantic":
            show_info(
                f"Paint classes on '{layer.name}': click a class in the class list (or New "
                "class), Background brush for background. Unpainted pixels are ignored."
            )
        else:
            show_info(
                f"Paint cells on '{layer.name}': New cell for each cell, Background brush "
                "for background. Unpainted pixels are ignored."
            )
        return layer

    def _require_annotation(self) -> Labels | None:
        layer = self.annotation_layer()
        if layer is None:
            layer = self.create_annotation_layer()
        return layer

    # ---------------------------------------------------------------- brushes
    def _paint_with(self, layer: Labels, mode: str) -> None:
        layer.mode = mode
        self.state.viewer.layers.selection.active = layer

    def background_brush(self) -> None:
        """Select the annotation layer and paint background (1)."""
        layer = self._require_annotation()
        if layer is None:
            return
        layer.selected_label = 1
        self._paint_with(layer, "paint")

    def new_cell(self) -> None:
        """Select the annotation layer and paint with the next free cell id."""
        layer = self._require_annotation()
        if layer is None:
            return
        new_id = next_free_id(layer)
        if layer.data.dtype.kind in "ui" and new_id > np.iinfo(layer.data.dtype).max:
            self.error(
                f"The annotation layer holds {layer.data.dtype} values and cannot take a cell "
                f"id above {new_id - 1}: no more cells can be added to it."
            )
            return
        layer.selected_label = new_id
        self._paint_with(layer, "paint")

    def eraser(self) -> None:
        layer = self._require_annotation()
        if layer is None:
            return
        self._paint_with(layer, "erase")

    # ----------------------------------------------------------------- counts
    def schedule_count(self, event=None) -> None:
        """Count again shortly (painting sends many events)."""
        self._count_timer.start()

    def update_counts(self, *_args) -> None:
        """Show how much is annotated (the engine's counts)."""
        layer = self.annotation_layer()
        image = self.state.image_layer()
        if layer is None or image is None:
            self.count_label.setText(NO_LAYER)
            return
        mode = self.training_mode()
        ann = np.asarray(layer.data)
        s = count_annotation(ann, mode)
        what = "cell" if mode == "instances" else "object"
        cells = f"{number(s['cells'])} {what}{'s' if s['cells'] != 1 else ''}"
        text = (
            f"Annotated: <b>{cells}</b> and <b>{number(s['background_pixels'])}</b> "
            "background pixels"
        )
        if layer_stack_shape(image):
            text += f" in {s['planes']} slice{'s' if s['planes'] != 1 else ''}"
            plane = self.state.current_plane(image)
            here = count_annotation(ann.reshape(-1, *ann.shape[-2:])[plane], mode)
            text += f" (this slice: {here['cells']} {what}{'s' if here['cells'] != 1 else ''})"
        text += "."
        if s["annotated_pixels"] and mode == "instances" and s["cells"] == 0:
            text += " Now paint some cells (New cell)."
        elif s["cells"] and s["background_pixels"] == 0:
            text += " Now paint some background (Background brush)."
        self.count_label.setText(text)

    # ------------------------------------------------------ correct a prediction
    def use_prediction_as_annotation(self) -> int:
        """Copy the predicted cells of the current slice into the annotation (undoable).

        Returns the number of cells copied.
        """
        image = self.state.image_layer()
        if image is None:
            self.error(NO_IMAGE)
            return 0
        pred = find_layer(self.state.viewer, f"{image.name} labels", Labels)
        if pred is None:
            self.error(
                f"There is no '{image.name} labels' layer yet: train (with live preview) or "
                "segment the image first."
            )
            return 0
        layer = self._require_annotation()
        if layer is None:
            return 0
        position = stack_position(self.state.current_plane(image), layer_stack_shape(image))
        old = np.asarray(layer.data[position])
        try:
            new, n = prediction_to_annotation(
                old, np.asarray(pred.data[position]), ring=2 if self.ring_check.isChecked() else 0,
                semantic=self.training_mode() == "semantic",
            )
        except CellfitError as exc:
            self.error(str(exc))
            return 0
        if n == 0:
            show_info(
                "No predicted cell to copy on this slice: they are all painted already or "
                "were deleted."
            )
            return 0
        yy, xx = np.nonzero(new != old)
        index = (*(np.full(yy.shape, i) for i in position), yy, xx)
        layer.data_setitem(index, new[yy, xx])  # one undoable edit (Ctrl+Z)
        layer.selected_label = next_free_id(layer)
        self.state.viewer.layers.selection.active = layer
        self.update_counts()
        what = "region" if self.training_mode() == "semantic" else "cell"
        show_info(
            f"Copied {n} predicted {what}{'s' if n != 1 else ''} into '{layer.name}'. Fix what "
            "is wrong, then press Train to fine-tune."
        )
        return n

    # ---------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        has_image = self.state.image_layer() is not None
        name = self.state.image_name
        no_image = None if has_image else WHY_OFF["no_image"]
        enable(self.create_button, no_image, TIPS["create"])
        self.create_button.setText(
            f"Create annotation layer for '{name}'" if name else "Create annotation layer"
        )
        semantic = self.training_mode() == "semantic"
        self.cell_button.setText("New class" if semantic else "New cell")
        self.how_label.setText(HOW[self.training_mode()])
        self.correct_label.setText(CORRECT[self.training_mode()])
        cell_tip = "new_class" if semantic else "new_cell"
        for b, key in ((self.bg_button, "background"), (self.cell_button, cell_tip),
                       (self.erase_button, "eraser")):
            enable(b, no_image, TIPS[key])
        has_prediction = find_layer(self.state.viewer, f"{name} labels", Labels) is not None
        other_job = self.runner.busy and self.runner.kind != "train"
        enable(self.copy_button, first(
            no_image,
            None if has_prediction else WHY_OFF["no_prediction"].format(image=name),
            self.busy_why() if other_job else None,
        ), TIPS["copy"])
        no_layer = self.annotation_layer() is None
        if no_layer and has_image and self.count_label.text() == "No annotation yet.":
            self.count_label.setText(NO_LAYER)
        self.suggest_panel.update_controls()
