"""Speed: training-step overhead, GPU utilisation, end-to-end prediction throughput.

    python benchmarks/speed.py                       # all parts, auto device
    python benchmarks/speed.py --device cuda         # the same on a GPU (AMP bf16, compile)
    python benchmarks/speed.py --size 2048 --write-docs

Every figure is a ratio of two things measured in the same run, so a loaded machine
moves both alike:

1. *training*: :meth:`cellfit.train.Trainer.train_step` (sampling, augmentation,
   transfer, forward, focal + dice loss, backward, AdamW) ÷ the bare smp step (forward,
   cross-entropy, backward, AdamW) of the same model, optimizer, AMP and memory format
   on an identical batch already on the device. Steps alternate in blocks (cellfit,
   bare, cellfit without prefetching, ...); each cellfit block starts without a
   prefetched batch, so overlapping is never credited for work done during another
   block. Medians of the per-step times.
2. *GPU utilisation*: model FLOPs of one training step (forward + backward, counted
   with ``torch.utils.flop_counter.FlopCounterMode``) ÷ the median step time ÷ the
   GPU's dense bf16 peak, with and without ``torch.compile``. On a CPU the FLOP rate is
   printed and the utilisation is "not measured: no GPU".
3. *prediction*: a ``size`` x ``size`` uint16 TIFF of synthetic cells, end to end through
   :func:`cellfit.batch.predict_files` (read, normalise, tile, network, blend, seeded
   watershed, write labels). The network calls (:class:`cellfit.predict.TileRunner`),
   the labelling and the writing are timed inside the run; the rest is reading,
   normalising, tiling and blending. The model is a default cellfit model trained for
   ``--train-steps`` steps on synthetic cells (so the watershed sees cell-like
   probabilities), or ``--model``.

Quality per minute of the presets is measured by ``benchmarks/presets.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- speed:start -->", "<!-- speed:end -->"

#: dense bf16 tensor-core peaks in TFLOP/s (no sparsity), by a piece of the device name
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "GH200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    from cellfit.devices import device_label

    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), device: {device_label(device)}")


def bf16_peak(name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) of a GPU named ``name``, or None if unknown."""
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------- training
def make_trainer(device: str, batch_size: int | None, patch: int, steps: int = 1000):
    """A trainer on a 1024² synthetic image (default model, no rescaling)."""
    from cellfit.synthetic import sparse_annotation, synthetic_cells
    from cellfit.train import TrainConfig, Trainer

    img, lab = synthetic_cells((1024, 1024), n_cells=300, seed=0)
    ann = sparse_annotation(lab, 0.3, seed=0)
    cfg = TrainConfig(steps=steps, time_limit=None, val_every=10**9, scale=1.0, device=device,
                      batch_size=batch_size, patch_size=patch)
    return Trainer([img], [ann], cfg)


def bare_step_fn(trainer):
    """The bare smp step on one fixed batch already on the device, as a closure."""
    from cellfit.targets import IGNORE

    x, y = trainer.sampler.sample(trainer.batch_size)
    dev = trainer.device
    xt = torch.from_numpy(x).to(dev)
    yt = torch.from_numpy(y).to(dev).long()
    if dev.type == "cuda":
        xt = xt.contiguous(memory_format=torch.channels_last)
    model, opt, scaler = trainer.model, trainer.optimizer, trainer.scaler

    def step() -> float:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=trainer.amp_dtype, enabled=trainer.use_amp):
            logits = model(xt)
        loss = F.cross_entropy(logits.float(), yt, ignore_index=IGNORE)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    return step, xt, yt


