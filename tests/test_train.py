"""The training generator: reproducibility, limits, stop, validation, fine-tuning, modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _clock import steps_take
from cellfit.errors import CellfitError
from cellfit.model import read_model_info
from cellfit.postprocess import postprocess_settings
from cellfit.predict import predict_plane
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer

TINY = {"patch_size": 64, "batch_size": 2, "decoder_channels": (16, 16, 16, 16, 16)}


@pytest.fixture(scope="module")
def data():
    img, lab = synthetic_cells((96, 96), n_cells=10, seed=5)
    return img, lab, sparse_annotation(lab, 0.8, seed=2)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seeded_training_is_reproducible_on_cpu(data):
    img, _, ann = data
    runs = []
    for seed in (0, 0, 1):
        cfg = TrainConfig(steps=3, time_limit=None, seed=seed, val_every=100, **TINY)
        t = Trainer([img], [ann], cfg)
        losses = [e.loss for e in t.run()]
        runs.append((losses, _weights(t.model)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_step_limit_events_and_validation(data):
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=6, val_every=3, **TINY))
    events = list(t.run())
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1].done and not any(e.done for e in events[:-1])
    validated = [e.step for e in events if e.validation]
    assert validated == [3, 6]
    v = events[2].validation
    for key in ("precision", "recall", "f1", "iou", "ap50", "score"):
        assert 0.0 <= v[key] <= 1.0
    assert all(e.lr > 0 and e.elapsed >= 0 for e in events)
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)
    rec = t.info.training[-1]
    assert rec["steps"] == 6 and rec["annotation"]["cells"] > 0
    assert rec["validation"] is not None and rec["best_step"] in (3, 6)


def test_time_limit_stops_training(data, monkeypatch):
    """It stops at the first step that ends past the limit, not before, not later:
    each step "takes" 1 s of the trainer's clock, so a limit of 2.5 s is 3 steps."""
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(time_limit=2.5, val_every=1000, **TINY))
    clock = steps_take(monkeypatch, t, 1.0)
    events = list(t.run())
    assert [e.step for e in events] == [1, 2, 3] and clock["steps"] == 3
    assert events[-1].done and not any(e.done for e in events[:-1])
    assert [e.elapsed for e in events] == [1.0, 2.0, 3.0]
    assert events[-1].fraction == 1.0
    assert t.info.training[-1]["steps"] == 3 and t.info.training[-1]["seconds"] == 3.0


def test_stop_acts_before_the_next_step(data):
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=50, val_every=1000, **TINY))
    events = []
    for ev in t.run():
        events.append(ev)
        if ev.step == 2 and not ev.done:
            t.stop()
    assert events[-1].stopped and events[-1].done
    assert t.step == 2  # no step was taken after the request
    assert t.info.training[-1]["stopped_early"]


def _scripted_validation(t: Trainer, scores: list[float], weights: dict):
    """A stand-in for ``t.validate`` that scores the validations in turn as ``scores``
    says, and keeps a copy of the weights each one saw in ``weights`` (by step)."""
    left = iter(scores)

    def validate() -> dict:
        weights[t.step] = {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()}
        score = next(left)
        return {"precision": score, "recall": score, "f1": score, "iou": score,
                "ap50": score, "score": score, "on_training": False}

    return validate


