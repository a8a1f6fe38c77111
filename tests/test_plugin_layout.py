"""The dock in napari's first window (1089 x 630 pixels, the size napari opens at on a
first run): every control of every tab within the dock's visible width, no text cut
short, and the image keeping most of the room.

napari's own layer controls take 320 pixels of that width (their minimum), so the
image and the dock share the other 769: the image must keep more than half of them
(55 %). With the dock as it was (430 pixels wide) the image had 313 pixels, 41 %.

With ``CELLFIT_SCREENSHOTS`` set, a screenshot of each tab is written to
``$CELLFIT_SCREENSHOTS/small_window/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cellfit.synthetic import synthetic_cells

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"
WINDOW = (1089, 630)
#: the share of the width napari's own panels leave that the image keeps
IMAGE_SHARE = 0.55
#: a long image name, as microscopes write them (the dock names the image in buttons)
NAME = "2024-03-14_plate1_wellB3_DAPI_stack"

pytestmark = pytest.mark.napari


def _settle(qtbot, ms: int = 150) -> None:
    qtbot.wait(ms)


def _visible_right(widget) -> int:
    """The right edge of what the dock shows, in the dock widget's coordinates (its
    scroll area's viewport: a wider content would be cut off there)."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QScrollArea

    scroll = widget.findChild(QScrollArea)
    port = scroll.viewport()
    return port.mapTo(widget, QPoint(port.width(), 0)).x()


def _problems(widget) -> list[str]:
    """Controls of the dock sticking out of its visible width, and texts cut short."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractScrollArea,
        QAbstractSpinBox,
        QComboBox,
        QLabel,
        QLineEdit,
        QScrollArea,
        QStyle,
        QStyleOptionComboBox,
        QWidget,
    )

    from cellfit.plugin._layout import WrapButton, WrapCheckBox
    from cellfit.plugin.panels._base import ElidedCombo

    right = _visible_right(widget)
    scroll = widget.findChild(QScrollArea)
    out = []
    for w in scroll.widget().findChildren(QWidget):
        if not w.isVisible():
            continue
        # inside a table or text view: that view scrolls its own contents
        parent, inner = w.parentWidget(), False
        while parent is not None and parent is not scroll:
            if isinstance(parent, QAbstractScrollArea):
                inner = True
                break
            parent = parent.parentWidget()
        if inner or isinstance(w.parentWidget(), QAbstractSpinBox):
            continue
        left = w.mapTo(widget, QPoint(0, 0)).x()
        text = w.text() if isinstance(w, (QAbstractButton, QLabel)) else ""
        what = f"{type(w).__name__} {text[:40]!r}"
        if left < -1 or left + w.width() > right + 1:
            out.append(f"{what} spans x {left}..{left + w.width()}, the dock shows 0..{right}")
        if isinstance(w, (WrapButton, WrapCheckBox)):
            if w.heightForWidth(w.width()) > w.height() + 1:
                out.append(f"{what}: its wrapped text is cut off at the bottom")
        elif isinstance(w, QAbstractSpinBox):
            edit = w.findChild(QLineEdit)
            need = edit.fontMetrics().horizontalAdvance(edit.text())
            if need > edit.width() - 2:
                out.append(f"{what} {edit.text()!r}: {need} px of text in {edit.width()} px")
        elif isinstance(w, QComboBox) and not isinstance(w, ElidedCombo):
            # a plain combo box cuts a long text off mid-letter, without "…"
            opt = QStyleOptionComboBox()
            w.initStyleOption(opt)
            field = w.style().subControlRect(
                QStyle.ComplexControl.CC_ComboBox, opt, QStyle.SubControl.SC_ComboBoxEditField, w
            )
            need = w.fontMetrics().horizontalAdvance(w.currentText())
            if need > field.width():
                out.append(f"{what} {w.currentText()!r}: {need} px of text in {field.width()} px")
        elif (isinstance(w, QAbstractButton) or (
            isinstance(w, QLabel) and text and not w.wordWrap()
        )) and w.sizeHint().width() > w.width() + 1:
            out.append(f"{what}: {w.sizeHint().width()} px of text in {w.width()} px")
    return out


def _canvas_share(viewer) -> tuple[float, int, int]:
    qt = viewer.window._qt_viewer
    canvas = qt.canvas.native.width()
    napari_panels = max(qt.dockLayerControls.width(), qt.dockLayerList.width())
    room = viewer.window._qt_window.width() - napari_panels
    return canvas / room, canvas, room


def _shoot(viewer, name: str) -> None:
    folder = os.environ.get("CELLFIT_SCREENSHOTS")
    if not folder:
        return
    import imageio.v3 as iio

    path = Path(folder) / "small_window" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, viewer.screenshot(canvas_only=False, flash=False)[..., :3])


def _check_every_tab(widget, viewer, qtbot, shots: bool = False) -> list[str]:
    problems = []
    for i in range(widget.tabs.count()):
        widget.tabs.setCurrentIndex(i)
        _settle(qtbot)
        tab = widget.tabs.tabText(i)
        problems += [f"[{tab}] {p}" for p in _problems(widget)]
        if shots:
            _shoot(viewer, f"{i + 1}_{tab.split(' ')[-1].lower()}")
    return problems


@pytest.fixture
def small_window(make_napari_viewer, qtbot):
    """napari at its first-run size with a 3-slice stack with a long name, its
    segmentation, and the dock opened from the Plugins menu's contribution."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*WINDOW)
    img, lab = synthetic_cells((96, 96), n_cells=8, seed=1)
    viewer.add_image(np.stack([img] * 3), name=NAME)
    viewer.add_labels(np.stack([lab] * 3).astype(np.int32), name=f"{NAME} labels")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image_combo.setCurrentText(NAME)
    _settle(qtbot, 300)
    assert viewer.window._qt_window.width() == WINDOW[0]
    return viewer, widget


