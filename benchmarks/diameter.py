"""How well the starting model estimates the cell diameter, and which decision rule to use.

The estimate (:func:`cellfit.starting.estimate_diameter`) runs the network at several
sizes (:func:`~cellfit.starting.size_tries`) and decides from what each try found
(:func:`~cellfit.starting.decide_diameter`). The tries are the slow part; this script
runs them once per image, keeps them in a JSON file, and then scores decision rules on
them at no cost:

- **chosen on**: synthetic scenes of every look (fluorescence nuclei and cells,
  brightfield, phase contrast, H&E), of known diameters (16, 35 and 65 pixels), in images
  of 512² pixels, drawn from a seed the starting model was not trained on;
- **reported on**: the test images of the real sets of ``../shared/data`` that
  ``benchmarks/generalise.py`` uses (seed 0), never used to choose.

Per rule and source: the share of images decided, the median and the worst factor
between the estimate and the true median diameter, and the share within a factor 1.25
(counting undecided images as misses).

Usage::

    .venv/bin/python benchmarks/diameter.py --model FILE --label v3   # tries, then report
    .venv/bin/python benchmarks/diameter.py --tries results/diameter/v3.json  # rules only

The table goes to ``docs/benchmarks.md`` between ``<!-- diameter:start -->`` and
``<!-- diameter:end -->`` (``--no-write`` to only print it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalise import DATA, REAL_SETS, pick
from quality import engine_version, machine, write_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- diameter:start -->", "<!-- diameter:end -->"
KINDS = ("fluo_nuclei", "fluo_cells", "brightfield", "phase", "he")
DIAMETERS = (16.0, 35.0, 65.0)

#: decision rules compared: keyword arguments of cellfit.starting.decide_diameter
RULES: dict[str, dict] = {
    "tries of ≥ 2 cells vote (before)": {"min_cells": 2},
    "≥ 4 cells (the default)": {"min_cells": 4},
    "≥ 8 cells": {"min_cells": 8},
}


def collect(model_path: Path | None, per: int, size: int, seed: int, sets: list[str], log,
            diameters=DIAMETERS) -> dict:
    """Run the size tries on synthetic scenes and real test images."""
    from cellfit.model import load_model
    from cellfit.starting import median_diameter, size_tries, starting_model_path
    from cellfit.synthetic import scene

    model, info = load_model(model_path or starting_model_path())
    target = float(info.cell_diameter or 30.0)
    candidates = tuple(target * 2 ** (k / 2) for k in range(-2, 9))
    rows = []
    t0 = time.perf_counter()

    def one(source: str, image: np.ndarray, mask: np.ndarray) -> None:
        plane = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
        tries = size_tries(model, info, plane, "cpu", candidates)
        true = median_diameter(mask)[0]
        rows.append({"source": source, "true": round(true, 1),
                     "tries": [asdict(t) for t in tries]})
        log(f"[{time.perf_counter() - t0:6.0f}s] {source}: true {true:.1f}")

    rng = np.random.default_rng(seed)
    for kind in KINDS:
        for d in diameters:
            for _ in range(per):
                img, lab, _ = scene(kind, (size, size), d, seed=rng)
                one(f"synthetic {kind}", img, lab)
    for set_name in sets:
        _, test = pick(DATA, set_name, 0)
        for s in test:
            one(set_name, s.image, s.mask)
    return {"model": str(model_path or "shipped"), "candidates": candidates, "rows": rows,
            "per": per, "size": size, "seed": seed, "engine": engine_version(),
            "machine": machine()}


def score(tries: dict, rule: dict) -> dict[str, dict]:
    """Per source: decided share, median/worst factor off, share within x1.25."""
    from cellfit.errors import CellfitError
    from cellfit.starting import SizeTry, decide_diameter

    out: dict[str, list] = {}
    for row in tries["rows"]:
        ts = [SizeTry(**t) for t in row["tries"]]
        try:
            d = decide_diameter(ts, tuple(tries["candidates"]), **rule)
        except CellfitError:
            d = None
        out.setdefault(row["source"], []).append((d, row["true"]))
    result = {}
    for source, pairs in out.items():
        off = [abs(math.log(d / t)) for d, t in pairs if d]
        result[source] = {
            "n": len(pairs),
            "decided": sum(d is not None for d, _ in pairs) / len(pairs),
            "median": math.exp(float(np.median(off))) if off else None,
            "worst": math.exp(max(off)) if off else None,
            "within": sum(1 for d, t in pairs if d and abs(math.log(d / t)) <= math.log(1.25))
            / len(pairs),
        }
    return result


def table(tries: dict, label: str) -> str:
    scores = {name: score(tries, rule) for name, rule in RULES.items()}
    sources = list(next(iter(scores.values())))
    lines = [
        START,
        "## The diameter estimate (`benchmarks/diameter.py`)",
        "",
        f"The starting model ({label}) estimating each image's cell diameter: per rule, the "
        "share of images "
        "decided / the median factor off / the share within ×1.25 (undecided count as "
        "misses). Rules chosen on the synthetic rows, reported on the real ones.",
        "",
        "| images | n | " + " | ".join(scores) + " |",
        "|---|---|" + "---|" * len(scores),
    ]
    for src in sources:
        cells = []
        for name in scores:
            s = scores[name][src]
            med = f"×{s['median']:.2f}" if s["median"] else "–"
            cells.append(f"{s['decided']:.0%} / {med} / {s['within']:.0%}")
        real = "" if src.startswith("synthetic") else " (real)"
        lines.append(f"| {src}{real} | {next(iter(scores.values()))[src]['n']} | " + " | ".join(cells) + " |")
    lines += ["", f"- {tries.get('command', '')}", f"- engine {tries['engine']}; "
              f"{tries['machine']}", END, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--label", default="shipped")
    p.add_argument("--per", type=int, default=1, help="synthetic images per look and size")
    p.add_argument("--diameters", type=float, nargs="+", default=list(DIAMETERS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sets", nargs="*", default=list(REAL_SETS))
    p.add_argument("--tries", type=Path, help="score the tries kept in this file")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "diameter")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.tries:
        tries = json.loads(args.tries.read_text())
        label = args.tries.stem
    else:
        import torch

        torch.set_num_threads(2)
        tries = collect(args.model, args.per, args.size, args.seed, args.sets,
                        lambda m: print(m, flush=True), args.diameters)
        tries["command"] = " ".join(["python benchmarks/diameter.py", *sys.argv[1:]])
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{args.label}.json"
        path.write_text(json.dumps(tries, indent=1))
        print(f"wrote {path}")
        label = args.label
    text = table(tries, label)
    print(text)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
