"""Predicting one file into its outputs: what the local batch (:mod:`cellfit.batch`)
and the cluster tasks (:mod:`cellfit.distributed`) share.

* :class:`Settings`: how files are predicted and written (sent to cluster workers as is).
* :class:`LoadedModel`: a model file loaded for prediction, with its tile runner and
  streaming predictor (one per process).
* :func:`fingerprint` and :func:`output_state`: what an output's validity depends on,
  and whether existing outputs are complete, outdated or missing.
* :class:`OutputWriter`: writes one file's labels (and probabilities) plane by plane,
  linking slices and choosing the labels' dtype, and publishes them atomically.
* :func:`run_file`: predicts one file into its outputs, streaming, and yields
  :class:`FileProgress` events; huge planes (more than ``Settings.huge_pixels``
  pixels) are streamed row band by row band and labelled in blocks merged across
  seams (:mod:`cellfit.stream`).
* :class:`FileEvent`: the progress of a batch, one file at a time.
* With ``Settings.measure``, :class:`OutputWriter` also measures every cell as planes
  are written and publishes ``<stem>_cells.csv`` with the labels
  (:mod:`cellfit.measure`); :func:`measure_outputs` measures finished labels of an
  earlier run, :func:`file_summary` reads a file's measurements back for the summary.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellfit import model as model_files
from cellfit.devices import resolve_device
from cellfit.errors import CellfitError, Notice
from cellfit.events import Progress, share_done
from cellfit.io import ImageMeta, open_image
from cellfit.link import SliceLinker
from cellfit.measure import (
    FileSummary,
    Measurer,
    TableWriter,
    cells_csv_path,
    image_range,
    pixel_size_of,
    read_table,
)
from cellfit.outputs import (
    TILE,
    label_dtype,
    open_sink,
    read_fingerprint,
    remove_stale_temporaries,
    tmp_name,
)
from cellfit.postprocess import classes_from_probs, labels_from_probs, postprocess_settings
from cellfit.predict import DEFAULT_OVERLAP, DEFAULT_TILE, PlanePredictor, TileRunner
from cellfit.starting import apply_diameter, needs_diameter
from cellfit.stream import BlockLabeller, NormRows, ResizeRows, RowStream, stack_stats
from cellfit.uncertainty import uncertainty_from_probs

__all__ = [
    "FORMATS",
    "HUGE_PIXELS",
    "FileEvent",
    "FileProgress",
    "LoadedModel",
    "OutputWriter",
    "Settings",
    "file_summary",
    "fingerprint",
    "holding",
    "measure_outputs",
    "measurements_current",
    "output_paths",
    "output_state",
    "run_file",
    "uncertainty_path",
    "wanted_outputs",
]

#: planes with more pixels than this (8192 x 8192) are predicted as huge planes
HUGE_PIXELS = 8192 * 8192
FORMATS = ("tiff", "zarr")
_SUFFIX = {"tiff": ".tif", "zarr": ".zarr"}


# ---------------------------------------------------------------------------- events
@dataclass
class FileProgress(Progress):
    """Progress inside one file, as :func:`run_file` yields it.

    ``plane`` of ``n_planes`` planes are finished; while a plane is in progress
    (``tiles_total`` > 0), ``tiles_done`` of its ``tiles_total`` tiles are.
    ``fraction`` is the share of the file done.
    """

    plane: int = 0
    n_planes: int = 1
    tiles_done: int = 0
    tiles_total: int = 0

    def __post_init__(self) -> None:
        self.fraction = share_done(self.plane, self.n_planes, self.tiles_done, self.tiles_total)
        self.text = f"plane {self.plane} of {self.n_planes}"


@dataclass
class FileEvent(Progress):
    """Progress of a batch: events while a file is in progress, and one per finished file.

    ``status`` is ``"plane"`` while a file is in progress (``plane`` of ``n_planes``
    planes finished; inside a plane ``tiles_done`` of ``tiles_total`` tiles), then
    ``"done"``, ``"skipped"`` (complete outputs exist) or ``"failed"`` (``error`` says
    why: a :class:`~cellfit.errors.CellfitError`, which a front end words with its own
    names of the settings, :func:`cellfit.errors.worded`). ``notice`` carries a message
    for the user (e.g. the tile batch was halved after the GPU ran out of memory, or
    outdated outputs were replaced).

    ``fraction`` is the share of the batch done (files before this one count whole),
    ``file_fraction`` the share of this file; ``text`` says where the batch is
    ("File 2 of 5: a.tif, slice 3 of 12").
    """

    index: int
    n_files: int
    path: Path
    status: str
    plane: int = 0
    n_planes: int = 1
    outputs: tuple[Path, ...] = ()
    error: CellfitError | None = None
    tiles_done: int = 0
    tiles_total: int = 0
    #: with ``measure``: the file's measurements in brief (:mod:`cellfit.measure`), on
    #: its last event (done, skipped or failed)
    summary: FileSummary | None = None
    file_fraction: float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        if self.status == "plane":
            self.file_fraction = share_done(
                self.plane, self.n_planes, self.tiles_done, self.tiles_total
            )
        self.fraction = min(1.0, (self.index + self.file_fraction) / max(1, self.n_files))
        head = f"File {self.index + 1} of {self.n_files}: {Path(self.path).name}"
        if self.status == "plane":
            slices = f", slice {self.plane} of {self.n_planes}" if self.n_planes > 1 else ""
            self.text = head + slices
        else:
            self.text = head + {"done": ", done", "skipped": ", skipped (results exist)",
                                "failed": ", failed"}.get(self.status, "")


def join_notices(*notices: Notice | str | None) -> Notice | str | None:
    """The notices that are set, as one (None when none is); plain text stays text."""
    if not any(isinstance(n, Notice) for n in notices):
        return "; ".join(n for n in notices if n) or None
    return Notice.join(*notices)


# -------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """How files are predicted and written (sent to cluster workers as is)."""

    probabilities: bool = False
    overwrite: bool = False
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int | None = None
    device: str = "auto"
    postprocess: dict = field(default_factory=dict)
    link_slices: bool = False
    format: str = "tiff"
    compression: str = "zlib"
    huge_pixels: int = HUGE_PIXELS
    amp: bool = True
    slices_per_task: int = 64
    #: side of the blocks huge planes are labelled in (None: from the plane's width)
    block: int | None = None
    #: cell diameter in image pixels, for models that work on cells of any size (the
    #: starting model); None: the model's own, or estimated from the first file
    diameter: float | None = None
    #: test-time augmentation: average over flipped and rotated copies of each tile
    #: (4-8 times slower; :class:`cellfit.predict.TileRunner`)
    tta: bool = False
    #: measure every cell into ``<stem>_cells.csv`` beside the labels (instance models);
    #: not part of the fingerprint: asking for it never redoes finished labels
    measure: bool = False
    #: also write ``<stem>_uncertainty`` (float32 in [0, 1], one plane per labels
    #: plane; :func:`cellfit.uncertainty.uncertainty_from_probs`); implies ``tta``
    uncertainty: bool = False

    @property
    def augmented(self) -> bool:
        """Whether prediction runs test-time augmentation (asked, or implied by
        ``uncertainty``)."""
        return bool(self.tta or self.uncertainty)


def output_paths(path: Path, out_dir: Path, fmt: str = "tiff") -> tuple[Path, Path]:
    """``(<out>/<stem>_labels.tif, <out>/<stem>_prob.tif)`` for an input file
    (``.zarr`` with ``fmt="zarr"``)."""
    suffix = _SUFFIX[fmt]
    return out_dir / f"{path.stem}_labels{suffix}", out_dir / f"{path.stem}_prob{suffix}"


def uncertainty_path(path: Path, out_dir: Path, fmt: str = "tiff") -> Path:
    """``<out>/<stem>_uncertainty.tif`` for an input file (``.zarr`` with ``fmt="zarr"``)."""
    return out_dir / f"{Path(path).stem}_uncertainty{_SUFFIX[fmt]}"


def wanted_outputs(path: Path, out_dir: Path, settings: Settings) -> tuple[Path, ...]:
    """The outputs ``settings`` ask for: the labels, then the probabilities and the
    uncertainty when asked."""
    lab, prob = output_paths(path, out_dir, settings.format)
    return (lab, *((prob,) if settings.probabilities else ()),
            *((uncertainty_path(path, out_dir, settings.format),) if settings.uncertainty else ()))


# ---------------------------------------------------------------------- loaded model
class LoadedModel:
    """A model file loaded for prediction, with its tile runner and streaming
    predictor (one per process; cluster workers keep theirs between tasks)."""

    def __init__(self, model_path: str | Path, settings: Settings) -> None:
        self.model_path = Path(model_path)
        self.device = resolve_device(settings.device)
        self.model, self.info = model_files.load_model(self.model_path, self.device)
        if settings.diameter is not None:
            self.info = apply_diameter(self.info, settings.diameter)
        elif needs_diameter(self.info):
            raise CellfitError(
                "this model works on cells of any size and needs their diameter: give "
                "{setting}.",
                setting="diameter",
            )
        self.runner = TileRunner(
            self.model, self.device, batch_size=settings.batch_size, amp=settings.amp,
            tta=settings.augmented,
        )
        self.predictor = PlanePredictor(
            self.model, self.info, self.runner, tile=settings.tile, overlap=settings.overlap
        )
        self.postprocess = postprocess_settings(self.info.postprocess, settings.postprocess)

    @property
    def needs_image(self) -> bool:
        """Whether :meth:`labels` looks at the raw plane (classes of whole objects)."""
        return self.info.mode == "semantic" and bool(self.postprocess.get("objects"))

    def labels(self, probs: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Labels (instances or classes) of one plane's probabilities ``(K, Y, X)``;
        ``image``, the raw plane ``(C, Y, X)``, where :attr:`needs_image`."""
        return labels_from_probs(probs, self.info.mode, image=image, **self.postprocess)


