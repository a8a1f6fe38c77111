"""The command line's words and progress on the terminal (``cellfit train`` and
``cellfit demo``): the flags that name each setting in messages, and a training run
drained with a progress bar, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator

from tqdm import tqdm

from cellfit.errors import worded

__all__ = ["FLAGS", "LineBar", "progress_bar", "run_training"]

#: seconds between two progress lines when stderr is not a terminal (a log file, a
#: cluster job's output)
LOG_EVERY = 10.0


class _Discard:
    """A file that keeps nothing (what tqdm writes itself: carriage returns, clearing)."""

    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineBar(tqdm):
    """A tqdm bar for logs: whole lines, at most one every ``every`` seconds (and the
    last one), never the carriage returns that redraw a bar on a terminal."""

    def __init__(self, *args, every: float = LOG_EVERY, file=None, **kwargs) -> None:
        self._out = file if file is not None else sys.stderr
        self._every = every
        self._last = -float("inf")
        self._printed: tuple | None = None
        kwargs.update(file=_Discard(), dynamic_ncols=False, mininterval=0, miniters=1)
        kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        if msg is not None or self.disable:  # tqdm clearing the line
            return True
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total > 0
        if (now - self._last >= self._every or done) and self._printed != (self.n, done):
            self._last = now
            self._printed = (self.n, done)
            self._out.write(str(self).strip() + "\n")
            self._out.flush()
        return True


def progress_bar(every: float = LOG_EVERY, **kwargs) -> tqdm:
    """A progress bar on stderr: tqdm's on a terminal, else a :class:`LineBar` writing a
    line at most every ``every`` seconds (0: at every update)."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(**kwargs) if tty else LineBar(every=every, **kwargs)

#: how the command line names each setting an engine error can ask to change (keys of
#: :data:`cellfit.errors.SETTING_WORDS`): errors are printed with ``exc.worded(FLAGS)``
FLAGS: dict[str, str] = {
    "batch_size": "--batch-size",
    "device": "--device",
    "diameter": "--diameter PIXELS",
    "diameter_option": "--diameter",
    "encoder": "--encoder",
    "encoder_weights": "--encoder-weights",
    "init": "--init",
    "labels": "--labels",
    "license": "--license",
    "mode": "--mode",
    "out": "--out",
    "overwrite": "--overwrite",
    "patch_size": "--patch-size",
    "scheduler": "--scheduler",
    "steps": "--steps",
    "tile": "--tile",
    "time_limit": "--time-limit",
    "classify": "--classify",
}


@contextlib.contextmanager
def stop_on_signal(trainer) -> Iterator[None]:
    """While inside, the first Ctrl-C (SIGINT) or SIGTERM asks ``trainer`` to stop after
    the step it is taking, so the run ends as usual (its resume checkpoint written, the
    best weights kept); a second one raises :class:`KeyboardInterrupt` at once. Outside
    the main thread, signals are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if trainer.stopping:
            raise KeyboardInterrupt
        trainer.stop()
        with contextlib.suppress(Exception):  # a write already under way: say nothing
            sys.stderr.write(
                "\ncellfit: stopping after this step (press Ctrl-C again to quit at once)\n"
            )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(trainer, desc: str = "training") -> bool:
    """Drain ``trainer.run()`` (a :class:`cellfit.train.Trainer`) with a tqdm bar on
    stderr, printing its notices; returns False if stopped before its end (Ctrl-C: the
    first one stops after the current step, see :func:`stop_on_signal`)."""
    bar = progress_bar(total=1000, desc=desc, unit="‰", leave=True,
                       bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    gen = trainer.run()
    post: dict = {}
    stopped = False
    try:
        with stop_on_signal(trainer):
            for ev in gen:
                if ev.notice:
                    tqdm.write(f"cellfit: note: {worded(ev.notice, FLAGS)}", file=sys.stderr)
                bar.n = int(ev.fraction * 1000)
                post["step"] = ev.step
                post["loss"] = f"{ev.loss:.3f}"
                if ev.validation:
                    v = ev.validation
                    post["F1"] = f"{v['f1']:.2f}"
                    if "ap50" in v:
                        post["AP50"] = f"{v['ap50']:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.refresh()
                stopped = ev.stopped
    except KeyboardInterrupt:
        gen.close()
        bar.close()
        return False
    if not stopped:
        bar.n = bar.total
    bar.close()
    return not stopped
