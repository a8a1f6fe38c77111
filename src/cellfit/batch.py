"""Prediction over many files: the engine function behind ``cellfit predict`` and the
plugin's batch button.

* Streaming: stacks are read lazily (large files plane by plane, huge planes row band
  by row band), predicted plane by plane (tiles batched across planes) and written as
  they come, so memory does not grow with a stack's length or the number of files
  (one file: :func:`cellfit.file_prediction.run_file`).
* Safety: inputs are never modified or overwritten (an output folder that is an
  input's folder is refused); each output is written under a temporary name and
  renamed when complete; one bad file is reported and the batch goes on.
* Resume: an output that exists is complete (nothing else is ever renamed into place)
  and carries a fingerprint (model digest, input size and time, linking,
  post-processing, test-time augmentation and uncertainty settings). A rerun skips files whose outputs are complete and match;
  outputs made by another model or from a changed input are redone; ``overwrite``
  redoes everything.
* Scale-out: with ``scheduler``, files (and slices of long stacks) run as dask tasks
  on a dask.distributed cluster (:mod:`cellfit.distributed`).
* Measurements: with ``measure``, every file's cells go into ``<stem>_cells.csv``
  beside its labels (written with them), and the run's ``summary.csv`` has a row per
  file with its quality flags (:mod:`cellfit.measure`). Measuring is not part of the
  fingerprint: finished files are not predicted again for it; those without a current
  table are measured from their labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from cellfit import model as model_files
from cellfit.devices import resolve_device
from cellfit.distributed import predict_files_distributed
from cellfit.errors import CellfitError, Notice, fault
from cellfit.file_prediction import (
    FORMATS,
    HUGE_PIXELS,
    FileEvent,
    FileProgress,
    LoadedModel,
    Settings,
    file_summary,
    fingerprint,
    join_notices,
    measure_outputs,
    measurements_current,
    output_paths,
    output_state,
    run_file,
    wanted_outputs,
)
from cellfit.io import expand_inputs, open_image
from cellfit.measure import (
    FileSummary,
    expected_from_model,
    rank_flagged,
    summary_table,
    write_table,
)
from cellfit.outputs import file_digest, make_output_folder, read_fingerprint
from cellfit.predict import DEFAULT_OVERLAP, DEFAULT_TILE
from cellfit.starting import estimate_diameter, is_starting, needs_diameter, starting_model_path

__all__ = [
    "HUGE_PIXELS",
    "SUMMARY_NAME",
    "FileEvent",
    "FileProgress",
    "LoadedModel",
    "Settings",
    "output_paths",
    "predict_files",
    "run_file",
]

#: the run's summary table (one row per file), written into the output folder with ``measure``
SUMMARY_NAME = "summary.csv"

def _check_out_dir(files: Sequence[Path], out_dir: Path) -> None:
    out_r = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise CellfitError(f"output {out_dir} is a file: give a folder for the results.")
    for f in files:
        if f.resolve().parent == out_r:
            raise CellfitError(
                f"the output folder {out_dir} is the folder of the input {f.name}: choose a "
                "separate output folder so inputs are never overwritten."
            )


def _unique_outputs(files: Sequence[Path], out_dir: Path, fmt: str = "tiff") -> list[Path]:
    """Drop repeats of the same file; refuse two files that would write the same outputs."""
    seen: dict[str, Path] = {}
    unique = []
    for f in files:
        key = f.stem.lower()  # case-insensitive file systems collide too
        other = seen.get(key)
        if other is None:
            seen[key] = f
            unique.append(f)
        elif other.resolve() != f.resolve():
            raise CellfitError(
                f"the inputs {other} and {f} would both be written to the same output "
                f"{output_paths(f, out_dir, fmt)[0].name}: rename one of them or predict them "
                "into separate output folders."
            )
    return unique


# ------------------------------------------------------------------------- the batch
def predict_files(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    overwrite: bool = False,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int | None = None,
    device: str = "auto",
    postprocess: dict | None = None,
    link_slices: bool = False,
    format: str = "tiff",
    compression: str = "zlib",
    scheduler=None,
    slices_per_task: int = 64,
    huge_pixels: int = HUGE_PIXELS,
    amp: bool = True,
    diameter: float | None = None,
    tta: bool = False,
    measure: bool = False,
    uncertainty: bool = False,
) -> Iterator[FileEvent]:
    """Predict every TIFF in ``inputs`` (files or folders) into ``out_dir``.

    Yields :class:`FileEvent` as planes and files finish. Bad files yield a
    ``"failed"`` event and the batch goes on. Files whose outputs are complete (made
    by this model from this input with these settings) are skipped unless
    ``overwrite``; outdated ones are redone.

    Parameters
    ----------
    probabilities : bool
        Also write ``<stem>_prob`` (float32, one channel per class).
    batch_size : int or None
        Tiles per batch; None: automatic (from free GPU memory on CUDA).
    link_slices : bool
        Join per-slice instances of stacks into 3D objects by overlap.
    format : {"tiff", "zarr"}
    scheduler : str, dask.distributed.Client or None
        None: run here. Otherwise the address of a dask.distributed scheduler
        (``tcp://host:8786``), a scheduler file, or a Client: files and slices of
        long stacks (``slices_per_task`` planes each) become tasks on its workers.
    huge_pixels : int
        Planes with more pixels are predicted as huge planes (tile rows, blocks).
    diameter : float, optional
        Cell diameter in pixels, for a model that works on cells of any size (the
        starting model). Left out, such a model's is estimated from the first file
        (and the first event's notice says so).
    tta : bool
        Test-time augmentation: average the prediction over flipped and rotated copies
        of each tile (a little more accurate, 4-8 times slower). Outputs made without
        it are redone when it is asked for.
    measure : bool
        Measure every cell into ``<stem>_cells.csv`` beside its labels, and write
        :data:`SUMMARY_NAME` (a row per file, with its quality flags) into ``out_dir``
        after the last file; each file's last event carries its
        :class:`~cellfit.measure.FileSummary` (``summary``; its ``flags`` are set when
        the run ends). Instance models only.
    uncertainty : bool
        Also write ``<stem>_uncertainty`` (float32 in [0, 1]: how unsure the model is of
        each pixel, :func:`cellfit.uncertainty.uncertainty_from_probs`), one plane per
        labels plane; runs test-time augmentation. On this machine only (not with
        ``scheduler``), and not for planes of more than ``huge_pixels`` pixels.
    """
    if format not in FORMATS:
        raise CellfitError(f"unknown output format {format!r}: use tiff or zarr.")
    settings = Settings(
        probabilities=probabilities, overwrite=overwrite, tile=tile, overlap=overlap,
        batch_size=batch_size, device=device, postprocess=dict(postprocess or {}),
        link_slices=link_slices, format=format, compression=compression,
        huge_pixels=huge_pixels, amp=amp, slices_per_task=slices_per_task,
        diameter=diameter, tta=tta, measure=measure, uncertainty=uncertainty,
    )
    if uncertainty and scheduler is not None:
        raise CellfitError(
            "the uncertainty map is made on this machine only: run without {setting} to "
            "get it.",
            setting="scheduler",
        )
    if is_starting(model_path):
        model_path = starting_model_path()
    files = expand_inputs(inputs, "input")
    out_dir = Path(out_dir)
    _check_out_dir(files, out_dir)
    files = _unique_outputs(files, out_dir, format)
    info = model_files.read_model_info(model_path)  # a clear error for a missing or foreign model file
    if diameter is not None and not info.cell_diameter:
        raise CellfitError(
            f"{Path(model_path).name} was trained at a fixed cell size and takes no cell "
            "diameter: leave {setting} out.",
            setting="diameter_option",
        )
    if measure and info.mode != "instances":
        raise CellfitError(
            f"{Path(model_path).name} predicts classes, not single cells, so there are no "
            "cells to measure: predict without measuring, or use an instance model."
        )
    digest = file_digest(model_path)
    # every output complete: nothing to predict, no model to load, no diameter to estimate
    finished = _all_complete(files, out_dir, settings, digest)
    estimated: tuple[Path, Notice] | None = None  # the file the diameter came from, and the note
    if settings.diameter is None and needs_diameter(info) and not finished:
        settings.diameter, source, note = _estimate_diameter(model_path, files, settings)
        estimated = (source, note)
    if scheduler is not None:
        events = predict_files_distributed(model_path, files, out_dir, settings, digest,
                                           scheduler)
    else:
        model = None if finished else LoadedModel(model_path, settings)
        make_output_folder(out_dir)
        events = (
            ev
            for i, f in enumerate(files)
            for ev in _predict_or_skip(model, i, len(files), f, out_dir, settings, digest)
        )
    summaries: dict[int, FileSummary] = {}
    for ev in events:
        if estimated is not None and ev.path == estimated[0]:  # the note is that file's
            ev.notice = join_notices(estimated[1], ev.notice)
            estimated = None
        if measure and ev.status != "plane":
            ev.summary, note = _file_summary(ev, out_dir, settings)
            ev.notice = join_notices(ev.notice, note)
            summaries[ev.index] = ev.summary
        yield ev
    if measure:
        used = settings.diameter
        if used is None and needs_diameter(info):  # every file was finished before
            used = _diameter_used(files, out_dir, settings)
        expected = expected_from_model(info, used)
        ordered = [summaries[i] for i in sorted(summaries)]
        rank_flagged(ordered, expected)
        write_table(out_dir / SUMMARY_NAME, summary_table(ordered))


def _all_complete(files: Sequence[Path], out_dir: Path, settings: Settings, digest: str) -> bool:
    """Whether every file's outputs are complete (nothing to predict: no diameter to
    estimate)."""
    if settings.overwrite:
        return False
    for f in files:
        wanted = wanted_outputs(f, out_dir, settings)
        try:
            if output_state(wanted, fingerprint(digest, f, settings)) != "complete":
                return False
        except OSError:
            return False
    return True


def _diameter_used(files: Sequence[Path], out_dir: Path, settings: Settings) -> float | None:
    """The cell diameter the outputs of an earlier run were made with (from their
    fingerprint), for a run that estimated none because every file was finished."""
    for f in files:
        fp = read_fingerprint(output_paths(f, out_dir, settings.format)[0])
        if fp and isinstance(fp.get("diameter"), (int, float)):
            return float(fp["diameter"])
    return None


def _file_summary(ev: FileEvent, out_dir: Path, settings: Settings
                  ) -> tuple[FileSummary, str | None]:
    """The summary of a finished, skipped or failed file (measuring the labels of an
    earlier run that were not measured), and a note when it measured them."""
    f = Path(ev.path)
    if ev.status == "failed":
        why = str(ev.error) if ev.error is not None else "unknown error"
        return FileSummary(f.name, error=f"not segmented: {why}"), None
    lab = output_paths(f, out_dir, settings.format)[0]
    note = None
    try:
        if not measurements_current(lab):
            table = measure_outputs(f, lab, settings)
            if table is None:
                return FileSummary(f.name, error="not measured: its planes are too large"), None
            if ev.status == "skipped":
                note = f"measured the existing labels into {table.name}"
        return file_summary(f, lab), note
    except CellfitError as exc:
        return FileSummary(f.name, error=f"not measured: {exc}"), None
    except Exception as exc:  # a bug met on one file must not stop the batch
        return FileSummary(f.name, error=(
            f"not measured: internal error ({type(exc).__name__}: {exc}); this is a bug in "
            "cellfit: please report it")), None


def _estimate_diameter(model_path, files, settings) -> tuple[float, Path, Notice]:
    """The cell diameter of the first readable file (middle plane), that file, and a
    notice."""
    device = resolve_device(settings.device)
    model, info = model_files.load_model(model_path, device)
    for f in files:
        try:
            with open_image(f) as img:
                plane = img.plane(img.n_planes // 2)
        except CellfitError:
            continue  # reported when the file's turn comes
        d = estimate_diameter(model, info, plane, device=device)
        return d, f, Notice(
            f"cell diameter estimated at {d:g} pixels from {f.name}; to choose it yourself, "
            "set {setting}",
            setting="diameter_option",
        )
    raise CellfitError("none of the input files could be read: check the inputs.")


def _predict_or_skip(model: LoadedModel | None, i: int, n_files: int, f: Path, out_dir: Path,
                     settings: Settings, digest: str) -> Iterator[FileEvent]:
    """The events of file ``i`` of a local batch: skipped when its outputs are complete,
    otherwise predicted (outdated outputs replaced); a failure is an event too."""
    lab_path, prob_path = output_paths(f, out_dir, settings.format)
    wanted = wanted_outputs(f, out_dir, settings)
    notice = None
    try:
        fp = fingerprint(digest, f, settings)
        if not settings.overwrite:
            state = output_state(wanted, fp)
            if state == "complete":
                yield FileEvent(i, n_files, f, "skipped", outputs=wanted)
                return
            if state == "outdated":
                notice = (f"{lab_path.name} was made by another model, from an older "
                          f"{f.name} or with other settings: replacing it")
        if model is None:  # every output was complete when the run began
            raise CellfitError(
                f"the outputs of {f.name} changed while cellfit ran: run the command again."
            )
        gen = run_file(model, f, lab_path, prob_path if settings.probabilities else None,
                       settings, fp, uncertainty_path=wanted[-1] if settings.uncertainty else None)
        n_planes = 1
        try:
            while True:
                try:
                    ev = next(gen)
                except StopIteration as stop:
                    outputs = stop.value
                    break
                if not ev.tiles_total:  # a plane finished
                    n_planes = ev.n_planes
                yield FileEvent(i, n_files, f, "plane", ev.plane, ev.n_planes,
                                tiles_done=ev.tiles_done, tiles_total=ev.tiles_total,
                                notice=join_notices(notice, ev.notice))
                notice = None
        finally:
            gen.close()  # closed early (Ctrl-C, a cancelled plugin job): temporaries removed
        yield FileEvent(i, n_files, f, "done", n_planes, n_planes, outputs=tuple(outputs),
                        notice=notice)
    except CellfitError as exc:
        yield FileEvent(i, n_files, f, "failed", error=exc)
    except MemoryError:
        yield FileEvent(
            i, n_files, f, "failed",
            error=CellfitError(
                f"{f.name} is too large for this machine's memory: make {{setting}} smaller "
                "or split the stack.",
                setting="tile",
            ),
        )
    except Exception as exc:  # a bug met on one file must not stop the batch
        yield FileEvent(
            i, n_files, f, "failed",
            error=fault(exc, f"segmenting {f.name}"),
        )
