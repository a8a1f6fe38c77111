"""napari layers and the engine's arrays: finding, adding and filling the dock's layers,
and the plane arithmetic of stacks.

An image layer's array is ``stack axes + (Y, X)`` (or ``+ (Y, X, RGB)``): the *stack
axes* are the axes before the plane (none for a 2D image; Z, T, or both for a stack or
time series). The engine works on a stack flattened to planes ``(P, C, Y, X)``; a plane
is named by its flat *plane number* (0 to P-1), the row-major position of its index in
the stack axes. The dock's own layers, named after their image, are

``<image> annotation``   the painting (Labels; 0 not annotated, 1 background, 2… cells)
``<image> probability``  the cell probability of the prediction (Image, 0–1)
``<image> labels``       the predicted cells (Labels), or in semantic mode the class
                         map (0 background, k class k), coloured by class
``<image> class probability``  semantic mode: the probability of each class (Image,
                         0–1), the class on a slider of its own, its first axis
``<image> uncertainty``  how unsure the model is of each pixel (Image, 0–1;
                         "Suggest where to paint")
``<image> suggestions``  the ranked boxes to paint next (Shapes, numbered)
``<image> cell to check``  the box round the predicted cell being checked (Shapes)

No Qt here (napari's layer types only).
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Sequence

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap, label_colormap
from scipy import ndimage as ndi

from cellfit.errors import CellfitError
from cellfit.io import to_planes
from cellfit.plugin._display import (
    annotation_colormap,
    class_map_colormap,
    probability_colormap,
    semantic_annotation_colormap,
)
from cellfit.train import annotation_summary

__all__ = [
    "ANNOTATION_DTYPE",
    "MAX_CLASS_PROBABILITY_BYTES",
    "add_annotation_layer",
    "annotated_planes",
    "class_probability_layer",
    "color_annotation",
    "count_annotation",
    "find_layer",
    "labels_shape",
    "layer_data",
    "layer_stack_shape",
    "next_free_id",
    "place_above",
    "plane_number",
    "plane_of",
    "plane_under_cursor",
    "planes_of",
    "prediction_layers",
    "prediction_to_annotation",
    "show_boxes",
    "show_prediction",
    "show_uncertainty",
    "stack_position",
    "stack_shape",
]

ANNOTATION_DTYPE = np.uint16
#: the largest per-class probability layer the dock makes (bytes; float32 for every
#: class of every slice): beyond it a notice says to use the probability files instead
MAX_CLASS_PROBABILITY_BYTES = 2 * 2**30


# ---------------------------------------------------------------- plane arithmetic
def stack_shape(shape: Sequence[int], rgb: bool = False) -> tuple[int, ...]:
    """The stack axes of an image layer's shape: everything before ``Y, X`` [, RGB]."""
    n = len(shape) - (3 if rgb else 2)
    return tuple(int(s) for s in shape[: max(n, 0)])


def plane_number(position: Sequence[int], stack: Sequence[int]) -> int:
    """The flat plane number of a ``position`` in the stack axes of shape ``stack``
    (clipped to the stack; 0 for a 2D image)."""
    if not stack:
        return 0
    idx = [min(max(int(i), 0), int(n) - 1) for i, n in zip(position, stack)]
    return int(np.ravel_multi_index(idx, tuple(stack)))


def stack_position(plane: int, stack: Sequence[int]) -> tuple[int, ...]:
    """The position in the stack axes of plane number ``plane`` (``()`` for 2D): the
    index of that plane in a layer's array."""
    return tuple(int(i) for i in np.unravel_index(int(plane), tuple(stack))) if stack else ()


def planes_of(data: np.ndarray, rgb: bool = False) -> np.ndarray:
    """An image layer's array as planes ``(P, C, Y, X)`` (a view where possible)."""
    arr = np.asarray(data)
    axes = "Q" * (arr.ndim - (3 if rgb else 2)) + ("YXS" if rgb else "YX")
    return to_planes(arr, axes, what="the image layer")[0]


