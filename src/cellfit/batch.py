"""Prediction over many files: the engine function behind ``cellfit predict`` and the
plugin's batch button.

* Streaming: stacks are read lazily (large files plane by plane, huge planes row band
  by row band), predicted plane by plane (tiles batched across planes) and written as
  they come, so memory does not grow with a stack's length or the number of files.
  Huge 2D planes (more than :data:`HUGE_PIXELS` pixels) are predicted tile row by
  tile row and labelled in blocks merged across seams (:mod:`cellfit.stream`).
* Safety: inputs are never modified or overwritten (an output folder that is an
  input's folder is refused); each output is written under a temporary name and
  renamed when complete; one bad file is reported and the batch goes on.
* Resume: an output that exists is complete (nothing else is ever renamed into place)
  and carries a fingerprint (model digest, input size and time, linking and
  post-processing settings). A rerun skips files whose outputs are complete and match;
  outputs made by another model or from a changed input are redone; ``overwrite``
  redoes everything.
* Scale-out: with ``scheduler``, files (and slices of long stacks) run as dask tasks
  on a dask.distributed cluster (:mod:`cellfit.distributed`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellfit.errors import CellfitError
from cellfit.io import ImageMeta, expand_inputs, open_image
from cellfit.postprocess import classes_from_probs, labels_from_probs
from cellfit.predict import DEFAULT_OVERLAP, DEFAULT_TILE, TileRunner, resolve_device
from cellfit.starting import apply_diameter, is_starting, needs_diameter, starting_model_path

__all__ = [
    "HUGE_PIXELS",
    "Engine",
    "FileEvent",
    "Settings",
    "label_dtype",
    "output_paths",
    "predict_files",
    "run_file",
]

#: planes with more pixels than this (8192 x 8192) are predicted as huge planes
HUGE_PIXELS = 8192 * 8192
FORMATS = ("tiff", "zarr")
_SUFFIX = {"tiff": ".tif", "zarr": ".zarr"}


@dataclass
class FileEvent:
    """Progress of a batch: events while a file is in progress, and one per finished file.

    ``status`` is ``"plane"`` while a file is in progress (``plane`` of ``n_planes``
    planes finished; inside a huge plane ``tiles_done`` of ``tiles_total`` tiles),
    then ``"done"``, ``"skipped"`` (complete outputs exist) or ``"failed"`` (``error``
    says why). ``notice`` carries a message for the user (e.g. the tile batch was
    halved after the GPU ran out of memory, or outdated outputs were replaced).
    """

    index: int
    n_files: int
    path: Path
    status: str
    plane: int = 0
    n_planes: int = 1
    outputs: tuple[Path, ...] = ()
    error: str | None = None
    notice: str | None = None
    tiles_done: int = 0
    tiles_total: int = 0

    @property
    def fraction(self) -> float:
        """Fraction of this file done (0..1)."""
        if self.status != "plane":
            return 1.0
        inner = self.tiles_done / self.tiles_total if self.tiles_total else 0.0
        return min(1.0, (self.plane + inner) / max(1, self.n_planes))


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


def label_dtype(max_label: int) -> type:
    """Smallest unsigned dtype that holds ``max_label``."""
    if max_label < 2**8:
        return np.uint8
    if max_label < 2**16:
        return np.uint16
    return np.uint32


def output_paths(path: Path, out_dir: Path, fmt: str = "tiff") -> tuple[Path, Path]:
    """``(<out>/<stem>_labels.tif, <out>/<stem>_prob.tif)`` for an input file
    (``.zarr`` with ``fmt="zarr"``)."""
    suffix = _SUFFIX[fmt]
    return out_dir / f"{path.stem}_labels{suffix}", out_dir / f"{path.stem}_prob{suffix}"


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


# ---------------------------------------------------------------------------- engine
class Engine:
    """A loaded model with its tile runner and streaming predictor (one per process)."""

    def __init__(self, model_path: str | Path, settings: Settings) -> None:
        from cellfit.model import load_model
        from cellfit.stream import PlanePredictor

        self.model_path = Path(model_path)
        self.device = resolve_device(settings.device)
        self.model, self.info = load_model(self.model_path, self.device)
        if settings.diameter is not None:
            self.info = apply_diameter(self.info, settings.diameter)
        elif needs_diameter(self.info):
            raise CellfitError(
                "this model works on cells of any size and needs their diameter: give "
                "--diameter PIXELS."
            )
        self.runner = TileRunner(
            self.model, self.device, batch_size=settings.batch_size, amp=settings.amp
        )
        self.predictor = PlanePredictor(
            self.model, self.info, self.runner, tile=settings.tile, overlap=settings.overlap
        )
        self.postprocess = {**self.info.postprocess, **(settings.postprocess or {})}

    def labels(self, probs: np.ndarray) -> np.ndarray:
        return labels_from_probs(probs, self.info.mode, **self.postprocess)


def fingerprint(model_digest: str, path: Path, settings: Settings) -> dict:
    """What an output's validity depends on (stored in the output)."""
    st = Path(path).stat()
    return {
        "model": model_digest,
        "input": [int(st.st_size), int(st.st_mtime_ns)],
        "link_slices": bool(settings.link_slices),
        "postprocess": dict(sorted((settings.postprocess or {}).items())),
        **({"diameter": settings.diameter} if settings.diameter is not None else {}),
    }


