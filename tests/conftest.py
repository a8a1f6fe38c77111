"""Shared fixtures. The torch stack is imported before any napari viewer exists:
importing triton (via torchvision / torch._dynamo) after an OpenGL context is created
crashes under Mesa."""

from __future__ import annotations

import os

import numpy as np
import pytest
import segmentation_models_pytorch  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401
from hypothesis import settings

from cellfit.synthetic import sparse_annotation, synthetic_cells

# Property tests draw the same examples on every run (reproducible CI) and keep no example
# database; HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cells_image():
    """A 128x128 synthetic image with touching cells and its full instance labels."""
    return synthetic_cells((128, 128), n_cells=14, seed=3)


@pytest.fixture
def sparse_ann(cells_image):
    """A sparse annotation of ``cells_image``: 0 unannotated, 1 background, >= 2 cells."""
    _, labels = cells_image
    return sparse_annotation(labels, fraction=0.5, seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
