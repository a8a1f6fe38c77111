"""Classes of whole objects: each object found takes the class of the painted object
it most resembles.

Semantic mode, when the classes are kinds of object (cell types, mitotic against
interphase nuclei, live against dead cells): a user paints a few objects of each
class whole. A network trained pixel by pixel on one or two painted objects per class
finds the objects but mixes up their classes, because a pixel alone says little about
the object's shape, size and texture (``benchmarks/manyclass.py``: 77 % of the rare
pixels went to another rare class). Here the class is decided once per object,
ilastik's object classification: each painted object gives an example, described by
its shape (area, outline, elongation, convexity, holes, moments), its brightness per
channel and its texture (mean edge and blob strength at two scales); a found object
takes the class of the nearest example in those features (standardised), which needs
no more than one example per class and no training.

With one feature row per painted object, 31 classes that differ by texture and size
were told apart for 42 % of the objects (``benchmarks/manyclass.py``, 40 test images).
A trained model therefore decides by a **pixel vote** (:class:`PixelVote`): a softmax
regression on ilastik's pixel features (brightness, edges, blobs, structure tensor and
Hessian at 6 scales), learnt from every painted pixel, background included; an object
takes the class its pixels' probabilities add up to most, and an object whose pixels
look like painted background is dropped. Each painted object gives hundreds of
examples this way. The examples stay in the model (the record, ``leave_one_out``), and
a model without a vote (older files) decides by the nearest example.

Whether the painted classes are whole objects is measured, not assumed
(:func:`painted_whole`): a painted object that the network's foreground covers with
about the same outline was painted whole; strokes inside larger regions (tissue
types) are not, and those models keep the pixel-by-pixel classes.

The examples travel in the model (``ModelInfo.postprocess["objects"]``, plain JSON
numbers): :meth:`ObjectClassifier.to_dict` / :meth:`ObjectClassifier.from_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import minimize
from skimage.measure import regionprops

from cellfit.errors import CellfitError
from cellfit.normalize import DEFAULT_NORMALIZATION, match_channels, normalize

__all__ = [
    "MIN_WHOLE_SHARE",
    "RELATIVE_NOISE",
    "SHAPE_FEATURES",
    "ObjectClassifier",
    "PixelVote",
    "best_threshold",
    "classify_objects",
    "examples_from_annotation",
    "examples_from_found",
    "fit_classifier",
    "fit_pixel_vote",
    "foreground",
    "object_features",
    "painted_ious",
    "painted_whole",
    "pixel_features",
    "rule_text",
    "valid_dict",
    "with_ring",
]

#: The shape and texture features, in order (then the mean and spread of each channel).
SHAPE_FEATURES = (
    "log area", "outline / sqrt(area)", "eccentricity", "solidity", "extent", "holes",
    "log major axis", "log minor axis", "log filled / area", "hu 1", "hu 2", "hu 3",
    "hu 4", "edges at 1 px", "blobs at 1 px", "blobs at 2 px",
)
#: A painted object is "whole" when the foreground covering it has an IoU with it of
#: at least this much: the objects found there are at most 4 times its area. A stroke
#: across a region covers a few per cent of it; an object painted whole, found with a
#: blurred rim one or two pixels wide, half or more (small objects the least).
WHOLE_IOU = 0.25
#: Semantic mode, classes of whole objects: unpainted pixels this close (model pixels)
#: to a painted object are background while training, since the object was painted
#: whole (taught only its inside, the network draws objects too large). Not for
#: classes of regions, whose strokes do not end where the region does.
RING = 2
#: The painted classes are whole objects when at least this share of painted objects is.
MIN_WHOLE_SHARE = 0.75
#: The most examples a model keeps (a model file with more is refused as damaged).
MAX_EXAMPLES = 100_000
#: Differences smaller than this share of a feature's value count as noise, not as a
#: difference between classes (set on constructed scenes, tests/test_objectclass.py).
RELATIVE_NOISE = 0.1
#: The thresholds on the probability of background tried for the objects' outline
#: (:func:`best_threshold`): the network, taught only the inside of painted objects and
#: background painted away from them, tends to draw objects a little too large.
FG_THRESHOLDS = (0.5, 0.3, 0.2, 0.1, 0.05)
#: The scales (pixels) of the pixel features the class vote learns from (ilastik's).
PIXEL_SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
#: The most painted pixels the class vote learns from (drawn evenly from each class).
VOTE_PIXELS = 40_000


def _normalised(image: np.ndarray) -> np.ndarray:
    """A ``(Y, X)`` or ``(C, Y, X)`` plane as float32 ``(C, Y, X)``, each channel
    normalised as the model's default normalisation does, so examples from different
    images compare."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise ValueError(f"object features take a (Y, X) or (C, Y, X) plane, got {img.shape}")
    return normalize(img[None], DEFAULT_NORMALIZATION)[0]