# ------------------------------------------------------------------- output validity
def fingerprint(model_digest: str, path: Path, settings: Settings) -> dict:
    """What an output's validity depends on (stored in the output)."""
    st = Path(path).stat()
    return {
        "model": model_digest,
        "input": [int(st.st_size), int(st.st_mtime_ns)],
        "link_slices": bool(settings.link_slices),
        "postprocess": dict(sorted((settings.postprocess or {}).items())),
        **({"diameter": settings.diameter} if settings.diameter is not None else {}),
        **({"tta": True} if settings.augmented else {}),
        **({"uncertainty": True} if settings.uncertainty else {}),
    }


def output_state(paths: Sequence[Path], fp: dict) -> str:
    """``"complete"`` (all exist, made with this model from this input and settings),
    ``"outdated"`` (all exist, but made otherwise) or ``"missing"``."""
    if not all(p.exists() for p in paths):
        return "missing"
    for p in paths:
        have = read_fingerprint(p)
        if have is None or any(have.get(k) != v for k, v in fp.items()):
            return "outdated"
    return "complete"


# -------------------------------------------------------------------------- writer
def _stack_axes(axes: str) -> str:
    """The axes around the planes (all but Y, X and channels), e.g. "TZ"."""
    return "".join(a for a in axes if a not in "YXCS")


