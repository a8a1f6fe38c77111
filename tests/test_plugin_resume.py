"""The Train tab's Continue in a headless napari: a training stopped with Stop goes on
where it stopped (the engine's resume), and ends as the same training left alone."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from cellfit.synthetic import sparse_annotation, synthetic_cells

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"

pytestmark = pytest.mark.napari


@pytest.fixture
def dock(make_napari_viewer):
    """The dock on a painted 96x96 image, set to train a new model for 8 steps on the
    CPU, without the live preview."""
    viewer = make_napari_viewer()
    image, labels = synthetic_cells((96, 96), n_cells=8, seed=1)
    viewer.add_image(image, name="cells")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    ann = widget.annotate_panel.create_annotation_layer()
    ann.data = sparse_annotation(labels, fraction=0.8, seed=0).astype(ann.data.dtype)
    train = widget.train_panel
    train.start_combo.setCurrentIndex(train.start_combo.findData("scratch"))
    train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
    train.budget_spin.setValue(8)
    train.patch_combo.setCurrentIndex(train.patch_combo.findData("128"))
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    train.preview_check.setChecked(False)
    return widget


@pytest.fixture
def held_at(monkeypatch):
    """``held_at(k)``: the next training waits after its step k until released, so the
    test can press Stop there. Returns (reached, release) events."""
    from cellfit.train import Trainer

    step = Trainer._scheduled_step
    hold = {"at": None, "reached": threading.Event(), "release": threading.Event()}

    def held(self, elapsed):
        loss = step(self, elapsed)
        if self.step == hold["at"]:
            hold["at"] = None
            hold["reached"].set()
            hold["release"].wait(60)
        return loss

    monkeypatch.setattr(Trainer, "_scheduled_step", held)

    def at(k: int):
        hold["at"] = k
        hold["reached"].clear()
        hold["release"].clear()
        return hold["reached"], hold["release"]

    return at


def _wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget.runner.job is None, timeout=240_000)


def test_continue_goes_on_with_a_stopped_training_where_it_stopped(dock, qtbot, held_at):
    from pathlib import Path

    from cellfit.plugin.jobs import torch_threads
    from cellfit.train import Trainer

    train, state = dock.train_panel, dock.state
    assert not train.continue_button.isEnabled()  # nothing stopped yet

    reached, release = held_at(3)
    train.train_button.click()
    qtbot.waitUntil(reached.is_set, timeout=240_000)
    train.stop_button.click()  # during step 3: it stops after it
    release.set()
    _wait_idle(qtbot, dock)
    res = train.last_result
    assert res.error is None and res.stopped and res.record["steps"] == 3
    run = state.stopped_run
    assert run is not None and run.step == 3 and run.can_continue
    checkpoint = Path(run.config.checkpoint)
    assert train.continue_button.isEnabled()
    assert "Press Continue to go on where it stopped" in train.train_status.text()

    train.continue_button.click()
    assert not train.continue_button.isEnabled() and not train.train_button.isEnabled()
    _wait_idle(qtbot, dock)
    res = train.last_result
    assert res.error is None and not res.stopped, res.error
    rec = state.info.training
    assert len(rec) == 1  # one record for the whole run: 8 steps, resumed at 3
    assert rec[0]["steps"] == 8 and rec[0]["resumed_at"] == [3] and len(rec[0]["losses"]) == 8
    assert state.stopped_run is None and not checkpoint.exists()
    assert not train.continue_button.isEnabled()

    # the same training left alone, in the engine, ends with the same weights
    config = replace(run.config, checkpoint=None, resume=False)
    with torch_threads(state.threads(torch.device("cpu"))):
        alone = Trainer(run.images, run.annotations, config)
        for _ in alone.run():
            pass
    got, want = state.model.state_dict(), alone.model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert rec[0]["losses"] == pytest.approx(alone.info.training[-1]["losses"], rel=1e-4)


def test_another_model_forgets_the_stopped_training(dock, monkeypatch):
    from cellfit.checkpoint import write_checkpoint
    from cellfit.model import ModelInfo, build_model
    from cellfit.plugin._state import StoppedRun
    from cellfit.train import TrainConfig

    train, state = dock.train_panel, dock.state
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    model = build_model(info)
    checkpoint = state.checkpoint_path()
    write_checkpoint(checkpoint, {"step": 2})
    stopped = StoppedRun(
        [np.zeros((1, 1, 8, 8))],
        [np.ones((1, 8, 8))],
        TrainConfig(checkpoint=checkpoint),
        "cells",
        False,
        2,
    )
    state.set_model(model, info, None, saved=False, stopped_run=stopped)
    train.update_controls()
    assert state.stopped_run is stopped and train.continue_button.isEnabled()
    # a model loaded (or made by a training that finished) replaces it
    state.set_model(model, info, None, saved=True)
    train.update_controls()
    assert state.stopped_run is None and not checkpoint.exists()
    assert not train.continue_button.isEnabled()
    # a checkpoint gone meanwhile: Continue says so and forgets the run
    state.set_model(model, info, None, saved=False, stopped_run=stopped)
    shown = []
    monkeypatch.setattr("cellfit.plugin.panels._base.show_error", shown.append)  # Panel.error
    train.continue_training()
    assert shown and "cannot go on" in shown[0] and state.stopped_run is None
    assert dock.runner.job is None
