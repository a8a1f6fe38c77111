"""The dock's parts in a headless napari: the job runner's busy signal drives every
panel's controls, and the labels errors name are the dock's own."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cellfit.events import Progress
from cellfit.synthetic import synthetic_cells

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"

pytestmark = pytest.mark.napari


class HeldJob:
    """A job that runs until released: ``run()`` yields progress, then returns "done"."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.release.set()

    def run(self):
        yield Progress(fraction=0.5, text="half way")
        self.release.wait(30)
        return "done"


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((64, 64), n_cells=4, seed=1)[0], name="cells")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


def _controls(widget) -> dict:
    """The controls a job disables, by panel (those enabled while idle in this dock)."""
    train, seg, model = widget.train_panel, widget.segment_panel, widget.model_panel
    return {
        "train": [train.train_button, train.budget_spin, train.budget_unit, train.patch_combo,
                  train.loss_combo, train.weights_combo, train.device_combo,
                  train.preview_check, train.start_combo, train.mode_combo],
        "segment": [seg.starting_button, seg.diameter_spin, seg.estimate_button,
                    seg.tta_check],
        "model": [model.load_button, model.load_starting_button],
    }


@pytest.mark.parametrize("kind", ["predict", "train"])
def test_the_runner_busy_signal_disables_and_enables_each_panels_controls(dock, qtbot, kind):
    runner = dock.runner
    controls = _controls(dock)
    assert all(w.isEnabled() for ws in controls.values() for w in ws)
    assert not dock.train_panel.stop_button.isEnabled()
    assert not dock.segment_panel.cancel_button.isEnabled()

    job = HeldJob()
    results, seen = [], []
    with qtbot.waitSignal(runner.started, timeout=5000) as started:
        runner.start(kind, job, results.append, on_yield=seen.append,
                     bar=dock.segment_panel.seg_bar)
    assert started.args == [kind] and runner.busy and runner.kind == kind
    for panel, widgets in controls.items():
        assert not any(w.isEnabled() for w in widgets), panel
    # only the running job's own Stop / Cancel button is enabled
    assert dock.train_panel.stop_button.isEnabled() is (kind == "train")
    assert dock.segment_panel.cancel_button.isEnabled() is (kind == "predict")
    qtbot.waitUntil(lambda: len(seen) == 1, timeout=5000)
    assert seen[0].text == "half way"

    with qtbot.waitSignal(runner.finished, timeout=10_000) as finished:
        job.release.set()
    assert finished.args == [kind] and not runner.busy and runner.job is None
    assert results == ["done"]
    assert all(w.isEnabled() for ws in controls.values() for w in ws)
    assert not dock.train_panel.stop_button.isEnabled()
    assert not dock.segment_panel.cancel_button.isEnabled()
    bar = dock.segment_panel.seg_bar
    assert bar.value() == bar.maximum()


def test_one_job_at_a_time_and_cancel_reaches_the_job(dock, qtbot):
    runner = dock.runner
    job = HeldJob()
    runner.start("predict", job, lambda _result: None)
    assert runner.busy
    dock.segment_panel.predict_image()  # refused: a job runs
    dock.train_panel.start_training()
    assert runner.job is job
    with qtbot.waitSignal(runner.finished, timeout=10_000):
        dock.segment_panel.cancel_button.click()
    assert job.cancelled
    assert dock.segment_panel.seg_status.text() == "Cancelling…"
    assert dock.wait(1)


def test_every_label_an_error_names_is_a_control_of_its_tab(dock):
    from qtpy.QtWidgets import QLabel

    from cellfit.plugin._tooltips import LABELS

    tabs = {dock.tabs.tabText(i).split(" ", 1)[-1]: dock.tabs.widget(i)
            for i in range(dock.tabs.count())}
    for key, label in LABELS.items():
        if " tab)" not in label or "layer" in label:
            continue
        row, tab = label[:-len(" tab)")].split(" (")
        texts = {w.text() for w in tabs[tab].findChildren(QLabel)}
        assert f"{row}:" in texts, (key, label, sorted(texts))


def test_the_shared_state_follows_the_controls(dock):
    state, seg = dock.state, dock.segment_panel
    assert state.image_name == "cells" == dock.image_combo.currentText()
    layer = dock.annotate_panel.create_annotation_layer()
    assert state.annotation_name == layer.name
    assert state.annotation_layer().name == layer.name  # (napari hands plugins proxies)
    seg.min_size_spin.setValue(40)
    assert state.postprocess_overrides() == {"min_size": 40}
    seg.min_size_spin.setValue(0)
    assert state.postprocess_overrides() == {}
    seg.diameter_spin.setValue(25.0)
    assert state.diameter == 25.0
    assert state.segment_diameter() is None  # no model that needs one
    seg.diameter_spin.setValue(0)
    assert state.diameter is None
    assert np.asarray(layer.data).shape == (64, 64)


