"""Does "Paint here next" help? Suggested boxes against random boxes and the largest
errors, at the same effort, in the correction loop (issue #15).

Per set and seed, on the training and test images of ``benchmarks/generalise.py``
(:func:`generalise.pick`; nuclei-dsb2018, one image, is cut in halves: the left half
trains, the right half tests) and its first painting (:func:`generalise.paint`: 10% of
the cells of each training image):

- **round 0** trains once from the starting model (``--round0-steps``);
- then, for each **strategy**, starting from that same round-0 model and annotation,
  ``--rounds`` rounds; in each the simulated user paints ``--boxes`` boxes of one side
  (:func:`cellfit.uncertainty.region_size` of the painted cells' median diameter, the
  same for every strategy and round) on the training images, painting the truth inside
  (:func:`cellfit.simulate.paint_regions`: every cell touching a box painted whole,
  the box's background painted background), and the model in memory is trained again
  (``--round-steps``), as the plugin's Train does:

  - ``suggested``: the uncertainty of the current model on each training image
    (:func:`cellfit.uncertainty.predict_uncertain`, test-time augmentation), the boxes
    of :func:`cellfit.uncertainty.suggest_regions` of every training image pooled and
    the best ``k`` by score taken;
  - ``random``: :func:`cellfit.simulate.random_regions` (unpainted, not overlapping),
    the image of each box drawn at random, from a seed fixed per (seed, round);
  - ``largest error``: boxes centred on the ``k`` largest errors of the current
    prediction on the training images (:func:`cellfit.simulate.find_errors` against the
    truth, not overlapping each other): the user who knows the truth, the ceiling.

AP@0.5 on the test images after every round, the effort of every round (boxes, cells
that got painted pixels, background pixels painted) and the time of each part. The
target of the issue: ``suggested`` reaches ``random``'s final AP in half the rounds or
fewer.

Usage::

    .venv/bin/python benchmarks/suggest.py --sets nuclei-u2os --seeds 0 --threads 1
    .venv/bin/python benchmarks/suggest.py --smoke                   # minutes
    .venv/bin/python benchmarks/suggest.py --report benchmarks/results/suggest/*.json

Each (set, seed) writes ``<out>/<set>-<seed>.json`` as it goes; ``--report`` writes the
table into ``docs/benchmarks.md`` (between ``<!-- suggest:start -->`` and
``<!-- suggest:end -->``, placed after the generalisation section when absent) and the
plot ``docs/suggest.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generalise as g
from quality import engine_version, machine, write_section

REPO = g.REPO
MARK_START = "<!-- suggest:start -->"
MARK_END = "<!-- suggest:end -->"
#: the sets run by default: the 2D real sets, the one-image set cut in halves, and one
#: synthetic look
SETS = ["nuclei-u2os", "nuclei-he-monuseg", "cells-phase-usiigaci", "nuclei-dsb2018",
        "synthetic-fluo_nuclei"]
HALVED = {"nuclei-dsb2018"}
STRATEGIES = ["suggested", "random", "largest error"]
KIND = {**g.KIND, "nuclei-dsb2018": "fluorescence nuclei (one image, halves)"}
#: the training settings (the defaults, as generalise's ``default`` variant)
SETTINGS: dict = {}

Box = tuple[int, int, int, int]


# ------------------------------------------------------------------------------ data
def pick(data: Path, set_name: str, seed: int):
    """The training and test images (:func:`generalise.pick`; a one-image set is cut in
    halves along its columns, the left half to train, the right half to test)."""
    if set_name not in HALVED:
        return g.pick(data, set_name, seed)
    name = g._names(data, set_name)[0]
    s = g._read(data, set_name, name)
    half = s.mask.shape[1] // 2

    def cut(sl, tag):
        mask = s.mask[:, sl]
        # cells cut by the line keep their piece, renumbered 1..N
        from skimage.segmentation import relabel_sequential

        return g.Sample(f"{name}-{tag}", s.image[:, sl], relabel_sequential(mask)[0])

    return [cut(slice(0, half), "left")], [cut(slice(half, None), "right")]


def painted_diameter(anns: list[np.ndarray]) -> float:
    """Median equivalent diameter (pixels) of the painted cells (ids >= 2) of all
    annotations."""
    areas = []
    for a in anns:
        a = np.asarray(a).astype(np.int64)
        cnt = np.bincount(a.ravel())[2:]
        areas.append(cnt[cnt > 0])
    areas = np.concatenate(areas) if areas else np.zeros(0)
    return float(2 * np.sqrt(np.median(areas) / np.pi)) if len(areas) else 0.0


def box_side(shapes: list[tuple[int, int]], anns: list[np.ndarray]) -> int:
    """The boxes' side for a set: :func:`region_size` of the painted cells' median
    diameter, no larger than the smallest training image."""
    from cellfit.uncertainty import region_size

    d = painted_diameter(anns)
    smallest = (min(s[0] for s in shapes), min(s[1] for s in shapes))
    return region_size(smallest, diameter=d or None)


def _overlaps(box: Box, taken: list[Box]) -> bool:
    y0, x0, y1, x1 = box
    return any(a < y1 and y0 < c and b < x1 and x0 < d for a, b, c, d in taken)


# ------------------------------------------------------------------------ strategies
def suggested_boxes(uncertainties: list[np.ndarray], anns: list[np.ndarray],
                    images: list[np.ndarray | None], k: int, size: int,
                    diameter: float | None) -> list[tuple[int, Box]]:
    """The ``k`` best suggestions over all training images: each image's
    :func:`suggest_regions` (at most ``k``, side ``size``), pooled and ranked by score.
    ``images``: the planes ``(C, Y, X)`` (or None: no novelty). Returns
    ``(image index, box)``, best first."""
    from cellfit.uncertainty import suggest_regions

    pool = []
    for i, (u, a, im) in enumerate(zip(uncertainties, anns, images)):
        for r in suggest_regions(u, a, im, n=k, size=size, diameter=diameter):
            pool.append((-r.score, i, r.rank, r.box))
    pool.sort()
    return [(i, box) for _s, i, _r, box in pool[:k]]


def random_boxes(shapes: list[tuple[int, int]], anns: list[np.ndarray], k: int, size: int,
                 seed) -> list[tuple[int, Box]]:
    """``k`` random unpainted boxes of side ``size`` (:func:`random_regions`), the image
    of each drawn at random; the same ``seed`` gives the same boxes. An image with no
    room left passes its boxes to the others."""
    from cellfit.simulate import random_regions

    rng = np.random.default_rng(seed)
    counts = np.bincount(rng.integers(0, len(shapes), size=k), minlength=len(shapes))
    out: list[tuple[int, Box]] = []
    short = 0
    for i, (shape, a) in enumerate(zip(shapes, anns)):
        got = random_regions(shape, a, int(counts[i]), size, rng) if counts[i] else []
        out += [(i, tuple(int(v) for v in b)) for b in got]
        short += int(counts[i]) - len(got)
    for i, (shape, a) in enumerate(zip(shapes, anns)):
        if short <= 0:
            break
        # room elsewhere: draw again on this image, keeping clear of its boxes so far
        taken = [b for j, b in out if j == i]
        for b in random_regions(shape, a, short + len(taken) + 4, size, rng):
            if short > 0 and not _overlaps(b, taken):
                out.append((i, tuple(int(v) for v in b)))
                taken.append(b)
                short -= 1
    return out


def centred_box(centre: tuple[float, float], size: int, shape: tuple[int, int]) -> Box:
    """A box of side ``size`` (at most the image's) centred on ``centre`` ``(y, x)``,
    shifted to lie inside the image."""
    h, w = shape
    sy, sx = min(size, h), min(size, w)
    y0 = int(round(centre[0] - sy / 2))
    x0 = int(round(centre[1] - sx / 2))
    y0, x0 = min(max(0, y0), h - sy), min(max(0, x0), w - sx)
    return (y0, x0, y0 + sy, x0 + sx)


def error_boxes(preds: list[np.ndarray], truths: list[np.ndarray], anns: list[np.ndarray],
                k: int, size: int) -> list[tuple[int, Box]]:
    """Boxes of side ``size`` centred on the ``k`` largest errors over all training images
    (:func:`find_errors`: false objects and missed cells, by area), an error whose box
    would overlap one already taken on its image skipped. Returns
    ``(image index, box)``, largest error first."""
    from cellfit.simulate import find_errors

    errors = []
    for i, (p, t, a) in enumerate(zip(preds, truths, anns)):
        errors += [(e.area, i, e) for e in find_errors(p, t, a)]
    errors.sort(key=lambda x: (-x[0], x[1], x[2].kind, x[2].label))
    out: list[tuple[int, Box]] = []
    for _area, i, e in errors:
        if len(out) >= k:
            break
        obj = (preds[i] if e.kind == "false" else truths[i]) == e.label
        ys, xs = np.nonzero(obj)
        box = centred_box((float(ys.mean()) + 0.5, float(xs.mean()) + 0.5), size,
                          truths[i].shape)
        if _overlaps(box, [b for j, b in out if j == i]):
            continue
        out.append((i, box))
    return out


def paint_boxes(truths, anns, boxes: list[tuple[int, Box]]) -> tuple[list[np.ndarray], dict]:
    """Paint the truth in each ``(image index, box)`` (:func:`paint_regions`); the new
    annotations and the effort summed over images."""
    from cellfit.simulate import paint_regions

    anns = list(anns)
    effort = {"boxes": 0, "cells": 0, "background": 0, "pixels": 0}
    for i in sorted({i for i, _b in boxes}):
        anns[i], e = paint_regions(truths[i], anns[i], [b for j, b in boxes if j == i])
        effort["boxes"] += e["regions"]
        for key in ("cells", "background", "pixels"):
            effort[key] += e[key]
    return anns, effort


# ------------------------------------------------------------------------ the loop
def plane(image: np.ndarray, info) -> tuple[np.ndarray, np.ndarray]:
    from cellfit.predict import prepare_planes

    planes, stats = prepare_planes(image, info)
    return planes[0], stats


def uncertainty(model, info, image: np.ndarray, device) -> np.ndarray:
    from cellfit.uncertainty import predict_uncertain

    p, stats = plane(image, info)
    u = None
    for ev in predict_uncertain(model, info, p, stats=stats, device=device):
        if ev.uncertainty is not None:
            u = ev.uncertainty
    return u


def choose(strategy: str, model, info, train, anns, k: int, size: int, diameter: float,
           seed: int, rnd: int, device) -> list[tuple[int, Box]]:
    """The boxes a strategy paints this round."""
    if strategy == "suggested":
        uncs = [uncertainty(model, info, s.image, device) for s in train]
        planes = [plane(s.image, info)[0] for s in train]
        return suggested_boxes(uncs, anns, planes, k, size, diameter)
    if strategy == "random":
        return random_boxes([s.mask.shape for s in train], anns, k, size, [seed, rnd])
    if strategy == "largest error":
        preds = g.cellfit_predict(model, info, train, device)
        return error_boxes(preds, [s.mask for s in train], anns, k, size)
    raise ValueError(f"unknown strategy {strategy!r}")


def run_one(args, set_name: str, seed: int, log) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = pick(args.data, set_name, seed)
    anns0 = g.paint(train, seed)
    d = painted_diameter(anns0)
    size = box_side([s.mask.shape for s in train], anns0)
    n_cells = int(sum(len(np.unique(a[a >= 2])) for a in anns0))
    total = int(sum(len(np.unique(s.mask)) - 1 for s in train))
    res = {"set": set_name, "kind": KIND.get(set_name, set_name), "seed": seed,
           "train": [s.name for s in train], "test": [s.name for s in test],
           "painted_cells": n_cells, "cells_in_training_images": total,
           "painted_diameter": round(d, 1), "box": size, "boxes": args.boxes,
           "rounds": args.rounds, "round0_steps": args.round0_steps,
           "round_steps": args.round_steps, "device": args.device, "strategies": {}}
    out_path = args.out / f"{set_name}-{seed}{args.tag}.json"

    def save():
        out_path.write_text(json.dumps(res, indent=1, default=str))

    log(f"{set_name} seed {seed}: {n_cells} of {total} cells painted (median diameter "
        f"{d:.1f} px), boxes of {size} px; {len(train)} training, {len(test)} test images")
    images = [s.image for s in train]
    model0, info0, fit0 = g.train_round(images, anns0, SETTINGS, seed, args.round0_steps,
                                        args.device)
    t0 = time.perf_counter()
    r0 = {"round": 0, **g.ap(g.cellfit_predict(model0, info0, test, args.device), test),
          "boxes": 0, "cells": 0, "background": 0, "pixels": 0,
          "painted_cells": n_cells, "train_seconds": fit0["seconds"],
          "choose_seconds": 0.0, "eval_seconds": round(time.perf_counter() - t0, 1)}
    res["round0"] = {**r0, "fit": fit0}
    log(f"  round 0: AP50 {r0['ap50']:.3f} (P {r0['precision']:.2f} R {r0['recall']:.2f}), "
        f"train {fit0['seconds']:.0f} s, eval {r0['eval_seconds']:.0f} s")
    save()
    for strategy in args.strategies:
        model, info = copy.deepcopy(model0), copy.deepcopy(info0)
        anns = [a.copy() for a in anns0]
        rows = [dict(r0)]
        for rnd in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            boxes = choose(strategy, model, info, train, anns, args.boxes, size, d, seed, rnd,
                           args.device)
            t_choose = time.perf_counter() - t0
            anns, effort = paint_boxes([s.mask for s in train], anns, boxes)
            model, info, fit = g.train_round(images, anns, SETTINGS, seed, args.round_steps,
                                             args.device, model, info)
            t0 = time.perf_counter()
            score = g.ap(g.cellfit_predict(model, info, test, args.device), test)
            row = {"round": rnd, **score, **effort,
                   "painted_cells": int(sum(len(np.unique(a[a >= 2])) for a in anns)),
                   "box_list": [[i, *b] for i, b in boxes],
                   "choose_seconds": round(t_choose, 1), "train_seconds": fit["seconds"],
                   "eval_seconds": round(time.perf_counter() - t0, 1),
                   "notices": fit.get("notices")}
            rows.append(row)
            res["strategies"][strategy] = rows
            save()
            log(f"  {strategy} round {rnd}: AP50 {row['ap50']:.3f} (P {row['precision']:.2f} "
                f"R {row['recall']:.2f}); {effort['boxes']} boxes, {effort['cells']} cells, "
                f"{effort['background']} bg px; choose {t_choose:.0f} s, train "
                f"{fit['seconds']:.0f} s, eval {row['eval_seconds']:.0f} s")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=g.DATA)
    p.add_argument("--sets", nargs="+", default=SETS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--boxes", type=int, default=3, help="boxes painted a round (k)")
    p.add_argument("--round0-steps", type=int, default=5 * g.STEPS_PER_MINUTE)
    p.add_argument("--round-steps", type=int, default=2 * g.STEPS_PER_MINUTE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "suggest")
    p.add_argument("--tag", default="", help="added to the result files' names")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run: the synthetic set, 1 round, few steps")
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="only write the docs from these result files")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--docs", type=Path, default=REPO / "docs",
                   help="where benchmarks.md and suggest.png are")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, args.docs, not args.no_write)
    if args.smoke:
        args.rounds, args.round0_steps, args.round_steps = 1, 10, 5
        if args.sets == SETS:
            args.sets = ["synthetic-fluo_nuclei"]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    for set_name in args.sets:
        for seed in args.seeds:
            t0 = time.perf_counter()
            res = run_one(args, set_name, seed, log)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["command"] = "python benchmarks/suggest.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
            res["machine"] = machine()
            res["engine"] = os.environ.get("ENGINE_COMMIT") or engine_version()
            (args.out / f"{set_name}-{seed}{args.tag}.json").write_text(
                json.dumps(res, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------- report
def curves(rs: list[dict], strategy: str) -> list[float]:
    """Mean AP@0.5 over seeds per round (rounds every seed reached)."""
    runs = [r["strategies"][strategy] for r in rs if r.get("strategies", {}).get(strategy)]
    if not runs:
        return []
    n = min(len(x) for x in runs)
    return [float(np.mean([x[k]["ap50"] for x in runs])) for k in range(n)]


def target(suggested: list[float], random: list[float]) -> dict:
    """The issue's target on mean curves (round 0 first): the first painting round (1 or
    later) where ``suggested`` reaches ``random``'s final AP, and whether that is at most
    half the rounds. Undecided (``met`` None) when random's final AP is not above the
    shared round 0: reaching it would mean nothing."""
    if len(suggested) < 2 or len(random) < 2:
        return {"round": None, "rounds": None, "met": None}
    rounds = len(random) - 1
    goal = random[-1]
    if goal <= random[0]:
        return {"round": None, "rounds": rounds, "goal": goal, "met": None}
    first = next((k for k, v in enumerate(suggested) if k >= 1 and v >= goal - 1e-9), None)
    return {"round": first, "rounds": rounds, "goal": goal,
            "met": first is not None and first <= rounds / 2}


def _effort(rs: list[dict], strategy: str, key: str) -> float:
    runs = [r["strategies"][strategy] for r in rs if r.get("strategies", {}).get(strategy)]
    return float(np.mean([sum(row.get(key, 0) for row in x[1:]) for x in runs])) if runs else 0.0


def _secs(rs: list[dict], strategy: str, key: str) -> float:
    vals = [row.get(key, 0) for r in rs for row in r.get("strategies", {}).get(strategy, [])[1:]]
    return float(np.mean(vals)) if vals else float("nan")


def section(results: list[dict]) -> str:
    by_set: dict[str, list[dict]] = {}
    for r in results:
        by_set.setdefault(r["set"], []).append(r)
    strategies = [s for s in STRATEGIES if any(s in r.get("strategies", {}) for r in results)]
    rounds = max(len(c) for rs in by_set.values() for s in strategies for c in [curves(rs, s)])
    r0 = results[0]
    lines = [MARK_START, '## "Paint here next": suggested against random boxes '
             "(`benchmarks/suggest.py`)", ""]
    lines.append(
        "Per set and seed: the training and test images and the first painting of the "
        "generalisation benchmark (10% of the cells of each training image; nuclei-dsb2018, "
        "one image, cut in halves: the left half trains, the right half tests), round 0 "
        "trained once from the starting model. Then, from that same model and painting, "
        "each strategy runs its rounds: the simulated user paints the truth inside k "
        "boxes of one side (3 painted-cell diameters, the same for every strategy and "
        "round) on the training images — every cell touching a box painted whole, the "
        "box's background painted background — and the model is trained again. "
        "*suggested*: the best k of `suggest_regions` over all training images, from the "
        "current model's test-time-augmented uncertainty; *random*: k unpainted random "
        "boxes (seeded per round); *largest error*: boxes centred on the k largest errors "
        "of the current prediction against the truth (a user who knows the truth: the "
        "ceiling). AP@0.5 (pooled) on the test images, the mean over seeds. The effort is "
        "the same number of boxes of the same size a round; what they hold differs, so "
        "the cells and background pixels painted are given too (summed over the rounds)."
    )
    lines.append("")
    head = ("| set | strategy | seeds | " + " | ".join(f"round {k}" for k in range(rounds))
            + " | boxes | cells painted | background px painted | s to choose a round |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    verdicts = []
    for name, rs in by_set.items():
        for s in strategies:
            c = curves(rs, s)
            if not c:
                continue
            n = len([r for r in rs if r.get("strategies", {}).get(s)])
            cols = [f"{v:.3f}" for v in c] + ["–"] * (rounds - len(c))
            lines.append(f"| {name} | {s} | {n} | " + " | ".join(cols)
                         + f" | {_effort(rs, s, 'boxes'):.0f} | {_effort(rs, s, 'cells'):.0f} "
                         f"| {_effort(rs, s, 'background'):.0f} | {_secs(rs, s, 'choose_seconds'):.0f} |")
        t = target(curves(rs, "suggested"), curves(rs, "random"))
        if t["met"] is None and t["rounds"] is None:
            verdicts.append(f"- {name}: not measured (a strategy or its rounds missing)")
        elif t["met"] is None:
            verdicts.append(f"- {name}: **undecided** — random's final AP@0.5 {t['goal']:.3f} "
                            "is not above the shared round 0, so reaching it says nothing")
        elif t["round"] is None:
            verdicts.append(f"- {name}: **not met** — suggested never reached random's final "
                            f"AP@0.5 {t['goal']:.3f} (round {t['rounds']}) in "
                            f"{t['rounds']} rounds")
        else:
            verdicts.append(
                f"- {name}: **{'met' if t['met'] else 'not met'}** — suggested reached "
                f"random's final AP@0.5 {t['goal']:.3f} (round {t['rounds']}) at round "
                f"{t['round']}, {'within' if t['met'] else 'beyond'} half the rounds "
                f"({t['rounds'] / 2:g})")
    lines += ["", "**Target** (the suggestions reach the random strategy's final AP in half "
              "the rounds or fewer), per set:", "", *verdicts]
    devices = sorted({r.get("device") or "" for r in results})
    lines += [
        "",
        "Nothing was tuned here: the defaults of `suggest_regions` (box side, score, "
        "novelty) were set by the engine's author on synthetic images before this "
        "benchmark, so every set above is a reported-on set, none a set anything was "
        "chosen on.",
        "",
        f"- training: round 0 {r0['round0_steps']} steps, later rounds {r0['round_steps']} "
        f"steps of 4 patches of 256² (70 steps = one idle 2-core CPU-minute), the default "
        f"training settings; {r0['boxes']} boxes a round; box sides: "
        + ", ".join(f"{n} {rs[0]['box']} px" for n, rs in by_set.items())
        + f"; devices: {', '.join(devices)}",
        "- commands: " + "; ".join(sorted({f"`{r['command']}`" for r in results
                                           if r.get("command")})),
        f"- engine: cellfit at commit {r0.get('engine', '')}",
        "",
        "![AP@0.5 against round, per strategy](suggest.png)",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in results))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.2), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rs = [r for r in results if r["set"] == name]
        for j, s in enumerate(STRATEGIES):
            c = curves(rs, s)
            if c:
                ax.plot(range(len(c)), c, marker="o", color=f"C{j}", label=s,
                        ls="--" if s == "largest error" else "-")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("AP@0.5 on test images")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def place_markers(path: Path) -> None:
    """Put empty markers after the generalisation section (before the starting models'
    comparison that follows its notes), when absent."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        return
    block = f"{MARK_START}\n{MARK_END}\n\n"
    for anchor, before in ((g.COMPARE_START, True), (g.MARK_END, False)):
        if anchor in text:
            at = text.index(anchor) if before else text.index(anchor) + len(anchor) + 1
            text = text[:at] + (block if before else "\n" + block) + text[at:]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def report(paths: list[Path], docs: Path, write: bool) -> int:
    results = [json.loads(p.read_text()) for p in paths]
    text = section(results)
    print(text)
    if write:
        md = docs / "benchmarks.md"
        place_markers(md)
        write_section(md, text, MARK_START, MARK_END)
        plot(results, docs / "suggest.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
