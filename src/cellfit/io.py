"""Reading and writing TIFF images and label images.

Every image handed to the engine is brought to one layout, *planes*: an array of
shape ``(P, C, Y, X)`` where ``P`` runs over every 2D plane of the stack (the product of
all leading axes: time, depth, ...) and ``C`` over channels. ``lead_shape`` remembers the
leading axes so results can be written back with the input's shape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from cellfit.errors import CellfitError

log = logging.getLogger(__name__)

__all__ = [
    "LAZY_BYTES",
    "TIFF_SUFFIXES",
    "ImageMeta",
    "ImageStack",
    "InMemoryImage",
    "LazyImage",
    "atomic_write_tiff",
    "check_finite",
    "check_labels",
    "find_tiffs",
    "open_image",
    "pair_files",
    "read_image",
    "read_labels",
    "to_planes",
]

TIFF_SUFFIXES = (".tif", ".tiff")
_CHANNEL_AXES = "CS"


@dataclass
class ImageStack:
    """An image brought to the planes layout.

    Attributes
    ----------
    data : ndarray, shape (P, C, Y, X)
        Raw pixel values (dtype of the file), one entry per 2D plane.
    lead_shape : tuple of int
        Shape of the leading (non-YX, non-channel) axes; ``prod(lead_shape) == P``.
    axes : str
        Axes of the input, e.g. ``"YX"``, ``"YXS"``, ``"ZYX"``, ``"TZCYX"``.
    name : str
        Short name (file stem) used for output files.
    resolution : tuple or None
        ``(x_resolution, y_resolution)`` of the file, written back into outputs.
    """

    data: np.ndarray
    lead_shape: tuple[int, ...] = ()
    axes: str = "YX"
    name: str = "image"
    resolution: tuple | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def n_planes(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def plane_shape(self) -> tuple[int, int]:
        return int(self.data.shape[2]), int(self.data.shape[3])

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """Shape a label image of this stack has: ``lead_shape + (Y, X)``."""
        return (*self.lead_shape, *self.plane_shape)


def _check_dtype(arr: np.ndarray, what: str) -> None:
    if arr.dtype == bool:
        return
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise CellfitError(
            f"{what} has pixels of type {arr.dtype}, which cellfit cannot use: "
            "save it as 8-bit, 16-bit or 32-bit float grayscale or RGB."
        )


def check_finite(arr: np.ndarray, what: str) -> None:
    """Raise one sentence when a float image holds NaN or infinite pixels (which would
    make every prediction and training loss NaN). Checked plane by plane, so the check
    needs little memory; integer images pass at once."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fc":
        return
    planes = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 2 else arr[None]
    for plane in planes:
        if not np.isfinite(plane).all():
            raise CellfitError(
                f"{what} has NaN or infinite pixels, which cellfit cannot use: replace them "
                "with numbers first (e.g. Fiji: Process > Math > Remove NaNs)."
            )