def plane_of(data, plane: int, rgb: bool = False) -> np.ndarray:
    """One raw plane ``(C, Y, X)`` of an image layer's array, reading only that plane
    (so lazy dask / zarr stacks are not loaded whole)."""
    position = stack_position(plane, stack_shape(data.shape, rgb))
    return np.ascontiguousarray(planes_of(np.asarray(data[position]), rgb)[0])


# ------------------------------------------------------------------ annotation
def annotated_planes(annotation: np.ndarray) -> np.ndarray:
    """Plane numbers of an annotation ``stack axes + (Y, X)`` that hold any painting."""
    ann = np.asarray(annotation)
    flat = ann.reshape(-1, *ann.shape[-2:])
    return np.flatnonzero(flat.reshape(flat.shape[0], -1).any(axis=1))


def count_annotation(annotation: np.ndarray, mode: str = "instances") -> dict:
    """Cells / background pixels / annotated slices of an annotation (engine counts)."""
    ann = np.asarray(annotation)
    return annotation_summary([ann.reshape(-1, *ann.shape[-2:])], mode)


def next_free_id(layer: Labels) -> int:
    """The first cell id (2 or more) not used in an annotation layer."""
    top = int(np.max(layer.data)) if layer.data.size else 0
    return max(top + 1, 2)


def prediction_to_annotation(
    annotation: np.ndarray, labels: np.ndarray, ring: int = 2, semantic: bool = False
) -> tuple[np.ndarray, int]:
    """Copy predicted cells into one annotated plane ("use prediction as annotation").

    Parameters
    ----------
    annotation : ndarray, shape (Y, X)
        The plane's annotation (0 not annotated, 1 background, >= 2 cells).
    labels : ndarray, shape (Y, X)
        Predicted instance labels of the same plane (0 background); cells the user
        deleted from the labels layer are simply absent.
    ring : int
        Also mark unannotated predicted-background pixels within this many pixels of a
        copied cell as background (1), so its edge is learned as a boundary; 0: none.
    semantic : bool
        ``labels`` is a class map (0 background, k class k): each predicted region is
        copied as its class (painted value k + 1), not as a new cell id.

    Returns
    -------
    new : ndarray, shape (Y, X), dtype of ``annotation``
        Every predicted cell that does not touch an already painted cell gets a new id
        (the next free ones); only unannotated pixels (0) are written.
    n_copied : int
    """
    ann = np.asarray(annotation)
    lab = np.asarray(labels)
    if ann.shape != lab.shape:
        raise CellfitError(
            f"the prediction ({lab.shape}) and the annotation ({ann.shape}) differ in size: "
            "predict this image again, then copy."
        )
    if semantic:
        return _classes_to_annotation(ann, lab, ring)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    painted = np.unique(lab[ann >= 2])
    keep = np.setdiff1d(ids, painted)
    if keep.size == 0:
        return ann.copy(), 0
    start = max(int(ann.max()) + 1, 2)
    top = start + keep.size - 1
    if np.issubdtype(ann.dtype, np.integer) and top > np.iinfo(ann.dtype).max:
        raise CellfitError(
            f"the annotation layer cannot hold {top} cell ids in its {ann.dtype} pixels: "
            "remove some cells or save and reload the annotation as 32-bit labels."
        )
    lut = np.zeros(int(lab.max()) + 1, dtype=np.int64)
    lut[keep] = np.arange(start, top + 1)
    cells = lut[lab] > 0
    free = ann == 0
    new = ann.copy()
    write = cells & free
    new[write] = lut[lab[write]].astype(ann.dtype)
    if ring > 0:
        near = ndi.binary_dilation(cells, iterations=int(ring))
        new[near & (lab == 0) & free] = 1
    return new, int(keep.size)


