"""Soak: many short train → predict cycles in one process, as a day of the plugin's loop.

Each cycle runs the dock's own jobs (:class:`cellfit.plugin.jobs.TrainJob`, then
:class:`~cellfit.plugin.jobs.PredictJob`) in a background thread, as the dock does: the
model in memory is trained again on the annotation (train again), then the image is
segmented. Every third training is stopped after its first step and every fifth
prediction is cancelled midway, as a user who presses Stop does; the next cycle starts
again from the model in memory.

Without ``--viewer`` each job is drained in a plain ``threading.Thread``. With
``--viewer`` a napari viewer shows the image and the jobs run through the dock's job
runner (:class:`cellfit.plugin._runner.JobRunner`, napari's ``thread_worker``) while a
``QTimer`` asks to run every 10 ms on the Qt event loop: the longest gap between its
ticks is the longest pause of the GUI thread.

Reported: the resident memory (RSS, read after ``malloc_trim``) after the first cycles
(warm-up) and at the end, the Python objects alive then and at the end,
its growth per 100 cycles fitted over the cycles after the warm-up (target: none beyond
noise), and the threads and open files at the start and the end (target: back to the
start once the jobs have ended).

Usage::

    .venv/bin/python benchmarks/soak.py --cycles 200             # engine and jobs
    xvfb-run -a .venv/bin/python benchmarks/soak.py --viewer     # and through the dock's runner

The table goes to ``docs/benchmarks.md`` between ``<!-- soak:start -->`` and
``<!-- soak:end -->`` (``--no-write`` to only print it).
"""

from __future__ import annotations

# isort: off
# the torch stack first: importing triton after a viewer exists crashes under Mesa
import segmentation_models_pytorch  # noqa: F401
import torch
import torchvision  # noqa: F401

# isort: on

import argparse
import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import engine_version, machine, write_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- soak:start -->", "<!-- soak:end -->"


def rss_mb() -> float:
    """Resident memory of this process (MB), from /proc, after handing the C heap's free
    pages back to the system (else the allocator's fragmentation reads as growth)."""
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def counts() -> dict:
    """Threads (OS and Python) and open file descriptors of this process."""
    return {
        "python_objects": len(gc.get_objects()),
        "os_threads": len(os.listdir("/proc/self/task")),
        "py_threads": threading.active_count(),
        "open_files": len(os.listdir("/proc/self/fd")),
    }


def data(size: int, seed: int = 0):
    from cellfit.io import to_planes
    from cellfit.synthetic import scene, sparse_annotation

    img, labels, _ = scene("fluo_nuclei", (size, size), 24.0, seed=seed)
    ann = sparse_annotation(labels, fraction=0.3, seed=seed)
    return to_planes(img)[0].astype(np.float32), ann[None].astype(np.uint8)


class Plain:
    """Runs a job's generator to its end in a thread; ``interrupt`` is called after
    the first item it yields (to stop or cancel it, as Stop does)."""

    def run(self, job, interrupt: bool):
        box: dict = {}

        def drain():
            gen = job.run()
            first = True
            try:
                while True:
                    next(gen)
                    if first and interrupt:
                        job.cancel()
                    first = False
            except StopIteration as stop:
                box["result"] = stop.value

        t = threading.Thread(target=drain)
        t.start()
        t.join()
        return box["result"]

    def close(self) -> dict:
        return {}


class WithViewer:
    """Runs jobs through the dock's JobRunner in a napari viewer, ticking a 10 ms timer."""

    def __init__(self, planes: np.ndarray) -> None:
        import napari
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication

        from cellfit.plugin._runner import JobRunner

        self.viewer = napari.Viewer(show=True)
        self.viewer.add_image(planes[0, 0], name="image")
        self.app = QApplication.instance()
        self.runner = JobRunner()
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start(10)
        self.gaps: list[float] = []

    def run(self, job, interrupt: bool):
        from qtpy.QtCore import QEvent

        box: dict = {}
        first = [True]

        def on_yield(_):
            if first[0] and interrupt:
                self.runner.cancel()
            first[0] = False

        def on_return(result):
            box["result"] = result

        self.runner.start("soak", job, on_return, on_yield=on_yield)
        while "result" not in box or self.runner.busy:
            self.app.processEvents()
            time.sleep(0.002)
        # what the event loop does between two of its turns: objects that asked to be
        # deleted (the finished worker, holding the job) are deleted
        self.app.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        return box["result"]

    def close(self) -> dict:
        self.timer.stop()
        gaps = np.diff(self.ticks) * 1000 if len(self.ticks) > 1 else np.array([0.0])
        self.viewer.close()
        return {"gui_max_ms": float(gaps.max()), "gui_p99_ms": float(np.percentile(gaps, 99))}