def check_labels(arr: np.ndarray, what: str) -> np.ndarray:
    """An annotation or label array as whole numbers 0 or more (float arrays of whole
    numbers become int64); one sentence for negative or fractional values."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise CellfitError(
                f"{what} holds non-integer values ({arr.dtype}): labels must be whole "
                "numbers (0 = not annotated, 1 = background, 2+ = cells)."
            )
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise CellfitError(
            f"{what} has negative values: labels must be 0 or more "
            "(0 = not annotated, 1 = background, 2+ = cells)."
        )
    return arr


def guess_axes(shape: Sequence[int]) -> str:
    """Guess axes for an array without metadata (e.g. a napari layer).

    Trailing dimensions of size 3 or 4 are colour channels (RGB/RGBA); everything
    before ``YX`` is a stack of planes.
    """
    ndim = len(shape)
    if ndim < 2:
        raise CellfitError(
            f"an image needs at least two dimensions, this one has shape {tuple(shape)}: "
            "give a 2D image or a stack of 2D images."
        )
    if ndim >= 3 and shape[-1] in (3, 4) and shape[-2] > 4 and shape[-3] > 4:
        return "Q" * (ndim - 3) + "YXS"
    return "Q" * (ndim - 2) + "YX"


def to_planes(
    arr: np.ndarray, axes: str | None = None, what: str = "the image"
) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Bring an array to the planes layout.

    Parameters
    ----------
    arr : ndarray
        Image with axes ``axes`` (guessed by :func:`guess_axes` when None).
    axes : str, optional
        One letter per dimension; ``C`` or ``S`` mark channels, ``Y``/``X`` the plane,
        any other letter a leading stack axis.

    Returns
    -------
    planes : ndarray, shape (P, C, Y, X)
        A view or copy of ``arr``; the input is never modified.
    lead_shape : tuple of int
    axes : str
    """
    _check_dtype(arr, what)
    if arr.ndim < 2:
        raise CellfitError(
            f"{what} has shape {tuple(arr.shape)}, but an image needs at least two "
            "dimensions: give a 2D image or a stack of 2D images."
        )
    if axes is None:
        axes = guess_axes(arr.shape)
    axes = axes.upper()
    if len(axes) != arr.ndim:
        axes = guess_axes(arr.shape)
    if "Y" not in axes or "X" not in axes:
        raise CellfitError(
            f"{what} has axes {axes!r} without both Y and X: give 2D images or stacks of them."
        )
    chan = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
    if len(chan) > 1:
        # e.g. 'CYXS': merge both channel axes into one
        arr = np.moveaxis(arr, chan, list(range(arr.ndim - len(chan), arr.ndim)))
        axes_rest = "".join(a for a in axes if a not in _CHANNEL_AXES)
        arr = arr.reshape(*arr.shape[: arr.ndim - len(chan)], -1)
        axes = axes_rest + "C"
        chan = [len(axes) - 1]
    yi, xi = axes.index("Y"), axes.index("X")
    lead = [i for i in range(arr.ndim) if i not in (yi, xi, *chan)]
    order = lead + chan + [yi, xi]
    moved = np.transpose(arr, order)
    lead_shape = tuple(int(arr.shape[i]) for i in lead)
    n_planes = int(np.prod(lead_shape)) if lead_shape else 1
    n_chan = int(arr.shape[chan[0]]) if chan else 1
    planes = moved.reshape(n_planes, n_chan, arr.shape[yi], arr.shape[xi])
    if planes.dtype == bool:
        planes = planes.astype(np.uint8)
    return planes, lead_shape, axes


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CellfitError(f"{what} {path} does not exist: check the path.")
    if path.is_dir():
        raise CellfitError(f"{what} {path} is a folder, not a file: give a TIFF file.")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise CellfitError(
            f"{what} {path} is not a TIFF file: cellfit reads .tif/.tiff files; "
            "convert it first (e.g. Fiji: File > Save As > Tiff)."
        )
    if path.stat().st_size == 0:
        raise CellfitError(
            f"{what} {path} could not be read as a TIFF: the file is empty (0 bytes), "
            "perhaps a copy or export that did not finish; export it again."
        )


def _unreadable(path: Path, what: str, exc: OSError) -> CellfitError:
    """A file the system would not let cellfit read (no permission, a disk error)."""
    return CellfitError(
        f"{what} {path} could not be read ({exc.strerror or exc}): check that you may "
        "read it (its permissions) and that its disk is reachable."
    )


def _damaged(path: Path, what: str, exc: Exception, verb: str = "read as a TIFF") -> CellfitError:
    """A file whose content cellfit cannot read, in one plain sentence: what the TIFF
    library said (``IndexError: list index out of range``, ``<tifffile.TiffPages @…>
    invalid offset…``) goes to the log, not to the user."""
    log.info("%s %s could not be %s: %s: %s", what, path, verb, type(exc).__name__, exc)
    if isinstance(exc, tifffile.TiffFileError) and "not a TIFF" in str(exc):
        return CellfitError(
            f"{what} {path} could not be read as a TIFF: its content is not a TIFF image, "
            "though its name ends in .tif; save it as TIFF again (e.g. Fiji: File > Save "
            "As > Tiff)."
        )
    return CellfitError(
        f"{what} {path} could not be {verb}: the file may be truncated or corrupt: "
        "export it again."
    )


