"""Many classes, one of which holds 99 % of the pixels (issue #15): a generated benchmark.

The images are generated here from a seed, so the benchmark needs no data and every
figure can be reproduced:

- **32 classes**: background (class 0, about 99 % of the pixels) and 31 rare object
  classes. Each rare class is one combination of a **shape** (disc, ellipse, rod, star,
  ring, crescent), a **size** (about 8, 18 or 36 pixels across, ±15 %, so the sizes never
  overlap) and a **texture** (flat, dotted, striped, noisy, hollow: a bright rim; the
  small objects are flat, too small to show a texture). Most
  classes have the **same mean brightness** (0.5 over a background of about 0.1): each
  object's texture is scaled so its mean over the object is exactly its class's
  brightness, so brightness alone cannot tell them apart; a few are dimmer (0.3) or
  brighter (0.8). The combinations are fixed (``CLASSES``); the seed draws the scenes.
- **Scenes**: objects at random places and angles, never touching; class frequencies
  fall off as 1/rank, so a few classes are common and most appear in a few images only
  (each at least twice in a set). The background is an uneven illumination with faint
  out-of-focus debris; the whole image is blurred (sigma 0.8) and gets Gaussian and
  shot-like noise.
- **Sparse annotation as a user paints it** (cellfit's semantic convention, see
  :mod:`cellfit.targets`: 0 not annotated, 1 background, k + 1 class k): about half of
  the objects of each class painted whole (at least one), and a few background strokes
  3 pixels wide away from the objects.

Training runs cellfit's engine in semantic mode (scratch, no validation hold-back, the
same steps, patch size and batch for all) with: plain cross-entropy without class
weights (``ce``), cellfit's defaults (focal + dice, balanced weights: ``defaults``),
focal alone and dice alone (balanced weights); and a random forest (scikit-learn, 100
trees, balanced class weights) on ilastik's multiscale features (Gaussian, gradient
magnitude, Laplacian of Gaussian, structure-tensor and Hessian eigenvalues at sigmas
0.7 to 10) trained on the same painted pixels (``rf``).

Scores on unseen generated test images (all pixels, pooled over the images): IoU per
class, the mean IoU over the 31 rare classes, how many rare classes reach IoU 0.5 and how
many stay at 0, and the bare pixel accuracy (which background alone holds near 0.99).

Usage::

    .venv/bin/python benchmarks/manyclass.py --steps 300 --size 384 --images 24 \\
        --configs ce defaults rf --json benchmarks/results/manyclass/base.json
    .venv/bin/python benchmarks/manyclass.py --report benchmarks/results/manyclass/base.json \\
        --write-docs

``--write-docs`` puts the table in ``docs/benchmarks.md`` between
``<!-- manyclass:start -->`` and ``<!-- manyclass:end -->``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import engine_version, machine, write_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- manyclass:start -->", "<!-- manyclass:end -->"
N_CLASSES = 32  # background + 31 rare classes
SHAPES = ("disc", "ellipse", "rod", "star", "ring", "crescent")
SIZES = {"small": 8.0, "medium": 18.0, "large": 36.0}  # diameters in pixels
TEXTURES = ("flat", "dotted", "striped", "noisy", "hollow")
BRIGHT = 0.5  # the mean brightness most classes share
FG_SHARE = 0.01  # share of object pixels in a set
CONFIGS = {  # name -> TrainConfig settings (rf: the random forest)
    "ce": {"loss": "ce", "class_weights": "none", "classify": "pixels"},
    # as `cellfit train --mode semantic` does: the starting model's features, new classes,
    # classes by whole objects when the painted classes are whole objects
    "defaults": {"init": "starting"},
    # the user's one choice "Classes are: kinds of object" (a ring of background round
    # each painted object while training; later trainings of a model that chose
    # objects by itself do the same)
    "objects": {"init": "starting", "classify": "objects"},
    # the same network, each pixel its likeliest class (the defaults before objects)
    "pixels": {"init": "starting", "classify": "pixels"},
    "scratch": {},
    # the defaults with class-balanced patches and weights from what the patches hold
    # (cellfit.train.SEMANTIC_CLASS_SAMPLING / SEMANTIC_SAMPLED_WEIGHTS, off by default)
    "sampled": {"init": "starting"},
    "focal": {"loss": "focal", "class_weights": "balanced"},
    "dice": {"loss": "dice", "class_weights": "balanced"},
    "rf": None,
    # ilastik's object workflow: the forest's pixels, then cellfit's object classes
    "rf-objects": None,
}


@dataclass(frozen=True)
class ObjectClass:
    shape: str
    size: str
    texture: str
    brightness: float

    @property
    def name(self) -> str:
        return f"{self.size} {self.texture} {self.shape}"


def _classes() -> tuple[ObjectClass, ...]:
    """The 31 rare classes: fixed combinations (independent of the benchmark's seed).

    Every class can be told from the others by eye: a texture (period 4–5 pixels) is
    only visible on an object at least three periods across, so the small objects
    (8 pixels) are all flat and differ by shape (one class per shape); the other 25
    are drawn among the medium and large shape × texture combinations.
    """
    rng = np.random.default_rng(15)
    small = [(shape, "small", "flat") for shape in SHAPES]
    combos = list(product(SHAPES, ("medium", "large"), TEXTURES))
    picked = small + [combos[i] for i in rng.permutation(len(combos))[: 31 - len(small)]]
    # 23 share BRIGHT; 4 dimmer, 4 brighter
    levels = [BRIGHT] * 23 + [0.3] * 4 + [0.8] * 4
    levels = [levels[i] for i in rng.permutation(31)]
    return tuple(ObjectClass(s, z, t, b) for (s, z, t), b in zip(picked, levels))


CLASSES = _classes()
CLASS_NAMES = ["background"] + [c.name for c in CLASSES]
SINGLE_NAMES = ["background", "object"]


# ------------------------------------------------------------------------- generator
def _shape_mask(shape: str, r: float, angle: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of one object in a square box, and the rotated coordinates (u, v)."""
    h = int(np.ceil(r)) + 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disc":
        m = rho <= r
    elif shape == "ellipse":
        m = (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1
    elif shape == "rod":
        w = max(0.22 * r, 1.2)
        m = np.hypot(np.clip(np.abs(u) - (r - w), 0, None), v) <= w
    elif shape == "star":
        m = rho <= r * (0.55 + 0.45 * np.cos(5 * phi))
    elif shape == "ring":
        m = (rho <= r) & (rho >= max(0.55 * r, r - 6))
    elif shape == "crescent":
        m = (rho <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    else:
        raise ValueError(shape)
    return m, u, v


def _texture(texture: str, m: np.ndarray, u: np.ndarray, v: np.ndarray, rng) -> np.ndarray:
    """A positive texture over the mask, scaled to mean 1 inside it."""
    if texture == "flat":
        t = np.ones(m.shape)
    elif texture == "dotted":
        t = 0.35 + 1.6 * ((np.mod(u, 4.0) < 2) & (np.mod(v, 4.0) < 2))
    elif texture == "striped":
        t = 1.0 + 0.75 * np.sin(2 * np.pi * u / 5.0)
    elif texture == "noisy":
        t = np.clip(1.0 + 0.7 * ndi.gaussian_filter(rng.normal(size=m.shape), 0.7) * 2.2, 0.05, None)
    elif texture == "hollow":
        inner = ndi.binary_erosion(m, iterations=2)
        t = np.where(inner, 0.25, 1.0)
    else:
        raise ValueError(texture)
    t = np.where(m, t, 0.0)
    return t / max(t[m].mean(), 1e-9)


@dataclass
class Scene:
    image: np.ndarray  # float32 (Y, X), what the network and the forest see
    classes: np.ndarray  # uint8 (Y, X), 0 background, 1..31
    objects: np.ndarray  # int32 (Y, X), one id per object
    signal: np.ndarray  # float32 (Y, X), the objects alone (before blur, noise, background)
    annotation: np.ndarray | None = None  # uint8, cellfit's semantic convention


def _class_list(rng, n_images: int, size: int, min_per_class: int = 2) -> list[int]:
    """Class of every object of a set: each class ``min_per_class`` times, then draws
    with weights falling off as 1/rank (the rank order drawn per set) until the objects
    cover about ``FG_SHARE`` of the set."""
    area = np.array([_area(c) for c in CLASSES])
    target = FG_SHARE * n_images * size * size
    out = [k for k in range(1, N_CLASSES) for _ in range(min_per_class)]
    order = rng.permutation(31)
    w = 1.0 / (1.0 + np.argsort(order))
    w /= w.sum()
    total = float(sum(area[k - 1] for k in out))
    while total < target:
        k = int(rng.choice(31, p=w)) + 1
        out.append(k)
        total += area[k - 1]
    return [out[i] for i in rng.permutation(len(out))]


def _area(c: ObjectClass) -> float:
    m, _, _ = _shape_mask(c.shape, SIZES[c.size] / 2, 0.0, None)
    return float(m.sum())


def generate(seed: int, n_images: int, size: int = 384) -> list[Scene]:
    """``n_images`` scenes of ``size``² pixels, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    ks = _class_list(rng, n_images, size)
    per_image: list[list[int]] = [[] for _ in range(n_images)]
    load = np.zeros(n_images)
    for k in sorted(ks, key=lambda k: -_area(CLASSES[k - 1])):  # largest first, least loaded image
        i = int(np.argmin(load + rng.uniform(0, 1e-3, n_images)))
        per_image[i].append(k)
        load[i] += _area(CLASSES[k - 1])
    return [_scene(np.random.default_rng([seed, i]), per_image[i], size) for i in range(n_images)]


def _scene(rng, ks: list[int], size: int) -> Scene:
    signal = np.zeros((size, size))
    classes = np.zeros((size, size), np.uint8)
    objects = np.zeros((size, size), np.int32)
    taken = np.zeros((size, size), bool)
    n = 0
    for k in ks:
        c = CLASSES[k - 1]
        r = SIZES[c.size] / 2 * rng.uniform(0.87, 1.15)
        m, u, v = _shape_mask(c.shape, r, rng.uniform(0, 2 * np.pi), rng)
        t = c.brightness * _texture(c.texture, m, u, v, rng)
        h = m.shape[0]
        grown = ndi.binary_dilation(m, iterations=3)
        for _ in range(200):  # a free place, objects 3 pixels apart at least
            y, x = (int(p) for p in rng.integers(0, size - h, 2))
            if not (taken[y : y + h, x : x + h] & grown).any():
                break
        else:
            continue
        n += 1
        sl = (slice(y, y + h), slice(x, x + h))
        taken[sl] |= grown
        signal[sl][m] = t[m]
        classes[sl][m] = k
        objects[sl][m] = n
    # background: uneven illumination, faint out-of-focus debris (background class)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b, ph = rng.uniform(-1, 1, 3)
    back = 0.1 + 0.04 * (a * yy + b * xx) + 0.03 * np.sin(2 * np.pi * (yy + xx) * 0.7 + ph * 3)
    debris = np.zeros((size, size))
    pts = rng.integers(0, size, (max(3, size * size // 8000), 2))
    debris[pts[:, 0], pts[:, 1]] = rng.uniform(0.2, 0.6, len(pts)) * 60
    back = back + ndi.gaussian_filter(debris, 3.0) + ndi.gaussian_filter(rng.normal(size=(size, size)), 8) * 0.3
    img = ndi.gaussian_filter(back + signal, 0.8)
    img = img + rng.normal(size=img.shape) * (0.02 + 0.05 * np.sqrt(np.clip(img, 0, None)))
    return Scene(img.astype(np.float32), classes, objects, signal.astype(np.float32))


def paint(scenes: list[Scene], seed: int, strokes: int = 4) -> None:
    """The user's sparse annotation, in ``scene.annotation``: about half the objects of
    each class painted whole (at least one), ``strokes`` background strokes per image."""
    rng = np.random.default_rng([seed, 99])
    by_class: dict[int, list[tuple[int, int]]] = {}
    for i, s in enumerate(scenes):
        ids = np.unique(s.objects[s.objects > 0])
        cls = ndi.maximum(s.classes, s.objects, ids)
        for j, k in zip(ids, cls):
            by_class.setdefault(int(k), []).append((i, int(j)))
    chosen: set[tuple[int, int]] = set()
    for _, objs in sorted(by_class.items()):
        n = max(1, int(round(len(objs) / 2)))
        chosen.update(objs[j] for j in rng.permutation(len(objs))[:n])
    for i, s in enumerate(scenes):
        ann = np.zeros(s.classes.shape, np.uint8)
        ids = [j for (ii, j) in chosen if ii == i]
        if ids:
            sel = np.isin(s.objects, ids)
            ann[sel] = s.classes[sel] + 1
        far = ~ndi.binary_dilation(s.objects > 0, iterations=4)
        size = s.classes.shape[0]
        for _ in range(strokes):  # a wavy stroke, 3 pixels wide
            p = rng.uniform(0, size, 2)
            ang = rng.uniform(0, 2 * np.pi)
            line = np.zeros_like(far)
            for _ in range(int(rng.integers(30, 90))):
                ang += rng.normal(0, 0.15)
                p = np.clip(p + 2 * np.array([np.sin(ang), np.cos(ang)]), 0, size - 1)
                line[int(p[0]), int(p[1])] = True
            line = ndi.binary_dilation(line, iterations=1) & far
            ann[line & (ann == 0)] = 1
        s.annotation = ann


# --------------------------------------------------------------------------- methods
def ilastik_features(img: np.ndarray) -> np.ndarray:
    """ilastik's pixel features (Gaussian, gradient magnitude, Laplacian of Gaussian,
    structure-tensor and Hessian eigenvalues at each of its scales), ``(Y, X, F)``: the
    ones cellfit's class vote learns from (:func:`cellfit.objectclass.pixel_features`)."""
    from cellfit.objectclass import pixel_features

    return np.stack(list(pixel_features(img)), -1).astype(np.float32)


def run_forest(train: list[Scene], test: list[Scene], seed: int, log,
               objects: bool = False) -> tuple[list[np.ndarray], dict]:
    """The random forest on ilastik's pixel features; with ``objects``, its objects
    (pixels not called background) then take the class of the most alike painted
    object as cellfit's object classes do (:mod:`cellfit.objectclass`)."""
    from sklearn.ensemble import RandomForestClassifier

    from cellfit.objectclass import classify_objects, examples_from_found, fit_classifier

    t0 = time.perf_counter()
    xs, ys = [], []
    for s in train:
        keep = s.annotation > 0
        xs.append(ilastik_features(s.image)[keep])
        ys.append(s.annotation[keep].astype(np.int64) - 1)
    clf = RandomForestClassifier(n_estimators=100, class_weight="balanced", n_jobs=2,
                                 random_state=seed)
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    fit_s = time.perf_counter() - t0
    log(f"rf: fitted on {sum(len(y) for y in ys)} painted pixels in {fit_s:.0f} s")
    def pixels(s: Scene) -> np.ndarray:
        f = ilastik_features(s.image)
        return clf.predict(f.reshape(-1, f.shape[-1])).reshape(s.image.shape).astype(np.uint8)

    preds = [pixels(s) for s in test]
    if objects:
        ex = [examples_from_found(s.image[None], s.annotation, pixels(s) > 0) for s in train]
        objs = fit_classifier(np.concatenate([f for f, _ in ex]), np.concatenate([k for _, k in ex]))
        preds = [classify_objects(s.image[None], p > 0, objs, N_CLASSES) for s, p in zip(test, preds)]
    return preds, {"seconds": round(time.perf_counter() - t0, 1), "fit_seconds": round(fit_s, 1)}


def single_class(scenes: list[Scene]) -> list[Scene]:
    """The same scenes with every object of one class ("object"): the single-class case
    (foreground against background) of semantic mode."""
    out = []
    for s in scenes:
        ann = None if s.annotation is None else np.minimum(s.annotation, 2)
        out.append(Scene(s.image, (s.classes > 0).astype(np.uint8), s.objects, s.signal, ann))
    return out


def run_cellfit(name: str, train: list[Scene], test: list[Scene], args, log,
                names: list[str] = CLASS_NAMES) -> tuple[list[np.ndarray], dict]:
    import torch

    import cellfit.train as train_module
    from cellfit.postprocess import labels_from_probs
    from cellfit.predict import predict_stack
    from cellfit.train import TrainConfig, Trainer

    settings = dict(mode="semantic", steps=args.steps, time_limit=None, seed=args.seed,
                    device=args.device, patch_size=args.patch, batch_size=args.batch,
                    val_fraction=0.0, scale=1.0, class_names=list(names), **CONFIGS[name])
    cfg = TrainConfig(**settings)
    t0 = time.perf_counter()
    flags = train_module.SEMANTIC_CLASS_SAMPLING, train_module.SEMANTIC_SAMPLED_WEIGHTS
    if name == "sampled":
        train_module.SEMANTIC_CLASS_SAMPLING = train_module.SEMANTIC_SAMPLED_WEIGHTS = True
    try:
        trainer = Trainer([s.image for s in train], [s.annotation for s in train], cfg)
    finally:
        train_module.SEMANTIC_CLASS_SAMPLING, train_module.SEMANTIC_SAMPLED_WEIGHTS = flags
    losses = []
    for ev in trainer.run():
        if getattr(ev, "loss", None) is not None:
            losses.append(float(ev.loss))
        if ev.step and ev.step % max(1, args.steps // 5) == 0 and ev.loss is not None:
            log(f"{name}: step {ev.step}/{args.steps} loss {ev.loss:.4f}")
    train_s = time.perf_counter() - t0
    model, info = trainer.model, trainer.info
    preds = []
    with torch.no_grad():
        for s in test:
            p = predict_stack(model, info, s.image, device=args.device)[0]
            preds.append(labels_from_probs(p, "semantic", image=s.image[None], **info.postprocess))
    return preds, {"seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_s, 1),
                   "objects": info.training[-1].get("objects"),
                   "n_classes": int(info.n_classes), "loss_start": losses[0] if losses else None,
                   "loss_end": float(np.mean(losses[-10:])) if losses else None}


def score(preds: list[np.ndarray], test: list[Scene], names: list[str] = CLASS_NAMES) -> dict:
    """IoU per class (pooled over the test images), the rare classes' summary, pixel accuracy."""
    n = len(names)
    cm = np.zeros((n, n), np.int64)
    for p, s in zip(preds, test):
        cm += np.bincount(s.classes.ravel().astype(np.int64) * n + np.minimum(p.ravel(), n - 1),
                          minlength=n**2).reshape(n, n)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = cm.sum(1)[1:] > 0
    rare = iou[1:][present]
    return {
        "iou": {names[k]: (None if np.isnan(iou[k]) else round(float(iou[k]), 4))
                for k in range(n)},
        "mean_rare_iou": round(float(np.nanmean(rare)), 4),
        "rare_above_half": int((rare > 0.5).sum()),
        "rare_at_zero": int((rare == 0).sum()),
        "rare_in_test": int(present.sum()),
        "pixel_accuracy": round(float(tp.sum() / cm.sum()), 4),
        "background_iou": round(float(iou[0]), 4),
        # where the errors go: background called a rare class (false alarms), rare pixels
        # called background (misses), rare pixels called another rare class (confusions)
        "background_to_rare": round(float(cm[0, 1:].sum() / max(cm[0].sum(), 1)), 4),
        "rare_to_background": round(float(cm[1:, 0].sum() / max(cm[1:].sum(), 1)), 4),
        "rare_to_other_rare": round(float((cm[1:, 1:].sum() - tp[1:].sum()) / max(cm[1:].sum(), 1)), 4),
        "rare_precision": round(float(np.nanmean(np.where(cm.sum(0)[1:] > 0, tp[1:] / np.maximum(cm.sum(0)[1:], 1), np.nan))), 4),
        "rare_recall": round(float(np.mean((tp[1:] / np.maximum(cm.sum(1)[1:], 1))[present])), 4),
    }


# ---------------------------------------------------------------------------- report
ROW_WORDS = {"ce": "cross-entropy, no weights, each pixel its class",
             "defaults": "cellfit defaults",
             "pixels": "cellfit defaults, each pixel its class",
             "objects": "cellfit, Classes are: kinds of object",
             "rf-objects": "random forest's objects, classed by cellfit's object classes",
             "scratch": "cellfit defaults from random weights",
             "sampled": "defaults, class-balanced patches and weights",
             "focal": "cellfit defaults with focal loss alone", "dice": "cellfit defaults with dice loss alone",
             "rf": "random forest (ilastik features), each pixel its class"}


def _pct(s: dict, key: str) -> str:
    return "–" if s.get(key) is None else f"{100 * s[key]:.1f} %"


def table(res: dict) -> str:
    lines = ["| method | mean IoU, 31 rare classes | rare classes IoU > 0.5 | rare classes at IoU 0 "
             "| background IoU | background called rare | rare called background | rare called another rare "
             "| pixel accuracy | time |", "|---|---|---|---|---|---|---|---|---|---|"]
    n = res["runs"] and next(iter(res["runs"].values()))["scores"]["rare_in_test"]
    for name, r in res["runs"].items():
        s = r["scores"]
        lines.append(f"| {ROW_WORDS.get(name, name)} | {s['mean_rare_iou']:.3f} | {s['rare_above_half']} / {n} "
                     f"| {s['rare_at_zero']} / {n} | {s['background_iou']:.3f} | {_pct(s, 'background_to_rare')} "
                     f"| {_pct(s, 'rare_to_background')} | {_pct(s, 'rare_to_other_rare')} | {s['pixel_accuracy']:.4f} "
                     f"| {r['info']['seconds']:.0f} s |")
    return "\n".join(lines)


def per_class_table(res: dict) -> str:
    names = list(res["runs"])
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in next(iter(res["runs"].values()))["scores"]["iou"] if res["runs"] else []:
        cells = []
        for n in names:
            v = res["runs"][n]["scores"]["iou"].get(c)
            cells.append("–" if v is None else f"{v:.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _single_section(res: dict) -> list[str]:
    runs = (res.get("single") or {}).get("runs") or {}
    if not runs:
        return []
    lines = ["The same scenes with every object in one class (semantic mode with 1 class: "
             "object against background), the same steps:", "",
             "| method | object IoU | background IoU | objects called background "
             "| background called object | pixel accuracy | time |", "|---|---|---|---|---|---|---|"]
    words = {"ce": "cross-entropy (binary: 2 classes), no weights"}
    for name, r in runs.items():
        s = r["scores"]
        lines.append(f"| {words.get(name, ROW_WORDS.get(name, name))} | {s['mean_rare_iou']:.3f} "
                     f"| {s['background_iou']:.3f} | {_pct(s, 'rare_to_background')} "
                     f"| {_pct(s, 'background_to_rare')} | {s['pixel_accuracy']:.4f} "
                     f"| {r['info']['seconds']:.0f} s |")
    return lines + [""]


def section(res: dict) -> str:
    a = res["args"]
    return "\n".join([
        START,
        "## Many classes, one holding 99 % of the pixels (generated)",
        "",
        "`benchmarks/manyclass.py` generates its own images from a seed: 31 rare object classes "
        "(shape × size × texture, most of the same mean brightness) on a background holding "
        f"{100 * res['background_share']:.1f} % of the pixels; about half the objects of each class "
        "painted whole plus a few background strokes away from the objects. All cellfit runs: "
        f"semantic mode, {a['steps']} steps, patch {a['patch']}, batch {a['batch']}, from the "
        "starting model's layers with a new last layer (cross-entropy: from random weights). "
        "Rows: *cellfit defaults* is `cellfit train --mode semantic` as it is (focal + dice, "
        "balanced weights with background weighed against all objects together, classes by "
        "whole objects when the painted objects were whole: decided a third into the run and "
        "again at its end); *Classes are: kinds of object* is the one choice a user can make "
        "(`--classify objects`: the background ring round painted objects from the first step); "
        "*each pixel its class* is the same network classed pixel by pixel (`--classify pixels`); "
        "*random forest's objects* is ilastik's object workflow on the forest's pixels, with "
        "cellfit's object classes.",
        "",
        f"Command: `{res['command']}` ({a['images']} training and {a['test_images']} test images of "
        f"{a['size']}² pixels, seed {a['seed']}; {res['machine']}; engine {res['engine']}).",
        "",
        table(res),
        "",
        *_single_section(res),
        "<details><summary>IoU per class</summary>",
        "",
        per_class_table(res),
        "",
        "</details>",
        END,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24, help="training images")
    p.add_argument("--test-images", type=int, default=40,
                   help="test images (with 8, two objects per class: one object moves a class by 0.5)")
    p.add_argument("--size", type=int, default=384, help="image side in pixels")
    p.add_argument("--steps", type=int, default=1000, help="training steps of every cellfit run")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--configs", nargs="+", default=["ce", "defaults", "focal", "dice", "rf"],
                   choices=list(CONFIGS))
    p.add_argument("--single-configs", nargs="*", default=["ce", "defaults"], choices=list(CONFIGS),
                   help="also run these on the same scenes with all objects in one class")
    p.add_argument("--json", type=Path, help="write the results here (after every method)")
    p.add_argument("--report", type=Path, help="only print (and --write-docs) this JSON's table")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.report:
        res = json.loads(args.report.read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        train = generate(args.seed, args.images, args.size)
        test = generate(args.seed + 1000, args.test_images, args.size)
        paint(train, args.seed)
        bg = float(np.mean([(s.classes == 0).mean() for s in train + test]))
        painted = np.bincount(np.concatenate([s.annotation.ravel() for s in train]), minlength=N_CLASSES + 1)
        log(f"generated {len(train)}+{len(test)} images in {time.perf_counter() - t0:.0f} s; "
            f"background {100 * bg:.2f} %; painted pixels: background {painted[1]}, "
            f"classes min {painted[2:].min()} max {painted[2:].max()}")
        res = {"command": "python benchmarks/manyclass.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": machine(), "engine": engine_version(), "background_share": round(bg, 4),
               "painted_pixels": painted[1:].tolist(), "runs": {}, "single": {"runs": {}}}
        sets = [(res["runs"], args.configs, train, test, CLASS_NAMES, "")]
        if args.single_configs:
            sets.append((res["single"]["runs"], args.single_configs, single_class(train),
                         single_class(test), SINGLE_NAMES, "1 class, "))
        for runs, configs, tr, te, names, tag in sets:
            for name in configs:
                log(f"{tag}{name}: start")
                if name in ("rf", "rf-objects"):
                    preds, info = run_forest(tr, te, args.seed, log, objects=name == "rf-objects")
                else:
                    preds, info = run_cellfit(name, tr, te, args, log, names)
                runs[name] = {"info": info, "scores": score(preds, te, names)}
                s = runs[name]["scores"]
                log(f"{tag}{name}: mean rare IoU {s['mean_rare_iou']:.3f}, >0.5: {s['rare_above_half']}, "
                    f"at 0: {s['rare_at_zero']}, pixel accuracy {s['pixel_accuracy']:.4f} ({info['seconds']:.0f} s)")
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    if args.write_docs:
        write_section(REPO / "docs" / "benchmarks.md", section(res), START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