def _classes_to_annotation(ann: np.ndarray, classes: np.ndarray, ring: int) -> tuple[np.ndarray, int]:
    """:func:`prediction_to_annotation` of a class map: the predicted regions not
    touching a painted one are written as their classes (k + 1) on unannotated pixels."""
    regions, n = ndi.label(classes > 0)
    if n == 0:
        return ann.copy(), 0
    touched = np.unique(regions[(ann >= 2) & (regions > 0)])
    keep = np.setdiff1d(np.arange(1, n + 1), touched)
    if keep.size == 0:
        return ann.copy(), 0
    top = int(classes.max()) + 1
    if np.issubdtype(ann.dtype, np.integer) and top > np.iinfo(ann.dtype).max:
        raise CellfitError(
            f"the annotation layer cannot hold class {top - 1} (painted {top}) in its "
            f"{ann.dtype} pixels: save and reload the annotation as 32-bit labels."
        )
    cells = np.isin(regions, keep)
    free = ann == 0
    new = ann.copy()
    write = cells & free
    new[write] = (classes[write].astype(np.int64) + 1).astype(ann.dtype)
    if ring > 0:
        near = ndi.binary_dilation(cells, iterations=int(ring))
        new[near & (classes == 0) & free] = 1
    return new, int(keep.size)


# ---------------------------------------------------------------------- layers
def find_layer(viewer, name: str, kind: type):
    """The layer called ``name`` if it is of type ``kind``, else None."""
    for layer in viewer.layers:
        if layer.name == name:
            return layer if isinstance(layer, kind) else None
    return None


def layer_data(layer: Image):
    """An image layer's array (its full-resolution level when multiscale)."""
    return layer.data[0] if layer.multiscale else layer.data


def labels_shape(image: Image) -> tuple[int, ...]:
    """The shape a Labels layer for ``image`` has (no colour axis)."""
    shape = tuple(int(s) for s in layer_data(image).shape)
    return shape[:-1] if image.rgb else shape


def layer_stack_shape(image: Image) -> tuple[int, ...]:
    """The stack axes of an image layer (``()`` for a 2D image)."""
    return stack_shape(layer_data(image).shape, image.rgb)


def plane_under_cursor(viewer, image: Image) -> int:
    """The plane number of ``image`` on screen (the viewer's slider position)."""
    stack = layer_stack_shape(image)
    if not stack:
        return 0
    pos = image.world_to_data(viewer.dims.point)
    return plane_number([round(float(c)) for c in pos[: len(stack)]], stack)


def add_annotation_layer(viewer, image: Image, name: str) -> Labels:
    """An empty annotation layer ``name`` over ``image`` (16-bit ids, the dock's colours)."""
    return viewer.add_labels(
        np.zeros(labels_shape(image), ANNOTATION_DTYPE),
        name=name,
        scale=image.scale,
        translate=image.translate,
        opacity=0.7,
        colormap=annotation_colormap(),
        metadata={"cellfit": "annotation", "image": image.name},
    )


def color_annotation(layer: Labels, colors: list[str] | None) -> None:
    """Colour an annotation layer: by class (``colors``, background first: semantic
    mode), or with the dock's cell colours (None: instance mode)."""
    layer.colormap = (
        semantic_annotation_colormap(colors) if colors is not None else annotation_colormap()
    )


def _style_labels(layer: Labels, colors: list[str] | None) -> None:
    """A prediction layer as a class map filled with the class colours (``colors``),
    or as cells outlined in napari's label colours (None)."""
    if colors is not None:
        layer.colormap = class_map_colormap(colors)
        layer.contour = 0
    elif isinstance(layer.colormap, DirectLabelColormap):
        layer.colormap = label_colormap()
        layer.contour = 1


def class_probability_layer(viewer, image: Image, n_classes: int) -> Image | None:
    """'<image> class probability' for ``n_classes`` classes, added (zeros) if missing
    or of another shape; None when it would be larger than
    :data:`MAX_CLASS_PROBABILITY_BYTES`. Its first axis is the class (0 background):
    napari gives it a slider of its own."""
    shape = (int(n_classes), *labels_shape(image))
    name = f"{image.name} class probability"
    layer = find_layer(viewer, name, Image)
    if layer is not None and tuple(layer.data.shape) == shape:
        return layer
    if int(np.prod(shape)) * 4 > MAX_CLASS_PROBABILITY_BYTES:
        return None
    if layer is not None:
        viewer.layers.remove(layer)
    active = viewer.layers.selection.active
    layer = viewer.add_image(
        np.zeros(shape, np.float32),
        name=name,
        colormap=probability_colormap(),
        contrast_limits=(0.0, 1.0),
        blending="translucent",
        opacity=0.6,
        visible=False,  # shown when asked for: the class map says most at a glance
        scale=(1.0, *image.scale),
        translate=(0.0, *image.translate),
        metadata={"cellfit": "probability", "image": image.name},
    )
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


