"""Quality benchmark: cellfit against peers, all trained on the same sparse annotation.

On ``../shared/data/nuclei-u2os`` (widefield fluorescence nuclei with complete hand
segmentation), a sparse annotation is made from the truth of ``--n-train`` images,
the way a user paints in napari: a ``--fraction`` of the nuclei painted whole
(ids >= 2), a thin background ring around them and a few background strokes (1),
everything else 0 (not annotated). Each method learns from that annotation only
and segments ``--n-test`` other images, which are scored against their complete
masks (instance AP = TP / (TP + FP + FN), F1, precision and recall at IoU 0.5,
TP / FP / FN pooled over the test images, plus the mean AP over IoU 0.5 … 0.95).

Methods
-------
otsu
    Unsupervised: Otsu threshold of a lightly smoothed image, then a distance-transform
    watershed. It uses nothing from the annotation.
rf
    A random-forest pixel classifier on multiscale intensity / edge / texture features
    (scikit-image's trainable segmentation, as ilastik does), trained on the annotated
    pixels (background vs. cell), then the same distance watershed on its foreground.
cellfit-naive
    cellfit's network trained the naive way: unannotated pixels called background,
    plain cross-entropy, no class weights, patches drawn uniformly.
cellfit
    cellfit with its defaults (unannotated pixels ignored, focal + dice, balanced
    class weights, patches centred on cells over-represented).

The watershed shared by ``otsu`` and ``rf`` takes its scale from the image itself (the
area-weighted median area of the foreground's components), so no parameter is tuned to
this data set.

Usage::

    .venv/bin/python benchmarks/quality.py                       # full run, ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --minutes 0.3 --n-test 2 --no-write   # smoke test

The table is printed and written to ``docs/benchmarks.md`` between the markers
``<!-- quality:start -->`` and ``<!-- quality:end -->`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.feature import multiscale_basic_features, peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import watershed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "nuclei-u2os"
DEFAULT_MD = REPO / "docs" / "benchmarks.md"
METHODS = ("otsu", "rf", "cellfit-naive", "cellfit")
MARK_START = "<!-- quality:start -->"
MARK_END = "<!-- quality:end -->"
SECTION_TITLE = "## Quality on nuclei-u2os (issue: engine)"

# sparse annotation: a thin ring of background around each painted cell, a few strokes
RING = 4
STROKES = 5
# smallest object kept by every method (cellfit's own default, for a like-for-like count)
MIN_SIZE = 16


# ----------------------------------------------------------------------------- data
@dataclass
class Sample:
    """One image of the data set with its complete instance mask."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def list_names(data: Path) -> list[str]:
    """Names (``NNN``) of the images that have a mask, sorted."""
    names = sorted(p.stem for p in (data / "images").glob("*.tif"))
    names = [n for n in names if (data / "masks" / f"{n}.tif").exists()]
    if not names:
        raise SystemExit(f"no images/NNN.tif with masks/NNN.tif found under {data}")
    return names


def load(data: Path, name: str) -> Sample:
    """Read one image and its mask."""
    image = tifffile.imread(data / "images" / f"{name}.tif")
    mask = tifffile.imread(data / "masks" / f"{name}.tif").astype(np.int32)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., 0]
    return Sample(name, image, mask)