class OutputWriter:
    """Writes the labels (and probabilities) of one file plane by plane, in order:
    links slices when asked, chooses the labels' dtype, and publishes atomically.

    Stacks get 16-bit labels unless ``labels_dtype`` says otherwise; :meth:`put`
    refuses (returns False) a plane with more objects than that holds, and the file
    is then written again with 32-bit labels.
    """

    def __init__(
        self,
        info,
        img,
        labels_path: Path,
        prob_path: Path | None,
        settings: Settings,
        fp: dict | None,
        *,
        labels_dtype=None,
        tiled: bool = False,
        uncertainty_path: Path | None = None,
    ) -> None:
        self.info = info
        self.settings = settings
        self.fp = fp
        self.meta: ImageMeta = img.meta
        self.stack_shape = tuple(img.lead_shape)
        self.plane_shape = tuple(img.plane_shape)
        self.n_planes = img.n_planes
        stack_axes = _stack_axes(img.axes)
        if len(stack_axes) != len(self.stack_shape):  # axes unknown: name them like tifffile
            stack_axes = "Q" * len(self.stack_shape)
        self.lab_axes = stack_axes + "YX"
        self.prob_axes = stack_axes + "CYX"
        self.labels_path = labels_path
        self.tiled = tiled
        self.instances = self.info.mode == "instances"
        if labels_dtype is None and not self.instances:
            labels_dtype = np.uint8 if self.info.n_classes <= 255 else np.uint16
        if labels_dtype is None and self.n_planes > 1:
            labels_dtype = np.uint16  # written again as uint32 in the rare case it overflows
        self.labels_dtype = labels_dtype
        self.linker = (
            SliceLinker(self.stack_shape)
            if settings.link_slices and self.instances and self.n_planes > 1
            else None
        )
        self.lab_sink = None
        self.prob_sink = None
        self.unc_sink = None
        self.table = None
        self.measurer = None
        if settings.measure and self.instances:
            self.measurer = Measurer(pixel_size=pixel_size_of(self.meta))
        if prob_path is not None:
            self.prob_sink = open_sink(
                settings.format, prob_path,
                (*self.stack_shape, self.info.n_classes, *self.plane_shape), np.float32,
                self.prob_axes, self.meta, tiled=tiled, compression=settings.compression,
                fingerprint=fp,
            )
        if uncertainty_path is not None:
            self.unc_sink = open_sink(
                settings.format, uncertainty_path, (*self.stack_shape, *self.plane_shape),
                np.float32, self.lab_axes, self.meta, tiled=tiled,
                compression=settings.compression, fingerprint=fp,
            )

    def labels_sink(self, dtype):
        """The labels' sink, opened with ``dtype`` on first use."""
        if self.lab_sink is None:
            self.labels_dtype = dtype
            self.lab_sink = open_sink(
                self.settings.format, self.labels_path, (*self.stack_shape, *self.plane_shape),
                dtype, self.lab_axes, self.meta, tiled=self.tiled,
                compression=self.settings.compression, fingerprint=self.fp,
            )
        return self.lab_sink

    def holds(self, n_objects: int) -> bool:
        """Whether the labels' dtype holds ids up to ``n_objects``."""
        return self.labels_dtype is None or n_objects <= np.iinfo(self.labels_dtype).max

    def put(self, p: int, labels: np.ndarray, probs: np.ndarray | None,
            raw: np.ndarray | None = None) -> bool:
        """Write plane ``p``'s labels (per-slice ids) and probabilities ``(K, Y, X)``;
        with ``Settings.measure``, measure its cells (``raw``: the plane's pixels
        ``(C, Y, X)``, for the intensity columns).

        Returns False, writing nothing, when the plane has more objects than the
        labels' dtype holds (the file must be written again with wider labels).
        """
        if self.linker is not None:
            labels = self.linker(p, labels)
        top = int(labels.max()) if labels.size else 0
        if not self.holds(top):
            return False
        dtype = self.labels_dtype or label_dtype(top)
        self.labels_sink(dtype).put(labels.astype(dtype, copy=False))
        if self.measurer is not None:
            self.measurer.add(labels, raw, plane=p)
        if self.prob_sink is not None and probs is not None:
            for k in range(probs.shape[0]):
                self.prob_sink.put(probs[k])
        if self.unc_sink is not None and probs is not None:
            self.unc_sink.put(uncertainty_from_probs(probs, self.info.mode))
        return True

    def close(self) -> tuple[Path, ...]:
        """Publish the outputs, once every one of them is complete (an output that
        fails to finish leaves the others unpublished too: aborted by the caller)."""
        sinks = [s for s in (self.lab_sink, self.prob_sink, self.unc_sink) if s is not None]
        for s in sinks:
            s.finish()
        if self.measurer is not None:  # written last: never older than the labels
            csv_path = cells_csv_path(self.labels_path)
            remove_stale_temporaries(csv_path)
            self.table = TableWriter(csv_path, self.measurer.table())
            self.table.finish()
            sinks.append(self.table)
        return tuple(s.close() for s in sinks)

    def abort(self) -> None:
        for s in (self.lab_sink, self.prob_sink, self.unc_sink, self.table):
            if s is not None:
                s.abort()


