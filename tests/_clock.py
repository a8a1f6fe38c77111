"""A clock for the trainer's time limit that moves only when a test says so: each
training step "takes" a known time, so a time limit is checked in steps, whatever
the speed of the machine."""

from __future__ import annotations

import types

import cellfit.train as ctrain


def steps_take(monkeypatch, trainer, seconds: float) -> dict:
    """Replace the clock :mod:`cellfit.train` reads with one that stands still except
    that each ``trainer.train_step`` moves it by ``seconds``. Returns the clock's state
    (``now``, ``steps``)."""
    clock = {"now": 1000.0, "steps": 0}
    step = trainer.train_step

    def timed_step() -> float:
        loss = step()
        clock["now"] += seconds
        clock["steps"] += 1
        return loss

    monkeypatch.setattr(trainer, "train_step", timed_step)
    monkeypatch.setattr(ctrain, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    return clock
