"""Prediction at scale: tiled throughput, MONAI comparison, peak memory.

    python benchmarks/predict.py throughput [--size 8192] [--device auto] ...
    python benchmarks/predict.py monai      [--size 8192] [--device auto] ...
    python benchmarks/predict.py memory     [--stack-gb 4] [--files 50] [--tmp DIR]
    python benchmarks/predict.py speed      [...]   # 1 and 2 together (one cellfit run)
    python benchmarks/predict.py all        [--write-docs]   # the three, table for the docs

1. *throughput*: cellfit's tiled prediction of one ``size`` x ``size`` plane (raw
   pixels in, blended probabilities out: normalisation, mirrored margin, tiles,
   Gaussian blending, crop) against the bare network on the same tiles (already cut
   and on the device; no stitching, no I/O). Ratio = cellfit pixels/s ÷ bare pixels/s.
2. *monai*: cellfit against MONAI's ``sliding_window_inference`` with the same network,
   tile, overlap (64/512), Gaussian blending (sigma 0.125 x tile) and batch. MONAI gets
   the normalised plane with cellfit's mirrored margin, already on the device (so its
   tiles fall where cellfit's do, and it is not charged for normalising); outputs are
   compared pixel by pixel.
3. *memory*: peak resident memory (``ru_maxrss`` of a fresh process) of ``cellfit
   predict`` on one file, on ``--files`` files, and on one ``--stack-gb`` GB uint16
   stack, all generated in ``--tmp``. The network is a per-pixel stand-in so a CPU gets
   through gigabytes in minutes; the real network adds a constant (its weights and one
   batch of tiles), not something that grows with the data.

The network is cellfit's default (U-Net++ / mobilenet_v2, decoder 128-64-32-16-16) with
random weights (speed does not depend on them). ``--threads`` sets torch's CPU threads.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- predict:start -->", "<!-- predict:end -->"


# ------------------------------------------------------------------ shared bits
def _setup(args):
    from cellfit.devices import resolve_device
    from cellfit.model import ModelInfo, build_model
    from cellfit.predict import TileRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    info = ModelInfo() if args.model == "default" else ModelInfo(decoder_channels=[16] * 5)
    model = build_model(info).to(dev).eval()
    runner = TileRunner(model, dev, batch_size=args.batch_size)
    return info, model, runner, dev


@functools.lru_cache(maxsize=1)
def _pattern() -> np.ndarray:
    from cellfit.synthetic import synthetic_cells

    return synthetic_cells((512, 512), n_cells=100, seed=0)[0].astype(np.uint16)


def _image(size: int) -> np.ndarray:
    """A ``size`` x ``size`` uint16 image of synthetic cells (a 512 px pattern, mirrored)."""
    base = _pattern()
    reps = -(-size // 512)
    row = np.concatenate([base if i % 2 == 0 else base[:, ::-1] for i in range(reps)], axis=1)
    img = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)
    return np.ascontiguousarray(img[:size, :size])


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Wall seconds and this process's CPU seconds of a block."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        _sync(self.dev)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.dev)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def _cellfit(info, model, runner, dev, img, tile, overlap):
    from cellfit.io import ImageStack, InMemoryImage
    from cellfit.predict import PlanePredictor
    from cellfit.stream import stack_stats

    stack = InMemoryImage(ImageStack(img[None, None], (), "YX"))
    stats = stack_stats(stack, info)
    pred = PlanePredictor(model, info, runner, tile=tile, overlap=overlap)
    probs = None
    with _Clock(dev) as clock:
        for res in pred.predict([(0, stack.plane(0))], stats):
            if res.probabilities is not None:
                probs = res.probabilities
    return clock, probs, stats


def _warm(info, model, runner, dev, tile, overlap):
    """Run once on a small image (CUDA / oneDNN initialisation, automatic batch size)."""
    _cellfit(info, model, runner, dev, _image(max(tile, 600)), tile, overlap)


# ------------------------------------------------------- 1. throughput, 2. MONAI
def bench_speed(args, monai: bool = True, bare: bool = True) -> dict:
    """cellfit, the bare network and MONAI on one plane, interleaved ``--repeats``
    times; each keeps its best time (a shared machine only ever slows a run down)."""
    from cellfit.normalize import normalize
    from cellfit.predict import plane_geometry

    info, model, runner, dev = _setup(args)
    _warm(info, model, runner, dev, args.tile, args.overlap)
    img = _image(args.size)
    geo = plane_geometry(args.size, args.size, args.tile, args.overlap)
    n, bs = geo.n_tiles, runner.batch_size
    times: dict[str, list[float]] = {"cellfit": [], "bare": [], "monai": []}
    cpu: dict[str, list[float]] = {"cellfit": [], "bare": [], "monai": []}
    probs = ref = None
    for _ in range(args.repeats):
        clock, probs, stats = _cellfit(info, model, runner, dev, img, args.tile, args.overlap)
        times["cellfit"].append(clock.wall)
        cpu["cellfit"].append(clock.cpu)
        if bare:
            x = torch.randn(bs, info.in_channels, geo.th, geo.tw, device=dev)
            with _Clock(dev) as clock:
                for b0 in range(0, n, bs):
                    runner._forward(x[: min(bs, n - b0)])
            times["bare"].append(clock.wall)
            cpu["bare"].append(clock.cpu)
            del x
        if monai:
            plane = normalize(img[None, None], info.normalization, stats)[0]
            padded = torch.from_numpy(np.ascontiguousarray(plane[:, geo.idx_y][:, :, geo.idx_x]))
            padded = padded[None].to(dev)
            del plane
            clock, ref = _monai(runner, padded, args, dev, geo, bs)
            times["monai"].append(clock.wall)
            cpu["monai"].append(clock.cpu)
            del padded
    px = args.size * args.size
    # on a CPU with one torch thread, process CPU time measures the work whatever else
    # runs on the machine; on a GPU (or several threads) wall time is what counts
    basis = "cpu" if dev.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    best = {k: min(v) for k, v in (cpu if basis == "cpu" else times).items() if v}
    common = {"size": args.size, "tiles": n, "batch": bs, "device": str(dev),
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "model": args.model, "basis": basis, "wall_s": times, "cpu_s": cpu}
    out = {}
    if bare:
        out["throughput"] = {
            **common, "cellfit_s": best["cellfit"], "bare_s": best["bare"],
            "cellfit_mpx_s": px / best["cellfit"] / 1e6, "bare_mpx_s": px / best["bare"] / 1e6,
            "ratio": best["bare"] / best["cellfit"],
        }
    if monai:
        diff = np.abs(ref - probs)
        t = args.tile
        inner = diff[:, t:-t, t:-t] if args.size > 2 * t else diff
        out["monai"] = {
            **common, "cellfit_s": best["cellfit"], "monai_s": best["monai"],
            "ratio": best["monai"] / best["cellfit"],
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "interior_max_abs_diff": float(inner.max()),
            "argmax_agreement": float((probs.argmax(0) == ref.argmax(0)).mean()),
        }
    return out


def _monai(runner, padded, args, dev, geo, bs):
    from monai.inferers import sliding_window_inference

    def predictor(x):
        return runner._forward(x)  # the same network call as cellfit's (AMP on CUDA)

    kw = {"overlap": args.overlap / args.tile, "mode": "gaussian", "sigma_scale": 0.125,
          "sw_device": dev, "device": dev}
    with torch.inference_mode():
        sliding_window_inference(padded[..., :600, :600], (args.tile, args.tile), bs, predictor,
                                 **kw)  # warm
        with _Clock(dev) as clock:
            out = sliding_window_inference(padded, (args.tile, args.tile), bs, predictor, **kw)
    m = geo.m
    ref = out[0, :, m : m + args.size, m : m + args.size].float().cpu().numpy()
    return clock, ref


# ---------------------------------------------------------------------- 3. memory
def _standin_engine_class():
    """A LoadedModel whose network is a per-pixel stand-in (see the module docstring)."""
    from torch import nn

    from cellfit.file_prediction import LoadedModel
    from cellfit.predict import PlanePredictor, TileRunner

    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            m = self.pool(x)
            return torch.cat([8 * (0.3 - m), 8 * (x - 0.45), 24 * (m - x).abs() - 1], 1) + self.w

    class StandIn(LoadedModel):
        def __init__(self, model_path, settings):
            from cellfit.model import read_model_info
            from cellfit.postprocess import postprocess_settings

            self.model_path = Path(model_path)
            self.device = torch.device("cpu")
            self.info = read_model_info(model_path)
            self.model = Blob().eval()
            self.runner = TileRunner(self.model, "cpu", batch_size=settings.batch_size)
            self.predictor = PlanePredictor(self.model, self.info, self.runner,
                                            tile=settings.tile, overlap=settings.overlap)
            self.postprocess = postprocess_settings(self.info.postprocess, settings.postprocess)

    return StandIn


def _rss_child(argv) -> None:
    """In a fresh process: predict ``inputs`` into ``out``; print peak RSS as JSON."""
    import cellfit.batch as cb

    model, out, *inputs = argv
    torch.set_num_threads(1)
    cb.LoadedModel = _standin_engine_class()
    t0 = time.perf_counter()
    n = 0
    for ev in cb.predict_files(model, inputs, out, overwrite=True, device="cpu"):
        if ev.status == "failed":
            raise SystemExit(f"{ev.path}: {ev.error}")
        n += ev.status == "done"
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"files": n, "seconds": time.perf_counter() - t0,
                      "peak_rss_mb": peak_kb / 1024}))


def _write_stack(path: Path, planes: int, shape: tuple[int, int]) -> None:
    import tifffile

    from cellfit.synthetic import synthetic_cells

    tile = synthetic_cells((256, 256), n_cells=24, seed=1)[0].astype(np.uint16)
    reps = (-(-shape[0] // 256), -(-shape[1] // 256))
    base = np.tile(tile, reps)[: shape[0], : shape[1]]

    def gen():
        for i in range(planes):
            yield np.roll(base, 7 * i, axis=1)

    tifffile.imwrite(path, gen(), shape=(planes, *shape), dtype=np.uint16,
                     photometric="minisblack", bigtiff=planes * shape[0] * shape[1] * 2 > 2**31)


def bench_memory(args) -> dict:
    from cellfit.model import ModelInfo, build_model, save_model

    tmp = Path(args.tmp)
    stack_bytes = int(args.stack_gb * 2**30)
    free = shutil.disk_usage(tmp.parent if not tmp.exists() else tmp).free
    need = stack_bytes * 1.3 + 2**30
    if free < need:
        raise SystemExit(f"{tmp}: {free / 2**30:.1f} GB free, {need / 2**30:.1f} GB needed: "
                         "use a smaller --stack-gb")
    tmp.mkdir(parents=True, exist_ok=True)
    model = save_model(tmp / "m.cellfit", build_model(ModelInfo(decoder_channels=[16] * 5)),
                       ModelInfo(decoder_channels=[16] * 5))
    side = 1024
    small = (tmp / "one", 16)  # one file: 16 planes of 1024 x 1024 (32 MB)
    cases = {}
    try:
        small[0].mkdir(exist_ok=True)
        _write_stack(small[0] / "f000.tif", small[1], (side, side))
        many = tmp / "many"
        many.mkdir(exist_ok=True)
        for i in range(args.files):
            shutil.copy(small[0] / "f000.tif", many / f"f{i:03d}.tif")
        big = tmp / "big"
        big.mkdir(exist_ok=True)
        planes = stack_bytes // (side * side * 2)
        _write_stack(big / "stack.tif", planes, (side, side))
        for name, folder, desc in (
            ("one file", small[0], "16 x 1024 x 1024 uint16 (32 MB)"),
            (f"{args.files} files", many, f"{args.files} x 32 MB"),
            ("one stack", big, f"{planes} x 1024 x 1024 uint16 "
                               f"({planes * side * side * 2 / 2**30:.2f} GB)"),
        ):
            res = subprocess.run(
                [sys.executable, __file__, "_rss", str(model), str(tmp / f"out-{folder.name}"),
                 str(folder)], capture_output=True, text=True, check=False,
            )
            if res.returncode != 0:
                raise SystemExit(res.stderr[-2000:])
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["input"] = desc
            cases[name] = r
            print(name, r, file=sys.stderr)
            shutil.rmtree(tmp / f"out-{folder.name}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return cases


# --------------------------------------------------------------------------- main
def _table(results: dict, cmd: str, extra_note: str = "") -> str:
    lines = [START, "## Prediction at scale (`benchmarks/predict.py`)", "",
             f"Command: `{cmd}`", ""]
    if extra_note:
        lines += [extra_note, ""]
    t, m, mem = results.get("throughput"), results.get("monai"), results.get("memory")
    if t:
        lines += [
            "| tiled prediction vs bare network | value |", "|---|---|",
            f"| image | {t['size']} x {t['size']} ({t['tiles']} tiles of 512, batch {t['batch']}, "
            f"{t['device']}, {t['threads']} thread(s), {t['model']} network, "
            f"best of {t['repeats']}; {t['basis']} seconds) |",
            f"| cellfit (normalise, tile, blend) | {t['cellfit_s']:.1f} s ({t['cellfit_mpx_s']:.3f} Mpx/s) |",
            f"| bare network, same tiles | {t['bare_s']:.1f} s ({t['bare_mpx_s']:.3f} Mpx/s) |",
            f"| **ratio** (target ≥ 0.95) | **{t['ratio']:.3f}** |", "",
        ]
    if m:
        lines += [
            "| cellfit vs MONAI sliding_window_inference | value |", "|---|---|",
            f"| cellfit | {m['cellfit_s']:.1f} s |", f"| MONAI | {m['monai_s']:.1f} s |",
            f"| **speed ratio** MONAI time ÷ cellfit time (target ≥ 1.0) | **{m['ratio']:.3f}** |",
            f"| max / mean abs. difference of probabilities | {m['max_abs_diff']:.2e} / {m['mean_abs_diff']:.2e} |",
            f"| max abs. difference away from the border (> 1 tile) | {m['interior_max_abs_diff']:.2e} |",
            f"| same most probable class | {100 * m['argmax_agreement']:.3f} % of pixels |", "",
        ]
    if mem:
        lines += ["| peak memory (`ru_maxrss`, fresh process) | input | peak RSS | time |",
                  "|---|---|---|---|"]
        for name, r in mem.items():
            lines.append(f"| {name} | {r['input']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs(block: str) -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        post = rest.split(END, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_rss":
        _rss_child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("throughput", "monai", "speed", "memory", "all"),
                    help="speed = throughput and monai together")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved repeats, best time kept (for shared machines)")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="default: automatic")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", choices=("default", "tiny"), default="default")
    ap.add_argument("--stack-gb", type=float, default=4.0)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--tmp", default="/tmp/cellfit-bench-predict")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    results = {}
    if args.what in ("throughput", "monai", "speed", "all"):
        results.update(bench_speed(args, monai=args.what != "throughput",
                                   bare=args.what != "monai"))
        print(json.dumps(results), file=sys.stderr)
    if args.what in ("memory", "all"):
        results["memory"] = bench_memory(args)
    cmd = "python benchmarks/predict.py " + " ".join(argv)
    block = _table(results, cmd)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_docs(block)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    sys.exit(main())