# --------------------------------------------------------------------------- one file
def run_file(
    model: LoadedModel,
    path: Path,
    labels_path: Path,
    prob_path: Path | None,
    settings: Settings,
    fp: dict | None = None,
    *,
    uncertainty_path: Path | None = None,
) -> Iterator[FileProgress]:
    """Predict one file into its outputs, streaming.

    A generator of :class:`FileProgress` events (after each finished plane, and after
    batches of tiles inside a plane); its return value is the tuple of outputs.
    On any error or when closed early, no output or temporary is left.
    ``uncertainty_path``: also write the uncertainty there (the model must have been
    loaded with test-time augmentation, ``Settings.uncertainty``).
    """
    for p in (labels_path, prob_path, uncertainty_path):
        if p is not None:
            remove_stale_temporaries(p)
    img = open_image(path)
    try:
        # the scratch folder of huge planes, left behind by a killed run (nothing runs at SIGKILL)
        remove_stale_temporaries(labels_path.parent / f"{img.name}.work")
        y, x = img.plane_shape
        huge = y * x > settings.huge_pixels
        if huge and uncertainty_path is not None:
            raise CellfitError(
                f"the planes of {img.name} ({y}x{x} pixels) are too large for an uncertainty "
                "map: predict them without it, or crop the image."
            )
        predict = _predict_huge_planes if huge else _predict_planes
        unc = {} if huge else {"uncertainty_path": uncertainty_path}
        outputs = yield from predict(model, img, labels_path, prob_path, settings, fp, **unc)
        if outputs is None:  # more objects than 16-bit labels hold: write 32-bit labels
            outputs = yield from predict(
                model, img, labels_path, prob_path, settings, fp, dtype=np.uint32,
                notice=f"{path.name}: more than 65535 objects, writing 32-bit labels", **unc,
            )
        if outputs is None:  # pragma: no cover - over four billion objects
            raise RuntimeError(f"{path.name}: more objects than 32-bit labels hold")
        return outputs
    finally:
        img.close()


