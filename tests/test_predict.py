"""Tiled prediction: tiles blended back equal whole-image prediction, any image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellfit.devices import resolve_device
from cellfit.errors import CellfitError
from cellfit.model import ModelInfo, build_model
from cellfit.normalize import normalize, percentiles
from cellfit.predict import (
    blend_window,
    iter_predict,
    predict_plane,
    predict_stack,
    tile_starts,
)


class PointModel(nn.Module):
    """A per-pixel model (1x1 convolution): its tiled output must equal the whole-image
    output exactly, wherever the tiles fall."""

    def __init__(self, c: int = 1, k: int = 3, seed: int = 0, gain: float = 4.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(c, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * gain)
            self.conv.bias.copy_(torch.randn(k, generator=gen))

    def forward(self, x):
        return self.conv(x)


class LocalModel(nn.Module):
    """Two 3x3 convolutions: each output sees a 5x5 neighbourhood."""

    def __init__(self, c: int = 1, k: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(c, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, k, 3, padding=1)
        )
        with torch.no_grad():
            self.net[2].weight.mul_(4)

    def forward(self, x):
        return self.net(x)


def _info(c: int = 1, k: int = 3) -> ModelInfo:
    return ModelInfo(encoder="none", in_channels=c, n_classes=k)


def _reference(model: nn.Module, plane: np.ndarray, info: ModelInfo, stats=None) -> np.ndarray:
    """Softmax of the model on the whole normalised plane, no tiling, no padding."""
    x = normalize(plane[None], info.normalization, stats)
    with torch.no_grad():
        return model(torch.from_numpy(x)).softmax(1)[0].numpy()


def _image(h: int, w: int, c: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = np.sin(yy / 5.0) + np.cos(xx / 7.0)
    return np.stack(
        [(base * (i + 1) + rng.normal(0, 0.3, (h, w))) * 500 + 1000 for i in range(c)]
    ).astype(np.uint16)


# ---------------------------------------------------------------- exact tiling
@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((77, 101), 32, 8),
        ((77, 101), 64, 16),
        ((77, 101), 64, 0),
        ((130, 64), 32, 16),
        ((45, 33), 32, 31),
        ((100, 100), 40, 10),  # tile rounded up to 64
    ],
)
def test_tiled_equals_whole_image_for_a_per_pixel_model(shape, tile, overlap):
    info = _info()
    model = PointModel()
    img = _image(*shape)
    tiled = predict_plane(model, info, img, tile=tile, overlap=overlap, batch_size=3)
    whole = predict_plane(model, info, img, tile=512)
    ref = _reference(model, img, info)
    assert tiled.shape == (3, *shape) and tiled.dtype == np.float32
    np.testing.assert_allclose(whole, ref, atol=1e-5)
    np.testing.assert_allclose(tiled, ref, atol=1e-5)
    assert ref.std() > 0.1  # the reference is far from uniform: misplaced tiles would show


@pytest.mark.parametrize("shape", [(20, 27), (5, 200), (1, 1), (3, 40), (33, 31)])
def test_images_smaller_than_a_tile(shape):
    info = _info(c=2, k=4)
    model = PointModel(c=2, k=4)
    img = _image(*shape, c=2)
    out = predict_plane(model, info, img, tile=64, overlap=16)
    assert out.shape == (4, *shape)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    if min(shape) > 1:
        np.testing.assert_allclose(out, _reference(model, img, info), atol=1e-5)


def _local_whole_and_tiled():
    info = _info()
    model = LocalModel()
    img = _image(150, 130)
    whole = predict_plane(model, info, img, tile=512)
    tiled = predict_plane(model, info, img, tile=64, overlap=32)
    assert whole.std() > 0.05
    return np.abs(tiled - whole).max(axis=0)


def test_blending_hides_tile_edges_of_a_model_with_context():
    diff = _local_whole_and_tiled()
    # inside the image, each tile edge disturbs a 2-px strip that the Gaussian window
    # down-weights ~1000-fold against the neighbouring tile's centre
    inner = diff[12:-12, 12:-12]
    assert inner.max() < 0.01
    assert inner.mean() < 1e-4


def test_no_seam_near_the_image_border():
    diff = _local_whole_and_tiled()
    # the image border: tiles touching it keep full weight there, and a mirrored margin
    # gives border pixels the same context whatever the tiling
    assert diff.max() < 0.01


def test_unet_tiled_prediction_matches_whole_image():
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    model = build_model(info).eval()
    img = _image(101, 77)  # not divisible by 32
    whole = predict_plane(model, info, img, tile=512)
    tiled = predict_plane(model, info, img, tile=64, overlap=32)
    assert whole.shape == tiled.shape == (3, 101, 77)
    np.testing.assert_allclose(whole.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)
    assert np.abs(tiled - whole).mean() < 0.01
    small = predict_plane(model, info, _image(20, 27), tile=512)
    assert small.shape == (3, 20, 27) and np.isfinite(small).all()


# -------------------------------------------------------------- stacks, events
def test_predict_stack_normalises_all_planes_alike():
    info = _info()
    model = PointModel(gain=20.0)
    stack = np.stack([_image(40, 50, seed=s)[0] for s in range(3)])
    stack[1] = stack[1] // 2  # a dimmer slice stays dimmer
    out = predict_stack(model, info, stack)
    assert out.shape == (3, 3, 40, 50)
    planes = stack[:, None]
    stats = percentiles(planes, 1.0, 99.8)
    for p in range(3):
        np.testing.assert_allclose(out[p], _reference(model, planes[p], info, stats), atol=1e-5)
    # per-slice statistics would have given something else for the dim slice
    assert np.abs(out[1] - _reference(model, planes[1], info)).max() > 0.03


def test_predict_stack_rgb_into_a_grayscale_model():
    info = _info()
    model = PointModel()
    rgb = np.moveaxis(_image(40, 48, c=3), 0, -1)  # (Y, X, 3)
    out = predict_stack(model, info, rgb)
    assert out.shape == (1, 3, 40, 48)
    gray = rgb.mean(axis=-1, dtype=np.float32)[None]
    np.testing.assert_allclose(out[0], _reference(model, gray, info), atol=1e-4)


def test_iter_predict_events():
    info = _info()
    model = PointModel()
    planes = np.stack([_image(70, 70), _image(70, 70, seed=1)])  # (2, 1, 70, 70)
    events = list(iter_predict(model, info, planes, tile=32, overlap=8, batch_size=2))
    # 70 px + a mirrored margin of 8 on each side = 86 px; 32-px tiles at stride 24:
    # starts 0, 24, 48, 54 → 16 tiles a plane, 8 batches of 2
    assert [e.plane for e in events] == [0] * 8 + [1] * 8
    assert all(e.tiles_total == 16 for e in events)
    with_probs = [e for e in events if e.probabilities is not None]
    assert [e.plane for e in with_probs] == [0, 1]
    assert all(e.tiles_done == 16 for e in with_probs)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_normalisation_none_uses_raw_values():
    info = _info()
    info.normalization = {"method": "none"}
    model = PointModel()
    img = np.random.default_rng(0).normal(size=(1, 30, 30)).astype(np.float32)
    out = predict_plane(model, info, img, tile=32)
    with torch.no_grad():
        ref = model(torch.from_numpy(img[None])).softmax(1)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------ helpers
@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(100, 32, 8), (64, 64, 16), (65, 64, 0), (500, 96, 48), (10, 32, 8)],
)
def test_tile_starts_cover_the_image_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if size > tile:
        assert starts[-1] == size - tile
        gaps = np.diff(starts)
        assert (gaps <= tile - overlap).all() and (gaps > 0).all()
    else:
        assert starts == [0]
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_blend_window():
    w = blend_window(64, 32)
    assert w.shape == (64, 32) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() >= 1e-3
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert w[32, 16] > w[0, 16] and w[32, 16] > w[32, 0]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    # "auto" is the machine's own best device (the order of preference with every
    # combination of devices: tests/test_speed.py)
    if torch.cuda.is_available():
        have = "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        have = "mps"
    else:
        have = "cpu"
    assert resolve_device("auto") == torch.device(have)
    assert resolve_device(None) == torch.device(have)
    with pytest.raises(CellfitError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CellfitError, match="no CUDA GPU"):
            resolve_device("cuda")


class OutOfMemoryModel(nn.Module):
    """Runs out of device memory on any batch larger than ``fits`` tiles."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return torch.zeros((x.shape[0], 3, *x.shape[2:])) + self.w


