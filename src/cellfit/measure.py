"""Per-cell measurements of label images, and a quality report per file.

After segmentation a user wants a table: one row per cell and plane (position, size,
shape, intensities), and, over many files, a word on which results to check first.

* :func:`measure_plane` measures the cells of one 2-D label image (with
  :func:`skimage.measure.regionprops_table`), :class:`Measurer` does it plane after
  plane for a stack (it never holds more than one plane; the batch feeds it as planes
  are labelled) and :func:`measure_stack` drains planes through one.
* :func:`write_table` writes a table as CSV atomically (a temporary file renamed when
  complete); :func:`read_table` reads a measurements table back.
* :func:`pixel_size_of` is the pixel size a TIFF carries (ImageJ, OME or TIFF
  resolution tags), which adds calibrated columns (``area_um2``, ...).
* :func:`quality_flags` words what looks wrong with a file's result (cells far from
  the size the model was made for, intensities unlike the training images', very few
  or very many cells, most of the image taken for cells), each as a plain sentence,
  so that of 500 results the few to open first stand out.

The columns of a measurements table, in order (see :func:`table_columns`):

``id``, ``plane``, ``centroid_y``, ``centroid_x``, ``area_px``, [``area_<unit>2``],
``equivalent_diameter_px``, [``equivalent_diameter_<unit>``], ``eccentricity``,
``solidity``, ``touches_edge``, then for each channel ``mean_intensity_<ch>``,
``max_intensity_<ch>``, ``integrated_intensity_<ch>`` (``<ch>`` is ``c0``, ``c1``, ...
or the channel's name).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from cellfit.errors import CellfitError
from cellfit.io import ImageMeta, LazyImage, check_labels
from cellfit.normalize import sample_steps
from cellfit.outputs import remove_stale_temporaries, tmp_name, write_error

__all__ = [
    "COLUMNS",
    "CONTRAST_RATIO",
    "COUNT_MIN_FILES",
    "COUNT_RATIO",
    "COVERAGE",
    "INTENSITY_PERCENTILES",
    "SIZE_RATIO",
    "SUMMARY_COLUMNS",
    "Expected",
    "FileSummary",
    "Flag",
    "Measurer",
    "PixelSize",
    "TableWriter",
    "cells_csv_path",
    "expected_from_model",
    "flagged_first",
    "image_range",
    "intensity_record",
    "measure_plane",
    "measure_stack",
    "pixel_size_of",
    "quality_flags",
    "rank_flagged",
    "read_table",
    "summary_table",
    "table_columns",
    "typical_density",
    "unit_name",
    "write_table",
]

#: the columns of every measurements table, in order (the calibrated and intensity
#: columns, when there are any, join them: :func:`table_columns`)
COLUMNS: tuple[str, ...] = (
    "id",
    "plane",
    "centroid_y",
    "centroid_x",
    "area_px",
    "equivalent_diameter_px",
    "eccentricity",
    "solidity",
    "touches_edge",
)
_INT_COLUMNS = frozenset({"id", "plane", "area_px"})
_BOOL_COLUMNS = frozenset({"touches_edge"})
#: the columns of a run's ``summary.csv``, one row per file
SUMMARY_COLUMNS: tuple[str, ...] = (
    "file",
    "planes",
    "cells",
    "median_area_px",
    "median_diameter_px",
    "median_intensity",
    "cell_fraction",
    "flags",
)
#: the percentiles that describe an image's intensity range (those of the default
#: normalisation): recorded for the training images, compared for each file
INTENSITY_PERCENTILES = (1.0, 99.8)

Table = dict[str, np.ndarray]


# ---------------------------------------------------------------------- calibration
class PixelSize(NamedTuple):
    """The size of a pixel along y and x, in ``unit`` (e.g. ``"um"``)."""

    y: float
    x: float
    unit: str


#: spellings of units, as ImageJ, OME and TIFF write them, to the short names of columns
_UNITS = {
    "um": "um", "µm": "um", "μm": "um", "\\u00b5m": "um", "micron": "um", "microns": "um",
    "micrometer": "um", "micrometre": "um", "micrometers": "um", "micrometres": "um",
    "nm": "nm", "nanometer": "nm", "nanometre": "nm", "nanometers": "nm",
    "mm": "mm", "millimeter": "mm", "millimetre": "mm", "millimeters": "mm",
    "cm": "cm", "centimeter": "cm", "centimetre": "cm", "m": "m", "meter": "m", "metre": "m",
}
_NO_UNIT = {"", "pixel", "pixels", "px", "none", "unit", "units"}
#: TIFF ResolutionUnit: pixels per inch (2) or per centimetre (3), in micrometres
_TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0}
#: a pixel size from TIFF inch/centimetre tags at least this large (micrometres) is a
#: screen or print setting (72 dpi is 353 um), not a microscope's calibration
_DISPLAY_UM = 10.0


def unit_name(unit: str | None) -> str | None:
    """The short name of a length unit for column names (``"µm"``, ``"micron"`` →
    ``"um"``); None for none (``"pixel"``, empty)."""
    if unit is None:
        return None
    u = str(unit).strip()
    if u.lower() in _NO_UNIT:
        return None
    known = _UNITS.get(u) or _UNITS.get(u.lower())
    if known:
        return known
    clean = re.sub(r"[^0-9a-z]+", "_", u.lower()).strip("_")
    return clean or None


def _ratio(value) -> float | None:
    """A TIFF rational (``(num, den)``) or number as a float; None when unusable."""
    try:
        if isinstance(value, (tuple, list)) and len(value) == 2:
            num, den = float(value[0]), float(value[1])
            out = num / den if den else math.nan
        else:
            out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def pixel_size_of(source: str | os.PathLike | ImageMeta) -> PixelSize | None:
    """The pixel size a TIFF carries, or None when it carries none.

    Read, in order, from OME metadata (``PhysicalSizeY/X`` and their unit), ImageJ
    calibration (the ``unit`` with the XResolution / YResolution tags, pixels per
    unit) and the TIFF resolution tags with a ResolutionUnit of inch or centimetre
    (given in micrometres; sizes of 10 um and more from these tags are taken for a
    screen setting such as 72 dpi and ignored).

    Parameters
    ----------
    source : path or ImageMeta
        A TIFF file, or the metadata :func:`cellfit.io.open_image` read from one.
    """
    if isinstance(source, ImageMeta):
        meta = source
    else:
        with LazyImage(source) as img:
            meta = img.meta
    if meta.physical_size is not None:
        y, x, unit = meta.physical_size
        name = unit_name(unit)
        if name and _ratio(y) and _ratio(x):
            return PixelSize(float(y), float(x), name)
    if meta.resolution is None:
        return None
    xres, yres = (_ratio(r) for r in meta.resolution)
    if not xres or not yres:
        return None
    if meta.is_imagej and meta.imagej.get("unit") is not None:
        name = unit_name(meta.imagej["unit"])
        return PixelSize(1.0 / yres, 1.0 / xres, name) if name else None
    per = _TIFF_UNIT_UM.get(meta.resolution_unit or 0)
    if per is None:
        return None
    y, x = per / yres, per / xres
    if max(y, x) >= _DISPLAY_UM:
        return None
    return PixelSize(y, x, "um")


# ------------------------------------------------------------------- the measurements
def _channel_names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"c{i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise CellfitError(
            f"{len(names)} channel name(s) were given for an image of {n} channel(s): "
            "give one name per channel."
        )
    out = []
    for i, nm in enumerate(names):
        clean = re.sub(r"[^0-9A-Za-z]+", "_", str(nm)).strip("_")
        out.append(clean or f"c{i}")
    if len(set(out)) != len(out):
        raise CellfitError(
            f"the channel names {', '.join(map(str, names))} are not distinct as column "
            "names: give each channel its own name."
        )
    return out


def table_columns(
    n_channels: int = 0,
    *,
    unit: str | None = None,
    channel_names: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """The ordered columns of a measurements table with ``n_channels`` intensity
    channels (0: no image) and areas in ``unit`` (None: pixels only)."""
    u = unit_name(unit)
    cols = ["id", "plane", "centroid_y", "centroid_x", "area_px"]
    if u:
        cols.append(f"area_{u}2")
    cols.append("equivalent_diameter_px")
    if u:
        cols.append(f"equivalent_diameter_{u}")
    cols += ["eccentricity", "solidity", "touches_edge"]
    for ch in _channel_names(n_channels, channel_names) if n_channels else []:
        cols += [f"mean_intensity_{ch}", f"max_intensity_{ch}", f"integrated_intensity_{ch}"]
    return tuple(cols)


def _empty(columns: Sequence[str]) -> Table:
    return {c: np.empty(0, dtype=_dtype(c)) for c in columns}


def _dtype(column: str):
    if column in _INT_COLUMNS:
        return np.int64
    if column in _BOOL_COLUMNS:
        return bool
    return np.float64


def _image_channels(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """``image`` as ``(C, Y, X)`` checked against the labels' ``shape``."""
    if image is None:
        return None
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[1:] != tuple(shape):
        raise CellfitError(
            f"the image to measure has shape {image.shape}, but its labels have shape "
            f"{tuple(shape)}: give an image (C, Y, X) or (Y, X) of the labels' size."
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise CellfitError(
            f"the image to measure has pixels of type {image.dtype}: give numbers."
        )
    return image


def _pixel_size(pixel_size, unit: str | None) -> tuple[tuple[float, float] | None, str | None]:
    if pixel_size is None:
        return None, None
    if isinstance(pixel_size, PixelSize):
        unit = unit or pixel_size.unit
    try:
        py, px = (float(v) for v in tuple(pixel_size)[:2])
    except (TypeError, ValueError):
        py = px = math.nan
    if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
        raise CellfitError(
            f"the pixel size {pixel_size!r} is not two positive numbers (y, x): give the "
            "size of a pixel, e.g. 0.65 micrometres."
        )
    name = unit_name(unit)
    if name is None:
        raise CellfitError(
            "a pixel size was given without its unit: give the unit too (e.g. um)."
        )
    return (py, px), name


def measure_plane(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    *,
    plane: int = 0,
    pixel_size: tuple[float, float] | PixelSize | None = None,
    unit: str | None = None,
    channel_names: Sequence[str] | None = None,
) -> Table:
    """One row per cell of a 2-D label image.

    Parameters
    ----------
    labels : ndarray, shape (Y, X)
        Instance labels: 0 background, one id per cell.
    image : ndarray, shape (C, Y, X) or (Y, X), optional
        Raw intensities; None: no intensity columns.
    plane : int
        Written in the ``plane`` column (the slice or time point, counted from 0).
    pixel_size : (y, x) or PixelSize, optional
        Size of a pixel in ``unit`` (a :class:`PixelSize` brings its unit): adds
        ``area_<unit>2`` and ``equivalent_diameter_<unit>``.
    channel_names : sequence of str, optional
        Names of the channels for the intensity columns (default ``c0``, ``c1``, ...).

    Returns
    -------
    dict of str to ndarray
        The columns of :func:`table_columns`, one entry per cell, by increasing id;
        every column (with 0 rows) when there are no cells.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise CellfitError(
            f"the labels to measure have shape {labels.shape}: measure one 2-D plane "
            "(Y, X) at a time."
        )
    labels = check_labels(labels, "the labels to measure")
    chans = _image_channels(image, labels.shape)
    size, u = _pixel_size(pixel_size, unit)
    n_ch = 0 if chans is None else chans.shape[0]
    names = _channel_names(n_ch, channel_names) if n_ch else []
    columns = table_columns(n_ch, unit=u, channel_names=names or None)
    if not labels.any():
        return _empty(columns)
    if labels.dtype == bool or labels.dtype.itemsize > 4 or labels.dtype.kind != "i":
        labels = labels.astype(np.int64 if labels.max() >= 2**31 else np.int32)
    props = ["label", "centroid", "area", "equivalent_diameter_area", "eccentricity",
             "solidity", "bbox"]
    with warnings.catch_warnings():  # degenerate cells (a line of pixels): solidity 1
        warnings.simplefilter("ignore")
        t = regionprops_table(labels, properties=props)
    ids = np.asarray(t["label"], dtype=np.int64)
    area = np.asarray(t["area"], dtype=np.float64)
    h, w = labels.shape
    out: Table = {
        "id": ids,
        "plane": np.full(len(ids), int(plane), dtype=np.int64),
        "centroid_y": np.asarray(t["centroid-0"], dtype=np.float64),
        "centroid_x": np.asarray(t["centroid-1"], dtype=np.float64),
        "area_px": np.rint(area).astype(np.int64),
    }
    if size is not None:
        out[f"area_{u}2"] = area * size[0] * size[1]
    out["equivalent_diameter_px"] = np.asarray(t["equivalent_diameter_area"], dtype=np.float64)
    if size is not None:
        out[f"equivalent_diameter_{u}"] = 2.0 * np.sqrt(out[f"area_{u}2"] / np.pi)
    out["eccentricity"] = np.asarray(t["eccentricity"], dtype=np.float64)
    out["solidity"] = np.nan_to_num(np.asarray(t["solidity"], dtype=np.float64), nan=1.0)
    out["touches_edge"] = (
        (np.asarray(t["bbox-0"]) == 0) | (np.asarray(t["bbox-1"]) == 0)
        | (np.asarray(t["bbox-2"]) == h) | (np.asarray(t["bbox-3"]) == w)
    )
    for c, name in enumerate(names):
        ch = np.asarray(chans[c], dtype=np.float64)
        total = np.asarray(ndi.sum_labels(ch, labels, index=ids), dtype=np.float64)
        out[f"mean_intensity_{name}"] = total / area
        out[f"max_intensity_{name}"] = np.asarray(ndi.maximum(ch, labels, index=ids),
                                                  dtype=np.float64)
        out[f"integrated_intensity_{name}"] = total
    return {c: out[c] for c in columns}


# ---------------------------------------------------------------- stacks and summaries
def image_range(img, percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> np.ndarray:
    """Per-channel ``(low, high)`` intensity percentiles of an image, shape (C, 2).

    ``img`` is an array of planes ``(P, C, Y, X)`` or an opened image
    (:func:`cellfit.io.open_image`: read plane by plane, never whole); both are sampled
    on the same regular grid as the normalisation (:func:`cellfit.normalize.sample_steps`).
    """
    if isinstance(img, np.ndarray):
        p, _c, h, w = img.shape
        step, pstep = sample_steps(p, h, w)
        sample = np.asarray(img[::pstep, :, ::step, ::step], dtype=np.float64)
    else:
        p, (h, w) = img.n_planes, img.plane_shape
        step, pstep = sample_steps(p, h, w)
        parts = []
        for q in range(0, p, pstep):
            rows = []
            band = max(step, (2**24 // max(1, w * img.n_channels)) // step * step)
            for r0 in range(0, h, band):
                raw = img.rows(q, r0, min(h, r0 + band))
                rows.append(np.asarray(raw[:, ::step, ::step], dtype=np.float64))
            parts.append(np.concatenate(rows, axis=1))
        sample = np.stack(parts)
    out = np.empty((sample.shape[1], 2), dtype=np.float64)
    for ch in range(sample.shape[1]):
        out[ch] = np.percentile(sample[:, ch], list(percentiles))
    return out


@dataclass
class FileSummary:
    """What the summary and the quality report say about one file.

    ``median_intensity`` is the median of the cells' mean intensity in the first
    channel (NaN without cells or an image); ``cell_fraction`` the share of the
    pixels inside cells; ``intensity`` the image's per-channel ``(low, high)``
    percentiles (:data:`INTENSITY_PERCENTILES`), None when unknown; ``error`` why the
    file has no result.
    """

    file: str
    planes: int = 0
    pixels: int = 0
    cells: int = 0
    median_area_px: float = math.nan
    median_diameter_px: float = math.nan
    median_intensity: float = math.nan
    cell_fraction: float = math.nan
    intensity: np.ndarray | None = None
    error: str | None = None
    flags: list[Flag] = field(default_factory=list)

    @classmethod
    def of_table(
        cls,
        file: str,
        table: Mapping[str, np.ndarray],
        *,
        planes: int,
        plane_shape: tuple[int, int],
        intensity: np.ndarray | None = None,
    ) -> FileSummary:
        """The summary of a file's measurements ``table`` (``planes`` planes of
        ``plane_shape``)."""
        area = np.asarray(table.get("area_px", ()), dtype=np.float64)
        pixels = int(planes) * int(plane_shape[0]) * int(plane_shape[1])
        mean = next((k for k in table if k.startswith("mean_intensity_")), None)
        n = len(area)
        return cls(
            file=file,
            planes=int(planes),
            pixels=pixels,
            cells=n,
            median_area_px=float(np.median(area)) if n else math.nan,
            median_diameter_px=float(2 * np.sqrt(np.median(area) / np.pi)) if n else math.nan,
            median_intensity=(
                float(np.median(table[mean])) if n and mean is not None else math.nan
            ),
            cell_fraction=float(area.sum() / pixels) if pixels else math.nan,
            intensity=None if intensity is None else np.asarray(intensity, dtype=np.float64),
        )


class Measurer:
    """Measures a stack plane after plane: :meth:`add` one labelled plane (and its
    raw pixels) at a time; :meth:`table` is the rows so far.

    It keeps the rows, never a plane, so its memory grows with the number of cells,
    not with the stack's size. The columns are fixed by the first plane's channels
    (or ``n_channels``); a later plane with other channels is refused.

    Parameters
    ----------
    pixel_size, unit, channel_names
        As :func:`measure_plane`.
    """

    def __init__(
        self,
        *,
        pixel_size: tuple[float, float] | PixelSize | None = None,
        unit: str | None = None,
        channel_names: Sequence[str] | None = None,
        n_channels: int | None = None,
    ) -> None:
        self.pixel_size, self.unit = _pixel_size(pixel_size, unit)
        self.channel_names = channel_names
        self.n_channels = n_channels
        self.planes = 0
        self.plane_shape: tuple[int, int] | None = None
        self._parts: list[Table] = []
        self._columns: tuple[str, ...] | None = None
        if n_channels is not None:
            self._columns = self._columns_for(n_channels)

    def _columns_for(self, n: int) -> tuple[str, ...]:
        return table_columns(n, unit=self.unit, channel_names=self.channel_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """The table's columns (without an image until a plane with one is added)."""
        return self._columns or self._columns_for(0)

    def add(self, labels: np.ndarray, image: np.ndarray | None = None,
            plane: int | None = None) -> int:
        """Measure one plane (``labels`` (Y, X), ``image`` (C, Y, X) or (Y, X)); ``plane``
        defaults to the number of planes added before. Returns the number of cells."""
        n = 0 if image is None else (1 if np.ndim(image) == 2 else int(np.shape(image)[0]))
        cols = self._columns_for(n)
        if self._columns is None:
            self._columns, self.n_channels = cols, n
        elif cols != self._columns:
            raise CellfitError(
                f"plane {self.planes if plane is None else plane} has {n} channel(s) but "
                f"the planes before it had {self.n_channels}: measure planes of one stack."
            )
        rows = measure_plane(
            labels, image, plane=self.planes if plane is None else plane,
            pixel_size=self.pixel_size, unit=self.unit, channel_names=self.channel_names,
        )
        self.planes += 1
        self.plane_shape = tuple(np.shape(labels))  # type: ignore[assignment]
        if len(rows["id"]):
            self._parts.append(rows)
        return len(rows["id"])

    def table(self) -> Table:
        """Every row so far, in the order the planes were added."""
        cols = self.columns
        if not self._parts:
            return _empty(cols)
        return {c: np.concatenate([p[c] for p in self._parts]) for c in cols}

    def summary(self, file: str, intensity: np.ndarray | None = None) -> FileSummary:
        """A :class:`FileSummary` of the planes added (``intensity``: the image's
        :func:`image_range`, when known)."""
        return FileSummary.of_table(
            file, self.table(), planes=self.planes, plane_shape=self.plane_shape or (0, 0),
            intensity=intensity,
        )


