"""The dock widget in a headless napari: the whole loop, stacks, and every error path.

Screenshots of the viewer with the docked widget are written during the loop to
``$CELLFIT_SCREENSHOTS`` (the README's pictures come from ``docs/screenshots``; see
docs/plugin.md for the command), or to the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellfit.synthetic import sparse_annotation, synthetic_cells

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"
DOCS_MODE = bool(os.environ.get("CELLFIT_SCREENSHOTS"))

pytestmark = pytest.mark.napari


def _open_widget(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


def _notes(since: int) -> list[tuple[str, str]]:
    from napari.utils.notifications import notification_manager

    return [(str(n.severity), n.message) for n in notification_manager.records[since:]]


def _n_notes() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def _paint(layer, annotation: np.ndarray, position: tuple = ()) -> None:
    """Paint an annotation into a Labels layer the way a brush does (undoable edits), at
    ``position`` in the stack axes."""
    yy, xx = np.nonzero(annotation)
    index = (*(np.full(yy.shape, i) for i in position), yy, xx)
    layer.data_setitem(index, annotation[yy, xx].astype(layer.data.dtype))


def _tiny_training(widget, steps: int = 4) -> None:
    train = widget.train_panel
    train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
    train.budget_spin.setValue(steps)
    train.patch_combo.setCurrentIndex(train.patch_combo.findData("128"))
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))


def _wait_idle(qtbot, widget, timeout: float = 60.0) -> None:
    qtbot.waitUntil(lambda: widget.runner.job is None, timeout=int(timeout * 1000))


class Shots:
    """Screenshots of the whole window (canvas, layer list and the docked widget)."""

    def __init__(self, viewer, folder: Path) -> None:
        self.viewer = viewer
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []

    def __call__(self, name: str, qtbot) -> Path:
        import imageio.v3 as iio

        qtbot.wait(300)
        img = self.viewer.screenshot(canvas_only=False, flash=False)
        path = self.folder / f"{name}.png"
        iio.imwrite(path, img[..., :3])
        self.paths.append(path)
        return path


@pytest.fixture
def nuclei_crop():
    """A 192 x 192 crop of the bundled real nuclei image, and a sparse annotation of it."""
    from cellfit.data import nuclei_dsb2018

    img, mask = nuclei_dsb2018()
    if DOCS_MODE:
        return img, sparse_annotation(mask, fraction=0.12, seed=2)
    sl = np.s_[160:352, 160:352]
    return img[sl], sparse_annotation(mask[sl], fraction=0.4, seed=2)


@pytest.mark.slow
def test_the_whole_loop(make_napari_viewer, qtbot, tmp_path, nuclei_crop):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    shots = Shots(viewer, Path(os.environ.get("CELLFIT_SCREENSHOTS") or tmp_path / "shots"))
    img, truth_ann = nuclei_crop
    viewer.add_image(img, name="nuclei")
    widget = _open_widget(viewer)
    annotate, train = widget.annotate_panel, widget.train_panel
    segment, models = widget.segment_panel, widget.model_panel
    assert widget.image_combo.currentText() == "nuclei"
    assert not train.train_button.isEnabled() or annotate.annotation_layer() is None

    # annotate: one click makes the layer with painting defaults
    annotate.create_button.click()
    ann = viewer.layers["nuclei annotation"]
    assert isinstance(ann, Labels) and ann.data.shape == img.shape
    assert ann.mode == "paint" and ann.selected_label == 2 and ann.n_edit_dimensions == 2
    assert viewer.layers.selection.active is ann
    annotate.bg_button.click()
    assert ann.selected_label == 1
    _paint(ann, truth_ann)
    annotate.cell_button.click()
    assert ann.selected_label == int(truth_ann.max()) + 1
    n_cells = len(np.setdiff1d(np.unique(truth_ann), [0, 1]))
    qtbot.waitUntil(lambda: f"{n_cells} cells" in annotate.count_label.text(), timeout=5000)
    viewer.reset_view()
    shots("1_annotate", qtbot)

    # train: a live preview appears while it runs; Stop ends it early
    widget.tabs.setCurrentIndex(1)
    if DOCS_MODE:  # a step budget: the same model whatever the machine's load
        train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
        train.budget_spin.setValue(int(os.environ.get("CELLFIT_SCREENSHOT_STEPS", "60")))
    else:
        _tiny_training(widget, steps=200)
    assert train.fresh_check.isEnabled() is False
    train.train_button.click()
    assert widget.runner.kind == "train" and train.stop_button.isEnabled()
    assert "nuclei labels" in viewer.layers  # added at once, filled by the first preview
    qtbot.waitUntil(lambda: train.first_preview_seconds is not None, timeout=60_000)
    prob, lab = viewer.layers["nuclei probability"], viewer.layers["nuclei labels"]
    assert prob.data.any()
    assert isinstance(prob, Image) and isinstance(lab, Labels)
    assert prob.data.shape == img.shape == lab.data.shape
    assert prob.data.dtype == np.float32 and prob.contrast_limits == [0.0, 1.0]
    assert viewer.layers.selection.active is ann  # painting goes on undisturbed
    if DOCS_MODE:
        qtbot.waitUntil(lambda: widget.runner.job is None or len(train.plot.val_steps) >= 2,
                        timeout=200_000)
    else:
        qtbot.waitUntil(lambda: len(train.plot.steps) >= 2, timeout=60_000)
    shots("2_training", qtbot)
    if not DOCS_MODE:
        train.stop_button.click()
    _wait_idle(qtbot, widget, 200)
    res = train.last_result
    assert res.error is None and widget.state.model is not None
    assert res.stopped is (not DOCS_MODE)
    assert train.stop_seconds is None or train.stop_seconds < 30
    assert train.train_button.text() == "Train more (fine-tune)"
    # by default a new model starts from the shipped starting model (its record first)
    assert res.record["init"] == "cellfit starting model"
    n_pretrain = len(widget.state.info.training) - 1
    assert n_pretrain >= 1
    assert prob.data.min() >= 0.0 and prob.data.max() <= 1.0

    # correct: copy the predicted cells the user keeps into the annotation
    widget.tabs.setCurrentIndex(0)
    assert annotate.copy_button.isEnabled()  # there is a prediction to copy now
    keep = lab.data.copy()
    ids = np.setdiff1d(np.unique(keep), [0, *np.unique(keep[truth_ann >= 2])])
    if ids.size == 0:  # a few steps may predict no unpainted cell: stand in for a prediction
        keep = np.where(truth_ann == 0, synthetic_cells(img.shape, seed=5)[1], 0)
        lab.data = keep.astype(lab.data.dtype)
    before = int(ann.data.max())
    copied = annotate.use_prediction_as_annotation()
    assert copied >= 1 and int(ann.data.max()) == max(before, 1) + copied
    assert np.all(ann.data[truth_ann > 0] == truth_ann[truth_ann > 0])  # painting kept
    ann.undo()
    assert int(ann.data.max()) == before
    ann.redo()
    shots("3_correct", qtbot)

    # fine-tune: Train again continues the same model
    widget.tabs.setCurrentIndex(1)
    model_before = widget.state.model
    if DOCS_MODE:
        train.budget_spin.setValue(60)  # steps: a short fine-tune can set a model back
    else:
        _tiny_training(widget, steps=3)
    train.train_button.click()
    _wait_idle(qtbot, widget, 200)
    assert train.last_result.error is None
    assert widget.state.model is model_before and len(widget.state.info.training) == n_pretrain + 2

    # predict the image
    widget.tabs.setCurrentIndex(2)
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    pres = segment.last_predict_result
    assert pres.error is None and pres.planes == [0]
    assert viewer.layers["nuclei labels"].data.shape == img.shape
    assert "Segmented 'nuclei'" in segment.seg_status.text()
    ann.visible = False  # look at the segmentation itself
    shots("4_segment", qtbot)
    ann.visible = True

    # batch two TIFFs of a folder, from the dock
    src, out = tmp_path / "tiffs", tmp_path / "results"
    src.mkdir()
    tifffile.imwrite(src / "one.tif", img[:96, :96])
    tifffile.imwrite(src / "two.tif", np.stack([img[:96, :96], img[96:192, 96:192]]))
    segment.in_edit.setText(str(src))
    segment.out_edit.setText(str(out))
    segment.prob_check.setChecked(True)
    segment.batch_button.click()
    _wait_idle(qtbot, widget)
    bres = segment.last_batch_result
    assert bres.error is None and bres.done == 2 and not bres.failed
    assert tifffile.imread(out / "two_labels.tif").shape == (2, 96, 96)
    assert (out / "one_prob.tif").exists()
    assert "Folder done: 2 files segmented" in segment.seg_status.text()
    first = segment.last_batch_result
    segment.batch_button.click()  # again: finished files are kept, not redone
    qtbot.waitUntil(lambda: segment.last_batch_result is not first, timeout=120_000)
    _wait_idle(qtbot, widget)
    assert segment.last_batch_result.skipped == 2 and segment.last_batch_result.done == 0
    assert "tick Replace existing results" in segment.seg_status.text()

    # models: save, show the record, load it back
    path = models.save_model_file(tmp_path / "cells")
    assert path == tmp_path / "cells.cellfit" and path.exists()
    widget.tabs.setCurrentWidget(models)  # the Model tab
    text = models.record_view.toPlainText()
    assert "Run 2" in text and "Run 1" in text and "fine-tuned" in text
    assert "Validation" in text and "cells" in text
    shots("5_model", qtbot)
    assert models.load_model_file(path)
    assert len(widget.state.info.training) == n_pretrain + 2

    # the labels writer of the manifest
    written = viewer.layers["nuclei annotation"].save(str(tmp_path / "ann.tif"), plugin=PLUGIN)
    back = tifffile.imread(written[0])
    assert back.dtype == np.uint8  # the smallest type that holds the ids
    np.testing.assert_array_equal(back, viewer.layers["nuclei annotation"].data)
    assert all(p.exists() and p.stat().st_size > 10_000 for p in shots.paths)


def test_stack_annotate_one_slice_and_preview_it(make_napari_viewer, qtbot):
    from napari.layers import Labels

    viewer = make_napari_viewer()
    frames = [synthetic_cells((96, 96), n_cells=7, seed=s) for s in (1, 2, 3)]
    stack = np.stack([f[0] for f in frames])
    viewer.add_image(stack, name="movie")
    widget = _open_widget(viewer)
    annotate, train, segment = widget.annotate_panel, widget.train_panel, widget.segment_panel
    viewer.dims.set_current_step(0, 1)
    assert widget.state.current_plane() == 1
    ann = annotate.create_annotation_layer()
    assert ann.data.shape == (3, 96, 96) and ann.n_edit_dimensions == 2
    _paint(ann, sparse_annotation(frames[1][1], fraction=0.6, seed=0), position=(1,))
    qtbot.waitUntil(lambda: "in 1 slice" in annotate.count_label.text(), timeout=5000)
    assert "this slice:" in annotate.count_label.text()

    _tiny_training(widget, steps=3)
    # as with a GPU-drawn window: napari's bar in the activity dock
    widget.runner.napari_progress = True
    train.train_button.click()
    assert widget.runner.pbar is not None and widget.runner.pbar.total == 1000
    _wait_idle(qtbot, widget)
    assert widget.runner.pbar is None
    assert train.last_result.error is None
    prob = viewer.layers["movie probability"]
    lab = viewer.layers["movie labels"]
    assert isinstance(lab, Labels) and prob.data.shape == lab.data.shape == (3, 96, 96)
    assert prob.data[1].any() and not prob.data[0].any() and not prob.data[2].any()

    # segment the current slice only, then all slices
    viewer.dims.set_current_step(0, 2)
    segment.slices_combo.setCurrentIndex(segment.slices_combo.findData("current"))
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    assert segment.last_predict_result.planes == [2]
    assert prob.data[2].any() and not prob.data[0].any()
    segment.slices_combo.setCurrentIndex(segment.slices_combo.findData("all"))
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    assert segment.last_predict_result.planes == [0, 1, 2] and prob.data[0].any()


def test_error_paths_notify_one_sentence(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _open_widget(viewer)
    annotate, train = widget.annotate_panel, widget.train_panel
    segment, models = widget.segment_panel, widget.model_panel

    def expect(action, words: str) -> None:
        n = _n_notes()
        action()
        _wait_idle(qtbot, widget)
        errors = [m for sev, m in _notes(n) if sev in ("error", "warning")]
        assert errors, f"no notification for {words!r}"
        assert words in errors[-1], errors
        assert errors[-1].count(". ") <= 1  # one sentence (a second short clause at most)

    expect(train.start_training, "Open an image first")
    expect(annotate.create_annotation_layer, "Open an image first")
    img, lab = synthetic_cells((96, 96), n_cells=6, seed=4)
    viewer.add_image(img, name="cells")
    expect(train.start_training, "There is no annotation yet")
    expect(segment.predict_image, "There is no model yet")
    expect(segment.predict_folder, "There is no model yet")
    expect(annotate.use_prediction_as_annotation, "no 'cells labels' layer yet")
    ann = annotate.create_annotation_layer()
    expect(train.start_training, "Nothing is annotated yet")
    _paint(ann, np.where(sparse_annotation(lab, seed=0) > 0, 1, 0))  # background only
    _tiny_training(widget, steps=2)
    expect(train.start_training, "no cell is annotated (only background)")  # from the engine
    _paint(ann, sparse_annotation(lab, fraction=0.7, seed=0))
    expect(lambda: models.load_model_file(tmp_path / "missing.cellfit"), "does not exist")
    bad = tmp_path / "bad.cellfit"
    bad.write_bytes(b"\x80\x04 pickled")
    expect(lambda: models.load_model_file(bad), "pickled Python file")
    expect(lambda: models.save_model_file(tmp_path / "m.cellfit"), "no model to save yet")

    train.train_button.click()
    _wait_idle(qtbot, widget)
    assert train.last_result.error is None
    expect(segment.predict_folder, "Choose the folder of TIFF images")
    segment.in_edit.setText(str(tmp_path / "nowhere"))
    expect(segment.predict_folder, "Choose a folder for the results")
    segment.out_edit.setText(str(tmp_path / "out"))
    expect(segment.predict_folder, "does not exist")  # from the engine, through the worker
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "ok.tif", img)
    (src / "broken.tif").write_bytes(b"nope")
    segment.in_edit.setText(str(src))
    expect(segment.predict_folder, "broken.tif was not segmented")
    assert segment.last_batch_result.done == 1
    assert widget.status_label.text().startswith("broken.tif was not segmented: image broken.tif")

    # a folder of bad files (issue #12): each one is listed in the Segment tab with its
    # reason in plain words, no library text ("IndexError: list index out of range",
    # "<tifffile.TiffPages @…> invalid offset…")
    raw = (src / "ok.tif").read_bytes()
    (src / "cut.tif").write_bytes(raw[: len(raw) // 2])
    (src / "empty.tif").write_bytes(b"")
    (src / "offset.tif").write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + bytes(100))
    expect(segment.predict_folder, "4 files were not segmented (broken.tif, cut.tif, empty.tif")
    failed = dict(segment.last_batch_result.failed)
    assert sorted(failed) == ["broken.tif", "cut.tif", "empty.tif", "offset.tif"]
    assert segment.failed_label.text() == "4 files were not segmented:"
    items = [segment.failed_list.item(i).text() for i in range(segment.failed_list.count())]
    assert len(items) == 4 and not segment.failed_list.isHidden()
    for text in items:
        assert "Error" not in text and "tifffile" not in text and "header=" not in text, text
        assert str(src) not in text  # the file's name, not its whole path
    assert any(t.startswith("Image empty.tif could not be read as a TIFF: the file is empty")
               for t in items)
    assert any(t.startswith("Image offset.tif could not be read as a TIFF: the file may be "
                            "truncated or corrupt") for t in items)
    assert "list under Segment folder" in widget.status_label.text()


@pytest.mark.slow
def test_opening_the_widget_in_a_running_napari_does_not_crash(tmp_path):
    """Fresh process: a viewer exists first (OpenGL context), then the plugin is opened
    from the manifest and trains. Importing triton at that point would segfault."""
    script = tmp_path / "open_in_running_napari.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import numpy as np
            import napari
            assert "torch" not in sys.modules and "triton" not in sys.modules
            viewer = napari.Viewer(show=False)
            viewer.add_image(np.random.default_rng(0).random((64, 64)), name="img")
            dock, widget = viewer.window.add_plugin_dock_widget(
                "napari-cellfit", "Annotate, train & segment")
            assert sys.modules.get("triton", 0) is None, "triton must be blocked"
            train = widget.train_panel
            ann = widget.annotate_panel.create_annotation_layer()
            ann.data[5:15, 5:15] = 2
            ann.data[30:40, 30:40] = 3
            ann.data[50:60, :] = 1
            train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
            train.budget_spin.setValue(2)
            train.patch_combo.setCurrentIndex(0)
            train.start_training()
            assert widget.wait(120), "training did not finish"
            assert train.last_result.error is None, train.last_result.error
            viewer.close()
            print("OPENED-AND-TRAINED")
            """
        )
    )
    env = dict(os.environ)
    # a hung viewer fails the test: subprocess.run raises TimeoutExpired after 240 s
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0, f"rc={res.returncode} (-11: segfault)\n{res.stdout}\n{res.stderr}"
    assert "OPENED-AND-TRAINED" in res.stdout


