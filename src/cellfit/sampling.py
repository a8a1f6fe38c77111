"""Patch sampling, augmentation, prefetching and the held-back validation split.

The sampler never returns a patch without annotated pixels: every patch is placed
around an annotated pixel. A fraction ``fg_fraction`` of the patches (0.5 by default)
is placed around a *cell* pixel (any class but background), the rest around any
annotated pixel, so cells are over-represented however little of the image they cover.
With ``class_balanced`` (semantic mode) a cell-centred patch first draws one of the
painted classes, each as likely as the others, then a pixel of it: a class painted on
16 pixels is then at the centre of as many patches as one painted on 10,000, where
drawing among all cell pixels would show it a few times in a whole training.
:meth:`PatchSampler.class_frequencies` estimates how often each class then reaches
the loss, for class weights that balance what the loss sees rather than what was
painted.
:class:`BatchPrefetcher` draws the next batch in a background thread while the
training step computes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as cc_label

from cellfit.targets import IGNORE

__all__ = [
    "DEFAULT_FG_FRACTION",
    "STRAY_FRACTION",
    "BatchPrefetcher",
    "PatchSampler",
    "ValidationSplit",
    "split_annotations",
]

DEFAULT_FG_FRACTION = 0.5
#: a piece of a painted value smaller than this share of the typical cell is a stray
#: piece, not a cell (see :func:`split_annotations`); the same quarter as the smallest
#: cell the post-processing keeps (``TrainConfig.min_size_fraction``)
STRAY_FRACTION = 0.25


class PatchSampler:
    """Draw augmented training patches from annotated planes.

    Parameters
    ----------
    images : list of ndarray, each (C, H, W) float32
        Normalised planes.
    targets : list of ndarray, each (H, W) uint8
        Class targets with ``IGNORE`` for unannotated pixels.
    patch_size : int
        Side of the square patches.
    fg_fraction : float
        Share of patches centred on a cell (non-background) pixel.
    augment : bool
        Random flips, 90° rotations and intensity jitter.
    intensity : {"mild", "strong"}
        Intensity jitter: gain 0.75–1.25 (mild) or 0.5–2 with a gamma change (strong).
    seed : int or numpy Generator
    class_balanced : bool
        Cell-centred patches draw a class first (uniformly among the painted classes
        other than background), then one of its pixels.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        patch_size: int = 256,
        fg_fraction: float = DEFAULT_FG_FRACTION,
        augment: bool = True,
        seed: int | np.random.Generator = 0,
        intensity: str = "mild",
        class_balanced: bool = False,
    ) -> None:
        if len(images) != len(targets) or not images:
            raise ValueError("images and targets must be non-empty lists of equal length")
        self.images = list(images)
        self.targets = list(targets)
        self.patch_size = int(patch_size)
        self.fg_fraction = float(fg_fraction)
        self.augment = augment
        self.intensity = intensity
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        ann_idx, fg_idx = [], []
        for i, t in enumerate(self.targets):
            flat = t.ravel()
            a = np.flatnonzero(flat != IGNORE).astype(np.int64)
            f = np.flatnonzero((flat != IGNORE) & (flat != 0)).astype(np.int64)
            ann_idx.append(np.stack([np.full_like(a, i), a], 1))
            fg_idx.append(np.stack([np.full_like(f, i), f], 1))
        self._annotated = np.concatenate(ann_idx)
        self._foreground = np.concatenate(fg_idx)
        if len(self._annotated) == 0:
            raise ValueError("no annotated pixels to sample from")
        self._by_class: list[np.ndarray] = []
        if class_balanced and len(self._foreground):
            cls = np.concatenate([t.ravel()[f[:, 1]] for t, f in zip(self.targets, fg_idx)])
            order = np.argsort(cls, kind="stable")
            values, starts = np.unique(cls[order], return_index=True)
            self._by_class = np.split(self._foreground[order], starts[1:])

    @property
    def n_channels(self) -> int:
        return int(self.images[0].shape[0])

    def _centre(self) -> tuple[int, int, int]:
        pool = self._annotated
        if len(self._foreground) and self.rng.random() < self.fg_fraction:
            pool = self._foreground
            if self._by_class:
                pool = self._by_class[self.rng.integers(len(self._by_class))]
        plane, flat = pool[self.rng.integers(len(pool))]
        w = self.targets[plane].shape[1]
        return int(plane), int(flat // w), int(flat % w)

    def _crop(self, plane: int, cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch_size
        img, tgt = self.images[plane], self.targets[plane]
        h, w = tgt.shape
        # Shift the window so the chosen pixel lies anywhere in the central half.
        jitter = p // 4
        y0 = cy - p // 2 + int(self.rng.integers(-jitter, jitter + 1))
        x0 = cx - p // 2 + int(self.rng.integers(-jitter, jitter + 1))
        xs = np.zeros((img.shape[0], p, p), dtype=np.float32)
        ys = np.full((p, p), IGNORE, dtype=np.uint8)
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + p, h), min(x0 + p, w)
        xs[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[:, sy0:sy1, sx0:sx1]
        ys[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tgt[sy0:sy1, sx0:sx1]
        return xs, ys

    def _augment(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        k = int(rng.integers(4))
        if k:
            x = np.rot90(x, k, axes=(1, 2))
            y = np.rot90(y, k, axes=(0, 1))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        if self.intensity == "strong":
            # brightness over a factor of 2 either way and a gamma change, so that a few
            # very bright objects that compress the others' range do not throw the model
            gain = np.exp(rng.uniform(-0.7, 0.7, size=(x.shape[0], 1, 1))).astype(np.float32)
            if rng.random() < 0.5:
                gamma = np.float32(np.exp(rng.uniform(-0.35, 0.35)))
                x = np.sign(x) * np.abs(x) ** gamma
        else:
            gain = rng.uniform(0.75, 1.25, size=(x.shape[0], 1, 1)).astype(np.float32)
        offset = rng.uniform(-0.1, 0.1, size=(x.shape[0], 1, 1)).astype(np.float32)
        x = x * gain + offset
        if rng.random() < 0.3:
            x = x + rng.normal(0, rng.uniform(0.0, 0.05), size=x.shape).astype(np.float32)
        return x, y

    def class_frequencies(self, n_classes: int, n_patches: int = 256) -> np.ndarray:
        """Annotated pixels of each class in ``n_patches`` patches drawn as training
        draws them (without augmentation, from a generator of its own, so training's
        draws are not changed): how often each class reaches the loss."""
        counts = np.zeros(n_classes, np.int64)
        rng, self.rng = self.rng, np.random.default_rng(12345)
        try:
            for _ in range(n_patches):
                _, y = self._crop(*self._centre())
                counts += np.bincount(y[y != IGNORE].ravel(), minlength=n_classes)[:n_classes]
        finally:
            self.rng = rng
        return counts

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images ``(B, C, P, P)`` float32 and targets ``(B, P, P)`` uint8."""
        xb = np.empty((batch_size, self.n_channels, self.patch_size, self.patch_size), np.float32)
        yb = np.empty((batch_size, self.patch_size, self.patch_size), np.uint8)
        for b in range(batch_size):
            x, y = self._crop(*self._centre())
            if self.augment:
                x, y = self._augment(x, y)
            xb[b], yb[b] = x, y
        return xb, yb


class BatchPrefetcher:
    """Batches of a :class:`PatchSampler`, the next one drawn in a background thread
    while the caller works on the current one.

    Batches are drawn one after another from the sampler, in the same order as without
    prefetching, so a seed gives the same batches. A batch drawn ahead for a larger
    batch size (before the caller halved it) is cut to the size asked for. An error
    raised while drawing ahead is raised by the :meth:`next` call that wanted the batch.

    Parameters
    ----------
    sampler : PatchSampler
        Drawn from with ``sampler.sample(n)``, looked up at each draw.
    convert : callable, optional
        Applied to each batch ``(images, targets)`` in the drawing thread, e.g. to make
        (pinned) torch tensors; its result must be a pair of sliceable batches.
    enabled : bool
        Draw ahead (True) or only when asked (False); may be changed at any time.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sampler = PatchSampler([rng.random((1, 32, 32), np.float32)],
    ...                        [np.zeros((32, 32), np.uint8)], patch_size=16)
    >>> batches = BatchPrefetcher(sampler)
    >>> x, y = batches.next(2)
    >>> x.shape, y.shape, batches.pending
    ((2, 1, 16, 16), (2, 16, 16), True)
    >>> batches.discard()
    """

    def __init__(
        self,
        sampler: PatchSampler,
        convert: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]] | None = None,
        enabled: bool = True,
    ) -> None:
        self.sampler = sampler
        self.convert = convert
        self.enabled = enabled
        #: the batch being drawn ahead: (thread, box), the box getting "batch" or "error"
        self._pending: tuple[threading.Thread, dict] | None = None

    @property
    def pending(self) -> bool:
        """True while a batch drawn ahead waits to be taken."""
        return self._pending is not None

    def draw(self, n: int) -> tuple[Any, Any]:
        """A batch of ``n`` patches drawn now, in the caller's thread."""
        x, y = self.sampler.sample(n)
        return self.convert(x, y) if self.convert is not None else (x, y)

    def next(self, n: int) -> tuple[Any, Any]:
        """The next batch of ``n`` patches; then, when enabled, start drawing the one
        after it in a background thread."""
        batch = self._take(n)
        if batch is None:
            batch = self.draw(n)
        if self.enabled:
            box: dict = {}

            def work() -> None:
                try:
                    box["batch"] = self.draw(n)
                except BaseException as exc:  # re-raised in the caller's thread
                    box["error"] = exc

            thread = threading.Thread(target=work, name="cellfit-prefetch", daemon=True)
            thread.start()
            self._pending = (thread, box)
        return batch

    def discard(self) -> None:
        """Wait for a batch being drawn ahead and drop it (an error it met included)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0].join()

    def _take(self, n: int) -> tuple[Any, Any] | None:
        """The batch drawn ahead, cut to ``n`` patches (None if there is none, or it
        is smaller than ``n``)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        thread, box = pending
        thread.join()
        if "error" in box:
            raise box["error"]
        x, y = box["batch"]
        if len(x) < n:
            return None
        return x[:n], y[:n]


@dataclass
class ValidationSplit:
    """Annotations split into a training part and a held-back validation part.

    ``on_training`` is True when too few cells were annotated to hold any back; the
    validation figures are then measured on the training annotation (and say so).
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    n_val_cells: int
    on_training: bool


def split_annotations(
    annotations: Sequence[np.ndarray],
    val_fraction: float = 0.2,
    min_cells: int = 5,
    seed: int | np.random.Generator = 0,
    stray_fraction: float = STRAY_FRACTION,
) -> ValidationSplit:
    """Hold back a share of the annotated cells (and the background nearest them).

    Parameters
    ----------
    annotations : list of ndarray, each (H, W) int
        Raw annotations (0 not annotated, 1 background, >= 2 cells or classes).
    val_fraction : float
        Share of annotated objects (connected regions of one value >= 2) held back.
    min_cells : int
        With fewer objects than this, nothing is held back and ``on_training`` is True.
    seed : int or numpy Generator
        Which objects are held back. With an int the choice is *stable*: each object
        gets a rank from the seed, its image, its value and where it lies (not from the
        other objects), and the lowest ranks are held back. Painting more cells and
        training again then holds back the same cells as before (and a few more), so a
        model trained in an earlier round has never seen the cells that check the next
        one. A Generator draws the rank at random.
    stray_fraction : float
        A connected piece of a value smaller than this share of the typical cell (the
        median area of the largest piece of each value in each plane) is a *stray
        piece*, not an object: a slip of the brush, or the rim of a predicted cell
        copied around painted pixels ("use prediction as annotation"). A quarter, as
        the smallest cell the post-processing keeps (``min_size_fraction``): a piece
        below it could never be found, so it is neither counted, held back nor scored
        (it stays in the training part). 0: every piece is an object (semantic mode,
        where a class's regions come in any size).

    Returns
    -------
    ValidationSplit
        Training and validation annotations (copies; the inputs are not modified).
    """
    rng = seed if isinstance(seed, np.random.Generator) else None
    units = []
    ranks = []
    comps = []
    strays = []
    pieces = [_pieces(ann) for ann in annotations]
    min_area = stray_fraction * _typical_area(pieces)
    for i, ann in enumerate(annotations):
        cells = np.where(ann >= 2, ann, 0)
        comp, areas, _ = pieces[i]
        cell = areas >= min_area
        lut = np.zeros(len(areas) + 1, np.int64)  # the cells numbered 1..n, strays 0
        lut[1:][cell] = np.arange(1, int(cell.sum()) + 1)
        stray = (comp > 0) & (lut[comp] == 0)
        comp = lut[comp]
        comps.append(comp)
        strays.append(stray)
        n = int(comp.max())
        units.extend((i, u) for u in range(1, n + 1))
        if rng is not None:
            ranks.extend(rng.random(n).tolist())
        elif n:
            ranks.extend(_stable_ranks(int(seed or 0), i, cells, comp, n))
    n_val = int(round(val_fraction * len(units)))
    if len(units) < min_cells or n_val == 0 or val_fraction <= 0:
        # validated on the training annotation, without its stray pieces
        val = [a.copy() for a in annotations]
        for v, st in zip(val, strays):
            v[st] = 0
        return ValidationSplit([a.copy() for a in annotations], val, 0, True)
    chosen = np.argsort(np.asarray(ranks), kind="stable")[:n_val]
    val_units: dict[int, set[int]] = {}
    for c in chosen:
        i, u = units[c]
        val_units.setdefault(i, set()).add(u)
    train, val = [], []
    for i, (ann, comp, stray) in enumerate(zip(annotations, comps, strays)):
        chosen_here = val_units.get(i, set())
        tr = ann.copy()
        va = np.zeros_like(ann)
        if chosen_here and comp.max() > 0:
            # every pixel takes the unit nearest to it; background follows its nearest
            # cell; stray pieces stay in training
            _, (iy, ix) = ndi.distance_transform_edt(comp == 0, return_indices=True)
            nearest = comp[iy, ix]
            is_val = np.isin(nearest, list(chosen_here)) & (ann != 0) & ~stray
            va[is_val] = ann[is_val]
            tr[is_val] = 0
        train.append(tr)
        val.append(va)
    return ValidationSplit(train, val, n_val, False)


def _pieces(ann: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The connected pieces of each value >= 2 of one plane (labelled 1..n), their
    areas and their values (``areas[k - 1]``, ``values[k - 1]`` for piece ``k``)."""
    cells = np.where(ann >= 2, ann, 0)
    comp = cc_label(cells, background=0, connectivity=1)
    n = int(comp.max())
    areas = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    values = np.asarray(ndi.maximum(cells, comp, np.arange(1, n + 1)), np.int64).reshape(-1)
    return comp, areas, values


def _typical_area(pieces: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """The median area of the largest piece of each value in each plane (a cell's body,
    however many stray pieces of its value lie about); 0 without any."""
    largest: list[np.ndarray] = []
    for _, areas, values in pieces:
        uniq, inv = np.unique(values, return_inverse=True)
        top = np.zeros(len(uniq), np.int64)
        np.maximum.at(top, inv, areas)
        largest.append(top)
    both = np.concatenate(largest) if largest else np.zeros(0)
    return float(np.median(both)) if both.size else 0.0


def _stable_ranks(seed: int, image: int, values: np.ndarray, comp: np.ndarray, n: int) -> list[float]:
    """A rank in [0, 1) for each of the ``n`` objects of ``comp`` that depends only on
    the seed, the image, the object's value and its centre (in 1/200ths of the image's
    height and width, so resizing the image keeps it)."""
    h, w = comp.shape
    centres = ndi.center_of_mass(np.ones_like(comp), comp, range(1, n + 1))
    ids = ndi.maximum(values, comp, range(1, n + 1))
    return [
        float(np.random.default_rng([seed, image, int(v), int(cy * 200 / h), int(cx * 200 / w)])
              .random())
        for (cy, cx), v in zip(centres, ids)
    ]
