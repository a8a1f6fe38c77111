"""Files dropped on napari (or opened with File > Open) that the cellfit dock reads.

* ``*.cellfit``: a cellfit model. The dock opens (or comes forward) and loads it, as
  its Model tab's Load model… does; the tab shows the model's record.
* ``*_cells.csv``: a measurements table written by cellfit (``cellfit predict
  --measure``, or the dock's Save measurements as CSV…). The dock's Measure tab shows
  it, and the labels layer it belongs to (``<name>_labels`` or ``<name> labels``),
  when open, gets it as its ``features``, so napari shows a cell's values under the
  mouse. A CSV that is not a cellfit table is declined, for napari's other readers.

Neither adds a layer: the reader returns napari's "read, nothing to add" value,
``[(None,)]``. The model file is read by the engine's safe loader
(:func:`cellfit.model.load_model`, no code runs), the table by
:func:`cellfit.measure.read_table`. This module imports no torch (napari asks it about
every file dropped): the dock, which does, is imported when a file is read.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import napari
from napari.layers import Labels
from napari.utils.notifications import show_info

from cellfit.errors import CellfitError
from cellfit.measure import COLUMNS, read_table
from cellfit.plugin._layout import breakable

__all__ = ["NOTHING_TO_ADD", "get_reader", "is_cellfit_table", "open_dock", "table_layer_names"]

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"
#: napari's value for "the file was read, no layer to add"
NOTHING_TO_ADD = [(None,)]


def is_cellfit_table(path: str | Path) -> bool:
    """Whether ``path`` is a CSV whose header has a cellfit measurements table's
    columns (the first line only is read)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader([fh.readline()]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    names = {h.strip() for h in header}
    return all(c in names for c in COLUMNS)


def _paths(path: str | Sequence[str]) -> list[Path]:
    return [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]


def get_reader(path: str | Sequence[str]) -> Callable | None:
    """napari's reader hook: a function reading ``path`` (one file or several), or
    None when they are not all cellfit files (another reader may take them)."""
    paths = _paths(path)
    if not paths:
        return None
    if all(p.suffix.lower() == ".cellfit" for p in paths) and len(paths) == 1:
        return read_model
    if all(p.suffix.lower() == ".csv" and is_cellfit_table(p) for p in paths):
        return read_tables
    return None


def open_dock(viewer=None):
    """The cellfit dock of ``viewer`` (napari's current viewer by default), opened if
    it is not, and brought forward; None without a viewer window."""
    if viewer is None:
        viewer = napari.current_viewer()
    if viewer is None or getattr(viewer, "window", None) is None:
        return None
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    dock.show()
    dock.raise_()
    return widget


def read_model(path: str | Sequence[str]) -> list:
    """Load a dropped .cellfit model into the dock (its Model tab shows the record)."""
    (model_path,) = _paths(path)
    widget = _dock_or_raise(model_path)
    widget.tabs.setCurrentWidget(widget.model_panel)
    widget.model_panel.load_model_file(model_path)  # says why when it cannot
    return NOTHING_TO_ADD


def table_layer_names(path: str | Path) -> list[str]:
    """The names the labels layer of a table ``<stem>_cells.csv`` has in napari:
    ``<stem>_labels`` (opened from ``<stem>_labels.tif``), ``<stem> labels`` (made by
    the dock's Segment), ``<stem>``."""
    stem = Path(path).stem
    if stem.endswith("_cells"):
        stem = stem[: -len("_cells")]
    return [f"{stem}_labels", f"{stem} labels", stem]


def read_tables(path: str | Sequence[str]) -> list:
    """Show dropped measurements tables in the dock's Measure tab (the last one
    dropped stays shown), each attached to its labels layer when open."""
    paths = _paths(path)
    widget = _dock_or_raise(paths[0])
    panel = widget.measure_panel
    widget.tabs.setCurrentWidget(panel)
    for p in paths:
        try:
            table = read_table(p)
        except CellfitError as exc:
            panel.error(str(exc))
            continue
        names = [layer.name for layer in widget.viewer.layers if isinstance(layer, Labels)]
        candidates = table_layer_names(p)
        name = next((n for n in candidates if n in names), candidates[0])
        n = len(table["id"])
        if panel.show_table(table, name, source=p):
            text = (
                f"Read {n} cell{'s' if n != 1 else ''} from {p.name} into the layer "
                f"'{name}': hover a cell to see its values."
            )
        else:
            text = (
                f"Read {n} cell{'s' if n != 1 else ''} from {p.name} (Measure tab). Open "
                f"{candidates[0]}.tif to see a cell's values when hovering it."
            )
        panel.status.setText(breakable(text))
        show_info(text)
    return NOTHING_TO_ADD


def _dock_or_raise(path: Path):
    widget = open_dock()
    if widget is None:
        raise CellfitError(f"{path.name} is read by the cellfit dock: open it in napari's window.")
    return widget
