"""The napari plugin of cellfit: thin dock widgets over the engine.

This package stays light: importing it pulls in neither Qt nor napari nor torch. The
modules are

``widgets``      the dock widget (Qt; imported by napari when the widget is opened)
``workers``      the background jobs behind it, plain generators without Qt
``sample_data``  File > Open Sample
``writers``      Save Layers: labels as compact TIFF
``napari.yaml``  the npe2 manifest
"""

__all__: list[str] = []