def output_state(paths: Sequence[Path], fp: dict) -> str:
    """``"complete"`` (all exist, made with this model from this input and settings),
    ``"outdated"`` (all exist, but made otherwise) or ``"missing"``."""
    from cellfit.outputs import read_fingerprint

    if not all(p.exists() for p in paths):
        return "missing"
    for p in paths:
        have = read_fingerprint(p)
        if have is None or any(have.get(k) != v for k, v in fp.items()):
            return "outdated"
    return "complete"


class _WiderLabels(Exception):
    """More objects than the labels' dtype holds: write the file again with uint32."""


def _lead_axes(axes: str) -> str:
    return "".join(a for a in axes if a not in "YXCS")


class OutputWriter:
    """Writes the labels (and probabilities) of one file plane by plane, in order:
    links slices when asked, chooses the labels' dtype, and publishes atomically."""

    def __init__(
        self,
        engine_info,
        img,
        labels_path: Path,
        prob_path: Path | None,
        settings: Settings,
        fp: dict | None,
        *,
        labels_dtype=None,
        tiled: bool = False,
    ) -> None:
        from cellfit.link import SliceLinker
        from cellfit.outputs import open_sink

        self.info = engine_info
        self.settings = settings
        self.fp = fp
        self.meta: ImageMeta = img.meta
        self.lead = tuple(img.lead_shape)
        self.plane_shape = tuple(img.plane_shape)
        self.n_planes = img.n_planes
        lead_axes = _lead_axes(img.axes)
        if len(lead_axes) != len(self.lead):  # axes unknown: name them like tifffile
            lead_axes = "Q" * len(self.lead)
        self.lab_axes = lead_axes + "YX"
        self.prob_axes = lead_axes + "CYX"
        self.labels_path = labels_path
        self.tiled = tiled
        self.instances = self.info.mode == "instances"
        if labels_dtype is None and not self.instances:
            labels_dtype = np.uint8 if self.info.n_classes <= 255 else np.uint16
        if labels_dtype is None and self.n_planes > 1:
            labels_dtype = np.uint16  # written again as uint32 in the rare case it overflows
        self.labels_dtype = labels_dtype
        self.linker = (
            SliceLinker(self.lead)
            if settings.link_slices and self.instances and self.n_planes > 1
            else None
        )
        self._open = open_sink
        self.lab_sink = None
        self.prob_sink = None
        if prob_path is not None:
            self.prob_sink = open_sink(
                settings.format, prob_path,
                (*self.lead, self.info.n_classes, *self.plane_shape), np.float32,
                self.prob_axes, self.meta, tiled=tiled, compression=settings.compression,
                fingerprint=fp,
            )

    def _lab_sink(self, dtype):
        if self.lab_sink is None:
            self.labels_dtype = dtype
            self.lab_sink = self._open(
                self.settings.format, self.labels_path, (*self.lead, *self.plane_shape), dtype,
                self.lab_axes, self.meta, tiled=self.tiled,
                compression=self.settings.compression, fingerprint=self.fp,
            )
        return self.lab_sink

    def put(self, p: int, labels: np.ndarray, probs: np.ndarray | None) -> None:
        """Plane ``p``'s labels (per-slice ids) and probabilities ``(K, Y, X)``."""
        if self.linker is not None:
            labels = self.linker(p, labels)
        top = int(labels.max()) if labels.size else 0
        dtype = self.labels_dtype or label_dtype(top)
        if top > np.iinfo(dtype).max:
            raise _WiderLabels
        self._lab_sink(dtype).put(labels.astype(dtype, copy=False))
        if self.prob_sink is not None and probs is not None:
            for k in range(probs.shape[0]):
                self.prob_sink.put(probs[k])

    def close(self) -> tuple[Path, ...]:
        out = [self.lab_sink.close()]
        if self.prob_sink is not None:
            out.append(self.prob_sink.close())
        return tuple(out)

    def abort(self) -> None:
        for s in (self.lab_sink, self.prob_sink):
            if s is not None:
                s.abort()


# --------------------------------------------------------------------------- one file
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


def _block_geometry(width: int, scale: float) -> tuple[int, int]:
    """Block side and halo for labelling a huge plane of ``width`` columns: blocks keep
    a band of probabilities near 2**25 values; the halo covers two cell diameters."""
    from cellfit.outputs import TILE

    block = max(TILE, min(4 * TILE, (2**25 // max(1, width)) // TILE * TILE))
    halo = max(64, int(np.ceil(2 * 30 / max(scale, 1e-3))))
    return block, min(halo, block // 2)


def run_file(
    engine: Engine,
    path: Path,
    labels_path: Path,
    prob_path: Path | None,
    settings: Settings,
    fp: dict | None = None,
) -> Iterator[tuple]:
    """Predict one file into its outputs, streaming.

    A generator of progress items: ``("plane", done, total)``, ``("tiles", done,
    total)`` and ``("notice", text)``; its return value is the tuple of outputs.
    On any error or when closed early, no output or temporary is left.
    """
    from cellfit.outputs import remove_stale_temporaries

    for p in (labels_path, prob_path):
        if p is not None:
            remove_stale_temporaries(p)
    img = open_image(path)
    try:
        y, x = img.plane_shape
        huge = y * x > settings.huge_pixels
        dtype = None
        for _attempt in range(2):
            try:
                if huge:
                    return (yield from _run_huge(engine, img, labels_path, prob_path,
                                                 settings, fp, dtype))
                return (yield from _run_planes(engine, img, labels_path, prob_path,
                                               settings, fp, dtype))
            except _WiderLabels:
                dtype = np.uint32
                yield ("notice", f"{path.name}: more than 65535 objects, writing 32-bit labels")
        raise AssertionError("unreachable")
    finally:
        img.close()


def _run_planes(engine, img, labels_path, prob_path, settings, fp, dtype):
    from cellfit.stream import stack_stats

    stats = stack_stats(img, engine.info)
    writer = OutputWriter(engine.info, img, labels_path, prob_path, settings, fp,
                          labels_dtype=dtype)
    n = img.n_planes
    planes = _prefetch(img.plane, n)
    try:
        for res in engine.predictor.predict(planes, stats):
            if res.notice:
                yield ("notice", res.notice)
            if res.probs is None:
                yield ("tiles", res.tiles_done, res.tiles_total)
                continue
            writer.put(res.key, engine.labels(res.probs), res.probs)
            yield ("plane", res.key + 1, n)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        planes.close()


def _run_huge(engine, img, labels_path, prob_path, settings, fp, dtype):
    """Planes too large for memory: tile rows → probability rows → block labels."""
    import shutil

    import zarr

    from cellfit.outputs import TILE, _tmp_name
    from cellfit.stream import BlockLabeller, NormRows, ResizeRows, RowStream, stack_stats

    info, pred = engine.info, engine.predictor
    stats = stack_stats(img, info)
    y, x = img.plane_shape
    k = info.n_classes
    block, halo = _block_geometry(x, pred.scale)
    if settings.block:
        block = int(settings.block)
        halo = min(halo, block // 2)
    work = _tmp_name(labels_path.parent / f"{img.name}.work")
    writer = None
    notices: list[str] = []
    if settings.link_slices and img.n_planes > 1:
        notices.append(f"{img.name}: planes of {y}x{x} are too large to link; labels are per slice")
        settings = Settings(**{**asdict(settings), "link_slices": False})
    try:
        for note in notices:
            yield ("notice", note)
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
                labeller = BlockLabeller((y, x), block, halo, engine.labels)
            n_rows = -(-y // block)
            for i in range(n_rows):
                if labeller is not None:
                    lo, hi, r0, r1 = labeller.band(i)
                else:
                    lo = r0 = i * block
                    hi = r1 = min(y, r0 + block)
                band = full.rows(lo, hi)
                for item in rows.side:
                    if item.notice:
                        yield ("notice", item.notice)
                    yield ("tiles", item.tiles_done, item.tiles_total)
                rows.side.clear()
                if probz is not None:
                    probz[:, r0:r1] = band[:, r0 - lo : r1 - lo]
                if labeller is not None:
                    raw[r0:r1] = labeller.feed(i, band)
                else:
                    raw[r0:r1] = classes_from_probs(band[:, r0 - lo : r1 - lo])
            rows.drain()
            for item in rows.side:
                yield ("tiles", item.tiles_done, item.tiles_total)
            rows.side.clear()
            lut, n_obj = labeller.lut() if labeller is not None else (None, 0)
            if writer is None:
                if dtype is None and labeller is not None:
                    dtype = label_dtype(n_obj) if img.n_planes == 1 else np.uint16
                writer = OutputWriter(info, img, labels_path, prob_path, settings, fp,
                                      labels_dtype=dtype, tiled=True)
            if lut is not None and n_obj > np.iinfo(writer.labels_dtype).max:
                raise _WiderLabels
            sink = writer._lab_sink(writer.labels_dtype)
            for tile in _tiles(raw, lut):
                sink.put(tile.astype(writer.labels_dtype, copy=False))
            if probz is not None:
                for c in range(k):
                    for tile in _tiles(probz, None, c):
                        writer.prob_sink.put(tile)
            shutil.rmtree(work, ignore_errors=True)
            yield ("plane", p + 1, img.n_planes)
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
    from cellfit.outputs import TILE

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
    """
    if format not in FORMATS:
        raise CellfitError(f"unknown output format {format!r}: use tiff or zarr.")
    settings = Settings(
        probabilities=probabilities, overwrite=overwrite, tile=tile, overlap=overlap,
        batch_size=batch_size, device=device, postprocess=dict(postprocess or {}),
        link_slices=link_slices, format=format, compression=compression,
        huge_pixels=huge_pixels, amp=amp, slices_per_task=slices_per_task,
        diameter=diameter,
    )
    if is_starting(model_path):
        model_path = starting_model_path()
    files = expand_inputs(inputs, "input")
    out_dir = Path(out_dir)
    _check_out_dir(files, out_dir)
    files = _unique_outputs(files, out_dir, format)
    from cellfit.model import read_model_info
    from cellfit.outputs import file_digest

    info = read_model_info(model_path)  # a clear error for a missing or foreign model file
    if diameter is not None and not info.cell_diameter:
        raise CellfitError(
            f"{Path(model_path).name} was trained at a fixed cell size and takes no cell "
            "diameter: leave --diameter out."
        )
    digest = file_digest(model_path)
    first_notice = None
    if settings.diameter is None and needs_diameter(info):
        settings.diameter, first_notice = _estimate_diameter(model_path, files, settings)
    if scheduler is not None:
        from cellfit.distributed import predict_files_distributed

        events = predict_files_distributed(model_path, files, out_dir, settings, digest,
                                           scheduler)
    else:
        engine = Engine(model_path, settings)
        out_dir.mkdir(parents=True, exist_ok=True)
        events = (
            ev
            for i, f in enumerate(files)
            for ev in _one_file(engine, i, len(files), f, out_dir, settings, digest)
        )
    for ev in events:
        if first_notice is not None:
            ev.notice = first_notice if ev.notice is None else f"{first_notice}; {ev.notice}"
            first_notice = None
        yield ev


def _estimate_diameter(model_path, files, settings) -> tuple[float, str]:
    """The cell diameter of the first readable file (middle plane), and a notice."""
    from cellfit.model import load_model
    from cellfit.starting import estimate_diameter

    model, info = load_model(model_path, resolve_device(settings.device))
    for f in files:
        try:
            with open_image(f) as img:
                plane = img.plane(img.n_planes // 2)
        except CellfitError:
            continue  # reported when the file's turn comes
        d = estimate_diameter(model, info, plane, device=resolve_device(settings.device))
        return d, (
            f"cell diameter estimated at {d:g} pixels from {f.name}; give --diameter to "
            "set it"
        )
    raise CellfitError("none of the input files could be read: check the inputs.")


def _one_file(engine, i, n_files, f, out_dir, settings, digest) -> Iterator[FileEvent]:
    lab_path, prob_path = output_paths(f, out_dir, settings.format)
    wanted = (lab_path, prob_path) if settings.probabilities else (lab_path,)
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
        gen = run_file(engine, f, lab_path, prob_path if settings.probabilities else None,
                       settings, fp)
        n_planes = 1
        plane = 0
        try:
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    outputs = stop.value
                    break
                kind = item[0]
                if kind == "plane":
                    plane, n_planes = item[1], item[2]
                    yield FileEvent(i, n_files, f, "plane", plane, n_planes, notice=notice)
                    notice = None
                elif kind == "tiles":
                    yield FileEvent(i, n_files, f, "plane", plane, n_planes, notice=notice,
                                    tiles_done=item[1], tiles_total=item[2])
                    notice = None
                elif kind == "notice":
                    notice = item[1] if notice is None else f"{notice}; {item[1]}"
        finally:
            gen.close()  # closed early (Ctrl-C, a cancelled plugin job): temporaries removed
        yield FileEvent(i, n_files, f, "done", n_planes, n_planes, outputs=tuple(outputs),
                        notice=notice)
    except CellfitError as exc:
        yield FileEvent(i, n_files, f, "failed", error=str(exc))
    except MemoryError:
        yield FileEvent(
            i, n_files, f, "failed",
            error=f"{f.name} is too large for this machine's memory: use a smaller --tile "
            "or split the stack.",
        )
    except Exception as exc:  # a bug met on one file must not stop the batch
        yield FileEvent(
            i, n_files, f, "failed",
            error=f"internal error ({type(exc).__name__}: {exc}); this is a bug in cellfit: "
            "please report it",
        )
