"""Speed work (issue 6): prefetching training batches, out-of-memory in training,
device choice and the device report, the speed benchmark's docs section."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cellfit.errors import CellfitError
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig, Trainer

TINY = {"patch_size": 64, "batch_size": 4, "decoder_channels": (16, 16, 16, 16, 16)}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    img, lab = synthetic_cells((96, 96), n_cells=10, seed=5)
    return img, sparse_annotation(lab, 0.8, seed=2)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------ prefetching
def test_prefetched_batches_are_the_batches_drawn_in_order(data):
    img, ann = data
    runs = []
    for prefetch in (True, False):
        t = Trainer([img], [ann], TrainConfig(steps=3, val_every=100, **TINY))
        t.prefetch = prefetch
        drawn = []
        sample = t.sampler.sample

        def spy(n, sample=sample, drawn=drawn):
            batch = sample(n)
            drawn.append(batch[0].copy())
            return batch

        t.sampler.sample = spy
        losses = [e.loss for e in t.run()]
        runs.append((losses, _weights(t.model), drawn))
    (l_on, w_on, d_on), (l_off, w_off, d_off) = runs
    assert l_on == l_off
    assert torch.equal(w_on, w_off)
    # the background thread drew one batch ahead, the same batches in the same order
    assert len(d_on) == len(d_off) + 1
    assert all(np.array_equal(a, b) for a, b in zip(d_on, d_off))


def test_an_error_while_prefetching_reaches_the_training_loop(data):
    img, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=3, val_every=100, **TINY))
    sample = t.sampler.sample
    calls = []

    def fail_second(n):
        calls.append(n)
        if len(calls) == 2:
            raise ValueError("broken sampler")
        return sample(n)

    t.sampler.sample = fail_second
    with pytest.raises(ValueError, match="broken sampler"):
        list(t.run())


# ------------------------------------------------------------------- the loss
def _overlap_reference(kind, logits, target, ignore=255, smooth=1.0, alpha=0.3, beta=0.7):
    """The overlap loss as smp computes it: masked softmax and one-hot target, per class."""
    import torch.nn.functional as F
    from segmentation_models_pytorch.losses._functional import (
        soft_dice_score,
        soft_jaccard_score,
        soft_tversky_score,
    )

    b, k = logits.shape[:2]
    valid = (target != ignore).view(b, 1, -1).float()
    safe = torch.where(target != ignore, target, 0)
    probs = (logits.softmax(1).view(b, k, -1) * valid).permute(1, 0, 2).reshape(k, -1)
    onehot = (F.one_hot(safe.view(b, -1), k).permute(0, 2, 1).float() * valid)
    onehot = onehot.permute(1, 0, 2).reshape(k, -1)
    if kind == "dice":
        score = soft_dice_score(probs, onehot, smooth=smooth, dims=(1,))
    elif kind == "jaccard":
        score = soft_jaccard_score(probs, onehot, smooth=smooth, dims=(1,))
    else:
        score = soft_tversky_score(probs, onehot, alpha, beta, smooth=smooth, dims=(1,))
    present = onehot.sum(1) > 0
    return (1.0 - score)[present].mean()


@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_overlap_losses_equal_smps_one_hot_form(kind, k):
    from cellfit.losses import OverlapLoss

    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(3, k, 40, 50, generator=gen, dtype=torch.float64)
    target = torch.randint(0, k, (3, 40, 50), generator=gen)
    target[torch.rand(3, 40, 50, generator=gen) < 0.6] = 255
    target[target == k - 1] = 0  # one class absent: left out of the mean
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = OverlapLoss(kind)(a, target)
    ref = _overlap_reference(kind, b.float(), target)
    got.backward()
    ref.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------- post-processing
def _instances_reference(probs, fg_threshold=0.5, seed_threshold=0.5, min_size=16):
    """The seeded watershed as it was before it skipped regions with fewer than two
    seeds: one ``watershed`` call over every foreground pixel (with today's rule for
    objects on the image edge)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from cellfit.postprocess import drop_small_objects

    p_bg, p_in = probs[0], probs[1]
    fg = (1.0 - p_bg) > fg_threshold
    markers, n = ndi.label((p_in > seed_threshold) & fg)
    if n == 0:
        return np.zeros(p_bg.shape, dtype=np.int32)
    if min_size > 1:
        markers = drop_small_objects(markers, max(1, min_size // 4))
    labels = watershed(-p_in, markers, mask=fg)
    if min_size > 1:
        labels = drop_small_objects(labels, min_size, max(1, min_size // 4))
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def _cell_probabilities(seed: int, shape=(160, 200), n_cells=40):
    """A noisy, blurred background / interior / boundary map of touching synthetic cells."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    _, lab = synthetic_cells(shape, n_cells=n_cells, seed=seed)
    edge = (ndi.maximum_filter(lab, 3) != ndi.minimum_filter(lab, 3)) & (lab > 0)
    cls = np.where(lab == 0, 0, np.where(edge, 2, 1))
    logits = np.stack([(cls == c).astype(np.float32) * 3 for c in range(3)])
    logits += rng.normal(0, 1.2, logits.shape).astype(np.float32)
    logits = np.stack([ndi.gaussian_filter(c, 1.0) for c in logits])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("fg", "seed_t", "min_size"), [(0.5, 0.5, 16), (0.3, 0.6, 1), (0.6, 0.4, 40)])
def test_watershed_by_region_gives_the_same_labels(seed, fg, seed_t, min_size):
    from cellfit.postprocess import instances_from_probs

    probs = _cell_probabilities(seed)
    got = instances_from_probs(probs, fg, seed_t, min_size)
    ref = _instances_reference(probs, fg, seed_t, min_size)
    assert got.dtype == ref.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    assert ref.max() > 5  # many cells, some of them touching


def test_watershed_by_region_mixes_single_seed_and_crowded_regions():
    from scipy import ndimage as ndi

    from cellfit.postprocess import instances_from_probs

    probs = _cell_probabilities(0)
    fg = (1 - probs[0]) > 0.5
    regions, _ = ndi.label(fg)
    seeds, _ = ndi.label((probs[1] > 0.5) & fg)
    per_region = [len(np.unique(seeds[(regions == r) & (seeds > 0)])) for r in range(1, regions.max() + 1)]
    # the case the shortcut is for, and the case it must leave to the watershed
    assert 1 in per_region and max(per_region) >= 2
    np.testing.assert_array_equal(instances_from_probs(probs), _instances_reference(probs))


# ------------------------------------------------------------ out of memory
def _oom_above(model, limit: int, sizes: list[int]):
    forward = model.forward

    def fake(x):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    model.forward = fake


def test_out_of_memory_in_training_halves_the_batch_and_goes_on(data):
    img, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=4, val_every=100, **TINY))
    sizes: list[int] = []
    _oom_above(t.model, 1, sizes)
    events = list(t.run())
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert all(np.isfinite(e.loss) for e in events)
    assert events[0].notice == (
        "out of CPU memory with batches of 4 patches: continuing with 2; "
        "out of CPU memory with batches of 2 patches: continuing with 1"
    )
    assert all(e.notice is None for e in events[1:])
    assert t.batch_size == 1
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert t.info.training[-1]["batch_size"] == 1


def test_out_of_memory_on_one_patch_is_one_clear_sentence(data):
    img, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=4, val_every=100, **TINY))
    _oom_above(t.model, 0, [])
    with pytest.raises(CellfitError, match=r"single patch of 64x64 pixels: make the patch size smaller"):
        list(t.run())


def test_other_errors_in_training_are_not_taken_for_out_of_memory(data):
    img, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=2, val_every=100, **TINY))

    def broken(x):
        raise RuntimeError("shape mismatch")

    t.model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(t.run())
    assert t.batch_size == 4


def test_the_cli_prints_the_out_of_memory_notice(tmp_path, capsys, monkeypatch):
    import tifffile

    import cellfit.train as ctrain
    from cellfit.cli import main

    img, lab = synthetic_cells((96, 96), n_cells=10, seed=5)
    for sub, arr in (("img", img), ("lab", sparse_annotation(lab, 0.8, seed=2))):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "a.tif", arr)
    step_on = ctrain.Trainer._step_on

    def small_memory(self, xb, yb):  # whichever model the CLI starts from
        if len(xb) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step_on(self, xb, yb)

    monkeypatch.setattr(ctrain.Trainer, "_step_on", small_memory)
    code = main([
        "train", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
        "--out", str(tmp_path / "m.cellfit"), "--steps", "2", "--patch-size", "64",
        "--batch-size", "2", "--val-every", "100", "--device", "cpu",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "cellfit: note: out of CPU memory with batches of 2 patches: continuing with 1" in err
    assert (tmp_path / "m.cellfit").exists()


# ------------------------------------------------------------------ devices
@pytest.fixture
def no_gpu(monkeypatch):
    """A machine where PyTorch sees neither CUDA nor MPS (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(no_gpu, cuda, mps, expected):
    from cellfit.devices import resolve_device

    no_gpu.setattr(torch.cuda, "is_available", lambda: cuda)
    no_gpu.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu").type == "cpu"


def test_device_report_on_a_cpu_only_build(no_gpu):
    from cellfit.devices import describe_devices

    no_gpu.setattr(torch.version, "cuda", None)
    no_gpu.setattr(torch.version, "hip", None, raising=False)
    text = describe_devices()
    assert "CUDA build: no" in text
    assert "no CUDA GPU is used: this PyTorch is a CPU-only build: install a CUDA build" in text
    assert text.splitlines()[-1].startswith("cellfit will use: CPU only (")


def _fail_init(message):
    def init():
        raise RuntimeError(message)

    return init


def test_device_report_without_a_driver(no_gpu):
    from cellfit.devices import describe_devices

    no_gpu.setattr(torch.version, "cuda", "12.4")
    no_gpu.setattr(torch.cuda, "init", _fail_init(
        "Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
        "and installed a driver from http://www.nvidia.com/Download/index.aspx"))
    text = describe_devices()
    assert "CUDA build: yes (CUDA 12.4)" in text
    assert "no CUDA GPU is used: no NVIDIA driver was found" in text
    assert "cellfit will use: CPU only" in text


def test_device_report_with_an_old_driver(no_gpu):
    from cellfit.devices import cuda_unavailable_reason

    no_gpu.setattr(torch.version, "cuda", "12.4")
    no_gpu.setattr(torch.cuda, "init", _fail_init(
        "The NVIDIA driver on your system is too old (found version 11040)."))
    assert cuda_unavailable_reason() == (
        "the NVIDIA driver is too old for this PyTorch (CUDA 12.4): update the driver")


def test_device_report_when_cuda_visible_devices_hides_the_gpus(no_gpu):
    from cellfit.devices import cuda_unavailable_reason

    no_gpu.setattr(torch.version, "cuda", "12.4")
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_unavailable_reason().startswith("CUDA_VISIBLE_DEVICES='' hides every GPU")


def test_device_report_with_a_gpu(no_gpu):
    from types import SimpleNamespace

    import cellfit.devices as cdev

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_000_000_000,
                            major=9, minor=0)
    no_gpu.setattr(torch.version, "cuda", "12.4")
    no_gpu.setattr(torch.cuda, "is_available", lambda: True)
    no_gpu.setattr(torch.cuda, "device_count", lambda: 1)
    no_gpu.setattr(torch.cuda, "get_device_properties", lambda i: props)
    no_gpu.setattr(cdev, "_driver_version", lambda: "550.54.15")
    text = cdev.describe_devices()
    assert cdev.cuda_unavailable_reason() is None
    assert "NVIDIA driver: 550.54.15" in text
    assert "GPU 0: NVIDIA H100 80GB HBM3, 85.0 GB, compute capability 9.0" in text
    assert text.splitlines()[-1] == "cellfit will use: CUDA: NVIDIA H100 80GB HBM3 (85 GB)"
    assert "no CUDA GPU is used" not in text


# ------------------------------------------------------------- the benchmark
def _speed_module():
    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_speed_section_replaces_only_its_own_part_of_the_docs(tmp_path):
    speed = _speed_module()
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- other:start -->\nother team\n<!-- other:end -->\n")
    speed.write_section(docs, "## Speed\nfirst")
    text = docs.read_text()
    assert text.endswith("<!-- speed:start -->\n## Speed\nfirst\n<!-- speed:end -->\n")
    docs.write_text(text + "\n## After\nkept\n")
    speed.write_section(docs, "## Speed\nsecond")
    text = docs.read_text()
    assert "first" not in text and "second" in text
    assert text.count("<!-- speed:start -->") == 1
    assert "other team" in text and text.endswith("## After\nkept\n")


def test_bf16_peaks_by_gpu_name():
    speed = _speed_module()
    assert speed.bf16_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert speed.bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert speed.bf16_peak("NVIDIA H200") == pytest.approx(989.4)
    assert speed.bf16_peak("Some Future GPU") is None


def _conv_flops(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """``(2 x multiply-adds, groups)`` of each convolution of ``model`` on ``x``, in the
    order they run."""
    convs: list[tuple[int, int]] = []

    def count(m, _inputs, out):
        convs.append((2 * out.numel() * m.weight[0].numel(), m.groups))

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    training = model.training
    model.eval()  # batch norm keeps its running statistics
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return convs


def test_training_measurement_runs_on_the_cpu(data):
    """The same code path as on a GPU (device="cpu"): both steps, FLOPs, the table rows."""
    speed = _speed_module()
    img, ann = data
    t = Trainer([img], [ann], TrainConfig(steps=100, val_every=100, **TINY))
    r = speed.measure_training(t, rounds=1, block=1, warmup=1)
    assert r["steps"] == {"cellfit": 1, "no_prefetch": 1, "bare": 1}
    assert all(r[k] > 0 for k in ("cellfit", "no_prefetch", "bare", "sample"))
    # the FLOPs of one step, counted by hand from the convolutions (the only layers
    # counted) on the step's batch: the forward pass F; the input gradients F again,
    # less the first convolution's (the image needs none); the weight gradients F
    # again, except that torch's FlopCounterMode, which the benchmark uses, counts
    # those of a grouped (depthwise) convolution as if it were dense, `groups` times
    # over (MobileNet's depthwise layers: the count is above the true 3 F)
    convs = _conv_flops(t.model, torch.zeros(t.batch_size, t.info.in_channels, 64, 64))
    forward = sum(f for f, _ in convs)
    assert convs[0][1] == 1 and forward > 1e8
    expected = forward + (forward - convs[0][0]) + sum(f * groups for f, groups in convs)
    assert r["flops"] == expected
    assert t.prefetch and not t.batches.pending