def prediction_layers(
    viewer, image: Image, annotation: Labels | None = None
) -> tuple[Image, Labels]:
    """'<image> probability' and '<image> labels', added (empty) if missing, below
    ``annotation``; the selected layer stays selected.

    Adding a layer takes napari a second or two when the CPU draws the window, so
    Train adds them at once rather than when the first preview arrives.
    """
    shape = labels_shape(image)
    active = viewer.layers.selection.active
    prob_layer = _layer_of_shape(
        viewer, f"{image.name} probability", Image, shape, annotation,
        lambda: viewer.add_image(
            np.zeros(shape, np.float32),
            name=f"{image.name} probability",
            colormap=probability_colormap(),
            contrast_limits=(0.0, 1.0),
            blending="translucent",
            opacity=0.6,
            scale=image.scale,
            translate=image.translate,
            metadata={"cellfit": "probability", "image": image.name},
        ),
    )

    def add_labels() -> Labels:
        layer = viewer.add_labels(
            np.zeros(shape, np.int32),
            name=f"{image.name} labels",
            opacity=0.8,
            scale=image.scale,
            translate=image.translate,
            metadata={"cellfit": "prediction", "image": image.name},
        )
        layer.contour = 1
        return layer

    lab_layer = _layer_of_shape(
        viewer, f"{image.name} labels", Labels, shape, annotation, add_labels
    )
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return prob_layer, lab_layer


def _layer_of_shape(viewer, name: str, kind: type, shape: tuple, annotation, add):
    """Layer ``name`` of ``kind`` with data of ``shape``: the existing one, or else one
    made by ``add()`` (replacing a layer of another shape) and put below ``annotation``."""
    layer = find_layer(viewer, name, kind)
    if layer is not None and tuple(layer.data.shape) == shape:
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    layer = add()
    _place_below(viewer, layer, annotation)
    return layer


def place_above(viewer, layers: Sequence, annotation: Labels | None) -> None:
    """Put ``layers`` (bottom to top) right above ``annotation`` where they lie below it:
    the live preview of a training must not hide under the painting (after "Use
    prediction as annotation" the annotation holds every predicted cell). The selected
    layer stays selected."""
    if annotation is None or annotation not in viewer.layers:
        return
    active = viewer.layers.selection.active
    for layer in reversed(list(layers)):  # the top one first: each goes right above
        if layer not in viewer.layers:
            continue
        src, dst = viewer.layers.index(layer), viewer.layers.index(annotation)
        if src < dst:
            viewer.layers.move(src, dst + 1)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active


def _place_below(viewer, layer, annotation: Labels | None) -> None:
    if annotation is None or annotation not in viewer.layers:
        return
    layers = viewer.layers
    src, dst = layers.index(layer), layers.index(annotation)
    if src > dst:
        layers.move(src, dst)


