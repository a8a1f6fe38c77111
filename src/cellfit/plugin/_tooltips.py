"""Every word the dock shows next to a control: row labels, choices and tooltips.

Kept in one place so the wording is consistent and can be reviewed (or translated)
without reading the panels' code. No Qt here.

:data:`LABELS` names the settings an engine error can be about (the keys of
:data:`cellfit.errors.SETTING_WORDS`) as the user sees them in the dock, so an engine
message such as "set {setting}" reads "set Cell diameter (Segment tab)" here and
"set --diameter PIXELS" on the command line (see :func:`cellfit.errors.worded`).
"""

from __future__ import annotations

__all__ = [
    "CHOICES",
    "COLUMN_TIPS",
    "LABELS",
    "NO_MODEL_LINE",
    "NO_MODEL_LINE_CLASSES",
    "ROWS",
    "TIPS",
    "TRAIN_BUTTON_TEXT",
    "WHY_OFF",
    "busy_reason",
    "column_tip",
    "off_tip",
    "train_button_tip",
]

#: the row labels of the forms (without the colon) and the texts of check boxes
ROWS: dict[str, str] = {
    "image": "Image",
    "annotation": "Annotation",
    "start": "Start from",
    "mode": "Segment",
    "classify": "Classes are",
    "encoder": "Model size",
    "budget": "Train for",
    "patch_size": "Patch size",
    "loss": "Loss",
    "class_weights": "Class weights",
    "device": "Device",
    "diameter": "Cell diameter",
    "slices": "Slices",
    "min_size": "Smallest cell",
    "inputs": "Images",
    "out": "Results to",
    "tta": "Average over flips and rotations (4–8× slower)",
    "labels_layer": "Cells",
    "measure_batch": "Also measure every cell (<name>_cells.csv)",
}

#: each setting an engine error can name (:data:`cellfit.errors.SETTING_WORDS`), as the
#: control that sets it is labelled here. Settings the dock has no control for (the tile
#: size and tile batch, the cluster scheduler, the encoder weights) keep the engine's
#: plain words.
LABELS: dict[str, str] = {
    "diameter": f"{ROWS['diameter']} (Segment tab)",
    "diameter_option": f"{ROWS['diameter']} (Segment tab)",
    "device": f"{ROWS['device']} (Train tab)",
    "encoder": f"{ROWS['encoder']} (Train tab)",
    "init": f"{ROWS['start']} (Train tab)",
    "labels": "the annotation layer (Annotate tab)",
    "mode": f"{ROWS['mode']} (Train tab)",
    "classify": f"{ROWS['classify']} (Train tab)",
    "out": f"{ROWS['out']} (Segment tab)",
    "patch_size": f"{ROWS['patch_size']} (Train tab)",
    "steps": f"{ROWS['budget']} (Train tab)",
    "time_limit": f"{ROWS['budget']} (Train tab)",
}

#: the items of the combo boxes: (value the engine takes, text shown)
CHOICES: dict[str, list[tuple[str, str]]] = {
    "loss": [
        ("focal+dice", "Focal + Dice"),
        ("ce+dice", "Cross-entropy + Dice"),
        ("focal+jaccard", "Focal + Jaccard"),
        ("focal+tversky", "Focal + Tversky"),
        ("focal", "Focal only"),
    ],
    "class_weights": [
        ("balanced", "Balanced"),
        ("none", "Equal"),
    ],
    "mode": [
        ("instances", "Cells"),
        ("semantic", "Classes"),
    ],
    "classify": [
        ("auto", "Automatic"),
        ("objects", "Kinds of object"),
        ("pixels", "Kinds of region"),
    ],
    "start": [
        ("starting", "starting model"),
        ("scratch", "scratch (random)"),
    ],
    "budget_unit": [("seconds", "seconds"), ("steps", "steps")],
    "slices": [("all", "All slices"), ("current", "Current slice only")],
}

