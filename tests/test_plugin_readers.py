"""Files dropped on napari that the cellfit dock reads (the manifest's reader): a
.cellfit model opens the dock and shows its record; a measurements table written by
cellfit fills the Measure tab and the features of its labels layer; any other CSV is
left to napari's other readers."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from cellfit.measure import measure_plane, write_table
from cellfit.plugin.readers import get_reader, is_cellfit_table, table_layer_names

PLUGIN = "napari-cellfit"
WIDGET = f"Annotate, train & segment ({PLUGIN})"


def _cells(shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(shape, np.int32)
    labels[disk((16, 16), 7, shape=shape)] = 3
    labels[disk((40, 44), 10, shape=shape)] = 9
    image = np.where(labels > 0, 100.0 + labels, 5.0).astype(np.float32)
    return labels, image


def _drop(viewer, path) -> None:
    """What napari does with a file dropped on its window (or File > Open): the reader
    the file's name calls for, with no plugin named."""
    from qtpy.QtCore import QUrl

    viewer.window._qt_viewer._open_from_list_of_urls_data(
        [QUrl.fromLocalFile(str(path))], stack=False, choose_plugin=False
    )


@pytest.fixture
def table_file(tmp_path):
    labels, image = _cells()
    return write_table(tmp_path / "plate1_cells.csv", measure_plane(labels, image)), labels


def test_the_reader_takes_cellfit_files_and_declines_others(tmp_path, table_file):
    path, _ = table_file
    assert is_cellfit_table(path)
    assert get_reader(str(path)) is not None
    assert get_reader([str(path), str(path)]) is not None
    other = tmp_path / "points_cells.csv"
    other.write_text("axis-0,axis-1\n1,2\n")
    assert not is_cellfit_table(other) and get_reader(str(other)) is None
    binary = tmp_path / "noise_cells.csv"
    binary.write_bytes(bytes(range(256)))
    assert get_reader(str(binary)) is None
    assert get_reader(str(tmp_path / "missing_cells.csv")) is None
    assert get_reader(str(tmp_path / "m.cellfit")) is not None  # it says why when it fails
    assert get_reader([str(tmp_path / "a.cellfit"), str(tmp_path / "b.cellfit")]) is None
    assert table_layer_names("x/plate1_cells.csv") == ["plate1_labels", "plate1 labels", "plate1"]


def test_the_manifest_offers_the_reader():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    names = {r.plugin_name for r in pm.iter_compatible_readers(["/tmp/m.cellfit"])}
    assert PLUGIN in names
    names = {r.plugin_name for r in pm.iter_compatible_readers(["/tmp/plate1_cells.csv"])}
    assert PLUGIN in names
    names = {r.plugin_name for r in pm.iter_compatible_readers(["/tmp/points.csv"])}
    assert PLUGIN not in names  # napari's own CSVs are not ours to read


@pytest.mark.napari
def test_a_dropped_model_opens_the_dock_and_shows_its_record(make_napari_viewer):
    from cellfit.starting import starting_model_path

    viewer = make_napari_viewer()
    assert WIDGET not in viewer.window._wrapped_dock_widgets
    path = starting_model_path()
    _drop(viewer, path)
    assert len(viewer.layers) == 0
    dock = viewer.window._wrapped_dock_widgets[WIDGET].inner_widget()
    assert dock.state.model is not None and dock.state.model_path == path
    assert dock.tabs.currentWidget() is dock.model_panel
    assert "U-Net++" in dock.model_panel.record_view.toPlainText()
    # opened again (by a script this time): the same dock, not a second one
    assert viewer.open(str(path), plugin=PLUGIN) == []
    assert len([k for k in viewer.window._wrapped_dock_widgets if PLUGIN in k]) == 1


@pytest.mark.napari
def test_a_dropped_broken_model_says_why_and_adds_nothing(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    bad = tmp_path / "broken.cellfit"
    bad.write_bytes(b"not a model")
    n = len(notification_manager.records)
    _drop(viewer, bad)
    assert len(viewer.layers) == 0
    dock = viewer.window._wrapped_dock_widgets[WIDGET].inner_widget()
    assert dock.state.model is None
    assert any("broken.cellfit" in r.message for r in notification_manager.records[n:])


@pytest.mark.napari
def test_a_dropped_table_fills_the_measure_tab_and_the_labels_features(
    make_napari_viewer, table_file
):
    path, labels = table_file
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name="plate1_labels")  # as napari names plate1_labels.tif
    # napari's own reader takes *.csv too: in the window it asks which; here we name it
    assert viewer.open(str(path), plugin=PLUGIN) == []
    dock = viewer.window._wrapped_dock_widgets[WIDGET].inner_widget()
    panel = dock.measure_panel
    assert dock.tabs.currentWidget() is panel
    expected = measure_plane(labels, _cells()[1])
    for col in expected:
        np.testing.assert_allclose(panel.table[col].astype(float), expected[col].astype(float))
    assert panel.model.rowCount() == 2 and panel.table_layer == "plate1_labels"
    np.testing.assert_array_equal(layer.features["index"], [3, 9])
    np.testing.assert_allclose(layer.features["area_px"], expected["area_px"])
    assert "into the layer 'plate1_labels'" in panel.status.text().replace("\u200b", "")


@pytest.mark.napari
def test_a_table_dropped_before_its_labels_joins_them_when_they_open(
    make_napari_viewer, table_file
):
    path, labels = table_file
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    panel = viewer.window._wrapped_dock_widgets[WIDGET].inner_widget().measure_panel
    assert panel.table is not None and panel.table_layer == ""
    assert "Open plate1_labels.tif" in panel.status.text().replace("\u200b", "")
    layer = viewer.add_labels(labels, name="plate1_labels")
    assert panel.table_layer == "plate1_labels"
    np.testing.assert_array_equal(layer.features["index"], [3, 9])
