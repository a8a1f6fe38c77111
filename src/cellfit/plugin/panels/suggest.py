"""Where to paint next (in the Annotate tab): the model's uncertainty on the slice on
screen, a ranked handful of boxes worth painting, and the predicted cells it is least
sure of, to accept or fix one by one.

The work is :class:`cellfit.plugin.jobs.SuggestJob` (the engine's
:mod:`cellfit.uncertainty`); this panel shows its result as layers ('<image>
uncertainty', '<image> suggestions', '<image> cell to check') and moves the view.
Nothing is painted unless the user presses Accept, and painted pixels are never
overwritten.
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Callable

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from cellfit.plugin._layers import (
    find_layer,
    labels_shape,
    layer_data,
    layer_stack_shape,
    next_free_id,
    planes_of,
    show_boxes,
    show_prediction,
    show_uncertainty,
    stack_position,
)
from cellfit.plugin._layout import WrapButton, flow_row
from cellfit.plugin._runner import JobRunner
from cellfit.plugin._state import CellfitState
from cellfit.plugin._tooltips import TIPS, WHY_OFF
from cellfit.plugin.jobs import SuggestJob, SuggestResult
from cellfit.plugin.panels._base import Panel, enable, first, small_label
from cellfit.uncertainty import DoubtfulCell, Region

__all__ = ["SuggestPanel", "cell_words", "region_words"]

#: the part of the view a suggested box or a cell takes when the view moves to it
VIEW_MARGIN = 1.6


def region_words(region: Region, n: int, painted: bool) -> str:
    """Why box ``region`` (of ``n``) is worth painting, in plain words; ``painted``:
    anything is painted on the slice yet."""
    u = region.uncertainty
    unsure = "very unsure" if u >= 0.5 else "unsure" if u >= 0.2 else "a little unsure"
    if not painted:
        new = "and nothing is painted on this slice yet"
    elif region.novelty >= 0.6:
        new = "and nothing like it is painted yet"
    elif region.novelty >= 0.3:
        new = "and it looks a little unlike what you painted"
    else:
        new = "although it looks like what you painted"
    return (
        f"Box {region.rank} of {n}: the model is {unsure} here, {new}. Paint a few whole "
        "cells and some background in it, then Train."
    )


def cell_words(cell: DoubtfulCell, n: int, what: str = "cell") -> str:
    """What to do with doubtful cell ``cell`` (of ``n``), in plain words."""
    s = cell.score
    unsure = "very unsure" if s >= 0.5 else "unsure" if s >= 0.2 else "a little unsure"
    return (
        f"{what.capitalize()} {cell.rank} of {n}: the model is {unsure} of it. If its "
        "outline is right, press Accept; if not, paint it right yourself, or Skip."
    )


class SuggestPanel(Panel):
    """"Where to paint next": Suggest where to paint, the boxes, the doubtful cells.

    Parameters
    ----------
    state, runner
        The dock's shared state and job runner.
    require_annotation : callable
        The annotation layer, made when there is none (None when it cannot be).
    painted : callable
        Called after Accept painted into the annotation (the counts follow).

    Attributes
    ----------
    result : SuggestResult or None
        The last suggestions (for tests and scripts).
    region_index, cell_index : int
        The box and the cell shown (-1: none yet).
    """

    def __init__(
        self,
        state: CellfitState,
        runner: JobRunner,
        require_annotation: Callable[[], Labels | None],
        painted: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(state, runner)
        self.require_annotation = require_annotation
        self.painted = painted or (lambda: None)
        self.result: SuggestResult | None = None
        self.region_index = -1
        self.cell_index = -1
        self._image_name = ""
        self._stack: tuple[int, ...] = ()
        self.accepted: dict[int, int] = {}  # object id -> the value it was painted with

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        box = QGroupBox("Where to paint next")
        lay = QVBoxLayout(box)
        outer.addWidget(box)
        lay.addWidget(small_label(
            "The model shows where it is unsure on the slice on screen, and which places "
            "are unlike anything painted yet: painting there teaches it most."
        ))
        self.suggest_button = WrapButton("Suggest where to paint")
        self.suggest_button.setToolTip(TIPS["suggest"])
        self.suggest_button.clicked.connect(self.suggest)
        lay.addWidget(self.suggest_button)

        self.busy_row = QWidget()
        row = QHBoxLayout(self.busy_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(TIPS["suggest_cancel"])
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        self.busy_row.setVisible(False)
        lay.addWidget(self.busy_row)

        self.region_label = QLabel("")
        self.region_label.setWordWrap(True)
        lay.addWidget(self.region_label)
        self.prev_button = QPushButton("Previous box")
        self.prev_button.clicked.connect(self.previous_region)
        self.next_button = QPushButton("Next box")
        self.next_button.clicked.connect(self.next_region)
        lay.addWidget(flow_row(self.prev_button, self.next_button))

        self.cell_label = QLabel("")
        self.cell_label.setWordWrap(True)
        lay.addWidget(self.cell_label)
        self.cell_prev_button = QPushButton("Previous cell")
        self.cell_prev_button.clicked.connect(self.previous_cell)
        self.cell_next_button = QPushButton("Next cell")
        self.cell_next_button.clicked.connect(self.next_cell)
        self.accept_button = QPushButton("Accept")
        self.accept_button.clicked.connect(self.accept_cell)
        self.skip_button = QPushButton("Skip")
        self.skip_button.clicked.connect(self.skip_cell)
        lay.addWidget(flow_row(self.cell_prev_button, self.cell_next_button,
                               self.accept_button, self.skip_button))
        self._show_counts()

    # ------------------------------------------------------------------ the job
    def suggest(self) -> None:
        """Look at the slice on screen with the model, in the background."""
        image = self.image_for_a_job()
        if image is None:
            return
        if not self.state.has_model:
            self.error(WHY_OFF["no_model"])
            return
        state = self.state
        plane = state.current_plane(image)
        stack = layer_stack_shape(image)
        position = stack_position(plane, stack)
        annotation = state.annotation_layer()
        ann = (np.asarray(annotation.data[position]).copy() if annotation is not None
               else np.zeros(labels_shape(image)[-2:], np.uint8))
        pred = find_layer(state.viewer, f"{image.name} labels", Labels)
        labels = None
        if pred is not None and tuple(pred.data.shape[-2:]) == ann.shape:
            labels = np.asarray(pred.data[position]).copy()
        assert state.model is not None and state.info is not None
        job = SuggestJob(
            state.model, state.info, planes_of(layer_data(image), image.rgb), plane, ann,
            labels=labels, postprocess=state.postprocess_overrides(),
            threads=state.threads(state.model_device()),
            diameter=state.diameter if state.model_needs_diameter() else None,
        )
        self._image_name, self._stack = image.name, stack
        self.region_label.setText("Looking where the model is unsure…")
        self.cell_label.setText("")
        self.runner.start("suggest", job, self._on_result, on_yield=self._on_progress,
                          bar=self.bar, desc="cellfit: where to paint")

    def cancel(self) -> None:
        """Stop looking (nothing is shown)."""
        if self.runner.busy and self.runner.kind == "suggest":
            self.runner.cancel()
            self.region_label.setText("Cancelling…")

    def _on_progress(self, pr) -> None:
        if pr.notice:
            show_info(pr.notice)
        self.region_label.setText(pr.text)
        self.runner.set_progress(pr.fraction)

    def _on_result(self, result: SuggestResult) -> None:
        if result.error:
            self.error(result.error)
            self.region_label.setText(f"Could not suggest where to paint: {result.error}")
            return
        if result.cancelled or result.uncertainty is None:
            self.region_label.setText("Cancelled: nothing was suggested.")
            return
        image = self._image()
        if image is None:
            self.region_label.setText("The image was closed or changed before the model "
                                      "finished looking.")
            return
        viewer = self.state.viewer
        annotation = self.state.annotation_layer()
        self.result, self.accepted = result, {}
        self.region_index, self.cell_index = -1, -1
        if result.labels is not None and result.probability is not None:
            show_prediction(viewer, image, [result.plane], result.probability[None],
                            result.labels[None], annotation,
                            colors=self.state.model_class_colors())
        show_uncertainty(viewer, image, result.plane, result.uncertainty, annotation)
        find = find_layer(viewer, f"{image.name} cell to check", Shapes)
        if find is not None:
            viewer.layers.remove(find)
        self._draw_regions()
        if annotation is not None:  # paint straight away
            viewer.layers.selection.active = annotation
        self._show_counts()
        if result.regions:
            self.next_region()
        self.update_controls()

    # ------------------------------------------------------------------ showing
    def _image(self) -> Image | None:
        image = find_layer(self.state.viewer, self._image_name, Image)
        if image is None or layer_stack_shape(image) != self._stack:
            return None
        return image

    def _what(self) -> str:
        info = self.state.info
        return "object" if info is not None and info.mode == "semantic" else "cell"

    def _show_counts(self) -> None:
        r = self.result
        if r is None:
            self.region_label.setText("")
            self.cell_label.setText("")
            return
        n = len(r.regions)
        self.region_label.setText(
            f"{n} place{'s' if n != 1 else ''} worth painting, numbered on the "
            f"'{self._image_name} suggestions' layer." if n else
            "Nothing left to suggest: this slice is painted almost everywhere."
        )
        what, c = self._what(), len(r.cells)
        self.cell_label.setText(
            f"{c} predicted {what}{'s' if c != 1 else ''} to check, least sure first: press "
            f"Next {what}." if c else f"No predicted {what}s left to check on this slice."
        )

    def _draw_regions(self) -> None:
        image = self._image()
        if image is None or self.result is None:
            return
        regions = self.result.regions
        show_boxes(self.state.viewer, image, f"{image.name} suggestions", self.result.plane,
                   [r.box for r in regions], [r.rank for r in regions],
                   current=self.region_index if self.region_index >= 0 else None)

    def _go_to(self, image: Image, centre: tuple[float, float], side: float) -> None:
        """Move the view to ``centre`` (y, x) of the suggestions' plane, showing a square
        of ``side`` pixels."""
        assert self.result is not None
        viewer = self.state.viewer
        position = (*stack_position(self.result.plane, self._stack), *centre)
        world = np.asarray(image.data_to_world(position), dtype=float)
        if self._stack:
            axes = list(range(viewer.dims.ndim - len(world), viewer.dims.ndim))
            for axis, value in zip(axes[: len(self._stack)], world[: len(self._stack)]):
                viewer.dims.set_point(axis, value)
        if viewer.dims.ndisplay == 2:
            extent = np.asarray(viewer.layers.extent.world, dtype=float)[:, -2:]
            span = float(np.max(extent[1] - extent[0]))
            viewer.reset_view()
            fit = float(viewer.camera.zoom)
            unit = float(np.max(np.abs(image.scale[-2:])))
            viewer.camera.zoom = max(fit, fit * span / (VIEW_MARGIN * side * unit))
        viewer.camera.center = tuple(world[-2:])

    def show_region(self, k: int) -> None:
        """Move the view to suggested box ``k`` (0 the best) and say why it is there."""
        r = self.result
        image = self._image()
        if r is None or image is None or not r.regions:
            return
        self.region_index = k % len(r.regions)
        region = r.regions[self.region_index]
        self._draw_regions()
        self._go_to(image, region.centre, max(region.y1 - region.y0, region.x1 - region.x0))
        annotation = self.state.annotation_layer()
        plane = np.asarray(annotation.data[stack_position(r.plane, self._stack)]) if (
            annotation is not None) else None
        self.region_label.setText(
            region_words(region, len(r.regions), plane is not None and bool(np.any(plane)))
        )
        self.update_controls()

    def next_region(self) -> None:
        self.show_region(self.region_index + 1)

    def previous_region(self) -> None:
        self.show_region(self.region_index - 1 if self.region_index > 0 else -1)

    def show_cell(self, k: int) -> None:
        """Move the view to doubtful cell ``k`` (0 the least sure) and outline it."""
        r = self.result
        image = self._image()
        if r is None or image is None or not r.cells:
            return
        self.cell_index = k % len(r.cells)
        cell = r.cells[self.cell_index]
        y0, x0, y1, x1 = cell.bbox
        pad = 3
        show_boxes(self.state.viewer, image, f"{image.name} cell to check", r.plane,
                   [(y0 - pad, x0 - pad, y1 + pad, x1 + pad)], color="#ff4fd8")
        annotation = self.state.annotation_layer()
        if annotation is not None:
            self.state.viewer.layers.selection.active = annotation
        self._go_to(image, (cell.y, cell.x), 3 * max(y1 - y0, x1 - x0, 8))
        text = cell_words(cell, len(r.cells), self._what())
        if cell.label in self.accepted:
            text = f"Accepted (painted as {self.accepted[cell.label]}). " + text
        self.cell_label.setText(text)
        self.update_controls()

    def next_cell(self) -> None:
        self.show_cell(self.cell_index + 1)

    def previous_cell(self) -> None:
        self.show_cell(self.cell_index - 1 if self.cell_index > 0 else -1)

    def skip_cell(self) -> None:
        """Leave the cell shown as it is; show the next one."""
        self.next_cell()

    # ------------------------------------------------------------------- accept
    def accept_cell(self) -> int:
        """Paint the predicted cell shown into the annotation (one undoable edit): a new
        cell id in instance mode, its class in semantic mode; only unpainted pixels are
        written. Returns the number of pixels painted; then the next cell is shown."""
        r = self.result
        image = self._image()
        if r is None or r.objects is None or image is None or not (
            0 <= self.cell_index < len(r.cells)
        ):
            self.error(WHY_OFF["no_cell_shown"])
            return 0
        layer = self.require_annotation()
        if layer is None:
            return 0
        position = stack_position(r.plane, self._stack)
        old = np.asarray(layer.data[position])
        if old.shape != r.objects.shape:
            self.error("The annotation layer's size differs from the image's: press Suggest "
                       "where to paint again.")
            return 0
        cell = r.cells[self.cell_index]
        value = r.values.get(cell.label) or next_free_id(layer)
        if layer.data.dtype.kind in "ui" and value > np.iinfo(layer.data.dtype).max:
            self.error(
                f"The annotation layer holds {layer.data.dtype} values and cannot take a cell "
                f"id above {value - 1}: no more cells can be added to it."
            )
            return 0
        yy, xx = np.nonzero((r.objects == cell.label) & (old == 0))
        if yy.size:
            index = (*(np.full(yy.shape, i) for i in position), yy, xx)
            layer.data_setitem(index, np.full(yy.shape, value, layer.data.dtype))  # Ctrl+Z
            self.accepted[cell.label] = int(value)
            layer.selected_label = next_free_id(layer) if not r.values else layer.selected_label
            self.painted()
        else:
            show_info("This cell is painted already: nothing to add.")
        self.state.viewer.layers.selection.active = layer
        if len(r.cells) > 1 and self.cell_index < len(r.cells) - 1:
            self.next_cell()
        else:
            self.update_controls()
        return int(yy.size)

    # ---------------------------------------------------------------- controls
    def update_controls(self, *_args) -> None:
        busy = self.busy_why()
        no_image = None if self.state.image_layer() is not None else WHY_OFF["no_image"]
        no_model = None if self.state.has_model else WHY_OFF["no_model"]
        enable(self.suggest_button, first(busy, no_image, no_model), TIPS["suggest"])
        running = self.runner.busy and self.runner.kind == "suggest"
        self.busy_row.setVisible(running)
        enable(self.cancel_button, None if running else WHY_OFF["not_suggesting"],
               TIPS["suggest_cancel"])
        r = self.result
        no_regions = None if r is not None and r.regions else WHY_OFF["no_suggestions"]
        enable(self.prev_button, no_regions, TIPS["region_prev"])
        enable(self.next_button, no_regions, TIPS["region_next"])
        no_cells = None if r is not None and r.cells else WHY_OFF["no_doubtful_cells"]
        enable(self.cell_prev_button, no_cells, TIPS["cell_prev"])
        enable(self.cell_next_button, no_cells, TIPS["cell_next"])
        shown = None if r is not None and 0 <= self.cell_index < len(r.cells) else (
            WHY_OFF["no_cell_shown"])
        enable(self.accept_button, first(no_cells, shown), TIPS["accept_cell"])
        enable(self.skip_button, first(no_cells, shown), TIPS["skip_cell"])
        semantic = self.state.info is not None and self.state.info.mode == "semantic"
        self.cell_prev_button.setText("Previous object" if semantic else "Previous cell")
        self.cell_next_button.setText("Next object" if semantic else "Next cell")
