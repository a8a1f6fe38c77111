"""The command line's words and progress on the terminal (``cellfit train`` and
``cellfit demo``): the flags that name each setting in messages, and a training run
drained with a progress bar, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from tqdm import tqdm

from cellfit.errors import worded

__all__ = ["FLAGS", "run_training"]

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
    "mode": "--mode",
    "out": "--out",
    "patch_size": "--patch-size",
    "scheduler": "--scheduler",
    "steps": "--steps",
    "tile": "--tile",
    "time_limit": "--time-limit",
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
    bar = tqdm(total=1000, desc=desc, unit="‰", leave=True,
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