def _assert_weights(model, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for k, v in state.items():
        assert torch.equal(v.cpu(), expected[k]), k


@pytest.mark.parametrize("ending", ["reaches its end", "is broken off"])
def test_keeps_the_best_checkpoint_when_enough_cells_are_held_back(data, monkeypatch, ending):
    """The run ends with the weights of its best validation, not its last: validation
    is made to score steps 1 to 5 at 0.2, 0.6, 0.5, 0.4, 0.3, so the best step (2) is
    not the last one (5), and the weights must be step 2's. The same when the consumer
    stops iterating after step 4 (the dock's Stop, a closed window)."""
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=5, time_limit=None, val_every=1,
                                          min_val_cells_for_best=1, **TINY))
    weights: dict[int, dict] = {}
    monkeypatch.setattr(t, "validate", _scripted_validation(t, [0.2, 0.6, 0.5, 0.4, 0.3], weights))
    gen = t.run()
    for ev in gen:
        if ending == "is broken off" and ev.step == 4:
            gen.close()
            break
    last = 5 if ending == "reaches its end" else 4
    assert sorted(weights) == list(range(1, last + 1))
    # training changed the weights after step 2: ending with the last ones would show
    assert any(not torch.equal(weights[2][k], weights[last][k]) for k in weights[2])
    assert t.best_step == 2
    _assert_weights(t.model, weights[2])
    rec = t.info.training[-1]
    assert rec["steps"] == last and rec["best_step"] == 2 and rec["best_score"] == 0.6
    assert rec["kept"] == "best validated weights"
    assert rec["stopped_early"] == (ending == "is broken off")


def test_few_held_back_cells_keep_the_final_weights(data):
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=3, val_every=1, **TINY))
    assert 0 < t.split.n_val_cells < 10
    final = None
    for ev in t.run():
        if ev.done:
            final = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, final[k])
    assert t.info.training[-1]["kept"] == "final weights"


def test_fine_tuning_continues_from_a_model_file(tmp_path, data):
    img, _, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=2, val_every=100, **TINY))
    list(t.run())
    path = t.save(tmp_path / "m.cellfit")
    t2 = Trainer([img], [ann], TrainConfig(steps=2, init=path, val_every=100, **TINY))
    before = _weights(t2.model).clone()
    assert torch.equal(before, _weights(t.model))
    list(t2.run())
    assert not torch.equal(before, _weights(t2.model))
    t2.save(tmp_path / "m2.cellfit")
    info = read_model_info(tmp_path / "m2.cellfit")
    assert len(info.training) == 2 and info.training[1]["init"] == str(path)
    with pytest.raises(CellfitError, match="instances mode"):
        Trainer([img], [ann], TrainConfig(steps=1, init=path, mode="semantic", **TINY))


def test_semantic_mode_many_classes():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (64, 64)).astype(np.float32)
    ann = np.zeros((64, 64), np.uint16)
    # 12 classes painted as 5x5 squares, plus background
    for k in range(12):
        y, x = divmod(k, 4)
        ann[4 + 15 * y : 9 + 15 * y, 4 + 15 * x : 9 + 15 * x] = k + 2
        img[4 + 15 * y : 9 + 15 * y, 4 + 15 * x : 9 + 15 * x] += k
    ann[60:, :] = 1
    t = Trainer([img], [ann], TrainConfig(mode="semantic", steps=2, val_every=100, **TINY))
    events = list(t.run())
    assert t.info.n_classes == 13 and len(t.info.class_names) == 13
    assert np.isfinite(events[-1].loss)
    probs = predict_plane(t.model, t.info, img[None], device=t.device)
    assert probs.shape == (13, 64, 64)


def test_stack_uses_every_annotated_slice_and_only_those(data):
    img, _lab, ann = data
    stack = np.stack([img, img, img, img])
    anns = np.zeros((4, *ann.shape), ann.dtype)
    anns[1], anns[3] = ann, ann
    t = Trainer([stack], [anns], TrainConfig(steps=1, val_every=100, **TINY))
    assert t.summary["planes"] == 2
    assert len(t.sampler.images) == 2


@pytest.mark.parametrize(
    ("ann_value", "message"),
    [(0, "no pixel is annotated"), (1, "no cell is annotated")],
)
def test_unusable_annotations_say_what_to_do(data, ann_value, message):
    img, _, _ = data
    ann = np.full(img.shape, ann_value, np.uint16)
    with pytest.raises(CellfitError, match=message):
        Trainer([img], [ann], TrainConfig(steps=1, **TINY))