TIPS: dict[str, str] = {
    # the dock
    "image": "The image to annotate, train on, preview and segment (2D, 3D stack or time series).",
    # Annotate
    "create": (
        "Add an empty Labels layer for the selected image, ready to paint: "
        "0 = not annotated (ignored), 1 = background, 2, 3, … = one id per cell."
    ),
    "annotation": (
        "The Labels layer that holds your painting for this image. Only layers with "
        "the image's size are listed."
    ),
    "background": (
        "Paint background (label 1): around and between cells, and on empty areas. "
        "A few strokes are enough."
    ),
    "new_cell": (
        "Pick the next free id and paint one whole cell with it. Press again for the next cell."
    ),
    "eraser": "Erase back to 'not annotated' (0).",
    "new_class": (
        "Pick the next free value and paint a new class with it (Classes mode). To paint "
        "a class already listed, click it in the class list."
    ),
    "classes": (
        "Classes mode: one row per painted value (1 background, 2 the first class, …). "
        "Click a row to paint that class and to show its probability on the '… class "
        "probability' layer; double-click a name to rename it, a colour square to change "
        "it. The names and colours are kept with the model; IoU is each class's score on "
        "the held-back painting (1 is perfect)."
    ),
    "add_class": "Add a class at the end of the list and paint with it.",
    "counts": "Updated as you paint. Training uses every annotated slice.",
    "ring": (
        "Marks the predicted background in a 2-pixel ring around each copied cell as "
        "background (1), so the cell's edge is learned too."
    ),
    "copy": (
        "Copy the predicted cells of the current slice into the annotation, each with a "
        "new id. Cells you already painted and painted pixels are never overwritten. "
        "Undo with Ctrl+Z on the annotation layer."
    ),
    "suggest": (
        "Look at the slice on screen with the current model (with flips and rotations, "
        "a few seconds) and show where it is unsure: the '<image> uncertainty' layer "
        "(bright: unsure), numbered boxes worth painting next ('<image> suggestions'), "
        "and the predicted cells it is least sure of. Nothing is painted for you."
    ),
    "suggest_cancel": "Stop looking for where to paint.",
    "region_prev": "Go back to the previous suggested box.",
    "region_next": "Go to the next suggested box (the view moves there).",
    "cell_prev": "Go back to the previous cell.",
    "cell_next": "Show the next cell the model is unsure of (the view moves there).",
    "accept_cell": (
        "The predicted cell looks right: add it to your annotation as a new cell (in "
        "Classes mode, as its class). Painted pixels are never overwritten; undo with "
        "Ctrl+Z on the annotation layer."
    ),
    "skip_cell": "Leave this cell as it is (fix it by hand if it is wrong) and show the next one.",
    # Train
    "start": (
        "What a new model starts from. The cellfit starting model has already seen many kinds "
        "of cells (fluorescent nuclei and cells, brightfield, stained tissue), so a handful of "
        "painted cells is enough to adapt it to yours; it takes grayscale or colour (RGB) "
        "images and segments cells. Scratch starts from random weights and needs more "
        "painting and more training."
    ),
    "start_fine_tune": (
        "Train fine-tunes the current model; tick Train a new model to start another."
    ),
    "mode": (
        "Cells (instances): every cell gets its own label (touching cells are separated). "
        "Classes (semantic): each painted value 2, 3, … is a kind of structure."
    ),
    "classify": (
        "Kinds of object (cell types, dividing or not, alive or dead): each object found "
        "takes one class, that of the painted object it looks most like (shape, size, "
        "brightness, texture); paint a few objects of each class whole. Kinds of region "
        "(tissue types): each pixel takes its likeliest class. Automatic: decided from "
        "your painting, by object when most painted pieces are whole objects."
    ),
    "encoder": (
        "The size of the network. Small is fast on a laptop CPU; larger ones can be "
        "more accurate given a GPU and more annotation."
    ),
    "encoder_fine_tune": (
        "Fine-tuning keeps the current model's size; tick Train a new model to change it."
    ),
    "encoder_starting": (
        "The starting model has its own size (small and fast); choose Start from: "
        "scratch to pick another."
    ),
    "budget": "How long to train. Stop ends it earlier at any time.",
    "budget_unit": (
        "Train for a time (recommended) or a number of steps (one step = one batch of patches)."
    ),
    "patch_size": (
        "The size of the image pieces the model learns from. Use at least a few cell "
        "diameters; smaller is faster on a CPU."
    ),
    "loss": (
        "Focal + Dice (recommended) copes with few cell pixels among much background; keep "
        "it unless you have a reason."
    ),
    "class_weights": (
        "Balanced (recommended) gives rare classes (cells, their boundaries) more weight, "
        "so the model does not learn to call everything background."
    ),
    "device": (
        "Where to train and segment. Auto uses a CUDA or Apple GPU when PyTorch "
        "finds one, else the CPU. On the CPU, training leaves one core free so napari "
        "stays responsive."
    ),
    # formatted with the seconds between previews
    "preview": (
        "Every few seconds (~{seconds:.0f} s), show the prediction for the slice "
        "on screen in the '<image> probability' and '<image> labels' layers."
    ),
    "fresh": (
        "Unticked, Train continues training (fine-tunes) the current model on your "
        "updated annotation. Ticked, a new model is trained, starting from what "
        "Start from says; save the current model first if you want to keep it."
    ),
    "stop": "Stop after the current step; the best model so far is kept.",
    # Segment
    "use_starting": (
        "Segment without training: use the cellfit starting model, which has seen many "
        "kinds of cells. Give the size of your cells below (or let it be estimated). "
        "If it misses cells, paint a few and Train: it adapts to your images."
    ),
    "diameter": (
        "How many pixels across a typical cell is in your images. This model works on "
        "cells of any size but must be told theirs; measure one with napari's ruler, "
        "or press Estimate. Not needed once the model is trained on your painted cells."
    ),
    "estimate": (
        "Estimate the cell diameter from the slice on screen (a few seconds). Check "
        "the result by segmenting; change it if cells come out split or merged."
    ),
    "slices": "For a stack or time series: segment every slice, or only the one on screen.",
    "tta": (
        "Segment the image and its flipped and rotated copies and average the results "
        "(test-time augmentation): a little more accurate, 4 to 8 times slower. Used by "
        "Segment image and Segment folder; the live preview while training never uses it."
    ),
    "min_size": (
        "Objects smaller than this are dropped (debris, noise). Automatic: a quarter of "
        "the typical size of the cells you annotated, as learned with the model."
    ),
    "predict": (
        "Adds (or updates) the layers '<image> probability' (0–1, how likely each pixel "
        "is part of a cell) and '<image> labels' (one id per cell)."
    ),
    "inputs": "The folder of .tif / .tiff images to segment.",
    "out": (
        "Where to write <name>_labels.tif (and <name>_prob.tif). Must not be the "
        "image folder: inputs are never overwritten."
    ),
    "probabilities": "Writes <name>_prob.tif next to each <name>_labels.tif.",
    "overwrite": (
        "Ticked, results already in the output folder are replaced. Unticked, files "
        "whose results exist are skipped (to resume a batch)."
    ),
    "batch": "Segments every TIFF with the current model: the same engine as `cellfit predict`.",
    "cancel": "Stop segmenting; finished files are kept.",
    "failed": (
        "The files the last Segment folder could not segment, and why. Fix or remove "
        "them and press Segment folder again: the files already done are kept."
    ),
    # Model
    "save": (
        "Save the model to one .cellfit file (weights and training record). "
        "`cellfit predict` and this plugin can load it."
    ),
    "load": "Load a .cellfit model file, to segment or to fine-tune it. You can also "
            "drop a .cellfit file on napari's window.",
    "load_starting": (
        "Make the cellfit starting model the current model, as shipped: to segment "
        "with it (give the cell diameter in Segment) or to fine-tune it."
    ),
    # Measure
    "labels_layer": (
        "The Labels layer whose cells to measure: one id per cell, as Segment makes them "
        "('<image> labels') or as opened from a <name>_labels.tif."
    ),
    "measure_slices": "For a stack or time series: measure every slice, or only the one on screen.",
    "measure": (
        "Measure every cell of the chosen labels: position, area, diameter, shape and the "
        "intensities of the image chosen at the top of the dock. Hover a cell to read its "
        "values in napari's status bar."
    ),
    "table": (
        "One row per cell (and slice). Click a column's title to sort by it; click a row "
        "to centre the view on that cell."
    ),
    "save_table": (
        "Save the table as a CSV file (one row per cell), the same columns as "
        "`cellfit predict --measure` writes. Drop such a file on napari to see it again."
    ),
    "measure_cancel": "Stop measuring; nothing is kept.",
    "measure_batch": (
        "Also writes <name>_cells.csv (one row per cell) next to each <name>_labels.tif, "
        "and summary.csv (one row per file, with what to check first): "
        "`cellfit predict --measure`."
    ),
}

