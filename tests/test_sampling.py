"""Patch sampler guarantees and the held-back validation split."""

from __future__ import annotations

import numpy as np
import pytest

from cellfit.sampling import BatchPrefetcher, PatchSampler, split_annotations
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.targets import IGNORE, instance_targets


def _position_image(h: int, w: int) -> np.ndarray:
    """One channel whose value at (y, x) is y * w + x + 1 (0 is left for padding)."""
    return np.arange(h * w, dtype=np.float32).reshape(1, h, w) + 1


def _random_targets(h: int, w: int, seed: int, annotated: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, (h, w)).astype(np.uint8)
    t[rng.random((h, w)) > annotated] = IGNORE
    return t


def test_every_patch_holds_annotated_pixels():
    # a single annotated pixel in a large unannotated image
    t = np.full((200, 150), IGNORE, np.uint8)
    t[120, 33] = 0
    img = np.random.default_rng(0).random((1, 200, 150)).astype(np.float32)
    s = PatchSampler([img], [t], patch_size=32, seed=1)
    x, y = s.sample(64)
    assert x.shape == (64, 1, 32, 32) and x.dtype == np.float32
    assert y.shape == (64, 32, 32) and y.dtype == np.uint8
    assert ((y != IGNORE).sum(axis=(1, 2)) == 1).all()


def test_every_patch_holds_annotated_pixels_with_sparse_real_like_annotation(cells_image):
    image, labels = cells_image
    ann = sparse_annotation(labels, fraction=0.2, ring=2, strokes=1, seed=4)
    t = instance_targets(ann)
    img = image[None].astype(np.float32) / image.max()
    s = PatchSampler([img, img], [t, np.full_like(t, IGNORE)], patch_size=32, seed=0)
    _, y = s.sample(200)
    assert ((y != IGNORE).sum(axis=(1, 2)) > 0).all()


def test_unannotated_everything_is_refused():
    t = np.full((16, 16), IGNORE, np.uint8)
    with pytest.raises(ValueError, match="no annotated pixels"):
        PatchSampler([np.zeros((1, 16, 16), np.float32)], [t])


def _share_of_patches_with_cells(fg_fraction: float, seed: int) -> float:
    # 200x200 background with one 6x6 cell: cells are 0.09 % of the annotated pixels
    t = np.zeros((200, 200), np.uint8)
    t[20:26, 170:176] = 1
    img = np.zeros((1, 200, 200), np.float32)
    s = PatchSampler([img], [t], patch_size=24, fg_fraction=fg_fraction, augment=False, seed=seed)
    _, y = s.sample(400)
    return float(((y == 1).sum(axis=(1, 2)) > 0).mean())


def test_fg_fraction_over_represents_cells():
    without = _share_of_patches_with_cells(0.0, seed=0)
    half = _share_of_patches_with_cells(0.5, seed=0)
    most = _share_of_patches_with_cells(0.9, seed=0)
    # uniform over annotated pixels: a 24-px patch meets the cell with p ~ 29*29/40000 ~ 2 %
    assert without < 0.08
    # with fg_fraction f, at least a share f of patches is centred on the cell
    assert 0.4 < half < 0.65
    assert most > 0.82


def _two_class_scene():
    """Class 1 painted on a 40 x 40 block, class 2 on a single 2 x 2 speck, background
    on a strip: drawing among cell pixels would almost never centre on class 2."""
    t = np.full((120, 120), IGNORE, np.uint8)
    t[:10, :] = 0
    t[20:60, 20:60] = 1
    t[100:102, 100:102] = 2
    img = np.zeros((1, 120, 120), np.float32)
    return img, t


def _centred_classes(sampler, n=400):
    out = []
    for _ in range(n):
        plane, y, x = sampler._centre()
        out.append(int(sampler.targets[plane][y, x]))
    return np.bincount(out, minlength=3)


def test_class_balanced_sampling_centres_each_painted_class_as_often():
    img, t = _two_class_scene()
    plain = _centred_classes(PatchSampler([img], [t], patch_size=16, fg_fraction=1.0, seed=0))
    balanced = _centred_classes(
        PatchSampler([img], [t], patch_size=16, fg_fraction=1.0, seed=0, class_balanced=True)
    )
    assert plain[2] < 10  # 4 of 1604 cell pixels: the speck is almost never the centre
    assert abs(balanced[1] - balanced[2]) < 80 and balanced[2] > 150
    assert balanced[0] == 0  # fg_fraction 1: never a background centre


