"""Batch prediction on a dask.distributed cluster (``cellfit predict --scheduler``).

Each file is a task; a stack longer than ``slices_per_task`` slices becomes a
*prepare* task (normalisation statistics of the whole stack, a scratch zarr in the
output folder), one task per run of slices (predicts them, stores per-slice labels and
probabilities in the scratch zarr) and a *finalize* task (links slices if asked, writes
the outputs with the same writer as a local run, renames them into place, removes the
scratch). Workers keep the model loaded between tasks: each loads it once.
With ``Settings.measure`` the workers measure the cells as they write the labels (the
same :class:`~cellfit.file_prediction.OutputWriter`), and this machine reads the tables
back for the run's summary.

Workers must see the model, the inputs and the output folder at the same paths as
this machine (a shared file system, as on any cluster).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from cellfit.errors import CellfitError, fault
from cellfit.file_prediction import (
    FileEvent,
    LoadedModel,
    OutputWriter,
    Settings,
    fingerprint,
    holding,
    output_paths,
    output_state,
    run_file,
)
from cellfit.io import LazyImage, open_image
from cellfit.model import read_model_info
from cellfit.outputs import make_output_folder, remove_stale_temporaries, tmp_name
from cellfit.stream import stack_stats

__all__ = ["MODEL_LOADS", "predict_files_distributed"]

#: how many times this process loaded a model (workers: once per model)
MODEL_LOADS = 0
_LOADED: dict = {}
_LOCK = threading.Lock()


# ------------------------------------------------------------------- on the workers
def _loaded_model(model_path: str, settings: Settings) -> LoadedModel:
    """The worker's loaded model for this model file and these settings (loaded once)."""
    global MODEL_LOADS
    st = os.stat(model_path)
    key = (
        str(Path(model_path).resolve()), st.st_mtime_ns, st.st_size, settings.device,
        settings.batch_size, settings.amp, settings.tile, settings.overlap, settings.tta,
        tuple(sorted((settings.postprocess or {}).items())),
    )
    with _LOCK:
        model = _LOADED.get(key)
        if model is None:
            threads = os.environ.get("CELLFIT_TORCH_THREADS")
            if threads:
                torch.set_num_threads(int(threads))
            while len(_LOADED) >= 2:  # keep memory bounded when models change
                _LOADED.pop(next(iter(_LOADED)))
            model = _LOADED[key] = LoadedModel(model_path, settings)
            MODEL_LOADS += 1
        return model


def _drain(gen) -> tuple[tuple, list[str]]:
    """Run :func:`run_file` to its end: its outputs and the notices of its events."""
    notices: list[str] = []
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value, notices
        if ev.notice:
            notices.append(ev.notice)


def task_file(model_path, path, labels_path, prob_path, settings, fp) -> dict:
    """Predict one whole file into its outputs (on a worker)."""
    try:
        model = _loaded_model(model_path, settings)
        outputs, notices = _drain(run_file(model, Path(path), Path(labels_path),
                                           Path(prob_path) if prob_path else None, settings, fp))
    except CellfitError as exc:
        return {"status": "failed", "error": exc}
    except MemoryError:
        return {"status": "failed",
                "error": CellfitError(f"{Path(path).name} is too large for the worker's "
                                      "memory: make {setting} smaller or use workers with "
                                      "more memory.", setting="tile")}
    return {"status": "done", "outputs": [str(p) for p in outputs], "notices": notices}


def task_prepare(model_path, path, work, settings) -> np.ndarray:
    """Statistics of a long stack, and its scratch zarr (on a worker)."""
    import zarr

    model = _loaded_model(model_path, settings)
    with open_image(path, lazy=True) as img:
        stats = stack_stats(img, model.info)
        p = img.n_planes
        y, x = img.plane_shape
    chunk = (min(y, 2048), min(x, 2048))
    work = Path(work)
    zarr.create_array(store=str(work / "labels"), shape=(p, y, x), chunks=(1, *chunk),
                      dtype=np.uint32, fill_value=0)
    if settings.probabilities:
        k = model.info.n_classes
        zarr.create_array(store=str(work / "prob"), shape=(p, k, y, x), chunks=(1, 1, *chunk),
                          dtype=np.float32, fill_value=0)
    return stats


