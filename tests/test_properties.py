"""Properties where shapes meet arithmetic, checked on many generated cases (hypothesis):
targets, the patch sampler, tiling and blending, resizing to the cell scale and back,
label post-processing and slice linking.

Arrays are small and the networks tiny (a fixed output, a 1x1 convolution, two 3x3
convolutions), so the whole file runs in seconds. The ``ci`` profile
(tests/conftest.py) draws the same examples on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage as ndi
from torch import nn

from cellfit.link import link_stack
from cellfit.model import STRIDE, ModelInfo
from cellfit.normalize import normalize, resize_plane, scaled_shape
from cellfit.postprocess import instances_from_probs
from cellfit.predict import (
    PlanePredictor,
    TileRunner,
    blend_window,
    plane_geometry,
    predict_plane,
    tile_starts,
)
from cellfit.sampling import PatchSampler
from cellfit.stream import BlockLabeller, ResizeRows
from cellfit.synthetic import synthetic_cells
from cellfit.targets import (
    IGNORE,
    annotation_from_mask,
    class_counts,
    instance_targets,
    make_targets,
)

FAST = settings(max_examples=40, deadline=None)
TORCH = settings(max_examples=15, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny tensors gain nothing from more on a shared CI machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sides(lo: int = 1, hi: int = 12):
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi))


def label_images(max_side: int = 12, max_value: int = 5, dtype=np.uint16):
    return hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=max_side),
        elements=st.integers(0, max_value),
    )


# --------------------------------------------------------------------------- targets
def _neighbourhood(width: int) -> list[tuple[int, int]]:
    """Offsets within ``width`` pixels (the 8 neighbours for a width of 1)."""
    r = max(1, width)
    return [
        (dy, dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if dy * dy + dx * dx <= r * r or (r == 1 and max(abs(dy), abs(dx)) <= 1)
    ]


def _targets_by_hand(ann: np.ndarray, width: int) -> np.ndarray:
    """The convention, pixel by pixel: unannotated → ignored, background → 0; a cell
    pixel is ignored if its neighbourhood meets an unannotated pixel or leaves the image,
    boundary (2) if it meets another value, interior (1) otherwise."""
    h, w = ann.shape
    out = np.empty(ann.shape, np.uint8)
    offsets = _neighbourhood(width)
    for y in range(h):
        for x in range(w):
            v = int(ann[y, x])
            if v == 0:
                out[y, x] = IGNORE
            elif v == 1:
                out[y, x] = 0
            else:
                near = [
                    int(ann[y + dy, x + dx]) if 0 <= y + dy < h and 0 <= x + dx < w else 0
                    for dy, dx in offsets
                ]
                out[y, x] = IGNORE if 0 in near else (1 if all(n == v for n in near) else 2)
    return out


@FAST
@given(ann=label_images(), width=st.integers(1, 2))
def test_instance_targets_follow_the_convention_pixel_by_pixel(ann, width):
    t = instance_targets(ann, boundary_width=width)
    assert t.shape == ann.shape and t.dtype == np.uint8
    np.testing.assert_array_equal(t, _targets_by_hand(ann, width))


@FAST
@given(
    ann=label_images(),
    ids=st.permutations(range(2, 6)),
    offset=st.sampled_from([0, 70_000]),
    k=st.integers(0, 3),
    flip=st.booleans(),
)
def test_instance_targets_ignore_cell_id_values_and_turn_with_the_image(ann, ids, offset, k, flip):
    """Renaming the cells (any distinct ids >= 2) changes nothing; rotating or mirroring
    the annotation rotates or mirrors the targets."""
    lut = np.array([0, 1, *(i + offset for i in ids)], np.uint32)
    renamed = lut[ann]

    def turn(a):
        a = np.rot90(a, k)
        return a[:, ::-1] if flip else a

    np.testing.assert_array_equal(instance_targets(turn(renamed)), turn(instance_targets(ann)))


@FAST
@given(mask=label_images(max_value=253, dtype=np.int32))
def test_annotation_from_mask_annotates_every_pixel_and_round_trips(mask):
    ann = annotation_from_mask(mask)
    assert ann.shape == mask.shape and ann.dtype == np.uint32
    assert (ann >= 1).all()  # every pixel annotated: background 1, cells their id + 1
    np.testing.assert_array_equal(ann, mask.astype(np.uint32) + 1)
    # semantic targets undo the shift exactly (class k of the mask is class k)
    np.testing.assert_array_equal(make_targets(ann, "semantic"), mask.astype(np.uint8))
    # instance targets ignore only cell pixels the image edge cuts
    t = make_targets(ann, "instances")
    edge = np.ones(mask.shape, bool)
    edge[1:-1, 1:-1] = False
    assert not (t == IGNORE)[~edge].any()
    assert ((t == IGNORE) <= (mask > 0)).all()


@FAST
@given(
    stack=hnp.arrays(
        np.uint16,
        hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=7),
        elements=st.integers(0, 4),
    ),
    mode=st.sampled_from(["instances", "semantic"]),
)
def test_make_targets_of_a_stack_is_plane_by_plane(stack, mode):
    t = make_targets(stack, mode)
    assert t.shape == stack.shape and t.dtype == np.uint8
    flat, tflat = stack.reshape(-1, *stack.shape[-2:]), t.reshape(-1, *stack.shape[-2:])
    for a, ta in zip(flat, tflat):
        np.testing.assert_array_equal(ta, make_targets(a, mode))
    n = 3 if mode == "instances" else 4
    assert class_counts([t], n).sum() == (t != IGNORE).sum()


# -------------------------------------------------------------------------- sampling
def _targets(h: int, w: int, seed: int, annotated: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, (h, w)).astype(np.uint8)
    t[rng.random((h, w)) > annotated] = IGNORE
    t.flat[rng.integers(h * w)] = rng.integers(0, 3)  # at least one annotated pixel
    return t


@FAST
@given(
    shape=sides(1, 20),
    patch=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    annotated=st.floats(0.0, 1.0),
    fg_fraction=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_unaugmented_patches_are_exact_windows_of_the_padded_image(
    shape, patch, seed, annotated, fg_fraction
):
    """Any image size, smaller than the patch included: each patch is a window of the
    image padded with ignored pixels, lying over at least one annotated pixel."""
    h, w = shape
    img = np.arange(h * w, dtype=np.float32).reshape(1, h, w) + 1  # 0 is left for padding
    t = _targets(h, w, seed, annotated)
    s = PatchSampler(
        [img], [t], patch_size=patch, fg_fraction=fg_fraction, augment=False, seed=seed
    )
    x, y = s.sample(4)
    assert x.shape == (4, 1, patch, patch) and x.dtype == np.float32
    assert y.shape == (4, patch, patch) and y.dtype == np.uint8
    has_cells = bool(((t != IGNORE) & (t != 0)).any())
    for xb, yb in zip(x[:, 0], y):
        inside = xb > 0
        idx = xb[inside].astype(np.int64) - 1
        ys, xs = np.divmod(idx, w)
        ii, jj = np.nonzero(inside)
        # one offset for the whole window (unflipped, not stretched), inside the image
        assert len(set(ys - ii)) == 1 and len(set(xs - jj)) == 1
        np.testing.assert_array_equal(yb[inside], t[ys, xs])
        assert (yb[~inside] == IGNORE).all()  # outside the image: ignored
        assert (yb != IGNORE).any()  # never a patch without annotated pixels
        if fg_fraction == 1.0 and has_cells:
            assert ((yb != IGNORE) & (yb != 0)).any()  # centred on a cell pixel


def _symmetries(a: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and mirror images of a square array."""
    return [np.rot90(b, k) for b in (a, a[:, ::-1]) for k in range(4)]