def test_rgb_and_several_annotated_images(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _open_widget(viewer)
    annotate, train = widget.annotate_panel, widget.train_panel
    img, lab = synthetic_cells((80, 90), n_cells=6, seed=8)
    rgb = np.stack([img // 16, img // 20, img // 24], axis=-1).astype(np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    viewer.add_image(img, name="gray")
    widget.image_combo.setCurrentText("colour")
    ann_rgb = annotate.create_annotation_layer()
    assert ann_rgb.data.shape == (80, 90)  # no colour axis in the annotation
    _paint(ann_rgb, sparse_annotation(lab, fraction=0.5, seed=1))
    widget.image_combo.setCurrentText("gray")
    ann_gray = annotate.create_annotation_layer()
    assert ann_gray.name == "gray annotation"
    _paint(ann_gray, sparse_annotation(lab, fraction=0.5, seed=2))
    images, anns, used = train.training_data(widget.state.image_layer(), ann_gray)
    assert used == ["gray", "colour"]
    assert images[0].shape == (1, 1, 80, 90) and images[1].shape == (1, 3, 80, 90)
    assert anns[1].shape == (1, 80, 90)


# ----------------------------------------------------- the preview's layers (#12)
def test_the_live_preview_of_a_training_shows_above_the_annotation(make_napari_viewer, qtbot):
    """After Use prediction as annotation the annotation holds every predicted cell:
    the next training's live preview goes above it, not under it (the layers were
    there already, below the annotation, and stay: they are the user's)."""
    from cellfit.plugin._layers import prediction_layers

    viewer, widget, ann, _lab = _painted_widget(make_napari_viewer, qtbot)
    train = widget.train_panel
    prediction_layers(viewer, viewer.layers["cells"], ann)  # as a Segment made them

    def names() -> list[str]:
        return [layer.name for layer in viewer.layers]

    assert names().index("cells labels") < names().index("cells annotation")
    train.train_button.click()
    try:
        order = names()
        assert (order.index("cells annotation") < order.index("cells probability")
                < order.index("cells labels"))
        assert viewer.layers.selection.active.name == ann.name  # painting goes on
    finally:
        train.stop()
        _wait_idle(qtbot, widget)
    assert "cells labels" in viewer.layers and "cells probability" in viewer.layers


def test_a_training_stopped_before_its_first_step_changes_nothing(
    make_napari_viewer, qtbot, monkeypatch
):
    """Stop pressed while training gets ready: no model is made (the record of the
    starting model's own training was shown as this run's: "1621 steps in 138 s"), and
    the preview layers it added go again."""
    from cellfit.plugin.jobs import TrainJob

    class StoppedAtOnce(TrainJob):
        def run(self):
            self.stop()
            return (yield from super().run())

    monkeypatch.setattr("cellfit.plugin.panels.train.TrainJob", StoppedAtOnce)
    viewer, widget, _ann, _lab = _painted_widget(make_napari_viewer, qtbot)
    train = widget.train_panel
    before = [layer.name for layer in viewer.layers]
    train.train_button.click()
    assert "cells labels" in viewer.layers
    _wait_idle(qtbot, widget)
    res = train.last_result
    assert res.model is None and res.error is None and res.record == {}
    assert widget.state.model is None
    assert train.train_status.text().startswith("Training was stopped before the first step")
    assert [layer.name for layer in viewer.layers] == before


def test_a_failed_training_removes_the_layers_it_added_and_only_those(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _open_widget(viewer)
    train = widget.train_panel
    img, lab = synthetic_cells((96, 96), n_cells=6, seed=4)
    viewer.add_image(img, name="cells")
    ann = widget.annotate_panel.create_annotation_layer()
    _paint(ann, np.where(sparse_annotation(lab, seed=0) > 0, 1, 0))  # background only
    _tiny_training(widget, steps=2)
    before = [layer.name for layer in viewer.layers]
    train.train_button.click()
    assert "cells labels" in viewer.layers  # added at once for the live preview
    _wait_idle(qtbot, widget)
    assert "no cell is annotated" in train.last_result.error
    assert [layer.name for layer in viewer.layers] == before
    assert "no cell is annotated" in widget.status_label.text()

    # layers the user had are never removed
    viewer.add_image(np.zeros((96, 96), np.float32), name="cells probability")
    viewer.add_labels(np.zeros((96, 96), np.int32), name="cells labels")
    widget.image_combo.setCurrentText("cells")
    had = [layer.name for layer in viewer.layers]
    train.train_button.click()
    _wait_idle(qtbot, widget)
    assert train.last_result.error
    assert sorted(layer.name for layer in viewer.layers) == sorted(had)


# ------------------------------------------------------------- the starting model
def _painted_widget(make_napari_viewer, qtbot, seed: int = 4):
    viewer = make_napari_viewer()
    widget = _open_widget(viewer)
    img, lab = synthetic_cells((96, 96), n_cells=8, seed=seed)
    viewer.add_image(img, name="cells")
    ann = widget.annotate_panel.create_annotation_layer()
    _paint(ann, sparse_annotation(lab, fraction=0.6, seed=seed))
    _tiny_training(widget, steps=2)
    return viewer, widget, ann, lab


def test_train_starts_from_the_starting_model_unless_scratch(make_napari_viewer, qtbot):
    from cellfit.model import read_model_info
    from cellfit.starting import needs_diameter, starting_model_path
    from cellfit.train import TrainConfig

    _viewer, widget, _ann, _lab = _painted_widget(make_napari_viewer, qtbot)
    train, segment, models = widget.train_panel, widget.segment_panel, widget.model_panel
    n_pretrain = len(read_model_info(starting_model_path()).training)
    default_lr = TrainConfig().lr
    # the default: a new model from the starting model, with the engine's settings
    assert train.start_combo.currentData() == "starting"
    assert train.train_plan() == "starting" and train.train_button.text() == "Train"
    assert not train.encoder_combo.isEnabled()  # the starting model has its own size
    cfg = train.train_config(train.train_plan())
    assert cfg.init == "starting" and cfg.lr == default_lr
    train.train_button.click()
    _wait_idle(qtbot, widget)
    res = train.last_result
    assert res.error is None and res.record["init"] == "cellfit starting model"
    assert res.record["lr"] == TrainConfig().finetune_lr < default_lr
    assert len(widget.state.info.training) == n_pretrain + 1
    assert widget.state.info.cell_diameter and not needs_diameter(widget.state.info)
    # a new model, not the file
    assert widget.state.model_path is None and not widget.state.model_saved
    assert segment.diameter_box.isHidden()  # it learnt the size of the painted cells
    assert "fine-tuned from the cellfit starting model" in models.record_view.toPlainText()

    # Train again fine-tunes the user's model, with the smaller learning rate
    assert train.train_plan() == "fine-tune"
    assert train.train_button.text() == "Train more (fine-tune)"
    assert not train.start_combo.isEnabled()
    cfg = train.train_config(train.train_plan())
    assert cfg.init is None and cfg.finetune_lr < cfg.lr  # the model in memory is fine-tuned

    # a new model from scratch
    train.fresh_check.setChecked(True)
    train.start_combo.setCurrentIndex(train.start_combo.findData("scratch"))
    assert train.train_plan() == "scratch" and train.encoder_combo.isEnabled()
    train.train_button.click()
    _wait_idle(qtbot, widget)
    res = train.last_result
    assert res.error is None and res.record["init"] is None
    assert len(widget.state.info.training) == 1 and widget.state.info.cell_diameter is None
    assert "trained from scratch" in models.record_view.toPlainText()


def test_classes_mode_starts_from_the_starting_models_features(make_napari_viewer, qtbot):
    _viewer, widget, ann, _lab = _painted_widget(make_napari_viewer, qtbot, seed=5)
    train = widget.train_panel
    # classes (semantic) mode: the starting model segments cells; its learnt layers start
    # the new network, whose last layer learns the classes, with no warning
    classes = np.where(np.asarray(ann.data) >= 2, 2, ann.data).astype(ann.data.dtype)
    ann.data = classes
    train.mode_combo.setCurrentIndex(train.mode_combo.findData("semantic"))
    assert train.train_plan() == "starting"
    n = _n_notes()
    train.train_button.click()
    _wait_idle(qtbot, widget)
    assert train.last_result.error is None
    warnings = [m for sev, m in _notes(n) if sev == "warning"]
    assert not any("from scratch" in m for m in warnings), warnings
    assert widget.state.info.mode == "semantic"
    assert train.last_result.record["init"] == "cellfit starting model's features, new classes"


def test_segment_with_the_starting_model_as_is(make_napari_viewer, qtbot, tmp_path):
    from cellfit.starting import needs_diameter, starting_model_path
    from cellfit.synthetic import scene

    viewer = make_napari_viewer()
    widget = _open_widget(viewer)
    train, segment, models = widget.train_panel, widget.segment_panel, widget.model_panel
    img, _labels, _ = scene("fluo_nuclei", (192, 192), 30, seed=3)
    viewer.add_image(img, name="nuclei")
    assert not segment.starting_button.isHidden() and segment.diameter_box.isHidden()
    assert not segment.predict_button.isEnabled()
    assert models.use_starting_model()
    assert needs_diameter(widget.state.info) and widget.state.model_saved
    assert segment.starting_button.isHidden() and not segment.diameter_box.isHidden()
    assert "starting model" in widget.model_label.text()
    assert train.train_plan() == "adapt"  # Train would adapt it, with the engine's settings
    assert train.train_config("adapt").init == "starting"

    # Estimate runs in the background and fills the field
    widget.tabs.setCurrentIndex(2)
    segment.estimate_button.click()
    assert widget.runner.kind == "estimate"
    _wait_idle(qtbot, widget)
    est = segment.last_diameter_result
    assert est.error is None and est.diameter > 0
    assert segment.diameter_spin.value() == pytest.approx(est.diameter)
    assert "Cell diameter estimated at" in segment.seg_status.text()

    # segmenting uses the diameter in the field
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    pres = segment.last_predict_result
    assert pres.error is None and pres.diameter is None  # given, not estimated again
    assert viewer.layers["nuclei labels"].data.shape == img.shape
    assert f"cell diameter {est.diameter:g} pixels" in segment.seg_status.text()

    # left at "estimate", segmenting estimates it first and says so
    segment.diameter_spin.setValue(0)
    n = _n_notes()
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    assert segment.last_predict_result.diameter == pytest.approx(est.diameter)
    assert segment.diameter_spin.value() == pytest.approx(est.diameter)
    assert any("Cell diameter estimated at" in m for _, m in _notes(n))

    # the folder batch takes it too (the shipped file itself, nothing written beside it)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    segment.in_edit.setText(str(src))
    segment.out_edit.setText(str(out))
    segment.batch_button.click()
    _wait_idle(qtbot, widget)
    assert segment.last_batch_result.error is None and segment.last_batch_result.done == 1
    assert segment.last_batch_result.notices == []  # the diameter was given
    assert tifffile.imread(out / "a_labels.tif").shape == img.shape

    # the shipped file is never overwritten
    n = _n_notes()
    assert models.save_model_file(starting_model_path()) is None
    assert any("starting model" in m for sev, m in _notes(n) if sev == "error")
