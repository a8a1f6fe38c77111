"""CUDA path: AMP training, channels_last, tiled prediction on the GPU. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfit.model import load_model
from cellfit.predict import predict_stack
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_training_with_amp_and_prediction_match_cpu(tmp_path):
    img, lab = synthetic_cells((192, 192), n_cells=20, seed=2)
    ann = sparse_annotation(lab, 0.5, seed=1)
    trainer = Trainer([img], [ann], TrainConfig(steps=30, patch_size=96, device="cuda", val_every=10))
    events = list(trainer.run())
    assert trainer.device.type == "cuda" and trainer.use_amp
    assert all(np.isfinite(e.loss) for e in events)
    assert events[-1].loss < events[0].loss
    path = trainer.save(tmp_path / "m.cellfit")
    gpu_model, info = load_model(path, "cuda")
    cpu_model, _ = load_model(path, "cpu")
    p_gpu = predict_stack(gpu_model, info, img, device="cuda")
    p_cpu = predict_stack(cpu_model, info, img, device="cpu")
    assert p_gpu.shape == p_cpu.shape == (1, 3, 192, 192)
    # bf16/fp16 autocast against fp32: close, not identical
    assert np.abs(p_gpu - p_cpu).mean() < 0.02


def test_speed_benchmark_training_part_on_cuda():
    """benchmarks/speed.py's training figures on the GPU (AMP, channels_last); the
    benchmark itself also measures torch.compile."""
    import importlib.util
    from argparse import Namespace
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_bench", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    args = Namespace(batch_size=4, patch=128, rounds=1, block=2, compile="off", peak_tflops=100.0)
    rows = dict(speed.part_training(args, torch.device("cuda")))
    assert "AMP" in rows["training batch"] and "channels_last" in rows["training batch"]
    assert rows["GPU utilisation: model FLOP/s ÷ dense bf16 peak"].startswith("**")
    ratio = float(rows["**training ratio** cellfit ÷ bare (target ≤ 1.10)"].strip("*"))
    assert ratio > 0
