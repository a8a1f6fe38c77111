"""Sample images for napari's File > Open Sample (no Qt, no torch).

Each function returns a list of napari layer-data tuples ``(data, kwargs, "image")``.
"""

from __future__ import annotations

import numpy as np

from cellfit.data import nuclei_dsb2018, sample_path
from cellfit.synthetic import synthetic_cells

__all__ = ["nuclei_sample", "synthetic_sample", "synthetic_timelapse_sample"]

NUCLEI_SOURCE = (
    "2018 Data Science Bowl (BBBC038; Caicedo et al., Nature Methods 2019), as "
    "distributed with the stardist package"
)
NUCLEI_LICENCE = (
    "BSD 3-Clause, Copyright (c) 2018-2023 Uwe Schmidt, Martin Weigert; full text in "
    "cellfit/data/NOTICE.txt"
)


def nuclei_sample() -> list[tuple]:
    """A real fluorescence image of nuclei, 512 x 512, uint16 (DSB 2018, BSD-3-Clause)."""
    image, _truth = nuclei_dsb2018()
    meta = {
        "source": NUCLEI_SOURCE,
        "licence": NUCLEI_LICENCE,
        "notice_file": str(sample_path("NOTICE.txt")),
    }
    return [(image, {"name": "nuclei", "metadata": meta, "colormap": "gray"}, "image")]


def synthetic_sample() -> list[tuple]:
    """A synthetic 256 x 256 image of 30 touching "nuclei" (made on the fly)."""
    image, _ = synthetic_cells((256, 256), n_cells=30, radius=(7.0, 12.0), seed=7)
    meta = {"source": "cellfit.synthetic.synthetic_cells (generated, no licence needed)"}
    return [(image, {"name": "synthetic cells", "metadata": meta, "colormap": "gray"}, "image")]


def synthetic_timelapse_sample() -> list[tuple]:
    """A synthetic time series, 5 frames of 192 x 192 (to try stacks: annotate any frame)."""
    frames = [
        synthetic_cells((192, 192), n_cells=16, radius=(7.0, 11.0), seed=20 + t)[0]
        for t in range(5)
    ]
    meta = {"source": "cellfit.synthetic.synthetic_cells (generated, no licence needed)"}
    return [
        (np.stack(frames), {"name": "synthetic time series", "metadata": meta, "colormap": "gray"}, "image")
    ]