@FAST
@given(
    shape=sides(1, 15),
    patch=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    annotated=st.floats(0.05, 1.0),
    intensity=st.sampled_from(["mild", "strong"]),
)
def test_augmented_patches_are_turned_windows_and_ignored_pixels_stay_ignored(
    shape, patch, seed, annotated, intensity
):
    """With flips, rotations and intensity jitter, each target patch is still exactly
    a rotated or mirrored window of the padded target (no pixel invented, moved apart or
    turned from ignored to annotated), and the image turned with it."""
    h, w = shape
    rng = np.random.default_rng(seed)
    # every annotated target pixel holds its own position (h * w <= 225 < IGNORE)
    t = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    t[rng.random((h, w)) > annotated] = IGNORE
    j = int(rng.integers(h * w))
    t.flat[j] = j  # at least one annotated pixel
    img = np.where(t != IGNORE, 10.0, 0.0).astype(np.float32)[None]
    s = PatchSampler([img], [t], patch_size=patch, augment=True, seed=seed, intensity=intensity)
    x, y = s.sample(4)
    padded = np.pad(t, patch, constant_values=IGNORE)
    for xb, yb in zip(x[:, 0], y):
        # the image moved with the target: bright exactly where annotated
        np.testing.assert_array_equal(xb > 1.2, yb != IGNORE)
        found = False
        for turned in _symmetries(yb):
            ii, jj = np.nonzero(turned != IGNORE)
            sy, sx = np.divmod(int(turned[ii[0], jj[0]]), w)
            y0, x0 = sy - ii[0] + patch, sx - jj[0] + patch
            window = padded[y0 : y0 + patch, x0 : x0 + patch]
            if window.shape == turned.shape and np.array_equal(window, turned):
                found = True
                break
        assert found