def test_class_frequencies_count_what_patches_hold_without_changing_the_draws():
    img, t = _two_class_scene()
    a = PatchSampler([img], [t], patch_size=16, seed=3, class_balanced=True)
    b = PatchSampler([img], [t], patch_size=16, seed=3, class_balanced=True)
    freq = a.class_frequencies(3, n_patches=64)
    assert freq.shape == (3,) and freq[2] > 0 and freq[1] > freq[2]
    xa, ya = a.sample(8)
    xb, yb = b.sample(8)
    assert np.array_equal(ya, yb)  # estimating the frequencies drew nothing from training's stream


def test_fg_fraction_measured_on_pixels():
    """Cell pixels make up a far larger share of sampled pixels than of the image."""
    image, labels = synthetic_cells((128, 128), n_cells=3, radius=(4, 5), seed=2)
    ann = np.where(labels > 0, labels + 1, 1)
    t = instance_targets(ann)
    img = image[None].astype(np.float32)
    cell_share_image = float((t[t != IGNORE] != 0).mean())
    s = PatchSampler([img], [t], patch_size=32, fg_fraction=0.5, seed=0)
    _, y = s.sample(300)
    ann_px = y[y != IGNORE]
    cell_share_patches = float((ann_px != 0).mean())
    assert cell_share_image < 0.05
    assert cell_share_patches > 2.5 * cell_share_image


def test_crop_without_augmentation_is_an_exact_window():
    h, w = 50, 70
    img = _position_image(h, w)
    t = _random_targets(h, w, seed=0)
    s = PatchSampler([img], [t], patch_size=32, augment=False, seed=3)
    x, y = s.sample(40)
    for xb, yb in zip(x[:, 0], y):
        inside = xb > 0
        assert inside.any()
        idx = xb[inside].astype(np.int64) - 1
        ys, xs = idx // w, idx % w
        # the window is a contiguous, unflipped crop: position grows by 1 along x, w along y
        ii, jj = np.nonzero(inside)
        assert np.all(ys - ii == ys[0] - ii[0]) and np.all(xs - jj == xs[0] - jj[0])
        np.testing.assert_array_equal(yb[inside], t[ys, xs])
        assert (yb[~inside] == IGNORE).all()  # padding outside the image is ignored


@pytest.mark.parametrize("n_channels", [1, 3])
def test_augmentation_keeps_image_and_target_aligned(n_channels):
    h, w = 60, 45
    t = _random_targets(h, w, seed=1, annotated=0.7)
    # channel k is 1 where the target is class k (k = 0, 1, 2 for 3 channels), else 0
    img = np.stack([(t == k).astype(np.float32) for k in range(n_channels)])
    s = PatchSampler([img], [t], patch_size=32, augment=True, seed=7)
    x, y = s.sample(80)
    for xb, yb in zip(x, y):
        for k in range(n_channels):
            # jitter keeps 1s above 0.5 and 0s below it (gain 0.75-1.25, offset +-0.1,
            # noise sigma <= 0.05)
            on = xb[k] > 0.5
            np.testing.assert_array_equal(on, yb == k)


def test_augmentation_rotates_and_flips():
    h, w = 40, 40
    img = _position_image(h, w)
    t = np.zeros((h, w), np.uint8)
    s = PatchSampler([img], [t], patch_size=16, augment=True, seed=0)
    x, _ = s.sample(60)
    orientations = set()
    for xb in x[:, 0]:
        dy = np.sign(np.median(np.diff(xb, axis=0)))  # +1: rows go down the image
        dx = np.sign(np.median(np.diff(xb, axis=1)))
        big_step_axis = (
            0 if abs(np.median(np.diff(xb, axis=0))) > abs(np.median(np.diff(xb, axis=1))) else 1
        )
        orientations.add((dy, dx, big_step_axis))
    assert len(orientations) >= 4


def test_patches_at_image_borders_are_padded_and_ignored():
    t = np.full((100, 100), IGNORE, np.uint8)
    t[0, 0] = 1
    t[99, 99] = 0
    img = _position_image(100, 100)
    s = PatchSampler([img], [t], patch_size=32, augment=False, seed=0)
    x, y = s.sample(30)
    for xb, yb in zip(x[:, 0], y):
        pad = xb == 0
        assert pad.any()  # a window around a corner always reaches outside
        assert (yb[pad] == IGNORE).all()
        assert (yb != IGNORE).sum() == 1


def test_images_smaller_than_the_patch():
    t = np.zeros((20, 13), np.uint8)
    t[5:9, 4:8] = 1
    img = _position_image(20, 13)
    s = PatchSampler([img], [t], patch_size=64, augment=True, seed=0)
    x, y = s.sample(10)
    assert x.shape == (10, 1, 64, 64) and y.shape == (10, 64, 64)
    for yb in y:
        n = (yb != IGNORE).sum()
        assert 0 < n <= 20 * 13
        assert (yb == 1).sum() <= 16


