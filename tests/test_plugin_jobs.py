"""The plugin's Qt-free parts: import rules, manifest, sample data, writer, and the
background jobs drained synchronously (no viewer needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, TrainEvent

TINY = {"patch_size": 64, "val_every": 2, "warmup_steps": 1, "device": "cpu", "preview_every": 0.0}
ONE = {"threads": 1}  # one torch thread: fast and steady on a small, shared CPU


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_plugin_package_imports_no_qt_napari_or_torch():
    code = (
        "import sys, cellfit.plugin, cellfit.plugin.sample_data, cellfit.plugin.writers\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'torch', 'magicgui')]\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stdout + res.stderr


def test_jobs_and_engine_import_without_qt():
    code = (
        "import sys, cellfit.train, cellfit.plugin.jobs\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari')]\n"
        "assert not bad, bad\n"
        "from cellfit.plugin._safety import triton_blocked\n"
        "assert not triton_blocked()  # no GUI here: nothing is blocked\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_triton_is_blocked_once_a_qt_gui_is_loaded():
    # the crash fix: with Qt loaded and triton not yet imported, the torch stack still
    # imports and trains, and triton is not loaded
    code = (
        "import sys, PyQt6.QtWidgets\n"
        "from cellfit.plugin import _safety\n"
        "assert _safety.triton_blocked()\n"
        "import torchvision, segmentation_models_pytorch, cellfit.train\n"
        "try:\n"
        "    import triton\n"
        "except ImportError:\n"
        "    print('blocked')\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "blocked" in res.stdout


def test_manifest_is_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-cellfit")
    pm.validate_imports()
    assert pm.display_name == "cellfit"
    assert [w.display_name for w in pm.contributions.widgets] == ["Annotate, train & segment"]
    keys = {s.key for s in pm.contributions.sample_data}
    assert keys == {"nuclei", "synthetic", "synthetic_timelapse"}
    nuclei = next(s for s in pm.contributions.sample_data if s.key == "nuclei")
    assert "BSD-3-Clause" in nuclei.display_name
    assert pm.contributions.writers[0].layer_types == ["labels"]


def test_sample_data():
    from cellfit.plugin.sample_data import (
        nuclei_sample,
        synthetic_sample,
        synthetic_timelapse_sample,
    )

    [(img, kw, kind)] = nuclei_sample()
    assert kind == "image" and img.shape == (512, 512) and img.dtype == np.uint16
    assert "BSD 3-Clause" in kw["metadata"]["licence"]
    assert "Data Science Bowl" in kw["metadata"]["source"]
    [(syn, _, _)] = synthetic_sample()
    assert syn.shape == (256, 256)
    [(stack, _, _)] = synthetic_timelapse_sample()
    assert stack.shape == (5, 192, 192)


def test_writer_keeps_labels_small(tmp_path):
    from cellfit.plugin.writers import write_labels_tiff

    labels = np.zeros((2, 20, 30), np.int32)
    labels[0, 2:5, 3:9] = 7
    labels[1, 10:15, 10:20] = 200
    [out] = write_labels_tiff(str(tmp_path / "cells"), labels, {})
    assert out.endswith("cells.tif")
    back = tifffile.imread(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert write_labels_tiff(str(tmp_path / "f.tif"), np.zeros((4, 4), np.float32), {}) == []


@pytest.fixture
def tiny_data():
    img, lab = synthetic_cells((96, 96), n_cells=8, seed=1)
    ann = sparse_annotation(lab, fraction=0.6, seed=1)
    return img, ann


def test_train_job_yields_previews_and_returns_model(tiny_data):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    img, ann = tiny_data
    config = TrainConfig(steps=3, **TINY)
    job = TrainJob([planes_of(img)], [ann[None]], config,
                   preview=(0, planes_of(img)[0]), **ONE)
    gen = job.run()
    updates = []
    while True:
        try:
            updates.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert [u.event.step for u in updates] == [1, 2, 3]
    # each update carries the engine's own event, not a copy of its fields
    assert all(isinstance(u.event, TrainEvent) for u in updates)
    assert updates[-1].event.done and updates[-1].event.fraction == pytest.approx(1.0)
    assert all(u.time_limit == config.time_limit for u in updates)
    assert updates[-1].probability is None  # the last step is previewed by the dock
    first = updates[0]
    assert first.preview_plane == 0
    assert first.probability.shape == (96, 96) and first.labels.shape == (96, 96)
    assert first.probability.min() >= 0.0 and first.probability.max() <= 1.0
    assert any(u.event.validation for u in updates)
    assert result.error is None and result.model is not None
    assert result.record["steps"] == 3
    assert result.summary["cells"] >= 2

    # fine-tune: the same model object trains on, and its record grows
    job2 = TrainJob([planes_of(img)], [ann[None]], TrainConfig(steps=2, **TINY),
                    model=result.model, info=result.info, **ONE)
    res2 = _drain(job2.run())
    assert res2.error is None and res2.model is result.model
    assert len(res2.info.training) == 2


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_train_job_stop_and_errors(tiny_data):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    img, ann = tiny_data
    job = TrainJob([planes_of(img)], [ann[None]], TrainConfig(steps=50, **TINY), **ONE)
    gen = job.run()
    next(gen)
    job.stop()
    rest = []
    while True:
        try:
            rest.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert len(rest) <= 1 and result.stopped and result.record["stopped_early"]

    stopped_early = TrainJob([planes_of(img)], [ann[None]], TrainConfig(steps=5, **TINY), **ONE)
    stopped_early.stop()
    res = _drain(stopped_early.run())
    assert res.error is None and res.record == {}

    empty = TrainJob([planes_of(img)], [np.zeros((1, 96, 96), np.uint16)], TrainConfig(steps=2, **TINY), **ONE)
    res = _drain(empty.run())
    assert res.error.startswith("no pixel is annotated") and res.model is None

    only_bg = np.where(ann > 0, 1, 0).astype(np.uint16)[None]
    res = _drain(TrainJob([planes_of(img)], [only_bg], TrainConfig(steps=2, **TINY), **ONE).run())
    assert "no cell is annotated" in res.error


def test_predict_job_stack_and_cancel(tiny_data):
    from cellfit.model import ModelInfo, build_model
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import PredictJob

    img, _ = tiny_data
    stack = np.stack([img, img[::-1], img[:, ::-1]])
    info = ModelInfo()
    model = build_model(info)
    res = _drain(PredictJob(model, info, planes_of(stack), **ONE).run())
    assert res.error is None and res.planes == [0, 1, 2]
    assert res.probability.shape == (3, 96, 96) and res.labels.shape == (3, 96, 96)
    one = _drain(PredictJob(model, info, planes_of(stack), [1], **ONE).run())
    assert one.planes == [1] and one.labels.shape == (1, 96, 96)
    job = PredictJob(model, info, planes_of(stack), **ONE)
    job.cancel()
    assert _drain(job.run()).cancelled


def test_batch_job(tmp_path, tiny_data):
    from cellfit.model import ModelInfo, build_model, save_model
    from cellfit.plugin.jobs import BatchJob

    img, _ = tiny_data
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    tifffile.imwrite(src / "b.tif", np.stack([img, img]))
    (src / "broken.tif").write_bytes(b"not a tiff")
    model_path = save_model(tmp_path / "m.cellfit", build_model(ModelInfo()), ModelInfo())
    job = BatchJob(model_path, [src], tmp_path / "out", probabilities=True, device="cpu", **ONE)
    gen = job.run()
    texts = []
    while True:
        try:
            texts.append(next(gen).text)
        except StopIteration as stop:
            res = stop.value
            break
    assert res.error is None and res.done == 2 and res.n_files == 3
    assert [name for name, _ in res.failed] == ["broken.tif"]
    assert (tmp_path / "out" / "b_labels.tif").exists()
    assert tifffile.imread(tmp_path / "out" / "b_labels.tif").shape == (2, 96, 96)
    assert (tmp_path / "out" / "a_prob.tif").exists()
    assert any("File 2 of 3: b.tif" in t for t in texts)

    missing = _drain(BatchJob(model_path, [tmp_path / "nowhere"], tmp_path / "o2").run())
    assert "does not exist" in missing.error
    same = _drain(BatchJob(model_path, [src], src).run())
    assert "separate output folder" in same.error


def test_user_message():
    from cellfit.errors import CellfitError
    from cellfit.plugin.jobs import user_message

    assert user_message(CellfitError("give a file."), "x") == "give a file."
    # an engine error that names a setting is worded as the dock labels its control
    err = CellfitError("no cells were found: set {setting}.", setting="diameter")
    assert user_message(err, "x") == "no cells were found: set Cell diameter (Segment tab)."
    err = CellfitError("make {setting} smaller.", setting="tile")  # no control: plain words
    assert user_message(err, "x") == "make the tile size smaller."
    assert "ran out of memory" in user_message(MemoryError(), "training")
    # a bug: one plain sentence, without the exception's own text (issue #12)
    msg = user_message(RuntimeError("boom"), "training")
    assert msg.startswith("training stopped on a fault in cellfit itself, not in your data")
    assert "please report it" in msg and "boom" not in msg and "RuntimeError" not in msg


def test_a_train_job_stopped_before_its_first_step_returns_no_model():
    """Stop while the trainer gets ready: nothing was trained, so no model (the dock
    keeps what it had) and no record (a model's earlier record is not this run's)."""
    from cellfit.plugin.jobs import TrainJob

    img, lab = synthetic_cells((64, 64), n_cells=6, seed=2)
    ann = sparse_annotation(lab, fraction=0.8, seed=0)
    job = TrainJob([img[None, None]], [ann[None]], TrainConfig(steps=2, init="scratch", **TINY),
                   **ONE)
    job.stop()
    result = _drain(job.run())
    assert result.error is None and result.stopped
    assert result.model is None and result.info is None and result.record == {}
    assert job.step_seconds == []


def test_fast_tile_covers_small_planes_in_one_tile():
    from cellfit.plugin.jobs import fast_tile

    assert fast_tile((512, 512)) == 640  # the plane and the engine's mirrored margin
    assert fast_tile((100, 60)) == 256
    assert fast_tile((4000, 3000)) == 1024
    assert fast_tile((1024, 1024), scale=0.5) == 640


def test_train_job_preview_follows_the_slice_on_screen():
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    frames = [synthetic_cells((96, 96), n_cells=8, seed=s) for s in (1, 2)]
    stack = planes_of(np.stack([f[0] for f in frames]))
    ann = np.stack([sparse_annotation(frames[0][1], fraction=0.6, seed=1), np.zeros((96, 96), np.uint16)])
    job = TrainJob([stack], [ann], TrainConfig(steps=4, **TINY), preview=(0, stack[0]), **ONE)
    gen = job.run()
    first = next(gen)
    assert first.preview_plane == 0
    job.show_plane(1, stack[1])  # the user moved the slider
    # the job spaces previews by 3x their cost; keep them due so the test does not
    # depend on how busy the machine is
    later = []
    for _ in range(2):
        job.preview_every = 0.0
        later.append(next(gen))
    assert later[0].preview_plane == 1 and later[0].probability.shape == (96, 96)
    job.show_plane(1, None)  # preview switched off
    assert _drain(gen).error is None


# ------------------------------------------------------------- the starting model
@pytest.fixture(scope="module")
def nuclei_30px():
    """Fluorescent nuclei about 30 pixels across (the starting model's own scenes).

    How close the estimated diameter comes is the engine's test (tests/test_starting.py);
    these tests check that the plugin's jobs estimate it, use it and report it.
    """
    from cellfit.synthetic import scene

    img, labels, _ = scene("fluo_nuclei", (192, 192), 30, seed=3)
    return img, labels


def test_train_job_from_the_starting_model_says_why_it_falls_back(tiny_data):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    img, ann = tiny_data
    two = planes_of(np.stack([img, img[::-1]], axis=-1), rgb=True)  # (1, 2, Y, X)
    assert two.shape == (1, 2, 96, 96)
    job = TrainJob([two], [ann[None]], TrainConfig(init="starting", steps=2, **TINY), **ONE)
    gen = job.run()
    first = next(gen)
    assert "2 channels" in first.event.notice
    assert "training from scratch instead" in first.event.notice
    res = _drain(gen)
    assert res.error is None and res.info.in_channels == 2 and res.record["init"] is None
    # from the starting model where it can serve: the record says so, no notice
    job = TrainJob([planes_of(img)], [ann[None]], TrainConfig(init="starting", steps=1, **TINY),
                   **ONE)
    gen = job.run()
    assert next(gen).event.notice is None
    res = _drain(gen)
    assert res.error is None and res.record["init"] == "cellfit starting model"
    assert res.info.diameter == res.summary["median_cell_diameter"]


def test_starting_model_diameter_estimate_predict_and_batch(tmp_path, nuclei_30px):
    from cellfit.model import load_model
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import DiameterJob, PredictJob
    from cellfit.starting import needs_diameter, starting_model_path

    img, labels = nuclei_30px
    model, info = load_model(starting_model_path(), "cpu")
    assert needs_diameter(info)
    res = _drain(DiameterJob(model, info, planes_of(img)[0], **ONE).run())
    # the true median diameter (of a disc of the same area) is about 30 pixels: the
    # estimate is within a factor 1.5 of it
    areas = np.bincount(labels.ravel())[1:]
    truth = float(np.median(2 * np.sqrt(areas[areas > 0] / np.pi)))
    assert 25 < truth < 35
    assert res.error is None and truth / 1.5 < res.diameter < truth * 1.5, (res.diameter, truth)

    # segmenting with no diameter estimates it first (and says so), a given one is used
    job = PredictJob(model, info, planes_of(img), **ONE)
    gen = job.run()
    notices = []
    while True:
        try:
            pr = next(gen)
        except StopIteration as stop:
            pres = stop.value
            break
        if pr.notice:
            notices.append(pr.notice)
    assert pres.error is None and pres.diameter == res.diameter
    assert len(notices) == 1 and f"estimated at {res.diameter:g} pixels" in notices[0]
    assert pres.labels.shape == (1, 192, 192) and pres.probability.shape == (1, 192, 192)
    small = _drain(PredictJob(model, info, planes_of(img), diameter=15.0, **ONE).run())
    large = _drain(PredictJob(model, info, planes_of(img), diameter=60.0, **ONE).run())
    assert small.error is None and small.diameter is None  # given: not estimated
    assert not np.allclose(small.probability, large.probability, atol=0.05)  # and used
    assert needs_diameter(info)  # the model's own record is untouched

    # no cells anywhere: one sentence in the plugin's words (no command-line option)
    flat = np.random.default_rng(0).normal(100, 1, (1, 1, 128, 128)).astype(np.float32)
    bad = _drain(DiameterJob(model, info, flat[0], **ONE).run())
    assert bad.error.lower().startswith("no cells were found") and "--" not in bad.error
    bad = _drain(PredictJob(model, info, flat, **ONE).run())
    assert bad.error.lower().startswith("no cells were found") and bad.labels is None


def test_batch_job_with_the_starting_model_estimates_the_diameter(tmp_path, nuclei_30px):
    from cellfit.plugin.jobs import BatchJob
    from cellfit.starting import starting_model_path

    img, _labels = nuclei_30px
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    job = BatchJob(starting_model_path(), [src], tmp_path / "out", device="cpu", **ONE)
    progress = []
    gen = job.run()
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
    assert res.error is None and res.done == 1
    assert len(res.notices) == 1
    assert res.notices[0].startswith("Cell diameter estimated at") and "--" not in res.notices[0]
    assert [p.notice for p in progress if p.notice] == res.notices
    assert tifffile.imread(tmp_path / "out" / "a_labels.tif").shape == img.shape


def test_every_setting_label_is_a_setting_the_engine_names():
    from cellfit.errors import SETTING_WORDS
    from cellfit.plugin._tooltips import LABELS, ROWS

    assert set(LABELS) <= set(SETTING_WORDS)
    assert "diameter" in LABELS and LABELS["diameter"] == "Cell diameter (Segment tab)"
    # a label names a row of the dock, or a layer
    for label in LABELS.values():
        row = label.split(" (")[0]
        assert row in ROWS.values() or "layer" in row, label


def test_jobs_word_engine_errors_with_the_dock_labels(monkeypatch, tiny_data, tmp_path):
    from cellfit.errors import CellfitError
    from cellfit.file_prediction import FileEvent
    from cellfit.model import ModelInfo, build_model, save_model
    from cellfit.plugin import jobs
    from cellfit.plugin._layers import planes_of

    def no_cells(*_args, **_kwargs):
        raise CellfitError("no cells were found at 15-480 pixels: set {setting}.",
                           setting="diameter")

    monkeypatch.setattr(jobs, "estimate_diameter", no_cells)
    img, _ = tiny_data
    info = ModelInfo()
    model = build_model(info)
    res = _drain(jobs.DiameterJob(model, info, planes_of(img)[0], **ONE).run())
    assert res.error == "no cells were found at 15-480 pixels: set Cell diameter (Segment tab)."
    monkeypatch.setattr(jobs, "needs_diameter", lambda info: True)
    res = _drain(jobs.PredictJob(model, info, planes_of(img), **ONE).run())
    assert res.error.endswith("set Cell diameter (Segment tab).") and res.labels is None

    def bad_out(*_args, **_kwargs):
        raise CellfitError("{setting} is the input folder: choose another.", setting="out")
        yield  # a generator, as the engine's

    monkeypatch.setattr(jobs, "predict_files", bad_out)
    path = save_model(tmp_path / "m.cellfit", model, info)
    res = _drain(jobs.BatchJob(path, [tmp_path], tmp_path).run())
    assert res.error == "Results to (Segment tab) is the input folder: choose another."

    def one_fails(*_args, **_kwargs):  # a file's failure names a setting too
        err = CellfitError("the GPU ran out of memory: set {setting} to CPU.", setting="device")
        yield FileEvent(0, 1, tmp_path / "a.tif", "failed", error=err)

    monkeypatch.setattr(jobs, "predict_files", one_fails)
    res = _drain(jobs.BatchJob(path, [tmp_path], tmp_path / "out").run())
    assert res.error is None
    assert res.failed == [("a.tif", "the GPU ran out of memory: set Device (Train tab) to CPU.")]

