"""The thresholds of the quality flags of ``cellfit predict --measure``: what they flag
on results that are right, and on results that are wrong.

Ground-truth masks stand for perfect segmentations. A "model" is made from a few
images of a set, as a user trains one: its cell diameter is the median diameter of
their cells, its intensity record their intensity range
(:func:`cellfit.measure.intensity_record`). The other images of the set, measured
from their masks (:class:`cellfit.measure.Measurer`), are the results of a run; each
check's ratio (:func:`ratios`) is compared with its threshold (:mod:`cellfit.measure`).

- **right results**: the other images of the same set (every draw of ``--draws``
  random training pairs): a flag here is a false alarm;
- **wrong results**: the same images with their cells twice as large or small as the
  model's (a binned camera, another objective), a tenth of the contrast or ten times
  it (another exposure or bit depth), four times fewer or more cells (cells missed or
  cut in pieces), every image of another set (another stain, microscope, cell type),
  and synthetic scenes of 15, 30 and 60 pixel cells for a model of 30.

Thresholds are **chosen on** nuclei-u2os, cells-phase-usiigaci and the synthetic
scenes, and **reported on** nuclei-he-monuseg, nuclei-dsb2018 and nuclei3d-gonuclear,
never used to choose.

Usage::

    .venv/bin/python benchmarks/quality_flags.py            # prints and writes the table
    .venv/bin/python benchmarks/quality_flags.py --no-write

The table goes to ``docs/benchmarks.md`` between ``<!-- flags:start -->`` and
``<!-- flags:end -->``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cellfit import measure as M
from cellfit.io import read_image, read_labels
from cellfit.synthetic import scene

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
START, END = "<!-- flags:start -->", "<!-- flags:end -->"
CHOSEN_ON = ("nuclei-u2os", "cells-phase-usiigaci")
REPORTED_ON = ("nuclei-he-monuseg", "nuclei-dsb2018", "nuclei3d-gonuclear")


def load_set(name: str) -> list[tuple[M.FileSummary, np.ndarray]]:
    """Each image's summary (measured from its mask) and its per-cell areas."""
    out = []
    for img_path in sorted((DATA / name / "images").glob("*.tif")):
        stack = read_image(img_path)
        labels = read_labels(DATA / name / "masks" / img_path.name, stack.labels_shape)
        planes = labels.reshape(-1, *labels.shape[-2:])
        m = M.Measurer()
        for p in range(stack.n_planes):
            m.add(planes[p], stack.data[p])
        s = m.summary(f"{name}/{img_path.name}", M.image_range(stack.data))
        out.append((s, m.table()["area_px"]))
    return out


def synthetic_set(kind: str, diameter: float, n: int, seed: int):
    out = []
    i = 0
    while len(out) < n:
        img, lab, _ = scene(kind, (384, 384), diameter, seed=seed + i)
        i += 1
        if img.ndim != (3 if kind == "he" else 2):  # a grey photograph of an H&E slide
            continue
        planes = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
        m = M.Measurer()
        m.add(lab, planes)
        s = m.summary(f"synthetic-{kind}-{diameter:g}/{i}", M.image_range(planes[None]))
        out.append((s, m.table()["area_px"]))
    return out


def model_of(train) -> M.Expected:
    """What a model trained on ``train`` (summaries and areas) expects."""
    areas = np.concatenate([a for _, a in train])
    rec = M.intensity_record([s.intensity for s, _ in train])
    assert rec is not None
    info = _Info(
        diameter=float(2 * math.sqrt(np.median(areas) / math.pi)),
        in_channels=len(train[0][0].intensity),
        training=[{"intensity": rec}],
    )
    return M.expected_from_model(info)


class _Info:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def ratios(s: M.FileSummary, exp: M.Expected, density: float | None) -> dict[str, float]:
    """How far outside the usual a file is, per check (1: inside)."""
    out = {"size": 1.0, "intensity": 1.0, "count": 1.0, "coverage": s.cell_fraction}
    if s.cells and exp.diameter:
        r = s.median_diameter_px / exp.diameter
        out["size"] = max(r, 1 / r)
    if s.intensity is not None and exp.contrast and len(s.intensity) == len(exp.contrast):
        worst = 1.0
        for (lo, hi), (cmin, cmax) in zip(s.intensity, exp.contrast):
            con = hi - lo
            worst = max(worst, con / cmax if con > cmax else cmin / max(con, 1e-12))
        out["intensity"] = worst
    if s.cells and density:
        r = s.cells / s.pixels / density
        out["count"] = max(r, 1 / r)
    return out


def scaled(s: M.FileSummary, *, size=1.0, contrast=1.0, count=1.0) -> M.FileSummary:
    """``s`` with its cells ``size`` times as large, ``contrast`` times the contrast, and
    ``count`` times as many cells."""
    lo_hi = None
    if s.intensity is not None:
        lo_hi = np.array([[lo, lo + (hi - lo) * contrast] for lo, hi in s.intensity])
    return M.FileSummary(
        s.file, s.planes, s.pixels, int(round(s.cells * count)), s.median_area_px * size**2,
        s.median_diameter_px * size, s.median_intensity, s.cell_fraction, lo_hi,
    )