# ---------------------------------------------------------------- tiling and blending
class ConstantModel(nn.Module):
    """The same logits at every pixel, whatever the input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])


class PointModel(nn.Module):
    """A 1x1 convolution: tiled output must equal whole-image output wherever tiles fall."""

    def __init__(self, c: int = 1, k: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(c, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 4)
            self.conv.bias.copy_(torch.randn(k, generator=gen))

    def forward(self, x):
        return self.conv(x)


class LocalModel(nn.Module):
    """Two 3x3 convolutions: each output sees a 5x5 neighbourhood (tile edges matter)."""

    def __init__(self, c: int = 1, k: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.net = nn.Sequential(
            nn.Conv2d(c, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, k, 3, padding=1)
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.net(x)


def _info(c: int = 1, k: int = 3, scale: float = 1.0, norm: bool = True) -> ModelInfo:
    info = ModelInfo(encoder="none", in_channels=c, n_classes=k, scale=scale)
    if not norm:
        info.normalization = {"method": "none"}
    return info


def _random_image(c: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, (c, h, w)).astype(np.float32)


@FAST
@given(shape=sides(1, 300), tile=st.integers(1, 300), overlap=st.integers(0, 200))
def test_tiles_cover_the_padded_plane_and_the_crop_is_the_plane(shape, tile, overlap):
    h, w = shape
    g = plane_geometry(h, w, tile, overlap)
    assert g.th % STRIDE == 0 and g.tw % STRIDE == 0  # what the encoder needs
    assert g.th <= max(tile, STRIDE) + STRIDE and g.tw <= max(tile, STRIDE) + STRIDE
    assert (len(g.idx_y), len(g.idx_x)) == (g.H, g.W)
    assert g.m + h <= g.H and g.m + w <= g.W
    # the padded plane's rows and columns come from the plane, the crop is the plane itself
    for idx, n in ((g.idx_y, h), (g.idx_x, w)):
        assert idx.min() >= 0 and idx.max() < n
        np.testing.assert_array_equal(idx[g.m : g.m + n], np.arange(n))
    cover = np.zeros((g.H, g.W), np.int32)
    weight = np.zeros((g.H, g.W), np.float64)
    for y, x in g.coords:
        assert y >= 0 and y + g.th <= g.H and x >= 0 and x + g.tw <= g.W
        cover[y : y + g.th, x : x + g.tw] += 1
        weight[y : y + g.th, x : x + g.tw] += blend_window(g.th, g.tw, flat=g.on_border(y, x))
    assert (cover >= 1).all() and (weight >= 1e-3).all()
    # neighbouring tiles overlap by at least the overlap asked for (at most half a tile)
    for starts, t in ((g.ys, g.th), (g.xs, g.tw)):
        assert starts == sorted(set(starts)) and starts[0] == 0
        gaps = np.diff(starts)
        assert (gaps <= t - min(overlap, t // 2)).all()


@FAST
@given(size=st.integers(1, 500), tile=st.integers(1, 200), overlap=st.integers(0, 199))
def test_tile_starts_cover_every_position(size, tile, overlap):
    overlap = min(overlap, tile - 1)
    starts = tile_starts(size, tile, overlap)
    cover = np.zeros(size + tile, np.int32)
    for s in starts:
        cover[s : s + tile] += 1
    assert (cover[:size] >= 1).all()
    assert starts[-1] + tile >= size and (size <= tile or starts[-1] + tile == size)


@TORCH
@given(
    shape=sides(1, 90),
    tile=st.sampled_from([32, 48, 64, 96]),
    overlap=st.integers(0, 48),
    batch=st.integers(1, 5),
    k=st.integers(2, 4),
    scale=st.one_of(st.just(1.0), st.floats(0.3, 2.5)),
    seed=st.integers(0, 2**16),
)
def test_blending_a_constant_prediction_gives_the_constant(
    shape, tile, overlap, batch, k, scale, seed
):
    """Any image size, tile, overlap, batch and cell scale: every pixel is covered and the
    blend weights sum to one, so a network that says the same everywhere is heard the
    same everywhere, at the image's own size."""
    logits = np.random.default_rng(seed).normal(0, 2, k).tolist()
    model = ConstantModel(logits)
    img = _random_image(1, *shape, seed)
    out = predict_plane(
        model, _info(k=k, scale=scale), img, tile=tile, overlap=overlap, batch_size=batch
    )
    expected = torch.tensor(logits).softmax(0).numpy()
    assert out.shape == (k, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], out.shape), atol=2e-6)


