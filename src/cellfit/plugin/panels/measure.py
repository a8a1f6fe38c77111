"""4 Measure: one row per cell of a labels layer (position, size, shape, the image's
intensities), as a sortable table in the dock, as the layer's ``features`` (napari
shows a cell's values when the mouse is over it) and as a CSV file.

Every number is the engine's (:func:`cellfit.measure.measure_plane`, plane after plane
in a :class:`~cellfit.plugin.jobs.MeasureJob`); the CSV is the engine's too
(:func:`cellfit.measure.write_table`, the file ``cellfit predict --measure`` writes).
A table read from such a file (dropped on napari, :mod:`cellfit.plugin.readers`) is
shown here the same way (:meth:`MeasurePanel.show_table`).

A measurements table has a row per cell *and slice*: in a stack, cell ids restart on
each slice. napari's ``features`` are one row per label value, so the labels layer of
a stack carries the rows of the slice on screen, refreshed when the slice changes.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import contextlib
import math
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableView,
    QVBoxLayout,
)

from cellfit.errors import CellfitError
from cellfit.measure import write_table
from cellfit.plugin._display import number
from cellfit.plugin._layers import (
    find_layer,
    labels_shape,
    layer_data,
    plane_number,
    stack_position,
)
from cellfit.plugin._layout import breakable
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import CHOICES, TIPS, WHY_OFF, column_tip
from cellfit.plugin.jobs import MeasureJob, MeasureResult
from cellfit.plugin.panels._base import (
    Panel,
    combo,
    enable,
    first,
    row_label,
    shrinkable,
    small_label,
)

__all__ = ["MeasurePanel", "TableModel", "features_of", "pixel_size_of_layer"]

Table = dict[str, np.ndarray]

#: the columns napari's features leave out: ``index`` (napari's name for the label
#: value) replaces ``id``; the slice is the one on screen
_NOT_FEATURES = ("id", "plane")


def features_of(table: Table, plane: int | None = None) -> dict[str, np.ndarray]:
    """A labels layer's ``features`` from a measurements ``table``: one row per cell
    of ``plane`` (all rows when None), the label value in napari's ``index`` column."""
    rows = np.ones(len(table["id"]), bool)
    if plane is not None and "plane" in table:
        rows = np.asarray(table["plane"]) == plane
    out = {"index": np.asarray(table["id"])[rows]}
    for col, values in table.items():
        if col not in _NOT_FEATURES:
            out[col] = np.asarray(values)[rows]
    return out


def pixel_size_of_layer(layer) -> tuple[tuple[float, float] | None, str | None]:
    """The size of a pixel (y, x) and its unit from a layer's scale and units, when the
    layer is calibrated in a length (napari's default, 1 pixel, gives None)."""
    units = getattr(layer, "units", None)
    if not units:
        return None, None
    unit = str(units[-1])
    if unit in ("pixel", "pixels", "") or str(units[-2]) != unit:
        return None, None
    scale = tuple(float(s) for s in layer.scale[-2:])
    if not all(math.isfinite(s) and s > 0 for s in scale):
        return None, None
    return (scale[0], scale[1]), unit


