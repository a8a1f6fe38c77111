"""The job runner: runs one job of :mod:`cellfit.plugin.jobs` at a time in the background.

This is the only place the plugin uses napari's ``thread_worker``. A job's ``run()``
generator is drained in a worker thread; what it yields is handed to the panel that
started it (in the GUI thread), and so is what it returns. The runner says when it
becomes busy and idle again (:attr:`JobRunner.started`, :attr:`JobRunner.finished`,
each with the kind of job); every panel listens and enables or disables its own
controls. It also moves a progress bar: the panel's own, and napari's in the activity
dock unless the CPU draws the window (see :func:`cellfit.plugin._display.software_opengl`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QApplication, QProgressBar

from cellfit.errors import fault
from cellfit.plugin._display import software_opengl

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)


class JobRunner(QObject):
    """One background job at a time.

    Attributes
    ----------
    job : object or None
        The running job (a job of :mod:`cellfit.plugin.jobs`), None when idle.
    kind : str or None
        What it does: "train", "predict", "estimate", "batch", "measure", "suggest"
        (where to paint next) or "preview" (a quiet prediction: no progress bar).
    napari_progress : bool or None
        Whether napari's progress bar is shown too; None: decided when the first job
        starts (off when the CPU draws the window: its animation then costs tens of
        milliseconds a frame).
    pbar : napari.utils.progress or None
        napari's progress bar of the running job.
    started_at : float
        ``time.perf_counter()`` when the running (or last) job started.
    """

    #: a job started (its kind); emitted before it runs
    started = Signal(str)
    #: a job ended (its kind); emitted once the runner is idle again
    finished = Signal(str)
    #: a sentence for the dock's status line: (severity, text)
    said = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.job: Any = None
        self.kind: str | None = None
        self.worker = None
        self.started_at = 0.0
        self.napari_progress: bool | None = None
        self.pbar: progress | None = None
        self._bar: QProgressBar | None = None
        self._live = False
        self._box: dict = {}

    @property
    def busy(self) -> bool:
        return self.job is not None

    def start(
        self,
        kind: str,
        job,
        on_return: Callable[[Any], None],
        *,
        on_yield: Callable[[Any], None] | None = None,
        bar: QProgressBar | None = None,
        desc: str = "",
    ) -> None:
        """Run ``job.run()`` in a worker thread.

        ``on_yield`` gets each item the job yields, ``on_return`` its result (both in
        the GUI thread). ``bar`` is the panel's progress bar (None: none, and no napari
        bar either); ``desc`` the text of napari's bar.
        """
        self.job, self.kind = job, kind
        self.started_at = time.perf_counter()
        self._bar = bar
        if bar is not None:
            self.set_progress(0.0)
            if self.napari_progress is None:
                self.napari_progress = not software_opengl()
            if self.napari_progress:
                self.pbar = progress(total=1000, desc=desc)
        self._live = True  # False once the result is in: late progress is dropped
        # napari keeps every worker started while a viewer exists (its task list holds
        # the worker and the function it ran, for good): the worker gets a function that
        # reaches the job through a box emptied when the job ends, so a finished job (a
        # trainer with its model, data and optimizer) can be freed
        box = self._box = {"job": job}

        def run():
            return (yield from box.pop("job").run())

        worker = thread_worker(run, start_thread=False)()
        if on_yield is not None:
            worker.yielded.connect(partial(self._dispatch_yield, on_yield))
        worker.returned.connect(partial(self._dispatch_return, on_return))
        worker.errored.connect(self._on_worker_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.started.emit(kind)
        worker.start()

    def _dispatch_yield(self, handler, value) -> None:
        # napari's progress bar processes Qt events when it moves, so the job's result
        # can arrive inside a progress handler: handlers move the bar last, and
        # progress that arrives after the result is ignored
        if self._live:
            handler(value)

    def _dispatch_return(self, handler, value) -> None:
        self._live = False
        handler(value)

    def set_progress(self, fraction: float) -> None:
        """Move the running job's progress bars to ``fraction`` (0–1)."""
        value = round(min(max(fraction, 0.0), 1.0) * 1000)
        if self._bar is not None:
            self._bar.setValue(value)
        if self.pbar is not None and value > self.pbar.n:
            self.pbar.update(value - self.pbar.n)

    def _on_worker_error(self, exc: Exception) -> None:  # jobs return errors; this is a bug
        log.error("cellfit job failed", exc_info=exc)
        text = str(fault(exc, "cellfit"))
        show_error(text)
        self.said.emit("error", text)

    def _on_finished(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        if self._bar is not None:
            self._bar.setValue(self._bar.maximum())
        kind = self.kind or ""
        self._box.clear()  # a job that never started
        self.job, self.kind, self.worker, self._bar = None, None, None, None
        self.finished.emit(kind)

    def cancel(self) -> None:
        """Stop training (after the current step) or cancel any other job."""
        if self.job is not None:
            self.job.cancel()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block (processing Qt events) until the running job ends; for scripts and tests."""
        end = time.perf_counter() + timeout
        while self.job is not None and time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.01)
        return self.job is None
