"""The Measure tab: the engine's numbers (``cellfit.measure``) for the cells of a labels
layer, shown as a sortable table, as the layer's features (what napari shows under the
mouse) and saved as CSV; and the job behind it, drained without Qt."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from cellfit.measure import measure_plane, measure_stack, read_table
from cellfit.plugin.jobs import MeasureJob

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"


def _scene(shape=(80, 96), shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three cells of known sizes and brightness on a dim background: labels, image."""
    labels = np.zeros(shape, np.int32)
    labels[disk((20, 24 + shift), 9, shape=shape)] = 2
    labels[ellipse(50, 60 + shift, 8, 16, shape=shape)] = 5
    labels[60:72, 0:10] = 7  # cut by the left edge
    image = np.full(shape, 10.0, np.float32)
    for cell, value in ((2, 200.0), (5, 120.0), (7, 60.0)):
        image[labels == cell] = value
    image[labels == 5] += np.linspace(0, 30, int((labels == 5).sum()), dtype=np.float32)
    return labels, image


def _equal_tables(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for col in a:
        np.testing.assert_allclose(np.asarray(a[col], float), np.asarray(b[col], float),
                                   err_msg=col, equal_nan=True)


# ------------------------------------------------------------------- the job, no Qt
def test_the_measure_job_gives_the_engines_table_plane_after_plane():
    planes = [_scene(shift=s) for s in (0, 4, 8)]
    labels = np.stack([p[0] for p in planes])
    image = np.stack([p[1] for p in planes])
    gen = MeasureJob(labels, image).run()
    progress = []
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert result.error is None and result.planes == [0, 1, 2]
    assert progress[-1].fraction == 1.0
    _equal_tables(result.table, measure_stack(labels, image))

    # one plane only, an RGB image, and a calibrated pixel size
    rgb = np.stack([image[1]] * 3, axis=-1)
    res = _drain(MeasureJob(labels, np.stack([rgb] * 3), rgb=True, which=[1],
                            pixel_size=(0.5, 0.5), unit="micrometer"))
    expected = measure_plane(labels[1], np.moveaxis(rgb, -1, 0), plane=1,
                             pixel_size=(0.5, 0.5), unit="um")
    _equal_tables(res.table, expected)
    assert "area_um2" in res.table and "mean_intensity_c2" in res.table


def test_the_measure_job_says_what_is_wrong_in_one_sentence():
    labels, image = _scene()
    bad = image.copy()
    bad[0, 0] = np.nan
    res = _drain(MeasureJob(labels, bad))
    assert res.table is None and res.error and "\n" not in res.error


def test_the_folder_job_measures_every_file_when_asked(tmp_path):
    """Segment folder with measurements: the engine's ``predict_files(measure=True)``
    (``cellfit predict --measure``): a table per file, the run's summary, the flags."""
    import tifffile

    from cellfit.model import ModelInfo, build_model, save_model
    from cellfit.plugin.jobs import BatchJob
    from cellfit.synthetic import synthetic_cells

    src = tmp_path / "in"
    src.mkdir()
    img, _ = synthetic_cells((96, 96), n_cells=8, seed=1)
    tifffile.imwrite(src / "a.tif", img)
    tifffile.imwrite(src / "b.tif", np.stack([img, img]))
    model_path = save_model(tmp_path / "m.cellfit", build_model(ModelInfo()), ModelInfo())
    res = _drain(BatchJob(model_path, [src], tmp_path / "out", device="cpu", threads=1,
                          measure=True))
    assert res.error is None and res.done == 2 and res.measured
    for name in ("a_cells.csv", "b_cells.csv", "summary.csv"):
        assert (tmp_path / "out" / name).exists()
    table = read_table(tmp_path / "out" / "b_cells.csv")  # every cell of both slices
    labels = tifffile.imread(tmp_path / "out" / "b_labels.tif")
    assert len(table["id"]) == sum(len(np.setdiff1d(np.unique(p), [0])) for p in labels)
    # an untrained network finds nonsense: the run says which files to check first
    assert all(isinstance(name, str) and why for name, why in res.flagged)

    plain = _drain(BatchJob(model_path, [src], tmp_path / "out2", device="cpu", threads=1))
    assert not plain.measured and not (tmp_path / "out2" / "a_cells.csv").exists()


def _drain(job):
    gen = job.run()
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


# ------------------------------------------------------------------------ the dock


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    labels, image = _scene()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


@pytest.mark.napari
def test_measure_cells_shows_the_engines_numbers(dock, qtbot, tmp_path):
    viewer, panel = dock.viewer, dock.measure_panel
    labels, image = _scene()
    assert panel.labels_combo.currentText() == "cells labels"  # the image's labels first
    assert not panel.save_button.isEnabled()
    assert not panel.slices_combo.isVisible()  # a 2D image: no slices to choose
    panel.measure_button.click()
    qtbot.waitUntil(lambda: dock.runner.job is None, timeout=20_000)
    assert panel.last_result.error is None
    expected = measure_plane(labels, image)
    _equal_tables(panel.table, expected)
    assert list(expected["id"]) == [2, 5, 7]
    assert list(expected["touches_edge"]) == [False, False, True]
    assert "Measured 3 cells of 'cells labels'" in panel.status.text().replace("\u200b", "")

    # the table in the dock: one row per cell, every column, sortable
    model = panel.model
    assert model.rowCount() == 3 and model.columnCount() == len(expected)
    assert [model.row_of(i) for i in range(3)] == [0, 1, 2]  # the engine's order first
    assert panel.view.horizontalHeader().sortIndicatorSection() == -1
    assert panel.view.isColumnHidden(list(expected).index("plane"))  # a 2D image
    area = list(expected).index("area_px")
    from qtpy.QtCore import Qt

    panel.view.sortByColumn(area, Qt.SortOrder.DescendingOrder)
    assert model.row_of(0) == int(np.argmax(expected["area_px"]))
    shown = model.data(model.index(0, area))
    assert shown == str(int(expected["area_px"].max()))

    # the layer's features: napari shows a cell's values under the mouse
    layer = viewer.layers["cells labels"]
    feats = layer.features
    np.testing.assert_array_equal(feats["index"], [2, 5, 7])
    np.testing.assert_allclose(feats["area_px"], expected["area_px"])
    y, x = (int(v) for v in np.argwhere(labels == 5)[0])
    status = layer.get_status((y, x))
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    assert f"area_px: {int(expected['area_px'][1])}" in text

    # a row clicked: the view centres on that cell and selects its label
    row = model.index(0, 0)  # the largest cell, after sorting
    panel.view.clicked.emit(row)
    k = model.row_of(0)
    np.testing.assert_allclose(
        viewer.camera.center[-2:], (expected["centroid_y"][k], expected["centroid_x"][k]),
        atol=1e-6,
    )
    assert layer.selected_label == expected["id"][k]

    # saved as CSV (the engine's writer), read back the same
    assert panel.save_button.isEnabled()
    path = panel.save_csv(tmp_path / "cells_cells")
    assert path == tmp_path / "cells_cells.csv"
    _equal_tables(read_table(path), expected)

    # new labels (segmented again): the values are stale, the features go
    layer.data = np.zeros_like(labels)
    assert layer.features.shape[1] == 0
    assert "changed since" in panel.status.text().replace("\u200b", "")


@pytest.mark.napari
def test_a_stack_is_measured_slice_by_slice_and_hover_shows_the_slice_on_screen(
    make_napari_viewer, qtbot
):
    viewer = make_napari_viewer()
    planes = [_scene(shift=s) for s in (0, 6, 12)]
    planes[2][0][planes[2][0] == 7] = 0  # the last slice has two cells
    labels = np.stack([p[0] for p in planes])
    image = np.stack([p[1] for p in planes])
    viewer.add_image(image, name="stack")
    layer = viewer.add_labels(labels, name="stack labels")
    _dock, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    panel = dock.measure_panel
    assert panel.slices_combo.isVisibleTo(panel)

    viewer.dims.set_point(0, 1)
    panel.slices_combo.setCurrentIndex(panel.slices_combo.findData("current"))
    panel.measure()
    qtbot.waitUntil(lambda: dock.runner.job is None, timeout=20_000)
    _equal_tables(panel.table, measure_plane(labels[1], image[1], plane=1))

    panel.slices_combo.setCurrentIndex(panel.slices_combo.findData("all"))
    panel.measure()
    qtbot.waitUntil(lambda: dock.runner.job is None, timeout=20_000)
    _equal_tables(panel.table, measure_stack(labels, image))
    assert "in 3 slices" in panel.status.text()
    # napari's features are one row per label value: those of the slice on screen
    np.testing.assert_array_equal(layer.features["index"], [2, 5, 7])
    viewer.dims.set_point(0, 2)
    np.testing.assert_array_equal(layer.features["index"], [2, 5])
    rows = panel.table["plane"] == 2
    np.testing.assert_allclose(layer.features["centroid_x"], panel.table["centroid_x"][rows])

    # a row of another slice clicked: the slider goes to that slice
    k = int(np.flatnonzero(panel.table["plane"] == 0)[0])
    panel.centre_on(layer, k)
    assert viewer.dims.point[0] == 0
    np.testing.assert_array_equal(layer.features["index"], [2, 5, 7])

    # a stack segmented again is rewritten in place: after the job, the values go
    dock.runner.finished.emit("predict")  # nothing changed: they stay
    assert panel.table_layer == "stack labels"
    layer.data[1][layer.data[1] == 5] = 0
    layer.refresh()
    dock.runner.finished.emit("predict")
    assert panel.table_layer == "" and layer.features.shape[1] == 0
    assert "changed since" in panel.status.text().replace("\u200b", "")


@pytest.mark.napari
def test_measure_without_labels_says_what_to_do(make_napari_viewer):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    viewer.add_image(_scene()[1], name="cells")
    _dock, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    panel = dock.measure_panel
    assert not panel.measure_button.isEnabled()
    assert "segment an image first" in panel.measure_button.toolTip()
    n = len(notification_manager.records)
    panel.measure()
    assert "segment an image first" in notification_manager.records[n].message
    assert panel.save_csv("x.csv") is None


@pytest.mark.napari
def test_measure_the_nuclei_sample(make_napari_viewer, qtbot, tmp_path):
    """The real nuclei image and its cells (the sample's own mask stands in for a
    segmentation): the Measure tab's picture in docs/plugin.md comes from here, with
    ``CELLFIT_SCREENSHOTS=docs/screenshots``."""
    import os
    from pathlib import Path

    import imageio.v3 as iio

    from cellfit.data import nuclei_dsb2018

    img, mask = nuclei_dsb2018()
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.add_image(img, name="nuclei")
    layer = viewer.add_labels(mask.astype(np.int32), name="nuclei labels", opacity=0.5)
    _dock, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    panel = dock.measure_panel
    dock.tabs.setCurrentWidget(panel)
    panel.measure()
    qtbot.waitUntil(lambda: dock.runner.job is None, timeout=30_000)
    _equal_tables(panel.table, measure_plane(mask, img))
    n = int(mask.max())
    assert panel.model.rowCount() == len(np.setdiff1d(np.unique(mask), [0])) <= n

    # the biggest nucleus first; its row clicked: the view centres on it
    from qtpy.QtCore import Qt

    area = list(panel.table).index("area_px")
    panel.view.sortByColumn(area, Qt.SortOrder.DescendingOrder)
    panel.view.selectRow(0)
    panel.view.clicked.emit(panel.model.index(0, 0))
    viewer.camera.zoom = 2.0
    k = panel.model.row_of(0)
    assert layer.selected_label == panel.table["id"][k]
    # the mouse over that nucleus: napari's status bar shows its measurements
    viewer.mouse_over_canvas = True
    viewer.cursor.position = (panel.table["centroid_y"][k], panel.table["centroid_x"][k])
    viewer.update_status_from_cursor()  # napari does it on a timer as the mouse moves
    qtbot.wait(300)
    assert f"area_px: {panel.table['area_px'][k]}" in str(viewer.status)
    folder = Path(os.environ.get("CELLFIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = viewer.screenshot(canvas_only=False, flash=False)[..., :3]
    iio.imwrite(folder / "6_measure.png", shot)
