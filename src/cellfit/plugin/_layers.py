"""napari layers and the engine's arrays: finding, adding and filling the dock's layers,
and the plane arithmetic of stacks.

An image layer's array is ``stack axes + (Y, X)`` (or ``+ (Y, X, RGB)``): the *stack
axes* are the axes before the plane (none for a 2D image; Z, T, or both for a stack or
time series). The engine works on a stack flattened to planes ``(P, C, Y, X)``; a plane
is named by its flat *plane number* (0 to P-1), the row-major position of its index in
the stack axes. The dock's own layers, named after their image, are

``<image> annotation``   the painting (Labels; 0 not annotated, 1 background, 2… cells)
``<image> probability``  the cell probability of the prediction (Image, 0–1)
``<image> labels``       the predicted cells (Labels)

No Qt here (napari's layer types only).
"""

from __future__ import annotations

# isort: off
from cellfit.plugin import _safety  # noqa: F401  (first: imports the torch stack safely)

# isort: on
from collections.abc import Sequence

import numpy as np
from napari.layers import Image, Labels
from scipy import ndimage as ndi

from cellfit.errors import CellfitError
from cellfit.io import to_planes
from cellfit.plugin._display import annotation_colormap, probability_colormap
from cellfit.train import annotation_summary

__all__ = [
    "ANNOTATION_DTYPE",
    "add_annotation_layer",
    "annotated_planes",
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
    "show_prediction",
    "stack_position",
    "stack_shape",
]

ANNOTATION_DTYPE = np.uint16


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
    annotation: np.ndarray, labels: np.ndarray, ring: int = 2
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
) -> None:
    """Write predicted planes (``prob`` and ``labels``, each ``(n, Y, X)``, for the
    plane numbers ``planes``) into '<image> probability' and '<image> labels'."""
    prob_layer, lab_layer = prediction_layers(viewer, image, annotation)
    stack = layer_stack_shape(image)
    if not stack:
        prob_layer.data = prob[0]
        lab_layer.data = labels[0].astype(lab_layer.data.dtype, copy=False)
        return
    pdata, ldata = prob_layer.data, lab_layer.data
    for k, plane in enumerate(planes):
        position = stack_position(plane, stack)
        pdata[position] = prob[k]
        ldata[position] = labels[k]
    prob_layer.refresh()
    lab_layer.refresh()
