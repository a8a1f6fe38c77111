"""Build the U-Net++ and save / load the one-file model format.

A model file is a safetensors file: tensors plus a JSON header. Loading it cannot
execute code (unlike a pickled PyTorch checkpoint, which cellfit refuses to open).
The header's ``cellfit`` entry holds a :class:`ModelInfo` as JSON: architecture,
encoder, channels, mode, class names, normalisation and the training record.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

import cellfit
from cellfit.errors import CellfitError
from cellfit.normalize import DEFAULT_NORMALIZATION

__all__ = [
    "DEFAULT_DECODER_CHANNELS",
    "DEFAULT_ENCODER",
    "FORMAT_VERSION",
    "ModelInfo",
    "build_model",
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


@dataclass
class ModelInfo:
    """Everything needed to rebuild and use a model, stored in the model file."""

    encoder: str = DEFAULT_ENCODER
    in_channels: int = 1
    n_classes: int = 3
    mode: str = "instances"
    class_names: list[str] = field(default_factory=lambda: ["background", "cell", "boundary"])
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

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    head = path.read_bytes()[:8] if path.exists() else b""
    if not path.exists():
        raise CellfitError(f"weights file {path} does not exist: check the path.")
    if path.suffix == ".safetensors" or not (head.startswith(b"PK") or head[:1] == b"\x80"):
        try:
            return load_file(str(path))
        except Exception:
            raise CellfitError(
                f"{path} is not a safetensors weights file: give a .safetensors file "
                "or a PyTorch state dict (.pth)."
            ) from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise CellfitError(
            f"{path} could not be loaded as plain weights (it may contain code, which cellfit "
            "refuses to run): save the state dict with torch.save(model.state_dict(), ...) or as safetensors."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CellfitError(f"{path} does not hold a state dict: save model.state_dict().")
    return sd


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
    """Read only the header of a model file (fast; no tensors are loaded)."""
    path = _check_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        raise _not_a_model(path) from None
    if "cellfit" not in meta:
        raise CellfitError(
            f"{path} is a safetensors file but not a cellfit model: give a model saved by cellfit."
        )
    try:
        return ModelInfo.from_json(meta["cellfit"])
    except (ValueError, TypeError, AttributeError):
        raise CellfitError(
            f"the header of model file {path} is damaged: retrain or re-export the model."
        ) from None


def _check_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CellfitError(f"model file {path} does not exist: check the path.")
    if path.is_dir():
        raise CellfitError(f"model {path} is a folder: give the model file itself.")
    return path


def _not_a_model(path: Path) -> CellfitError:
    head = path.read_bytes()[:4]
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return CellfitError(
            f"{path} is a pickled PyTorch file, which can run code when opened; cellfit only "
            "loads its own model files (safetensors): train or export a cellfit model."
        )
    return CellfitError(f"{path} is not a cellfit model file: give a model saved by cellfit.")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model file; returns the network (in eval mode) and its :class:`ModelInfo`."""
    info = read_model_info(path)
    model = build_model(info)
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except Exception:
        raise CellfitError(
            f"the weights in {path} do not match the network it describes (file damaged or "
            "from another version): retrain or re-export the model."
        ) from None
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