@TORCH
@given(
    shape=sides(1, 90),
    tile=st.sampled_from([32, 64, 96]),
    overlap=st.integers(0, 48),
    batch=st.integers(1, 5),
    c=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_a_per_pixel_model_gives_the_same_tiled_or_whole(shape, tile, overlap, batch, c, seed):
    """Each output pixel lands where its input pixel was, wherever the tiles fall."""
    model = PointModel(c=c)
    info = _info(c=c)
    img = _random_image(c, *shape, seed)
    out = predict_plane(model, info, img, tile=tile, overlap=overlap, batch_size=batch)
    with torch.no_grad():
        ref = model(torch.from_numpy(normalize(img[None], info.normalization))).softmax(1)[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


@TORCH
@given(
    shapes=st.lists(sides(1, 70), min_size=1, max_size=4),
    tile=st.sampled_from([32, 64]),
    overlap=st.integers(0, 32),
    batches=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    seed=st.integers(0, 2**16),
)
def test_results_do_not_depend_on_the_batch_or_on_the_other_planes(
    shapes, tile, overlap, batches, seed
):
    """Tiles are batched across planes (of different sizes here): each plane's
    probabilities equal those of the plane predicted alone, whatever the batch size."""
    model = LocalModel().eval()
    info = _info(norm=False)
    planes = [_random_image(1, h, w, seed + i) / 100 for i, (h, w) in enumerate(shapes)]

    def run(batch, items):
        pred = PlanePredictor(
            model, info, TileRunner(model, "cpu", batch_size=batch), tile=tile, overlap=overlap
        )
        evs = [e for e in pred.predict(items, None) if e.probabilities is not None]
        assert [e.plane for e in evs] == [key for key, _ in items]  # in order, each once
        return [e.probabilities for e in evs]

    items = list(enumerate(planes))
    a, b = run(batches[0], items), run(batches[1], items)
    for i, plane in enumerate(planes):
        [alone] = run(1, [(i, plane)])
        assert a[i].shape == (3, *plane.shape[1:])
        np.testing.assert_allclose(a[i], alone, atol=1e-5)
        np.testing.assert_allclose(b[i], alone, atol=1e-5)


class _Rows:
    """A plane in memory read row band by row band (as :class:`cellfit.stream.NormRows`)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape = a, a.shape

    def rows(self, lo: int, hi: int) -> np.ndarray:
        assert 0 <= lo < hi <= self.shape[1]
        return self.a[:, lo:hi]


@TORCH
@given(
    shape=sides(1, 120),
    tile=st.sampled_from([32, 64]),
    overlap=st.integers(0, 32),
    seed=st.integers(0, 2**16),
)
def test_planes_streamed_by_rows_equal_planes_in_memory(shape, tile, overlap, seed):
    """The huge-plane path (tile row by tile row) gives every row once, in order, and the
    probabilities of the plane predicted in memory."""
    model = LocalModel().eval()
    info = _info(norm=False)
    plane = _random_image(1, *shape, seed) / 100
    pred = PlanePredictor(
        model, info, TileRunner(model, "cpu", batch_size=3), tile=tile, overlap=overlap
    )
    [whole] = [
        e.probabilities for e in pred.predict([(0, plane)], None) if e.probabilities is not None
    ]
    rows, end = [], 0
    for item in pred.predict_rows(_Rows(plane)):
        if isinstance(item, tuple):
            r0, r1, probs = item
            assert r0 == end and r1 > r0 and probs.shape == (3, r1 - r0, shape[1])
            rows.append(probs)
            end = r1
    assert end == shape[0]
    np.testing.assert_allclose(np.concatenate(rows, axis=1), whole, atol=1e-5)


# ------------------------------------------------------------------------- resizing
@FAST
@given(
    shape=sides(1, 60),
    scale=st.floats(0.05, 4.0),
    c=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_resizing_to_the_cell_scale_and_back_restores_the_shape(shape, scale, c, seed):
    x = _random_image(c, *shape, seed)
    small = scaled_shape(shape, scale)
    assert min(small) >= 1
    there = resize_plane(x, small)
    back = resize_plane(there, shape)
    assert there.shape == (c, *small) and back.shape == x.shape
    assert there.dtype == back.dtype == np.float32
    # interpolation and anti-aliasing average: never outside the input's range
    lo, hi = x.min() - 1e-3, x.max() + 1e-3
    assert there.min() >= lo and there.max() <= hi and back.min() >= lo and back.max() <= hi
    # labels (order 0) keep their dtype and values
    lab = np.random.default_rng(seed).integers(0, 7, (1, *shape)).astype(np.uint16)
    lab_there = resize_plane(lab, small, order=0)
    lab_back = resize_plane(lab_there, shape, order=0)
    assert lab_there.dtype == lab_back.dtype == np.uint16 and lab_back.shape == lab.shape
    assert set(np.unique(lab_back)) <= set(np.unique(lab))


@FAST
@given(
    src=sides(1, 50),
    dst=sides(1, 70),
    band=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_rows_resized_band_by_band_equal_the_plane_resized_whole(src, dst, band, seed):
    """Huge planes go to the cell scale and back band by band (:class:`ResizeRows`)."""
    x = _random_image(2, *src, seed) / 100
    r = ResizeRows(_Rows(x), dst)
    got = np.concatenate([r.rows(a, min(dst[0], a + band)) for a in range(0, dst[0], band)], 1)
    np.testing.assert_allclose(got, resize_plane(x, dst), atol=1e-5)


# ------------------------------------------------------------------- post-processing
def _random_probs(h: int, w: int, seed: int, sigma: float, gain: float) -> np.ndarray:
    """A smooth random background / interior / boundary map."""
    rng = np.random.default_rng(seed)
    logits = np.stack([ndi.gaussian_filter(rng.normal(size=(h, w)), sigma) for _ in range(3)])
    logits *= gain / max(1e-6, float(np.abs(logits).max()))
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@FAST
@given(
    shape=sides(1, 40),
    seed=st.integers(0, 2**16),
    sigma=st.floats(0.5, 3.0),
    gain=st.floats(1.0, 10.0),
    fg=st.floats(0.2, 0.8),
    seed_threshold=st.floats(0.2, 0.8),
    min_size=st.integers(1, 30),
    split_area=st.one_of(st.none(), st.floats(4.0, 200.0)),
)
def test_instance_ids_are_consecutive_and_objects_whole(
    shape, seed, sigma, gain, fg, seed_threshold, min_size, split_area
):
    probs = _random_probs(*shape, seed, sigma, gain)
    lab = instances_from_probs(probs, fg, seed_threshold, min_size, split_area)
    assert lab.shape == shape and lab.dtype == np.int32
    n = int(lab.max())
    np.testing.assert_array_equal(
        np.unique(lab), np.arange(n + 1) if (lab == 0).any() else np.arange(1, n + 1)
    )
    assert not (lab > 0)[(1.0 - probs[0]) <= fg].any()  # objects lie on cell area only
    edge = np.zeros(shape, bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        obj = lab[sl] == i
        assert ndi.label(obj)[1] == 1  # one piece (4-connected)
        smallest = max(1, min_size // 4) if (edge[sl] & obj).any() else min_size
        assert sizes[i] >= smallest


class OneHotBlur(nn.Module):
    """A fake cell predictor with context: logits are the 3x3 mean of a one-hot class
    map (background, interior, boundary), so tile edges see less than the whole image."""

    def __init__(self, gain: float = 12.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None] * gain / 9 * torch.ones(3, 3))

    def forward(self, x):
        return self.conv(x)


def _one_to_one(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> bool:
    """As many objects in ``a`` as in ``b``, each with one partner of IoU >= ``min_iou``
    in the other (more than half of both): none split in two, none merged."""
    if a.max() != b.max():
        return False
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    sa, sb = np.bincount(a.ravel()), np.bincount(b.ravel())
    iou = inter / (sa[pairs[0]] + sb[pairs[1]] - inter)
    good = pairs[:, iou >= min_iou]
    return len(set(good[0])) == len(set(good[1])) == a.max() == good.shape[1]


@TORCH
@given(
    shape=sides(40, 110),
    n_cells=st.integers(3, 16),
    tile=st.sampled_from([32, 64]),
    overlap=st.integers(16, 32),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_no_cell_is_split_at_a_tile_seam(shape, n_cells, tile, overlap, batch, seed):
    """Predicted in small tiles or in one piece, the same cells come out: none split
    where tiles meet, none merged."""
    _, cells = synthetic_cells(shape, n_cells=n_cells, radius=(5.0, 9.0), seed=seed)
    ring = (ndi.maximum_filter(cells, size=5) != ndi.minimum_filter(cells, size=5)) & (cells > 0)
    cls = np.where(cells == 0, 0, np.where(ring, 2, 1))
    onehot = np.stack([cls == k for k in range(3)]).astype(np.float32)
    model, info = OneHotBlur().eval(), _info(c=3, norm=False)
    whole = predict_plane(model, info, onehot, tile=512)
    tiled = predict_plane(model, info, onehot, tile=tile, overlap=overlap, batch_size=batch)
    a, b = instances_from_probs(whole), instances_from_probs(tiled)
    assert a.max() >= 1
    assert _one_to_one(a, b)


def _cell_probs(shape, n_cells: int, seed: int) -> np.ndarray:
    """Clean background / interior / boundary maps of synthetic touching cells."""
    _, lab = synthetic_cells(shape, n_cells=n_cells, radius=(4.0, 7.0), seed=seed)
    rim = (ndi.maximum_filter(lab, size=3) != ndi.minimum_filter(lab, size=3)) & (lab > 0)
    p_in = ndi.gaussian_filter(((lab > 0) & ~rim).astype(np.float32), 1.0)
    p_b = ndi.gaussian_filter(rim.astype(np.float32), 1.0)
    probs = np.stack([np.clip(1 - p_in - p_b, 0, 1), p_in, p_b])
    return probs / probs.sum(0, keepdims=True)


@FAST
@given(
    shape=sides(30, 120),
    n_cells=st.integers(2, 30),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_block_labels_of_a_huge_plane_equal_whole_plane_labels(shape, n_cells, extra, seed):
    """Huge planes are labelled in blocks whose halo spans two objects (as the huge-plane
    path sizes it): no object on a block seam is cut or merged with another. (A halo of
    only one object is not enough: objects cut by the edge of a block's view then meet
    in the seam band.)"""
    probs = _cell_probs(shape, n_cells, seed)
    whole = instances_from_probs(probs)
    extent = max(
        (max(a.stop - a.start, b.stop - b.start) for a, b in ndi.find_objects(whole)), default=1
    )
    halo = 2 * extent
    bl = BlockLabeller(shape, halo + extra, halo, instances_from_probs)
    raw = np.zeros(shape, np.uint32)
    for i in range(bl.n_rows):
        lo, hi, r0, r1 = bl.band(i)
        raw[r0:r1] = bl.feed(i, probs[:, lo:hi])
    lut, n = bl.lut()
    got = lut[raw].astype(np.int64)
    assert n == whole.max() and np.array_equal(got > 0, whole > 0)
    assert _one_to_one(whole, got, min_iou=1.0)


# ----------------------------------------------------------------------- linking
@FAST
@given(
    coarse=hnp.arrays(
        np.int64,
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
        elements=st.integers(0, 4),
    ),
    offset=st.sampled_from([0, 1000]),
    min_overlap=st.floats(0.1, 0.9),
)
def test_linking_never_reuses_an_id(coarse, offset, min_overlap):
    """Per-slice labels of a T x Z stack linked along Z: objects keep their extent, two
    objects of one slice never share an id, an id never comes back after a gap or in
    another time point, linked objects overlap, and ids run 1..N over the file."""
    labels = np.kron(coarse, np.ones((1, 1, 3, 3), np.int64))
    labels = np.where(labels > 0, labels + offset, 0)
    out = link_stack(labels, min_overlap=min_overlap)
    assert out.shape == labels.shape and out.dtype == np.uint32
    np.testing.assert_array_equal(out > 0, labels > 0)
    used = np.unique(out[out > 0])
    np.testing.assert_array_equal(used, np.arange(1, len(used) + 1))
    seen_before: set[int] = set()
    for t in range(labels.shape[0]):
        here: set[int] = set()
        gone: set[int] = set()
        prev = None
        for z in range(labels.shape[1]):
            a, b = labels[t, z], out[t, z]
            pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
            assert len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]  # one to one
            ids = set(pairs[1].tolist())
            assert not ids & seen_before and not ids & gone  # never an id back
            if prev is not None:
                for i in ids & set(np.unique(prev).tolist()):
                    inter = ((prev == i) & (b == i)).sum()
                    assert inter >= min_overlap * min((prev == i).sum(), (b == i).sum())
                gone |= set(np.unique(prev[prev > 0]).tolist()) - ids
            here |= ids
            prev = b
        seen_before |= here