class _DuringRead(logging.Filter):
    """Keeps tifffile's own log lines off the terminal while cellfit reads a file (see
    :func:`_quiet_tifffile`): a damaged file is reported as one sentence instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_READING, "depth", 0)


_READING = threading.local()
logging.getLogger("tifffile").addFilter(_DuringRead())


@contextlib.contextmanager
def _quiet_tifffile():
    """Drop what tifffile logs in this thread meanwhile (it logs damaged pages as
    warnings, e.g. "<tifffile.TiffPages @1000000> invalid offset to first page")."""
    _READING.depth = getattr(_READING, "depth", 0) + 1
    try:
        yield
    finally:
        _READING.depth -= 1


def _read_tiff(path: Path, what: str) -> tuple[np.ndarray, str, tuple | None]:
    _check_file(path, what)
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            arr = series.asarray()
            resolution = None
            try:
                page = tif.pages[0]
                xr = page.tags.get("XResolution")
                yr = page.tags.get("YResolution")
                if xr is not None and yr is not None:
                    resolution = (xr.value, yr.value)
            except Exception:
                resolution = None
    except CellfitError:
        raise
    except OSError as exc:  # the file system said no, not the file's content
        raise _unreadable(path, what, exc) from None
    except Exception as exc:
        raise _damaged(path, what, exc) from None
    return np.asarray(arr), axes, resolution


def read_image(path: str | os.PathLike) -> ImageStack:
    """Read a TIFF image (2D, RGB/multichannel, 3D stack, time series) into planes."""
    path = Path(path)
    arr, axes, resolution = _read_tiff(path, "image")
    if arr.size == 0:
        raise CellfitError(f"image {path} is empty: check that it holds pixels.")
    # tifffile calls RGB samples 'S'; axes like 'Q' are unknown stack axes.
    planes, lead_shape, axes = to_planes(arr, axes, what=f"image {path}")
    check_finite(planes, f"image {path}")
    return ImageStack(planes, lead_shape, axes, path.stem, resolution)


def read_labels(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an annotation or label TIFF as an integer array.

    Parameters
    ----------
    shape : tuple of int, optional
        Expected shape (the image's ``labels_shape``); a mismatch is an error.
    """
    path = Path(path)
    arr, _axes, _res = _read_tiff(path, "label image")
    arr = check_labels(arr, f"label image {path}")
    if shape is not None:
        squeezed = np.squeeze(arr)
        if arr.shape != tuple(shape) and squeezed.shape == tuple(d for d in shape if d != 1):
            arr = squeezed.reshape(shape)
        if arr.shape != tuple(shape):
            raise CellfitError(
                f"label image {path} has shape {arr.shape} but its image has shape {tuple(shape)}: "
                "labels must cover the image pixel for pixel."
            )
    return arr


def find_tiffs(folder: str | os.PathLike) -> list[Path]:
    """The TIFF files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")
    )


def expand_inputs(items: Sequence[str | os.PathLike], what: str = "input") -> list[Path]:
    """Expand a mix of files and folders into a list of TIFF files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise CellfitError(f"{what} {p} does not exist: check the path.")
        if p.is_dir():
            found = find_tiffs(p)
            if not found:
                raise CellfitError(
                    f"{what} folder {p} holds no .tif/.tiff files: point to the folder of TIFFs."
                )
            out.extend(found)
        else:
            out.append(p)
    return out


_LABEL_SUFFIXES = ("", "_labels", "_label", "_mask", "_masks", "_annotation", "_annotations")


def pair_files(
    images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike]
) -> list[tuple[Path, Path]]:
    """Pair image files with label files.

    Folders are paired by file name: ``a.tif`` with ``a.tif`` (or ``a_labels.tif``,
    ``a_mask.tif``, ...). Two lists of files of the same length are paired in order.
    """
    img_files = expand_inputs(images, "image")
    lab_files = expand_inputs(labels, "label")
    folders = any(Path(p).is_dir() for p in (*images, *labels))
    if not folders:
        if len(img_files) != len(lab_files):
            raise CellfitError(
                f"{len(img_files)} image file(s) but {len(lab_files)} label file(s) were given: "
                "give one label file per image, in the same order."
            )
        return list(zip(img_files, lab_files))
    by_stem = {p.stem: p for p in lab_files}
    pairs = []
    unmatched: list[Path] = []
    for img in img_files:
        match = None
        for suffix in _LABEL_SUFFIXES:
            cand = by_stem.get(img.stem + suffix)
            if cand is not None and cand.resolve() != img.resolve():
                match = cand
                break
        if match is None:
            unmatched.append(img)
        else:
            pairs.append((img, match))
    # with images and labels in one folder, the label files are not images
    used = {lab.resolve() for _, lab in pairs}
    missing = [img.name for img in unmatched if img.resolve() not in used]
    if not pairs:
        raise CellfitError(
            "no label file matches any image by name: name each label file like its image "
            "(e.g. cells1.tif and cells1.tif in another folder, or cells1_labels.tif)."
        )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CellfitError(
            f"no label file for {len(missing)} image(s) ({shown}): give each image a label "
            "file of the same name, or pass only the annotated images."
        )
    return pairs