def soak(cycles: int, size: int, steps: int, viewer: bool, log) -> dict:
    from cellfit.plugin.jobs import PredictJob, TrainJob
    from cellfit.train import TrainConfig

    torch.set_num_threads(2)
    planes, ann = data(size)
    runner = WithViewer(planes) if viewer else Plain()
    model, info = None, None
    gc.collect()
    start = {"rss_mb": rss_mb(), **counts()}
    memory, seconds = [], []
    stopped = cancelled = 0
    t0 = time.perf_counter()
    for i in range(cycles):
        c0 = time.perf_counter()
        cfg = TrainConfig(init="scratch" if model is None else None, encoder="mobilenet_v2",
                          steps=steps, patch_size=96, batch_size=2, device="cpu", seed=i,
                          val_every=10**9, preview_every=1e9)
        train = TrainJob([planes], [ann], cfg, model=model, info=info, threads=2)
        res = runner.run(train, interrupt=i % 3 == 2)
        if res.error:
            raise SystemExit(f"cycle {i}: training failed: {res.error}")
        stopped += bool(res.stopped)
        model, info = res.model, res.info
        predict = PredictJob(model, info, planes, threads=2)
        pres = runner.run(predict, interrupt=i % 5 == 4)
        if pres.error:
            raise SystemExit(f"cycle {i}: prediction failed: {pres.error}")
        cancelled += bool(pres.cancelled)
        del train, predict, res, pres
        gc.collect()
        memory.append(rss_mb())
        if i == min(20, max(1, cycles // 10)) - 1:
            objects_after_warmup = len(gc.get_objects())
        seconds.append(time.perf_counter() - c0)
        if i % 10 == 0 or i == cycles - 1:
            log(f"[{time.perf_counter() - t0:6.0f}s] cycle {i + 1}/{cycles}: RSS "
                f"{memory[-1]:.0f} MB, {counts()}")
    del model
    gc.collect()
    time.sleep(0.5)  # threads that are ending
    end = {"rss_mb": rss_mb(), **counts()}
    extra = runner.close()
    warm = min(20, max(1, cycles // 10))
    xs = np.arange(warm, cycles)
    slope = float(np.polyfit(xs, memory[warm:], 1)[0]) * 100 if len(xs) > 2 else float("nan")
    return {
        "cycles": cycles, "steps": steps, "size": size, "viewer": viewer,
        "stopped_trainings": stopped, "cancelled_predictions": cancelled,
        "start": start, "end": end, "rss_after_warmup_mb": memory[warm - 1],
        "rss_end_mb": memory[-1], "rss_max_mb": max(memory),
        "objects_after_warmup": objects_after_warmup,
        "growth_per_100_cycles_mb": slope, "warmup_cycles": warm,
        "cycle_seconds_median": float(np.median(seconds)), **extra,
    }


def table(results: list[dict], command: str) -> str:
    lines = [
        START,
        "## Soak: a day of the train → predict loop in one process (`benchmarks/soak.py`)",
        "",
        "Short train-again → predict cycles with the dock's jobs (every third training "
        "stopped after its first step, every fifth prediction cancelled midway). Targets: "
        "no memory growth beyond noise after the warm-up; threads and open files back to "
        "where they started.",
        "",
        "| run | cycles | RSS after warm-up | RSS at the end | growth per 100 cycles "
        "(fit) | Python objects after warm-up → end | threads start → end | open files "
        "start → end | longest GUI pause |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gui = f"{r['gui_max_ms']:.0f} ms (p99 {r['gui_p99_ms']:.0f} ms)" if r.get(
            "gui_max_ms") is not None else "– (no viewer)"
        lines.append(
            f"| {'dock runner + viewer' if r['viewer'] else 'jobs in threads'} | "
            f"{r['cycles']} | {r['rss_after_warmup_mb']:.0f} MB (cycle "
            f"{r['warmup_cycles']}) | {r['rss_end_mb']:.0f} MB | "
            f"{r['growth_per_100_cycles_mb']:+.1f} MB | "
            f"{r['objects_after_warmup']} → {r['end']['python_objects']} | "
            f"{r['start']['os_threads']} → {r['end']['os_threads']} | "
            f"{r['start']['open_files']} → {r['end']['open_files']} | {gui} |")
    lines += ["", f"- `{command}`; {results[0]['stopped_trainings']} trainings stopped, "
              f"{results[0]['cancelled_predictions']} predictions cancelled; a cycle took "
              f"{results[0]['cycle_seconds_median']:.1f} s (median)",
              f"- engine {engine_version()}; {machine()}", END, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--steps", type=int, default=3, help="training steps per cycle")
    p.add_argument("--size", type=int, default=160, help="image side (pixels)")
    p.add_argument("--viewer", action="store_true",
                   help="then run the cycles again through the dock's runner, with a viewer")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    results = [soak(args.cycles, args.size, args.steps, False, log)]
    if args.viewer:
        results.append(soak(args.cycles, args.size, args.steps, True, log))
    command = " ".join(["python benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)])
    text = table(results, command)
    print(text)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
