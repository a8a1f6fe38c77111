"""Streaming: lazy reading is lazy, streamed prediction equals whole-plane prediction,
huge planes tile row by tile row, block labels consistent across seams."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
from torch import nn

import cellfit.io as cio
import cellfit.normalize as cnorm
from cellfit.file_prediction import LoadedModel, Settings, run_file
from cellfit.io import ImageStack, InMemoryImage, LazyImage, open_image, read_image
from cellfit.model import ModelInfo
from cellfit.normalize import resize_plane
from cellfit.postprocess import instances_from_probs
from cellfit.predict import PlanePredictor, TileRunner, iter_predict, prepare_planes
from cellfit.stream import BlockLabeller, ResizeRows, stack_stats
from cellfit.synthetic import synthetic_cells


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a shared CI machine several threads spin against each other
    (a tiny network's tile takes seconds instead of milliseconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------ helpers
class BlobModel(nn.Module):
    """Per-pixel logits from the intensity and a 5x5 mean: bright regions are cell
    interior, their rims boundary. Deterministic, fast, and it segments synthetic cells."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = self.pool(x)
        bg = 8.0 * (0.3 - m)
        interior = 8.0 * (x - 0.45)
        rim = 4.0 * (m - x).abs() * 6 - 1.0
        return torch.cat([bg, interior, rim], dim=1) + self.dummy


def blob_engine(settings: Settings | None = None, scale: float = 1.0) -> LoadedModel:
    """A :class:`LoadedModel` around :class:`BlobModel` (no model file needed)."""
    settings = settings or Settings()
    eng = LoadedModel.__new__(LoadedModel)
    eng.model = BlobModel().eval()
    eng.info = ModelInfo(encoder="none", scale=scale, postprocess={"min_size": 8})
    eng.device = torch.device("cpu")
    eng.runner = TileRunner(eng.model, "cpu", batch_size=settings.batch_size or 4)
    eng.predictor = PlanePredictor(
        eng.model, eng.info, eng.runner, tile=settings.tile, overlap=settings.overlap
    )
    eng.postprocess = {**eng.info.postprocess, **settings.postprocess}
    return eng


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two label images split the pixels into the same objects."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def drain(gen):
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return stop.value, items


# ------------------------------------------------------------------ lazy reading
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_lazy_reading_is_lazy(tmp_path, compression, monkeypatch):
    """A stack of 16 MB is read and its statistics computed within a 3 MB bound.

    (The statistics sample at most ``MAX_SAMPLES`` pixels, 4 million by default, a
    fixed cost whatever the stack's size; lowered here so the bound shows the reading.)
    """
    monkeypatch.setattr(cnorm, "MAX_SAMPLES", 100_000)
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 4000, (64, 256, 512), dtype=np.uint16)  # 16 MB
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack, compression=compression, photometric="minisblack")
    info = ModelInfo(encoder="none")
    bound = 3 * 2**20
    tracemalloc.start()
    try:
        img = LazyImage(path)
        total = 0
        for p in range(img.n_planes):
            total += int(img.plane(p)[0, ::97, ::89].sum())
        band = img.rows(63, 100, 140)
        stats = stack_stats(img, info)
        _, peak = tracemalloc.get_traced_memory()
        img.close()
    finally:
        tracemalloc.stop()
    assert peak < bound < stack.nbytes / 5, f"peak {peak / 2**20:.1f} MB"
    assert total == int(stack[:, ::97, ::89].sum())
    np.testing.assert_array_equal(band[0], stack[63, 100:140])
    ref = prepare_planes(ImageStack(stack[:, None], (64,), "QYX"), info)[1]
    np.testing.assert_allclose(stats, ref)


def test_streamed_prediction_of_a_stack_stays_within_a_memory_bound(tmp_path, monkeypatch):
    """Predicting and writing an 8 MB stack (24 MB of probabilities, written too) holds
    a few planes at a time: peak memory under 6 MB (it stays flat from 16 to 128 planes)."""
    monkeypatch.setattr(cio, "LAZY_BYTES", 2**20)
    monkeypatch.setattr(cnorm, "MAX_SAMPLES", 100_000)
    cells = synthetic_cells((128, 256), n_cells=12, seed=1)[0].astype(np.float32)
    stack = np.stack([np.roll(cells, 3 * i, axis=1) for i in range(64)])  # 8 MB
    path = tmp_path / "in" / "s.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, stack, photometric="minisblack")
    eng = blob_engine(Settings(tile=256))
    out = tmp_path / "out"
    settings = Settings(probabilities=True, tile=256, compression="none")
    tracemalloc.start()
    try:
        outputs, items = drain(
            run_file(eng, path, out / "s_labels.tif", out / "s_prob.tif", settings)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20 < stack.nbytes, f"peak {peak / 2**20:.1f} MB"
    assert [(i.plane, i.n_planes) for i in items if not i.tiles_total][-1] == (64, 64)
    labels = tifffile.imread(outputs[0])
    assert labels.shape == (64, 128, 256) and labels[5].max() > 5
    with tifffile.TiffFile(outputs[1]) as tif:
        assert tif.series[0].shape == (64, 3, 128, 256)
        np.testing.assert_allclose(tif.series[0].asarray()[50].sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["rgb", "cyx", "tzyx"])
def test_lazy_image_planes_equal_read_image(tmp_path, kind):
    rng = np.random.default_rng(2)
    path = tmp_path / "x.tif"
    if kind == "rgb":
        tifffile.imwrite(path, rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), photometric="rgb")
    elif kind == "cyx":
        tifffile.imwrite(path, rng.random((2, 40, 50), dtype=np.float32), imagej=True,
                         metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, rng.integers(0, 999, (2, 3, 40, 50), dtype=np.uint16),
                         imagej=True, metadata={"axes": "TZYX"}, compression="zlib")
    ref = read_image(path)
    lazy = open_image(path, lazy=True)
    assert isinstance(lazy, LazyImage)
    assert (lazy.n_planes, lazy.n_channels, lazy.plane_shape, lazy.lead_shape) == (
        ref.n_planes, ref.n_channels, ref.plane_shape, ref.lead_shape,
    )
    for p in range(ref.n_planes):
        np.testing.assert_array_equal(lazy.plane(p), ref.data[p])
        np.testing.assert_array_equal(lazy.rows(p, 7, 19), ref.data[p, :, 7:19])
    lazy.close()
    assert isinstance(open_image(path), InMemoryImage)  # small files: read whole