def _painted_pieces(annotation: np.ndarray):
    """``(value, pieces)`` for each painted class value (2 or more) of a semantic
    annotation: its connected pieces labelled 1, 2, ..."""
    ann = np.asarray(annotation)
    for value in np.unique(ann[ann > 1]):
        yield int(value), ndi.label(ann == value)[0]


def object_features(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of each object of ``labels`` in ``image``.

    Parameters
    ----------
    image : ndarray, shape (Y, X) or (C, Y, X)
        The raw plane (normalised here, channel by channel).
    labels : ndarray of int, shape (Y, X)
        0 for no object, one id per object.

    Returns
    -------
    ids : ndarray of int, shape (N,)
    features : ndarray of float64, shape (N, len(SHAPE_FEATURES) + 2 C)
    """
    planes = _normalised(image)
    labels = np.asarray(labels)
    if labels.shape != planes.shape[1:]:
        raise ValueError(f"labels {labels.shape} do not match the image {planes.shape[1:]}")
    grey = planes.mean(0)
    edges = ndi.gaussian_gradient_magnitude(grey, 1.0)
    blobs1 = np.abs(ndi.gaussian_laplace(grey, 1.0))
    blobs2 = np.abs(ndi.gaussian_laplace(grey, 2.0))
    ids, rows = [], []
    for r in regionprops(labels.astype(np.int32, copy=False)):
        sl, m, a = r.slice, r.image, float(r.area)
        hu = np.clip(np.nan_to_num(r.moments_hu[:4]), -1.0, 1.0)
        row = [
            np.log(a), r.perimeter / np.sqrt(a), r.eccentricity, r.solidity, r.extent,
            1.0 - r.euler_number, np.log1p(r.axis_major_length), np.log1p(r.axis_minor_length),
            np.log(r.area_filled / a), *hu,
            edges[sl][m].mean(), blobs1[sl][m].mean(), blobs2[sl][m].mean(),
        ]
        for c in range(planes.shape[0]):
            v = planes[c][sl][m]
            row += [float(v.mean()), float(v.std())]
        ids.append(r.label)
        rows.append(row)
    width = len(SHAPE_FEATURES) + 2 * planes.shape[0]
    feats = np.asarray(rows, dtype=np.float64).reshape(-1, width)
    return np.asarray(ids, dtype=np.int64), np.nan_to_num(feats)


def examples_from_annotation(image: np.ndarray, annotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The painted objects of one semantic-mode annotation (0 unpainted, 1 background,
    k + 1 class k): each connected piece of one class is one example.

    Returns the features ``(N, F)`` and the class of each example ``(N,)`` (1, 2, ...).
    """
    feats, classes = [], []
    for value, pieces in _painted_pieces(annotation):
        _, f = object_features(image, pieces)
        feats.append(f)
        classes.append(np.full(len(f), value - 1, dtype=np.int64))
    if not feats:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return np.concatenate(feats), np.concatenate(classes)


def examples_from_found(image: np.ndarray, annotation: np.ndarray,
                        found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The examples of one plane as the model sees them: each object the model found
    (connected pixels of ``found``) that the user painted, with the class painted on
    most of its painted pixels; 0 (background) where that is the painted background,
    so a false object painted as background teaches what to drop. Painted objects the
    model found nothing on are examples as painted.

    Returns the features ``(N, F)`` and the class of each example ``(N,)`` (0, 1, ...).
    """
    ann = np.asarray(annotation)
    objects, n = ndi.label(np.asarray(found, dtype=bool))
    ids, feats = object_features(image, objects)
    classes = np.full(len(ids), -1, dtype=np.int64)
    painted = ann > 0
    if n and painted.any():
        value = ann[painted].astype(np.int64)
        votes = np.zeros((n + 1, int(value.max()) + 1), dtype=np.int64)
        np.add.at(votes, (objects[painted], value), 1)
        votes[0] = 0
        has = votes.sum(1) > 0
        best = np.argmax(votes, axis=1) - 1
        classes = np.where(has[ids], best[ids], -1)
    keep = classes >= 0
    feats, classes = feats[keep], classes[keep]
    # painted objects with nothing found on them
    missed = np.zeros_like(ann)
    for value, pieces in _painted_pieces(ann):
        touched = np.unique(pieces[(pieces > 0) & (objects > 0)])
        missed[(pieces > 0) & ~np.isin(pieces, touched)] = value
    if missed.any():
        f, k = examples_from_annotation(image, missed)
        if len(k):
            feats = np.concatenate([feats, f]) if len(feats) else f
            classes = np.concatenate([classes, k])
    return feats, classes


def pixel_features(image: np.ndarray):
    """ilastik's pixel features of a ``(Y, X)`` or ``(C, Y, X)`` plane, one ``(Y, X)``
    float32 map at a time: at each of :data:`PIXEL_SIGMAS`, the smoothed brightness,
    gradient magnitude, Laplacian of Gaussian, and the two eigenvalues of the structure
    tensor and of the Hessian (of the channels' mean); then, for colour, each channel
    smoothed at 1 pixel. One map at a time keeps a large plane's memory to a few copies
    of it.

    The raw values, as ilastik uses them: normalised image by image (1st to 99.8th
    percentile), a class's brightness and contrast would shift with what else is in
    the image, and the vote classed 31 generated classes worse (mean IoU 0.34 against
    0.52, ``benchmarks/manyclass.py`` seed 0). The vote standardises each feature over
    the painted pixels, so only images of another exposure or bit depth than the
    painted ones are off; retrain on some of them."""
    from skimage.feature import (
        hessian_matrix,
        hessian_matrix_eigvals,
        structure_tensor,
        structure_tensor_eigenvalues,
    )

    planes = np.asarray(image, dtype=np.float32)
    planes = planes[None] if planes.ndim == 2 else planes
    grey = planes.mean(0)
    for sigma in PIXEL_SIGMAS:
        yield ndi.gaussian_filter(grey, sigma)
        yield ndi.gaussian_gradient_magnitude(grey, sigma)
        yield ndi.gaussian_laplace(grey, sigma)
        yield from structure_tensor_eigenvalues(structure_tensor(grey, sigma=sigma, order="rc"))
        yield from hessian_matrix_eigvals(
            hessian_matrix(grey, sigma=sigma, order="rc", use_gaussian_derivatives=False)
        )
    if planes.shape[0] > 1:
        for c in range(planes.shape[0]):
            yield ndi.gaussian_filter(planes[c], 1.0)


def n_pixel_features(n_channels: int) -> int:
    """How many maps :func:`pixel_features` gives for a plane of ``n_channels``."""
    return 7 * len(PIXEL_SIGMAS) + (n_channels if n_channels > 1 else 0)


def _features_at(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The pixel features ``(N, F)`` of the pixels where ``where`` is True."""
    return np.stack([f[where] for f in pixel_features(image)], axis=1).astype(np.float64)


@dataclass
class PixelVote:
    """Each object takes the class most of its pixels look like: a softmax regression
    on ilastik's pixel features, learnt from every painted pixel (background included),
    summed over the object's pixels. A painted object gives hundreds of examples this
    way instead of one, which tells textures and sizes apart that one feature vector
    per object does not (``benchmarks/manyclass.py``)."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F, K')
    bias: np.ndarray  # (K',)
    classes: np.ndarray  # (K',) the class of each output, 0 = background

    def object_classes(self, image: np.ndarray, objects: np.ndarray, n: int) -> np.ndarray:
        """The class of objects ``1..n`` of ``objects`` (index 0: unused)."""
        inside = objects > 0
        logits = np.tile(self.bias.astype(np.float32), (int(inside.sum()), 1))
        weights = self.weights.astype(np.float32)
        for j, f in enumerate(pixel_features(image)):
            logits += np.outer(((f[inside] - self.mean[j]) / self.scale[j]).astype(np.float32),
                               weights[j])
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        sums = np.zeros((n + 1, len(self.classes)))
        np.add.at(sums, objects[inside], p)
        return self.classes[np.argmax(sums, axis=1)]

    def to_dict(self) -> dict:
        return {"mean": np.round(self.mean, 6).tolist(), "scale": np.round(self.scale, 6).tolist(),
                "weights": np.round(self.weights, 6).tolist(),
                "bias": np.round(self.bias, 6).tolist(), "classes": self.classes.astype(int).tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> PixelVote:
        vote = cls(*(np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "weights", "bias")),
                   np.asarray(d["classes"], dtype=np.int64))
        f, k = vote.mean.shape[0] if vote.mean.ndim == 1 else -1, len(vote.classes)
        if (vote.mean.ndim != 1 or vote.scale.shape != (f,) or vote.weights.shape != (f, k)
                or vote.bias.shape != (k,) or vote.classes.ndim != 1 or k < 1
                or (vote.scale <= 0).any() or (vote.classes < 0).any()
                or not all(np.isfinite(a).all() for a in (vote.mean, vote.scale, vote.weights,
                                                          vote.bias))):
            raise ValueError("inconsistent pixel vote")
        return vote


def fit_pixel_vote(images: Sequence[np.ndarray], annotations: Sequence[np.ndarray],
                   seed: int = 0) -> PixelVote | None:
    """The :class:`PixelVote` of painted planes (semantic annotations: 1 background,
    k + 1 class k), from at most ``VOTE_PIXELS // classes`` painted pixels of each class
    in each plane (so up to :data:`VOTE_PIXELS` a plane); classes weighed equally,
    weights kept small (L2), fitted by L-BFGS.
    None when fewer than two classes are painted."""
    rng = np.random.default_rng(seed)
    values = np.unique(np.concatenate([np.unique(a[a > 0]) for a in annotations]))
    if len(values) < 2:
        return None
    cap = max(1, VOTE_PIXELS // len(values))
    xs, ys = [], []
    for image, ann in zip(images, annotations):
        ann = np.asarray(ann)
        where = np.zeros(ann.shape, bool)
        for v in values:
            ys_, xs_ = np.nonzero(ann == v)
            if len(ys_) > cap:  # at most cap pixels of a class from one plane
                keep = rng.choice(len(ys_), cap, replace=False)
                ys_, xs_ = ys_[keep], xs_[keep]
            where[ys_, xs_] = True
        if where.any():
            xs.append(_features_at(image, where))
            ys.append(ann[where].astype(np.int64) - 1)
    x, y = np.concatenate(xs), np.concatenate(ys)
    classes = np.unique(y)
    yi = np.searchsorted(classes, y)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    n, f, k = len(yi), z.shape[1], len(classes)
    weight = (n / (k * np.bincount(yi, minlength=k).astype(np.float64)))[yi]  # (n,)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), yi] = 1.0

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: f * k].reshape(f, k), theta[f * k :]
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        loss = -(weight * (onehot * logp).sum(1)).sum() + 0.5 * (w**2).sum()
        g = weight[:, None] * (np.exp(logp) - onehot)  # d loss / d logits
        grad = np.concatenate([(z.T @ g + w).ravel(), g.sum(0)])
        return loss / n, grad / n

    fit = minimize(loss_and_grad, np.zeros(f * k + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 300})
    w, b = fit.x[: f * k].reshape(f, k), fit.x[f * k :]
    return PixelVote(mean, scale, w, b, classes)


@dataclass
class ObjectClassifier:
    """Nearest painted example in standardised object features."""

    examples: np.ndarray  # (N, F)
    classes: np.ndarray  # (N,) class of each example, 1..K
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    #: an object is where the probability of background is below this (:func:`foreground`)
    threshold: float = 0.5
    #: when set, it decides each object's class (the examples only describe the model)
    vote: PixelVote | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The class (1..K) of each row of ``features`` ``(M, F)``."""
        features = np.asarray(features, dtype=np.float64)
        if features.size == 0:
            return np.zeros(len(features), dtype=np.int64)
        if features.shape[1] != self.examples.shape[1]:
            raise CellfitError(
                f"the model's object examples have {self.examples.shape[1]} features and this "
                f"image gives {features.shape[1]}: give an image with the channels the model "
                "was trained on."
            )
        z = (features - self.mean) / self.scale
        ze = (self.examples - self.mean) / self.scale
        d = ((z[:, None, :] - ze[None, :, :]) ** 2).sum(-1)
        return self.classes[np.argmin(d, axis=1)]

    @property
    def n_channels(self) -> int:
        """The channels of the planes the examples were measured on."""
        return (self.examples.shape[1] - len(SHAPE_FEATURES)) // 2

    def channels_of(self, image: np.ndarray) -> np.ndarray:
        """``image`` ``(C, Y, X)`` (or ``(Y, X)``) with the examples' channels, as the
        model's own input is matched (:func:`cellfit.normalize.match_channels`)."""
        img = np.asarray(image)
        img = img[None] if img.ndim == 2 else img
        return match_channels(img[None], self.n_channels)[0]

    def leave_one_out(self) -> float | None:
        """Share of examples whose nearest other example has their class (None with
        fewer than two examples of any class): how well the features tell the
        painted classes apart."""
        counts = np.bincount(self.classes)
        keep = counts[self.classes] >= 2
        if not keep.any():
            return None
        ze = (self.examples - self.mean) / self.scale
        d = ((ze[:, None, :] - ze[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return float((self.classes[np.argmin(d, axis=1)] == self.classes)[keep].mean())

    def to_dict(self) -> dict:
        """Plain JSON numbers (kept in ``ModelInfo.postprocess["objects"]``)."""
        return {
            "examples": np.round(self.examples, 6).tolist(),
            "classes": self.classes.astype(int).tolist(),
            "mean": np.round(self.mean, 6).tolist(),
            "scale": np.round(self.scale, 6).tolist(),
            "threshold": float(self.threshold),
            **({"pixel_vote": self.vote.to_dict()} if self.vote is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ObjectClassifier:
        try:
            if not isinstance(d, Mapping):
                raise TypeError("not a mapping")
            examples = np.asarray(d["examples"], dtype=np.float64)
            classes = np.asarray(d["classes"], dtype=np.int64)
            mean = np.asarray(d["mean"], dtype=np.float64)
            scale = np.asarray(d["scale"], dtype=np.float64)
            threshold = float(d.get("threshold", 0.5))
            vote = PixelVote.from_dict(d["pixel_vote"]) if "pixel_vote" in d else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CellfitError(
                "the model's object examples are damaged: retrain the model or save it again."
            ) from exc
        if (examples.ndim != 2 or len(classes) != len(examples) or len(examples) == 0
                or examples.shape[1] <= len(SHAPE_FEATURES)
                or (examples.shape[1] - len(SHAPE_FEATURES)) % 2
                or mean.shape != (examples.shape[1],) or scale.shape != mean.shape
                or (scale <= 0).any() or not np.isfinite(examples).all()
                or not np.isfinite(mean).all() or not np.isfinite(scale).all()
                or not 0.0 < threshold <= 1.0
                or (vote is not None and len(vote.mean) != n_pixel_features(
                    (examples.shape[1] - len(SHAPE_FEATURES)) // 2))):
            raise CellfitError(
                "the model's object examples are damaged: retrain the model or save it again."
            )
        return cls(examples, classes, mean, scale, threshold, vote)


def rule_text(objects: Mapping | None) -> str:
    """How a semantic model with these object examples (``postprocess["objects"]``,
    None: none) decides classes, in words (``cellfit info``, the dock's Model tab)."""
    if not objects:
        return "each pixel takes its likeliest class"
    classes = objects["classes"]
    n_bg = sum(1 for k in classes if k == 0)
    bg = f", {n_bg} of them false objects painted as background" if n_bg else ""
    if objects.get("pixel_vote"):
        return ("each object found takes one class, the one most of its pixels look like "
                "(brightness, edges and texture at 6 scales), learnt from the painted pixels "
                f"of {len(classes)} objects{bg}")
    return (f"each object found takes one class, that of the most alike of {len(classes)} "
            f"painted objects{bg} (shape, size, brightness, texture)")


def valid_dict(d) -> bool:
    """Whether ``d`` is an :meth:`ObjectClassifier.to_dict` (the model file's check)."""
    try:
        ObjectClassifier.from_dict(d)
    except CellfitError:
        return False
    return bool(len(d["examples"]) <= MAX_EXAMPLES and all(0 <= k <= 1024 for k in d["classes"]))


def fit_classifier(examples: np.ndarray, classes: np.ndarray,
                   threshold: float = 0.5) -> ObjectClassifier | None:
    """The classifier of painted examples (None when there are none)."""
    examples = np.asarray(examples, dtype=np.float64)
    if examples.size == 0:
        return None
    mean = examples.mean(0)
    # each feature in units of its spread among the examples, but never finer than
    # RELATIVE_NOISE of its size: with one example per class, a feature that barely
    # differs between the classes (the same brightness for all) must not decide
    scale = np.sqrt(examples.var(0) + (RELATIVE_NOISE * np.abs(mean)) ** 2) + 1e-3
    return ObjectClassifier(examples, np.asarray(classes, dtype=np.int64), mean, scale,
                            float(threshold))


def foreground(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Where a semantic model's ``(K, Y, X)`` probabilities find an object: pixels whose
    probability of background is below ``threshold``."""
    return probs[0] < threshold


def classify_objects(image: np.ndarray, foreground: np.ndarray, classifier: ObjectClassifier,
                     n_classes: int) -> np.ndarray:
    """Class map (0 background, k class k) where each connected object of
    ``foreground`` takes one class, the class of its nearest painted example."""
    objects, n = ndi.label(np.asarray(foreground, dtype=bool))
    dtype = np.uint8 if n_classes <= 255 else np.uint16
    if n == 0:
        return np.zeros(objects.shape, dtype)
    image = classifier.channels_of(image)
    if classifier.vote is not None:
        lut = classifier.vote.object_classes(image, objects, n)
        lut[0] = 0
        return lut[objects].astype(dtype)
    ids, feats = object_features(image, objects)
    lut = np.zeros(n + 1, dtype=np.int64)
    lut[ids] = classifier.predict(feats)
    return lut[objects].astype(dtype)


def painted_ious(annotations: Sequence[np.ndarray], foregrounds: Sequence[np.ndarray]) -> list[float]:
    """For each painted object (connected piece of one class), the IoU of the piece
    with the foreground objects that touch it (0 where nothing was found on it).

    A nucleus painted whole matches the object the network finds there; a stroke
    across a region of tissue covers a small part of the region found there.
    """
    ious = []
    for ann, fg in zip(annotations, foregrounds):
        found, _ = ndi.label(np.asarray(fg, dtype=bool))
        areas = np.bincount(found.ravel())
        for _, pieces in _painted_pieces(ann):
            for k, sl in enumerate(ndi.find_objects(pieces), start=1):
                piece = pieces[sl] == k
                under = found[sl][piece]
                hit = np.unique(under[under > 0])
                inter = int((under > 0).sum())
                union = int(piece.sum()) + int(areas[hit].sum()) - inter
                ious.append(inter / union if union else 0.0)
    return ious


def best_threshold(annotations: Sequence[np.ndarray], probs: Sequence[np.ndarray]) -> tuple[float, float]:
    """The threshold of :data:`FG_THRESHOLDS` whose objects best match the painted
    objects' outlines (the largest mean :func:`painted_ious`; the first on a tie), and
    that mean."""
    best, score = FG_THRESHOLDS[0], -1.0
    for t in FG_THRESHOLDS:
        ious = painted_ious(annotations, [foreground(p, t) for p in probs])
        mean = float(np.mean(ious)) if ious else 0.0
        if mean > score + 1e-9:
            best, score = t, mean
    return best, score


def painted_whole(annotations: Sequence[np.ndarray], foregrounds: Sequence[np.ndarray]) -> tuple[int, int]:
    """How many painted objects the predicted foreground covers with about their
    outline (:func:`painted_ious` at least :data:`WHOLE_IOU`), and how many it found
    anything on (where it found nothing, it cannot tell)."""
    ious = [iou for iou in painted_ious(annotations, foregrounds) if iou > 0]
    return sum(iou >= WHOLE_IOU for iou in ious), len(ious)


def with_ring(annotation: np.ndarray, width: int = RING) -> np.ndarray:
    """A semantic annotation with the unpainted pixels within ``width`` of a painted
    object (value 2 or more) painted background (1); a new array."""
    ann = np.asarray(annotation)
    out = ann.copy()
    if width > 0 and (ann > 1).any():
        near = ndi.binary_dilation(ann > 1, iterations=int(width))
        out[near & (ann == 0)] = 1
    return out