# ---------------------------------------------------------- validation split
def _annotations():
    _, lab1 = synthetic_cells((96, 96), n_cells=10, seed=5)
    _, lab2 = synthetic_cells((64, 80), n_cells=6, seed=6)
    return [
        sparse_annotation(lab1, fraction=0.8, seed=1),
        sparse_annotation(lab2, fraction=1.0, seed=2),
    ]


def test_split_holds_back_whole_cells_and_loses_nothing():
    anns = _annotations()
    n_cells = sum(len(np.setdiff1d(np.unique(a), [0, 1])) for a in anns)
    assert n_cells >= 10
    split = split_annotations(anns, val_fraction=0.3, seed=0)
    assert not split.on_training
    assert split.n_val_cells == round(0.3 * n_cells)
    val_cells = 0
    for ann, tr, va in zip(anns, split.train, split.val):
        assert tr.shape == ann.shape and va.shape == ann.shape
        # every annotated pixel is in exactly one part, with its value
        assert not ((tr != 0) & (va != 0)).any()
        np.testing.assert_array_equal(np.where(tr != 0, tr, va), ann)
        # cells are held back whole, never split between the parts
        for cid in np.setdiff1d(np.unique(ann), [0, 1]):
            in_val = va[ann == cid] == cid
            assert in_val.all() or not in_val.any()
            val_cells += int(in_val.all())
    assert val_cells == split.n_val_cells
    # the inputs are not modified
    np.testing.assert_array_equal(anns[0], _annotations()[0])


def test_split_background_follows_the_nearest_cell():
    ann = np.ones((20, 60), np.uint16)
    for k, x0 in enumerate(range(2, 60, 12)):
        ann[8:12, x0 : x0 + 4] = k + 2  # five cells in a row, 12 px apart
    split = split_annotations([ann], val_fraction=0.2, seed=0)
    assert split.n_val_cells == 1
    va = split.val[0]
    held = int(np.setdiff1d(np.unique(va), [0, 1])[0])
    cols = np.nonzero((ann == held).any(axis=0))[0]
    # background pixels right next to the held-back cell are validation pixels too
    assert va[10, cols[0] - 1] == 1 and va[10, cols[-1] + 1] == 1
    assert split.train[0][10, cols[0] - 1] == 0


def test_too_few_cells_validates_on_the_training_annotation():
    ann = np.ones((30, 30), np.uint16)
    ann[5:10, 5:10] = 2
    ann[15:20, 15:20] = 3
    split = split_annotations([ann], seed=0)
    assert split.on_training and split.n_val_cells == 0
    np.testing.assert_array_equal(split.train[0], ann)
    np.testing.assert_array_equal(split.val[0], ann)
    assert split.train[0] is not ann  # copies


def test_split_is_reproducible_with_a_seed():
    anns = _annotations()
    a = split_annotations(anns, seed=3)
    b = split_annotations(anns, seed=3)
    for x, y in zip(a.val, b.val):
        np.testing.assert_array_equal(x, y)


def _row_of_cells(n: int, width: int = 200) -> np.ndarray:
    ann = np.ones((40, width), np.uint16)
    for k in range(n):
        x0 = 2 + 10 * k
        ann[10:16, x0 : x0 + 6] = k + 2
    return ann


def test_cells_held_back_stay_held_back_when_more_are_painted():
    """A correction round paints more cells; the cells that checked the last round's
    model are still held back, so the next check is on cells no round trained on."""
    before = _row_of_cells(10)
    after = _row_of_cells(10)
    for k in range(10, 19):  # nine more cells painted
        x0 = 2 + 10 * k
        after[10:16, x0 : x0 + 6] = k + 2
    first = split_annotations([before], val_fraction=0.2, seed=5)
    second = split_annotations([after], val_fraction=0.2, seed=5)
    held_first = set(np.unique(first.val[0][first.val[0] >= 2]).tolist())
    held_second = set(np.unique(second.val[0][second.val[0] >= 2]).tolist())
    assert len(held_first) == 2 and len(held_second) == 4
    assert held_first <= held_second
    # and another seed holds back other cells
    other = split_annotations([after], val_fraction=0.2, seed=6)
    assert set(np.unique(other.val[0][other.val[0] >= 2]).tolist()) != held_second


def test_split_without_a_seed_is_the_seed_0_split():
    anns = [_row_of_cells(10)]
    a = split_annotations(anns, seed=None)
    b = split_annotations(anns, seed=0)
    np.testing.assert_array_equal(a.val[0], b.val[0])


