"""The trainer in named stages: each stage on its own with a tiny fake network, the
training plan (TrainPlan) through model files, the one training-length default, the
config left as given, the event family."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from _clock import steps_take
from _nets import FakeNetTrainer, TinyNet
from cellfit.errors import CellfitError
from cellfit.events import Progress
from cellfit.model import ModelInfo, build_model, model_summary, read_model_info, save_model
from cellfit.starting import TrainPlan, choose_start, plan_for_model, starting_model_path
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer, TrainEvent, config_dict

TINY = {"patch_size": 32, "batch_size": 2, "device": "cpu", "val_every": 2, "warmup_steps": 1}
#: the real U-Net++, small
SMALL_NET = {"decoder_channels": (16, 16, 16, 16, 16), "patch_size": 64}


@pytest.fixture(scope="module")
def data():
    img, lab = synthetic_cells((64, 64), n_cells=6, seed=4)
    return img, sparse_annotation(lab, 0.8, seed=1)


# ------------------------------------------------------------------ stages
def test_the_stages_one_by_one_with_a_fake_network(data):
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=2, **TINY))
    assert isinstance(t.model, TinyNet) and t.plan is TrainPlan.SCRATCH
    # data
    assert len(t.sampler.images) == 1 and t.batch_size == 2 and t.prefetch
    assert t.class_counts.sum() > 0 and len(t.class_weights) == 3
    # loss, optimiser: built again on demand, stage by stage
    loss_fn = t._build_loss()
    x, y = t.sampler.sample(2)
    value = loss_fn(t.model(torch.from_numpy(x)), torch.from_numpy(y).long())
    assert torch.isfinite(value)
    t.configure_optimizers()
    groups = t.optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [t.config.encoder_lr_scale, 1.0]
    assert not t.use_amp  # CPU: no autocast
    before = [p.detach().clone() for p in t.model.parameters()]
    loss = t.train_step()
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    scores = t.validate()
    assert {"precision", "recall", "f1", "iou", "ap50", "score", "on_training"} <= set(scores)
    assert t.model.training  # validate hands the model back in training mode
    t.batches.discard()


def test_a_whole_run_with_the_fake_network(data):
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=4, time_limit=None, **TINY))
    events = list(t.run())
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].done
    assert [e.step for e in events if e.validation] == [2, 4]
    rec = t.info.training[-1]
    assert rec["steps"] == 4 and rec["init"] is None and len(rec["losses"]) == 4
    assert not t.model.training


def test_out_of_memory_on_one_patch_names_the_patch_size(data, monkeypatch):
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=2, **{**TINY, "batch_size": 2}))

    def no_memory(self, xb, yb):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FakeNetTrainer, "_step_on", no_memory)
    with pytest.raises(CellfitError, match="make the patch size smaller") as err:
        t.train_step()
    assert err.value.setting == "patch_size"
    assert "--" not in str(err.value)
    assert t.batch_size == 1 and "continuing with 1" in t._pop_notice()
    t.batches.discard()


# -------------------------------------------------------- length and config
def test_one_training_length_default():
    cfg = TrainConfig()
    assert cfg.time_limit == 300.0 and cfg.steps is None


def test_training_without_any_limit_is_refused(data):
    img, ann = data
    with pytest.raises(CellfitError, match="no end") as err:
        FakeNetTrainer([img], [ann], TrainConfig(steps=None, time_limit=None, **TINY))
    assert err.value.setting == "time_limit"


@pytest.mark.parametrize("limits", [{"steps": 2, "time_limit": None}, {"time_limit": 0.01}])
def test_run_leaves_the_config_as_given(data, limits):
    img, ann = data
    cfg = TrainConfig(**limits, **TINY)
    before = copy.deepcopy(cfg)
    t = FakeNetTrainer([img], [ann], cfg)
    events = list(t.run())
    assert cfg == before
    assert events[-1].total_steps == limits.get("steps")


@pytest.mark.parametrize(
    ("steps", "time_limit", "expected"),
    [
        (1000, 3.5, 4),  # step 3 ends at 3 s, before the limit; step 4 at 4 s, past it
        (1000, 3.0, 3),  # a step that ends exactly at the limit is the last
        (2, 3.5, 2),  # the steps come first
        (4, 4.0, 4),  # both at once
        (None, 0.5, 1),  # a limit shorter than a step: one step all the same
    ],
)
def test_steps_and_time_whichever_comes_first(data, monkeypatch, steps, time_limit, expected):
    """Each step "takes" 1 s of the trainer's clock: the run stops at the first step
    that reaches either limit, never a step later, on any machine."""
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=steps, time_limit=time_limit,
                                                 **{**TINY, "val_every": 1000}))
    clock = steps_take(monkeypatch, t, 1.0)
    events = list(t.run())
    assert len(events) == expected and clock["steps"] == expected and t.step == expected
    assert events[-1].done and not any(e.done for e in events[:-1])
    assert events[-1].elapsed == float(expected)


def test_stop_flag_is_one_event_cleared_by_each_run(data):
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=3, time_limit=None, **TINY))
    t.stop()
    assert t.stopping
    events = list(t.run())  # a new run starts unstopped
    assert len(events) == 3 and not events[-1].stopped and not t.stopping


# ------------------------------------------------------------------ events
def test_train_events_are_progress_events(data):
    img, ann = data
    t = FakeNetTrainer([img], [ann], TrainConfig(steps=2, time_limit=None, **TINY))
    events = list(t.run())
    assert all(isinstance(e, Progress) for e in events)
    assert events[-1].fraction == 1.0 and events[0].fraction == 0.5
    assert events[0].text.startswith("step 1 of 2: loss ")
    ev = TrainEvent(step=3, loss=0.5, lr=1e-3, elapsed=1.0, fraction=0.2, notice="hi")
    assert (ev.fraction, ev.notice, ev.text) == (0.2, "hi", "step 3: loss 0.5")
    assert not hasattr(ev, "preview")


# ------------------------------------------------------------- the plan
def test_train_plan_values_are_the_words_of_settings_and_files():
    assert [p.value for p in TrainPlan] == ["fine-tune", "adapt", "starting", "scratch"]
    for plan in TrainPlan:
        assert TrainPlan(str(plan)) is plan and plan == plan.value
        assert json.loads(json.dumps({"plan": plan})) == {"plan": plan.value}
    cfg = config_dict(TrainConfig(init=TrainPlan.STARTING))
    assert cfg["init"] == "starting" and json.loads(json.dumps(cfg))["init"] == "starting"


def test_choose_start(tmp_path):
    starting = starting_model_path()
    for init in ("starting", TrainPlan.STARTING, " Starting "):
        choice = choose_start(init, "instances", 1)
        assert choice.plan is TrainPlan.STARTING and choice.init == starting
        assert choice.notice is None
    for init in (None, "scratch", TrainPlan.SCRATCH, "none", ""):
        assert choose_start(init, "instances", 1) == choose_start(None, "instances", 3)
        assert choose_start(init, "instances", 1).plan is TrainPlan.SCRATCH
    cannot = choose_start("starting", "instances", 2)
    assert cannot.plan is TrainPlan.SCRATCH and cannot.init is None
    assert cannot.notice == (
        "the starting model takes grayscale or RGB images; these have 2 channels: "
        "training from scratch instead"
    )
    semantic = choose_start("starting", "semantic", 1)  # its features, new classes
    assert semantic.plan is TrainPlan.SCRATCH and semantic.features is not None
    assert semantic.notice is None and semantic.init is None
    assert choose_start("starting", "semantic", 2).features is None  # cannot take 2 channels
    info = ModelInfo(decoder_channels=[16, 16, 16, 16, 16])
    path = save_model(tmp_path / "m.cellfit", build_model(info), info)
    assert choose_start(path, "instances", 1).plan is TrainPlan.FINE_TUNE
    assert choose_start(str(path), "instances", 1).init == str(path)
    # a model in memory is trained whatever init says (init is kept for the record)
    any_size = ModelInfo(cell_diameter=30.0)
    assert choose_start("starting", "instances", 1, any_size).plan is TrainPlan.ADAPT
    assert choose_start("starting", "instances", 1, any_size).init == "starting"
    assert choose_start(None, "instances", 1, info).plan is TrainPlan.FINE_TUNE
    with pytest.raises(CellfitError, match="does not exist"):
        choose_start(tmp_path / "none.cellfit", "instances", 1)


def test_the_plan_round_trips_through_a_saved_model_file(tmp_path, data):
    img, ann = data
    # scratch, named by the enum or by its word: the same run, the same record
    records = []
    for init in (TrainPlan.SCRATCH, "scratch"):
        t = Trainer([img], [ann], TrainConfig(init=init, steps=1, **{**TINY, **SMALL_NET}))
        assert t.plan is TrainPlan.SCRATCH and t.init is None
        list(t.run())
        records.append(
            {k: v for k, v in t.info.training[-1].items() if k not in ("date", "seconds")}
        )
    assert records[0] == records[1] and records[0]["init"] is None
    path = t.save(tmp_path / "m.cellfit")
    # the saved model is fine-tuned from its file: FINE_TUNE, the file in the record
    t2 = Trainer([img], [ann], TrainConfig(init=path, steps=1, **{**TINY, **SMALL_NET}))
    assert t2.plan is TrainPlan.FINE_TUNE and plan_for_model(read_model_info(path)) is t2.plan
    list(t2.run())
    again = read_model_info(t2.save(tmp_path / "m2.cellfit"))
    assert again.training[-1]["init"] == str(path)
    assert plan_for_model(again) is TrainPlan.FINE_TUNE


def test_the_shipped_starting_model_reads_and_describes_itself_as_before():
    info = read_model_info(starting_model_path())
    assert plan_for_model(info) is TrainPlan.ADAPT
    assert ModelInfo.from_json(info.to_json()) == info
    summary = model_summary(info)
    assert summary["mode"] == "instances" and summary["channels"] == 3
    assert summary["training runs"] == len(info.training) >= 1
    assert set(summary["last run"]) == {"date", "steps", "best_score", "validation"}


# ---------------------------------------------------------- cell size kept
def _squares(side: int, n: int = 4, shape=(96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """An image of ``n`` bright squares of ``side`` pixels, all painted, with background."""
    img = np.zeros(shape, np.float32)
    ann = np.ones(shape, np.uint16)
    for k in range(n):
        y, x = 4 + (k // 2) * 46, 4 + (k % 2) * 46
        img[y : y + side, x : x + side] = 1.0
        ann[y : y + side, x : x + side] = k + 2
    return img + np.random.default_rng(side).normal(0, 0.05, shape).astype(np.float32), ann


@pytest.mark.parametrize("side, kept", [(14, True), (32, False)])
def test_a_correction_round_keeps_the_cell_size_the_model_was_fitted_to(side, kept):
    """Going on training a model fitted to 20-pixel cells: painting cells 1.4 times
    larger keeps its scale and size rules (a drift of the painted median, not other
    cells); cells 3 times larger refit them."""
    cfg = TrainConfig(steps=1, scale=0.5, **TINY)
    first = Trainer(*map(lambda a: [a], _squares(20)), cfg)
    for _ in first.run():
        pass
    before = (first.info.scale, dict(first.info.postprocess))
    img, ann = _squares(side)
    again = Trainer([img], [ann], TrainConfig(steps=1, scale=0.5, **TINY),
                    model=first.model, info=first.info)
    assert again.plan is TrainPlan.FINE_TUNE
    after = (again.info.scale, dict(again.info.postprocess))
    if kept:
        assert after == before
    else:
        assert after[1]["min_size"] > before[1]["min_size"]