def draws(items, n_draws: int, rng, k: int = 2):
    """(model, test items) pairs: ``k`` random training images, the others to test."""
    if len(items) <= k:
        return
    for _ in range(n_draws):
        idx = rng.permutation(len(items))
        yield model_of([items[i] for i in idx[:k]]), [items[i] for i in idx[k:]]


def evaluate(sets: dict, names, n_draws: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """Per case: the ratios of every check over every (draw, image)."""
    rng = np.random.default_rng(seed)
    cases: dict[str, dict[str, list[float]]] = {}

    def add(case, r):
        for k, v in r.items():
            cases.setdefault(case, {}).setdefault(k, []).append(v)

    for name in names:
        items = sets[name]
        for exp, test in draws(items, n_draws, rng):
            summaries = [s for s, _ in test]
            dens = M.typical_density(summaries)
            for s in summaries:
                add("right: same set", ratios(s, exp, dens))
                for f in (2.0, 0.5):
                    add(f"wrong: cells {f:g}x", ratios(scaled(s, size=f), exp, dens))
                for f in (10.0, 0.1):
                    add(f"wrong: contrast {f:g}x", ratios(scaled(s, contrast=f), exp, dens))
                for f in (4.0, 0.25):
                    add(f"wrong: {f:g}x the cells", ratios(scaled(s, count=f), exp, dens))
        # another set's images, for a model of this one
        exp = model_of(items[: min(2, len(items))])
        for other in names:
            if other == name:
                continue
            for s, _ in sets[other]:
                add("wrong: another set", ratios(s, exp, None))
    return cases


def synthetic_cases(n: int, seed: int) -> dict[str, dict[str, list[float]]]:
    cases: dict[str, dict[str, list[float]]] = {}
    for kind in ("fluo_nuclei", "fluo_cells", "phase", "he"):
        train = synthetic_set(kind, 30.0, 2, seed)
        exp = model_of(train)
        for d in (15.0, 30.0, 60.0):
            test = synthetic_set(kind, d, n, seed + 100)
            dens = M.typical_density([s for s, _ in test])
            case = "right: same look, 30 px" if d == 30.0 else f"wrong: {d:g} px cells"
            for s, _ in test:
                for k, v in ratios(s, exp, dens).items():
                    cases.setdefault(case, {}).setdefault(k, []).append(v)
    return cases


def flagged(values: list[float], check: str) -> float:
    """Share of ``values`` over the check's threshold."""
    t = {"size": M.SIZE_RATIO, "intensity": M.CONTRAST_RATIO, "count": M.COUNT_RATIO,
         "coverage": M.COVERAGE}[check]
    v = np.asarray(values, dtype=float)
    return float(np.mean(v > t)) if len(v) else math.nan


def table(title: str, cases) -> list[str]:
    checks = ("size", "intensity", "count", "coverage")
    lines = [f"**{title}**", "",
             "| case | n | " + " | ".join(f"{c}: max (95th pct) / flagged" for c in checks) + " |",
             "|---|---|" + "---|" * len(checks)]
    for case, vals in cases.items():
        cells = []
        for c in checks:
            v = np.asarray(vals.get(c, []), dtype=float)
            if not len(v):
                cells.append("–")
                continue
            cells.append(f"{v.max():.2f} ({np.percentile(v, 95):.2f}) / {flagged(v, c):.0%}")
        n = len(next(iter(vals.values())))
        lines.append(f"| {case} | {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic scenes per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sets = {n: load_set(n) for n in (*CHOSEN_ON, *REPORTED_ON)}
    coverage = {n: max(s.cell_fraction for s, _ in v) for n, v in sets.items()}
    lines = [
        START,
        "### Quality flags (`cellfit predict --measure`)",
        "",
        f"Thresholds: cell size {M.SIZE_RATIO:g}x the model's, contrast {M.CONTRAST_RATIO:g}x "
        f"outside the training images', cell density {M.COUNT_RATIO:g}x the run's median, "
        f"cells over {M.COVERAGE:.0%} of the image. Each cell: the largest ratio seen, "
        "the 95th percentile, and the share flagged. Ground-truth masks stand for the "
        f"results; a model is 2 training images of a set ({args.draws} random draws); "
        "generated by `benchmarks/quality_flags.py`. Synthetic scenes draw their bit depth "
        "and exposure at random: their intensity column shows that spread, not false "
        "alarms.",
        "",
        "Largest share of an image covered by cells (ground truth): "
        + ", ".join(f"{n} {v:.0%}" for n, v in coverage.items()) + ".",
        "",
    ]
    lines += table(f"Chosen on: {', '.join(CHOSEN_ON)}",
                   evaluate(sets, CHOSEN_ON, args.draws, args.seed))
    lines += table("Chosen on: synthetic scenes (fluorescence nuclei and cells, phase, H&E), "
                   "model at 30 px", synthetic_cases(args.synthetic, args.seed))
    lines += table(f"Reported on: {', '.join(REPORTED_ON)}",
                   evaluate(sets, REPORTED_ON, args.draws, args.seed))
    lines.append(END)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from quality import write_section

        write_section(REPO / "docs" / "benchmarks.md", text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