# --------------------------------------------------- streamed == whole-plane
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_streamed_planes_and_rows_equal_iter_predict(scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
    info = ModelInfo(encoder="none", scale=scale)
    planes = np.stack([synthetic_cells((150, 230), n_cells=9, seed=s)[0] for s in range(3)])
    stack = ImageStack(planes[:, None], (3,), "ZYX")
    raw, stats = prepare_planes(stack, info)
    ref = [
        ev.probabilities
        for ev in iter_predict(model, info, raw, stats, tile=96, overlap=32, batch_size=3)
        if ev.probabilities is not None
    ]
    runner = TileRunner(model, "cpu", batch_size=5)  # batches span planes
    pred = PlanePredictor(model, info, runner, tile=96, overlap=32)
    img = InMemoryImage(stack)
    got = [r.probabilities for r in pred.predict(((p, img.plane(p)) for p in range(3)), stats)
           if r.probabilities is not None]
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_resize_rows_equals_resize_plane():
    x = np.random.default_rng(0).random((2, 301, 177)).astype(np.float32)

    class Source:
        shape = x.shape

        def rows(self, a, b):
            return x[:, a:b]

    for shape in [(120, 80), (500, 300), (301, 90)]:
        r = ResizeRows(Source(), shape)
        got = np.concatenate([r.rows(a, min(shape[0], a + 37)) for a in range(0, shape[0], 37)], 1)
        np.testing.assert_allclose(got, resize_plane(x, shape), atol=1e-6)


# ---------------------------------------------------------------- huge planes
def _cell_probs(shape, n_cells, seed):
    """Clean probability maps (background, interior, boundary) of synthetic cells."""
    _, lab = synthetic_cells(shape, n_cells=n_cells, seed=seed)
    rim = find_boundaries(lab, mode="inner")
    p_in = ndi.gaussian_filter(((lab > 0) & ~rim).astype(np.float32), 1.0)
    p_b = ndi.gaussian_filter(rim.astype(np.float32), 1.0)
    probs = np.stack([np.clip(1 - p_in - p_b, 0, 1), p_in, p_b])
    return probs / probs.sum(0, keepdims=True), lab


def test_block_labels_equal_whole_plane_labels_with_cells_on_seams():
    """Blocks of 64 px on a 300 x 410 plane of ~60 touching cells: many lie on seams
    (checked), and the blocked labels split the pixels exactly like the whole plane."""
    probs, lab = _cell_probs((300, 410), 60, 2)
    block = 64
    on_seam = {
        i for i in np.unique(lab[:, block::block]) if i
    } | {i for i in np.unique(lab[block::block, :]) if i}
    assert len(on_seam) >= 20
    whole = instances_from_probs(probs)
    bl = BlockLabeller(probs.shape[1:], block, 24, instances_from_probs)
    raw = np.zeros(probs.shape[1:], np.uint32)
    for i in range(bl.n_rows):
        lo, hi, r0, r1 = bl.band(i)
        raw[r0:r1] = bl.feed(i, probs[:, lo:hi])
    lut, n = bl.lut()
    got = lut[raw]
    assert n == whole.max() == got.max()
    assert same_partition(whole, got)
    # without merging across seams, cells on seams would be cut in two
    assert len(np.unique(raw)) - 1 > n


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_huge_plane_path_equals_the_ordinary_path(tmp_path, scale):
    """A plane predicted as a huge plane (tile rows, blocks of 128 px with seams through
    cells) gives the ordinary path's probabilities and the same objects."""
    image, _ = synthetic_cells((330, 420), n_cells=70, seed=5)
    path = tmp_path / "in" / "h.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, image)
    outs = {}
    for name, huge in (("ordinary", 10**9), ("huge", 1000)):
        settings = Settings(probabilities=True, tile=96, overlap=32, huge_pixels=huge, block=128)
        eng = blob_engine(settings, scale=scale)
        out = tmp_path / name
        outputs, items = drain(
            run_file(eng, path, out / "h_labels.tif", out / "h_prob.tif", settings)
        )
        outs[name] = [tifffile.imread(p) for p in outputs]
        if name == "huge":
            tiles = [i for i in items if i.tiles_total]
            assert tiles and tiles[-1].tiles_done == tiles[-1].tiles_total  # progress over tiles
            with tifffile.TiffFile(outputs[0]) as tif:
                assert tif.pages[0].is_tiled
    (lab_o, prob_o), (lab_h, prob_h) = outs["ordinary"], outs["huge"]
    np.testing.assert_allclose(prob_h, prob_o, atol=1e-5)
    assert lab_o.max() > 30
    assert same_partition(lab_o.astype(np.int64), lab_h.astype(np.int64))
