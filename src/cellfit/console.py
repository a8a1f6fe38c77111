"""The command line's words and progress on the terminal (``cellfit train`` and
``cellfit demo``): the flags that name each setting in messages, and a training run
drained with a progress bar."""

from __future__ import annotations

import sys

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


def run_training(trainer, desc: str = "training") -> bool:
    """Drain ``trainer.run()`` (a :class:`cellfit.train.Trainer`) with a tqdm bar on
    stderr, printing its notices; returns False if interrupted (Ctrl-C)."""
    bar = tqdm(total=1000, desc=desc, unit="‰", leave=True,
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    gen = trainer.run()
    post: dict = {}
    try:
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
    except KeyboardInterrupt:
        gen.close()
        bar.close()
        return False
    bar.n = bar.total
    bar.close()
    return True