def test_the_tile_batch_is_halved_on_out_of_memory_and_a_single_tile_names_the_setting():
    from cellfit.console import FLAGS
    from cellfit.predict import TileRunner

    runner = TileRunner(OutOfMemoryModel(fits=1), "cpu", batch_size=4)
    out = runner(torch.zeros((3, 1, 32, 32)))
    assert out.shape == (3, 3, 32, 32) and runner.batch_size == 1
    assert "retrying with 2" in runner.pop_notice()
    runner = TileRunner(OutOfMemoryModel(fits=0), "cpu", batch_size=2)
    with pytest.raises(CellfitError) as err:
        runner(torch.zeros((2, 1, 32, 32)))
    assert err.value.setting == "tile"
    assert "single tile of 32x32 pixels: make --tile smaller (e.g. 256)" in err.value.worded(FLAGS)


# ------------------------------------------------------- test-time augmentation
class SlantModel(nn.Module):
    """Neither flip- nor rotation-equivariant: fixed asymmetric 3x3 kernels (a slanted
    gradient and an off-centre pair of taps), a tanh and a fixed 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.head = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            slant = torch.arange(9.0).reshape(3, 3) - 4.0
            taps = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -3.0]])
            self.conv.weight.copy_(torch.stack([slant, taps])[:, None])
            head = torch.tensor([[2.0, 1.0], [-2.0, 3.0], [0.5, -1.5]])
            self.head.weight.copy_(head[..., None, None])
            self.head.bias.copy_(torch.tensor([0.0, 0.2, -0.1]))

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)))


def _flips(a: np.ndarray) -> list[np.ndarray]:
    """The 4 flips of ``a`` (..., Y, X); each is its own inverse."""
    return [a, a[..., ::-1, :], a[..., ::-1], a[..., ::-1, ::-1]]


def _dihedral(a: np.ndarray, k: int, mirror: bool) -> np.ndarray:
    if mirror:
        a = np.swapaxes(a, -2, -1)
    return np.rot90(a, k, axes=(-2, -1))


def _undo_dihedral(a: np.ndarray, k: int, mirror: bool) -> np.ndarray:
    a = np.rot90(a, -k, axes=(-2, -1))
    return np.swapaxes(a, -2, -1) if mirror else a


@pytest.mark.parametrize("square", [False, True])
def test_tta_transforms_are_the_flips_or_the_symmetries_of_the_square_and_invert_exactly(square):
    from cellfit.predict import tta_transforms

    x = torch.randn(2, 3, 32, 32 if square else 64, generator=torch.Generator().manual_seed(0))
    ts = tta_transforms(square)
    assert len(ts) == (8 if square else 4)
    assert torch.equal(ts[0].apply(x), x)  # the identity first
    outs = [t.apply(x) for t in ts]
    for t, y in zip(ts, outs):
        back = t.invert(y)
        assert back.shape == x.shape and torch.equal(back, x), t
    # the expected transforms, each once
    xn = x.numpy()
    if square:
        expected = [_dihedral(xn, k, m) for m in (False, True) for k in range(4)]
    else:
        expected = _flips(xn)
    got = [y.numpy() for y in outs]
    for e in expected:
        assert sum(np.array_equal(g, e) for g in got) == 1
    # they move pixels: each maps an output back to where the input pixel was
    for t in ts:
        marked = torch.zeros(1, 1, 32, 32 if square else 64)
        marked[..., 3, 5] = 1
        assert t.invert(t.apply(marked))[0, 0, 3, 5] == 1


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "square"),
    [
        ((64, 16), 64, 16, False),  # 2 tiles of 64 x 32: the 4 flips
        ((64, 64), 64, 32, True),  # 2 x 2 square tiles: the 8 symmetries of the square
    ],
)
def test_tta_is_the_mean_of_the_predictions_of_transformed_images_mapped_back(
    shape, tile, overlap, square
):
    """Tile grids symmetric under the transforms (no stride padding, tiles from both
    ends): augmenting each tile equals augmenting the whole image."""
    info = _info()
    model = SlantModel()
    img = _image(*shape).astype(np.float32)

    def plain(a):
        return predict_plane(model, info, np.ascontiguousarray(a), tile=tile, overlap=overlap)

    base = plain(img)
    if square:
        pairs = [(k, m) for m in (False, True) for k in range(4)]
        each = [_undo_dihedral(plain(_dihedral(img, k, m)), k, m) for k, m in pairs]
    else:
        each = [_flips(plain(f))[i] for i, f in enumerate(_flips(img))]
    # the model is not equivariant: each transformed prediction mapped back differs
    assert all(np.abs(e - base).max() > 0.05 for e in each[1:])
    expected = np.mean(each, axis=0)
    tta = predict_plane(model, info, img, tile=tile, overlap=overlap, tta=True)
    assert tta.shape == (3, *shape)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    assert np.abs(tta - base).max() > 0.02


def test_tta_of_a_per_pixel_model_changes_nothing():
    """A 1x1 convolution is equivariant to every flip and rotation: mapped back to
    their places, the augmented outputs equal the plain one."""
    info = _info()
    model = PointModel()
    img = _image(77, 101)
    plain = predict_plane(model, info, img, tile=64, overlap=16)
    for tile in (64, 512):  # square tiles, then one 128 x 96 tile
        out = predict_plane(model, info, img, tile=tile, overlap=16, tta=True)
        np.testing.assert_allclose(out, plain, atol=1e-5)


def test_without_tta_the_runner_is_a_plain_forward():
    from cellfit.predict import TileRunner

    model = SlantModel().eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 1, 32, 64)).astype(np.float32))
    with torch.inference_mode():
        ref = model(x).softmax(1)
    assert torch.equal(TileRunner(model, "cpu", batch_size=5)(x), ref)
    assert torch.equal(TileRunner(model, "cpu", batch_size=5, tta=False)(x), ref)
    info, img = _info(), _image(70, 50)
    default = predict_plane(model, info, img, tile=32, overlap=8)
    assert np.array_equal(default, predict_plane(model, info, img, tile=32, overlap=8, tta=False))
    np.testing.assert_allclose(
        predict_plane(PointModel(), info, img, tile=32), _reference(PointModel(), img, info),
        atol=1e-5,
    )


class OutOfMemoryAbove(nn.Module):
    """``net``, but out of memory on batches of more than ``fits`` tiles."""

    def __init__(self, net: nn.Module, fits: int) -> None:
        super().__init__()
        self.net, self.fits = net, fits

    def forward(self, x):
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return self.net(x)


def test_tta_batches_are_halved_on_out_of_memory_too():
    from cellfit.predict import TileRunner

    net = SlantModel().eval()
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 1, 32, 32)).astype(np.float32))
    ref = TileRunner(net, "cpu", batch_size=1, tta=True)(x)
    runner = TileRunner(OutOfMemoryAbove(net, fits=2), "cpu", batch_size=8, tta=True)
    out = runner(x)
    assert runner.batch_size == 2 and "retrying with 2" in runner.pop_notice()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(out, TileRunner(net, "cpu", batch_size=8)(x), atol=1e-3)


def test_tta_with_a_runner_made_without_it_is_refused():
    from cellfit.predict import PlanePredictor, TileRunner

    model = PointModel()
    runner = TileRunner(model, "cpu")
    with pytest.raises(ValueError, match="tta"):
        next(iter_predict(model, _info(), _image(40, 40)[None], runner=runner, tta=True))
    with pytest.raises(ValueError, match="tta"):
        PlanePredictor(model, _info(), runner, tta=True)
    assert PlanePredictor(model, _info(), tta=True).runner.tta
    assert PlanePredictor(model, _info(), TileRunner(model, tta=True)).runner.tta


def test_huge_planes_streamed_by_rows_are_augmented_alike():
    from cellfit.predict import PlanePredictor

    class Rows:  # a normalised plane read row band by row band
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def rows(self, lo, hi):
            return self.a[:, lo:hi]

    info = _info()
    info.normalization = {"method": "none"}
    model = SlantModel()
    plane = np.random.default_rng(2).normal(size=(1, 150, 90)).astype(np.float32)

    def by_rows(tta):
        pred = PlanePredictor(model, info, tile=64, overlap=32, tta=tta)
        out = np.zeros((3, 150, 90), np.float32)
        for item in pred.predict_rows(Rows(plane)):
            if isinstance(item, tuple):
                r0, r1, probs = item
                out[:, r0:r1] = probs
        return out

    whole = PlanePredictor(model, info, tile=64, overlap=32, tta=True)
    [ev] = [e for e in whole.predict([(0, plane)], None) if e.probabilities is not None]
    np.testing.assert_allclose(by_rows(True), ev.probabilities, atol=1e-5)
    assert np.abs(by_rows(False) - ev.probabilities).max() > 0.02