def _cell_text(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return ""
    if v.is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


class TableModel(QAbstractTableModel):
    """A measurements table for a ``QTableView``: sortable by any column (the header's
    tooltips say what each column holds). ``row_of(view_row)`` is the table's row."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.table: Table = {}
        self.columns: list[str] = []
        self.order = np.zeros(0, np.int64)

    def set_table(self, table: Table | None) -> None:
        self.beginResetModel()
        self.table = dict(table or {})
        self.columns = list(self.table)
        n = len(next(iter(self.table.values()))) if self.table else 0
        self.order = np.arange(n)
        self.endResetModel()

    def row_of(self, view_row: int) -> int:
        return int(self.order[view_row])

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 (Qt's API)
        return 0 if parent.isValid() else len(self.order)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            col = self.columns[index.column()]
            return _cell_text(self.table[col][self.order[index.row()]])
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation, role: int = Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.columns[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return column_tip(self.columns[section])
        return None

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        if not 0 <= column < len(self.columns):
            return
        self.layoutAboutToBeChanged.emit()
        values = np.asarray(self.table[self.columns[column]])
        if values.dtype.kind == "f":  # NaN last either way
            keys = np.where(np.isnan(values), np.inf, values)
        else:
            keys = values.astype(np.float64)
        self.order = np.argsort(keys, kind="stable")
        if order == Qt.SortOrder.DescendingOrder:
            self.order = self.order[::-1]
        self.layoutChanged.emit()


class MeasurePanel(Panel):
    """The Measure tab.

    ``table`` is the table shown (None: none) and ``table_layer`` the name of the
    labels layer it belongs to ("" for a table read from a file whose layer is not
    open); ``last_result`` the last :class:`~cellfit.plugin.jobs.MeasureResult`.
    """

    def __init__(self, state: CellfitState, runner: JobRunner) -> None:
        super().__init__(state, runner)
        self.table: Table | None = None
        self.table_layer = ""
        self.table_source: Path | None = None  # the file a table was read from
        self.last_result: MeasureResult | None = None
        self._wanted_layer = ""  # a table read from a file waits for this layer
        self._measuring = ""  # the labels layer being measured
        self._measured_image = ""  # the image giving its intensities ("" for none)
        self._shown_plane: int | None = None
        self._watched: Labels | None = None
        self._signature: list[tuple[int, int]] = []
        runner.finished.connect(self._on_job_finished)

        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.labels_combo = shrinkable()
        self.labels_combo.setToolTip(TIPS["labels_layer"])
        form.addRow(row_label("labels_layer"), self.labels_combo)
        self.slices_combo = combo(CHOICES["slices"], TIPS["measure_slices"])
        self.slices_label = QLabel(row_label("slices"))
        form.addRow(self.slices_label, self.slices_combo)
        lay.addLayout(form)
        self.intensity_label = small_label("")
        lay.addWidget(self.intensity_label)
        self.measure_button = QPushButton("Measure cells")
        self.measure_button.setToolTip(TIPS["measure"])
        self.measure_button.clicked.connect(self.measure)
        lay.addWidget(self.measure_button)

        row = QHBoxLayout()
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(TIPS["measure_cancel"])
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.status = QLabel("Segment an image (or open its labels), then Measure cells.")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)

        self.model = TableModel(self)
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.verticalHeader().setVisible(False)
        self.view.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents
        )
        self.view.horizontalHeader().setSortIndicatorShown(True)
        self.view.setToolTip(TIPS["table"])
        self.view.setMinimumSize(120, 160)  # it scrolls sideways: the dock stays narrow
        self.view.clicked.connect(self._on_row_clicked)
        lay.addWidget(self.view, 1)

        self.save_button = QPushButton("Save measurements as CSV…")
        self.save_button.setToolTip(TIPS["save_table"])
        self.save_button.clicked.connect(self._save_dialog)
        lay.addWidget(self.save_button)

    # ------------------------------------------------------------------ choices
    def refresh_choices(self) -> None:
        """Refill the labels list: every Labels layer but the annotations, the chosen
        image's '<image> labels' first choice."""
        viewer = self.state.viewer
        current = self.labels_combo.currentText()
        names = [
            layer.name for layer in viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get("cellfit") != "annotation"
        ]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        preferred = f"{self.state.image_name} labels"
        active = viewer.layers.selection.active
        if current in names:
            self.labels_combo.setCurrentText(current)
        elif preferred in names:
            self.labels_combo.setCurrentText(preferred)
        elif isinstance(active, Labels) and active.name in names:
            self.labels_combo.setCurrentText(active.name)
        self.labels_combo.blockSignals(False)
        if self._wanted_layer and self._wanted_layer in names and self.table is not None:
            self._attach(self._wanted_layer)
        if self.table_layer and self.table_layer not in names:
            self.table_layer = ""  # its layer was closed: the table stays, unattached
        self.update_controls()

    def labels_layer(self) -> Labels | None:
        """The Labels layer chosen in this tab."""
        return find_layer(self.state.viewer, self.labels_combo.currentText(), Labels)

    def _intensity_image(self, labels: Labels) -> Image | None:
        """The image chosen at the top of the dock, when it has the labels' size."""
        image = self.state.image_layer()
        if image is None or labels_shape(image) != tuple(layer_data(labels).shape):
            return None
        return image

    # ---------------------------------------------------------------- measuring
    def measure(self) -> None:
        """Measure the cells of the chosen labels layer (all slices or the one on
        screen) in the background; the image at the top of the dock gives the
        intensities."""
        if self.refuse_while_busy():
            return
        labels = self.labels_layer()
        if labels is None:
            self.error(WHY_OFF["no_labels"])
            return
        data = layer_data(labels)
        image = self._intensity_image(labels)
        stack = tuple(int(s) for s in data.shape[:-2])
        which = None
        if stack and self.slices_combo.currentData() == "current":
            which = [self._plane_on_screen(labels)]
        size, unit = pixel_size_of_layer(image if image is not None else labels)
        job = MeasureJob(
            data, None if image is None else layer_data(image),
            rgb=bool(image is not None and image.rgb), which=which,
            pixel_size=size, unit=unit,
        )
        self._measuring = labels.name
        self._measured_image = "" if image is None else image.name
        self.status.setText(breakable(f"Measuring the cells of '{labels.name}'…"))
        self.runner.start("measure", job, self._on_result, on_yield=self._on_progress,
                          bar=self.bar, desc="cellfit: measuring cells")

    def _on_progress(self, pr) -> None:
        self.status.setText(pr.text)
        self.runner.set_progress(pr.fraction)

    def _on_result(self, result: MeasureResult) -> None:
        self.last_result = result
        if result.error:
            self.error(result.error)
            self.status.setText(breakable(f"Measuring failed: {result.error}"))
            return
        if result.cancelled or result.table is None:
            self.status.setText("Measuring cancelled.")
            return
        if find_layer(self.state.viewer, self._measuring, Labels) is None:
            self.status.setText("The labels layer was closed before measuring ended.")
            return
        self.table_source = None
        self.show_table(result.table, self._measuring)
        n = len(result.table["id"])
        where = "" if len(result.planes) == 1 else f" in {len(result.planes)} slices"
        what = "" if self._measured_image else " (shapes only: no image of its size)"
        self.status.setText(breakable(
            f"Measured {number(n)} cell{'s' if n != 1 else ''}{where} of "
            f"'{self._measuring}'{what} in {result.seconds:.1f} s. Hover a cell to see "
            "its values in napari's status bar."
        ))

    def cancel(self) -> None:
        if self.runner.job is not None and self.runner.kind == "measure":
            self.runner.cancel()
            self.status.setText("Cancelling…")

    # ---------------------------------------------------------------- the table
    def show_table(self, table: Table, layer_name: str = "", source: Path | None = None) -> bool:
        """Show ``table`` in the dock and, when the labels layer ``layer_name`` is open,
        make it that layer's ``features``; a table read from ``source`` whose layer
        is not open yet is attached when a layer of that name opens. Returns whether
        it was attached to a layer."""
        self.table = {k: np.asarray(v) for k, v in table.items()}
        self.table_source = source
        self.model.set_table(self.table)
        # the engine's order (slice, then id) until a column's title is clicked
        self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        # a 2D image's table: the slice column is all 0, shown in the CSV only
        flat = "plane" in self.table and not np.any(self.table["plane"])
        layer = find_layer(self.state.viewer, layer_name, Labels) if layer_name else None
        flat = flat and (layer is None or len(layer_data(layer).shape) == 2)
        for col, name in enumerate(self.model.columns):
            self.view.setColumnHidden(col, flat and name == "plane")
        self.view.resizeColumnsToContents()
        self.table_layer = ""
        self._wanted_layer = layer_name
        attached = bool(layer_name) and self._attach(layer_name)
        self.update_controls()
        return attached

    def _attach(self, name: str) -> bool:
        layer = find_layer(self.state.viewer, name, Labels)
        if layer is None or self.table is None:
            return False
        self._unwatch()
        self.table_layer, self._wanted_layer = name, ""
        self._shown_plane = None
        self._apply_features(layer)
        self._watched = layer
        self._signature = self._cells_signature(layer)
        layer.events.data.connect(self._on_labels_replaced)
        if self.labels_combo.findText(name) >= 0:
            self.labels_combo.setCurrentText(name)
        return True

    def _cells_signature(self, layer: Labels) -> list[tuple[int, int]]:
        """The largest id and the number of cell pixels of each measured slice: what
        changes when the slices are segmented again (written in place in a stack)."""
        if self.table is None or not len(self.table.get("plane", ())):
            return []
        data = layer_data(layer)
        stack = tuple(int(s) for s in data.shape[:-2])
        out = []
        for plane in np.unique(self.table["plane"]):
            if stack and plane >= np.prod(stack):
                return []
            lab = np.asarray(data[stack_position(int(plane), stack)] if stack else data)
            out.append((int(lab.max()), int(np.count_nonzero(lab))))
        return out

    def _on_job_finished(self, kind: str) -> None:
        """Segmenting (or a training's preview) may have rewritten the measured labels
        in place: the values are stale when their cells changed."""
        layer = self._watched
        if kind not in ("predict", "train", "preview") or layer is None:
            return
        if layer not in self.state.viewer.layers:
            return
        if self._cells_signature(layer) != self._signature:
            self._on_labels_replaced()

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                self._watched.events.data.disconnect(self._on_labels_replaced)
        self._watched = None

    def _on_labels_replaced(self, event=None) -> None:
        """New labels in the measured layer (segmented again): the values are stale."""
        layer = self._watched
        self._unwatch()
        if layer is not None:
            layer.features = {}
        self.table_layer = ""
        self.status.setText(breakable(
            f"The cells of '{layer.name if layer is not None else ''}' changed since they "
            "were measured: press Measure cells again."
        ))

    def _apply_features(self, layer: Labels) -> None:
        """The rows of the slice on screen become the layer's features."""
        assert self.table is not None
        planes = np.unique(self.table["plane"]) if len(self.table.get("plane", ())) else []
        stacked = len(layer_data(layer).shape) > 2
        plane = self._plane_on_screen(layer) if stacked else None
        if not stacked and len(planes) > 1:
            plane = int(planes[0])
        self._shown_plane = plane
        layer.features = features_of(self.table, plane)

    def on_slice_changed(self) -> None:
        """The slider moved: a stack's labels layer carries the rows of the new slice."""
        layer = find_layer(self.state.viewer, self.table_layer, Labels) if self.table_layer else None
        if layer is None or self.table is None or len(layer_data(layer).shape) <= 2:
            return
        if self._plane_on_screen(layer) != self._shown_plane:
            self._apply_features(layer)

    def _plane_on_screen(self, layer) -> int:
        stack = tuple(int(s) for s in layer_data(layer).shape[:-2])
        if not stack:
            return 0
        pos = layer.world_to_data(self.state.viewer.dims.point)
        return plane_number([round(float(c)) for c in pos[: len(stack)]], stack)

    def _on_row_clicked(self, index: QModelIndex) -> None:
        """Centre the view on the cell of the row clicked (and select its label)."""
        if self.table is None or not index.isValid():
            return
        row = self.model.row_of(index.row())
        layer = find_layer(self.state.viewer, self.table_layer, Labels) if self.table_layer else None
        if layer is None:
            return
        self.centre_on(layer, row)

    def centre_on(self, layer: Labels, row: int) -> None:
        """Move the view to the cell of table row ``row`` in ``layer``."""
        assert self.table is not None
        viewer = self.state.viewer
        stack = tuple(int(s) for s in layer_data(layer).shape[:-2])
        plane = int(self.table["plane"][row]) if "plane" in self.table else 0
        position = (
            *(stack_position(plane, stack) if stack else ()),
            float(self.table["centroid_y"][row]),
            float(self.table["centroid_x"][row]),
        )
        world = np.asarray(layer.data_to_world(position), dtype=float)
        if stack:
            axes = list(range(viewer.dims.ndim - len(world), viewer.dims.ndim))
            for axis, value in zip(axes[: len(stack)], world[: len(stack)]):
                viewer.dims.set_point(axis, value)
        viewer.camera.center = tuple(world[-2:])
        layer.selected_label = int(self.table["id"][row])

    # ------------------------------------------------------------------- saving
    def save_csv(self, path: str | Path) -> Path | None:
        """Write the table shown to ``path`` (CSV, atomically); None after saying why
        it could not."""
        if self.table is None:
            self.error(WHY_OFF["no_table"])
            return None
        path = Path(path)
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
        try:
            write_table(path, self.table)
        except CellfitError as exc:
            self.error(str(exc))
            return None
        n = len(self.table["id"])
        show_info(f"Saved the measurements of {number(n)} cell{'s' if n != 1 else ''} to {path}.")
        self.status.setText(breakable(f"Saved to {path}."))
        return path

    def _save_dialog(self) -> None:
        name = self.table_layer or self.labels_combo.currentText() or "cells"
        stem = name[: -len(" labels")] if name.endswith(" labels") else name
        stem = stem[: -len("_labels")] if stem.endswith("_labels") else stem
        folder = self.table_source.parent if self.table_source else Path.home()
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the measurements", str(folder / f"{stem}_cells.csv"),
            "CSV table (*.csv);;All files (*)",
        )
        if path:
            self.save_csv(path)

    # ---------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        busy = self.busy_why()
        labels = self.labels_layer()
        stacked = labels is not None and len(layer_data(labels).shape) > 2
        self.slices_label.setVisible(stacked)
        self.slices_combo.setVisible(stacked)
        enable(self.slices_combo, busy, TIPS["measure_slices"])
        enable(self.labels_combo, busy, TIPS["labels_layer"])
        no_labels = None if labels is not None else WHY_OFF["no_labels"]
        enable(self.measure_button, first(busy, no_labels), TIPS["measure"])
        measuring = self.runner.busy and self.runner.kind == "measure"
        enable(self.cancel_button, None if measuring else WHY_OFF["not_measuring"],
               TIPS["measure_cancel"])
        enable(self.save_button, None if self.table is not None else WHY_OFF["no_table"],
               TIPS["save_table"])
        if labels is None:
            self.intensity_label.setText("No labels layer is open: segment an image first.")
        elif self._intensity_image(labels) is not None:
            self.intensity_label.setText(breakable(
                f"Intensities from '{self.state.image_name}' (the image chosen at the top)."
            ))
        else:
            self.intensity_label.setText(
                "No image of this size is chosen at the top: shapes only, no intensities."
            )
