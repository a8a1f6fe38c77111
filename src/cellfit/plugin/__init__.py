"""The napari plugin of cellfit: a thin dock over the engine.

This package stays light: importing it pulls in neither Qt nor napari nor torch. The
modules are

``widgets``      the dock, ``CellfitWidget``: image choice, the tabs, shared state
                 (Qt; imported by napari when the widget is opened)
``panels/``      one module per tab: ``annotate``, ``train``, ``segment``, ``model``
``_state``       the state the tabs share (chosen layers, the model in memory)
``_runner``      the job runner: the one ``thread_worker``, its busy signal
``jobs``         the background jobs, plain generators over engine calls, without Qt
``_layers``      napari layers and plane arithmetic of stacks
``_tooltips``    every label, choice and tooltip; ``LABELS`` words engine errors
``_display``     colours, the model record in words, software-OpenGL detection
``_plot``        the live loss / F1 / AP50 plot
``_safety``      imports the torch stack safely inside a running napari
``sample_data``  File > Open Sample
``writers``      Save Layers: labels as compact TIFF
``napari.yaml``  the npe2 manifest
"""

__all__: list[str] = []