# ------------------------------------------------------------------ prefetching
def _sampler(seed: int = 0) -> PatchSampler:
    rng = np.random.default_rng(seed)
    img = rng.random((1, 40, 40)).astype(np.float32)
    return PatchSampler([img], [_random_targets(40, 40, seed=seed)], patch_size=16, seed=seed)


def test_prefetched_batches_come_in_the_order_drawn():
    ahead = BatchPrefetcher(_sampler())
    plain = BatchPrefetcher(_sampler(), enabled=False)
    for _ in range(3):
        (xa, ya), (xp, yp) = ahead.next(2), plain.next(2)
        np.testing.assert_array_equal(xa, xp)
        np.testing.assert_array_equal(ya, yp)
    assert ahead.pending and not plain.pending
    ahead.discard()
    assert not ahead.pending


def test_a_batch_drawn_ahead_is_cut_to_a_smaller_size_and_converted():
    seen = []

    def convert(x, y):
        seen.append(len(x))
        return x * 0 + 1, y

    batches = BatchPrefetcher(_sampler(), convert=convert)
    x, _ = batches.next(4)
    assert x.shape[0] == 4 and (x == 1).all()
    x, y = batches.next(2)  # the batch drawn ahead had 4 patches
    assert x.shape[0] == 2 and y.shape[0] == 2 and seen[:2] == [4, 4]
    batches.discard()


def test_an_error_while_drawing_ahead_is_raised_when_the_batch_is_wanted():
    sampler = _sampler()
    calls = []
    sample = sampler.sample

    def fail_second(n):
        calls.append(n)
        if len(calls) == 2:
            raise ValueError("broken sampler")
        return sample(n)

    sampler.sample = fail_second
    batches = BatchPrefetcher(sampler)
    batches.next(2)
    with pytest.raises(ValueError, match="broken sampler"):
        batches.next(2)


def _cells_and_strays(n_cells: int = 7, n_strays: int = 24, seed: int = 0) -> np.ndarray:
    """``n_cells`` painted 14 x 14 cells and one- or two-pixel stray pieces of their ids
    (a slip of the brush, or the rim of a predicted cell copied around painted pixels)."""
    rng = np.random.default_rng(seed)
    ann = np.ones((120, 200), np.uint16)
    for k in range(n_cells):
        y, x = 20 + (k % 2) * 50, 15 + k * 25
        ann[y : y + 14, x : x + 14] = k + 2
    placed = 0
    while placed < n_strays:
        y, x = int(rng.integers(1, 118)), int(rng.integers(1, 197))
        if (ann[y - 1 : y + 2, x - 1 : x + 3] >= 2).any():
            continue
        ann[y, x : x + 1 + placed % 2] = 2 + placed % n_cells
        placed += 1
    return ann


def test_stray_pieces_of_a_painted_cell_are_not_cells():
    """Seven painted cells with stray one- or two-pixel pieces of their ids: seven cells
    count, one (20 %) is held back, and no stray piece is held back or scored (they were
    counted as cells: "6 held-back cells" of 7 painted, most of them specks that no
    segmentation keeps, so AP50 0.25 beside a pixel F1 of 0.99)."""
    ann = _cells_and_strays()
    body = np.zeros_like(ann, bool)
    for k in range(7):
        y, x = 20 + (k % 2) * 50, 15 + k * 25
        body[y : y + 14, x : x + 14] = True
    stray = (ann >= 2) & ~body
    assert stray.sum() >= 24
    split = split_annotations([ann], val_fraction=0.2, seed=0)
    assert split.n_val_cells == 1 and not split.on_training
    va, tr = split.val[0], split.train[0]
    assert not (va[stray] != 0).any()  # never held back, never a cell to score
    np.testing.assert_array_equal(tr[stray], ann[stray])  # they stay in training
    np.testing.assert_array_equal(np.where(tr != 0, tr, va), ann)  # nothing lost
    held = np.setdiff1d(np.unique(va), [0, 1])
    assert len(held) == 1 and (va == held[0]).sum() == 14 * 14  # a whole cell's body
    # every piece an object (as in semantic mode): the specks count again
    assert split_annotations([ann], val_fraction=0.2, seed=0, stray_fraction=0).n_val_cells == 6


def test_too_few_cells_validate_on_the_training_annotation_without_its_strays():
    ann = _cells_and_strays(n_cells=4, n_strays=10)
    split = split_annotations([ann], seed=0)
    assert split.on_training and split.n_val_cells == 0
    np.testing.assert_array_equal(split.train[0], ann)
    kept = split.val[0][split.val[0] >= 2]
    assert len(np.unique(kept)) == 4 and kept.size == 4 * 14 * 14