def holding(items: Iterator[tuple[int, np.ndarray]], held: dict[int, np.ndarray],
            keep: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """``items`` (``(p, raw plane)``) passed on, each plane also put in ``held`` under
    ``p`` when ``keep``: the raw planes in flight through prediction, for what needs
    them once their probabilities come (measurements, classes of whole objects)."""
    for p, arr in items:
        if keep:
            held[p] = arr
        yield p, arr


def _prefetch(read: Callable[[int], np.ndarray], n: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(p, read(p))`` for p < n, read one plane ahead in a thread (decoding overlaps
    prediction); stops the thread when closed."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        for p in range(n):
            if stop.is_set():
                return
            try:
                item = (p, read(p), None)
            except BaseException as exc:
                item = (p, None, exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    t = threading.Thread(target=work, name="cellfit read-ahead", daemon=True)
    t.start()
    try:
        for _ in range(n):
            p, arr, exc = q.get()
            if exc is not None:
                raise exc
            yield p, arr
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            q.get_nowait()
        t.join(timeout=5)


def _predict_planes(model, img, labels_path, prob_path, settings, fp, dtype=None,
                    notice=None, uncertainty_path=None):
    """Predict the planes of a file one after another (read one ahead, tiles batched
    across planes) and write them as they come. Returns the outputs, or None when the
    labels outgrew ``dtype`` (nothing is left written)."""
    stats = stack_stats(img, model.info)
    writer = OutputWriter(model.info, img, labels_path, prob_path, settings, fp,
                          labels_dtype=dtype, uncertainty_path=uncertainty_path)
    n = img.n_planes
    done = 0
    planes = _prefetch(img.plane, n)
    held: dict[int, np.ndarray] = {}  # raw planes in flight, for measurements and classes
    keep = writer.measurer is not None or model.needs_image
    try:
        for res in model.predictor.predict(holding(planes, held, keep), stats):
            notice = join_notices(notice, res.notice)
            if res.probabilities is None:
                yield FileProgress(plane=done, n_planes=n, tiles_done=res.tiles_done,
                                   tiles_total=res.tiles_total, notice=notice)
                notice = None
                continue
            raw = held.pop(res.plane, None)
            if not writer.put(res.plane, model.labels(res.probabilities, raw), res.probabilities,
                              raw):
                writer.abort()
                return None
            done = res.plane + 1
            yield FileProgress(plane=done, n_planes=n, notice=notice)
            notice = None
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        planes.close()


def _block_geometry(width: int, scale: float) -> tuple[int, int]:
    """Block side and halo for labelling a huge plane of ``width`` columns: blocks keep
    a band of probabilities near 2**25 values; the halo covers two cell diameters."""
    block = max(TILE, min(4 * TILE, (2**25 // max(1, width)) // TILE * TILE))
    halo = max(64, int(np.ceil(2 * 30 / max(scale, 1e-3))))
    return block, min(halo, block // 2)


def _predict_huge_planes(model, img, labels_path, prob_path, settings, fp, dtype=None,
                         notice=None):
    """Predict planes too large for memory, each streamed row band by row band: tile
    rows → probability rows → labels in blocks merged across seams, kept in a scratch
    zarr, then written tile by tile. Returns the outputs, or None when the labels
    outgrew ``dtype`` (nothing is left written)."""
    import zarr  # an optional dependency, needed for huge planes only

    info, pred = model.info, model.predictor
    stats = stack_stats(img, info)
    y, x = img.plane_shape
    k = info.n_classes
    block, halo = _block_geometry(x, pred.scale)
    if settings.block:
        block = int(settings.block)
        halo = min(halo, block // 2)
    work = tmp_name(labels_path.parent / f"{img.name}.work")
    writer = None
    if settings.link_slices and img.n_planes > 1:
        notice = join_notices(
            notice, f"{img.name}: planes of {y}x{x} are too large to link; labels are per slice"
        )
        settings = replace(settings, link_slices=False)
    if settings.measure:
        notice = join_notices(
            notice, f"{img.name}: planes of {y}x{x} are too large to measure; its cells are "
            "not in the tables"
        )
        settings = replace(settings, measure=False)
    if model.needs_image:
        notice = join_notices(
            notice, f"{img.name}: planes of {y}x{x} are too large to class whole objects; "
            "each pixel takes its likeliest class"
        )
    try:
        for p in range(img.n_planes):
            src = NormRows(img, p, info, stats)
            mshape = pred.model_shape((y, x))
            if mshape != (y, x):
                src = ResizeRows(src, mshape)
            rows = RowStream(pred.predict_rows(src, key=p), (k, *mshape))
            full = ResizeRows(rows, (y, x)) if mshape != (y, x) else rows
            chunks = (min(TILE, y), min(TILE, x))
            raw = zarr.create_array(store=str(work / f"labels{p}"), shape=(y, x), chunks=chunks,
                                    dtype=np.uint32, fill_value=0)
            probz = None
            if prob_path is not None:
                probz = zarr.create_array(store=str(work / f"prob{p}"), shape=(k, y, x),
                                          chunks=(1, *chunks), dtype=np.float32, fill_value=0)
            labeller = None
            if info.mode == "instances":
                labeller = BlockLabeller((y, x), block, halo, model.labels)
            n_rows = -(-y // block)
            for i in range(n_rows):
                if labeller is not None:
                    lo, hi, r0, r1 = labeller.band(i)
                else:
                    lo = r0 = i * block
                    hi = r1 = min(y, r0 + block)
                band = full.rows(lo, hi)
                for item in rows.side:
                    yield FileProgress(plane=p, n_planes=img.n_planes,
                                       tiles_done=item.tiles_done, tiles_total=item.tiles_total,
                                       notice=join_notices(notice, item.notice))
                    notice = None
                rows.side.clear()
                if probz is not None:
                    probz[:, r0:r1] = band[:, r0 - lo : r1 - lo]
                if labeller is not None:
                    raw[r0:r1] = labeller.feed(i, band)
                else:
                    raw[r0:r1] = classes_from_probs(band[:, r0 - lo : r1 - lo])
            rows.drain()
            for item in rows.side:
                yield FileProgress(plane=p, n_planes=img.n_planes, tiles_done=item.tiles_done,
                                   tiles_total=item.tiles_total, notice=notice)
                notice = None
            rows.side.clear()
            lut, n_obj = labeller.lut() if labeller is not None else (None, 0)
            if writer is None:
                if dtype is None and labeller is not None:
                    dtype = label_dtype(n_obj) if img.n_planes == 1 else np.uint16
                writer = OutputWriter(info, img, labels_path, prob_path, settings, fp,
                                      labels_dtype=dtype, tiled=True)
            if lut is not None and not writer.holds(n_obj):
                writer.abort()
                return None
            sink = writer.labels_sink(writer.labels_dtype)
            for tile in _tiles(raw, lut):
                sink.put(tile.astype(writer.labels_dtype, copy=False))
            if probz is not None:
                for c in range(k):
                    for tile in _tiles(probz, None, c):
                        writer.prob_sink.put(tile)
            shutil.rmtree(work, ignore_errors=True)
            yield FileProgress(plane=p + 1, n_planes=img.n_planes, notice=notice)
            notice = None
        return writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tiles(z, lut: np.ndarray | None = None, channel: int | None = None):
    """Tiles (TILE x TILE, zero-padded at the edges) of a 2D zarr array (or of one
    channel of a 3D one), row by row, mapped through ``lut`` when given."""
    y, x = z.shape[-2:]
    for y0 in range(0, y, TILE):
        band = np.asarray(z[y0 : y0 + TILE] if channel is None else z[channel, y0 : y0 + TILE])
        if lut is not None:
            band = lut[band]
        for x0 in range(0, x, TILE):
            t = band[:, x0 : x0 + TILE]
            if t.shape != (TILE, TILE):
                t = np.pad(t, ((0, TILE - t.shape[0]), (0, TILE - t.shape[1])))
            yield t


# --------------------------------------------------------------------- measurements
def measurements_current(labels_path: Path) -> bool:
    """Whether the measurements table beside a labels output (``<stem>_cells.csv``)
    exists and is from these labels: written with them or after them (a table older
    than its labels describes an earlier result)."""
    try:
        table = cells_csv_path(labels_path).stat()
        return table.st_mtime_ns >= Path(labels_path).stat().st_mtime_ns
    except OSError:
        return False


def _label_planes(labels_path: Path, lead_shape: tuple[int, ...], plane_shape: tuple[int, int]):
    """A function ``p -> labels of plane p`` over a labels output (TIFF or zarr), read
    one plane at a time; one sentence when its shape is not the image's."""
    labels_path = Path(labels_path)
    if labels_path.is_dir():
        import zarr  # an optional dependency, needed for zarr outputs only

        z = zarr.open_array(str(labels_path), mode="r")
        shape = tuple(z.shape)

        def plane(p: int) -> np.ndarray:
            idx = np.unravel_index(p, lead_shape) if lead_shape else ()
            return np.asarray(z[tuple(int(i) for i in idx)])

        closer = None
    else:
        lab = open_image(labels_path, lazy=True)
        shape = tuple(lab.labels_shape)

        def plane(p: int) -> np.ndarray:
            return lab.plane(p)[0]

        closer = lab
    if int(np.prod(shape[:-2])) != int(np.prod(lead_shape)) or shape[-2:] != plane_shape:
        if closer is not None:
            closer.close()
        raise CellfitError(
            f"the labels {labels_path.name} have shape {shape}, not their image's "
            f"({(*lead_shape, *plane_shape)}): predict the file again (--overwrite)."
        )
    return plane, closer


def measure_outputs(path: Path, labels_path: Path, settings: Settings) -> Path | None:
    """Measure the finished labels of ``path`` (an earlier run's) into
    ``<stem>_cells.csv``, plane by plane, atomically. Returns the table's path, or None
    for planes too large to measure (more than ``settings.huge_pixels`` pixels)."""
    with open_image(path) as img:
        y, x = img.plane_shape
        if y * x > settings.huge_pixels:
            return None
        plane, closer = _label_planes(labels_path, tuple(img.lead_shape), (y, x))
        try:
            m = Measurer(pixel_size=pixel_size_of(img.meta))
            for p in range(img.n_planes):
                m.add(plane(p), img.plane(p), plane=p)
        finally:
            if closer is not None:
                closer.close()
    csv_path = cells_csv_path(labels_path)
    remove_stale_temporaries(csv_path)
    return TableWriter(csv_path, m.table()).close()


def file_summary(path: Path, labels_path: Path) -> FileSummary:
    """A file's measurements in brief, read back from its ``<stem>_cells.csv`` (with its
    image's intensity range, read plane by plane)."""
    table = read_table(cells_csv_path(labels_path))
    with open_image(path) as img:
        return FileSummary.of_table(
            Path(path).name, table, planes=img.n_planes, plane_shape=img.plane_shape,
            intensity=image_range(img),
        )