def test_the_tta_check_box_reaches_the_predictor_of_segment_and_of_the_folder_job(
    dock, monkeypatch, tmp_path
):
    """Ticked, Segment image runs iter_predict with tta and Segment folder builds
    Settings(tta=True), whose loaded model's tile runner augments."""
    import tifffile
    import torch

    import cellfit.batch as cbatch
    import cellfit.plugin.jobs as cjobs
    from cellfit.model import ModelInfo, build_model, load_model, save_model
    from cellfit.plugin._tooltips import ROWS, TIPS
    from cellfit.plugin.jobs import BatchJob

    state, seg = dock.state, dock.segment_panel
    assert not seg.tta_check.isChecked() and state.tta is False  # off by default
    assert seg.tta_check.text() == ROWS["tta"] and seg.tta_check.toolTip() == TIPS["tta"]
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    path = save_model(tmp_path / "tiny.cellfit", build_model(info), info)
    model, info = load_model(path, "cpu")
    state.set_model(model, info, path, True)

    calls = []
    real_iter = cjobs.iter_predict

    def spy_iter(*args, **kwargs):
        calls.append(kwargs.get("tta", False))
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(cjobs, "iter_predict", spy_iter)
    loaded = []
    real_loaded = cbatch.LoadedModel

    def spy_loaded(model_path, settings):
        m = real_loaded(model_path, settings)
        loaded.append((settings.tta, m.runner.tta))
        return m

    monkeypatch.setattr(cbatch, "LoadedModel", spy_loaded)
    jobs = []
    monkeypatch.setattr(dock.runner, "start", lambda kind, job, *a, **k: jobs.append(job))

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", synthetic_cells((48, 48), n_cells=3, seed=2)[0])
    seg.in_edit.setText(str(src))
    seg.out_edit.setText(str(out))

    def drain(job):
        gen = job.run()
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    for ticked in (True, False):
        seg.tta_check.setChecked(ticked)
        assert state.tta is ticked
        seg.predict_image()
        job = jobs[-1]
        assert job.tta is ticked
        result = drain(job)
        assert result.error is None and result.labels is not None
        assert calls[-1] is ticked
        seg.predict_folder()
        job = jobs[-1]
        assert isinstance(job, BatchJob) and job.tta is ticked
        job.overwrite = True
        result = drain(job)
        assert result.error is None and result.done == 1, result
        assert loaded[-1] == (ticked, ticked)


def test_the_guard_sentence_ends_the_training_status(dock, monkeypatch):
    """When the guard put back the model a round started from, the dock's status says so
    (and does not invite the next correction as if training had helped)."""
    from cellfit.model import ModelInfo, build_model
    from cellfit.plugin.jobs import TrainResult

    shown = []
    monkeypatch.setattr("cellfit.plugin.panels.train.show_info", shown.append)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    sentence = ("This round of training made the model worse on the 12 cells held back for "
                "checking (AP@0.5 0.63 against 0.72 before), so the model it started from was "
                "kept: paint more cells or correct more errors and train again.")
    panel = dock.train_panel
    panel._on_result(TrainResult(build_model(info), info, {"steps": 5, "seconds": 2,
                                                           "guard": sentence}))
    assert panel.train_status.text().endswith(sentence)
    assert "Correct the worst mistakes" not in panel.train_status.text()
    assert shown and shown[-1].endswith(sentence)
    panel._on_result(TrainResult(build_model(info), info, {"steps": 5, "seconds": 2}))
    assert "Correct the worst mistakes" in panel.train_status.text()


def test_a_finished_job_is_freed_though_napari_keeps_its_worker(dock, qtbot):
    # napari's task list keeps every worker started while a viewer is open, with the
    # function it ran; a finished training job (its model, data, optimizer) must not
    # stay reachable from there, or each round of a day's loop keeps its memory
    import gc
    import weakref

    runner = dock.runner
    job = HeldJob()
    gone = weakref.ref(job)
    with qtbot.waitSignal(runner.finished, timeout=10_000):
        runner.start("train", job, lambda _result: None)
        job.release.set()
    del job
    gc.collect()
    assert gone() is None
