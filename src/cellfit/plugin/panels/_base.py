"""What every panel of the dock shares: the shared state, the job runner, and small
builders of controls."""

from __future__ import annotations

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QPaintEvent
from qtpy.QtWidgets import (
    QComboBox,
    QLabel,
    QStyle,
    QStyleOptionComboBox,
    QStylePainter,
    QWidget,
)

from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import ROWS, WHY_OFF, busy_reason, off_tip

__all__ = ["ElidedCombo", "Panel", "combo", "elided", "enable", "first", "row_label", "shrinkable",
           "small_label"]

SMALL = "font-size: 11px; color: palette(mid);"
BUSY = "Wait for the running job to finish, or press Stop."
NO_IMAGE = WHY_OFF["no_image"]


class Panel(QWidget):
    """A tab of the dock.

    A panel builds its controls in ``__init__`` and enables or disables them in
    :meth:`update_controls`, which runs whenever the job runner starts or ends a job
    and whenever the dock's image, layers or model change.
    """

    #: the panel changed the model in memory (the dock then refreshes every panel)
    model_changed = Signal()
    #: a sentence for the dock's status line: (severity "error" or "warning", text)
    said = Signal(str, str)

    def __init__(self, state: CellfitState, runner: JobRunner) -> None:
        super().__init__()
        self.state = state
        self.runner = runner
        runner.started.connect(self.update_controls)
        runner.finished.connect(self.update_controls)

    def update_controls(self, *_args) -> None:
        """Enable, disable, show or hide the panel's controls for the current state."""

    def on_model_changed(self) -> None:
        """The model in memory changed (by this panel or another one)."""
        self.update_controls()

    def error(self, text: str) -> None:
        """Say an error: a napari notification, and the dock's status line (in full,
        where a narrow window cuts notifications off)."""
        show_error(text)
        self.said.emit("error", text)

    def warning(self, text: str) -> None:
        """Say a warning: a notification, and the dock's status line."""
        show_warning(text)
        self.said.emit("warning", text)

    def busy_why(self) -> str | None:
        """Why controls are greyed out while a job runs (None when none runs)."""
        return busy_reason(self.runner.kind) if self.runner.busy else None

    def image_for_a_job(self):
        """The chosen image layer when a job may start now; None (after saying why)
        when a job runs or no image is open."""
        if self.refuse_while_busy():
            return None
        image = self.state.image_layer()
        if image is None:
            self.error(NO_IMAGE)
        return image

    def refuse_while_busy(self) -> bool:
        """True (and a notice) when a job runs: one job at a time."""
        if self.runner.busy:
            show_info(BUSY)
            return True
        return False


def enable(widget: QWidget, why: str | None, tip: str) -> None:
    """Enable ``widget`` when there is no reason against (``why`` None); greyed out,
    its tooltip says why and what to do, then ``tip`` (what it does)."""
    widget.setEnabled(not why)
    widget.setToolTip(off_tip(why, tip))


def first(*whys: str | None) -> str | None:
    """The first reason that is set (None: none is)."""
    return next((w for w in whys if w), None)


def small_label(text: str) -> QLabel:
    """A wrapped line of help in small, muted type."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setStyleSheet(SMALL)
    return lab


class ElidedCombo(QComboBox):
    """A combo box that, narrower than its text, ends the text with "…" instead of
    cutting it off mid-letter (the whole text is in the list it opens)."""

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QStylePainter(self)
        opt = QStyleOptionComboBox()
        self.initStyleOption(opt)
        painter.drawComplexControl(QStyle.ComplexControl.CC_ComboBox, opt)
        field = self.style().subControlRect(
            QStyle.ComplexControl.CC_ComboBox, opt, QStyle.SubControl.SC_ComboBoxEditField, self
        )
        opt.currentText = elided(self, opt.currentText, field.width())
        painter.drawControl(QStyle.ControlElement.CE_ComboBoxLabel, opt)


def elided(widget: QWidget, text: str, width: int) -> str:
    """``text`` as it fits ``width`` pixels of ``widget``'s font, ending in "…" if cut."""
    return widget.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, max(width, 0))


def shrinkable() -> QComboBox:
    """A new :class:`ElidedCombo` that may be narrower than its longest item (the dock
    stays narrow)."""
    box = ElidedCombo()
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(8)  # a row label and the box fit a 300-pixel dock
    return box


def combo(items: list[tuple[str, str]], tip: str) -> QComboBox:
    """A combo box of ``(value, text)`` items (``currentData()`` is the value)."""
    box = shrinkable()
    for value, text in items:
        box.addItem(text, value)
    box.setToolTip(tip)
    return box


def row_label(key: str) -> str:
    """The label of a form row, e.g. "Patch size:"."""
    return f"{ROWS[key]}:"
