"""Say in plain words which devices PyTorch sees and which one cellfit will use."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import torch

from cellfit.errors import CellfitError

__all__ = [
    "cuda_unavailable_reason",
    "describe_devices",
    "device_label",
    "is_out_of_memory",
    "resolve_device",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the named device."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CellfitError(
            "{setting} is cuda, but PyTorch sees no CUDA GPU: choose auto or cpu "
            "(run `cellfit devices` to see what PyTorch finds).",
            setting="device",
        )
    if name == "mps" and not _mps_available():
        raise CellfitError(
            "{setting} is mps, but this machine has no Apple GPU available: "
            "choose auto or cpu.",
            setting="device",
        )
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise CellfitError(f"unknown device {device!r}: use auto, cpu, cuda or mps.")
    return torch.device(name)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA, and MPS's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def device_label(device: str | torch.device | None = "auto") -> str:
    """One short phrase for a device, e.g. ``"CUDA: NVIDIA H100 (79 GB)"`` or ``"CPU only"``."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        idx = dev.index or 0
        props = torch.cuda.get_device_properties(idx)
        return f"CUDA: {props.name} ({props.total_memory / 1e9:.0f} GB)"
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU only ({torch.get_num_threads()} threads)"


def cuda_unavailable_reason() -> str | None:
    """Why PyTorch cannot use a CUDA GPU, in one sentence; None when it can.

    Tells apart a CPU-only PyTorch, GPUs hidden by ``CUDA_VISIBLE_DEVICES``, a missing
    or too old NVIDIA driver (PyTorch's own words), and a machine without an NVIDIA GPU.
    """
    if not torch.version.cuda:
        if getattr(torch.version, "hip", None):
            return (f"this PyTorch is built for AMD ROCm {torch.version.hip}, not CUDA, and "
                    "sees no usable AMD GPU")
        return ("this PyTorch is a CPU-only build: install a CUDA build of PyTorch "
                "(see pytorch.org, 'Get started') to use an NVIDIA GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about a missing driver as well
        if torch.cuda.is_available():
            return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process: "
                "unset it to use one")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.init()
    except Exception as exc:  # PyTorch says what is missing (driver, GPU, version)
        text = " ".join(str(exc).split())
        low = text.lower()
        if "no nvidia driver" in low:
            return ("no NVIDIA driver was found: this machine has no NVIDIA GPU, or its "
                    "driver is not installed")
        if "too old" in low or "insufficient" in low:
            return f"the NVIDIA driver is too old for this PyTorch (CUDA {torch.version.cuda}): update the driver"
        return f"CUDA could not start: {text}"
    return "PyTorch finds no CUDA GPU on this machine"


def _driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None where it cannot be asked."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def describe_devices() -> str:
    """A few lines on what PyTorch sees, and why a GPU is or is not used."""
    lines = [f"PyTorch {torch.__version__}"]
    cuda_build = torch.version.cuda
    reason = cuda_unavailable_reason()
    if cuda_build:
        lines.append(f"CUDA build: yes (CUDA {cuda_build})")
        if reason is None:
            lines.append(f"  NVIDIA driver: {_driver_version() or 'working'}")
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"  GPU {i}: {p.name}, {p.total_memory / 1e9:.1f} GB, "
                             f"compute capability {p.major}.{p.minor}")
        else:
            lines.append(f"  no CUDA GPU is used: {reason}")
    else:
        lines.append("CUDA build: no")
        lines.append(f"  no CUDA GPU is used: {reason}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("Apple GPU (MPS): available")
    elif mps is not None and mps.is_built():
        lines.append("Apple GPU (MPS): not available (needs macOS 12.3 or later on a Mac "
                     "with an Apple or AMD GPU)")
    lines.append(f"cellfit will use: {device_label('auto')}")
    return "\n".join(lines)
