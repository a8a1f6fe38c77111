"""Build the U-Net++ and save / load the one-file model format.

A model file is a safetensors file: tensors plus a JSON header. Loading it cannot
execute code (unlike a pickled PyTorch checkpoint, which cellfit refuses to open).
The header's ``cellfit`` entry holds a :class:`ModelInfo` as JSON: architecture,
encoder, channels, mode, class names, normalisation and the training record.

Model files are shared, so a file is checked before anything in it is used, and a
file that fails a check is refused with one sentence (a :class:`CellfitError`):

- the first bytes tell a safetensors file from a pickle (never unpickled) or
  anything else;
- the header is read with bounded reads: its length is checked against the file
  and :data:`MAX_HEADER_BYTES` before it is read, its JSON against
  :data:`MAX_JSON_DEPTH`; every tensor's dtype, shape and byte range must be valid,
  and the byte ranges must tile the data exactly (no gap, no overlap);
- the :class:`ModelInfo` must be of a known format version (a newer one asks for a
  newer cellfit) with every field of the right type and in range (unknown keys are
  ignored, for files from a later cellfit of the same format);
- the tensors must be exactly those of the network the info describes (names,
  shapes, kinds of number), which is checked on a network built without memory
  (``meta`` device) before any tensor is read.

A bioimage.io package made by ``cellfit export`` is read as the model file it
carries (:mod:`cellfit.packages`: the zip's directory bounded, the attachment read
from the zip without extracting anything, then checked as above).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy
import torch
from safetensors.torch import load, load_file, save
from torch import nn

import cellfit
from cellfit.errors import CellfitError
from cellfit.normalize import DEFAULT_NORMALIZATION
from cellfit.objectclass import valid_dict as valid_objects
from cellfit.packages import READ_ERRORS, PackagedModel, find_packaged_model

__all__ = [
    "BACKGROUND_COLOR",
    "CLASS_PALETTE",
    "DEFAULT_DECODER_CHANNELS",
    "DEFAULT_ENCODER",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "POSTPROCESS_KEYS",
    "REQUIRED_FIELDS",
    "ModelInfo",
    "build_model",
    "default_class_colors",
    "is_color",
    "load_encoder_weights",
    "load_model",
    "package_versions",
    "save_model",
    "training_record",
]

FORMAT_VERSION = 1
# Chosen by measurement of quality per CPU-minute: see docs/benchmarks.md.
DEFAULT_ENCODER = "mobilenet_v2"
DEFAULT_DECODER_CHANNELS = (128, 64, 32, 16, 16)
STRIDE = 32
#: the largest safetensors header cellfit reads, in bytes (the starting model's is
#: 60 kB; a model fine-tuned a thousand times stays under it)
MAX_HEADER_BYTES = 16 * 2**20
#: the deepest JSON nesting cellfit reads in a header (a model's own is 5 levels)
MAX_JSON_DEPTH = 32


@dataclass
class ModelInfo:
    """Everything needed to rebuild and use a model, stored in the model file."""

    encoder: str = DEFAULT_ENCODER
    in_channels: int = 1
    n_classes: int = 3
    mode: str = "instances"
    class_names: list[str] = field(default_factory=lambda: ["background", "cell", "boundary"])
    # one "#rrggbb" colour per class, background first (semantic models); None: the
    # default palette (:func:`default_class_colors`), as in files made before colours
    class_colors: list[str] | None = None
    decoder_channels: list[int] = field(default_factory=lambda: list(DEFAULT_DECODER_CHANNELS))
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    boundary_width: int = 1
    # model pixels per image pixel: images are resized by this factor before the
    # network sees them (chosen from the annotated cell size, see TrainConfig.scale)
    scale: float = 1.0
    # keyword arguments of the post-processing (e.g. min_size from the annotated cells)
    postprocess: dict = field(default_factory=dict)
    # the cell diameter, in model pixels, the network was trained for; set for starting
    # models meant for cells of any size (images are then resized so their cells are
    # this big: from the annotation when fine-tuning, estimated or given otherwise)
    cell_diameter: float | None = None
    # the cell diameter, in image pixels, ``scale`` was set for (from the annotation or
    # given); None for a starting model that has not been told (see cellfit.starting)
    diameter: float | None = None
    architecture: str = "UnetPlusPlus"
    format_version: int = FORMAT_VERSION
    training: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def colors(self) -> list[str]:
        """The colour of each class ("#rrggbb", background first): its own, else the
        default palette."""
        return list(self.class_colors or default_class_colors(self.n_classes))

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelInfo:
        """The info stored as ``text``, checked (see :func:`read_model_info`).

        Unknown keys are ignored; the fields that describe the network
        (:data:`REQUIRED_FIELDS`) must be there, the others default.

        Raises
        ------
        CellfitError
            Not JSON, nested too deeply, a field missing, of the wrong type or out
            of range, or a newer format version than this cellfit reads.
        """
        try:
            return _info_from_json(text)
        except _Newer as exc:
            raise CellfitError(
                f"this model was made by a newer cellfit (model format {exc.version}; this "
                f"cellfit reads format {FORMAT_VERSION}): update cellfit to open it."
            ) from None
        except _Damaged as exc:
            raise CellfitError(
                f"the model information is damaged ({exc}): retrain or re-export the model."
            ) from None


#: the colour of background (class 0): the quiet blue the dock paints background with
BACKGROUND_COLOR = "#598cd9"
#: the colours of classes 1, 2, ... of a semantic model: 20 colours far apart (after
#: Sasha Trubetskoy's list of distinct colours; none close to the background blue),
#: then hues a golden angle apart at alternating lightness (:func:`default_class_colors`)
CLASS_PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
    "#aaffc3", "#808000", "#ffd8b1", "#000075", "#a9a9a9", "#ffffff",
)
_HEX_COLOR = re.compile(r"#[0-9a-f]{6}")


def default_class_colors(n_classes: int) -> list[str]:
    """The default colours of ``n_classes`` classes, background first ("#rrggbb"):
    :data:`BACKGROUND_COLOR`, then :data:`CLASS_PALETTE`, then generated hues, so that
    dozens of classes stay told apart and a class keeps its colour whatever the count.

    >>> default_class_colors(3)
    ['#598cd9', '#e6194b', '#3cb44b']
    """
    out = [BACKGROUND_COLOR, *CLASS_PALETTE][: max(n_classes, 0)]
    k = 0
    while len(out) < n_classes:
        hue = (k * 0.381966 + 0.05) % 1.0  # the golden angle, as a share of the circle
        light = (0.45, 0.7, 0.3)[k % 3]
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
        k += 1
    return out


def is_color(v: Any) -> bool:
    """True for a colour as model files keep it: "#rrggbb", lower case."""
    return isinstance(v, str) and _HEX_COLOR.fullmatch(v) is not None


#: the fields a model file must hold: they describe the network and what it is fed
#: and gives (every cellfit since format 1 writes them); the others have defaults
REQUIRED_FIELDS = (
    "format_version",
    "encoder",
    "in_channels",
    "n_classes",
    "mode",
    "class_names",
    "decoder_channels",
    "normalization",
)
#: the post-processing settings a model may carry (the keyword arguments of
#: :func:`cellfit.postprocess.instances_from_probs`)
POSTPROCESS_KEYS = ("fg_threshold", "seed_threshold", "min_size", "split_area")
#: ... and, in semantic mode, "objects": the painted examples each object found is
#: compared with (:mod:`cellfit.objectclass`)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a model's behaviour."""
    import segmentation_models_pytorch as smp  # heavy (and pulls in triton): see build_model

    out = {
        "cellfit": cellfit.__version__,
        "torch": torch.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import timm  # optional: smp's encoders may come without it

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


#: most loss values a training record keeps (every k-th step beyond that)
RECORD_LOSSES = 200


def training_record(
    *,
    losses: Sequence[float],
    seconds: float,
    stopped_early: bool,
    device: str,
    batch_size: int,
    patch_size: int,
    loss: str,
    class_weights: list[float] | None,
    class_pixels: Sequence[int],
    validation: dict | None,
    validation_history: list[dict],
    validated_on: str,
    best_step: int,
    kept: str,
    best_score: float | None,
    annotation: dict,
    scale: float,
    init: str | None,
    distill: float | None,
    lr: float,
    encoder_weights: str | None,
    seed: int,
) -> dict:
    """The record of one training run, as kept in ``ModelInfo.training``.

    Parameters
    ----------
    losses : sequence of float
        The loss of every step of the run (the record keeps at most
        :data:`RECORD_LOSSES` of them, every ``losses_every``-th, and the mean of the
        last 10 as ``final_loss``).
    seconds : float
        Length of the run.
    stopped_early : bool
        The run was stopped before its step or time limit.
    validation : dict or None
        The best validation figures (rounded), None without validation.
    Other parameters
        Stored as given (``class_pixels`` as ints): the run's settings and outcome,
        with the date and :func:`package_versions` added.

    Returns
    -------
    dict
        JSON-friendly; its keys are the model file's, unchanged across versions.
    """
    every = max(1, len(losses) // RECORD_LOSSES)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": len(losses),
        "seconds": round(seconds, 1),
        "stopped_early": stopped_early,
        "device": device,
        "batch_size": batch_size,
        "patch_size": patch_size,
        "loss": loss,
        "class_weights": class_weights,
        "class_pixels": [int(c) for c in class_pixels],
        "losses": [round(float(v), 5) for v in losses[::every]],
        "losses_every": every,
        "final_loss": round(float(numpy.mean(losses[-10:])), 5) if len(losses) else None,
        "validation": validation,
        "validation_history": validation_history,
        "validated_on": validated_on,
        "best_step": best_step,
        "kept": kept,
        "best_score": best_score,
        "annotation": annotation,
        "scale": scale,
        "init": init,
        "distill": distill,
        "lr": lr,
        "encoder_weights": encoder_weights,
        "seed": seed,
        "versions": package_versions(),
    }


def build_model(info: ModelInfo, encoder_weights: str | None = None) -> nn.Module:
    """Build the U-Net++ described by ``info``.

    Parameters
    ----------
    encoder_weights : {None, "imagenet"} or path
        None: random initialisation. "imagenet": smp's pretrained weights (needs the
        internet). A path: encoder weights from a local safetensors / PyTorch file.
    """
    # imported here, not at the top: it takes seconds, and it imports triton, which
    # must not load after a napari viewer exists (cellfit.plugin._safety imports it first)
    import segmentation_models_pytorch as smp

    if info.architecture != "UnetPlusPlus":
        raise CellfitError(
            f"the model file describes a {info.architecture!r} network, which this cellfit "
            "cannot build: update cellfit."
        )
    download = encoder_weights == "imagenet"
    try:
        model = smp.UnetPlusPlus(
            encoder_name=info.encoder,
            encoder_weights="imagenet" if download else None,
            in_channels=info.in_channels,
            classes=info.n_classes,
            decoder_channels=list(info.decoder_channels),
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        if download and "weights" in str(exc).lower():
            raise CellfitError(
                f"ImageNet weights are not available for encoder {info.encoder!r}: "
                "choose another encoder or train without {setting}.",
                setting="encoder_weights",
            ) from None
        raise CellfitError(
            f"unknown encoder {info.encoder!r}: use a segmentation-models-pytorch encoder name "
            "such as mobilenet_v2, resnet18, efficientnet-b0 or tu-efficientnet_b0."
        ) from None
    except OSError:
        raise CellfitError(
            f"could not download the ImageNet weights of {info.encoder!r} (no internet "
            "connection?): download them on a connected machine and set {setting} to "
            "the file, or train without them.",
            setting="encoder_weights",
        ) from None
    except Exception as exc:
        if download:
            raise CellfitError(
                f"could not download the ImageNet weights of {info.encoder!r} ({type(exc).__name__}): "
                "download them on a connected machine and set {setting} to the file, "
                "or train without them.",
                setting="encoder_weights",
            ) from None
        raise
    if encoder_weights is not None and not download:
        load_encoder_weights(model, encoder_weights)
    return model


# ------------------------------------------------------------- checking a file
class _Damaged(Exception):
    """Why a file is refused (a phrase), before it is worded with the file's name."""


class _Newer(Exception):
    """The file is of a newer model format than this cellfit reads."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _short(value: Any) -> str:
    """``repr(value)``, cut to a length a message can hold."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refused when a key appears twice (the parsers that
    read the file after cellfit could keep another of the two)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Damaged(f"{_short(key)} appears twice")
        out[key] = value
    return out


def _json(text: str | bytes, what: str, walk: bool = True) -> Any:
    """``text`` parsed, refused when not JSON, with a key twice, or nested deeper than
    :data:`MAX_JSON_DEPTH` (never a RecursionError; ``walk=False`` leaves the depth
    to the caller, beyond the parser's own limit)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _Damaged(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # also bad UTF-8, and integers of thousands of digits
        raise _Damaged(f"{what} is not valid JSON") from None
    stack = [(value, 1)] if walk else []
    while stack:  # iterative: the depth is what is being checked
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth > MAX_JSON_DEPTH:
                raise _Damaged(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return value


def _between(lo: float, hi: float, whole: bool = False):
    def check(v: Any) -> bool:
        return (_is_int(v) if whole else _is_number(v)) and lo <= v <= hi

    return check


def _optional(check):
    return lambda v: v is None or check(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 200


def _normalization(v: Any) -> bool:
    if not isinstance(v, dict) or not isinstance(v.get("method", "percentile"), str):
        return False
    if v.get("method", "percentile") != "percentile":
        return True  # normalize() names a method this cellfit does not know
    return all(_between(0, 100)(v.get(k)) for k in ("low", "high"))


def _postprocess(v: Any) -> bool:
    return isinstance(v, dict) and all(
        (k == "objects" and valid_objects(x))
        or (k in POSTPROCESS_KEYS and (x is None or (_is_number(x) and x >= 0)))
        for k, x in v.items()
    )


#: each field of ModelInfo: its check, and what it should be (for the message)
_FIELDS: dict[str, tuple[Any, str]] = {
    "encoder": (_text, "an encoder name"),
    "architecture": (_text, "a network name"),
    "in_channels": (_between(1, 512, whole=True), "a whole number from 1 to 512"),
    "n_classes": (_between(2, 1024, whole=True), "a whole number from 2 to 1024"),
    "mode": (lambda v: v in ("instances", "semantic"), "'instances' or 'semantic'"),
    "class_names": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) and len(n) <= 200 for n in v),
        "a list of names",
    ),
    "class_colors": (
        _optional(lambda v: isinstance(v, list) and all(is_color(c) for c in v)),
        'a list of colours such as "#e6194b"',
    ),
    "decoder_channels": (
        lambda v: (
            isinstance(v, list)
            and 1 <= len(v) <= 8
            and all(_between(1, 4096, whole=True)(c) for c in v)
        ),
        "a list of up to 8 channel counts",
    ),
    "normalization": (
        _normalization,
        'a normalisation such as {"method": "percentile", "low": 1.0, "high": 99.8}',
    ),
    "boundary_width": (_between(0, 64, whole=True), "a whole number from 0 to 64"),
    "scale": (_between(0.05, 4.0), "a number from 0.05 to 4"),
    "postprocess": (_postprocess, f"settings among {', '.join(POSTPROCESS_KEYS)}"),
    "cell_diameter": (_optional(_between(1e-3, 1e4)), "a cell diameter in pixels"),
    "diameter": (_optional(_between(1e-3, 1e5)), "a cell diameter in pixels"),
    "training": (lambda v: isinstance(v, list), "a list of training records"),
}


def _figures(keys: tuple[str, ...]):
    """A dict whose ``keys`` (those present) are numbers or None."""
    return lambda v: isinstance(v, dict) and all(_optional(_is_number)(v.get(k)) for k in keys)


#: the entries of a training record that cellfit reads back (when present): each
#: record is otherwise free-form, and its other keys are kept as they are
_RECORD: dict[str, tuple[Any, str]] = {
    "date": (_optional(lambda v: isinstance(v, str)), "a date"),
    "device": (_optional(lambda v: isinstance(v, str)), "a device name"),
    "purpose": (_optional(lambda v: isinstance(v, str)), "a text"),
    "guard": (_optional(lambda v: isinstance(v, str)), "a text"),
    "init": (_optional(lambda v: isinstance(v, str)), "a text"),
    "validated_on": (_optional(lambda v: isinstance(v, str)), "a text"),
    "steps": (_optional(lambda v: _is_int(v) and v >= 0), "a number of steps"),
    "seconds": (_optional(_is_number), "a number of seconds"),
    "best_score": (_optional(_is_number), "a number"),
    "final_loss": (_optional(_is_number), "a number"),
    "validation": (
        _optional(
            lambda v: (
                _figures(("precision", "recall", "f1", "iou", "ap50", "score"))(v)
                and isinstance(v.get("class_iou", {}), dict)
                and all(_is_number(x) for x in v.get("class_iou", {}).values())
            )
        ),
        "validation figures",
    ),
    "annotation": (
        _figures(("cells", "median_cell_diameter", "median_cell_area")),
        "annotation figures",
    ),
    "guard_scores": (_optional(_figures(("trained", "start"))), "two scores"),
    "calibration": (
        _optional(
            lambda v: (
                _figures(("score", "default_score"))(v)
                and isinstance(v.get("chosen", {}), dict)
                and all(_is_number(x) for x in v.get("chosen", {}).values())
            )
        ),
        "calibrated settings",
    ),
    "data_counts": (_optional(lambda v: isinstance(v, dict)), "counts of images"),
    "intensity": (_optional(lambda v: isinstance(v, dict)), "intensity figures"),
    "data": (
        lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v),
        "a list of data sources",
    ),
}


def _info_from_json(text: str | bytes) -> ModelInfo:
    """The :class:`ModelInfo` in ``text``; raises :class:`_Newer` or :class:`_Damaged`."""
    data = _json(text, "its model information")
    if not isinstance(data, dict):
        raise _Damaged("its model information is not a JSON object")
    version = data.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise _Newer(version)  # before the fields: a newer format may change them
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise _Damaged(f"it lacks {', '.join(missing)}")
    if not (_is_int(version) and version >= 1):
        raise _Damaged(f"format_version is {_short(version)}, not a format number")
    known = {k: v for k, v in data.items() if k in _FIELDS}
    for name, value in known.items():
        check, should_be = _FIELDS[name]
        if not check(value):
            raise _Damaged(f"{name} is {_short(value)}, not {should_be}")
    for i, record in enumerate(known.get("training", []), 1):
        if not isinstance(record, dict):
            raise _Damaged(f"training record {i} is {_short(record)}, not a record")
        for name, (check, should_be) in _RECORD.items():
            if name in record and not check(record[name]):
                raise _Damaged(
                    f"training record {i} has {name} {_short(record[name])}, not {should_be}"
                )
    if len(known["class_names"]) != known["n_classes"]:
        raise _Damaged(
            f"it names {len(known['class_names'])} classes for a network of "
            f"{known['n_classes']} outputs"
        )
    colors = known.get("class_colors")
    if colors is not None and len(colors) != known["n_classes"]:
        raise _Damaged(
            f"it gives {len(colors)} class colours for a network of {known['n_classes']} outputs"
        )
    if known["mode"] == "instances" and known["n_classes"] != 3:
        raise _Damaged(f"an instance model has 3 outputs, not {known['n_classes']}")
    return ModelInfo(**known)


#: bytes per element of each safetensors dtype cellfit reads
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_DIMS = 16
_MAX_DIM = 2**48
# the first opcodes of a protocol 0 / 1 pickle: a global (``cmodule\nname\n``), a
# mark, or an empty list / dict / tuple with a memo
_OLD_PICKLE = re.compile(rb"\(?(c[\w.]+\n[\w.]+\n|\(?[dl]p\d+\n|[\]})]q\x00)")

_Tensors = dict[str, tuple[str, tuple[int, ...]]]


def _file_kind(path: Path) -> str:
    """What the first bytes of ``path`` say it is: "safetensors" (a header length then
    ``{``), "torch" (a PyTorch zip checkpoint), "old torch" (torch.save's format before
    PyTorch 1.6), "pickle" (any other pickle) or "other"."""
    with path.open("rb") as f:
        return _kind_of(f.read(256))


def _kind_of(head: bytes) -> str:
    """What the first 256 bytes ``head`` of a file say it is (see :func:`_file_kind`)."""
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch" if b"data.pkl" in head else "other"
    if head[:4] == b"\x80\x02\x8a\x0a":  # the magic number of torch.save's old format
        return "old torch"
    if (head[:1] == b"\x80" and 1 < head[1] < 16) or _OLD_PICKLE.match(head):
        return "pickle"
    return "other"


def _read_header(path: Path) -> tuple[_Tensors, dict[str, str]]:
    """The tensors (dtype and shape by name) and metadata of the safetensors file
    ``path``, checked with bounded reads; raises :class:`_Damaged`."""
    with path.open("rb") as f:
        return _header_of(f, path.stat().st_size)


def _header_of(f: IO[bytes], size: int) -> tuple[_Tensors, dict[str, str]]:
    """:func:`_read_header` of the ``size`` bytes of the stream ``f`` (at its start)."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise _Damaged(
            f"its header claims {n} bytes, more than the {MAX_HEADER_BYTES // 2**20} MiB "
            "cellfit reads"
        )
    if n > size - 8:
        raise _Damaged(f"its header claims {n} bytes but the whole file has {size} bytes")
    raw = f.read(n)
    if len(raw) != n:
        raise _Damaged("the file was cut short while it was read")
    header = _json(raw, "its header", walk=False)  # each entry's type is checked below
    if not isinstance(header, dict):
        raise _Damaged("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Damaged("its __metadata__ is not a table of texts")
    data_size = size - 8 - n
    tensors: _Tensors = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.keys() != {"dtype", "shape", "data_offsets"}:
            raise _Damaged(f"tensor {_short(name)} is not given as dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise _Damaged(f"tensor {_short(name)} has the unknown dtype {_short(dtype)}")
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_DIMS
            and all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape)
        ):
            raise _Damaged(f"tensor {_short(name)} has the impossible shape {_short(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _Damaged(
                f"tensor {_short(name)} has the impossible data_offsets {_short(offsets)}"
            )
        begin, end = offsets
        if end > data_size:
            raise _Damaged(
                f"tensor {_short(name)} ends at byte {end} of a {data_size}-byte data section"
            )
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        if nbytes != end - begin:
            raise _Damaged(
                f"tensor {_short(name)} is {_dims(shape)} {dtype}, {nbytes} bytes, but spans "
                f"{end - begin} bytes"
            )
        tensors[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    pos, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise _Damaged(f"tensors {_short(last)} and {_short(name)} overlap")
        if begin > pos:
            raise _Damaged(f"bytes {pos} to {begin} of its data belong to no tensor")
        pos, last = end, name
    if pos != data_size:
        raise _Damaged(f"bytes {pos} to {data_size} of its data belong to no tensor")
    return tensors, meta


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) if len(shape) else "a scalar"


def _fit_problem(expected: dict[str, torch.Tensor], tensors: _Tensors) -> str | None:
    """How the tensors of a file (dtype and shape by name) differ from a network's
    state dict ``expected``, in a phrase; None when they fit."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        return (
            f"the file lacks {len(missing)} of the network's {len(expected)} tensors, "
            f"such as {_short(missing[0])}"
        )
    extra = [k for k in tensors if k not in expected]
    if extra:
        return (
            f"the file holds {len(extra)} tensor(s) the network does not have, "
            f"such as {_short(extra[0])}"
        )
    for name, want in expected.items():
        dtype, shape = tensors[name]
        if shape != tuple(want.shape):
            return (
                f"{_short(name)} is {_dims(shape)} in the file, the network's is "
                f"{_dims(want.shape)}"
            )
        if want.dtype == torch.bool:
            fits = dtype == "BOOL"
        elif want.is_floating_point():
            fits = dtype in _FLOAT_DTYPES
        else:
            fits = dtype not in _FLOAT_DTYPES and dtype not in ("BOOL", "F8_E5M2", "F8_E4M3")
        if not fits:
            return f"{_short(name)} holds {dtype} values, the network's holds {want.dtype}"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (checked as a model file's are), or
    a PyTorch zip checkpoint loaded with ``weights_only`` (no code runs) and memory
    mapped (no tensor is bigger than the file)."""
    if not path.exists():
        raise CellfitError(f"weights file {path} does not exist: check the path.")
    kind = _file_kind(path) if path.is_file() else "other"
    if kind == "safetensors":
        try:
            _read_header(path)
            return load_file(str(path))
        except _Damaged as exc:
            raise CellfitError(
                f"weights file {path} is damaged ({exc}): give an intact .safetensors file "
                "or a PyTorch state dict (.pth)."
            ) from None
        except Exception:
            pass
    elif kind == "torch":
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            raise CellfitError(
                f"{path} could not be loaded as plain weights (it may contain code, which "
                "cellfit refuses to run): save the state dict with "
                "torch.save(model.state_dict(), ...) or as safetensors."
            ) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CellfitError(f"{path} does not hold a state dict: save model.state_dict().")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    elif kind in ("pickle", "old torch"):
        raise CellfitError(
            f"{path} is a pickle in an old format, which can run code when opened and which "
            "cellfit does not open: save the weights as safetensors or with a current "
            "torch.save(model.state_dict(), ...)."
        )
    raise CellfitError(
        f"{path} is not a safetensors weights file: give a .safetensors file "
        "or a PyTorch state dict (.pth)."
    )


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Load encoder weights from a local file into ``model.encoder``; returns tensors loaded.

    Keys may be the encoder's own (``conv1.weight``) or prefixed (``encoder.conv1.weight``).
    """
    path = Path(path)
    sd = _read_state_dict(path)
    enc = model.encoder  # type: ignore[attr-defined]
    own = enc.state_dict()
    cleaned = {}
    for k, v in sd.items():
        key = k[len("encoder.") :] if k.startswith("encoder.") else k
        if key in own and own[key].shape == v.shape:
            cleaned[key] = v
    if not cleaned:
        raise CellfitError(
            f"none of the weights in {path} fit the encoder: give weights saved from the same "
            "encoder (same name and number of input channels)."
        )
    enc.load_state_dict(cleaned, strict=False)
    return len(cleaned)


def _canonical_header(raw: bytes) -> bytes:
    """``raw`` (a safetensors file) with its JSON header written in a fixed order.

    safetensors keeps the header's metadata in a hash map whose order changes from call
    to call, so the same tensors and metadata would give different bytes (and a
    different file digest, which batch results are matched by). The tensor data and
    their offsets are untouched; the header stays padded to 8 bytes as safetensors
    writes it.
    """
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8")
    data += b" " * (-len(data) % 8)
    return struct.pack("<Q", len(data)) + data + raw[8 + n :]


def save_model(path: str | os.PathLike, model: nn.Module, info: ModelInfo) -> Path:
    """Write the model file atomically (temporary file, then rename).

    A write that fails (a full disk, a folder without write permission) raises a
    :class:`CellfitError` in one sentence and leaves an existing file as it was.

    The file is a function of the weights and ``info`` alone: saving the same model
    again writes the same bytes (batch results are matched by the file's digest).
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    raw = _canonical_header(save(state, metadata={"cellfit": info.to_json(), "format": "pt"}))
    del state
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    return path


def _write_error(path: Path, exc: OSError) -> CellfitError:
    """A full disk or a folder without write permission, in one sentence."""
    return CellfitError(
        f"could not save the model to {path} ({exc.strerror or exc}): check the free space "
        "and the write permission of its folder."
    )


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """Read only the header of a model file (fast; no tensors are loaded).

    The whole header is checked (see the module's notes): a file that is not a
    cellfit model, a pickle, a damaged or forged header, or a newer format raises a
    :class:`CellfitError` in one sentence.
    """
    path = _check_model_path(path)
    package = _find_package(path)
    try:
        return _model_info(_label(path, package), _model_header(path, package)[1])
    finally:
        if package is not None:
            package.close()


def _check_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CellfitError(f"model file {path} does not exist: check the path.")
    if path.is_dir():
        raise CellfitError(f"model {path} is a folder: give the model file itself.")
    return path


def _find_package(path: Path) -> PackagedModel | None:
    """The cellfit model in the bioimage.io package ``path`` (:mod:`cellfit.packages`),
    None when ``path`` is no zip archive (or a PyTorch one): a model file, or a file
    refused as one. A zip cellfit cannot use raises a :class:`CellfitError`."""
    try:
        if not path.is_file() or _file_kind(path) != "other":
            return None
        return find_packaged_model(path)
    except OSError:
        return None  # worded by _model_header, which reads the file again


def _label(path: Path, package: PackagedModel | None) -> Path | str:
    """How messages name the model: its file, or its attachment in a package."""
    return path if package is None else f"{package.name} in {path}"


def _model_header(
    path: Path, package: PackagedModel | None = None
) -> tuple[_Tensors, dict[str, str]]:
    """The checked header of the model file ``path`` (see :func:`_read_header`), or of
    the cellfit model in ``path``'s ``package``."""
    label = _label(path, package)
    try:
        if package is None:
            kind = _file_kind(path) if path.is_file() else "other"
            if kind != "safetensors":
                raise _not_a_model(path, kind)
            return _read_header(path)
        with package.open() as f:
            kind = _kind_of(f.read(256))
        if kind != "safetensors":
            raise _not_a_model(label, kind)
        with package.open() as f:
            return _header_of(f, package.size)
    except _Damaged as exc:
        raise CellfitError(
            f"model file {label} is damaged or forged ({exc}): get an intact copy, or retrain "
            "the model."
        ) from None
    except READ_ERRORS as exc:  # a file that cannot be read; a damaged zip
        raise CellfitError(
            f"could not read model file {label} ({getattr(exc, 'strerror', None) or exc}): "
            "check that it is readable."
        ) from None


def _model_info(path: Path | str, meta: dict[str, str]) -> ModelInfo:
    """The :class:`ModelInfo` in a model file's metadata ``meta``, checked."""
    if "cellfit" not in meta:
        raise CellfitError(
            f"{path} is a safetensors file but not a cellfit model: give a model saved by cellfit."
        )
    try:
        return _info_from_json(meta["cellfit"])
    except _Newer as exc:
        raise CellfitError(
            f"model file {path} was made by a newer cellfit (model format {exc.version}; this "
            f"cellfit reads format {FORMAT_VERSION}): update cellfit to open it."
        ) from None
    except _Damaged as exc:
        raise CellfitError(
            f"the header of model file {path} is damaged ({exc}): retrain or re-export the model."
        ) from None


def _not_a_model(path: Path | str, kind: str) -> CellfitError:
    if kind in ("torch", "old torch"):
        return CellfitError(
            f"{path} is a pickled PyTorch file, which can run code when opened; cellfit only "
            "loads its own model files (safetensors): train or export a cellfit model."
        )
    if kind == "pickle":
        return CellfitError(
            f"{path} is a pickled Python file, which can run code when opened; cellfit only "
            "loads its own model files (safetensors): train or export a cellfit model."
        )
    return CellfitError(f"{path} is not a cellfit model file: give a model saved by cellfit.")


def _mismatch(path: Path | str, problem: str) -> CellfitError:
    return CellfitError(
        f"the weights in {path} do not match the network it describes ({problem}): retrain "
        "or re-export the model."
    )


def _network_for(path: Path | str, info: ModelInfo, tensors: _Tensors) -> nn.Module:
    """The network ``info`` describes, without weights, once the file's tensors are
    known to be exactly its own.

    The network is first built on the ``meta`` device (no memory), so a file cannot
    make cellfit build a network bigger than the file; that network is then given
    memory on the CPU (its weights uninitialised: every one is loaded from the file).
    """
    import segmentation_models_pytorch  # noqa: F401 - imported outside the meta device

    try:
        with torch.device("meta"):
            model = build_model(info)
    except CellfitError:
        raise
    except Exception:  # pragma: no cover - an encoder that cannot be built on meta
        model = build_model(info)  # bounded by the ranges of ModelInfo's fields
    expected = model.state_dict()
    problem = _fit_problem(expected, tensors)
    if problem:
        raise _mismatch(path, problem)
    inner = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if inner <= set(expected):  # every tensor of the network is loaded from the file
        return model.to_empty(device="cpu")
    return build_model(info)  # pragma: no cover - a buffer the file does not hold


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelInfo]:
    """Load a model file; returns the network (in eval mode) and its :class:`ModelInfo`.

    The file is checked as :func:`read_model_info` does, and its tensors must be
    exactly those of the network the info describes (names, shapes, kinds of
    number) before any tensor is read.

    ``path`` may also be a bioimage.io package made by ``cellfit export``: the cellfit
    model it carries is read from the zip (:mod:`cellfit.packages`) and checked alike.
    """
    path = _check_model_path(path)
    package = _find_package(path)
    label = _label(path, package)
    try:
        tensors, meta = _model_header(path, package)
        info = _model_info(label, meta)
        model = _network_for(label, info, tensors)
        try:
            state = load_file(str(path)) if package is None else load(package.read())
        except CellfitError:
            raise
        except Exception:
            raise CellfitError(
                f"could not read the weights in model file {label}: get an intact copy, or "
                "retrain the model."
            ) from None
    finally:
        if package is not None:
            package.close()
    if {k: tuple(v.shape) for k, v in state.items()} != {k: s for k, (_, s) in tensors.items()}:
        raise _mismatch(label, "the file changed while it was read")
    try:
        model.load_state_dict(state)
    except Exception:
        raise _mismatch(label, "they cannot be loaded into it") from None
    model.to(device)
    model.eval()
    return model, info


def model_summary(info: ModelInfo) -> dict[str, Any]:
    """A short, human-readable summary of a model and its last training run."""
    last = info.training[-1] if info.training else {}
    return {
        "encoder": info.encoder,
        "mode": info.mode,
        "classes": info.class_names,
        "channels": info.in_channels,
        "training runs": len(info.training),
        "last run": {k: last.get(k) for k in ("date", "steps", "best_score", "validation")},
    }