def task_slices(model_path, path, work, a, b, stats, settings) -> dict:
    """Predict slices ``a:b`` of a long stack into its scratch zarr (on a worker)."""
    import zarr

    model = _loaded_model(model_path, settings)
    work = Path(work)
    labels = zarr.open_array(str(work / "labels"), mode="r+")
    prob = zarr.open_array(str(work / "prob"), mode="r+") if settings.probabilities else None
    notices = []
    with open_image(path, lazy=True) as img:
        held: dict[int, np.ndarray] = {}  # raw planes in flight (classes of whole objects)
        planes = holding(((p, img.plane(p)) for p in range(a, b)), held, model.needs_image)
        for res in model.predictor.predict(planes, stats):
            if res.notice:
                notices.append(res.notice)
            if res.probabilities is None:
                continue
            raw = held.pop(res.plane, None)
            labels[res.plane] = model.labels(res.probabilities, raw).astype(np.uint32)
            if prob is not None:
                prob[res.plane] = res.probabilities
    return {"planes": b - a, "notices": notices}


def task_finalize(model_path, path, work, labels_path, prob_path, settings, fp, chunks) -> dict:
    """Write a long stack's outputs from its scratch zarr, in order (on a worker)."""
    import zarr

    info = read_model_info(model_path)
    work = Path(work)
    for out in (labels_path, prob_path):
        if out:
            remove_stale_temporaries(Path(out))
    notices = [n for c in chunks for n in c.get("notices", [])]
    labels = zarr.open_array(str(work / "labels"), mode="r")
    prob = zarr.open_array(str(work / "prob"), mode="r") if prob_path else None
    dtype = None
    try:
        with open_image(path, lazy=True) as img:
            for _attempt in range(2):
                writer = OutputWriter(info, img, Path(labels_path),
                                      Path(prob_path) if prob_path else None, settings, fp,
                                      labels_dtype=dtype)
                try:
                    fits = all(
                        writer.put(p, np.asarray(labels[p]),
                                   np.asarray(prob[p]) if prob is not None else None,
                                   img.plane(p) if settings.measure else None)
                        for p in range(img.n_planes)
                    )
                except BaseException:
                    writer.abort()
                    raise
                if fits:
                    outputs = writer.close()
                    break
                writer.abort()  # more objects than 16-bit labels hold: write 32-bit labels
                dtype = np.uint32
    except CellfitError as exc:
        return {"status": "failed", "error": exc}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"status": "done", "outputs": [str(p) for p in outputs], "notices": notices}


def _check_access(model_path: str, out_dir: str, some_input: str) -> str | None:
    """On a worker: None when it sees the model, an input and the output folder. (A
    worker without cellfit cannot even run this function: dask reports that.)"""
    for what, p in (("the model", model_path), ("the input", some_input)):
        if not os.path.isfile(p):
            return f"cannot see {what} {p}"
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        return f"cannot write into the output folder {out_dir}"
    return None


# ------------------------------------------------------------------- on this machine
def _client(scheduler):
    """A Client for ``scheduler`` (address, scheduler file, cluster or Client), and
    whether we made it (and must close it)."""
    try:
        from distributed import Client
    except ImportError:
        raise CellfitError(
            "{setting} needs dask.distributed: pip install 'napari-cellfit[distributed]'.",
            setting="scheduler",
        ) from None
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        if hasattr(scheduler, "scheduler_address"):  # a cluster object
            return Client(scheduler, set_as_default=False), True
        text = str(scheduler)
        if os.path.isfile(text):
            return Client(scheduler_file=text, set_as_default=False), True
        # connection timeout: dask's distributed.comm.timeouts.connect (30 s by default)
        return Client(text, set_as_default=False), True
    except (OSError, TimeoutError, ValueError) as exc:
        raise CellfitError(
            f"could not reach the dask scheduler at {scheduler} ({type(exc).__name__}): check "
            "the address (tcp://HOST:8786) or scheduler file, and that `dask scheduler` runs."
        ) from None


def _preflight(client, model_path: Path, out_dir: Path, files: Sequence[Path]) -> None:
    try:
        client.wait_for_workers(1, timeout=60)
    except (TimeoutError, OSError):
        raise CellfitError(
            "the dask scheduler has no workers: start some with `dask worker SCHEDULER`."
        ) from None
    answers = client.run(_check_access, str(model_path.resolve()), str(out_dir.resolve()),
                         str(files[0].resolve()))
    bad = {w: a for w, a in answers.items() if a}
    if bad:
        worker, why = next(iter(bad.items()))
        raise CellfitError(
            f"dask worker {worker} {why}: workers need the model, inputs and output folder at "
            "the same paths as this machine (a shared file system)."
        )


