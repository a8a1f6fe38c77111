"""Generalisation benchmark: sparse painting, zero-shot and the correction loop on every
kind of image we have, beside the peers.

Per set (every 2D set of ``../shared/data`` with several images, and synthetic scenes of
three looks) and per seed:

- **sparse protocol**: 10% of the cells of 4 training images painted whole (at least 3
  per image), a 4-pixel background ring around them and 5 background strokes per image,
  everything else unannotated;
- **zero-shot**: the shipped starting model with the diameter estimated per image;
- **peers** with the same annotation and the same size information: Otsu + distance
  watershed (its polarity, bright or dark cells, from the painted cells against the
  painted background) and a random-forest pixel classifier on multiscale features
  (ilastik's approach);
- **the correction loop**, as a user works: round 0 trains from the starting model
  (``--round0-steps``, 5 CPU-minutes by default); after each round a simulated user
  looks at the prediction on the training images and fixes the ``--corrections``
  largest errors from the truth (false objects painted as background, missed or merged
  cells painted whole: :mod:`cellfit.simulate`), and the model in memory is trained
  again on the whole annotation (``--round-steps``, 2 CPU-minutes), as the plugin's
  Train does. The random forest goes through the same loop with its own errors.

AP@0.5 (TP / (TP + FP + FN), pooled) on the test images after each round, with the
effort (cells and strokes added) and the training time. Training lengths are counted in
steps of 4 patches of 256² at the idle 2-core rate (70 steps a minute, as in
``benchmarks/finetune.py``), so a busy or faster machine trains the same amount.

``--variant`` names training settings to compare (see :data:`VARIANTS`); each runs
the whole loop.

Usage::

    .venv/bin/python benchmarks/generalise.py --sets nuclei-u2os --seeds 0   # one set
    .venv/bin/python benchmarks/generalise.py --smoke                        # minutes
    .venv/bin/python benchmarks/generalise.py --report results/*.json        # docs only

Each (set, seed) writes ``<out>/<set>-<seed>.json`` as it goes; ``--report`` merges
result files into ``docs/benchmarks.md`` (between ``<!-- generalise:start -->`` and
``<!-- generalise:end -->``), ``docs/generalise.json`` and ``docs/generalise.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (
    annotated_min_size,
    distance_watershed,
    engine_version,
    machine,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MARK_START = "<!-- generalise:start -->"
MARK_END = "<!-- generalise:end -->"
#: sets of ../shared/data: (training images, test images at most)
REAL_SETS = {"nuclei-u2os": (4, 10), "nuclei-he-monuseg": (4, 8), "cells-phase-usiigaci": (4, 10)}
#: synthetic looks (cellfit.synthetic.scene), 4 + 6 images of 384²
SYNTHETIC_SETS = {"synthetic-fluo_nuclei": (4, 6), "synthetic-he": (4, 6), "synthetic-phase": (4, 6)}
KIND = {
    "nuclei-u2os": "fluorescence nuclei",
    "nuclei-he-monuseg": "H&E nuclei",
    "cells-phase-usiigaci": "phase-contrast cells",
    "synthetic-fluo_nuclei": "fluorescence nuclei (synthetic)",
    "synthetic-he": "H&E nuclei (synthetic)",
    "synthetic-phase": "phase-contrast cells (synthetic)",
}
FRACTION, MIN_CELLS, RING, STROKES = 0.1, 3, 4, 5
#: sets whose images are cut to their central square of this side, to keep the data that
#: travels to a GPU machine small (the same crop for every method)
CROP = {"cells-phase-usiigaci": 768}
STEPS_PER_MINUTE = 70

#: training settings compared by the loop (TrainConfig keywords, for every round or, under
#: "later", for the rounds after the first)
VARIANTS: dict[str, dict] = {
    # the behaviour before this benchmark
    "today": {"guard": False},
    # later rounds keep what the user did not correct: distillation toward the model the
    # round starts from, on the unannotated pixels
    "keep": {"guard": False, "later": {"distill": 1.0}},
    # later rounds take smaller steps
    "gentle": {"guard": False, "later": {"finetune_lr": 3e-4}},
    # thresholds chosen on the held-back annotation
    "calibrate": {"guard": False, "calibrate": True},
    # the guard, calibration and keeping what was not corrected
    "all": {"guard": True, "calibrate": True, "later": {"distill": 1.0}},
    # the defaults now (the guard on, the cell size kept over correction rounds)
    "default": {},
    # the defaults with the cell size refitted to the painted cells every round, as before
    "refit-size": {"_size_tolerance": 1.0},
}


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (Y, X) or (Y, X, 3)
    mask: np.ndarray  # (Y, X) int32


# ------------------------------------------------------------------------------ data
def _names(data: Path, set_name: str) -> list[str]:
    d = data / set_name
    if (d / "images").is_dir():
        return sorted(p.stem for p in (d / "images").glob("*.tif") if (d / "masks" / p.name).exists())
    with np.load(data / f"{set_name}.npz") as z:
        # the names of the whole set, so that a seed draws the same images as from the
        # folder (older packs hold only the drawn names)
        if "names" in z.files:
            return [str(n) for n in z["names"]]
        return sorted({k.split("/")[0] for k in z.files})


def _read(data: Path, set_name: str, name: str) -> Sample:
    d = data / set_name
    if (d / "images").is_dir():
        import tifffile

        img = tifffile.imread(d / "images" / f"{name}.tif")
        mask = tifffile.imread(d / "masks" / f"{name}.tif").astype(np.int32)
    else:
        with np.load(data / f"{set_name}.npz") as z:
            img, mask = z[f"{name}/image"], z[f"{name}/mask"].astype(np.int32)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    side = CROP.get(set_name)
    if side and min(mask.shape) > side:
        y0, x0 = (mask.shape[0] - side) // 2, (mask.shape[1] - side) // 2
        img, mask = img[y0 : y0 + side, x0 : x0 + side], mask[y0 : y0 + side, x0 : x0 + side]
    return Sample(name, img, mask)


def pick(data: Path, set_name: str, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The training and test images of a set for a seed (disjoint)."""
    n_train, n_test = (REAL_SETS | SYNTHETIC_SETS)[set_name]
    if set_name.startswith("synthetic-"):
        from cellfit.synthetic import scene

        kind = set_name.split("-", 1)[1]
        rng = np.random.default_rng(1000 + seed)
        out: list[Sample] = []
        while len(out) < n_train + n_test:
            img, lab, _ = scene(kind, (384, 384), diameter=float(rng.uniform(18, 30)), seed=rng)
            if out and img.ndim != out[0].image.ndim:
                continue  # one camera per set: colour or grey, as a lab's files are
            out.append(Sample(f"s{len(out)}", img, lab.astype(np.int32)))
        return out[:n_train], out[n_train:]
    names = _names(data, set_name)
    n_test = min(n_test, len(names) - n_train)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = [names[i] for i in order[: n_train + n_test]]
    samples = [_read(data, set_name, n) for n in chosen]
    return samples[:n_train], samples[n_train:]


