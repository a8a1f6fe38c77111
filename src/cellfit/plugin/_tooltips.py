"""Every word the dock shows next to a control: row labels, choices and tooltips.

Kept in one place so the wording is consistent and can be reviewed (or translated)
without reading the panels' code. No Qt here.

:data:`LABELS` names the settings an engine error can be about (the keys of
:data:`cellfit.errors.SETTING_WORDS`) as the user sees them in the dock, so an engine
message such as "set {setting}" reads "set Cell diameter (Segment tab)" here and
"set --diameter PIXELS" on the command line (see :func:`cellfit.errors.worded`).
"""

from __future__ import annotations

__all__ = ["CHOICES", "LABELS", "ROWS", "TIPS", "train_button_tip"]

#: the row labels of the forms (without the colon) and the texts of check boxes
ROWS: dict[str, str] = {
    "image": "Image",
    "annotation": "Annotation",
    "start": "Start from",
    "mode": "Segment",
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
    "out": f"{ROWS['out']} (Segment tab)",
    "patch_size": f"{ROWS['patch_size']} (Train tab)",
    "steps": f"{ROWS['budget']} (Train tab)",
    "time_limit": f"{ROWS['budget']} (Train tab)",
}

#: the items of the combo boxes: (value the engine takes, text shown)
CHOICES: dict[str, list[tuple[str, str]]] = {
    "loss": [
        ("focal+dice", "Focal + Dice (recommended)"),
        ("ce+dice", "Cross-entropy + Dice"),
        ("focal+jaccard", "Focal + Jaccard"),
        ("focal+tversky", "Focal + Tversky"),
        ("focal", "Focal only"),
    ],
    "class_weights": [
        ("balanced", "Balanced (recommended)"),
        ("none", "Equal"),
    ],
    "mode": [
        ("instances", "Cells: one id per cell (instances)"),
        ("semantic", "Classes: each value is a class (semantic)"),
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
        "Cells: every cell gets its own label (touching cells are separated). "
        "Classes: each painted value 2, 3, … is a kind of structure."
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
        "Focal + Dice copes with few cell pixels among much background; keep it unless "
        "you have a reason."
    ),
    "class_weights": (
        "Balanced gives rare classes (cells, their boundaries) more weight, so the model "
        "does not learn to call everything background."
    ),
    "device": (
        "Where to train and segment. Automatic uses a CUDA or Apple GPU when PyTorch "
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
    # Model
    "save": (
        "Save the model to one .cellfit file (weights and training record). "
        "`cellfit predict` and this plugin can load it."
    ),
    "load": "Load a .cellfit model file, to segment or to fine-tune it.",
    "load_starting": (
        "Make the cellfit starting model the current model, as shipped: to segment "
        "with it (give the cell diameter in Segment) or to fine-tune it."
    ),
}

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
