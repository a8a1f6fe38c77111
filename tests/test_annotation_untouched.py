"""The user's annotation layers are never modified by training, segmenting or
"Use prediction as annotation", except where the user asked: checked by checksum of the
layers' data before and after, through the dock in a headless napari, and on the jobs
the dock runs (read-only arrays: any write into them fails at once).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig

PLUGIN = "napari-cellfit"
WIDGET = "Annotate, train & segment"
SHAPE = (64, 64)


def _digest(a) -> str:
    """The array's shape, dtype and bytes, hashed: equal only for an unchanged array."""
    a = np.asarray(a)
    return hashlib.sha256(repr((a.shape, a.dtype.str)).encode() + a.tobytes()).hexdigest()


def _paint(layer, annotation: np.ndarray, position: tuple = ()) -> None:
    """Paint into a Labels layer the way a brush does (one undoable edit)."""
    yy, xx = np.nonzero(annotation)
    index = (*(np.full(yy.shape, i) for i in position), yy, xx)
    layer.data_setitem(index, annotation[yy, xx].astype(layer.data.dtype))


def _wait_idle(qtbot, widget, timeout: float = 120.0) -> None:
    qtbot.waitUntil(lambda: widget.runner.job is None, timeout=int(timeout * 1000))


@pytest.mark.napari
def test_train_segment_and_copy_a_prediction_touch_no_annotation_but_where_asked(
    make_napari_viewer, qtbot
):
    viewer = make_napari_viewer()
    frames = [synthetic_cells(SHAPE, n_cells=6, seed=s) for s in (1, 2, 3)]
    viewer.add_image(np.stack([f[0] for f in frames]), name="movie")
    other_img, other_cells = synthetic_cells(SHAPE, n_cells=6, seed=7)
    viewer.add_image(other_img, name="other")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    annotate, train, segment = widget.annotate_panel, widget.train_panel, widget.segment_panel

    # a second image's annotation (the dock trains on it too), and a Labels layer of the
    # user's that the dock has no business with
    widget.image_combo.setCurrentText("other")
    other = annotate.create_annotation_layer()
    _paint(other, sparse_annotation(other_cells, fraction=0.6, seed=1))
    viewer.add_labels(np.stack([f[1] for f in frames]).astype(np.int32), name="my masks")
    # the annotation of the stack: two slices painted, one left for the copy
    widget.image_combo.setCurrentText("movie")
    ann = annotate.create_annotation_layer()
    assert annotate.annotation_layer().name == "movie annotation"
    for z in (0, 1):
        _paint(ann, sparse_annotation(frames[z][1], fraction=0.5, seed=z), position=(z,))
    painted = np.zeros(SHAPE, np.uint16)
    painted[2:10, 2:10] = 1  # a little background on the third slice too
    _paint(ann, painted, position=(2,))
    names = ("movie annotation", "other annotation", "my masks")

    def digests() -> dict[str, str]:
        return {name: _digest(viewer.layers[name].data) for name in names}

    before = digests()

    # train (with the live preview, which fills the prediction layers as it goes)
    train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
    train.budget_spin.setValue(2)
    train.patch_combo.setCurrentIndex(train.patch_combo.findData("128"))
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    viewer.dims.set_current_step(0, 2)
    train.train_button.click()
    _wait_idle(qtbot, widget)
    assert train.last_result.error is None
    assert digests() == before

    # segment every slice
    segment.slices_combo.setCurrentIndex(segment.slices_combo.findData("all"))
    segment.predict_button.click()
    _wait_idle(qtbot, widget)
    assert segment.last_predict_result.error is None
    assert digests() == before

    # copy the prediction of the slice on screen, as the user asks: only that slice's
    # unpainted pixels may change
    pred = viewer.layers["movie labels"]
    assert widget.state.current_plane() == 2
    if not (pred.data[2][painted == 0] > 0).any():  # a 2-step model may find no cell
        pred.data[2] = np.where(painted == 0, frames[2][1], 0)
    old = np.array(ann.data)
    assert annotate.use_prediction_as_annotation() >= 1
    new = np.asarray(ann.data)
    for z in (0, 1):  # the other slices: untouched
        assert _digest(new[z]) == _digest(old[z])
    changed = new[2] != old[2]
    assert changed.any() and (old[2][changed] == 0).all()  # only unpainted pixels written
    after = digests()
    assert {k: v for k, v in after.items() if k != "movie annotation"} == {
        k: v for k, v in before.items() if k != "movie annotation"
    }
    ann.undo()  # and the copy is one undoable edit
    assert digests() == before


@pytest.fixture
def read_only_data():
    """Two images and their annotations as the dock hands them to its jobs, read-only."""
    planes, anns = [], []
    for seed in (1, 2):
        img, cells = synthetic_cells(SHAPE, n_cells=6, seed=seed)
        planes.append(img[None, None])
        anns.append(sparse_annotation(cells, fraction=0.6, seed=seed)[None])
    for a in (*planes, *anns):
        a.flags.writeable = False
    return planes, anns


def test_the_jobs_never_write_into_what_they_are_given(read_only_data):
    """The dock copies the layers for its jobs; the engine must not write into its inputs
    either (a read-only array raises at the first write)."""
    from cellfit.plugin._layers import prediction_to_annotation
    from cellfit.plugin.jobs import PredictJob, TrainJob

    planes, anns = read_only_data
    before = [_digest(a) for a in (*planes, *anns)]
    config = TrainConfig(
        steps=2, patch_size=64, val_every=2, warmup_steps=1, device="cpu", preview_every=0.0
    )
    gen = TrainJob(planes, anns, config, preview=(0, planes[0][0]), threads=1).run()
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result = stop.value
            break
    assert result.error is None, result.error
    gen = PredictJob(result.model, result.info, planes[0], threads=1).run()
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            pres = stop.value
            break
    assert pres.error is None, pres.error
    new, _n = prediction_to_annotation(anns[0][0], pres.labels[0].astype(np.int32))
    assert not np.shares_memory(new, anns[0])
    assert [_digest(a) for a in (*planes, *anns)] == before
