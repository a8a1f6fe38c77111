"""Semantic mode in the dock: the class list (names, colours, the legend), its colours
on the annotation and the predicted class map, the per-class probability layer, and
the names reaching training and the model."""

from __future__ import annotations

import numpy as np
import pytest

from cellfit.model import ModelInfo, default_class_colors
from cellfit.synthetic import synthetic_cells

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"

pytestmark = pytest.mark.napari


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((48, 48), n_cells=4, seed=1)[0], name="cells")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


def _semantic(widget):
    combo = widget.train_panel.mode_combo
    combo.setCurrentIndex(combo.findData("semantic"))
    layer = widget.annotate_panel.create_annotation_layer()
    layer.data[2:40, 2:40] = 1
    layer.data[5:10, 5:10] = 2
    layer.data[20:25, 5:10] = 3
    layer.data[5:10, 20:25] = 4
    layer.refresh()
    widget.classes_panel.refresh()
    return layer


def _names(widget) -> list[str]:
    table = widget.classes_panel.table
    return [table.item(r, 1).text() for r in range(table.rowCount())]


def _rgba(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0])


def test_the_class_list_shows_only_in_semantic_mode_with_a_row_per_painted_class(dock):
    assert dock.classes_panel.isHidden()
    _semantic(dock)
    assert not dock.classes_panel.isHidden()
    assert _names(dock) == ["background", "class 1", "class 2", "class 3"]
    assert dock.annotate_panel.cell_button.text() == "New class"
    # the help speaks of classes, not of cells each with its own id
    assert "class" in dock.annotate_panel.how_label.text()
    assert "own id" not in dock.annotate_panel.how_label.text()
    assert "with their classes" in dock.annotate_panel.correct_label.text()
    combo = dock.train_panel.mode_combo
    combo.setCurrentIndex(combo.findData("instances"))
    assert dock.classes_panel.isHidden()
    assert dock.annotate_panel.cell_button.text() == "New cell"
    assert "own id" in dock.annotate_panel.how_label.text()


def test_names_edited_in_the_list_reach_the_training_config(dock):
    layer = _semantic(dock)
    table = dock.classes_panel.table
    table.item(1, 1).setText("nucleus")  # as the user types it in place
    dock.classes_panel.set_color(3, "#0000FF")
    assert _names(dock)[1] == "nucleus"
    config = dock.train_panel.with_classes(dock.train_panel.train_config(), [layer.data])
    assert config.class_names == ["background", "nucleus", "class 2", "class 3"]
    assert config.class_colors[3] == "#0000ff"
    # a repeated name is not taken
    table.item(2, 1).setText("nucleus")
    assert _names(dock)[2] == "class 2"


def test_the_annotation_and_the_class_map_wear_the_class_colours(dock):
    from cellfit.plugin._layers import show_prediction

    layer = _semantic(dock)
    dock.classes_panel.set_color(2, "#00ff00")
    colors = dock.state.class_colors
    assert colors[2] == "#00ff00"
    np.testing.assert_allclose(layer.colormap.map(np.array([3]))[0], _rgba("#00ff00"), atol=1e-6)
    assert layer.colormap.map(np.array([0]))[0][3] == 0  # not annotated: transparent
    # a result: class map (0 background, k class k) and the probability of each class
    labels = np.zeros((1, 48, 48), np.uint8)
    labels[0, 20:25, 5:10] = 2
    probs = np.random.default_rng(0).random((1, 4, 48, 48)).astype(np.float32)
    image = dock.state.image_layer()
    show_prediction(dock.viewer, image, [0], probs[:, 1], labels, layer,
                    colors=colors, class_prob=probs)
    pred = dock.viewer.layers["cells labels"]
    np.testing.assert_allclose(pred.colormap.map(np.array([2]))[0], _rgba("#00ff00"), atol=1e-6)
    assert pred.colormap.map(np.array([0]))[0][3] == 0 and pred.contour == 0
    stack = dock.viewer.layers["cells class probability"]
    assert stack.data.shape == (4, 48, 48)
    np.testing.assert_array_equal(stack.data[3], probs[0, 3])
    # recolouring a class recolours the class map on screen too
    dock.classes_panel.set_color(2, "#ff00ff")
    np.testing.assert_allclose(pred.colormap.map(np.array([2]))[0], _rgba("#ff00ff"), atol=1e-6)
    # clicking a class paints it and shows its probability
    dock.classes_panel.paint_class(3)
    assert layer.selected_label == 4
    assert dock.viewer.dims.current_step[dock.viewer.dims.ndim - stack.ndim] == 3


def test_a_semantic_model_brings_its_names_and_renaming_reaches_it(dock):
    _semantic(dock)
    info = ModelInfo(mode="semantic", n_classes=4,
                     class_names=["background", "nucleus", "mitosis", "debris"],
                     class_colors=["#598cd9", "#ff0000", "#00ff00", "#0000ff"])
    dock.state.info = info
    dock._on_model_changed()
    assert _names(dock) == ["background", "nucleus", "mitosis", "debris"]
    assert dock.state.class_colors[1] == "#ff0000"
    dock.classes_panel.table.item(3, 1).setText("dirt")
    assert info.class_names[3] == "dirt" and not dock.state.model_saved
    assert default_class_colors(4)[0] == info.colors()[0]


def test_the_iou_of_each_class_shows_in_the_list(dock):
    _semantic(dock)
    dock.train_panel.validated.emit({"f1": 0.5, "class_iou": {"class 1": 0.8, "class 3": 0.25}})
    table = dock.classes_panel.table
    assert [table.item(r, 2).text() for r in range(4)] == ["", "0.80", "", "0.25"]


def test_the_no_model_line_speaks_of_classes_in_classes_mode(dock):
    assert "segment many kinds of cells" in dock.model_label.text()
    _semantic(dock)
    assert "Paint a few objects or regions of each class" in dock.model_label.text()
    combo = dock.train_panel.mode_combo
    combo.setCurrentIndex(combo.findData("instances"))
    assert "segment many kinds of cells" in dock.model_label.text()


def test_classes_are_objects_or_regions_only_in_semantic_mode(dock):
    train = dock.train_panel
    combo = train.classify_combo
    assert not combo.isEnabled()  # cells: every painted value is one cell
    assert "Only for classes" in combo.toolTip()
    _semantic(dock)
    assert combo.isEnabled()
    assert train.train_config().classify == "auto"
    combo.setCurrentIndex(combo.findData("objects"))
    assert train.train_config().classify == "objects"
