"""The cellfit dock: annotate → train → watch → correct → fine-tune → segment.

:class:`CellfitWidget` is the assembly: it holds the shared state
(:mod:`cellfit.plugin._state`), the job runner (:mod:`cellfit.plugin._runner`), the
image choice at the top, and the five tabs (:mod:`cellfit.plugin.panels`), and it
tells the tabs when the viewer's layers, the chosen image or the model change. The
tabs build and handle their own controls; everything that computes is an engine call
made by a job of :mod:`cellfit.plugin.jobs`.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
import napari
from napari.layers import Image
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QApplication,
    QFormLayout,
    QLabel,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from cellfit.plugin._layout import TabStrip, fit_forms
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import TIPS
from cellfit.plugin.panels import (
    AnnotatePanel,
    ClassesPanel,
    MeasurePanel,
    ModelPanel,
    SegmentPanel,
    TrainPanel,
)
from cellfit.plugin.panels._base import Panel, row_label, shrinkable
from cellfit.plugin.panels.model import model_line

__all__ = ["CellfitWidget"]

#: the dock's width: at least MIN_WIDTH, opened at DOCK_WIDTH in a small window and at
#: WIDTH_SHARE of a larger one (up to MAX_WIDTH); tests/test_plugin_layout.py checks
#: every tab at napari's first window size
MIN_WIDTH = 290
DOCK_WIDTH = 300
WIDTH_SHARE = 0.28
MAX_WIDTH = 440
MARGIN = 6  # around the dock's content and inside each tab
#: the status line's colour by severity (readable on napari's dark and light themes)
STATUS_COLOURS = {"error": "#e8604c", "warning": "#d9a03f"}


class CellfitWidget(QWidget):
    """One dock widget for the whole loop, in five tabs: Annotate, Train, Segment,
    Measure, Model.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari when the widget is opened from Plugins > cellfit.

    Attributes
    ----------
    state : CellfitState
        What the tabs share (the chosen layers, the model in memory).
    runner : JobRunner
        Runs one job at a time in the background.
    annotate_panel, train_panel, segment_panel, measure_panel, model_panel : Panel
        The tabs.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = CellfitState(napari_viewer)
        self.runner = JobRunner(self)
        self.train_panel = TrainPanel(self.state, self.runner)
        self.annotate_panel = AnnotatePanel(
            self.state, self.runner, training_mode=self.train_panel.training_mode
        )
        # semantic mode's class list: the legend above the tabs (hidden for cells)
        self.classes_panel = ClassesPanel(
            self.state, self.runner, training_mode=self.train_panel.training_mode
        )
        self.segment_panel = SegmentPanel(self.state, self.runner)
        self.model_panel = ModelPanel(self.state, self.runner, device=self.train_panel.device_choice)
        self.measure_panel = MeasurePanel(self.state, self.runner)
        self.panels: list[Panel] = [
            self.annotate_panel, self.train_panel, self.segment_panel, self.measure_panel,
            self.model_panel,
        ]
        self.segment_panel.starting_button.clicked.connect(self.model_panel.use_starting_model)
        self.model_panel.model_loaded.connect(self.train_panel.adopt_loaded_model)
        for panel in [*self.panels, self.classes_panel]:
            panel.model_changed.connect(self._on_model_changed)
            panel.said.connect(self.say)
        self.train_panel.validated.connect(self.classes_panel.show_validation)
        self.train_panel.mode_combo.currentIndexChanged.connect(self._on_mode_changed)
        self.train_panel.fresh_check.toggled.connect(self._on_mode_changed)
        self.annotate_panel._count_timer.timeout.connect(self.classes_panel.refresh)
        self.runner.said.connect(self.say)
        self.runner.started.connect(self.clear_status)  # a new job: the last word is old

        self._build()
        self._connect_viewer()
        app = QApplication.instance()
        if app is not None:  # quitting napari stops a running job instead of waiting for it
            app.aboutToQuit.connect(self.shutdown)
        self.refresh_layers()
        self._on_model_changed()

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        inner = QWidget()
        scroll.setWidget(inner)
        outer.addWidget(scroll)
        lay = QVBoxLayout(inner)
        lay.setContentsMargins(MARGIN, MARGIN, MARGIN, MARGIN)

        form = QFormLayout()
        self.image_combo = shrinkable()
        self.image_combo.setToolTip(TIPS["image"])
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow(row_label("image"), self.image_combo)
        lay.addLayout(form)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        lay.addWidget(self.model_label)
        # the last error or warning, in full (napari's notifications are cut off in a
        # narrow window and go away); cleared when the next job starts
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextFormat(Qt.TextFormat.PlainText)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.status_label)
        self.clear_status()
        lay.addWidget(self.classes_panel)

        self.tabs = QTabWidget()
        self.tabs.addTab(self.annotate_panel, "1 Annotate")
        self.tabs.addTab(self.train_panel, "2 Train")
        self.tabs.addTab(self.segment_panel, "3 Segment")
        self.tabs.addTab(self.measure_panel, "4 Measure")
        self.tabs.addTab(self.model_panel, "Model")
        # Qt's tab bar never wraps: five tabs in a narrow dock would hide behind arrows
        self.tab_strip = TabStrip(self.tabs)
        lay.addWidget(self.tab_strip)
        lay.addWidget(self.tabs)
        lay.addStretch(1)
        fit_forms(self)  # a label goes above its field rather than widen the dock
        for panel in self.panels:
            panel.layout().setContentsMargins(MARGIN, MARGIN, MARGIN, MARGIN)
        self.setMinimumWidth(MIN_WIDTH)

    def sizeHint(self) -> QSize:
        # napari sizes the dock from this when it opens it. Every control fits from
        # MIN_WIDTH up (labels wrap, forms stack), so the dock takes a share of the
        # window: in napari's first window (1089 px wide, 320 of them napari's layer
        # controls) the image keeps most of the rest; a wide window gets a wide dock.
        hint = super().sizeHint()
        window = self.window()
        width = window.width() if window is not None and window is not self else 1500
        wide = int(min(max(width * WIDTH_SHARE, DOCK_WIDTH), MAX_WIDTH))
        return QSize(wide, hint.height())

    # ------------------------------------------------------------ the status line
    def say(self, severity: str, text: str) -> None:
        """Show ``text`` (an error or warning sentence) in the dock's status line."""
        colour = STATUS_COLOURS.get(severity, "")
        self.status_label.setStyleSheet(f"color: {colour};" if colour else "")
        self.status_label.setText(text)
        self.status_label.setToolTip(text)
        self.status_label.setVisible(bool(text))

    def clear_status(self, *_args) -> None:
        """Empty the status line (hidden)."""
        self.status_label.clear()
        self.status_label.setToolTip("")
        self.status_label.setVisible(False)

    # ------------------------------------------------------------ the viewer
    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "moved", "reordered"):
            getattr(ev, name).connect(self.refresh_layers)
        ev.inserted.connect(self._on_layer_inserted)
        for layer in self.viewer.layers:
            layer.events.name.connect(self.refresh_layers)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh_layers)

    def refresh_layers(self, event=None) -> None:
        """Refill the image and annotation lists from the viewer's layers."""
        current = self.image_combo.currentText()
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and layer.metadata.get("cellfit") not in ("probability", "uncertainty")
        ]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            # prefer the selected image layer, else the first one that is not our output
            active = self.viewer.layers.selection.active
            pick = active.name if isinstance(active, Image) else None
            pick = pick if pick in names else names[0]
            self.image_combo.setCurrentText(pick)
        self.image_combo.blockSignals(False)
        self._on_image_changed()

    def _on_image_changed(self, *_args) -> None:
        self.state.image_name = self.image_combo.currentText()
        self.annotate_panel.refresh_choices()
        self.measure_panel.refresh_choices()
        self._update_panels()

    def _on_slice_changed(self, event=None) -> None:
        self.annotate_panel.schedule_count()
        self.train_panel.on_slice_changed()
        self.measure_panel.on_slice_changed()

    def _update_panels(self) -> None:
        for panel in [*self.panels, self.classes_panel]:
            panel.update_controls()

    def _on_model_changed(self) -> None:
        self.model_label.setText(model_line(self.state, self.train_panel.training_mode()))
        for panel in [*self.panels, self.classes_panel]:
            panel.on_model_changed()

    def _on_mode_changed(self, *_args) -> None:
        """Cells or classes: the class list shows or hides, the counts and brushes follow."""
        self.classes_panel.refresh()
        self.model_label.setText(model_line(self.state, self.train_panel.training_mode()))
        self.annotate_panel.update_counts()
        self.annotate_panel.update_controls()

    # ----------------------------------------------------------------- jobs
    def shutdown(self) -> None:
        """Stop or cancel the running job (napari is closing)."""
        self.runner.cancel()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block (processing Qt events) until the running job ends; for scripts and tests."""
        return self.runner.wait(timeout)