#: what each column of a measurements table holds (the header's tooltips); the
#: intensity and calibrated columns are matched by their beginning
COLUMN_TIPS: dict[str, str] = {
    "id": "The cell's id in the labels layer.",
    "plane": "The slice (or time point), counted from 0.",
    "centroid_y": "The cell's centre, row (pixels from the top).",
    "centroid_x": "The cell's centre, column (pixels from the left).",
    "area_px": "The cell's area in pixels.",
    "area_": "The cell's area in the image's unit (squared).",
    "equivalent_diameter_px": "The diameter of a circle of the cell's area, in pixels.",
    "equivalent_diameter_": "The diameter of a circle of the cell's area, in the image's unit.",
    "eccentricity": "0 for a circle, towards 1 for an elongated cell.",
    "solidity": "The cell's area over that of its convex hull: 1 for a convex cell, less "
                "for a ragged or notched one.",
    "touches_edge": "The cell is cut by the image's edge: its size and shape are partial.",
    "mean_intensity_": "The mean pixel value inside the cell, in this channel.",
    "max_intensity_": "The largest pixel value inside the cell, in this channel.",
    "integrated_intensity_": "The sum of the pixel values inside the cell, in this channel.",
}


def column_tip(column: str) -> str:
    """The header tooltip of a measurements table's ``column``."""
    if column in COLUMN_TIPS:
        return COLUMN_TIPS[column]
    for start, tip in COLUMN_TIPS.items():
        if start.endswith("_") and column.startswith(start):
            return tip
    return ""