def count_step_flops(trainer, xt: torch.Tensor, yt: torch.Tensor) -> int:
    """FLOPs of one forward + backward of ``trainer.model`` on ``xt`` (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cellfit.targets import IGNORE

    model = getattr(trainer.model, "_orig_mod", trainer.model)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(trainer.device.type, dtype=trainer.amp_dtype,
                                 enabled=trainer.use_amp):
        loss = F.cross_entropy(model(xt).float(), yt, ignore_index=IGNORE)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _drop_pending(trainer) -> None:
    trainer.batches.discard()


def measure_training(trainer, rounds: int, block: int, warmup: int = 2) -> dict:
    """Median seconds per step: cellfit (prefetch on / off), bare, and sampling alone."""
    dev = trainer.device
    bare, xt, yt = bare_step_fn(trainer)
    for _ in range(warmup):
        trainer.train_step()
        bare()
    _drop_pending(trainer)
    times: dict[str, list[float]] = {"cellfit": [], "no_prefetch": [], "bare": []}
    for _ in range(rounds):
        for name in ("cellfit", "bare", "no_prefetch"):
            trainer.prefetch = name != "no_prefetch"
            _drop_pending(trainer)
            for _ in range(block):
                fn = bare if name == "bare" else trainer.train_step
                times[name].append(_time(fn, dev))
    trainer.prefetch = True
    _drop_pending(trainer)
    sample = [_time(lambda: trainer.sampler.sample(trainer.batch_size), dev) for _ in range(10)]
    out = {k: statistics.median(v) for k, v in times.items()}
    out["sample"] = statistics.median(sample)
    out["flops"] = count_step_flops(trainer, xt, yt)
    out["steps"] = {k: len(v) for k, v in times.items()}
    return out


def part_training(args, dev: torch.device) -> list[tuple[str, str]]:
    trainer = make_trainer(str(dev), args.batch_size, args.patch)
    variants = [("eager", False)]
    if args.compile == "on" or (args.compile == "auto" and dev.type == "cuda"):
        variants.append(("torch.compile", True))
    rows: list[tuple[str, str]] = []
    b, p = trainer.batch_size, trainer.config.patch_size
    amp = f"AMP {str(trainer.amp_dtype).replace('torch.', '')}" if trainer.use_amp else "fp32"
    fmt = "channels_last, cudnn.benchmark" if dev.type == "cuda" else "contiguous"
    rows.append(("training batch", f"{b} x {p}² patches, default model (U-Net++ / "
                 f"{trainer.info.encoder}, decoder {'-'.join(map(str, trainer.info.decoder_channels))}), "
                 f"{amp}, {fmt}"))
    peak = args.peak_tflops
    if dev.type == "cuda" and peak is None:
        peak = bf16_peak(torch.cuda.get_device_name(dev))
    for label, compiled in variants:
        if compiled:
            trainer.model = torch.compile(trainer.model)
        r = measure_training(trainer, args.rounds, args.block)
        ratio = r["cellfit"] / r["bare"]
        before = r["no_prefetch"] / r["bare"]
        tag = f" ({label})" if len(variants) > 1 else ""
        rows += [
            (f"sampling + augmentation of one batch{tag}",
             f"{r['sample'] * 1e3:.1f} ms ({100 * r['sample'] / r['bare']:.1f}% of a bare step)"),
            (f"bare smp step (forward, cross-entropy, backward, AdamW){tag}",
             f"{r['bare'] * 1e3:.1f} ms"),
            (f"cellfit step without prefetching (before){tag}",
             f"{r['no_prefetch'] * 1e3:.1f} ms, ratio {before:.3f}"),
            (f"cellfit step, next batch prefetched in a thread{tag}",
             f"{r['cellfit'] * 1e3:.1f} ms"),
            (f"**training ratio** cellfit ÷ bare (target ≤ 1.10){tag}", f"**{ratio:.3f}**"),
        ]
        tflops = r["flops"] / r["cellfit"] / 1e12
        rows.append((f"model FLOPs per step (forward + backward){tag}",
                     f"{r['flops'] / 1e9:.1f} GFLOP → {tflops * 1e3:.1f} GFLOP/s"))
        if dev.type != "cuda":
            util = "not measured: no GPU"
        elif peak is None:
            util = f"{tflops:.1f} TFLOP/s; peak of this GPU unknown: pass --peak-tflops"
        else:
            util = f"**{100 * tflops / peak:.1f}%** of {peak:.0f} TFLOP/s (target ≥ 40%)"
        rows.append((f"GPU utilisation: model FLOP/s ÷ dense bf16 peak{tag}", util))
        print(f"  {label}: {r}", file=sys.stderr)
    return rows


# ------------------------------------------------------------------- prediction
def synthetic_tiff(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` uint16 TIFF of synthetic cells (a 512 px pattern, mirrored)."""
    import tifffile

    from cellfit.synthetic import synthetic_cells

    base = synthetic_cells((512, 512), n_cells=100, seed=0)[0].astype(np.uint16)
    reps = -(-size // 512)
    row = np.concatenate([base if i % 2 == 0 else base[:, ::-1] for i in range(reps)], axis=1)
    img = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)
    tifffile.imwrite(path, np.ascontiguousarray(img[:size, :size]))
    return path


def quick_model(path: Path, device: torch.device, steps: int) -> Path:
    """A default cellfit model trained ``steps`` steps (8 x 128² patches) on synthetic
    cells: 120 steps give cell-like maps (about 15% foreground); far fewer leave
    nearly everything foreground, which would make the watershed look slower than it is."""
    from cellfit.synthetic import sparse_annotation, synthetic_cells
    from cellfit.train import TrainConfig, Trainer

    img, lab = synthetic_cells((512, 512), n_cells=100, seed=0)
    t = Trainer([img], [sparse_annotation(lab, 0.5, seed=0)],
                TrainConfig(steps=steps, time_limit=None, patch_size=128, batch_size=8, val_every=10**9,
                            val_fraction=0, device=str(device)))
    for _ in t.run():
        pass
    return t.save(path)


@contextmanager
def timed(cls, name: str, bucket: list[float], device: torch.device):
    """Time every call of ``cls.name`` (synchronising the device) into ``bucket``."""
    orig = getattr(cls, name)

    def wrapper(*a, **k):
        _sync(device)
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            _sync(device)
            bucket.append(time.perf_counter() - t)

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, orig)