def test_every_tab_fits_napari_first_window(small_window, qtbot):
    viewer, widget = small_window
    share, canvas, room = _canvas_share(viewer)
    assert share >= IMAGE_SHARE, (
        f"the image keeps {canvas} of the {room} pixels napari's panels leave ({share:.0%})"
    )
    problems = _check_every_tab(widget, viewer, qtbot)

    # with the starting model (its cell diameter row), a measured table, a long status,
    # an annotation layer
    assert widget.model_panel.use_starting_model()
    assert widget.annotate_panel.create_annotation_layer() is not None
    widget.measure_panel.measure()
    qtbot.waitUntil(lambda: widget.runner.job is None, timeout=30_000)
    assert widget.measure_panel.table is not None
    widget.segment_panel.seg_status.setText(
        f"Segmented '{NAME}' in 3.2 s: 1,204 cells in 3 slices. See the layers."
    )
    problems += _check_every_tab(widget, viewer, qtbot, shots=True)
    if hasattr(widget, "say"):  # the dock's status line: a long path must not widen it
        widget.say("error", f"/data/microscope/{NAME}_t0001.tif could not be read as a TIFF.")
        problems += _check_every_tab(widget, viewer, qtbot)
    assert not problems, "\n".join(problems)

    # the dock opened in a small window; the user drags it to its narrowest: still fits
    from qtpy.QtCore import Qt

    from cellfit.plugin.widgets import MIN_WIDTH

    viewer.window._qt_window.resizeDocks(
        [viewer.window._wrapped_dock_widgets[f"{WIDGET} ({PLUGIN})"]], [MIN_WIDTH],
        Qt.Orientation.Horizontal,
    )
    _settle(qtbot, 300)
    assert widget.width() <= MIN_WIDTH + 30
    problems = _check_every_tab(widget, viewer, qtbot)
    assert not problems, "\n".join(problems)


def test_training_scrolls_the_dock_to_the_plot(small_window, qtbot):
    """In a short window the Train tab is taller than the dock: when training starts,
    the dock scrolls so that the progress and the live plot are on screen."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QScrollArea

    from cellfit.plugin._layout import reveal

    _viewer, widget = small_window
    widget.tabs.setCurrentWidget(widget.train_panel)
    _settle(qtbot)
    port = widget.findChild(QScrollArea).viewport()
    plot = widget.train_panel.plot

    def plot_rows() -> tuple[int, int]:
        top = plot.mapTo(port, QPoint(0, 0)).y()
        return top, top + plot.height()

    top, bottom = plot_rows()
    assert bottom > port.height(), "the Train tab fits: this test needs a short window"
    reveal(plot)  # what Train does when it starts the job
    _settle(qtbot)
    top, bottom = plot_rows()
    assert top >= 0 and bottom <= port.height() + 1, (top, bottom, port.height())


def test_a_wide_window_gets_a_wider_dock(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 950)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    _settle(qtbot, 300)
    assert widget.width() >= 400
    assert not _check_every_tab(widget, viewer, qtbot)


def test_a_narrow_combo_box_ends_its_text_with_an_ellipsis(qtbot, monkeypatch):
    """What the box paints is the text cut to its width with "…", and the whole text
    when it fits."""
    from cellfit.plugin.panels import _base

    painted = []

    def spy(widget, text, width):
        out = real(widget, text, width)
        painted.append(out)
        return out

    real = _base.elided
    monkeypatch.setattr(_base, "elided", spy)
    box = _base.combo([("a", "Kinds of object: one class per object")], "tip")
    qtbot.addWidget(box)
    box.resize(90, box.sizeHint().height())
    box.grab()
    assert painted and painted[-1].endswith("…") and len(painted[-1]) < 20
    box.resize(600, box.sizeHint().height())
    box.grab()
    assert painted[-1] == "Kinds of object: one class per object"