def atomic_write_tiff(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    resolution: tuple | None = None,
    compression: str | None = "zlib",
    overwrite: bool = True,
) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed when complete.

    A reader never sees a half-written file, and an interruption leaves at most a
    hidden temporary file (removed on error).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CellfitError(f"{path} already exists: choose another output or allow overwriting.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        kwargs = {}
        if resolution is not None:
            kwargs["resolution"] = resolution
        tifffile.imwrite(
            tmp,
            data,
            compression=compression,
            bigtiff=data.nbytes > 2**31,
            photometric="minisblack" if data.ndim == 2 or data.shape[-1] not in (3, 4) else None,
            **kwargs,
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- lazy reading
#: files whose pixels take more bytes than this are read lazily (plane by plane, or row
#: band by row band) by :func:`open_image`; smaller files are read whole (fastest).
LAZY_BYTES = 64 * 2**20


@dataclass
class ImageMeta:
    """What an output must carry over from its input: axes and calibration."""

    axes: str = "YX"
    resolution: tuple | None = None
    resolution_unit: int | None = None
    imagej: dict = field(default_factory=dict)  # spacing, unit, finterval (ImageJ files)
    is_imagej: bool = False
    #: ``(y, x, unit)`` pixel size of an OME-TIFF (PhysicalSizeY/X), None otherwise
    physical_size: tuple | None = None


_IJ_KEYS = ("spacing", "unit", "finterval", "fps", "xorigin", "yorigin", "zorigin")


def _tiff_meta(tif, series) -> ImageMeta:
    page = series.pages[0] if len(series.pages) else tif.pages[0]
    tags = page.tags
    res = None
    xr, yr = tags.get("XResolution"), tags.get("YResolution")
    if xr is not None and yr is not None:
        res = (xr.value, yr.value)
    unit = tags.get("ResolutionUnit")
    ij = {}
    if tif.is_imagej and tif.imagej_metadata:
        ij = {k: v for k, v in tif.imagej_metadata.items() if k in _IJ_KEYS}
    return ImageMeta(
        axes=series.axes,
        resolution=res,
        resolution_unit=int(unit.value) if unit is not None else None,
        imagej=ij,
        is_imagej=bool(tif.is_imagej),
        physical_size=_ome_pixel_size(tif),
    )


def _ome_pixel_size(tif) -> tuple | None:
    """``(y, x, unit)`` from the first image of an OME-TIFF's metadata, or None."""
    if not tif.is_ome:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
        pixels = next(el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels")
        x, y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
        if x is None or y is None:
            return None
        unit = pixels.get("PhysicalSizeXUnit", "µm")  # the OME default unit
        if pixels.get("PhysicalSizeYUnit", "µm") != unit:
            return None
        return (float(y), float(x), unit)
    except Exception:  # unreadable metadata: no calibration, as without OME
        return None


class LazyImage:
    """A TIFF image opened without reading its pixels: planes and row bands on demand.

    Same layout as :class:`ImageStack` (planes ``(P, C, Y, X)``), but pixels are read
    only when asked for, so memory does not grow with the stack's length or the
    plane's size. Uncompressed contiguous files are read by offset (a short-lived
    memory map per read, so the process does not keep the file's pages mapped);
    compressed or tiled files through tifffile's zarr store (one page, strip or tile
    decoded at a time).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        _check_file(self.path, "image")
        try:
            with _quiet_tifffile():
                self._tif = tifffile.TiffFile(self.path)
                series = self._tif.series[0]
                self.meta = _tiff_meta(self._tif, series)
                shape, dtype = tuple(series.shape), np.dtype(series.dtype)
                self._offset = series.dataoffset
                self._zarr = None
                if self._offset is None:
                    import zarr

                    self._store = series.aszarr()
                    self._zarr = zarr.open_array(self._store, mode="r")
        except CellfitError:
            raise
        except OSError as exc:  # the file system said no, not the file's content
            self.close()
            raise _unreadable(self.path, "image", exc) from None
        except Exception as exc:
            self.close()
            raise _damaged(self.path, "image", exc) from None
        if 0 in shape:
            self.close()
            raise CellfitError(f"image {self.path} is empty: check that it holds pixels.")
        _check_dtype(np.empty(0, dtype), f"image {self.path}")
        self.shape, self.dtype = shape, dtype
        self._byteorder = self._tif.byteorder
        # layout: reuse to_planes on a zero-strided stand-in of the full shape
        dummy = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, [0] * len(shape))
        planes, self.lead_shape, self.axes = to_planes(dummy, self.meta.axes, f"image {self.path}")
        self._in_axes = self.meta.axes.upper() if len(self.meta.axes) == len(shape) else None
        if self._in_axes is None:
            self._in_axes = guess_axes(shape)
        self.n_planes, self.n_channels = int(planes.shape[0]), int(planes.shape[1])
        self.plane_shape = (int(planes.shape[2]), int(planes.shape[3]))
        self.name = self.path.stem
        self.resolution = self.meta.resolution

    # ImageStack-like surface
    @property
    def labels_shape(self) -> tuple[int, ...]:
        return (*self.lead_shape, *self.plane_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def _index(self, p: int, r0: int, r1: int) -> tuple[tuple, str]:
        """Index into the series for plane ``p``, rows ``r0:r1``; and the axes left."""
        lead_idx = np.unravel_index(p, self.lead_shape) if self.lead_shape else ()
        idx: list = []
        rest = ""
        k = 0
        for a in self._in_axes:
            if a == "Y":
                idx.append(slice(r0, r1))
                rest += a
            elif a == "X" or a in _CHANNEL_AXES:
                idx.append(slice(None))
                rest += a
            else:
                idx.append(int(lead_idx[k]))
                k += 1
        return tuple(idx), rest

    def _read(self, idx: tuple) -> np.ndarray:
        if self._zarr is not None:
            return np.asarray(self._zarr[idx])
        dtype = self.dtype.newbyteorder(self._byteorder)
        mm = np.memmap(self.path, dtype=dtype, mode="r", offset=self._offset, shape=self.shape)
        out = np.array(mm[idx], dtype=self.dtype)
        del mm  # unmapped now: the process keeps none of the file's pages
        return out

    def rows(self, p: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of plane ``p``, shape ``(C, r1 - r0, X)``, in the file's dtype."""
        if not 0 <= p < self.n_planes:
            raise IndexError(p)
        idx, rest = self._index(p, r0, r1)
        try:
            with _quiet_tifffile():
                arr = self._read(idx)
        except OSError as exc:
            raise _unreadable(self.path, "image", exc) from None
        except Exception as exc:
            raise _damaged(self.path, "image", exc, verb="read") from None
        check_finite(arr, f"image {self.path}")
        return to_planes(arr, rest, f"image {self.path}")[0][0]

    def plane(self, p: int) -> np.ndarray:
        """Plane ``p``, shape ``(C, Y, X)``."""
        return self.rows(p, 0, self.plane_shape[0])

    def close(self) -> None:
        for name in ("_store", "_tif"):
            obj = getattr(self, name, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()
                setattr(self, name, None)

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class InMemoryImage:
    """An :class:`ImageStack` with the :class:`LazyImage` surface (plane, rows, meta)."""

    def __init__(self, stack: ImageStack, meta: ImageMeta | None = None) -> None:
        self.stack = stack
        self.path = None
        self.meta = meta or ImageMeta(axes=stack.axes, resolution=stack.resolution)
        self.shape = stack.data.shape
        self.dtype = stack.data.dtype
        self.lead_shape, self.axes, self.name = stack.lead_shape, stack.axes, stack.name
        self.n_planes, self.n_channels = stack.n_planes, stack.n_channels
        self.plane_shape = stack.plane_shape
        self.resolution = stack.resolution
        self.labels_shape = stack.labels_shape
        self.nbytes = stack.data.nbytes

    def rows(self, p: int, r0: int, r1: int) -> np.ndarray:
        return self.stack.data[p, :, r0:r1]

    def plane(self, p: int) -> np.ndarray:
        return self.stack.data[p]

    def close(self) -> None:
        pass

    def __enter__(self) -> InMemoryImage:
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_image(
    path: str | os.PathLike, lazy: bool | None = None
) -> LazyImage | InMemoryImage:
    """Open a TIFF for streaming: lazily when it is large (``lazy=None``: more than
    :data:`LAZY_BYTES` of pixels), read whole otherwise. Both results offer
    ``plane(p)``, ``rows(p, r0, r1)``, ``n_planes``, ``plane_shape``, ``lead_shape``,
    ``meta`` and ``close()``."""
    lazy_img = LazyImage(path)
    if lazy is True or (lazy is None and lazy_img.nbytes > LAZY_BYTES):
        return lazy_img
    meta = lazy_img.meta
    lazy_img.close()
    stack = read_image(path)
    return InMemoryImage(stack, meta)
