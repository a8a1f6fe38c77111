"""Where to paint next in the dock (issue #15): Suggest where to paint shows the
model's uncertainty and numbered boxes to paint, Next moves the view to them, and the
least sure predicted cells can be accepted into the annotation one by one, never
painting over what the user painted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellfit.model import ModelInfo
from cellfit.synthetic import synthetic_cells
from cellfit.uncertainty import MAX_PAINTED

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"
SIZE = 128

pytestmark = pytest.mark.napari


class Bright(nn.Module):
    """A 'network' that calls bright pixels cell interior and dark ones background,
    unsure where the blurred image is half way: cells with doubtful edges, no training."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        with torch.no_grad():
            self.encoder.weight.fill_(1 / 25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = 6 * (self.encoder(x) - 0.35)
        return torch.cat([-g, g, -g.abs() - 3], dim=1)


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    image = synthetic_cells((SIZE, SIZE), n_cells=12, seed=4)[0]
    viewer.add_image(image, name="cells")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


def _with_model(widget) -> None:
    info = ModelInfo(in_channels=1, n_classes=3, diameter=10.0)
    widget.state.set_model(Bright().eval(), info, None, True)
    widget._on_model_changed()


def _painted(widget):
    """An annotation with a painted cell and background in the top-left corner."""
    layer = widget.annotate_panel.create_annotation_layer()
    layer.data[:40, :40] = 1
    layer.data[10:20, 10:20] = 2
    layer.refresh()
    return layer


def _suggest(widget, qtbot):
    panel = widget.annotate_panel.suggest_panel
    assert panel.suggest_button.isEnabled(), panel.suggest_button.toolTip()
    panel.suggest_button.click()
    qtbot.waitUntil(lambda: widget.runner.job is None, timeout=60_000)
    assert panel.result is not None and panel.result.error is None, panel.region_label.text()
    return panel


def test_suggest_is_greyed_out_without_a_model_and_says_why(dock):
    from cellfit.plugin._tooltips import WHY_OFF

    panel = dock.annotate_panel.suggest_panel
    assert not panel.suggest_button.isEnabled()
    assert panel.suggest_button.toolTip().startswith(WHY_OFF["no_model"])
    assert not panel.next_button.isEnabled() and not panel.accept_button.isEnabled()
    _with_model(dock)
    assert panel.suggest_button.isEnabled()


def test_suggest_adds_the_uncertainty_and_numbered_boxes_off_the_painting(dock, qtbot):
    from napari.layers import Image, Shapes

    _with_model(dock)
    ann = _painted(dock)
    panel = _suggest(dock, qtbot)
    # the user paints the best box whole (background): it must not come back
    ann.data[panel.result.regions[0].slices] = 1
    ann.refresh()
    before = np.array(ann.data)
    panel = _suggest(dock, qtbot)
    viewer = dock.viewer
    unc = viewer.layers["cells uncertainty"]
    assert isinstance(unc, Image) and unc.data.shape == (SIZE, SIZE)
    assert unc.data.max() > 0.1 and unc.colormap.name == "magma"
    boxes = viewer.layers["cells suggestions"]
    assert isinstance(boxes, Shapes) and boxes.locked
    regions = panel.result.regions
    assert 3 <= len(regions) == len(boxes.data)
    assert list(boxes.features["number"]) == [r.rank for r in regions] == list(
        range(1, len(regions) + 1)
    )
    assert boxes.text.string.format == "{number}"
    for rect, region in zip(boxes.data, regions):
        y0, x0 = np.ceil(rect.min(axis=0)).astype(int)
        y1, x1 = np.ceil(rect.max(axis=0)).astype(int)
        assert (y0, x0, y1, x1) == region.box
        assert (before[y0:y1, x0:x1] != 0).mean() <= MAX_PAINTED
    # nothing painted, the annotation still the layer to paint on
    np.testing.assert_array_equal(ann.data, before)
    assert viewer.layers.selection.active.name == ann.name
    # not an image to choose
    assert "cells uncertainty" not in [
        dock.image_combo.itemText(i) for i in range(dock.image_combo.count())
    ]


def test_next_moves_the_view_to_the_next_box(dock, qtbot):
    _with_model(dock)
    _painted(dock)
    panel = _suggest(dock, qtbot)
    regions = panel.result.regions
    camera = dock.viewer.camera
    np.testing.assert_allclose(camera.center[-2:], regions[0].centre, atol=1e-6)
    panel.next_button.click()
    assert panel.region_index == 1
    np.testing.assert_allclose(camera.center[-2:], regions[1].centre, atol=1e-6)
    assert panel.region_label.text().startswith(f"Box 2 of {len(regions)}:")
    panel.prev_button.click()
    np.testing.assert_allclose(camera.center[-2:], regions[0].centre, atol=1e-6)


def test_accept_paints_the_predicted_cell_with_a_new_id_and_nothing_painted_changes(
    dock, qtbot
):
    _with_model(dock)
    ann = _painted(dock)
    panel = _suggest(dock, qtbot)
    result = panel.result
    assert result.cells, "no predicted cell to check"
    # paint a few pixels of the first cell by hand: they must stay as they are
    first = result.cells[0]
    cell = result.objects == first.label
    ys, xs = np.nonzero(cell)
    ann.data[ys[:3], xs[:3]] = 1
    ann.refresh()
    before = np.array(ann.data)
    new_id = int(before.max()) + 1
    panel.cell_next_button.click()
    assert panel.cell_index == 0 and panel.accept_button.isEnabled()
    np.testing.assert_allclose(dock.viewer.camera.center[-2:], (first.y, first.x), atol=1e-6)
    n = panel.accept_cell()
    after = np.asarray(ann.data)
    changed = after != before
    assert n == int(changed.sum()) == int(cell.sum()) - 3
    np.testing.assert_array_equal(changed, cell & (before == 0))
    assert set(np.unique(after[changed])) == {new_id}
    np.testing.assert_array_equal(after[before != 0], before[before != 0])
    # one undoable edit
    ann.undo()
    np.testing.assert_array_equal(ann.data, before)


def test_semantic_objects_are_the_connected_regions_of_each_class_painted_as_their_class():
    from cellfit.plugin.jobs import objects_of

    classes = np.zeros((12, 12), np.uint8)
    classes[1:4, 1:4] = 1
    classes[1:4, 4:7] = 2  # touches the first: another object all the same
    classes[8:11, 8:11] = 1
    objects, values = objects_of(classes, "semantic")
    assert objects.max() == 3 and len(values) == 3
    for k in (1, 2, 3):
        region = objects == k
        (cls,) = np.unique(classes[region])
        assert values[k] == cls + 1  # painted value k + 1 is class k
    same, none = objects_of(classes, "instances")
    np.testing.assert_array_equal(same, classes)
    assert none == {}
