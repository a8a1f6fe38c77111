"""Quality per CPU-minute of training presets (encoder, decoder width, patch, object scale).

Two measurements, combined into "AP@0.5 after N CPU-minutes":

1. ``--steptime``: seconds per training step of each preset on this CPU (forward,
   backward, Adam on one batch of 4 patches), median of a few steps.
2. ``--quality``: AP@0.5 on held-out nuclei-u2os images after a fixed number of
   steps, for each preset (run on any device: the number of steps, not the device,
   decides the quality; a GPU makes the sweep fast).

Sparse annotation as in benchmarks/quality.py: 10% of the nuclei of 4 images painted
whole, a thin background ring, a few background strokes.

    python benchmarks/presets.py --steptime
    python benchmarks/presets.py --quality --device cuda --steps 100 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PRESETS: dict[str, dict] = {
    "mobilenet_v2 / narrow decoder / auto scale (default)": {},
    "mobilenet_v2 / narrow decoder / no scaling": {"scale": 1.0},
    "mobilenet_v2 / narrow decoder / auto scale, diameter 25": {"cell_diameter": 25.0},
    "mobilenet_v2 / wide decoder / auto scale": {"decoder_channels": (256, 128, 64, 32, 16)},
    "tu-efficientnet_b0 / narrow decoder / auto scale": {"encoder": "tu-efficientnet_b0"},
    "resnet18 / wide decoder / auto scale": {
        "encoder": "resnet18",
        "decoder_channels": (256, 128, 64, 32, 16),
    },
    "mobilenet_v2 / narrow / auto scale, patch 192": {"patch_size": 192},
    "mobilenet_v2 / narrow / auto scale, lr 0.01": {"lr": 1e-2},
    "mobilenet_v2 / narrow / auto scale, strong intensity jitter": {"intensity_augment": "strong"},
}


def data_dir() -> Path:
    here = Path(__file__).resolve().parents[1]
    for cand in (here / ".data" / "nuclei-u2os", here.parent / "shared" / "data" / "nuclei-u2os"):
        if cand.exists():
            return cand
    raise SystemExit("nuclei-u2os not found: pass --data")


def load_split(data: Path, seed: int, n_train: int = 4, n_test: int = 10):
    import tifffile

    from cellfit.synthetic import sparse_annotation

    names = sorted(p.name for p in (data / "images").glob("*.tif"))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    train = [names[i] for i in order[:n_train]]
    test = [names[i] for i in order[n_train : n_train + n_test]]
    tr_img = [tifffile.imread(data / "images" / n) for n in train]
    tr_ann = [
        sparse_annotation(
            tifffile.imread(data / "masks" / n), fraction=0.1, ring=4, strokes=3, seed=seed + k
        )
        for k, n in enumerate(train)
    ]
    te = [(tifffile.imread(data / "images" / n), tifffile.imread(data / "masks" / n)) for n in test]
    return tr_img, tr_ann, te


def steptime(repeats: int = 4) -> dict[str, float]:
    import torch

    from cellfit.losses import build_loss
    from cellfit.model import ModelInfo, build_model
    from cellfit.train import TrainConfig

    out = {}
    for name, kw in PRESETS.items():
        cfg = TrainConfig(**kw)
        info = ModelInfo(encoder=cfg.encoder, decoder_channels=list(cfg.decoder_channels))
        model = build_model(info)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        loss_fn = build_loss(cfg.loss)
        p = cfg.patch_size
        x = torch.randn(4, 1, p, p)
        y = torch.randint(0, 3, (4, p, p))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out[name] = float(np.median(times[1:]))
        print(f"{out[name]:6.2f} s/step  {name}", flush=True)
    return out


def quality(steps_list, device: str, seed: int, names=None) -> dict:
    from cellfit.metrics import aggregate_instance_metrics, instance_metrics
    from cellfit.postprocess import instances_from_probs
    from cellfit.predict import predict_stack
    from cellfit.train import TrainConfig, Trainer

    tr_img, tr_ann, te = load_split(data_dir(), seed)
    res: dict = {}
    for name, kw in PRESETS.items():
        if names and not any(n in name for n in names):
            continue
        for steps in steps_list:
            cfg = TrainConfig(steps=steps, time_limit=None, device=device, seed=seed, amp=False,
                              batch_size=4, **kw)
            t = Trainer(tr_img, tr_ann, cfg)
            t0 = time.perf_counter()
            for _ in t.run():
                pass
            tt = time.perf_counter() - t0
            per = []
            for img, truth in te:
                probs = predict_stack(t.model, t.info, img)[0]
                per.append(instance_metrics(instances_from_probs(probs), truth, (0.5,)))
            m = aggregate_instance_metrics(per)
            res.setdefault(name, {})[steps] = {
                "ap50": m["ap50"],
                "f1": m["f1_50"],
                "precision": m["precision_50"],
                "recall": m["recall_50"],
                "scale": t.info.scale,
                "seconds": tt,
            }
            print(json.dumps({"preset": name, "steps": steps, **res[name][steps]}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steptime", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run presets whose name contains one of these")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()
    result = {}
    if args.steptime:
        result["steptime"] = steptime()
    if args.quality:
        result["quality"] = quality(args.steps, args.device, args.seed, args.only)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
