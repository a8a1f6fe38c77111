"""Models that travel: ``cellfit export`` to ONNX and to a bioimage.io model package.

**ONNX** (``--format onnx``): the network with a softmax on top, so its output is the
class probabilities cellfit post-processes (not logits).

- input ``input``: float32 ``(N, C, H, W)``, the image *as the network sees it*:
  each channel normalised as the model says (percentile normalisation: the ``low``
  percentile of each channel of each image mapped to 0, the ``high`` one to 1), and
  the image resized by ``ModelInfo.scale``. N, H and W are dynamic; H and W must be
  multiples of :data:`SIZE_STEP` (32: the encoder halves the image five times).
- output ``probabilities``: float32 ``(N, n_classes, H, W)``, the softmax over the
  classes (``ModelInfo.class_names``).
- ``metadata_props``: ``cellfit`` (the whole :class:`~cellfit.model.ModelInfo` as
  JSON: normalisation, scale, classes, post-processing, training record) and plain
  words for ``input``, ``output`` and ``postprocessing``.

The exported file is run with onnxruntime on a random tile and compared with
PyTorch before it is written (:data:`ONNX_TOLERANCE`).

**bioimage.io model package** (``--format bioimageio``, a ``.zip``, model description
format 0.5, validated with the ``bioimageio.spec`` library before it is written):
``rdf.yaml``; ONNX and TorchScript weights (the same network and softmax); a test
input (raw intensities, at the model's scale) and the output the network gives for it
(``.npy``); a cover image made from them; ``README.md`` with the training record and
the data licences; and the ``.cellfit`` model itself as an attachment, which
``cellfit predict PACKAGE.zip`` and the dock use (:mod:`cellfit.packages`). The
normalisation is the spec's ``scale_range`` preprocessing (per image and channel,
the model's percentiles). The resizing by ``scale`` and cellfit's post-processing
(seeded watershed into instance labels) are not expressible in the spec: the README
and the description say so.

Both formats need optional packages (``pip install 'napari-cellfit[export]'``); they
are imported here, inside functions, never at the top. Nothing is downloaded: the
package's citations are DOIs, so validating it touches no network. Outputs are
written atomically (a temporary file, then a rename); an existing one is replaced
only when asked.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import time
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
import torch
from torch import nn

import cellfit
from cellfit.errors import CellfitError
from cellfit.io import read_image
from cellfit.model import STRIDE, ModelInfo, load_model
from cellfit.normalize import match_channels, normalize, resize_plane, scaled_shape
from cellfit.packages import MODEL_SUFFIX, find_packaged_model
from cellfit.postprocess import DEFAULT_MIN_SIZE
from cellfit.synthetic import scene

__all__ = [
    "FORMATS",
    "MIN_SIZE",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "PACKAGE_FILES",
    "SIZE_STEP",
    "Probabilities",
    "export_bioimageio",
    "export_model",
    "export_onnx",
    "missing_packages",
    "onnx_bytes",
]

FORMATS = ("onnx", "bioimageio")
#: the ONNX operator set written (the legacy TorchScript-based exporter)
ONNX_OPSET = 17
#: height and width of an input must be multiples of this
SIZE_STEP = STRIDE
#: smallest height and width a package declares (the output keeps a halo of
#: :data:`HALO` pixels on each side)
MIN_SIZE = 3 * STRIDE
#: pixels on each side of a tile's output that a tool tiling an image should drop
HALO = STRIDE
#: largest difference allowed between the exported network's probabilities and PyTorch's
ONNX_TOLERANCE = 1e-4
#: the files of a package besides the model attachment, in the order they are written
PACKAGE_FILES = (
    "rdf.yaml",
    "README.md",
    "cover.png",
    "test_input.npy",
    "test_output.npy",
    "sample_input.tif",
    "sample_output.tif",
    "weights.onnx",
    "weights_torchscript.pt",
)
#: side of the test input cellfit makes when not given a sample image
TEST_SIZE = 256
#: the package's default licence: cellfit's own, under which its starting model ships
DEFAULT_LICENSE = "BSD-3-Clause"
DEFAULT_AUTHOR = "cellfit user (no author given at export)"

#: the Python packages each format needs: (module, pip name)
_NEEDS = {
    "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "bioimageio": (
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("bioimageio.spec", "bioimageio.spec"),
    ),
}
#: citations: DOIs only (a URL would be looked up by the validator, on the network)
_CITE_UNETPP = {
    "text": "Zhou Z, Siddiquee MMR, Tajbakhsh N, Liang J. UNet++: A Nested U-Net "
    "Architecture for Medical Image Segmentation. DLMIA 2018.",
    "doi": "10.1007/978-3-030-00889-5_1",
}
_CITE_DSB2018 = {
    "text": "Caicedo JC et al. Nucleus segmentation across imaging experiments: the 2018 "
    "Data Science Bowl. Nature Methods 16, 1247-1253 (2019).",
    "doi": "10.1038/s41592-019-0612-7",
}


class Probabilities(nn.Module):
    """A cellfit network with the softmax over its classes on top: what is exported."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)