def predict_profile(model_path: Path, tif: Path, out: Path, device: torch.device,
                    batch_size: int | None) -> dict:
    """Seconds of one end-to-end ``predict_files`` run, and of its parts."""
    from cellfit import batch, file_prediction
    from cellfit.predict import TileRunner

    net: list[float] = []
    lab: list[float] = []
    write: list[float] = []
    with (timed(TileRunner, "__call__", net, device), timed(file_prediction.LoadedModel, "labels", lab, device),
          timed(file_prediction.OutputWriter, "put", write, device),
          timed(file_prediction.OutputWriter, "close", write, device)):
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        events = list(batch.predict_files(model_path, [tif], out, device=str(device),
                                          batch_size=batch_size, overwrite=True))
        total = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    if events[-1].status != "done":
        raise SystemExit(f"prediction failed: {events[-1].error}")
    return {"total": total, "cpu": cpu, "network": sum(net), "labels": sum(lab),
            "write": sum(write), "batches": len(net)}


def part_predict(args, dev: torch.device) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_path = Path(args.model)
        else:
            model_path = quick_model(tmp / "m.cellfit", dev, args.train_steps)
        for size in args.size:
            tif = synthetic_tiff(tmp / f"img{size}.tif", size)
            r = predict_profile(model_path, tif, tmp / "out", dev, args.predict_batch)
            mpx = size * size / 1e6
            outside = r["total"] - r["network"]
            rest = outside - r["labels"] - r["write"]
            rows += [
                (f"prediction {size}² (TIFF → labels TIFF)",
                 f"{r['total']:.1f} s wall ({r['cpu']:.1f} s CPU), "
                 f"**{mpx / r['total']:.3f} Mpx/s**"),
                (f"  network (TileRunner, {r['batches']} batches)",
                 f"{r['network']:.1f} s ({100 * r['network'] / r['total']:.1f}%)"),
                ("  seeded watershed (labels)",
                 f"{r['labels']:.1f} s ({100 * r['labels'] / r['total']:.1f}%)"),
                ("  writing outputs", f"{r['write']:.1f} s ({100 * r['write'] / r['total']:.1f}%)"),
                ("  reading, normalising, tiling, blending",
                 f"{rest:.1f} s ({100 * rest / r['total']:.1f}%)"),
                (f"  **share outside the model** {size}² (target ≤ 20% on GPU)",
                 f"**{100 * outside / r['total']:.1f}%**"),
            ]
            print(f"  predict {size}: {r}", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------- output
def table(rows: list[tuple[str, str]]) -> str:
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def write_section(docs: Path, body: str) -> None:
    """Put ``body`` between the speed markers of ``docs`` (appended when absent)."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    section = f"{START}\n{body.strip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    ap.add_argument("--parts", default="train,predict", help="train and/or predict")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="training batch (default: cellfit's, 4 on CPU, 8 on CUDA)")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="blocks per training variant")
    ap.add_argument("--block", type=int, default=3, help="steps per block")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="also measure torch.compile (auto: on CUDA only)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the GPU (default: from its name)")
    ap.add_argument("--size", type=int, nargs="+", default=[8192],
                    help="side(s) of the square prediction image(s)")
    ap.add_argument("--predict-batch", type=int, default=None, help="tiles per batch")
    ap.add_argument("--model", default=None, help="a model file for the prediction part")
    ap.add_argument("--train-steps", type=int, default=120,
                    help="steps of the quick model for the prediction part")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--write-docs", action="store_true", help=f"update {DOCS.name}")
    args = ap.parse_args(argv)
    from cellfit.devices import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    parts = {p.strip() for p in args.parts.split(",")}
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[tuple[str, str]] = [("machine", machine(dev))]
    if "train" in parts:
        rows += part_training(args, dev)
    if "predict" in parts:
        rows += part_predict(args, dev)
    body = "\n".join([
        "## Speed (`benchmarks/speed.py`)",
        "",
        f"Command: `{command.strip()}`",
        "",
        table(rows),
        "",
        "How to read it: the training ratio compares `Trainer.train_step` (sampling, "
        "augmentation, transfer, forward, focal + dice loss, backward, AdamW) with the bare "
        "smp step (forward, cross-entropy, backward, AdamW) of the same model and optimizer "
        "on one batch already on the device; steps alternate in blocks, medians of the "
        "per-step wall times. The prediction rows time the network calls (`TileRunner`), the "
        "labelling (`labels_from_probs`) and the writing inside one `predict_files` run; "
        "the rest is reading, normalising, tiling and blending.",
        "",
        "Quality per CPU-minute of the encoder / decoder / patch presets, and the default "
        "chosen from it, is the table of **Training presets** above (`benchmarks/presets.py`).",
    ])
    print(body)
    if args.write_docs:
        write_section(DOCS, body)
        print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
