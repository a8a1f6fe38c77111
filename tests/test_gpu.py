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


# ------------------------------------------------- a real out-of-memory on the GPU
@pytest.fixture
def gpu_capped_at():
    """Cap this process's CUDA memory at what it holds now plus ``extra`` bytes (a real
    limit of PyTorch's allocator: going past it raises a real ``OutOfMemoryError``);
    the cap is lifted afterwards."""
    total = torch.cuda.get_device_properties(0).total_memory

    def cap(extra: int) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (torch.cuda.memory_reserved() + extra) / total)
        )

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


GiB = 1 << 30


def test_training_on_a_real_cuda_out_of_memory_halves_the_batch_and_goes_on(gpu_capped_at):
    """64 patches of 256² do not fit in 1.5 GiB: the step is retried with halved
    batches until one fits, the user is told once, and training goes on with it."""
    img, lab = synthetic_cells((512, 512), n_cells=60, seed=2)
    ann = sparse_annotation(lab, 0.5, seed=1)
    cfg = TrainConfig(steps=4, time_limit=None, patch_size=256, batch_size=64, device="cuda",
                      val_every=1000, checkpoint=None)
    trainer = Trainer([img], [ann], cfg)
    gpu_capped_at(int(1.5 * GiB))
    events = list(trainer.run())
    notices = [e.notice for e in events if e.notice]
    assert notices and "out of CUDA memory with batches of 64 patches" in notices[0], notices
    assert 1 <= trainer.batch_size < 64
    assert events[-1].done and events[-1].step == 4
    assert all(np.isfinite(e.loss) for e in events)
    assert trainer.info.training[-1]["steps"] == 4


def test_prediction_on_a_real_cuda_out_of_memory_halves_the_tile_batch(tmp_path, gpu_capped_at):
    """64 tiles of 512² do not fit in 1.5 GiB: the batch is halved until it fits, the
    user is told, and the probabilities are those of an unconstrained run."""
    from cellfit.predict import TileRunner, iter_predict, prepare_planes

    img, lab = synthetic_cells((192, 192), n_cells=20, seed=2)
    trainer = Trainer([img], [sparse_annotation(lab, 0.5, seed=1)],
                      TrainConfig(steps=2, patch_size=96, device="cuda", val_every=1000))
    list(trainer.run())
    path = trainer.save(tmp_path / "m.cellfit")
    model, info = load_model(path, "cuda")
    big = np.tile(img, (12, 12))  # 2304² → 36 tiles of 512²
    planes, stats = prepare_planes(big, info)

    free_run = TileRunner(model, "cuda", batch_size=4)
    ref = np.stack([ev.probabilities for ev in iter_predict(
        model, info, planes, stats, tile=512, runner=free_run) if ev.probabilities is not None])

    runner = TileRunner(model, "cuda", batch_size=64)
    gpu_capped_at(int(1.5 * GiB))
    events = list(iter_predict(model, info, planes, stats, tile=512, runner=runner))
    notices = [e.notice for e in events if getattr(e, "notice", None)] + runner.notices
    assert any("out of CUDA memory with batches of 64 tiles" in n for n in notices), notices
    assert 1 <= runner.batch_size < 64
    got = np.stack([ev.probabilities for ev in events if ev.probabilities is not None])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.02


# ------------------------------------------------- AMP training resumed on the GPU
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_amp_training_stopped_and_resumed_ends_as_the_run_left_alone(tmp_path, monkeypatch, half):
    """On CUDA with autocast (bf16; fp16 with its gradient scaler, whose scale must come
    back too): same steps, learning rates, patches, losses and final weights as the
    uninterrupted run, within the noise of the GPU's arithmetic."""
    import hashlib

    if half == "float16":  # as on a GPU without bf16: fp16 autocast and a GradScaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen: list[str] = []
    step_on = Trainer._step_on

    def recording(self, xb, yb):
        seen.append(hashlib.sha1(xb.numpy().tobytes() + yb.numpy().tobytes()).hexdigest())
        return step_on(self, xb, yb)

    monkeypatch.setattr(Trainer, "_step_on", recording)
    img, lab = synthetic_cells((192, 192), n_cells=20, seed=4)
    ann = sparse_annotation(lab, 0.8, seed=1)
    ck = tmp_path / "m.cellfit.resume"
    cfg = {"steps": 10, "time_limit": None, "patch_size": 96, "batch_size": 4,
           "device": "cuda", "val_every": 4, "decoder_channels": (32, 32, 32, 32, 16)}

    def drain(t, stop_at=None):
        evs = []
        for ev in t.run():
            evs.append(ev)
            if ev.step == stop_at:
                t.stop()
        return evs

    alone = Trainer([img], [ann], TrainConfig(**cfg))
    assert alone.use_amp and alone.amp_dtype == getattr(torch, half)
    assert alone.scaler.is_enabled() == (half == "float16")
    ref = drain(alone)
    ref_seen = list(seen)
    seen.clear()
    first = Trainer([img], [ann], TrainConfig(**cfg, checkpoint=ck, checkpoint_every=0))
    part1 = drain(first, stop_at=4)
    assert part1[-1].stopped and ck.exists()
    second = Trainer([img], [ann], TrainConfig(**cfg, checkpoint=ck, resume=True))
    assert second.step == 4 and second.use_amp
    if half == "float16":
        assert second.scaler.get_scale() == first.scaler.get_scale()
    part2 = drain(second)
    steps = part1[:-1] + part2
    assert [e.step for e in steps] == [e.step for e in ref] == list(range(1, 11))
    assert [e.lr for e in steps] == pytest.approx([e.lr for e in ref], rel=1e-12)
    assert seen == ref_seen  # the data order
    assert [e.loss for e in steps] == pytest.approx([e.loss for e in ref], rel=2e-2)
    if half == "float16":
        assert second.scaler.get_scale() == alone.scaler.get_scale()
    a, b = alone.model.state_dict(), second.model.state_dict()
    for k in a:
        if a[k].is_floating_point():
            diff = (a[k].float() - b[k].float()).norm() / (a[k].float().norm() + 1e-8)
            assert diff < 2e-2, k
    assert not ck.exists()
