"""cellfit: train a U-Net++ from a few painted cells and segment whole folders of TIFFs.

The engine (this package) never imports Qt or napari; the napari plugin lives in
:mod:`cellfit.plugin` and only calls the engine.
"""

from cellfit.errors import CellfitError

__version__ = "0.1.0"
__all__ = ["CellfitError", "__version__"]
