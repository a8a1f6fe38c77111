"""Model: save and load model files, take the shipped starting model, and read the
model's record (how it was trained, how well it validated)."""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Callable
from pathlib import Path

from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFileDialog, QPushButton, QTextBrowser, QVBoxLayout

from cellfit.devices import resolve_device
from cellfit.errors import CellfitError
from cellfit.model import load_model, save_model
from cellfit.plugin._display import encoder_name, model_record_html, user_runs
from cellfit.plugin._layout import flow_row
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import NO_MODEL_LINE, NO_MODEL_LINE_CLASSES, TIPS, WHY_OFF
from cellfit.plugin.panels._base import Panel, enable, first
from cellfit.starting import starting_model_path
from cellfit.train import scores_text

__all__ = ["ModelPanel", "model_line"]


class ModelPanel(Panel):
    """The Model tab.

    Parameters
    ----------
    state, runner
        The dock's shared state and job runner.
    device : callable
        The device chosen in the Train tab ("auto", "cpu", …): models load onto it.
    """

    #: a model file (or the starting model) was loaded; emitted before ``model_changed``
    model_loaded = Signal()

    def __init__(self, state: CellfitState, runner: JobRunner, device: Callable[[], str]) -> None:
        super().__init__(state, runner)
        self.device = device
        lay = QVBoxLayout(self)
        self.save_button = QPushButton("Save model…")
        self.save_button.setToolTip(TIPS["save"])
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Load model…")
        self.load_button.setToolTip(TIPS["load"])
        self.load_button.clicked.connect(self._load_dialog)
        self.load_starting_button = QPushButton("Starting model")
        self.load_starting_button.setToolTip(TIPS["load_starting"])
        self.load_starting_button.clicked.connect(self.use_starting_model)
        lay.addWidget(flow_row(self.save_button, self.load_button, self.load_starting_button))
        self.record_view = QTextBrowser()
        self.record_view.setOpenLinks(False)
        self.record_view.setMinimumHeight(260)
        lay.addWidget(self.record_view)

    def save_model_file(self, path: str | Path) -> Path | None:
        """Save the current model to ``path`` (a .cellfit file)."""
        state = self.state
        if not state.has_model:
            self.error("There is no model to save yet: train one first.")
            return None
        path = Path(path)
        if path.suffix == "":
            path = path.with_suffix(".cellfit")
        if path.suffix.lower() == ".zip":  # a package would be replaced by a bare model
            self.error(
                f"{path.name} is a name for a bioimage.io package, which the dock does not "
                "write: save the model as a .cellfit file (make a package from it with "
                "`cellfit export`)."
            )
            return None
        try:
            shipped = path.resolve() == starting_model_path().resolve()
        except CellfitError:
            shipped = False
        if shipped:
            self.error("That file is cellfit's own starting model: save under another name.")
            return None
        try:
            save_model(path, state.model, state.info)
        except CellfitError as exc:  # a full disk, no write permission: one sentence
            self.error(str(exc))
            return None
        except OSError as exc:
            self.error(
                f"Could not save the model to {path} ({exc.strerror or 'the system refused'}): "
                "check the free space and that you may write to that folder."
            )
            return None
        state.model_path, state.model_saved = path, True
        self.model_changed.emit()
        show_info(f"Saved the model to {path}.")
        return path

    def load_model_file(self, path: str | Path) -> bool:
        """Load a .cellfit model file (or a bioimage.io package made by ``cellfit export``,
        which carries one); it becomes the current model (Train fine-tunes it)."""
        if self.refuse_while_busy():
            return False
        try:
            model, info = load_model(path, resolve_device(self.device()))
        except CellfitError as exc:
            self.error(str(exc))
            return False
        self._adopt(model, info, Path(path))
        show_info(f"Loaded the model {Path(path).name}: Segment uses it, Train fine-tunes it.")
        return True

    def use_starting_model(self) -> bool:
        """Make the shipped starting model the current model, as it is (to segment with
        it, given the cell diameter, or to fine-tune it)."""
        if self.refuse_while_busy():
            return False
        if self.state.model is not None and not self.state.model_saved:
            self.error(
                "The current model is not saved: save it first (Model tab, Save model…), "
                "then switch to the starting model."
            )
            return False
        try:
            path = starting_model_path()
            model, info = load_model(path, resolve_device(self.device()))
        except CellfitError as exc:
            self.error(str(exc))
            return False
        self._adopt(model, info, path)
        show_info(
            "Using the cellfit starting model: give the cell diameter (or press Estimate) "
            "and Segment, or paint a few cells and Train to adapt it to your images."
        )
        return True

    def _adopt(self, model, info, path: Path) -> None:
        self.state.set_model(model, info, path, saved=True)
        self.model_loaded.emit()
        self.model_changed.emit()

    def _save_dialog(self) -> None:
        start = str(self.state.model_path or Path.home() / "cells.cellfit")
        if Path(start).suffix.lower() == ".zip":  # loaded from a package: save the model in it
            start = str(Path(start).with_suffix(".cellfit"))
        if self.state.is_shipped_starting_model():
            start = str(Path.home() / "cells.cellfit")
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the cellfit model", start, "cellfit model (*.cellfit);;All files (*)"
        )
        if path:
            self.save_model_file(path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a cellfit model", str(self.state.model_path or Path.home()),
            "cellfit model (*.cellfit *.safetensors *.zip);;All files (*)",
        )
        if path:
            self.load_model_file(path)

    def on_model_changed(self) -> None:
        state = self.state
        self.record_view.setHtml(model_record_html(state.info, state.model_path, state.model_saved))
        self.update_controls()

    def update_controls(self, *_args) -> None:
        busy = self.busy_why()
        no_model = None if self.state.model is not None else WHY_OFF["no_model_save"]
        enable(self.save_button, first(busy, no_model), TIPS["save"])
        enable(self.load_button, busy, TIPS["load"])
        enable(self.load_starting_button, busy, TIPS["load_starting"])


def model_line(state: CellfitState, mode: str = "instances") -> str:
    """The line about the model in memory shown at the top of the dock (HTML); ``mode``:
    what the Train tab is set to train (for the words while there is no model)."""
    info = state.info
    if info is None:
        return NO_MODEL_LINE_CLASSES if mode == "semantic" else NO_MODEL_LINE
    last = info.training[-1] if info.training else {}
    runs = user_runs(info.training)
    val = last.get("validation") or {}
    scores = scores_text(val)  # the Train tab's words
    score = f", last validation: {scores}" if scores else ""
    where = state.model_path.name if state.model_path else "not saved"
    if state.model_path and not state.model_saved:
        where += ", changed since saved"
    if state.is_shipped_starting_model():
        return (
            "<b>Model:</b> the cellfit starting model, as shipped: it works on cells "
            "of any size (give their diameter in Segment); Train adapts it to yours."
        )
    size = ""
    if state.model_needs_diameter():
        size = " Works on cells of any size: give their diameter in Segment."
    return (
        f"<b>Model:</b> {encoder_name(info.encoder)}, {runs} training "
        f"run{'s' if runs != 1 else ''}{score} ({where}).{size}"
    )
