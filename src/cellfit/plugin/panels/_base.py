"""What every panel of the dock shares: the shared state, the job runner, and small
builders of controls."""

from __future__ import annotations

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QLabel, QWidget

from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import ROWS

__all__ = ["Panel", "combo", "row_label", "shrinkable", "small_label"]

SMALL = "font-size: 11px; color: palette(mid);"
BUSY = "Wait for the running job to finish, or press Stop."
NO_IMAGE = "Open an image first (File > Open, or File > Open Sample > cellfit)."


class Panel(QWidget):
    """A tab of the dock.

    A panel builds its controls in ``__init__`` and enables or disables them in
    :meth:`update_controls`, which runs whenever the job runner starts or ends a job
    and whenever the dock's image, layers or model change.
    """

    #: the panel changed the model in memory (the dock then refreshes every panel)
    model_changed = Signal()

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

    def image_for_a_job(self):
        """The chosen image layer when a job may start now; None (after saying why)
        when a job runs or no image is open."""
        if self.refuse_while_busy():
            return None
        image = self.state.image_layer()
        if image is None:
            show_error(NO_IMAGE)
        return image

    def refuse_while_busy(self) -> bool:
        """True (and a notice) when a job runs: one job at a time."""
        if self.runner.busy:
            show_info(BUSY)
            return True
        return False


def small_label(text: str) -> QLabel:
    """A wrapped line of help in small, muted type."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setStyleSheet(SMALL)
    return lab


def shrinkable(box: QComboBox) -> QComboBox:
    """Let a combo box be narrower than its longest item (the dock stays narrow)."""
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(10)
    return box


def combo(items: list[tuple[str, str]], tip: str) -> QComboBox:
    """A combo box of ``(value, text)`` items (``currentData()`` is the value)."""
    box = shrinkable(QComboBox())
    for value, text in items:
        box.addItem(text, value)
    box.setToolTip(tip)
    return box


def row_label(key: str) -> str:
    """The label of a form row, e.g. "Patch size:"."""
    return f"{ROWS[key]}:"
