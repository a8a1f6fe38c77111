"""The end of a training run: the guard (a fine-tuning round that made the model worse
on the held-back cells gives back the model it started from, and says so) and the
calibration of the post-processing thresholds on those cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cellfit.train as ctrain
from _nets import TinyNet
from cellfit.cli import main
from cellfit.postprocess import DEFAULT_MIN_SIZE, calibrate
from cellfit.starting import TrainPlan
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer, new_model_info

TINY = {
    "patch_size": 32, "batch_size": 2, "device": "cpu", "warmup_steps": 1, "steps": 3,
    "time_limit": None, "val_every": 100, "min_val_cells_for_best": 2,
}


class FineTuner(Trainer):
    """The trainer fine-tuning a tiny network "from existing weights" (every other
    stage is the real one); ``fine_tuning=False`` makes it train from scratch."""

    fine = True

    def _build_network(self, planes, anns, model, info):
        self.plan = TrainPlan.FINE_TUNE if self.fine else TrainPlan.SCRATCH
        self.init = None
        self.info = new_model_info(self.config, planes, anns, scale=1.0)
        torch.manual_seed(self.config.seed)
        self.model = TinyNet(self.info.in_channels, self.info.n_classes)
        self.fine_tuning, self.base_lr, self.teacher = self.fine, self.config.lr, None


class FromScratch(FineTuner):
    fine = False


@pytest.fixture(scope="module")
def data():
    img, lab = synthetic_cells((96, 96), n_cells=12, seed=5)
    return img, sparse_annotation(lab, 0.9, seed=2)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict) -> bool:
    return all(torch.equal(v.cpu(), state[k]) for k, v in model.state_dict().items())


def _scores_by_weights(monkeypatch, start: dict, start_score: float, trained_score: float) -> list:
    """Make ``validation_scores`` score the starting weights ``start_score`` and any
    other weights ``trained_score`` (the rest of its figures are the real ones);
    returns the list of scores it gave."""
    real = ctrain.validation_scores
    given: list[float] = []

    def fake(model, info, crops, device, on_training=False):
        out = real(model, info, crops, device, on_training)
        out["score"] = start_score if _same(model, start) else trained_score
        given.append(out["score"])
        return out

    monkeypatch.setattr(ctrain, "validation_scores", fake)
    return given


# ------------------------------------------------------------------ the guard
def test_the_guard_puts_back_the_start_model_when_training_made_it_worse(data, monkeypatch):
    img, ann = data
    t = FineTuner([img], [ann], TrainConfig(**TINY))
    assert t.split.n_val_cells >= 2
    start = _state(t.model)
    _scores_by_weights(monkeypatch, start, start_score=0.74, trained_score=0.61)
    events = list(t.run())
    assert _same(t.model, start)
    rec = t.info.training[-1]
    assert rec["guard_scores"] == {"start": 0.74, "trained": 0.61}
    assert rec["guard"].startswith("This round of training made the model worse on the ")
    assert "(AP@0.5 0.61 against 0.74 before)" in rec["guard"]
    assert rec["guard"].endswith("paint more cells or correct more errors and train again.")
    assert rec["kept"].startswith("starting weights")
    assert not t.model.training
    # the last event tells the user; no earlier one does
    last = events[-1]
    assert last.done and "made the model worse" in last.notice
    assert not any(ev.notice for ev in events[:-1])


def test_the_guard_restores_the_start_post_processing(data, monkeypatch):
    img, ann = data
    t = FineTuner([img], [ann], TrainConfig(**TINY))
    start = _state(t.model)
    _scores_by_weights(monkeypatch, start, start_score=0.8, trained_score=0.2)
    settle = t._settle

    def training_changed_the_settings():
        t.info.postprocess = {**t.info.postprocess, "fg_threshold": 0.7}
        settle()

    t._settle = training_changed_the_settings
    list(t.run())
    assert _same(t.model, start)
    assert "fg_threshold" not in t.info.postprocess


def test_the_guard_keeps_the_trained_model_when_it_is_better(data, monkeypatch):
    img, ann = data
    t = FineTuner([img], [ann], TrainConfig(**TINY))
    start = _state(t.model)
    _scores_by_weights(monkeypatch, start, start_score=0.5, trained_score=0.9)
    events = list(t.run())
    assert not _same(t.model, start)
    rec = t.info.training[-1]
    assert rec["guard"] is None and rec["guard_scores"] == {"start": 0.5, "trained": 0.9}
    assert rec["kept"] == "best validated weights"
    assert events[-1].done and not events[-1].notice


@pytest.mark.parametrize("why", ["few held-back cells", "from scratch", "guard off"])
def test_the_guard_does_nothing_without_a_fair_comparison(data, monkeypatch, why):
    img, ann = data
    cls = FromScratch if why == "from scratch" else FineTuner
    cfg = TrainConfig(**{**TINY, "min_val_cells_for_best": 50 if why == "few held-back cells" else 2,
                         "guard": why != "guard off"})
    t = cls([img], [ann], cfg)
    start = _state(t.model)
    _scores_by_weights(monkeypatch, start, start_score=0.9, trained_score=0.1)
    events = list(t.run())
    assert not _same(t.model, start)
    rec = t.info.training[-1]
    assert rec["guard"] is None and rec["guard_scores"] is None
    assert not events[-1].notice


def test_the_guard_on_a_real_fine_tuning_round_from_a_model_in_memory(data):
    img, ann = data
    small = {**TINY, "patch_size": 64, "decoder_channels": (16, 16, 16, 16, 16), "steps": 1}
    in_memory = Trainer([img], [ann], TrainConfig(**small))  # its model, not trained
    start = _state(in_memory.model)
    t = Trainer([img], [ann], TrainConfig(**small), model=in_memory.model, info=in_memory.info)
    assert t.fine_tuning
    list(t.run())
    rec = t.info.training[-1]
    g = rec["guard_scores"]
    assert set(g) == {"start", "trained"}
    assert (rec["guard"] is not None) == (g["trained"] < g["start"])
    assert _same(t.model, start) == (rec["guard"] is not None)


def test_cellfit_info_shows_the_guard_sentence(data, monkeypatch, tmp_path, capsys):
    img, ann = data
    t = FineTuner([img], [ann], TrainConfig(**TINY))
    _scores_by_weights(monkeypatch, _state(t.model), start_score=0.7, trained_score=0.3)
    list(t.run())
    path = t.save(tmp_path / "m.cellfit")
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert t.info.training[-1]["guard"] in capsys.readouterr().out


# ------------------------------------------------------------ calibration
def _scene(cells, debris=(), shape=(60, 60)):
    """Hand-made probabilities and annotation: ``cells`` as (y, x, side, p_bg, p_in)
    squares, all painted as cells; ``debris`` the same, painted background."""
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 1.0
    ann = np.ones(shape, np.int32)
    for k, (y, x, side, p_bg, p_in) in enumerate(list(cells) + list(debris)):
        probs[:, y : y + side, x : x + side] = np.array([p_bg, p_in, 1 - p_bg - p_in])[:, None, None]
        if k < len(cells):
            ann[y : y + side, x : x + side] = k + 2
    return probs, ann


def test_calibrate_lowers_the_cell_threshold_to_find_a_dim_cell():
    bright, dim = (5, 5, 12, 0.05, 0.9), (30, 30, 12, 0.65, 0.6)  # dim: cell probability 0.35
    probs, ann = _scene([bright, dim])
    out = calibrate([probs], [ann], {"min_size": 40, "split_area": 144})
    assert out["chosen"] == {"fg_threshold": 0.3, "seed_threshold": 0.5, "min_size": 40}
    assert out["default_score"] == 0.5 and out["score"] == 1.0
    assert out["settings"] == {"min_size": 40, "split_area": 144, "fg_threshold": 0.3,
                               "seed_threshold": 0.5}


def test_calibrate_keeps_min_size_in_the_models_units():
    # planes at half the image's scale: the model's min_size 200 is 50 pixels here;
    # debris of 64 pixels is dropped only at twice that (400, 100 pixels here)
    cells = [(5, 5, 14, 0.05, 0.9), (35, 35, 14, 0.05, 0.9)]
    probs, ann = _scene(cells, debris=[(8, 38, 8, 0.05, 0.9)])
    out = calibrate([probs], [ann], {"min_size": 200}, scale=0.5)
    assert out["chosen"]["min_size"] == 400 and out["settings"]["min_size"] == 400
    assert out["default_score"] == pytest.approx(2 / 3) and out["score"] == 1.0


def test_calibrate_keeps_the_current_values_on_a_tie():
    clear = [(5, 5, 12, 0.0, 1.0), (30, 30, 12, 0.0, 1.0)]
    probs, ann = _scene(clear)
    out = calibrate([probs], [ann], {})
    assert out["chosen"] == {"fg_threshold": 0.5, "seed_threshold": 0.5, "min_size": DEFAULT_MIN_SIZE}
    assert out["score"] == out["default_score"] == 1.0
    again = calibrate([probs], [ann], {"fg_threshold": 0.4, "seed_threshold": 0.6, "min_size": 30})
    assert again["chosen"] == {"fg_threshold": 0.4, "seed_threshold": 0.6, "min_size": 30}


@pytest.mark.parametrize("on", [True, False])
def test_training_calibrates_the_model_on_the_held_back_cells(data, on):
    img, ann = data
    t = FromScratch([img], [ann], TrainConfig(**TINY, calibrate=on))
    learned = t.info.postprocess["min_size"]
    list(t.run())
    cal = t.info.training[-1]["calibration"]
    if not on:
        assert cal is None and "fg_threshold" not in t.info.postprocess
        return
    assert set(cal) == {"chosen", "score", "default_score"} and cal["score"] >= cal["default_score"]
    for key, value in cal["chosen"].items():
        assert t.info.postprocess[key] == value
    assert cal["chosen"]["min_size"] in {max(1, round(learned * f)) for f in (0.5, 1, 2)}
