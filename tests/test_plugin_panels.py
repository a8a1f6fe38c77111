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


# ------------------------------------------- what a new user stumbled on (issue #12)
def _tiny_model_file(tmp_path):
    import torch

    from cellfit.model import ModelInfo, build_model, save_model

    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    return save_model(tmp_path / "tiny.cellfit", build_model(info), info)


def test_greyed_out_controls_say_why_and_what_to_do(dock, qtbot, tmp_path):
    """Each disabled button's tooltip starts with why it is disabled and what to do, and
    follows the state: a job running, no model, no prediction, no image."""
    from cellfit.plugin._tooltips import TIPS, WHY_OFF, busy_reason

    annotate, train, seg, model = (dock.annotate_panel, dock.train_panel,
                                   dock.segment_panel, dock.model_panel)

    def off(widget, why: str) -> None:
        assert not widget.isEnabled()
        assert widget.toolTip().startswith(why), widget.toolTip()

    # an image, no model: segmenting and saving need one
    off(seg.predict_button, WHY_OFF["no_model"])
    off(seg.batch_button, WHY_OFF["no_model"])
    off(model.save_button, "Train or load a model first")
    off(annotate.copy_button, "Train (with the live preview) or segment the image first")
    assert "'cells labels'" in annotate.copy_button.toolTip()
    off(train.continue_button, WHY_OFF["no_stopped_run"])
    off(train.stop_button, WHY_OFF["not_training"])
    off(seg.cancel_button, WHY_OFF["not_segmenting"])
    off(train.fresh_check, WHY_OFF["no_model_fresh"])
    off(seg.slices_combo, WHY_OFF["one_slice"])
    assert train.train_button.isEnabled()
    assert "Open an image" not in train.train_button.toolTip()

    # a model: the reasons go, the tooltips say what the buttons do
    assert model.load_model_file(_tiny_model_file(tmp_path))
    assert seg.predict_button.isEnabled() and seg.predict_button.toolTip() == TIPS["predict"]
    assert model.save_button.isEnabled() and model.save_button.toolTip() == TIPS["save"]

    # a job runs: every control it locks says what runs and how to end it
    job = HeldJob()
    dock.runner.start("train", job, lambda _result: None)
    try:
        for widget in (train.train_button, seg.predict_button, model.load_button,
                       model.save_button, train.patch_combo):
            off(widget, busy_reason("train"))
        assert train.stop_button.isEnabled() and train.stop_button.toolTip() == TIPS["stop"]
    finally:
        with qtbot.waitSignal(dock.runner.finished, timeout=10_000):
            job.release.set()
    assert train.train_button.isEnabled()
    assert not train.train_button.toolTip().startswith(busy_reason("train"))

    # no image at all
    dock.viewer.layers.clear()
    off(annotate.create_button, WHY_OFF["no_image"])
    off(annotate.cell_button, WHY_OFF["no_image"])
    off(train.train_button, WHY_OFF["no_image"])
    off(seg.predict_button, WHY_OFF["no_image"])


def test_the_top_line_says_the_starting_model_segments_without_training(dock):
    text = dock.model_label.text()
    assert "No model yet" in text
    assert "starting model" in text and "without any training" in text
    assert "Use the starting model as is" in text


def test_the_train_button_says_more_only_for_a_model_trained_on_painted_cells(dock, tmp_path):
    """Use the starting model as is: nothing was trained on your cells yet, so the
    button does not say "Train more"; a model file loaded (trained before) does."""
    train, model = dock.train_panel, dock.model_panel
    assert train.train_button.text() == "Train"
    assert model.use_starting_model()
    assert train.train_plan() == "adapt"
    assert "more" not in train.train_button.text()
    assert train.train_button.text() == "Train (adapt the starting model)"
    assert model.load_model_file(_tiny_model_file(tmp_path))
    assert train.train_plan() == "fine-tune"
    assert train.train_button.text() == "Train more (fine-tune)"


