"""Does napari stay responsive while cellfit trains on the CPU?

A napari viewer (headless under Xvfb) shows the bundled nuclei image with a sparse
annotation; the cellfit dock widget trains in its ``thread_worker`` exactly as when a
user presses Train. A ``QTimer`` asks to run every 10 ms on the Qt event loop (with
``--pan`` the camera also moves every 100 ms so the canvas redraws, as when a user pans
while watching).
Reported:

* the interval between timer ticks (10 ms when the loop is free; p50 / p95 / p99 / max),
  idle before training and while training;
* the time from pressing Train to the first live preview on screen;
* the time from pressing Stop to training having ended.

Run (about a minute per setting)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/gui_latency.py \\
        --seconds 45 --threads auto --threads all --with-napari-progress \\
        --json docs/gui_latency.json

``--threads auto`` is the plugin's choice (all cores but one for training on a CPU);
``--threads all`` gives training every core (torch's default), for comparison.
``--with-napari-progress`` adds a run with napari's own progress bar shown (the plugin
hides it when the CPU draws the window, as under Xvfb: its animated activity indicator
then costs tens of milliseconds per frame).
"""

from __future__ import annotations

# isort: off
# the torch stack first: importing triton after a viewer exists crashes under Mesa
import segmentation_models_pytorch  # noqa: F401
import torch
import torchvision  # noqa: F401

# isort: on

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def _longest(ticks: list[float], t0: float, n: int = 5) -> list[dict]:
    """The ``n`` longest gaps between ticks: when they began (s after Train) and how long."""
    if len(ticks) < 2:
        return []
    t = np.asarray(ticks)
    gaps = np.diff(t)
    idx = np.argsort(gaps)[::-1][:n]
    return [{"at_s": round(float(t[i] - t0), 2), "ms": round(float(gaps[i] * 1000), 1)}
            for i in sorted(idx)]


def _stats(intervals_ms: list[float]) -> dict:
    a = np.asarray(intervals_ms, dtype=float)
    if a.size == 0:
        return {"ticks": 0}
    return {
        "ticks": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p95_ms": round(float(np.percentile(a, 95)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
        "over_50ms": int((a > 50).sum()),
    }


