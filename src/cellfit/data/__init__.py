"""Sample data shipped with cellfit (see NOTICE.txt for sources and licences)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["nuclei_dsb2018", "sample_path"]


def sample_path(name: str) -> Path:
    """Path of a file shipped in ``cellfit/data``."""
    return Path(str(files("cellfit.data").joinpath(name)))


def nuclei_dsb2018() -> tuple[np.ndarray, np.ndarray]:
    """The bundled real nuclei image (512x512 uint16) and its 125-nucleus instance mask."""
    return (
        tifffile.imread(sample_path("nuclei_dsb2018.tif")),
        tifffile.imread(sample_path("nuclei_dsb2018_mask.tif")),
    )