def predict_files_distributed(
    model_path, files: Sequence[Path], out_dir: Path, settings: Settings, digest: str, scheduler
) -> Iterator[FileEvent]:
    """The distributed half of :func:`cellfit.batch.predict_files`."""
    from distributed import as_completed

    model_path = Path(model_path).resolve()
    out_dir = Path(out_dir)
    client, own = _client(scheduler)
    futures: dict = {}
    works: dict[int, Path] = {}
    finished: set[int] = set()
    try:
        make_output_folder(out_dir)
        _preflight(client, model_path, out_dir, files)
        out_abs = out_dir.resolve()
        n = len(files)
        n_planes: dict[int, int] = {}
        sp = str(model_path)
        for i, f in enumerate(files):
            lab, prob = output_paths(f, out_abs, settings.format)
            wanted = (lab, prob) if settings.probabilities else (lab,)
            fp = fingerprint(digest, f, settings)
            if not settings.overwrite and output_state(wanted, fp) == "complete":
                finished.add(i)
                yield FileEvent(i, n, f, "skipped", outputs=wanted)
                continue
            try:
                with LazyImage(f) as img:
                    planes, (y, x) = img.n_planes, img.plane_shape
            except CellfitError as exc:
                finished.add(i)
                yield FileEvent(i, n, f, "failed", error=exc)
                continue
            n_planes[i] = planes
            fa = str(f.resolve())
            prob_arg = str(prob) if settings.probabilities else None
            tag = f"{i}-{f.stem}"
            if planes > settings.slices_per_task and y * x <= settings.huge_pixels:
                remove_stale_temporaries(out_abs / f"{f.stem}.work")
                work = works[i] = tmp_name(out_abs / f"{f.stem}.work")
                stats = client.submit(task_prepare, sp, fa, str(work), settings,
                                      key=f"cellfit-prepare-{tag}", pure=False)
                chunks = []
                for a in range(0, planes, settings.slices_per_task):
                    b = min(planes, a + settings.slices_per_task)
                    c = client.submit(task_slices, sp, fa, str(work), a, b, stats, settings,
                                      key=f"cellfit-slices-{a}-{b}-{tag}", pure=False)
                    futures[c] = (i, "slices", b - a)
                    chunks.append(c)
                fin = client.submit(task_finalize, sp, fa, str(work), str(lab), prob_arg,
                                    settings, fp, chunks, key=f"cellfit-finalize-{tag}",
                                    pure=False)
                futures[fin] = (i, "file", None)
            else:
                fut = client.submit(task_file, sp, fa, str(lab), prob_arg, settings, fp,
                                    key=f"cellfit-file-{tag}", pure=False)
                futures[fut] = (i, "file", None)
        done_planes: dict[int, int] = {}
        for fut in as_completed(list(futures), loop=client.loop):
            i, kind, count = futures[fut]
            f = files[i]
            if kind == "slices":
                if fut.status == "finished":
                    done_planes[i] = done_planes.get(i, 0) + count
                    notices = fut.result().get("notices") or []
                    yield FileEvent(i, n, f, "plane", done_planes[i], n_planes[i],
                                    notice="; ".join(notices) or None)
                continue
            finished.add(i)
            try:
                res = fut.result()
            except CellfitError as exc:
                res = {"status": "failed", "error": exc}
            except Exception as exc:  # a worker lost, or a bug: said plainly
                lost = type(exc).__name__ in ("KilledWorker", "CommClosedError", "CancelledError")
                res = {"status": "failed", "error": CellfitError(
                    f"{f.name} could not be segmented on the cluster: its worker was lost; "
                    "check the workers' logs and run the command again (finished files are "
                    "kept).") if lost else fault(exc, f"segmenting {f.name}")}
            if i in works:
                shutil.rmtree(works[i], ignore_errors=True)
            if res["status"] == "done":
                yield FileEvent(i, n, f, "done", n_planes[i], n_planes[i],
                                outputs=tuple(Path(p) for p in res["outputs"]),
                                notice="; ".join(res.get("notices") or []) or None)
            else:
                yield FileEvent(i, n, f, "failed", error=res["error"])
    finally:
        pending = [fut for fut in futures if not fut.done()]
        if pending:  # interrupted: stop the cluster's work on this batch
            client.cancel(pending)
        for i, work in works.items():
            if i not in finished:
                shutil.rmtree(work, ignore_errors=True)
        if own:
            client.close()