def test_an_error_is_said_in_full_in_the_dock_status_line(dock, qtbot):
    """Errors go into the dock's status line too (a narrow window cuts napari's
    notifications off); the next job clears it."""
    status = dock.status_label
    assert status.isHidden() and status.text() == ""
    dock.segment_panel.predict_image()  # no model yet
    assert not status.isHidden() and status.wordWrap()
    assert status.text().startswith("There is no model yet: train one")
    assert status.text().endswith("Use the starting model as is.")  # in full
    dock.annotate_panel.use_prediction_as_annotation()
    assert status.text().startswith("There is no 'cells labels' layer yet")
    job = HeldJob()
    with qtbot.waitSignal(dock.runner.finished, timeout=10_000):
        dock.runner.start("predict", job, lambda _result: None)
        assert status.isHidden() and status.text() == ""
        job.release.set()


def test_the_files_a_folder_batch_could_not_segment_are_listed_with_their_reasons(dock):
    from cellfit.plugin.jobs import BatchResult

    seg = dock.segment_panel
    assert seg.failed_list.isHidden() and seg.failed_label.isHidden()
    reasons = [
        ("empty.tif", "image empty.tif could not be read as a TIFF: the file is empty (0 "
                      "bytes), perhaps a copy or export that did not finish; export it again."),
        ("cut.tif", "image cut.tif could not be read as a TIFF: the file may be truncated "
                    "or corrupt: export it again."),
    ]
    seg._on_batch_result(BatchResult(done=3, failed=reasons, n_files=5, out_dir="/out"))
    assert not seg.failed_list.isHidden()
    assert seg.failed_label.text() == "2 files were not segmented:"
    items = [seg.failed_list.item(i).text() for i in range(seg.failed_list.count())]
    assert items == [r[:1].upper() + r[1:] for _, r in reasons]
    assert "2 failed" in seg.seg_status.text()
    # the status line names them and points to the list
    assert "2 files were not segmented (empty.tif, cut.tif)" in dock.status_label.text()
    seg._on_batch_result(BatchResult(done=1, n_files=1, out_dir="/out"))
    assert seg.failed_list.isHidden() and seg.failed_list.count() == 0


def test_the_docks_own_segmentation_is_never_taken_for_the_annotation(dock):
    """With only '<image> labels' open (a segmentation, e.g. from Use the starting
    model as is), Annotate has no annotation layer and counts no painted cells;
    the user's own labels layers are still offered."""
    viewer = dock.viewer
    annotate = dock.annotate_panel
    _img, lab = synthetic_cells((64, 64), n_cells=4, seed=1)
    viewer.add_labels(lab.astype(np.int32), name="cells labels")
    dock.image_combo.setCurrentText("cells")
    annotate.refresh_choices()
    choices = [annotate.ann_combo.itemText(i) for i in range(annotate.ann_combo.count())]
    assert "cells labels" not in choices
    assert annotate.annotation_layer() is None
    assert dock.state.annotation_name == ""
    viewer.add_labels(np.zeros((64, 64), np.int32), name="my painting")
    annotate.refresh_choices()
    assert annotate.ann_combo.currentText() == "my painting"
    assert annotate.annotation_layer().name == "my painting"


def test_saving_never_writes_a_bare_model_over_a_package(dock, tmp_path, monkeypatch):
    """A model loaded from a bioimage.io package (.zip) is saved as a .cellfit: the
    save dialog proposes that name, and a .zip name is refused with the package left
    byte for byte."""
    from cellfit.model import ModelInfo, build_model
    from cellfit.plugin.panels import model as model_panel_module

    models = dock.model_panel
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    package = tmp_path / "shared.zip"
    package.write_bytes(b"PK\x03\x04 a package from a colleague")
    dock.state.set_model(build_model(info), info, package, saved=True)
    errors = []
    monkeypatch.setattr(models, "error", errors.append)
    assert models.save_model_file(package) is None
    assert package.read_bytes() == b"PK\x03\x04 a package from a colleague"
    assert errors and "save the model as a .cellfit file" in errors[-1]

    proposed = []

    def dialog(_parent, _title, start, _filter):
        proposed.append(start)
        return "", ""

    monkeypatch.setattr(model_panel_module.QFileDialog, "getSaveFileName", dialog)
    models._save_dialog()
    assert proposed == [str(tmp_path / "shared.cellfit")]