def pack(data: Path, out: Path, sets: list[str], seeds: list[int]) -> None:
    """Write the images the given seeds use as ``<out>/<set>.npz`` (to carry them)."""
    out.mkdir(parents=True, exist_ok=True)
    for s in sets:
        if s.startswith("synthetic-"):
            continue
        arrays = {}
        for seed in seeds:
            tr, te = pick(data, s, seed)
            for smp in tr + te:
                arrays[f"{smp.name}/image"] = smp.image
                arrays[f"{smp.name}/mask"] = smp.mask.astype(np.uint16)
        np.savez_compressed(out / f"{s}.npz", names=np.array(_names(data, s)), **arrays)
        print(f"packed {s}: {len(arrays) // 2} images")


def paint(train: list[Sample], seed: int) -> list[np.ndarray]:
    """The first annotation: 10% of the cells of each training image (at least 3)."""
    from cellfit.synthetic import sparse_annotation

    return [
        sparse_annotation(s.mask, FRACTION, ring=RING, strokes=STROKES, seed=seed + i,
                          min_cells=MIN_CELLS)
        for i, s in enumerate(train)
    ]


def gray(image: np.ndarray) -> np.ndarray:
    img = image.astype(np.float32)
    return img.mean(-1) if img.ndim == 3 else img


