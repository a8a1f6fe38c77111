"""Save a labels layer as a compact TIFF (napari's own writer always widens to 32 bits).

The file holds the smallest unsigned integer type that fits the labels, is compressed,
and is written atomically; ``cellfit train`` reads it as an annotation or label image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellfit.io import atomic_write_tiff
from cellfit.outputs import label_dtype

__all__ = ["write_labels_tiff"]


def write_labels_tiff(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer: write ``data`` (a labels array) to ``path`` as TIFF.

    Returns the list of written paths (empty when the data cannot be written as labels).
    """
    arr = np.asarray(data[0] if attributes.get("multiscale") else data)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        return []
    if arr.size and int(arr.min()) < 0:
        return []  # negative labels: leave it to napari's own writer
    out = Path(path)
    if out.suffix.lower() not in (".tif", ".tiff"):
        out = out.with_name(out.name + ".tif")
    top = int(arr.max()) if arr.size else 0
    atomic_write_tiff(out, arr.astype(label_dtype(top), copy=False))
    return [str(out)]