def split(
    names: Sequence[str], n_train: int, n_test: int, seed: int
) -> tuple[list[str], list[str]]:
    """Disjoint training and test names, drawn deterministically from ``seed``."""
    if n_train + n_test > len(names):
        raise SystemExit(f"asked for {n_train} + {n_test} images but the set has {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    pick = [names[i] for i in order]
    return sorted(pick[:n_train]), sorted(pick[n_train : n_train + n_test])


# ------------------------------------------------------------------------ watershed
def distance_watershed(foreground: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Split a binary foreground into objects with a distance-transform watershed.

    The scale comes from the foreground itself: ``r`` is the equivalent radius of the
    component a typical foreground pixel belongs to (the area-weighted median of the
    component areas, so specks of noise do not shrink it). It sets the smoothing of
    the distance map (``r / 8``) and the least distance between two seeds (``r / 2``),
    so touching round objects split while one large object does not shatter.
    """
    fg = ndi.binary_fill_holes(foreground)
    comps, n = ndi.label(fg)
    if n == 0:
        return np.zeros(fg.shape, np.int32)
    areas = np.bincount(comps.ravel())[1:]
    areas = areas[areas >= min_size]
    r = float(np.sqrt(_weighted_median(areas) / np.pi)) if len(areas) else 3.0
    dist = ndi.distance_transform_edt(fg)
    dist = ndi.gaussian_filter(dist, max(1.0, r / 8))
    min_distance = max(2, round(r / 2))
    peaks = peak_local_max(
        dist,
        min_distance=min_distance,
        footprint=np.ones((2 * min_distance + 1,) * 2, bool),
        labels=comps,
        exclude_border=False,
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    return _drop_small(labels, min_size)


def _weighted_median(areas: np.ndarray) -> float:
    """Median of ``areas`` weighted by themselves (the area of a random pixel's object)."""
    a = np.sort(areas.astype(np.float64))
    cum = np.cumsum(a)
    return float(a[np.searchsorted(cum, cum[-1] / 2)])


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels).astype(np.int32)


def _smooth(image: np.ndarray) -> np.ndarray:
    return gaussian(image.astype(np.float32), sigma=1.0, preserve_range=True)


# -------------------------------------------------------------------------- methods
@dataclass
class Result:
    """What one method produced: labels per test image and timings."""

    method: str
    labels: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    train_s: float = 0.0
    predict_s: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


Progress = Callable[[str], None]


def annotated_min_size(anns: list[np.ndarray], fraction: float | None = None) -> int:
    """The size filter cellfit learns from an annotation, for the peers too:
    ``fraction`` (cellfit's, by default) of the median annotated cell area (at least
    MIN_SIZE px)."""
    if fraction is None:
        from cellfit.starting import MIN_SIZE_FRACTION as fraction
    areas = []
    for a in anns:
        sizes = np.bincount(np.where(a >= 2, a, 0).ravel().astype(np.int64))[2:]
        areas.extend(sizes[sizes > 0].tolist())
    return max(MIN_SIZE, int(fraction * np.median(areas))) if areas else MIN_SIZE


def run_otsu(
    train: list[Sample], anns: list[np.ndarray], test: list[Sample], log: Progress
) -> Result:
    """Otsu threshold + distance watershed (unsupervised; only the size filter comes
    from the annotation, as for every method)."""
    res = Result("otsu", note="unsupervised; size filter from the annotation")
    min_size = annotated_min_size(anns)
    t0 = time.perf_counter()
    for s in test:
        img = _smooth(s.image)
        res.labels.append(distance_watershed(img > threshold_otsu(img), min_size))
    res.predict_s = time.perf_counter() - t0
    return res


def _features(image: np.ndarray) -> np.ndarray:
    """ilastik-like multiscale features of a percentile-normalised image."""
    lo, hi = np.percentile(image, (1.0, 99.8))
    img = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return multiscale_basic_features(
        img, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16
    )


def run_rf(
    train: list[Sample], anns: list[np.ndarray], test: list[Sample], log: Progress, seed: int
) -> Result:
    """Random-forest pixel classifier on multiscale features + distance watershed."""
    from skimage.future import fit_segmenter, predict_segmenter
    from sklearn.ensemble import RandomForestClassifier

    res = Result("rf", note="RF(50 trees, depth 10) on annotated pixels")
    t0 = time.perf_counter()
    feats, labels = [], []
    for s, a in zip(train, anns):
        f = _features(s.image)
        keep = a > 0
        feats.append(f[keep])
        labels.append(np.where(a[keep] >= 2, 2, 1).astype(np.uint8))
    clf = RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10, random_state=seed)
    # fit_segmenter takes an image-shaped label array; the annotated pixels of all
    # training images are stacked into one column "image" so a single forest is fit.
    x = np.concatenate(feats)[:, None, :]
    y = np.concatenate(labels)[:, None]
    clf = fit_segmenter(y, x, clf)
    res.train_s = time.perf_counter() - t0
    res.extra["train_pixels"] = len(y)
    log(f"  rf: fit on {len(y)} annotated pixels in {res.train_s:.1f} s")
    t0 = time.perf_counter()
    for s in test:
        seg = predict_segmenter(_features(s.image), clf)
        res.labels.append(distance_watershed(seg == 2, annotated_min_size(anns)))
    res.predict_s = time.perf_counter() - t0
    return res


def run_cellfit(
    train: list[Sample],
    anns: list[np.ndarray],
    test: list[Sample],
    log: Progress,
    seed: int,
    minutes: float,
    naive: bool,
    steps: int | None = None,
    device: str = "cpu",
    keep_probs: bool = False,
    save_model: Path | None = None,
) -> Result:
    """cellfit's Trainer with its defaults, or the naive baseline (plain CE, unmasked labels)."""
    from cellfit.postprocess import labels_from_probs
    from cellfit.predict import predict_stack
    from cellfit.train import TrainConfig, Trainer

    name = "cellfit-naive" if naive else "cellfit"
    if naive:
        anns = [np.where(a == 0, 1, a).astype(a.dtype) for a in anns]
        cfg = TrainConfig(
            time_limit=None if steps else minutes * 60,
            steps=steps,
            loss="ce",
            class_weights="none",
            fg_fraction=0.0,
            seed=seed,
            device=device,
        )
        note = "unannotated = background, plain CE, no weights, uniform patches"
    else:
        cfg = TrainConfig(
            time_limit=None if steps else minutes * 60, steps=steps, seed=seed, device=device
        )
        note = "defaults (focal+dice, balanced weights, unannotated ignored)"
    res = Result(name, note=note)
    t0 = time.perf_counter()
    trainer = Trainer([s.image for s in train], anns, cfg)
    last_report = 0.0
    for ev in trainer.run():
        if ev.validation is not None or ev.elapsed - last_report >= 30 or ev.done:
            last_report = ev.elapsed
            val = ev.validation or {}
            log(
                f"  {name}: step {ev.step:4d}  {ev.elapsed:5.0f}s  loss {ev.loss:.4f}"
                + (f"  val AP50 {val['ap50']:.3f}" if "ap50" in val else "")
            )
    res.train_s = time.perf_counter() - t0
    if save_model is not None:
        trainer.save(save_model)
    record = trainer.info.training[-1]
    res.extra = {
        "steps": record["steps"],
        "best_step": record["best_step"],
        "batch_size": record["batch_size"],
        "val_ap50": (record["validation"] or {}).get("ap50"),
        "scale": float(getattr(trainer.info, "scale", 1.0) or 1.0),
    }
    t0 = time.perf_counter()
    for s in test:
        probs = predict_stack(trainer.model, trainer.info, s.image)
        res.labels.append(
            labels_from_probs(probs[0], trainer.info.mode, **trainer.info.postprocess)
        )
        if keep_probs:
            res.probs.append(probs[0])
    res.predict_s = time.perf_counter() - t0
    return res


# -------------------------------------------------------------------------- scoring
def score(res: Result, test: list[Sample]) -> dict:
    """Pooled instance metrics of one method over the test images."""
    from cellfit.metrics import aggregate_instance_metrics, instance_metrics

    per = [instance_metrics(p, s.mask) for p, s in zip(res.labels, test)]
    agg = aggregate_instance_metrics(per)
    t = agg["per_threshold"][0.5]
    agg["tp"], agg["fp"], agg["fn"] = t["tp"], t["fp"], t["fn"]
    agg["per_image_ap50"] = [m[0.5]["ap"] for m in per]
    return agg


def table(results: list[Result], scores: list[dict]) -> str:
    """Markdown table of the results."""
    head = (
        "| method | AP@0.5 | F1@0.5 | precision | recall | AP@0.5:0.95 | TP / FP / FN "
        "| train (s) | predict (s) | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r, s in zip(results, scores):
        notes = r.note
        if "steps" in r.extra:
            notes += f"; {r.extra['steps']} steps, best at {r.extra['best_step']}"
            notes += f", image scale {r.extra['scale']:.3g}"
        rows.append(
            f"| {r.method} | **{s['ap50']:.3f}** | {s['f1_50']:.3f} | {s['precision_50']:.3f} "
            f"| {s['recall_50']:.3f} | {s['ap50_95']:.3f} | {s['tp']} / {s['fp']} / {s['fn']} "
            f"| {r.train_s:.0f} | {r.predict_s:.0f} | {notes} |"
        )
    return head + "\n".join(rows) + "\n"


TARGET_AP = 0.85
TARGET_MARGIN = 0.10


def verdict(results: list[Result], scores: list[dict]) -> str:
    """Whether cellfit meets the target: AP@0.5 >= 0.85 and >= 0.10 above every peer."""
    ap = {r.method: s["ap50"] for r, s in zip(results, scores)}
    if "cellfit" not in ap:
        return "target not checked (cellfit not run)"
    peers = {m: v for m, v in ap.items() if m != "cellfit"}
    best_peer = max(peers, key=peers.__getitem__) if peers else None
    ok_ap = ap["cellfit"] >= TARGET_AP
    margin = ap["cellfit"] - peers[best_peer] if best_peer else float("nan")
    ok_margin = best_peer is None or margin >= TARGET_MARGIN
    text = (
        f"target (cellfit AP@0.5 ≥ {TARGET_AP} and ≥ {TARGET_MARGIN:.2f} above every peer): "
        f"{'met' if ok_ap and ok_margin else 'NOT met'}; cellfit {ap['cellfit']:.3f}"
    )
    if best_peer:
        text += f", best peer {best_peer} {peers[best_peer]:.3f} (margin {margin:+.3f})"
    return text


def _load() -> float:
    """The 1-minute load average (other jobs on a shared machine slow training down)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine() -> str:
    """nproc, CPU model and library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import skimage
    import sklearn
    import torch

    return (
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-image {skimage.__version__}, "
        f"scikit-learn {sklearn.__version__}, Python {platform.python_version()}"
    )


def engine_version() -> str:
    """The git commit of the checkout, and whether the engine has uncommitted changes."""
    import subprocess

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src/cellfit")
    return commit + (" with uncommitted changes in src/cellfit" if dirty else "")


def section(
    body: str,
    args: argparse.Namespace,
    train: list[str],
    test: list[str],
    n_cells: int,
    n_truth: int,
    elapsed: float,
    verdict_text: str,
    load_text: str,
) -> str:
    """The docs section (between markers) for this run."""
    cmd = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{MARK_START}\n{SECTION_TITLE}\n\n"
        "Sparse annotation made from the truth, as a user would paint: "
        f"{args.fraction:.0%} of the nuclei of {len(train)} images painted whole, a "
        f"{RING}-pixel background ring around them and {STROKES} background strokes per "
        "image, everything else unannotated. Every method learns from that annotation only "
        f"({n_cells} cells) and segments {len(test)} other images, scored against their "
        f"complete masks ({n_truth} nuclei). AP = TP / (TP + FP + FN) at IoU 0.5, TP / FP / "
        "FN pooled over the test images; AP@0.5:0.95 is the mean over IoU 0.5, 0.55 … 0.95. "
        + (
            f"cellfit runs train for {args.steps} steps each (`--steps`), then "
            if args.steps
            else f"cellfit runs get {args.minutes:g} min of CPU training each (time_limit), then "
        )
        + "predict with `predict_stack` + `labels_from_probs` with the model's post-processing "
        "(objects under 10% of the median annotated cell area dropped; the peers get the same "
        "size filter).\n\n"
        f"{body}\n"
        f"- {verdict_text}\n"
        f"- command: `{cmd}` (total {elapsed / 60:.1f} min)\n"
        f"- date: {date}\n"
        f"- machine: {machine()}; {load_text}\n"
        f"- engine: cellfit at commit {engine_version()}, cellfit device `{args.device}`\n"
        f"- settings: seed {args.seed}, fraction {args.fraction:g}, training images "
        f"{', '.join(train)}; test images {', '.join(test)}\n"
        "- peers: `otsu` = Otsu threshold of a Gaussian-smoothed (σ=1) image + distance "
        "watershed; `rf` = `skimage.feature.multiscale_basic_features` (σ 1…16) + "
        "`skimage.future.fit_segmenter` with `RandomForestClassifier(n_estimators=50, "
        "max_depth=10)` + the same watershed. The watershed's scale is the area-weighted median radius "
        "of the foreground's connected components (seeds ≥ r/2 apart), nothing tuned to this "
        "set.\n"
        f"{MARK_END}\n"
    )


def write_section(path: Path, text: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace a benchmark's section (between ``start`` and ``end``) in ``path`` (or
    append it), keeping the rest."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        a = old.index(start)
        b = old.index(end) + len(end)
        rest = old[b:]
        new = old[:a] + text.rstrip("\n") + ("\n" if not rest.startswith("\n") else "") + rest
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data set folder")
    p.add_argument("--minutes", type=float, default=5.0, help="CPU training budget per cellfit run")
    p.add_argument(
        "--steps",
        type=int,
        help="train each cellfit run for this many steps instead of --minutes (a budget "
        "that does not depend on how busy a shared machine is)",
    )
    p.add_argument("--seed", type=int, default=0, help="image split, annotation and training seed")
    p.add_argument("--n-train", type=int, default=4)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1, help="share of nuclei painted per image")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--device", default="cpu", help="torch device of the cellfit runs (the benchmark is CPU)"
    )
    p.add_argument("--out-md", type=Path, default=DEFAULT_MD)
    p.add_argument("--no-write", action="store_true", help="print only, leave the docs alone")
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        help="folder to write predicted labels, cellfit probabilities and models for inspection",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cellfit.synthetic import sparse_annotation

    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = _load()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    train_names, test_names = split(list_names(args.data), args.n_train, args.n_test, args.seed)
    log(f"train {train_names}  test {test_names}")
    train = [load(args.data, n) for n in train_names]
    test = [load(args.data, n) for n in test_names]
    anns = [
        sparse_annotation(s.mask, args.fraction, ring=RING, strokes=STROKES, seed=args.seed + i)
        for i, s in enumerate(train)
    ]
    n_cells = sum(len(np.setdiff1d(np.unique(a), [0, 1])) for a in anns)
    n_truth = sum(len(np.setdiff1d(np.unique(s.mask), [0])) for s in test)
    log(
        f"annotation: {n_cells} cells painted, "
        f"{sum(int((a != 0).sum()) for a in anns) / sum(a.size for a in anns):.1%} of pixels annotated"
    )

    results: list[Result] = []
    scores: list[dict] = []
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    for m in args.methods:
        log(f"{m} ...")
        if m == "otsu":
            r = run_otsu(train, anns, test, log)
        elif m == "rf":
            r = run_rf(train, anns, test, log, args.seed)
        else:
            r = run_cellfit(
                train,
                anns,
                test,
                log,
                args.seed,
                args.minutes,
                naive=m == "cellfit-naive",
                steps=args.steps,
                device=args.device,
                keep_probs=args.save is not None,
                save_model=None if args.save is None else args.save / f"{m}.cellfit",
            )
        s = score(r, test)
        scores.append(s)
        log(
            f"{m}: AP50 {s['ap50']:.3f}  F1 {s['f1_50']:.3f}  P {s['precision_50']:.3f}  "
            f"R {s['recall_50']:.3f}  per image {np.round(s['per_image_ap50'], 2).tolist()}"
        )
        results.append(r)
        if args.save is not None:
            for lab, smp in zip(r.labels, test):
                tifffile.imwrite(
                    args.save / f"{m}_{smp.name}.tif", lab.astype(np.uint16), compression="zlib"
                )
            for pr, smp in zip(r.probs, test):
                tifffile.imwrite(
                    args.save / f"{m}_{smp.name}_probs.tif",
                    (pr * 255).astype(np.uint8),
                    compression="zlib",
                )
            r.probs.clear()

    body = table(results, scores)
    elapsed = time.perf_counter() - t_start
    print()
    print(body)
    print(verdict(results, scores))
    if not args.no_write:
        write_section(
            args.out_md,
            section(
                body,
                args,
                train_names,
                test_names,
                n_cells,
                n_truth,
                elapsed,
                verdict(results, scores),
                f"1-min load average {load_start:.1f} at start, {_load():.1f} at end",
            ),
        )
        log(f"wrote {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
