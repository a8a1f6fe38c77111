"""The classes of semantic mode: a list of names and colours, one row per painted
value, shown above the tabs (so it is the legend while painting and while looking at
results). Click a row to paint that class (and to show its probability); edit a name
in place; double-click a colour to change it. The validation's IoU of each class
appears next to its name.

The names and colours live in :class:`~cellfit.plugin._state.CellfitState`
(``class_names``, ``class_colors``, background first); training takes them into its
:class:`~cellfit.train.TrainConfig`, and a semantic model loaded or trained gives its
own. They colour the annotation layer and the predicted class map.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Callable

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from cellfit.model import is_color
from cellfit.plugin._display import class_map_colormap
from cellfit.plugin._layers import color_annotation, find_layer
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import TIPS
from cellfit.plugin.panels._base import Panel, small_label
from cellfit.train import class_ious

__all__ = ["ClassesPanel"]

#: rows shown before the list scrolls (31 classes stay usable in a short window)
VISIBLE_ROWS = 6
COLOR, NAME, IOU = 0, 1, 2


class ClassesPanel(Panel):
    """The class list (semantic mode only; hidden otherwise).

    Parameters
    ----------
    state, runner
        The dock's shared state and job runner.
    training_mode : callable
        What the painted values mean now, "instances" or "semantic".
    """

    def __init__(
        self, state: CellfitState, runner: JobRunner, training_mode: Callable[[], str]
    ) -> None:
        super().__init__(state, runner)
        self.training_mode = training_mode
        self._filling = False
        self.ious: dict[str, float] = {}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.title = small_label(
            "Classes: click one to paint it; double-click a name to rename it, a colour "
            "to change it."
        )
        lay.addWidget(self.title)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["", "Class", "IoU"])
        self.table.setToolTip(TIPS["classes"])
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        head = self.table.horizontalHeader()
        head.setSectionResizeMode(COLOR, QHeaderView.ResizeMode.Fixed)
        head.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        head.setSectionResizeMode(IOU, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setColumnWidth(COLOR, 22)
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.verticalHeader().setToolTip("The value painted for the class")
        self.table.setMaximumHeight(24 + 20 * VISIBLE_ROWS)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellClicked.connect(self._on_clicked)
        self.table.cellDoubleClicked.connect(self._on_double_clicked)
        lay.addWidget(self.table)
        self.add_button = QPushButton("Add class")
        self.add_button.setToolTip(TIPS["add_class"])
        self.add_button.clicked.connect(self.add_class)
        lay.addWidget(self.add_button)
        self.setVisible(False)

    # ------------------------------------------------------------------ rows
    def n_classes(self) -> int:
        """Classes listed (background included): those named, painted, or of the model."""
        n = max(len(self.state.class_names), 2)
        info = self.state.info
        if info is not None and info.mode == "semantic":
            n = max(n, info.n_classes)
        layer = self.state.annotation_layer()
        if layer is not None and layer.data.size:
            n = max(n, int(np.max(layer.data)))  # painted value k + 1 is class k
        return n

    def refresh(self, *_args) -> None:
        """Show or hide the list for the mode, refill it and recolour the layers."""
        semantic = self.training_mode() == "semantic"
        self.setVisible(semantic)
        layer = self.state.annotation_layer()
        if not semantic:
            if layer is not None and isinstance(layer.colormap, DirectLabelColormap):
                color_annotation(layer, None)
            return
        names, colors = self.state.classes_for(self.n_classes())
        self.state.class_names, self.state.class_colors = names, colors
        self._filling = True
        self.table.setRowCount(len(names))
        self.table.setVerticalHeaderLabels([str(k + 1) for k in range(len(names))])
        for k, (name, color) in enumerate(zip(names, colors)):
            swatch = QTableWidgetItem()
            swatch.setBackground(QColor(color))
            swatch.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            swatch.setToolTip(f"{color}: double-click to change")
            self.table.setItem(k, COLOR, swatch)
            item = QTableWidgetItem(name)
            flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            if k > 0:  # background keeps its name
                flags |= Qt.ItemFlag.ItemIsEditable
            item.setFlags(flags)
            self.table.setItem(k, NAME, item)
            iou = self.ious.get(name)
            cell = QTableWidgetItem("" if iou is None else f"{iou:.2f}")
            cell.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            self.table.setItem(k, IOU, cell)
        self._filling = False
        self.apply_colors()

    def apply_colors(self) -> None:
        """Colour the annotation layer and the predicted class map by class."""
        colors = self.state.class_colors
        layer = self.state.annotation_layer()
        if layer is not None:
            color_annotation(layer, colors)
        pred = find_layer(self.state.viewer, f"{self.state.image_name} labels", Labels)
        if pred is not None and isinstance(pred.colormap, DirectLabelColormap):
            pred.colormap = class_map_colormap(colors)

    # --------------------------------------------------------------- editing
    def set_name(self, k: int, name: str) -> None:
        """Rename class ``k`` (1 or more; painted value k + 1)."""
        name = name.strip()
        if k < 1 or not name or name in self.state.class_names[:k] + self.state.class_names[k + 1:]:
            self.refresh()  # an empty or repeated name is not taken
            return
        self.state.set_class(k, name=name[:200])
        self.refresh()
        if self.state.info is not None:  # the Model tab and the top line say "not saved"
            self.model_changed.emit()

    def set_color(self, k: int, color: str) -> None:
        """Colour class ``k`` (0 background) with ``color`` ("#rrggbb")."""
        color = color.lower()
        if not is_color(color):
            return
        self.state.set_class(k, color=color)
        self.refresh()

    def add_class(self) -> None:
        """A new class at the end of the list, ready to paint."""
        k = len(self.state.class_names)
        self.state.set_class(k)
        self.refresh()
        self.paint_class(k)

    def paint_class(self, k: int) -> None:
        """Paint class ``k`` (value k + 1) on the annotation layer, and show its
        probability on the class probability layer's slider."""
        layer = self.state.annotation_layer()
        if layer is not None:
            layer.selected_label = k + 1
            layer.mode = "paint"
            self.state.viewer.layers.selection.active = layer
        self.table.selectRow(k)
        viewer = self.state.viewer
        probs = find_layer(viewer, f"{self.state.image_name} class probability", Image)
        if probs is not None and k < probs.data.shape[0]:
            viewer.dims.set_current_step(viewer.dims.ndim - probs.ndim, k)

    def show_validation(self, validation: dict | None) -> None:
        """Show the IoU of each class a validation measured next to its name."""
        ious = class_ious(validation)
        if ious:
            self.ious = ious
            self.refresh()

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if not self._filling and item.column() == NAME:
            self.set_name(item.row(), item.text())

    def _on_clicked(self, row: int, column: int) -> None:
        if column != COLOR:
            self.paint_class(row)

    def _on_double_clicked(self, row: int, column: int) -> None:
        if column != COLOR:
            return
        old = QColor(self.state.class_colors[row])
        new = QColorDialog.getColor(old, self, "Colour of the class")
        if new.isValid():
            self.set_color(row, new.name())

    # -------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        self.refresh()

    def on_model_changed(self) -> None:
        if self.state.info is not None:
            self.state.adopt_classes(self.state.info)
        self.refresh()