def show_prediction(
    viewer,
    image: Image,
    planes: list[int],
    prob: np.ndarray,
    labels: np.ndarray,
    annotation: Labels | None = None,
    colors: list[str] | None = None,
    class_prob: np.ndarray | None = None,
) -> None:
    """Write predicted planes (``prob`` and ``labels``, each ``(n, Y, X)``, for the
    plane numbers ``planes``) into '<image> probability' and '<image> labels'.

    Semantic mode: ``colors`` (one per class, background first) colour the class map,
    and ``class_prob`` ``(n, K, Y, X)``, when given, goes into '<image> class
    probability' (:func:`class_probability_layer`)."""
    prob_layer, lab_layer = prediction_layers(viewer, image, annotation)
    _style_labels(lab_layer, colors)
    class_layer = None
    if class_prob is not None:
        class_layer = class_probability_layer(viewer, image, class_prob.shape[1])
    stack = layer_stack_shape(image)
    if not stack:
        prob_layer.data = prob[0]
        lab_layer.data = labels[0].astype(lab_layer.data.dtype, copy=False)
        if class_layer is not None and class_prob is not None:
            class_layer.data = class_prob[0]
        return
    pdata, ldata = prob_layer.data, lab_layer.data
    for k, plane in enumerate(planes):
        position = stack_position(plane, stack)
        pdata[position] = prob[k]
        ldata[position] = labels[k]
        if class_layer is not None and class_prob is not None:
            class_layer.data[(slice(None), *position)] = class_prob[k]
    prob_layer.refresh()
    lab_layer.refresh()
    if class_layer is not None:
        class_layer.refresh()


# ------------------------------------------------------------ where to paint next
def show_uncertainty(
    viewer, image: Image, plane: int, uncertainty: np.ndarray, annotation: Labels | None = None
) -> Image:
    """Write the uncertainty ``(Y, X)`` of plane number ``plane`` into '<image>
    uncertainty' (added if missing: magma, additive, so the image stays readable; below
    ``annotation``); the selected layer stays selected."""
    shape = labels_shape(image)
    active = viewer.layers.selection.active
    layer = _layer_of_shape(
        viewer, f"{image.name} uncertainty", Image, shape, annotation,
        lambda: viewer.add_image(
            np.zeros(shape, np.float32),
            name=f"{image.name} uncertainty",
            colormap="magma",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.7,
            scale=image.scale,
            translate=image.translate,
            metadata={"cellfit": "uncertainty", "image": image.name},
        ),
    )
    position = stack_position(plane, layer_stack_shape(image))
    if position:
        layer.data[position] = uncertainty
        layer.refresh()
    else:
        layer.data = np.asarray(uncertainty, np.float32)
    layer.visible = True
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


def show_boxes(
    viewer,
    image: Image,
    name: str,
    plane: int,
    boxes: Sequence[tuple[int, int, int, int]],
    numbers: Sequence[int] | None = None,
    color: str = "#00e5ff",
    current: int | None = None,
    current_color: str = "#ffd42a",
):
    """Replace Shapes layer ``name`` by rectangles round ``boxes`` (half-open pixel
    boxes ``(y0, x0, y1, x1)`` of plane number ``plane``), outlined in ``color`` (box
    ``current`` in ``current_color``), no fill, each numbered by ``numbers``; locked
    (no accidental edits). The selected layer stays selected. No boxes: the layer goes."""
    active = viewer.layers.selection.active
    old = find_layer(viewer, name, Shapes)
    if old is not None:
        viewer.layers.remove(old)
    if not boxes:
        return None
    position = [float(i) for i in stack_position(plane, layer_stack_shape(image))]
    rects = [
        np.array([[*position, y, x] for y, x in (
            (y0 - 0.5, x0 - 0.5), (y0 - 0.5, x1 - 0.5), (y1 - 0.5, x1 - 0.5), (y1 - 0.5, x0 - 0.5)
        )])
        for y0, x0, y1, x1 in boxes
    ]
    side = max(max(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes)
    colors = [current_color if k == current else color for k in range(len(boxes))]
    kwargs = {}
    if numbers is not None:
        kwargs = {
            "features": {"number": [int(n) for n in numbers]},
            "text": {"string": "{number}", "anchor": "upper_left", "size": 14,
                     "color": color},
        }
    layer = viewer.add_shapes(
        rects,
        shape_type="rectangle",
        name=name,
        edge_color=colors,
        face_color="transparent",
        edge_width=max(1.0, side / 48),
        scale=image.scale,
        translate=image.translate,
        metadata={"cellfit": "suggestions", "image": image.name},
        **kwargs,
    )
    layer.locked = True
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer
