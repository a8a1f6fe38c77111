"""Streamed, atomic outputs: TIFF (compressed, BigTIFF when large) or zarr.

A sink is opened with the full shape of its output and then fed its pages (or, for
tiled outputs of huge planes, its tiles) in order; nothing but the pages in flight
is held in memory. It writes under a hidden temporary name in the output folder and
is renamed to its final name only when complete (:meth:`Sink.close`), so a final
name always means a complete output; :meth:`Sink.abort` (an error, Ctrl-C) removes
the temporary. A write that fails (a full disk, no permission) raises a
:class:`~cellfit.errors.CellfitError` in one sentence, with the temporary removed and
an older output left as it was. TIFF compression runs in a writer thread, alongside
prediction.

Each output carries a *fingerprint* (model digest, input size and time, settings
that change labels): a rerun skips outputs whose fingerprint matches and redoes
outdated ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import NoReturn

import numpy as np
import tifffile

from cellfit.errors import CellfitError
from cellfit.io import ImageMeta

__all__ = [
    "FINGERPRINT_TAG",
    "Sink",
    "TiffSink",
    "ZarrSink",
    "file_digest",
    "label_dtype",
    "make_output_folder",
    "open_sink",
    "read_fingerprint",
    "remove_stale_temporaries",
    "tmp_name",
    "write_error",
]

#: private TIFF tag holding the fingerprint (JSON)
FINGERPRINT_TAG = 65420
#: above this many bytes (uncompressed) a TIFF is written as BigTIFF
BIGTIFF_BYTES = 2**32 - 2**27
#: side of the tiles of tiled outputs (huge planes)
TILE = 512
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def label_dtype(max_label: int) -> type:
    """Smallest unsigned dtype that holds ``max_label``."""
    if max_label < 2**8:
        return np.uint8
    if max_label < 2**16:
        return np.uint16
    return np.uint32


def make_output_folder(folder: Path) -> None:
    """Create the output folder (and the folders above it) if needed; a folder that
    cannot be created (no write permission, a full disk) is one sentence."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CellfitError(
            f"could not create the output folder {folder} ({exc.strerror or exc}): check the "
            "free space and permissions of the folder above it, or choose another output folder."
        ) from None


def tmp_name(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (``.<name>.<random>.part``), which
    :func:`remove_stale_temporaries` recognises."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.part"


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries an interrupted earlier run left for output ``path``."""
    for p in path.parent.glob(f".{path.name}.*.part"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> CellfitError:
    """A write that failed (a full disk, no permission), in one sentence."""
    return CellfitError(
        f"could not write {path} ({exc.strerror or exc}): check the free space and "
        "permissions of the output folder."
    )


def _publish(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` (replacing an older output, file or folder)."""
    if path.is_dir() and not path.is_symlink():
        trash = tmp_name(path)
        os.replace(path, trash)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(trash, path)  # the older output stays
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


class Sink:
    """Base of the output sinks: ``put`` pages/tiles in order, then ``close``."""

    path: Path
    tmp: Path

    def put(self, arr: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the temporary (every page written), without publishing it yet;
        :meth:`close` then only renames it. A writer with several outputs finishes
        them all before publishing any, so one that fails leaves none published."""

    def close(self) -> Path:  # pragma: no cover - interface
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _axes_fit_imagej(axes: str) -> bool:
    it = iter("TZCYXS")
    return all(a in it for a in axes) and axes.endswith("YX")


_END = object()
_ABORT = object()


class _Aborted(Exception):
    pass


class TiffSink(Sink):
    """A TIFF written page by page (or tile by tile) from a writer thread.

    ImageJ hyperstack format (Fiji opens it with its dimensions and calibration) when
    the input was an ImageJ file and the output fits it (axes among T, Z, C; 8/16-bit
    or float; under 4 GB); otherwise tifffile's format with the axes in its metadata;
    BigTIFF above 4 GB. Resolution and ImageJ calibration are copied from the input.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype,
        axes: str,
        meta: ImageMeta,
        *,
        tiled: bool = False,
        compression: str | None = "zlib",
        fingerprint: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        bigtiff = nbytes > BIGTIFF_BYTES
        # tifffile drops a trailing axis of length 1 from shaped (and ImageJ) series, so
        # an image one pixel wide is described by hand (below)
        one_wide = len(self.shape) > 2 and self.shape[-1] == 1
        imagej = (
            meta.is_imagej
            and not one_wide
            and not bigtiff
            and not tiled
            and self.dtype.type in _IMAGEJ_DTYPES
            and _axes_fit_imagej(axes)
        )
        kw: dict = {
            "shape": self.shape,
            "dtype": self.dtype,
            "photometric": "minisblack",
            "compression": None if compression in (None, "none") else compression,
        }
        if tiled:
            kw["tile"] = (TILE, TILE)
        if meta.resolution is not None:
            kw["resolution"] = meta.resolution
            if meta.resolution_unit is not None:
                kw["resolutionunit"] = meta.resolution_unit
        if imagej:
            kw["metadata"] = {"axes": axes, **meta.imagej}
        elif one_wide:
            kw["metadata"] = None
            kw["description"] = json.dumps({"shape": list(self.shape), "axes": axes})
        else:
            kw["metadata"] = {"axes": axes}
        if fingerprint is not None:
            kw["extratags"] = [(FINGERPRINT_TAG, "s", 0, json.dumps(fingerprint), True)]
        self._kw = kw
        self._writer_args = {"bigtiff": bigtiff, "imagej": imagej}
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"write {self.path.name}", daemon=True)
        self._thread.start()

    def _items(self):
        while True:
            item = self._q.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    def _run(self) -> None:
        try:
            # the file is opened here, not by tifffile: closed even when tifffile fails
            # while writing the header (a full disk)
            with open(self.tmp, "wb") as fh, tifffile.TiffWriter(fh, **self._writer_args) as tw:
                tw.write(self._items(), **self._kw)
        except BaseException as exc:  # reported by put / close
            self._error = exc

    def _send(self, item) -> None:
        while True:
            if self._error is not None or not self._thread.is_alive():
                self._raise()
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        exc = self._error
        self.abort()
        if exc is None:
            exc = RuntimeError("the writer stopped before the last page")
        if isinstance(exc, OSError):
            raise write_error(self.path, exc) from None
        raise RuntimeError(f"writing {self.path.name} failed: {exc!r}") from exc

    def put(self, arr: np.ndarray) -> None:
        self._send(np.ascontiguousarray(arr, dtype=self.dtype))

    def finish(self) -> None:
        """Write the last page and close the temporary file (not renamed yet)."""
        if self._closed:
            return
        while self._thread.is_alive():  # tifffile may stop reading after the last page
            try:
                self._q.put(_END, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None:
            self._raise()

    def close(self) -> Path:
        """Finish the file and rename it to its final name; returns that name."""
        self.finish()
        self._closed = True
        _publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the temporary file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    self._q.get_nowait()
            with contextlib.suppress(queue.Full):
                self._q.put(_ABORT, timeout=1.0)
            self._thread.join(timeout=30)
        self.tmp.unlink(missing_ok=True)


class ZarrSink(Sink):
    """A zarr (v3) array written page by page or tile by tile, chunked by page (or by
    512 x 512 tiles of large pages); attributes hold axes, resolution, ImageJ
    calibration and the fingerprint."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype,
        axes: str,
        meta: ImageMeta,
        *,
        tiled: bool = False,
        compression: str | None = "zlib",
        fingerprint: dict | None = None,
    ) -> None:
        import zarr

        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        y, x = self.shape[-2:]
        self.tiled = tiled
        cy, cx = (TILE, TILE) if tiled or y * x > 2048 * 2048 else (y, x)
        self.chunks = (1,) * (len(self.shape) - 2) + (min(cy, y), min(cx, x))
        attrs = {
            "axes": axes,
            "resolution": _jsonable(meta.resolution),
            "resolution_unit": meta.resolution_unit,
            "imagej": _jsonable(meta.imagej),
        }
        if fingerprint is not None:
            attrs["cellfit"] = fingerprint
        kw = {}
        if compression in (None, "none"):
            kw["compressors"] = None
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.z = zarr.create_array(
                store=str(self.tmp), shape=self.shape, chunks=self.chunks, dtype=self.dtype,
                attributes=attrs, fill_value=0, **kw,
            )
        except OSError as exc:
            self._fail(exc)
        self._pages = int(np.prod(self.shape[:-2])) if len(self.shape) > 2 else 1
        self._n = 0
        self._tiles_x = -(-x // TILE)
        self._tiles_y = -(-y // TILE)

    def _fail(self, exc: OSError) -> NoReturn:
        """Remove the temporary and raise the write error as one sentence."""
        self.abort()
        raise write_error(self.path, exc) from None

    def put(self, arr: np.ndarray) -> None:
        try:
            self._put(arr)
        except OSError as exc:
            self._fail(exc)

    def _put(self, arr: np.ndarray) -> None:
        y, x = self.shape[-2:]
        lead = self.shape[:-2]
        if not self.tiled:
            idx = np.unravel_index(self._n, lead) if lead else ()
            self.z[tuple(int(i) for i in idx)] = arr
        else:
            per_page = self._tiles_x * self._tiles_y
            page, t = divmod(self._n, per_page)
            ty, tx = divmod(t, self._tiles_x)
            idx = tuple(int(i) for i in np.unravel_index(page, lead)) if lead else ()
            y0, x0 = ty * TILE, tx * TILE
            y1, x1 = min(y, y0 + TILE), min(x, x0 + TILE)
            self.z[(*idx, slice(y0, y1), slice(x0, x1))] = arr[: y1 - y0, : x1 - x0]
        self._n += 1

    def write(self, index: tuple, arr: np.ndarray) -> None:
        """Write at an explicit index (for parallel writers)."""
        try:
            self.z[index] = arr
        except OSError as exc:
            self._fail(exc)

    def close(self) -> Path:
        try:
            _publish(self.tmp, self.path)
        except OSError as exc:
            self._fail(exc)
        self._closed = True
        return self.path

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def open_sink(fmt: str, path: Path, *args, **kwargs) -> Sink:
    """A :class:`TiffSink` (``fmt="tiff"``) or :class:`ZarrSink` (``"zarr"``)."""
    if fmt == "zarr":
        return ZarrSink(path, *args, **kwargs)
    return TiffSink(path, *args, **kwargs)


def read_fingerprint(path: Path) -> dict | None:
    """The fingerprint stored in an output (TIFF tag or zarr attribute), or None."""
    path = Path(path)
    try:
        if path.is_dir():
            import zarr

            z = zarr.open_array(str(path), mode="r")
            fp = z.attrs.get("cellfit")
            return dict(fp) if fp is not None else None
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get(FINGERPRINT_TAG)
            return json.loads(tag.value) if tag is not None else None
    except Exception:
        return None
