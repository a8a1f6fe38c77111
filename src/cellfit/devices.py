"""Say in plain words which devices PyTorch sees and which one cellfit will use."""

from __future__ import annotations

import torch

__all__ = ["describe_devices", "device_label"]


def device_label(device: str | torch.device | None = "auto") -> str:
    """One short phrase for a device, e.g. ``"CUDA: NVIDIA H100 (79 GB)"`` or ``"CPU only"``."""
    from cellfit.predict import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        idx = dev.index or 0
        props = torch.cuda.get_device_properties(idx)
        return f"CUDA: {props.name} ({props.total_memory / 1e9:.0f} GB)"
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU only ({torch.get_num_threads()} threads)"


def describe_devices() -> str:
    """A few lines on what PyTorch sees, and why a GPU is or is not used."""
    lines = [f"PyTorch {torch.__version__}"]
    cuda_build = torch.version.cuda
    if cuda_build:
        lines.append(f"CUDA build: yes (CUDA {cuda_build})")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"  GPU {i}: {p.name}, {p.total_memory / 1e9:.1f} GB, "
                             f"compute capability {p.major}.{p.minor}")
        else:
            lines.append("  no CUDA GPU is usable: no NVIDIA driver or no GPU on this machine")
    else:
        lines.append("CUDA build: no (this PyTorch is CPU-only; install a CUDA build to use a GPU)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("Apple GPU (MPS): available")
    lines.append(f"cellfit will use: {device_label('auto')}")
    return "\n".join(lines)
