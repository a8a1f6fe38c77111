"""Interrupted training goes on where it stopped (``TrainConfig.resume``, ``cellfit
train --resume``): a run stopped at step k and resumed ends as the same run left alone
would (steps, learning rates, patches, weights); a killed ``cellfit train`` process
leaves a checkpoint to resume from; a torn checkpoint write leaves the previous one;
resuming without a checkpoint, or from another training's, is one clear sentence."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import cellfit.train as ctrain
from _clock import steps_take
from _faults import fill_disk_under
from _nets import FakeNetTrainer
from cellfit.checkpoint import read_checkpoint, resume_path, write_checkpoint
from cellfit.cli import main
from cellfit.errors import CellfitError
from cellfit.model import ModelInfo, build_model, load_model, read_model_info, save_model
from cellfit.starting import TrainPlan
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer

TINY = {"patch_size": 32, "batch_size": 2, "device": "cpu", "val_every": 2, "warmup_steps": 3}
#: the real U-Net++, small
SMALL_NET = {
    "decoder_channels": (16, 16, 16, 16, 16),
    "patch_size": 64,
    "batch_size": 2,
    "device": "cpu",
    "val_every": 2,
}


@pytest.fixture(scope="module")
def data():
    img, lab = synthetic_cells((64, 64), n_cells=6, seed=4)
    return img, sparse_annotation(lab, 0.8, seed=1)


@pytest.fixture
def batches(monkeypatch) -> list[str]:
    """The digest of every batch a trainer steps on, in order (the data order)."""
    seen: list[str] = []
    step_on = Trainer._step_on

    def recording(self, xb, yb):
        seen.append(hashlib.sha1(xb.numpy().tobytes() + yb.numpy().tobytes()).hexdigest())
        return step_on(self, xb, yb)

    monkeypatch.setattr(Trainer, "_step_on", recording)
    return seen


def _drain(trainer: Trainer, stop_at: int | None = None) -> list:
    """Run to the end, asking for a stop once step ``stop_at`` is done."""
    events = []
    for ev in trainer.run():
        events.append(ev)
        if ev.step == stop_at:
            trainer.stop()
    return events


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------- the same run, resumed
@pytest.mark.parametrize(
    ("limit", "stop_at"),
    [("steps", 2), ("steps", 5), ("time", 4)],
    ids=["steps, stopped in the warm-up", "steps, stopped after it", "time limit"],
)
def test_a_stopped_and_resumed_run_ends_as_the_run_left_alone(
    data, tmp_path, monkeypatch, batches, limit, stop_at
):
    """Same learning rates, patches, losses, validations and final weights; the batch
    drawn ahead when the checkpoint is written (checkpoints after every step here) is
    drawn again by the resumed run."""
    img, ann = data
    limits = {"steps": 8, "time_limit": None} if limit == "steps" else {"time_limit": 80.0}
    ck = tmp_path / "m.cellfit.resume"

    def trainer(**kw) -> Trainer:
        t = FakeNetTrainer([img], [ann], TrainConfig(**limits, **TINY, **kw))
        if limit == "time":  # each step takes 10 s: the schedule runs on time
            steps_take(monkeypatch, t, 10.0)
        return t

    alone = trainer()
    ref = _drain(alone)
    ref_batches = list(batches)
    batches.clear()

    first = trainer(checkpoint=ck, checkpoint_every=0)
    assert first.prefetch  # a batch is drawn ahead while each step computes
    part1 = _drain(first, stop_at=stop_at)
    assert part1[-1].stopped and part1[-1].done and part1[-1].step == stop_at
    assert read_checkpoint(ck)["step"] == stop_at
    second = trainer(checkpoint=ck, checkpoint_every=0, resume=True)
    assert second.step == stop_at
    part2 = _drain(second)
    steps = part1[:-1] + part2  # the stopped run's last event repeats its last step

    assert [e.step for e in steps] == [e.step for e in ref] == list(range(1, 9))
    assert [e.lr for e in steps] == pytest.approx([e.lr for e in ref], rel=1e-12)
    assert batches == ref_batches  # the data order
    assert [e.loss for e in steps] == pytest.approx([e.loss for e in ref], rel=1e-5)
    assert [e.step for e in steps if e.validation] == [e.step for e in ref if e.validation]
    _assert_same_weights(_weights(second.model), _weights(alone.model))
    rec, ref_rec = second.info.training[-1], alone.info.training[-1]
    assert len(second.info.training) == 1  # one record for the whole run
    assert rec["steps"] == 8 and rec["resumed_at"] == [stop_at]
    assert rec["losses"] == pytest.approx(ref_rec["losses"], rel=1e-5)
    assert rec["validation_history"] == ref_rec["validation_history"]
    assert rec["best_step"] == ref_rec["best_step"]
    assert not ck.exists()  # the run reached its end: nothing left to resume


def test_the_real_network_resumes_fine_tuning_without_its_starting_file(data, tmp_path):
    """The checkpoint holds the model's description and the weights the run started
    from (the distillation teacher, the guard's fallback): the model file it started
    from may be gone, or changed, when the run resumes."""
    img, ann = data
    torch.manual_seed(1)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    init = save_model(tmp_path / "start.cellfit", build_model(info), info)
    start_weights = load_model(init)[0].state_dict()
    ck = tmp_path / "m.cellfit.resume"
    cfg = {
        "steps": 4,
        "time_limit": None,
        "init": init,
        "distill": 0.5,
        **SMALL_NET,
        "val_every": 100,
    }

    alone = Trainer([img], [ann], TrainConfig(**cfg))
    assert alone.plan is TrainPlan.FINE_TUNE and alone.teacher is not None
    ref = _drain(alone)
    first = Trainer([img], [ann], TrainConfig(**cfg, checkpoint=ck))
    part1 = _drain(first, stop_at=2)
    init.unlink()
    second = Trainer([img], [ann], TrainConfig(**cfg, checkpoint=ck, resume=True))
    assert second.plan is TrainPlan.FINE_TUNE and str(second.init) == str(init)
    _assert_same_weights(_weights(second.teacher), start_weights)
    part2 = _drain(second)
    assert second._start is not None
    _assert_same_weights(second._start[0], start_weights)  # the guard's fallback
    assert [e.lr for e in part1[:-1] + part2] == pytest.approx([e.lr for e in ref], rel=1e-12)
    _assert_same_weights(_weights(second.model), _weights(alone.model))
    assert second.info.training[-1]["init"] == str(init)


def test_checkpoints_are_written_on_time_and_when_the_consumer_lets_go(data, tmp_path, monkeypatch):
    img, ann = data
    ck = tmp_path / "m.cellfit.resume"
    written = []
    real_write = ctrain.write_checkpoint
    monkeypatch.setattr(
        ctrain,
        "write_checkpoint",
        lambda p, state: written.append(state["step"]) or real_write(p, state),
    )
    cfg = TrainConfig(steps=8, time_limit=None, checkpoint=ck, checkpoint_every=25.0, **TINY)
    t = FakeNetTrainer([img], [ann], cfg)
    steps_take(monkeypatch, t, 10.0)
    gen = t.run()
    for ev in gen:
        if ev.step == 7:
            break
    assert written == [3, 6]  # every 25 s of training: after 30 s, then 30 s later
    gen.close()  # the consumer lets go between two steps: the state after step 7
    assert written == [3, 6, 7] and read_checkpoint(ck)["step"] == 7
    # a new run (not resumed) replaces an older run's checkpoint
    t2 = FakeNetTrainer([img], [ann], TrainConfig(**{**vars(cfg), "checkpoint_every": None}))
    gen = t2.run()
    next(gen)
    assert not ck.exists()
    gen.close()
    assert read_checkpoint(ck)["step"] == 1


def test_a_torn_checkpoint_write_leaves_the_previous_checkpoint(data, tmp_path, batches):
    """A write broken off (the disk full mid-write; a crash leaving a half-written
    temporary file) never touches the last complete checkpoint: the run goes on (a
    notice says so) and resumes from that checkpoint as if never stopped."""
    img, ann = data
    ck = tmp_path / "ck" / "m.cellfit.resume"
    cfg = {"steps": 6, "time_limit": None, **TINY}
    alone = FakeNetTrainer([img], [ann], TrainConfig(**cfg))
    _drain(alone)
    ref_batches = list(batches)
    batches.clear()

    t = FakeNetTrainer([img], [ann], TrainConfig(**cfg, checkpoint=ck, checkpoint_every=0))
    gen = t.run()
    events = [next(gen), next(gen)]
    assert read_checkpoint(ck)["step"] == 2
    good = ck.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        disk = fill_disk_under(mp, ck.parent, room=4096)
        events.append(next(gen))  # step 3: its checkpoint does not fit
        assert disk["failures"] >= 1
        assert "could not write the resume checkpoint" in events[-1].notice
        assert "training goes on" in events[-1].notice
    assert ck.read_bytes() == good and read_checkpoint(ck)["step"] == 2
    assert sorted(p.name for p in ck.parent.iterdir()) == [ck.name]  # no torn file left
    gen.close()  # (closing writes the state after step 3: put back the one a kill leaves)
    ck.write_bytes(good)
    # a crash in the middle of the next write leaves a half-written temporary file
    part = ck.with_name(f".{ck.name}.part")
    part.write_bytes(good[: len(good) // 2])

    resumed = FakeNetTrainer(
        [img], [ann], TrainConfig(**cfg, checkpoint=ck, checkpoint_every=0, resume=True)
    )
    assert resumed.step == 2
    batches.clear()
    _drain(resumed)
    assert batches == ref_batches[2:]
    _assert_same_weights(_weights(resumed.model), _weights(alone.model))
    assert not ck.exists() and not part.exists()


def test_writing_is_atomic_and_reading_a_torn_file_is_one_sentence(tmp_path):
    path = tmp_path / "x.resume"
    write_checkpoint(path, {"step": 1, "w": torch.ones(3), "items": {0: (1, 2.5)}})
    state = read_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert state["items"] == {0: (1, 2.5)}  # integer keys and tuples come back as such
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # not written by cellfit: a copy cut short
    with pytest.raises(CellfitError, match="is damaged or not a cellfit resume checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CellfitError, match="there is no interrupted training to resume"):
        read_checkpoint(tmp_path / "none.resume")


def test_resuming_in_the_engine_needs_the_same_settings_and_data(data, tmp_path):
    img, ann = data
    ck = tmp_path / "m.cellfit.resume"
    cfg = {"steps": 6, "time_limit": None, "checkpoint": ck, **TINY}
    _drain(FakeNetTrainer([img], [ann], TrainConfig(**cfg)), stop_at=2)
    with pytest.raises(CellfitError, match=r"other settings \(steps was 6, now 7\)"):
        FakeNetTrainer([img], [ann], TrainConfig(**{**cfg, "steps": 7}, resume=True))
    other = ann.copy()
    other[0, :5] = np.where(other[0, :5] == 1, 0, 1)
    with pytest.raises(CellfitError, match="on other images or annotations"):
        FakeNetTrainer([img], [other], TrainConfig(**cfg, resume=True))
    with pytest.raises(CellfitError, match="resuming needs the checkpoint"):
        FakeNetTrainer([img], [ann], TrainConfig(steps=6, resume=True, **TINY))
    # where and on what it runs may change
    t = FakeNetTrainer([img], [ann], TrainConfig(**cfg, resume=True, preview_every=9.0))
    assert t.step == 2


# --------------------------------------------------------------- command line
def _write_data(folder: Path) -> None:
    image, labels = synthetic_cells((96, 96), n_cells=8, seed=1)
    for sub, arr in (("img", image), ("lab", sparse_annotation(labels, 0.8, seed=0))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / sub / "a.tif", arr)


def _train_args(folder: Path, steps: int = 4, *extra) -> list[str]:
    return [
        str(a)
        for a in (
            "train",
            folder / "img",
            "--labels",
            folder / "lab",
            "--out",
            folder / "m.cellfit",
            "--steps",
            steps,
            "--patch-size",
            64,
            "--batch-size",
            2,
            "--val-every",
            100,
            "--device",
            "cpu",
            "--init",
            "scratch",
            *extra,
        )
    ]


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cellfit: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_stop_then_resume_and_each_bad_resume_is_one_sentence(tmp_path, capsys):
    _write_data(tmp_path)
    out, ck = tmp_path / "m.cellfit", tmp_path / "m.cellfit.resume"
    assert resume_path(out) == ck

    code = main(_train_args(tmp_path, 4, "--resume"))
    _one_line_error(
        code,
        capsys.readouterr().err,
        "no interrupted training of",
        "run the command without --resume",
    )

    with pytest.MonkeyPatch.context() as mp:  # Ctrl-C during step 2: stops after it
        step = Trainer._scheduled_step

        def stop_at_2(self, elapsed):
            loss = step(self, elapsed)
            if self.step == 2:
                self.stop()
            return loss

        mp.setattr(Trainer, "_scheduled_step", stop_at_2)
        code = main(_train_args(tmp_path))
    err = capsys.readouterr().err
    assert code == 130, err
    assert f"Progress is saved to {ck}" in err
    assert f"To go on from step 2, run the same command with --resume (the state is in {ck})" in err
    assert out.exists() and ck.exists()

    code = main(_train_args(tmp_path))  # forgot --resume
    _one_line_error(code, capsys.readouterr().err, "already exists", "--resume")
    code = main(_train_args(tmp_path, 5, "--resume"))
    _one_line_error(code, capsys.readouterr().err, "other settings (steps was 4, now 5)")
    lab = tmp_path / "lab" / "a.tif"
    good = lab.read_bytes()
    ann = tifffile.imread(lab)
    ann[:3, :3] = 1
    tifffile.imwrite(lab, ann)
    code = main(_train_args(tmp_path, 4, "--resume"))
    _one_line_error(code, capsys.readouterr().err, "other images or annotations")
    lab.write_bytes(good)

    code = main(_train_args(tmp_path, 4, "--resume"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Resuming the interrupted training from {ck} at step 2." in err
    rec = read_model_info(out).training
    assert len(rec) == 1 and rec[0]["steps"] == 4 and rec[0]["resumed_at"] == [2]
    assert not ck.exists()

    ck.write_bytes(b"not a checkpoint")
    code = main(_train_args(tmp_path, 4, "--resume"))
    _one_line_error(code, capsys.readouterr().err, "is damaged or not a cellfit resume checkpoint")


def _start_training(folder: Path, steps: int) -> tuple[subprocess.Popen, Path]:
    """``cellfit train`` in its own process, saving its state after every step."""
    log = folder / "train.log"
    cmd = [
        sys.executable,
        "-m",
        "cellfit.cli",
        *_train_args(folder, steps),
        "--checkpoint-every",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log


def _wait_for_checkpoint(proc: subprocess.Popen, ck: Path, log: Path, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ck.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() - t0 < timeout, log.read_text()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_training_process_resumes_from_its_last_checkpoint(tmp_path, capsys):
    _write_data(tmp_path)
    out, ck = tmp_path / "m.cellfit", tmp_path / "m.cellfit.resume"
    proc, log = _start_training(tmp_path, steps=10)
    _wait_for_checkpoint(proc, ck, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not out.exists()
    step = read_checkpoint(ck)["step"]  # the last complete checkpoint loads
    assert 1 <= step < 10, log.read_text()

    code = main(_train_args(tmp_path, 10, "--resume"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"at step {step}." in err
    _model, info = load_model(out)
    assert info.training[-1]["steps"] == 10 and info.training[-1]["resumed_at"] == [step]
    assert np.isfinite(info.training[-1]["losses"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "lab", "m.cellfit", "train.log"]


@pytest.mark.slow
def test_ctrl_c_stops_the_process_after_its_step_and_it_resumes(tmp_path, capsys):
    _write_data(tmp_path)
    out, ck = tmp_path / "m.cellfit", tmp_path / "m.cellfit.resume"
    proc, log = _start_training(tmp_path, steps=10)
    _wait_for_checkpoint(proc, ck, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()
    text = log.read_text()
    assert "stopping after this step" in text and "run the same command with --resume" in text
    assert "Traceback" not in text
    step = read_checkpoint(ck)["step"]
    assert read_model_info(out).training[-1]["steps"] == step  # the model so far is saved

    code = main(_train_args(tmp_path, 10, "--resume"))
    assert code == 0, capsys.readouterr().err
    assert read_model_info(out).training[-1]["resumed_at"] == [step]
    assert not ck.exists()