# ------------------------------------------------------------------- dependencies
def missing_packages(format: str) -> list[str]:
    """The pip names of the packages ``format`` needs that cannot be imported."""
    missing = []
    for module, name in _NEEDS[format]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    return missing


def _require(format: str) -> None:
    missing = missing_packages(format)
    if missing:
        what = "ONNX" if format == "onnx" else "a bioimage.io package"
        raise CellfitError(
            f"exporting to {what} needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: run "
            f"pip install 'napari-cellfit[export]' (or pip install {' '.join(missing)})."
        )


# ------------------------------------------------------------------------ writing
def _check_out(out: Path, format: str, overwrite: bool) -> Path:
    out = Path(out)
    example = "model.onnx" if format == "onnx" else "model.zip"
    if out.is_dir():
        raise CellfitError(
            f"{out} is a folder: give {{setting}} a file name such as {out / example}.",
            setting="out",
        )
    if format == "bioimageio" and out.suffix.lower() != ".zip":
        raise CellfitError(
            f"a bioimage.io package is a .zip file, and {out.name} does not end in .zip: "
            f"give {{setting}} a name such as {out.with_suffix('.zip').name}.",
            setting="out",
        )
    if out.exists() and not overwrite:
        raise CellfitError(
            f"{out} already exists: set {{setting}} to replace it, or choose another name.",
            setting="overwrite",
        )
    return out