def run_once(
    seconds: float,
    threads: str,
    idle: float = 4.0,
    stop_after: float | None = None,
    pan: bool = False,
    preview: bool = True,
    show: bool = True,
    napari_progress: bool | None = None,
) -> dict:
    import napari
    from qtpy.QtCore import QEventLoop, Qt, QTimer

    from cellfit.data import nuclei_dsb2018
    from cellfit.plugin._display import opengl_renderer
    from cellfit.plugin.jobs import gui_friendly_threads
    from cellfit.synthetic import sparse_annotation

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    thread_choice = gui_friendly_threads  # the plugin's own choice
    if threads == "all":
        thread_choice = lambda device: cores  # noqa: E731
    elif threads != "auto":
        n = int(threads)
        thread_choice = lambda device: n  # noqa: E731

    viewer = napari.Viewer(show=show)
    viewer.window._qt_window.resize(1500, 950)
    img, mask = nuclei_dsb2018()
    viewer.add_image(img, name="nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-cellfit", "Annotate, train & segment"
    )
    widget.state.threads = thread_choice
    train = widget.train_panel
    ann = widget.annotate_panel.create_annotation_layer()
    ann.data = sparse_annotation(mask, fraction=0.15, seed=0).astype(ann.data.dtype)
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    train.budget_unit.setCurrentIndex(train.budget_unit.findData("seconds"))
    train.budget_spin.setValue(int(seconds))
    widget.tabs.setCurrentIndex(1)
    train.preview_check.setChecked(preview)
    if napari_progress is not None:
        widget.runner.napari_progress = napari_progress
    viewer.reset_view()

    ticks: list[float] = []
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    center = np.asarray(viewer.scene.camera.center, dtype=float)
    wiggle = QTimer()
    wiggle.setInterval(100)
    phase = [0]

    def pan_camera() -> None:  # a user looking around: the canvas redraws
        phase[0] += 1
        viewer.scene.camera.center = tuple(
            center + [0, 3 * np.sin(phase[0] / 5), 3 * np.cos(phase[0] / 5)][-len(center) :]
        )

    wiggle.timeout.connect(pan_camera)

    def spin(duration: float) -> None:
        """Run the Qt event loop (as napari does) for ``duration`` seconds."""
        loop = QEventLoop()
        QTimer.singleShot(int(duration * 1000), loop.quit)
        loop.exec()

    spin(1.0)  # settle
    timer.start()
    if pan:
        wiggle.start()
    spin(idle)
    idle_ticks = list(ticks)
    ticks[:] = idle_ticks[-1:]  # the gap across the click counts as training time
    load_before = os.getloadavg()

    t_click = time.perf_counter()
    train.train_button.click()
    click_ms = (time.perf_counter() - t_click) * 1000
    job = widget.runner.job
    state = {"first_preview": None, "stop_pressed": None}
    loop = QEventLoop()

    def monitor() -> None:  # every 20 ms, from the event loop
        now = time.perf_counter()
        if state["first_preview"] is None and train.first_preview_seconds is not None:
            state["first_preview"] = now - t_click
        if stop_after is not None and state["stop_pressed"] is None and now - t_click > stop_after:
            train.stop_button.click()
            state["stop_pressed"] = now
        if widget.runner.kind != "train" or now - t_click > seconds + 120:
            loop.quit()

    watch = QTimer()
    watch.setInterval(20)
    watch.timeout.connect(monitor)
    watch.start()
    loop.exec()
    watch.stop()
    first_preview = state["first_preview"]
    train_ticks = list(ticks)
    timer.stop()
    wiggle.stop()
    widget.wait(60)
    res = train.last_result
    rec = res.record if res is not None else {}
    load_after = os.getloadavg()
    out = {
        "threads_setting": threads,
        "torch_threads": int(
            thread_choice(torch.device("cpu")) or torch.get_num_threads()
        ),
        "cores": cores,
        "budget_s": seconds,
        "patch_size": int(train.patch_combo.currentData()),
        "pan": pan,
        "napari_progress_bar": widget.runner.napari_progress,
        "opengl": opengl_renderer(),
        "preview": preview,
        "shown": show,
        "idle": _stats(list(np.diff(idle_ticks) * 1000)),
        "training": _stats(list(np.diff(train_ticks) * 1000)),
        "longest_pauses": _longest(train_ticks, t_click),
        "train_click_ms": round(click_ms, 1),
        "first_preview_s": round(first_preview, 2) if first_preview is not None else None,
        "stop_to_end_s": (
            round(train.stop_seconds, 2) if train.stop_seconds is not None else None
        ),
        "steps": rec.get("steps"),
        "step_s_median": round(float(np.median(job.step_seconds)), 2) if job.step_seconds else None,
        "preview_s_median": round(float(np.median(job.preview_seconds)), 2) if job.preview_seconds else None,
        "previews": len(job.preview_seconds),
        "step_s": [round(x, 2) for x in job.step_seconds],
        "preview_s": [round(x, 2) for x in job.preview_seconds],
        "train_seconds": rec.get("seconds"),
        "validation": rec.get("validation"),
        "error": res.error if res is not None else "no result",
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
    }
    viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=45.0, help="training budget per run")
    p.add_argument(
        "--threads",
        action="append",
        default=None,
        help="'auto' (the plugin's choice), 'all', or a number; repeat to compare",
    )
    p.add_argument(
        "--stop-after",
        type=float,
        default=None,
        help="press Stop this many seconds after Train (default: budget minus 10 s)",
    )
    p.add_argument(
        "--pan",
        action="store_true",
        help="also move the camera every 100 ms (redraws; costly with software OpenGL)",
    )
    p.add_argument("--no-preview", action="store_true", help="train without the live preview")
    p.add_argument("--with-napari-progress", action="store_true",
                   help="add a run with napari's progress bar forced on (the plugin leaves it "
                   "off when the CPU draws the window)")
    p.add_argument("--hidden", action="store_true", help="do not show the viewer window")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    settings = args.threads or ["auto"]
    stop_after = args.stop_after if args.stop_after is not None else max(5.0, args.seconds - 10)
    runs = [(threads, None) for threads in settings]
    if args.with_napari_progress:
        runs.append(("auto", True))
    results = []
    for threads, napari_progress in runs:
        r = run_once(
            args.seconds + 30, threads, stop_after=stop_after, pan=args.pan,
            preview=not args.no_preview, show=not args.hidden, napari_progress=napari_progress,
        )  # Stop ends it
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(
        "| training threads | napari progress bar | tick p50 | tick p95 | tick p99 | max | "
        "ticks > 50 ms | first preview | Stop → ended | steps | s/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["training"]
        bar = "shown" if r["napari_progress_bar"] else "off"
        print(
            f"| {r['torch_threads']} of {r['cores']} ({r['threads_setting']}) | {bar} | "
            f"{t['p50_ms']} ms | {t['p95_ms']} ms | {t['p99_ms']} ms | {t['max_ms']} ms | "
            f"{t['over_50ms']} of {t['ticks']} | {r['first_preview_s']} s | "
            f"{r['stop_to_end_s']} s | {r['steps']} | {r['step_s_median']} |"
        )
    idle = results[0]["idle"]
    print(
        f"\nidle (before training): tick p50 {idle['p50_ms']} ms, p95 {idle['p95_ms']} ms, "
        f"max {idle['max_ms']} ms"
    )
    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "runs": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