def ap(labels: list[np.ndarray], samples: list[Sample]) -> dict:
    from cellfit.metrics import aggregate_instance_metrics, instance_metrics

    agg = aggregate_instance_metrics(
        [instance_metrics(p, s.mask, (0.5,)) for p, s in zip(labels, samples)]
    )
    return {"ap50": round(agg["ap50"], 4), "precision": round(agg["precision_50"], 4),
            "recall": round(agg["recall_50"], 4)}


# ----------------------------------------------------------------------------- peers
def otsu(train, anns, test) -> list[np.ndarray]:
    """Otsu threshold + distance watershed on one grey value per pixel: for colour images
    the mix of channels that best separates the painted cells from the painted background
    (Fisher's direction), and cells bright or dark as the painting says."""
    from skimage.filters import gaussian, threshold_otsu

    def px(img):
        return img.reshape(-1, img.shape[-1]).astype(np.float64) if img.ndim == 3 \
            else img.reshape(-1, 1).astype(np.float64)

    cell = np.concatenate([px(s.image)[(a >= 2).ravel()] for s, a in zip(train, anns)])
    bg = np.concatenate([px(s.image)[(a == 1).ravel()] for s, a in zip(train, anns)])
    cov = np.atleast_2d(np.cov(cell.T) + np.cov(bg.T)) + 1e-6 * np.eye(cell.shape[1])
    w = np.linalg.solve(cov, cell.mean(0) - bg.mean(0))  # cells project higher
    out = []
    for s in test:
        img = (px(s.image) @ w).reshape(s.mask.shape)
        img = gaussian(img, sigma=1.0, preserve_range=True)
        out.append(distance_watershed(img > threshold_otsu(img), annotated_min_size(anns)))
    return out