def test_large_cells_are_scaled_down_and_prediction_returns_full_size():
    img, lab = synthetic_cells((256, 256), n_cells=6, radius=(28, 34), seed=1)
    ann = sparse_annotation(lab, 1.0, seed=0)
    t = Trainer([img], [ann], TrainConfig(steps=1, val_every=100, **TINY))
    assert t.info.scale < 0.6  # ~60 px cells brought to ~30 px
    assert t.sampler.images[0].shape[-1] == round(256 * t.info.scale)
    assert t.info.postprocess["min_size"] > 16
    list(t.run())
    assert predict_plane(t.model, t.info, img[None], device=t.device).shape == (3, 256, 256)


@pytest.mark.parametrize("convex", [True, False])
def test_convex_painted_cells_make_the_model_cut_merged_blobs(convex):
    """Round cells (nuclei) store their area so that merged pairs are cut; cells with
    notches (not convex) must not be cut at their notches."""
    img, lab = synthetic_cells((128, 128), n_cells=6, radius=(10, 12), seed=3)
    if not convex:  # bite a notch out of every cell
        yy, xx = np.mgrid[:128, :128]
        for i in range(1, int(lab.max()) + 1):
            cy, cx = np.argwhere(lab == i).mean(0)
            lab[(lab == i) & (np.hypot(yy - cy, xx - cx - 7) < 6)] = 0
    ann = sparse_annotation(lab, 1.0, seed=0)
    t = Trainer([img], [ann], TrainConfig(steps=1, val_every=100, **TINY))
    solid = t.summary["median_cell_solidity"]
    if convex:
        assert solid >= 0.93
        area = t.summary["median_cell_area"]
        assert t.info.postprocess["split_area"] == int(area)
        assert t.info.postprocess["min_size"] == max(16, int(0.25 * area))
        scaled = postprocess_settings(t.info.postprocess, scale=t.info.scale)  # validation's
        assert scaled["split_area"] == max(4, int(area * t.info.scale**2))
    else:
        assert solid < 0.93
        assert "split_area" not in t.info.postprocess


def test_stray_pieces_of_painted_cells_are_not_held_back_as_cells(data):
    """Specks of a painted id (a slip of the brush, or the rim of a predicted cell that
    "Use prediction as annotation" copied around painted pixels) are not cells: issue
    #12 saw "6 held-back cells" of 7 painted, and AP50 0.25 beside a pixel F1 of 0.99."""
    img, _, ann = data
    ann = ann.copy()
    n_cells = len(np.setdiff1d(np.unique(ann), [0, 1]))
    free = np.argwhere(ann == 0)
    rng = np.random.default_rng(1)
    for k, (y, x) in enumerate(free[rng.choice(len(free), 30, replace=False)]):
        ann[y, x] = 2 + k % n_cells
    t = Trainer([img], [ann], TrainConfig(steps=1, val_every=100, init="scratch", **TINY))
    assert t.split.n_val_cells == round(0.2 * n_cells)
    for va in t.split.val:
        held = np.setdiff1d(np.unique(va), [0, 1])
        sizes = [(va == v).sum() for v in held]
        assert min(sizes) > 10  # whole cells only, no speck
    # semantic mode: a class's regions come in any size, each one counts
    sem = Trainer([img], [np.where(ann >= 2, 2, ann)],
                  TrainConfig(mode="semantic", steps=1, val_every=100, **TINY))
    assert sem.split.n_val_cells > t.split.n_val_cells


def test_validation_in_words():
    from cellfit.train import scores_text, validation_text

    rec = {"validated_on": "6 held-back cells", "validation": {"f1": 0.991, "ap50": 0.25}}
    assert scores_text(rec["validation"]) == "pixels right F1 0.99, cells matched AP50 0.25"
    text = validation_text(rec)
    assert text.startswith("Validation on 6 held-back cells: pixels right F1 0.99, cells "
                           "matched AP50 0.25 (1 is perfect; F1: cell and background pixels")
    semantic = validation_text({"validated_on": "3 held-back cells", "validation": {"f1": 0.5}})
    assert semantic.endswith("pixels right F1 0.50 (1 is perfect; F1: each pixel's class told right)")
    assert validation_text({"validated_on": "6 held-back cells", "validation": None}) == ""
    assert scores_text({"f1": float("nan"), "ap50": 0.5}) == "cells matched AP50 0.50"