_TRAIN_BUTTON = {
    "fine-tune": "Continue training the current model on your updated annotation.",
    "adapt": "Teach the starting model your cells: it learns from every annotated "
             "slice, including how big your cells are.",
    "starting": "Train a new model on every annotated slice, starting from the "
                "cellfit starting model.",
}


def train_button_tip(plan: str) -> str:
    """The Train button's tooltip for a training plan (see ``TrainPanel.train_plan``)."""
    return _TRAIN_BUTTON.get(
        plan, "Train a new model on every annotated slice, from random weights."
    )


#: the Train button's text for a training plan: "more" only once the model in memory
#: was trained on painted cells (in this session, or a model file loaded)
TRAIN_BUTTON_TEXT = {
    "fine-tune": "Train more (fine-tune)",
    "adapt": "Train (adapt the starting model)",
}

#: the line at the top of the dock while there is no model
NO_MODEL_LINE = (
    "<i>No model yet.</i> The cellfit starting model can segment many kinds of cells "
    "without any training: Segment tab, <i>Use the starting model as is</i>. Or paint a "
    "few cells (Annotate) and Train, to adapt it to yours."
)
#: ... while classes are chosen (semantic mode)
NO_MODEL_LINE_CLASSES = (
    "<i>No model yet.</i> Paint a few objects or regions of each class and a little "
    "background (Annotate; the class list shows the values), then Train: the new model "
    "starts from what the cellfit starting model knows and learns your classes."
)

#: why a control is greyed out and what to do: the first line of its tooltip while it
#: is (:func:`off_tip`); "{image}" is the chosen image's name
WHY_OFF: dict[str, str] = {
    "classes_only": "Only for classes: choose Segment: Classes to train classes.",
    "no_image": "Open an image first (File > Open, or File > Open Sample > cellfit).",
    "no_model": (
        "There is no model yet: press Use the starting model as is (Segment tab), train "
        "one (Train tab) or load one (Model tab)."
    ),
    "no_model_save": "Train or load a model first: there is no model to save yet.",
    "no_model_fresh": "There is no model yet to forget: Train makes a new one.",
    "no_prediction": (
        "Train (with the live preview) or segment the image first: there is no "
        "'{image} labels' layer to copy cells from yet."
    ),
    "no_stopped_run": (
        "Nothing to continue: Continue goes on with a training you stopped with Stop. "
        "Press Train to train."
    ),
    "not_training": "Nothing is training now: Stop ends a running training.",
    "not_segmenting": "Nothing is being segmented now: Cancel stops a running segmentation.",
    "one_slice": "The image has a single slice.",
    "no_labels": (
        "There are no cells to measure: segment an image first (Segment tab), or open a "
        "labels image (File > Open)."
    ),
    "no_table": "Press Measure cells first: there is no table to save yet.",
    "not_measuring": "Nothing is being measured now: Cancel stops a running measurement.",
    "no_suggestions": "Press Suggest where to paint first.",
    "no_doubtful_cells": "Press Suggest where to paint first: it lists the cells to check.",
    "no_cell_shown": "Press Next cell first to show a cell.",
    "not_suggesting": "Nothing is being looked at now: Cancel stops Suggest where to paint.",
    "fine_tune_keeps": (
        "Train goes on with the current model, which keeps its own: tick Train a new "
        "model to choose."
    ),
}

#: what runs, by the job runner's kind, and how to end it
_BUSY = {
    "train": "Training is running: wait for it to end, or press Stop (Train tab).",
    "preview": "The preview of the trained model is being drawn: wait a moment.",
    "estimate": "The cell diameter is being estimated: wait a few seconds.",
    "measure": "Cells are being measured: wait for it to end, or press Cancel (Measure tab).",
    "suggest": (
        "The model is looking for where to paint next: wait a few seconds, or press "
        "Cancel (Annotate tab)."
    ),
}
_BUSY_SEGMENTING = "Segmenting is running: wait for it to end, or press Cancel (Segment tab)."


def busy_reason(kind: str | None) -> str:
    """Why the controls are greyed out while a job of ``kind`` runs, and what to do."""
    return _BUSY.get(kind or "", _BUSY_SEGMENTING)


def off_tip(why: str | None, tip: str) -> str:
    """A control's tooltip: ``tip`` when it is enabled (``why`` None), else why it is
    greyed out and what to do, then ``tip``."""
    return tip if not why else f"{why}\n\n{tip}"