class Forest:
    """A random-forest pixel classifier on multiscale features, features cached per image."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._feats: dict[int, np.ndarray] = {}

    def features(self, s: Sample) -> np.ndarray:
        key = id(s)
        if key not in self._feats:
            from skimage.feature import multiscale_basic_features

            img = s.image.astype(np.float32)
            lo, hi = np.percentile(img, (1.0, 99.8))
            img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
            self._feats[key] = multiscale_basic_features(
                img, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16,
                channel_axis=-1 if img.ndim == 3 else None,
            ).astype(np.float32)
        return self._feats[key]

    def fit(self, train, anns) -> None:
        from sklearn.ensemble import RandomForestClassifier

        xs, ys = [], []
        for s, a in zip(train, anns):
            keep = a > 0
            xs.append(self.features(s)[keep])
            ys.append(np.where(a[keep] >= 2, 2, 1))
        self.clf = RandomForestClassifier(n_estimators=50, max_depth=10, n_jobs=-1,
                                          random_state=self.seed)
        self.clf.fit(np.concatenate(xs), np.concatenate(ys))
        self.min_size = annotated_min_size(anns)

    def predict(self, samples) -> list[np.ndarray]:
        out = []
        for s in samples:
            f = self.features(s)
            seg = self.clf.predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2])
            out.append(distance_watershed(seg == 2, self.min_size))
        return out


# --------------------------------------------------------------------------- cellfit
def cellfit_predict(model, info, samples, device, tta=False) -> list[np.ndarray]:
    from cellfit.postprocess import labels_from_probs
    from cellfit.predict import predict_stack

    return [
        labels_from_probs(predict_stack(model, info, s.image, device=device, tta=tta)[0],
                          info.mode, **info.postprocess)
        for s in samples
    ]


def zero_shot(test, device, tta=False, known=False) -> dict:
    """The starting model alone: the diameter estimated (or, ``known``, the true median
    diameter given, which separates the estimate's errors from the network's)."""
    from cellfit.errors import CellfitError
    from cellfit.model import load_model
    from cellfit.starting import (
        apply_diameter,
        estimate_diameter,
        median_diameter,
        starting_model_path,
    )

    model, info = load_model(starting_model_path())
    model.to(device)
    labels, est = [], []
    truth = [median_diameter(s.mask)[0] for s in test]
    for s, true in zip(test, truth):
        try:
            plane = np.moveaxis(s.image, -1, 0) if s.image.ndim == 3 else s.image[None]
            d = true if known else estimate_diameter(
                model, info, plane, device=device)
        except CellfitError as err:  # no cells, or an unclear size
            est.append(str(err).split(":")[0])
            labels.append(np.zeros(s.mask.shape, np.int32))
            continue
        est.append(round(float(d), 1))
        labels += cellfit_predict(model, apply_diameter(info, d), [s], device, tta)
    return {**ap(labels, test), "diameters": est, "true_diameters": [round(t, 1) for t in truth]}


def train_round(images, anns, settings, seed, steps, device, model=None, info=None):
    """One round of training (the model in memory trained in place, as the plugin does)."""
    import cellfit.train
    from cellfit.train import TrainConfig, Trainer

    settings = dict(settings)
    cellfit.train.SIZE_TOLERANCE = settings.pop("_size_tolerance", 1.5)
    cfg = TrainConfig(init="starting" if model is None else None, steps=steps, time_limit=None,
                      seed=seed, device=device, batch_size=4, **settings)
    t0 = time.perf_counter()
    trainer = Trainer(images, anns, cfg, model=model, info=info)
    notices = []
    for ev in trainer.run():
        if ev.notice:
            notices.append(ev.notice)
    record = trainer.info.training[-1]
    return trainer.model, trainer.info, {
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": record["steps"],
        "kept": record.get("kept"),
        "validation": (record.get("validation") or {}).get("ap50"),
        "validated_on": record.get("validated_on"),
        "notices": notices,  # the guard's sentence among them
        "postprocess": dict(trainer.info.postprocess),
        "scale": round(float(trainer.info.scale), 3),
        "guard_scores": record.get("guard_scores"),
        "calibration": record.get("calibration"),
    }


def loop(train, test, anns0, method, rounds, n_corr, log, **kw) -> list[dict]:
    """The correction loop of one method: AP on ``test`` after each round."""
    from cellfit.simulate import correct, find_errors

    anns = [a.copy() for a in anns0]
    out, state = [], None
    cells = strokes = 0
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        if method == "rf":
            forest = kw["forest"]
            forest.fit(train, anns)
            fit = {"seconds": round(time.perf_counter() - t0, 1)}
            pred_test, pred_train = forest.predict(test), forest.predict(train)
        else:
            settings = dict(kw["settings"])
            later = settings.pop("later", {})
            if r > 0:
                settings.update(later)
            steps = kw["round0_steps"] if r == 0 else kw["round_steps"]
            model, info = state or (None, None)
            model, info, fit = train_round([s.image for s in train], anns, settings, kw["seed"],
                                           steps, kw["device"], model, info)
            state = (model, info)
            pred_test = cellfit_predict(model, info, test, kw["device"])
            pred_train = cellfit_predict(model, info, train, kw["device"])
        row = {"round": r, **ap(pred_test, test), "cells_added": cells, "strokes_added": strokes,
               "painted_cells": int(sum(len(np.unique(a[a >= 2])) for a in anns)), **fit,
               "train_ap50": ap(pred_train, train)["ap50"]}
        out.append(row)
        log(f"  {method} round {r}: AP50 {row['ap50']:.3f} (P {row['precision']:.2f} "
            f"R {row['recall']:.2f}) train-images AP50 {row['train_ap50']:.3f}, "
            f"{row['painted_cells']} painted cells, {fit['seconds']:.0f} s"
            + (f"; {'; '.join(fit['notices'])}" if fit.get("notices") else ""))
        if r == rounds:
            break
        added_c = added_s = 0
        # the largest errors over all training images, wherever they are
        errors = []
        for i, (s, p) in enumerate(zip(train, pred_train)):
            errors += [(e.area, i) for e in find_errors(p, s.mask, anns[i])]
        errors.sort(reverse=True)
        per_image = np.bincount([i for _a, i in errors[:n_corr]], minlength=len(train))
        for i, (s, p) in enumerate(zip(train, pred_train)):
            if per_image[i]:
                c = correct(anns[i], p, s.mask, int(per_image[i]), ring=RING)
                anns[i] = c.annotation
                added_c += c.cells
                added_s += c.strokes
        cells += added_c
        strokes += added_s
    return out


# ------------------------------------------------------------------------------- run
def run_one(args, set_name: str, seed: int, log) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    train, test = pick(args.data, set_name, seed)
    anns = paint(train, seed)
    n_cells = int(sum(len(np.unique(a[a >= 2])) for a in anns))
    total = int(sum(len(np.unique(s.mask)) - 1 for s in train))
    res = {"set": set_name, "kind": KIND[set_name], "seed": seed,
           "train": [s.name for s in train], "test": [s.name for s in test],
           "painted_cells": n_cells, "cells_in_training_images": total,
           "round0_steps": args.round0_steps, "round_steps": args.round_steps,
           "corrections": args.corrections, "device": args.device}
    from cellfit.model import read_model_info
    from cellfit.starting import starting_model_path

    start = read_model_info(starting_model_path()).training[-1]
    res["starting_model"] = {"label": args.starting_label, "purpose": start.get("purpose"),
                             "steps": start.get("steps"), "file": str(starting_model_path())}
    log(f"{set_name} seed {seed}: {n_cells} of {total} cells painted; test {len(test)} images")
    out_path = args.out / f"{set_name}-{seed}{args.tag}.json"

    def save():
        out_path.write_text(json.dumps(res, indent=1, default=str))

    if "zero" in args.parts:
        res["zero_shot"] = zero_shot(test, args.device)
        log(f"  zero-shot AP50 {res['zero_shot']['ap50']:.3f} diameters {res['zero_shot']['diameters']}"
            f" (true {res['zero_shot']['true_diameters']})")
        save()
    if "zero-known" in args.parts:
        res["zero_shot_known"] = zero_shot(test, args.device, known=True)
        log(f"  zero-shot, diameter given, AP50 {res['zero_shot_known']['ap50']:.3f}")
        save()
    if "zero-tta" in args.parts:
        t0 = time.perf_counter()
        res["zero_shot_tta"] = zero_shot(test, args.device, tta=True)
        res["zero_shot_tta"]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  zero-shot with TTA AP50 {res['zero_shot_tta']['ap50']:.3f}")
        save()
    if "peers" in args.parts:
        res["otsu"] = ap(otsu(train, anns, test), test)
        log(f"  otsu AP50 {res['otsu']['ap50']:.3f}")
        res["rf"] = loop(train, test, anns, "rf", args.rounds, args.corrections, log,
                         forest=Forest(seed))
        save()
    for v in args.variant:
        log(f"  cellfit, {v}: {VARIANTS[v]}")
        res.setdefault("cellfit", {})[v] = loop(
            train, test, anns, "cellfit", args.rounds, args.corrections, log,
            settings=VARIANTS[v], seed=seed, device=args.device,
            round0_steps=args.round0_steps, round_steps=args.round_steps)
        save()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sets", nargs="+", default=list(REAL_SETS) + list(SYNTHETIC_SETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", nargs="+", default=["today"], choices=list(VARIANTS))
    p.add_argument("--parts", nargs="+", default=["zero", "peers", "cellfit"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--corrections", type=int, default=10)
    p.add_argument("--round0-steps", type=int, default=5 * STEPS_PER_MINUTE)
    p.add_argument("--round-steps", type=int, default=2 * STEPS_PER_MINUTE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="added to the result files' names")
    p.add_argument("--smoke", action="store_true", help="tiny run: 1 round, few steps")
    p.add_argument("--pack", type=Path, help="only write the images the seeds use here")
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="only merge these result files into the docs")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--starting", type=Path,
                   help="use this model file as the starting model (a candidate for the "
                   "shipped one)")
    p.add_argument("--starting-label", default="shipped",
                   help="what to call that starting model in the comparison")
    p.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                   help="only write the starting models' comparison from these result files")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare, not args.no_write)
    if args.starting:
        import cellfit.starting

        path = args.starting.resolve()
        cellfit.starting.starting_model_path = lambda: path
    if args.pack:
        pack(args.data, args.pack, args.sets, args.seeds)
        return 0
    if args.report:
        return report(args.report, not args.no_write)
    if args.smoke:
        args.rounds, args.round0_steps, args.round_steps = 1, 10, 5
    if "cellfit" not in args.parts:
        args.variant = []
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    for set_name in args.sets:
        for seed in args.seeds:
            res = run_one(args, set_name, seed, log)
            res["command"] = "python benchmarks/generalise.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
            res["machine"] = machine()
            # a copy of the tree without its git history names the commit in ENGINE_COMMIT
            res["engine"] = os.environ.get("ENGINE_COMMIT") or engine_version()
            (args.out / f"{set_name}-{seed}{args.tag}.json").write_text(
                json.dumps(res, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------- report
def merge(parts: list[dict]) -> list[dict]:
    """One result per (set, seed) from result files of separate runs (peers on one
    machine, cellfit on another); the cellfit variants of all runs are kept."""
    out: dict[tuple, dict] = {}
    for part in parts:
        key = (part["set"], part["seed"])
        have = out.setdefault(key, {})
        variants = {**have.get("cellfit", {}), **part.get("cellfit", {})}
        for k, v in part.items():
            if k in ("zero_shot", "zero_shot_tta", "zero_shot_known", "otsu", "rf", "cellfit") or k not in have:
                have[k] = v
        if variants:
            have["cellfit"] = variants
        have.setdefault("runs", []).append({k: part.get(k) for k in ("command", "machine", "device")})
    return list(out.values())


def report(paths: list[Path], write: bool) -> int:
    results = merge([json.loads(p.read_text()) for p in paths])
    text = section(results)
    print(text)
    if write:
        (REPO / "docs" / "generalise.json").write_text(json.dumps(results, indent=1))
        write_section(REPO / "docs" / "benchmarks.md", text, MARK_START, MARK_END)
        plot(results, REPO / "docs" / "generalise.png")
    return 0


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


#: what each variant is, for the report
VARIANT_WORDS = {
    "today": "the trainer before the guard (the cell size refitted to the painted cells every "
             "round); the held-back cells already stable from round to round",
    "keep": "as `today`, and later rounds distil toward the model they start from on the "
            "pixels nobody painted (keep what the user did not correct)",
    "gentle": "as `today`, later rounds at a learning rate of 3e-4",
    "calibrate": "as `today`, thresholds calibrated on the held-back cells",
    "all": "the guard, calibrated thresholds and later rounds distilled (the cell size still "
           "refitted every round)",
    "default": "the defaults now: the guard on, the cell size kept over correction rounds, "
               "no calibration, no distillation",
    "refit-size": "the defaults now, but the cell size refitted every round",
}

#: AP@0.5 targets after the correction rounds, by kind of image
TARGETS = {"fluorescence nuclei": 0.85, "H&E nuclei": 0.75, "phase-contrast cells": 0.70}


def _runs(rs: list[dict], method: str, variant: str | None = None) -> list[list[dict]]:
    if method == "rf":
        return [r["rf"] for r in rs if r.get("rf")]
    return [r["cellfit"][variant] for r in rs if r.get("cellfit", {}).get(variant)]


def _cell(vals: list[float]) -> str:
    if not vals:
        return "–"
    spread = f" ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else ""
    return f"{np.mean(vals):.3f}{spread}"


def _command(cmd: str) -> str:
    """A run's command; the GPU runner's one-process-per-job commands as one."""
    if "--device cuda" in cmd:
        return "`benchmarks/generalise_gpu.sh` (one process per set, seed and variant)"
    return f"`{cmd}`"


def section(results: list[dict]) -> str:
    by_set: dict[str, list[dict]] = {}
    for r in results:
        by_set.setdefault(r["set"], []).append(r)
    variants = sorted({v for r in results for v in r.get("cellfit", {})})
    rounds = max([len(x) for r in results for x in r.get("cellfit", {}).values()]
                 + [len(r.get("rf", [])) for r in results])
    lines = [MARK_START, "## Generalisation and the correction loop (`benchmarks/generalise.py`)", ""]
    lines.append(
        f"Per set and seed: {int(FRACTION * 100)}% of the cells of 4 training images painted "
        f"whole (at least {MIN_CELLS} per image) with a {RING}-pixel background ring and "
        f"{STROKES} background strokes; AP@0.5 (pooled) on the set's other images. Round 0 "
        "trains from the starting model; before each later round a simulated user paints "
        "the 10 largest errors on the training images from the truth (false objects as "
        "background, missed or merged cells whole) and the model in memory is trained "
        "again. The random forest learns from the same kind of corrections of its own "
        "errors. Figures are the mean over seeds, with the lowest and highest in brackets; "
        "*largest drop* is the largest fall of one round against the one before, over all "
        "seeds (the target is at most 0.02)."
    )
    lines.append("")
    head = ("| set | method | seeds | " + " | ".join(f"round {k}" for k in range(rounds))
            + " | largest drop | cells + strokes added | wall s a round |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for name, rs in by_set.items():
        z = [r["zero_shot"]["ap50"] for r in rs if r.get("zero_shot")]
        o = [r["otsu"]["ap50"] for r in rs if r.get("otsu")]
        lines.append(f"| {name} | starting model, zero-shot | {len(z)} | {_cell(z)} |"
                     + " |" * (rounds + 2))
        lines.append(f"| {name} | Otsu + watershed | {len(o)} | {_cell(o)} |" + " |" * (rounds + 2))
        for label, runs in [("random forest", _runs(rs, "rf"))] + [
                (f"cellfit, {v}", _runs(rs, "cellfit", v)) for v in variants]:
            if not runs:
                continue
            cols = [_cell([x[k]["ap50"] for x in runs if len(x) > k]) for k in range(rounds)]
            drops = [x[k - 1]["ap50"] - x[k]["ap50"] for x in runs for k in range(1, len(x))]
            drop = "–" if not drops else f"{max(drops):.3f}" if max(drops) > 0 else "none"
            effort = max((x[-1]["cells_added"], x[-1]["strokes_added"]) for x in runs)
            secs = [x[k]["seconds"] for x in runs for k in range(len(x))]
            lines.append(f"| {name} | {label} | {len(runs)} | " + " | ".join(cols)
                         + f" | {drop} | {effort[0]} cells, {effort[1]} in all "
                         f"| {np.mean(secs):.0f} |")
    lines.append("")
    lines += [f"- `{v}`: {VARIANT_WORDS.get(v, json.dumps(VARIANTS.get(v)))}" for v in variants]
    lines.append("")
    r0 = results[0]
    devices = sorted({run.get("device") or "" for r in results for run in r.get("runs", [])})
    lines += [
        f"- training: round 0 {r0['round0_steps']} steps, later rounds {r0['round_steps']} "
        f"steps of 4 patches of 256² (70 steps = one idle 2-core CPU-minute); "
        f"{r0['corrections']} corrections a round; devices: {', '.join(devices)}",
        "- commands: " + "; ".join(sorted({_command(run.get("command")) for r in results
                                           for run in r.get("runs", []) if run.get("command")})),
        f"- engine: cellfit at commit {r0.get('engine', '')}",
        "",
        "![AP@0.5 against corrections](generalise.png)",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in results})
    every = ["random forest"] + [f"cellfit ({v})" for v in
                                 sorted({v for r in results for v in r.get("cellfit", {})})]
    colour = {label: f"C{i}" for i, label in enumerate(every)}
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rs = [r for r in results if r["set"] == name]
        series = {"random forest": [r.get("rf", []) for r in rs]}
        for v in sorted({v for r in rs for v in r.get("cellfit", {})}):
            series[f"cellfit ({v})"] = [r["cellfit"][v] for r in rs if v in r.get("cellfit", {})]
        for label, runs in series.items():
            runs = [x for x in runs if x]
            if not runs:
                continue
            n = min(len(x) for x in runs)
            effort = [_mean([x[k]["strokes_added"] for x in runs]) for k in range(n)]
            ys = [_mean([x[k]["ap50"] for x in runs]) for k in range(n)]
            ax.plot(effort, ys, marker="o", label=label, color=colour[label])
        z = _mean([r.get("zero_shot", {}).get("ap50") for r in rs])
        o = _mean([r.get("otsu", {}).get("ap50") for r in rs])
        ax.axhline(o, color="gray", ls="--", lw=1, label="Otsu")
        ax.axhline(z, color="gray", ls=":", lw=1, label="zero-shot")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("corrections added")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("AP@0.5 on test images")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)



# ------------------------------------------------------------- starting models compared
COMPARE_START = "<!-- starting-compare:start -->"
COMPARE_END = "<!-- starting-compare:end -->"


def _diameter_miss(z: dict) -> str:
    """How far the estimated diameters are from the true ones: the median factor, and how
    many images got no estimate."""
    pairs = [(e, t) for e, t in zip(z.get("diameters", []), z.get("true_diameters", []))]
    ok = [abs(np.log(e / t)) for e, t in pairs if isinstance(e, (int, float)) and t]
    none = len(pairs) - len(ok)
    txt = f"×{np.exp(np.median(ok)):.2f}" if ok else "–"
    return txt + (f", {none} undecided" if none else "")


def compare(paths: list[Path], write: bool) -> int:
    """Zero-shot and round-1 figures of each starting model (by its label), set by set,
    beside the peers (from any result file that has them, the same seeds)."""
    runs = [json.loads(p.read_text()) for p in paths]
    labels = list(dict.fromkeys(r.get("starting_model", {}).get("label", "shipped") for r in runs
                                if r.get("zero_shot") or r.get("cellfit")))
    sets = list(dict.fromkeys(r["set"] for r in runs))
    head = ["set", "seeds", "Otsu", "random forest, round 1"]
    for lab in labels:
        head += [f"{lab}: zero-shot", f"{lab}: diameter off by", f"{lab}: zero-shot, diameter "
                 "given", f"{lab}: zero-shot + TTA", f"{lab}: round 1"]
    lines = [COMPARE_START, "## Starting models compared (`benchmarks/generalise.py`)", "",
             "AP@0.5 on each set's test images (the generalisation protocol above, seed 0 "
             "unless more are listed). *Zero-shot*: the starting model alone, the cell "
             "diameter estimated from each image; *diameter off by*: the median factor "
             "between the estimated and the true median diameter, and the images where the "
             "estimate said it could not decide; *diameter given*: the true median diameter "
             "given instead; *TTA*: estimated diameter, flips and rotations averaged; "
             "*round 1*: fine-tuned on the 10% painted cells for 350 steps (5 idle "
             "2-core CPU-minutes). Peers: Otsu + watershed and the random forest with the "
             "same painting.", "",
             ]
    rows = []
    for name in sets:
        rs = [r for r in runs if r["set"] == name]
        seeds = sorted({r["seed"] for r in rs})
        row = [name, ", ".join(map(str, seeds)),
               _cell([r["otsu"]["ap50"] for r in rs if r.get("otsu")]) or "–",
               _cell([r["rf"][0]["ap50"] for r in rs if r.get("rf")]) or "–"]
        for lab in labels:
            mine = [r for r in rs if r.get("starting_model", {}).get("label", "shipped") == lab]
            z = [r["zero_shot"] for r in mine if r.get("zero_shot")]
            row += [_cell([x["ap50"] for x in z]) or "–",
                    "; ".join(_diameter_miss(x) for x in z) or "–",
                    _cell([r["zero_shot_known"]["ap50"] for r in mine if r.get("zero_shot_known")]) or "–",
                    _cell([r["zero_shot_tta"]["ap50"] for r in mine if r.get("zero_shot_tta")]) or "–",
                    _cell([x[0]["ap50"] for r in mine for x in r.get("cellfit", {}).values()]) or "–"]
        rows.append(row)
    # a column no model was measured in (TTA for most) is left out
    keep = [j for j in range(len(head)) if j < 4 or any(r[j] != "–" for r in rows)]
    lines += ["| " + " | ".join(head[j] for j in keep) + " |", "|---" * len(keep) + "|"]
    lines += ["| " + " | ".join(r[j] for j in keep) + " |" for r in rows]
    lines += ["", "- commands: " + "; ".join(sorted({f"`{r['command']}`" for r in runs
                                                      if r.get("command")})),
              "- starting models: " + "; ".join(sorted({
                  f"{r['starting_model']['label']}: {r['starting_model'].get('purpose')}, "
                  f"{r['starting_model'].get('steps')} steps" for r in runs
                  if r.get("starting_model")})),
              COMPARE_END]
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_section(REPO / "docs" / "benchmarks.md", text, COMPARE_START, COMPARE_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
