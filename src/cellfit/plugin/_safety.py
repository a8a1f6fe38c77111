"""Import the torch stack safely inside a running napari.

Importing triton (pulled in by torchvision, timm and segmentation-models-pytorch
through ``torch._dynamo``) after a napari viewer has created its OpenGL context
crashes the process under Mesa (its LLVM clashes with triton's). cellfit never needs
triton (no ``torch.compile``), so when a Qt application is already running and
triton is not loaded yet, this module makes ``import triton`` fail cleanly instead
(torch treats a missing triton as "not installed"), then imports the torch stack.

Importing this module is the first thing every plugin module that (directly or
through the engine) imports torch does: :mod:`cellfit.plugin.widgets`, the panels,
:mod:`cellfit.plugin.jobs`, :mod:`cellfit.plugin._state` and
:mod:`cellfit.plugin._layers`. It imports no Qt itself.
"""

from __future__ import annotations

import sys

__all__ = ["block_triton_in_gui", "triton_blocked"]

_QT_BINDINGS = ("PyQt6", "PyQt5", "PySide6", "PySide2")


def block_triton_in_gui() -> bool:
    """Make ``import triton`` fail if a Qt GUI is loaded and triton is not yet imported.

    Returns True when triton was blocked by this call or an earlier one.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if not any(name in sys.modules for name in _QT_BINDINGS):
        return False  # no GUI in this process: importing triton is safe
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def triton_blocked() -> bool:
    """Whether triton is blocked in this process (see the module docstring)."""
    return "triton" in sys.modules and sys.modules["triton"] is None


block_triton_in_gui()

# the torch stack, imported now (when the widget module is imported) rather than at
# the first press of Train, so the first training starts quickly
import segmentation_models_pytorch  # noqa: E402, F401
import torch  # noqa: E402, F401
import torchvision  # noqa: E402, F401
