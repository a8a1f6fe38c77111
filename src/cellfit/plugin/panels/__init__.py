"""The tabs of the dock, one module each: each panel is a QWidget that builds its own
controls, handles them, and enables or disables them when the job runner starts or
ends a job (:class:`~cellfit.plugin.panels._base.Panel`).

``annotate``  1 Annotate: the annotation layer, brushes, counts, copying a prediction
``train``     2 Train: training settings, Train / Stop, the live preview and plot
``segment``   3 Segment: the selected image, a folder of TIFFs, the cell diameter
``measure``   4 Measure: per-cell measurements of a labels layer (table, features, CSV)
``model``     Model: save, load, the starting model, the model's record
``suggest``   not a tab: the Annotate tab's "Where to paint next" box (uncertainty,
              numbered boxes to paint, the least sure cells to accept)
``classes``   not a tab: the class list of semantic mode (names, colours, IoU), shown
              above the tabs as the legend
"""

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from cellfit.plugin.panels.annotate import AnnotatePanel
from cellfit.plugin.panels.classes import ClassesPanel
from cellfit.plugin.panels.measure import MeasurePanel
from cellfit.plugin.panels.model import ModelPanel
from cellfit.plugin.panels.segment import SegmentPanel
from cellfit.plugin.panels.train import TrainPanel

__all__ = [
    "AnnotatePanel",
    "ClassesPanel",
    "MeasurePanel",
    "ModelPanel",
    "SegmentPanel",
    "TrainPanel",
]