def measure_stack(
    labels: Iterable[np.ndarray] | np.ndarray,
    images: Iterable[np.ndarray | None] | np.ndarray | None = None,
    **kwargs,
) -> Table:
    """The rows of every plane of a stack, measured one plane at a time.

    Parameters
    ----------
    labels : ndarray (..., Y, X) or iterable of (Y, X) planes
        A generator of planes is read one plane at a time, never whole.
    images : ndarray (P, C, Y, X) or iterable of (C, Y, X) / (Y, X) planes, optional
        The raw pixels, plane for plane.
    **kwargs
        ``pixel_size``, ``unit``, ``channel_names``: as :func:`measure_plane`.
    """
    if isinstance(labels, np.ndarray):
        labels = labels.reshape(-1, *labels.shape[-2:]) if labels.ndim > 2 else labels[None]
    m = Measurer(**kwargs)
    image_iter = iter(images) if images is not None else None
    for lab in labels:
        img = None
        if image_iter is not None:
            try:
                img = next(image_iter)
            except StopIteration:
                raise CellfitError(
                    "the image has fewer planes than its labels: give the image the labels "
                    "were made from."
                ) from None
        m.add(lab, img)
    return m.table()


# ------------------------------------------------------------------------- CSV files
def cells_csv_path(labels_path: str | os.PathLike) -> Path:
    """``<stem>_cells.csv`` beside a labels output ``<stem>_labels.tif``."""
    p = Path(labels_path)
    stem = p.name
    for suffix in (".tif", ".tiff", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.endswith("_labels"):
        stem = stem[: -len("_labels")]
    return p.parent / f"{stem}_cells.csv"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if v.is_integer() and abs(v) < 2**53:
            return str(int(v))
        return format(v, ".10g")
    return str(value)


def _rows(table: Mapping[str, Sequence]) -> tuple[list[str], int]:
    cols = list(table)
    lengths = {len(table[c]) for c in cols}
    if len(lengths) > 1:
        raise CellfitError(
            "the table's columns have different lengths: give one value per row in every column."
        )
    return cols, lengths.pop() if lengths else 0


#: characters of CSV text gathered before each write
_BLOCK = 1 << 16


class TableWriter:
    """A CSV output written atomically: :meth:`finish` writes it under a hidden
    temporary name beside ``path``, :meth:`close` renames it into place (replacing an
    older file), :meth:`abort` removes the temporary. A write that fails (a full
    disk, no permission) is one sentence, with the temporary removed and an older
    file left as it was."""

    def __init__(self, path: str | os.PathLike, table: Mapping[str, Sequence]) -> None:
        self.path = Path(path)
        self.table = table
        self.tmp = tmp_name(self.path)
        self._finished = self._closed = False

    def finish(self) -> None:
        if self._finished:
            return
        cols, n = _rows(self.table)
        with self._removing_the_temporary_on_failure(), open(self.tmp, "wb") as fh:  # UTF-8 text, written in blocks of rows
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(cols)
            columns = [self.table[c] for c in cols]
            for i in range(n):
                w.writerow([_text(col[i]) for col in columns])
                if buf.tell() > _BLOCK:
                    fh.write(buf.getvalue().encode("utf-8"))
                    buf.seek(0)
                    buf.truncate()
            fh.write(buf.getvalue().encode("utf-8"))
        self._finished = True

    def close(self) -> Path:
        self.finish()
        with self._removing_the_temporary_on_failure():
            os.replace(self.tmp, self.path)
        self._closed = True
        return self.path

    @contextlib.contextmanager
    def _removing_the_temporary_on_failure(self):
        """Any failure removes the temporary; a system error (full disk, no permission)
        becomes one sentence naming the output."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.tmp.unlink(missing_ok=True)


def write_table(path: str | os.PathLike, table: Mapping[str, Sequence]) -> Path:
    """Write ``table`` (column name → values, all of one length) as CSV, atomically.

    Numbers are written in full (whole numbers without a decimal point, others with 10
    significant digits), booleans as ``true`` / ``false``, NaN as an empty field.
    Temporaries an interrupted earlier write left are removed first.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CellfitError
        The file could not be written (one sentence); an older file at ``path`` is
        then left as it was.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    return TableWriter(path, table).close()


def _not_a_table(path: Path, why: str) -> CellfitError:
    return CellfitError(
        f"{path} is not a cellfit measurements table ({why}): give a <name>_cells.csv "
        "written by cellfit predict --measure."
    )


def _parse(path: Path, column: str, values: list[str], line0: int) -> np.ndarray:
    kind = _dtype(column)
    if kind is bool:
        out = np.empty(len(values), dtype=bool)
        for i, v in enumerate(values):
            low = v.strip().lower()
            if low not in ("true", "false", "1", "0"):
                raise _not_a_table(path, f"line {line0 + i}: {column} is {v!r}, not true or false")
            out[i] = low in ("true", "1")
        return out
    try:
        floats = np.array([float(v) if v.strip() else math.nan for v in values], dtype=np.float64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not _is_float(v))
        raise _not_a_table(
            path, f"line {line0 + bad}: {column} is {values[bad]!r}, not a number"
        ) from None
    if kind is np.int64:
        if not np.all(np.isfinite(floats)) or np.any(floats != np.round(floats)):
            bad = int(np.flatnonzero(~np.isfinite(floats) | (floats != np.round(floats)))[0])
            raise _not_a_table(
                path, f"line {line0 + bad}: {column} is {values[bad]!r}, not a whole number"
            )
        return floats.astype(np.int64)
    return floats


def _is_float(v: str) -> bool:
    try:
        float(v) if v.strip() else None
    except ValueError:
        return False
    return True


def read_table(path: str | os.PathLike) -> Table:
    """A measurements table written by :func:`write_table` (``<name>_cells.csv``).

    Returns the columns as arrays: ``id``, ``plane``, ``area_px`` as int64,
    ``touches_edge`` as bool, the others float64 (an empty field is NaN).

    Raises
    ------
    CellfitError
        The file is missing or unreadable, or is not a measurements table (it lacks
        one of :data:`COLUMNS`, or a value is not a number), in one sentence.
    """
    path = Path(path)
    if not path.is_file():
        raise CellfitError(f"the table {path} does not exist: check the path.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise _not_a_table(path, "it is not a text file") from None
    except OSError as exc:
        raise CellfitError(
            f"the table {path} could not be read ({exc.strerror or exc}): check that you may "
            "read it."
        ) from None
    except csv.Error as exc:
        raise _not_a_table(path, f"it is not CSV: {exc}") from None
    if not rows:
        raise _not_a_table(path, "it is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise _not_a_table(path, f"it has no column {', '.join(missing)}")
    if len(set(header)) != len(header):
        raise _not_a_table(path, "a column name is repeated")
    body = [r for r in rows[1:] if any(v.strip() for v in r)]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise _not_a_table(
                path, f"line {i + 2} has {len(r)} fields for {len(header)} columns"
            )
    return {
        col: _parse(path, col, [r[j] for r in body], 2) for j, col in enumerate(header)
    }


# ------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class Flag:
    """One thing that looks wrong with a file's result.

    ``kind`` names the check (``"no_cells"``, ``"size"``, ``"intensity"``,
    ``"few_cells"``, ``"many_cells"``, ``"coverage"``); ``text`` is the sentence for
    the user; ``severity`` (1 or more) how far outside the usual the file is, to show
    the most suspicious files first.
    """

    kind: str
    text: str
    severity: float


@dataclass
class Expected:
    """What a model expects of an image, for :func:`quality_flags`.

    ``diameter``: the cell diameter, in image pixels, the model was set for; ``low``
    and ``high``: per channel, the ``(min, max)`` of the training images' low and
    high intensity percentiles (:data:`INTENSITY_PERCENTILES`); ``contrast``: per
    channel the ``(min, max)`` of their difference. None where the model does not say
    (a model trained before cellfit recorded it gets no intensity check).
    """

    diameter: float | None = None
    low: list[tuple[float, float]] | None = None
    high: list[tuple[float, float]] | None = None
    contrast: list[tuple[float, float]] | None = None


def intensity_record(ranges: Sequence[np.ndarray]) -> dict | None:
    """The training images' intensities, as the training record keeps them.

    Parameters
    ----------
    ranges : sequence of ndarray, each (C, 2)
        Each training image's :func:`image_range`.

    Returns
    -------
    dict or None
        ``percentiles``, and per channel ``low``, ``high`` and ``contrast`` as
        ``[min, max]`` over the images (JSON-friendly; read by
        :func:`expected_from_model`); None without images, or for images of different
        numbers of channels.
    """
    shapes = {np.shape(r) for r in ranges}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    arr = np.stack([np.asarray(r, dtype=np.float64) for r in ranges])  # (N, C, 2)
    lo, hi = arr[..., 0], arr[..., 1]
    con = hi - lo

    def span(v: np.ndarray) -> list[list[float]]:
        return [[_sig(v[:, c].min()), _sig(v[:, c].max())] for c in range(v.shape[1])]

    return {
        "percentiles": list(INTENSITY_PERCENTILES),
        "images": int(arr.shape[0]),
        "low": span(lo),
        "high": span(hi),
        "contrast": span(con),
    }


def _sig(v: float) -> float:
    return float(f"{float(v):.6g}")


def _pairs(v) -> list[tuple[float, float]] | None:
    if not isinstance(v, list) or not v:
        return None
    out = []
    for p in v:
        if not (isinstance(p, list) and len(p) == 2):
            return None
        a, b = _ratio_or_none(p[0]), _ratio_or_none(p[1])
        if a is None or b is None:
            return None
        out.append((a, b))
    return out


def _ratio_or_none(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def expected_from_model(info, diameter: float | None = None) -> Expected:
    """What a model (its :class:`cellfit.model.ModelInfo`) expects.

    ``diameter`` (image pixels) is the cell diameter the run used, when the run set
    one (a starting model told or estimating it); otherwise the model's own
    (``info.diameter``, or the median diameter of the cells it was trained on). The
    intensity range is the union over the training runs that recorded it.
    """
    records = [r for r in (getattr(info, "training", None) or []) if isinstance(r, dict)]
    if diameter is None:
        diameter = getattr(info, "diameter", None)
    if not diameter and not getattr(info, "cell_diameter", None):  # not a starting model
        for r in reversed(records):
            d = (r.get("annotation") or {}).get("median_cell_diameter")
            if _ratio_or_none(d):
                diameter = float(d)
                break
    low = high = contrast = None
    n_ch = int(getattr(info, "in_channels", 1) or 1)
    for r in records:
        rec = r.get("intensity")
        if not isinstance(rec, dict):
            continue
        lo, hi, co = _pairs(rec.get("low")), _pairs(rec.get("high")), _pairs(rec.get("contrast"))
        if lo is None or hi is None or co is None or not len(lo) == len(hi) == len(co) == n_ch:
            continue
        if low is None:
            low, high, contrast = lo, hi, co
        else:
            low = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(low, lo)]
            high = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(high, hi)]
            contrast = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(contrast, co)]
    d = float(diameter) if diameter and _ratio_or_none(diameter) and diameter > 0 else None
    return Expected(diameter=d, low=low, high=high, contrast=contrast)


# The thresholds of the flags were chosen with benchmarks/quality_flags.py on
# nuclei-u2os, cells-phase-usiigaci and synthetic scenes (ground-truth masks as right
# results, altered copies as wrong ones) and reported on nuclei-he-monuseg,
# nuclei-dsb2018 and nuclei3d-gonuclear: docs/benchmarks.md, "Quality flags".
#: a file is flagged when its cells' median diameter is this many times larger or
#: smaller than the model's
SIZE_RATIO = 1.8
#: ... when its intensity contrast (high - low percentile) is this many times larger
#: or smaller than the training images' range of contrasts
CONTRAST_RATIO = 4.0
#: ... when it has this many times fewer or more cells per pixel than the run's median
COUNT_RATIO = 3.0
#: ... when cells cover more than this share of its pixels
COVERAGE = 0.7
#: files needed in a run before counts are compared with the run's median
COUNT_MIN_FILES = 3


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def _fmt(v: float) -> str:
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


def quality_flags(
    summary: FileSummary,
    expected: Expected | None = None,
    *,
    typical_density: float | None = None,
) -> list[Flag]:
    """What looks wrong with one file's result, most severe first.

    Parameters
    ----------
    summary : FileSummary
        The file's measurements in brief.
    expected : Expected, optional
        What the model expects (:func:`expected_from_model`); None: no size or
        intensity check.
    typical_density : float, optional
        The run's median number of cells per pixel (see :func:`rank_flagged`); None:
        no comparison with the other files.

    Returns
    -------
    list of Flag
        Empty when nothing looks wrong. A file that failed has none (its error says
        enough).
    """
    if summary.error is not None:
        return []
    flags: list[Flag] = []
    exp = expected or Expected()
    if summary.cells == 0 and summary.pixels > 0:
        flags.append(Flag("no_cells", "no cells were found", 10.0))
    if summary.cells and exp.diameter and math.isfinite(summary.median_diameter_px):
        r = summary.median_diameter_px / exp.diameter
        if r > SIZE_RATIO or r < 1 / SIZE_RATIO:
            which = "larger" if r > 1 else "smaller"
            flags.append(Flag(
                "size",
                f"cells are {max(r, 1 / r):.1f} times {which} than the model expects "
                f"(median diameter {_fmt(summary.median_diameter_px)} pixels, model "
                f"{_fmt(exp.diameter)}): check the pixel size or the cell diameter",
                max(r, 1 / r) / SIZE_RATIO,
            ))
    if (summary.intensity is not None and exp.contrast is not None
            and len(summary.intensity) == len(exp.contrast)):  # the same channels
        worst = None
        for c, (lo, hi) in enumerate(np.asarray(summary.intensity)):
            con = hi - lo
            cmin, cmax = exp.contrast[c]
            if con > cmax * CONTRAST_RATIO:
                r, more = con / max(cmax, 1e-12), True
            elif con * CONTRAST_RATIO < cmin:
                r, more = cmin / max(con, 1e-12), False
            else:
                continue
            if worst is None or r > worst[0]:
                worst = (r, more, c, lo, hi)
        if worst is not None:
            r, more, c, lo, hi = worst
            chan = f" in channel {c + 1}" if len(exp.contrast) > 1 else ""
            times = f"{r:.0f} times" if r < 1000 else "over 1000 times"
            span = f"{_fmt(lo)}-{_fmt(hi)}"
            if exp.low is not None and exp.high is not None:
                span += f" against {_fmt(exp.low[c][0])}-{_fmt(exp.high[c][1])}"
            why = ("another stain, camera or exposure, which the model was not trained on"
                   if more else "a dim or empty image, or another exposure")
            flags.append(Flag(
                "intensity",
                f"its intensities span {times} {'more' if more else 'less'} than the "
                f"training images'{chan} ({span}): {why}",
                min(r, 1e3) / CONTRAST_RATIO,
            ))
    if summary.cells and typical_density and summary.pixels:
        expect = typical_density * summary.pixels
        r = summary.cells / expect
        if r < 1 / COUNT_RATIO:
            flags.append(Flag(
                "few_cells",
                f"only {_cells(summary.cells)}, far fewer than in the other files (about "
                f"{_fmt(expect)} expected for an image this size)",
                (1 / r) / COUNT_RATIO,
            ))
        elif r > COUNT_RATIO:
            flags.append(Flag(
                "many_cells",
                f"{_cells(summary.cells)}, far more than in the other files (about "
                f"{_fmt(expect)} expected for an image this size): debris or noise taken "
                "for cells, or cells cut in pieces?",
                r / COUNT_RATIO,
            ))
    if summary.cells and summary.cell_fraction > COVERAGE:
        flags.append(Flag(
            "coverage",
            f"cells cover {summary.cell_fraction:.0%} of the image: the background may "
            "have been taken for cells",
            summary.cell_fraction / COVERAGE,
        ))
    return sorted(flags, key=lambda f: -f.severity)


def typical_density(summaries: Sequence[FileSummary]) -> float | None:
    """The median number of cells per pixel of the files with a result and cells, or
    None with fewer than :data:`COUNT_MIN_FILES` of them."""
    dens = [s.cells / s.pixels for s in summaries if s.error is None and s.cells and s.pixels]
    if len(dens) < COUNT_MIN_FILES:
        return None
    return float(np.median(dens))


def rank_flagged(
    summaries: Sequence[FileSummary], expected: Expected | None = None
) -> list[FileSummary]:
    """Set the :attr:`FileSummary.flags` of every file (comparing cell counts with the
    run's median) and return the flagged files, most suspicious first."""
    dens = typical_density(summaries)
    for s in summaries:
        s.flags = quality_flags(s, expected, typical_density=dens)
    return flagged_first(summaries)


def flagged_first(summaries: Sequence[FileSummary]) -> list[FileSummary]:
    """The files with flags (set by :func:`rank_flagged`), most suspicious first (the
    largest sum of their flags' severities)."""
    flagged = [s for s in summaries if s.flags]
    return sorted(flagged, key=lambda s: -sum(f.severity for f in s.flags))


def summary_table(summaries: Sequence[FileSummary]) -> dict[str, list]:
    """The rows of ``summary.csv`` (:data:`SUMMARY_COLUMNS`): one per file; the
    ``flags`` of a file without a result say why (its ``error``)."""
    out: dict[str, list] = {c: [] for c in SUMMARY_COLUMNS}
    for s in summaries:
        failed = s.error is not None
        out["file"].append(s.file)
        out["planes"].append(None if failed else s.planes)
        out["cells"].append(None if failed else s.cells)
        out["median_area_px"].append(s.median_area_px)
        out["median_diameter_px"].append(
            None if math.isnan(s.median_diameter_px) else round(s.median_diameter_px, 2)
        )
        out["median_intensity"].append(s.median_intensity)
        out["cell_fraction"].append(
            None if math.isnan(s.cell_fraction) else round(s.cell_fraction, 4)
        )
        out["flags"].append(s.error if failed else "; ".join(f.text for f in s.flags))
    return out
