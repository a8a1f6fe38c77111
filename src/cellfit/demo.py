"""``cellfit demo``: the whole job on the bundled sample image, headless.

It simulates a user's sparse strokes from the image's complete ground truth (and
says so), trains for about a minute, predicts the whole image, scores the result
against the full truth and writes labels, probabilities, the model and an overview PNG,
then measures every predicted nucleus into a table (``nuclei_cells.csv``) and plots the
distribution of their areas against the true nuclei's (``areas.png``, with matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries

from cellfit.console import run_training
from cellfit.data import nuclei_dsb2018
from cellfit.io import atomic_write_tiff
from cellfit.measure import measure_plane, write_table
from cellfit.metrics import aggregate_instance_metrics, instance_metrics
from cellfit.postprocess import instances_from_probs
from cellfit.predict import predict_stack
from cellfit.synthetic import sparse_annotation
from cellfit.train import TrainConfig, Trainer

__all__ = ["DEMO_SECONDS", "area_plot_png", "overview_png", "run_demo"]

#: how long the demo fine-tunes by default: about a minute, so the whole demo is quick
DEMO_SECONDS = 60.0


def _gray(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.8])
    g = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.stack([g] * 3, -1)


def overview_png(path: Path, image: np.ndarray, annotation: np.ndarray, labels: np.ndarray,
                 truth: np.ndarray | None = None) -> Path:
    """Write a side-by-side PNG: image | annotation | prediction (outlines on the image)."""
    base = _gray(image)
    ann_rgb = base.copy()
    bg = annotation == 1
    ann_rgb[bg] = 0.6 * ann_rgb[bg] + 0.4 * np.array([0.2, 0.4, 1.0])
    cells = np.where(annotation >= 2, annotation - 1, 0)
    ann_rgb = label2rgb(cells, ann_rgb, alpha=0.45, bg_label=0)
    pred = base.copy()
    pred[find_boundaries(labels, mode="inner")] = (1.0, 0.85, 0.0)
    if truth is not None:
        pred[find_boundaries(truth, mode="inner") & (labels == 0)] = (1.0, 0.2, 0.2)
    gap = np.ones((image.shape[0], 8, 3))
    panel = np.concatenate([base, gap, ann_rgb, gap, pred], axis=1)
    out = (np.clip(panel, 0, 1) * 255).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.part")
    iio.imwrite(tmp, out, extension=".png")
    tmp.replace(path)
    return path


def area_plot_png(path: Path, areas: np.ndarray, truth_areas: np.ndarray | None = None,
                  unit: str = "pixels") -> Path | None:
    """Write a histogram of cell areas (and of the true cells' areas, outlined) as a
    PNG; None, writing nothing, when matplotlib is not installed."""
    try:  # an optional dependency (the bench extra)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    areas = np.asarray(areas, dtype=float)
    both = areas if truth_areas is None else np.concatenate([areas, truth_areas])
    top = float(np.percentile(both, 99.5)) if len(both) else 1.0
    bins = np.linspace(0, max(top, 1.0), 31)
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(np.clip(areas, 0, bins[-1]), bins=bins, color="#f2b705", alpha=0.85,
            label=f"predicted ({len(areas)} cells, median {np.median(areas):.0f})"
            if len(areas) else "predicted (no cells)")
    if truth_areas is not None and len(truth_areas):
        ax.hist(np.clip(truth_areas, 0, bins[-1]), bins=bins, histtype="step", color="#c0392b",
                linewidth=1.6, label=f"ground truth ({len(truth_areas)} cells, median "
                f"{np.median(truth_areas):.0f})")
    ax.set_xlabel(f"cell area ({unit})")
    ax.set_ylabel("cells")
    ax.set_title("Areas of the segmented nuclei")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def run_demo(out: Path, time_limit: float = DEMO_SECONDS, device: str = "auto",
             seed: int = 0) -> int:
    """Run the demo into folder ``out``; returns the exit status (130 if interrupted)."""

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    image, truth = nuclei_dsb2018()
    n_true = len(np.setdiff1d(np.unique(truth), [0]))
    annotation = sparse_annotation(truth, fraction=0.25, ring=4, strokes=6, seed=seed)
    n_painted = len(np.setdiff1d(np.unique(annotation), [0, 1]))
    say(f"cellfit demo: bundled image of nuclei (DSB 2018, 512x512, {n_true} nuclei).")
    say(f"Simulating a user's sparse annotation from the ground truth: {n_painted} of {n_true} "
        f"nuclei painted whole, a thin background ring around them and 6 background strokes; "
        f"{100 * (annotation == 0).mean():.0f}% of the pixels are left unannotated.")
    say(f"Fine-tuning cellfit's starting model (a U-Net++) for {time_limit:.0f} s ...")
    cfg = TrainConfig(
        time_limit=time_limit, device=device, seed=seed, val_every=25, init="starting"
    )
    trainer = Trainer([image], [annotation], cfg)
    completed = run_training(trainer)
    say("Predicting the whole image ...")
    probs = predict_stack(trainer.model, trainer.info, image)[0]
    labels = instances_from_probs(probs, **trainer.info.postprocess)
    m = aggregate_instance_metrics([instance_metrics(labels, truth)])
    out.mkdir(parents=True, exist_ok=True)
    model_path = trainer.save(out / "model.cellfit")
    atomic_write_tiff(out / "nuclei_labels.tif", labels.astype(np.uint16))
    atomic_write_tiff(out / "nuclei_prob.tif", probs.astype(np.float32))
    atomic_write_tiff(out / "nuclei_annotation.tif", annotation.astype(np.uint16))
    png = overview_png(out / "overview.png", image, annotation, labels, truth)
    cells = measure_plane(labels, image)
    table = write_table(out / "nuclei_cells.csv", cells)
    plot = area_plot_png(out / "areas.png", cells["area_px"], measure_plane(truth)["area_px"])
    say("")
    say(f"Result against all {n_true} true nuclei (only {n_painted} were annotated):")
    say(f"  precision {m['precision_50']:.3f}   recall {m['recall_50']:.3f}   "
        f"F1 {m['f1_50']:.3f}   AP@0.5 {m['ap50']:.3f}   (IoU >= 0.5 matching)")
    say(f"  found {len(np.unique(labels)) - 1} objects")
    say(f"Wrote {out}/: model.cellfit, nuclei_labels.tif, nuclei_prob.tif, "
        f"nuclei_annotation.tif and {png.name} (image | annotation | prediction).")
    say(f"Measured {len(cells['id'])} nuclei into {table.name} (a row per nucleus: position, "
        "area, shape, intensity); "
        + (f"their areas against the true nuclei's: {plot.name}." if plot is not None else
           "no area plot: matplotlib is not installed (pip install matplotlib)."))
    say(f"Next: cellfit predict {model_path} YOUR_TIFFS --out results/ --measure")
    return 0 if completed else 130