def _write_atomic(out: Path, data: bytes | None = None, writer=None) -> Path:
    """Write ``data`` (or let ``writer(tmp)`` write) under a temporary name next to
    ``out``, then rename it to ``out``: ``out`` is never half-written, and an older
    ``out`` stays as it was when writing fails."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if writer is not None:
            writer(tmp)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CellfitError(
                f"could not write {out} ({exc.strerror or exc}): check the free space and "
                "the write permission of its folder."
            ) from None
        raise
    return out


# --------------------------------------------------------------------------- ONNX
def _describe_input(info: ModelInfo) -> str:
    norm = info.normalization
    if norm.get("method", "percentile") == "percentile":
        how = (
            f"each channel of each image normalised: its {norm['low']:g} percentile mapped "
            f"to 0 and its {norm['high']:g} percentile to 1, (x - p_low) / (p_high - p_low)"
        )
    else:
        how = "raw intensities, not normalised"
    size = ""
    if abs(info.scale - 1.0) > 1e-6:
        size = f"; the image resized by {info.scale:g} first (cellfit's scale)"
    elif info.cell_diameter and not info.diameter:
        size = (
            f"; the image resized first so that cells are about {info.cell_diameter:g} "
            "pixels across"
        )
    return (
        f"float32 (batch, {info.in_channels} channel(s), height, width), height and width "
        f"multiples of {SIZE_STEP}: {how}{size}"
    )


def _describe_output(info: ModelInfo) -> str:
    return (
        f"float32 (batch, {info.n_classes}, height, width): softmax probabilities of the "
        f"classes {', '.join(info.class_names)} (probabilities, not logits)"
    )


def _describe_postprocessing(info: ModelInfo) -> str:
    if info.mode == "instances":
        pp = info.postprocess
        return (
            "instance labels by cellfit's seeded watershed "
            "(cellfit.postprocess.instances_from_probs): a pixel is cell where "
            f"1 - p(background) > {pp.get('fg_threshold', 0.5):g}, seeds where "
            f"p(cell) > {pp.get('seed_threshold', 0.5):g}, objects under "
            f"{pp.get('min_size', DEFAULT_MIN_SIZE)} pixels dropped"
            + (
                f", merged convex cells over {pp['split_area']:g} pixels split"
                if pp.get("split_area")
                else ""
            )
        )
    return "class labels: the most probable class of each pixel (argmax over the channels)"


def _export_network(model: nn.Module) -> nn.Module:
    return Probabilities(model).to("cpu").float().eval()


def onnx_bytes(model: nn.Module, info: ModelInfo) -> bytes:
    """The ONNX model of ``model`` with its softmax (see the module's notes), with
    ``info`` in its metadata, checked against PyTorch with onnxruntime."""
    import onnx

    net = _export_network(model)
    example = torch.zeros((1, info.in_channels, 2 * STRIDE, 2 * STRIDE))
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter warns that it is legacy; the result is checked below
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": axes, "probabilities": axes},
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(
        proto,
        {
            "cellfit": info.to_json(),
            "cellfit_version": cellfit.__version__,
            "input": _describe_input(info),
            "output": _describe_output(info),
            "postprocessing": _describe_postprocessing(info),
        },
    )
    proto.doc_string = (
        f"cellfit U-Net++ ({info.encoder}), {info.mode} mode. Input: {_describe_input(info)}. "
        f"Output: {_describe_output(info)}."
    )
    data = proto.SerializeToString()
    _check_onnx(data, net, info)
    return data


def _check_onnx(data: bytes, net: nn.Module, info: ModelInfo) -> None:
    """Run the ONNX model on a random tile with onnxruntime (CPU) and compare it with
    PyTorch: an export that does not reproduce the network is not written."""
    import onnxruntime

    rng = np.random.default_rng(0)
    x = rng.random((2, info.in_channels, 3 * STRIDE, 4 * STRIDE), dtype=np.float32)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"input": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    diff = float(np.max(np.abs(got - want)))
    if got.shape != want.shape or not diff <= ONNX_TOLERANCE:
        raise CellfitError(
            f"the ONNX export does not reproduce the network (largest difference {diff:.2g}, "
            f"more than {ONNX_TOLERANCE:g}): this is a bug in cellfit or in the exporter of "
            f"torch {torch.__version__}; please report it."
        )


def _torchscript_bytes(model: nn.Module, info: ModelInfo) -> bytes:
    """The network with its softmax, traced to TorchScript (sizes stay free: the U-Net++
    has no size-dependent branch), checked against PyTorch on another size."""
    net = _export_network(model)
    example = torch.zeros((1, info.in_channels, 2 * STRIDE, 2 * STRIDE))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, still what tools load
        traced = torch.jit.trace(net, example)
    x = torch.rand(
        (2, info.in_channels, 3 * STRIDE, 4 * STRIDE), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = float((traced(x) - net(x)).abs().max())
    if not diff <= ONNX_TOLERANCE:
        raise CellfitError(
            f"the TorchScript export does not reproduce the network (largest difference "
            f"{diff:.2g}): this is a bug in cellfit; please report it."
        )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save is deprecated too
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def export_onnx(
    model_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the model ``model_path`` (a model file or a package cellfit exported) as
    an ONNX file ``out``; returns ``out``.

    Raises
    ------
    CellfitError
        onnx / onnxruntime missing, ``out`` exists without ``overwrite`` (or is a
        folder), the model cannot be read, or the export does not reproduce it.
    """
    out = _check_out(Path(out), "onnx", overwrite)
    _require("onnx")
    model, info = load_model(model_path, "cpu")
    return _write_atomic(out, onnx_bytes(model, info))


# --------------------------------------------------------------------- bioimage.io
def _cell_size(info: ModelInfo) -> float:
    """The cell diameter, in model pixels, the network is used at."""
    if info.cell_diameter:
        return float(info.cell_diameter)
    if info.diameter:
        return float(info.diameter) * info.scale
    for record in reversed(info.training):
        d = (record.get("annotation") or {}).get("median_cell_diameter")
        if d:
            return float(d) * info.scale
    return 30.0


def _fit(planes: np.ndarray, what: str) -> np.ndarray:
    """The centre of a ``(1, C, Y, X)`` image, at most :data:`TEST_SIZE` a side, cut to
    multiples of :data:`SIZE_STEP`."""
    h, w = planes.shape[-2:]
    th, tw = (min(TEST_SIZE, s) // SIZE_STEP * SIZE_STEP for s in (h, w))
    if th < MIN_SIZE or tw < MIN_SIZE:
        raise CellfitError(
            f"{what} is {h}x{w} pixels at the model's scale, smaller than the {MIN_SIZE}x{MIN_SIZE} "
            "a package's test image needs: give a larger sample image."
        )
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return np.ascontiguousarray(planes[..., y0 : y0 + th, x0 : x0 + tw])


def _test_input(info: ModelInfo, sample: str | os.PathLike | None) -> np.ndarray:
    """The package's test input, ``(1, C, Y, X)`` float32 raw intensities at the model's
    scale: the first plane of ``sample``, or a synthetic scene with cells of the model's
    size."""
    if sample is not None:
        stack = read_image(sample)
        plane = match_channels(stack.data[:1], info.in_channels)[0].astype(np.float32)
        shape = scaled_shape(plane.shape[-2:], info.scale)
        plane = resize_plane(plane, shape)
        return _fit(plane[None], f"sample image {sample}")
    kind = "fluo_nuclei" if info.in_channels == 1 else "he"
    image, _labels, _kind = scene(kind, (TEST_SIZE, TEST_SIZE), _cell_size(info), seed=0)
    planes = image[None, None] if image.ndim == 2 else np.moveaxis(image, -1, 0)[None]
    planes = match_channels(planes.astype(np.float32), info.in_channels)
    return _fit(planes, "the synthetic test image")


def _cover_png(norm: np.ndarray, probs: np.ndarray) -> bytes:
    """A 2:1 PNG: the normalised test input beside the probabilities as colours
    (background black, the classes in a palette)."""
    img = np.clip(norm[0], 0, 1)
    left = np.repeat(img[:1], 3, axis=0) if img.shape[0] != 3 else img
    palette = np.array(
        [
            [0, 0, 0],
            [0.1, 0.9, 0.2],
            [1.0, 0.2, 0.8],
            [0.2, 0.5, 1.0],
            [1.0, 0.8, 0.1],
            [0.9, 0.3, 0.1],
            [0.3, 0.9, 0.9],
            [0.7, 0.7, 0.7],
        ],
        dtype=np.float32,
    )
    k = probs.shape[1]
    colours = palette[np.arange(k) % len(palette)]
    colours[0] = 0
    right = np.einsum("kyx,kc->cyx", probs[0], colours)
    both = np.concatenate([left, np.clip(right, 0, 1)], axis=2)
    rgb = (np.moveaxis(both, 0, -1) * 255 + 0.5).astype(np.uint8)
    return iio.imwrite("<bytes>", rgb, extension=".png")


def _npy(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=False)
    return buffer.getvalue()


def _tif(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, arr, photometric="minisblack")  # (channels, y, x), never RGB
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _package_name(out: Path) -> str:
    """The package's name, from its file name, as the spec accepts it (letters, digits,
    ``_+- ()``, 5 to 64 characters)."""
    stem = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", out.name.split(".")[0]).strip("- ")
    return f"cellfit {stem or 'model'}"[:64]


def _data_sources(info: ModelInfo) -> list[tuple[str, str]]:
    """The data each training run names, with its licence, each once; runs that name
    none trained on images the user painted."""
    seen: dict[str, str] = {}
    for record in info.training:
        items = record.get("data") or [
            {"name": "images annotated by the user in cellfit", "licence": "not recorded"}
        ]
        for item in items:
            name = str(item.get("name", "unnamed data"))
            if item.get("source"):
                name += f" (source: {item['source']})"
            seen.setdefault(name, str(item.get("licence", "not recorded")))
    return list(seen.items())


def _cites(info: ModelInfo) -> list[dict]:
    cites = [_CITE_UNETPP]
    text = json.dumps(info.training)
    if "BBBC038" in text or "DSB2018" in text:
        cites.append(_CITE_DSB2018)
    return cites


def _figures(validation: dict | None) -> str:
    names = {"precision": "precision", "recall": "recall", "f1": "F1", "ap50": "AP@0.5"}
    val = validation or {}
    return ", ".join(
        f"{names[n]} {val[n]:.3f}" for n in names if isinstance(val.get(n), (int, float))
    )


def _readme(
    info: ModelInfo, name: str, model_file: str, license: str, authors: Sequence[str]
) -> str:
    lines = [
        f"# {name}",
        "",
        f"A U-Net++ ({info.encoder} encoder) for {_task(info)}, trained with cellfit "
        f"(napari-cellfit) and exported with `cellfit export --format bioimageio` (cellfit "
        f"{cellfit.__version__}).",
        "",
        "## Input",
        "",
        f"- `raw`: {_describe_input(info)}.",
        "- The normalisation is the package's `scale_range` preprocessing (axes y and x, so "
        "per image and channel). cellfit itself takes the percentiles of a whole stack at "
        "once, and of a regular subsample (every k-th pixel) above 4 million pixels a channel.",
        f"- Scale: cellfit resizes images by {info.scale:g} before the network"
        + (f" (cells about {info.cell_diameter:g} pixels across)" if info.cell_diameter else "")
        + ". The bioimage.io description cannot express resizing: other tools must feed "
        "images at that scale.",
        f"- Height and width must be multiples of {SIZE_STEP}, at least {MIN_SIZE}; tools that "
        f"tile an image should drop {HALO} pixels of each tile's border (the output's halo).",
        "",
        "## Output",
        "",
        f"- `probabilities`: {_describe_output(info)}.",
        f"- Labels: {_describe_postprocessing(info)}. That step is cellfit's, not part of the "
        "bioimage.io description: other tools give the probabilities; "
        f"`cellfit predict {model_file.removesuffix(MODEL_SUFFIX)}.zip IMAGES --out DIR` gives the labels.",
        "",
        "## Training record",
        "",
        "| run | date | steps | seconds | device | cells annotated | purpose |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, rec in enumerate(info.training, 1):
        ann = rec.get("annotation") or {}
        lines.append(
            f"| {k} | {rec.get('date', '')} | {rec.get('steps', '')} | {rec.get('seconds', '')} | "
            f"{rec.get('device', '')} | {ann.get('cells', '')} | {rec.get('purpose', '') or ''} |"
        )
    if not info.training:
        lines.append("| - | no training run is recorded | | | | | |")
    lines += ["", "## Validation", ""]
    validated = False
    for k, rec in enumerate(info.training, 1):
        figs = _figures(rec.get("validation"))
        if figs:
            validated = True
            lines.append(f"- run {k}: {figs} on {rec.get('validated_on', 'held-back cells')}.")
    if not validated:
        lines.append("- No validation figures are recorded for this model.")
    lines += [
        "- To validate it on your data: predict images you have labelled by hand "
        "(`cellfit predict`) and compare (`cellfit evaluate PREDICTIONS TRUTH`).",
        "",
        "## Data and licences",
        "",
    ]
    for source, licence in _data_sources(info):
        lines.append(f"- {source}: licence {licence}")
    if not info.training:
        lines.append("- not recorded")
    lines += [
        "",
        "## Files",
        "",
        "- `weights.onnx`, `weights_torchscript.pt`: the network with the softmax (the same "
        "function; the ONNX weights were checked against PyTorch at export).",
        "- `test_input.npy`, `test_output.npy`: a test image (raw intensities) and the "
        "network's output for it; `cover.png` shows both.",
        f"- `{model_file}`: the cellfit model itself (safetensors, no code), which cellfit "
        "reads from this package: `cellfit predict`, `cellfit info`, the napari dock.",
        "",
        "## Licence and authors",
        "",
        f"- Licence of this package: {license} (chosen at export with `--license`; cellfit "
        f"and its starting model are {DEFAULT_LICENSE}). The licences of the training data "
        "are listed above.",
        f"- Authors: {', '.join(authors)}.",
        "- Built with segmentation_models_pytorch (U-Net++) and PyTorch; cite U-Net++ "
        "(Zhou et al., 2018).",
        "",
    ]
    return "\n".join(lines)


def _rdf(
    info: ModelInfo,
    name: str,
    files: dict[str, bytes],
    model_file: str,
    license: str,
    authors: Sequence[str],
    test_shape: tuple[int, ...],
) -> dict:
    from bioimageio.spec.model.v0_5 import ModelDescr

    def file(source: str) -> dict:
        return {"source": source, "sha256": _sha256(files[source])}

    norm = info.normalization
    preprocessing = []
    if norm.get("method", "percentile") == "percentile":
        preprocessing.append(
            {
                "id": "scale_range",
                "kwargs": {
                    "axes": ["y", "x"],
                    "min_percentile": float(norm["low"]),
                    "max_percentile": float(norm["high"]),
                },
            }
        )
    c = info.in_channels
    channels = (
        ["intensity"]
        if c == 1
        else ["red", "green", "blue"]
        if c == 3
        else [f"channel{i}" for i in range(c)]
    )

    def space() -> dict:  # a new dict each time: YAML would write a shared one as an alias
        return {"min": MIN_SIZE, "step": SIZE_STEP}

    summary = {k: v for k, v in asdict(info).items() if k != "training"}
    return {
        "type": "model",
        "format_version": ModelDescr.implemented_format_version,
        "name": name,
        "description": (
            f"U-Net++ ({info.encoder}) {_task(info)} model trained with cellfit: "
            f"outputs the softmax probabilities of {', '.join(info.class_names)}; "
            + (
                "cellfit turns them into instance labels (seeded watershed), which the "
                "description cannot express."
                if info.mode == "instances"
                else "the labels are the most probable class."
            )
        )[:1024],
        "authors": [{"name": a.replace("/", "-")} for a in authors],
        "cite": _cites(info),
        "license": license,
        "documentation": file("README.md"),
        "covers": [file("cover.png")],
        "attachments": [file(model_file)],
        "tags": [
            "cellfit",
            "unet++",
            "segmentation",
            "2d",
            "pytorch",
            "onnx",
            "torchscript",
            "cells",
            "instance-segmentation" if info.mode == "instances" else "semantic-segmentation",
        ],
        "inputs": [
            {
                "id": "raw",
                "description": "raw image, float32; normalised by the preprocessing",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": channels},
                    {"type": "space", "id": "y", "size": space()},
                    {"type": "space", "id": "x", "size": space()},
                ],
                "test_tensor": file("test_input.npy"),
                "sample_tensor": file("sample_input.tif"),
                "data": {"type": "float32"},
                "preprocessing": preprocessing,
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "description": "softmax probabilities of the classes",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": list(info.class_names)},
                    {
                        "type": "space",
                        "id": "y",
                        "halo": HALO,
                        "size": {"tensor_id": "raw", "axis_id": "y"},
                    },
                    {
                        "type": "space",
                        "id": "x",
                        "halo": HALO,
                        "size": {"tensor_id": "raw", "axis_id": "x"},
                    },
                ],
                "test_tensor": file("test_output.npy"),
                "sample_tensor": file("sample_output.tif"),
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }
        ],
        "weights": {
            "torchscript": {
                **file("weights_torchscript.pt"),
                "pytorch_version": torch.__version__.split("+")[0],
                "comment": "the cellfit network with a softmax, traced with torch.jit.trace",
            },
            "onnx": {
                **file("weights.onnx"),
                "opset_version": ONNX_OPSET,
                "parent": "torchscript",
                "comment": "the same network and softmax, exported with torch.onnx (legacy "
                "exporter) and checked against PyTorch with onnxruntime",
            },
        },
        "config": {
            "cellfit": {
                "model": model_file,
                "version": cellfit.__version__,
                "input": _describe_input(info),
                "postprocessing": _describe_postprocessing(info),
                "info": summary,
                "test_shape": list(test_shape),
            },
            "bioimageio": {
                "architecture_type": "U-Net++",
                "task": "segmentation",
                "model_parameter_count": None,
            },
        },
    }


def _check_license(license: str) -> str:
    """``license`` when the bioimage.io format knows it as an SPDX identifier."""
    from bioimageio.spec.generic.v0_3 import DeprecatedLicenseId, LicenseId

    for kind in (LicenseId, DeprecatedLicenseId):
        try:
            kind(license)
            return license
        except ValueError:  # pydantic's ValidationError is one
            pass
    raise CellfitError(
        f"{license!r} is not an SPDX licence identifier the bioimage.io format knows: set "
        "{setting} to one such as CC-BY-4.0, MIT or BSD-3-Clause.",
        setting="license",
    )


def _validate(path: Path) -> None:
    """Validate the package ``path`` with the spec library (its files, hashes and test
    tensors included; nothing is fetched: the package holds every file it names)."""
    from bioimageio.spec import InvalidDescr, load_description

    # from memory: the library keeps copies of a zip it reads, whose files it never
    # closes (ResourceWarnings later, wherever they are collected)
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as zf:
        descr = load_description(zf, perform_io_checks=True)
    if isinstance(descr, InvalidDescr) or descr.validation_summary.status == "failed":
        errors = descr.validation_summary.errors
        where = errors[0] if errors else None
        if where is not None and "license" in [str(p) for p in where.loc]:
            raise CellfitError(
                "the licence is not an SPDX identifier the bioimage.io format knows: set "
                "{setting} to one such as CC-BY-4.0, MIT or BSD-3-Clause.",
                setting="license",
            )
        what = f"{'.'.join(str(p) for p in where.loc)}: {where.msg}" if where else "no details"
        raise CellfitError(
            f"the bioimage.io package cellfit made does not validate ({what}): this is a bug "
            "in cellfit; please report it."
        )


def export_bioimageio(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    authors: Sequence[str] | None = None,
    license: str | None = None,
    sample: str | os.PathLike | None = None,
) -> Path:
    """Write the model ``model_path`` as a bioimage.io model package ``out`` (a .zip);
    returns ``out``. See the module's notes for what it holds.

    Parameters
    ----------
    authors : names, optional
        The package's authors (default :data:`DEFAULT_AUTHOR`).
    license : SPDX identifier, optional
        The package's licence (default :data:`DEFAULT_LICENSE`, cellfit's own).
    sample : path, optional
        A TIFF whose first plane (its centre, at the model's scale, at most
        :data:`TEST_SIZE` a side) becomes the test input; default a synthetic image.

    Raises
    ------
    CellfitError
        A package missing, ``out`` exists without ``overwrite`` (or does not end in
        .zip), the model or sample cannot be read, or the package does not validate.
    """
    out = _check_out(Path(out), "bioimageio", overwrite)
    _require("bioimageio")
    model_path = Path(model_path)
    license = _check_license(license or DEFAULT_LICENSE)
    model, info = load_model(model_path, "cpu")
    attachment = _model_file_bytes(model_path)
    authors = [a for a in (authors or []) if a.strip()] or [DEFAULT_AUTHOR]
    name = _package_name(out)
    model_file = out.name.removesuffix(".zip").removesuffix(".bioimageio") + MODEL_SUFFIX
    net = _export_network(model)
    raw = _test_input(info, sample)
    norm = normalize(raw, info.normalization)
    with torch.no_grad():
        probs = net(torch.from_numpy(np.ascontiguousarray(norm, dtype=np.float32))).numpy()
    files: dict[str, bytes] = {
        "README.md": _readme(info, name, model_file, license, authors).encode(),
        "cover.png": _cover_png(norm, probs),
        "test_input.npy": _npy(raw.astype(np.float32)),
        "test_output.npy": _npy(probs.astype(np.float32)),
        "sample_input.tif": _tif(raw[0].astype(np.float32)),
        "sample_output.tif": _tif(probs[0].astype(np.float32)),
        "weights.onnx": onnx_bytes(model, info),
        "weights_torchscript.pt": _torchscript_bytes(model, info),
        model_file: attachment,
    }
    rdf = _rdf(info, name, files, model_file, license, authors, raw.shape)
    rdf["config"]["bioimageio"]["model_parameter_count"] = sum(
        p.numel() for p in model.parameters()
    )
    files = {"rdf.yaml": _yaml(rdf), **files}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for file_name, data in files.items():  # rdf.yaml first
                item = zipfile.ZipInfo(file_name, date_time=_now())
                item.external_attr = 0o644 << 16  # readable by all once unpacked
                zf.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
        _validate(tmp)

    return _write_atomic(out, writer=write)


def _model_file_bytes(model_path: Path) -> bytes:
    """The ``.cellfit`` file of the model: the file itself, or the attachment of the
    package it was read from."""
    package = find_packaged_model(model_path)
    if package is None:
        return model_path.read_bytes()
    with package:
        return package.read()


def _now() -> tuple[int, int, int, int, int, int]:
    return time.localtime()[:6]


def _task(info: ModelInfo) -> str:
    return "cell instance segmentation" if info.mode == "instances" else "semantic segmentation"


def _yaml(content: dict) -> bytes:
    """``content`` as YAML, written by ruyaml (the YAML library of bioimageio.spec)."""
    from ruyaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 88
    buffer = io.StringIO()
    yaml.dump(content, buffer)
    return buffer.getvalue().encode()


def export_model(
    model_path: str | os.PathLike, out: str | os.PathLike, format: str, **kwargs
) -> Path:
    """:func:`export_onnx` (``format="onnx"``) or :func:`export_bioimageio`
    (``"bioimageio"``, which takes the keyword arguments)."""
    if format == "onnx":
        return export_onnx(model_path, out, **kwargs)
    if format == "bioimageio":
        return export_bioimageio(model_path, out, **kwargs)
    raise CellfitError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}.")
