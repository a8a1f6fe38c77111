"""Losses: hand-computed values, the ignore mask (zero gradient), all-background batches,
class weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellfit.errors import CellfitError
from cellfit.losses import LOSS_NAMES, balanced_class_weights, build_loss
from cellfit.targets import IGNORE

LN2 = math.log(2.0)


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, three pixels in a row.

    pixel a: logits (0, 0)     → p = (1/2, 1/2), target 0
    pixel b: logits (ln 3, 0)  → p = (3/4, 1/4), target 1
    pixel c: logits (10, -10), target IGNORE: must change nothing
    """
    logits = torch.tensor([[[[0.0, math.log(3.0), 10.0]], [[0.0, 0.0, -10.0]]]])
    target = torch.tensor([[[0, 1, IGNORE]]])
    return logits, target


# Soft scores per class over the two annotated pixels, smooth s = 1, in smp's Tversky
# form (I + s) / (I + a FP + b FN + s); dice is a = b = 1/2, i.e. (2I + 2s) / (sum p + sum t + 2s):
#   class 0: p = (1/2, 3/4), t = (1, 0) → I = 1/2, sum p 5/4, sum t 1
#   class 1: p = (1/2, 1/4), t = (0, 1) → I = 1/4, sum p 3/4, sum t 1
_DICE = 1 - ((2 * 0.5 + 2) / (1.25 + 1 + 2) + (2 * 0.25 + 2) / (0.75 + 1 + 2)) / 2
_JACCARD = 1 - ((0.5 + 1) / (1.25 + 1 - 0.5 + 1) + (0.25 + 1) / (0.75 + 1 - 0.25 + 1)) / 2
# Tversky alpha = 0.3 on FP, beta = 0.7 on FN; FP = sum p - I, FN = sum t - I
_TVERSKY = (
    1
    - (
        (0.5 + 1) / (0.5 + 0.3 * 0.75 + 0.7 * 0.5 + 1)
        + (0.25 + 1) / (0.25 + 0.3 * 0.5 + 0.7 * 0.75 + 1)
    )
    / 2
)
# cross-entropy: -ln(1/2) and -ln(1/4); focal: times (1 - p_t)^2 = 1/4 and 9/16
_CE = (LN2 + 2 * LN2) / 2
_FOCAL = (0.25 * LN2 + 0.5625 * 2 * LN2) / 2
# with class weights (1, 3): pixel a has weight 1, pixel b weight 3
_CE_W = (1 * LN2 + 3 * 2 * LN2) / 4
_FOCAL_W = (1 * 0.25 * LN2 + 3 * 0.5625 * 2 * LN2) / 4


@pytest.mark.parametrize(
    ("name", "weights", "expected"),
    [
        ("ce", None, _CE),
        ("focal", None, _FOCAL),
        ("dice", None, _DICE),
        ("jaccard", None, _JACCARD),
        ("tversky", None, _TVERSKY),
        ("focal+dice", None, _FOCAL + _DICE),
        ("ce+jaccard", None, _CE + _JACCARD),
        ("focal+tversky", None, _FOCAL + _TVERSKY),
        (" Focal + DICE ", None, _FOCAL + _DICE),
        ("ce", [1.0, 3.0], _CE_W),
        ("focal", [1.0, 3.0], _FOCAL_W),
        # overlap losses are not weighted per class
        ("dice", [1.0, 3.0], _DICE),
        ("focal+dice", [1.0, 3.0], _FOCAL_W + _DICE),
    ],
)
def test_loss_values_on_a_hand_made_case(name, weights, expected):
    logits, target = hand_case()
    value = build_loss(name, weights)(logits, target)
    assert value.ndim == 0
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_each_loss_name_builds_its_own_loss():
    """Every loss cellfit offers, built by its name, gives on the hand case its own hand
    value and none of the others' (a name built as another loss, or two losses that
    the hand case cannot tell apart, fail here)."""
    logits, target = hand_case()
    hand = {"ce": _CE, "focal": _FOCAL, "dice": _DICE, "jaccard": _JACCARD, "tversky": _TVERSKY}
    got = {name: float(build_loss(name)(logits, target)) for name in LOSS_NAMES}
    assert sorted(got) == sorted(hand)
    for name, value in got.items():
        assert [n for n, v in hand.items() if math.isclose(v, value, rel_tol=1e-5)] == [name]


@pytest.mark.parametrize("name", [*LOSS_NAMES, "focal+dice", "ce+tversky"])
def test_ignored_pixels_do_not_change_the_loss(name):
    logits, target = hand_case()
    loss = build_loss(name)
    ref = float(loss(logits, target))
    logits2 = logits.clone()
    logits2[0, :, 0, 2] = torch.tensor([-30.0, 30.0])  # wildly different at the ignored pixel
    assert float(loss(logits2, target)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 4.0]])
@pytest.mark.parametrize("name", [*LOSS_NAMES, "focal+dice", "focal+jaccard", "ce+tversky"])
def test_ignored_pixels_get_exactly_zero_gradient(name, weights):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=gen).requires_grad_(True)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    ignored = torch.rand(2, 8, 8, generator=gen) < 0.4
    target[ignored] = IGNORE
    loss = build_loss(name, weights)(logits, target)
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    at_ignored = grad.permute(0, 2, 3, 1)[ignored]
    assert at_ignored.shape[0] == int(ignored.sum()) > 0
    assert (at_ignored == 0).all(), "ignored pixels must receive exactly zero gradient"
    at_valid = grad.permute(0, 2, 3, 1)[~ignored]
    assert (at_valid.abs().sum(dim=1) > 0).all(), "every annotated pixel must get a gradient"


@pytest.mark.parametrize("name", [*LOSS_NAMES, "focal+dice"])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    loss = build_loss(name, [1.0, 2.0, 3.0])(logits, target)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


# ----------------------------------------------------------- all-background batch
def _background_batch(correct: bool, scale: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.full((4, 3, 16, 16), -scale)
    logits[:, 0 if correct else 1] = scale
    target = torch.zeros(4, 16, 16, dtype=torch.long)
    target[:, :3] = IGNORE
    return logits, target


@pytest.mark.parametrize("name", [*LOSS_NAMES, "focal+dice", "focal+jaccard"])
def test_all_background_batch_is_finite_and_small_when_right(name):
    counts = [1000, 10, 5]  # a heavily imbalanced annotation: weights up to ~70, clipped
    loss = build_loss(name, balanced_class_weights(counts))
    right = loss(*_background_batch(True))
    wrong = loss(*_background_batch(False))
    assert torch.isfinite(right) and torch.isfinite(wrong)
    assert float(right) < 1e-3
    assert float(wrong) > 0.5
    # no explosion even for extremely confident wrong logits
    worst = loss(*_background_batch(False, scale=1e4))
    assert torch.isfinite(worst) and float(worst) < 1e5


def test_dice_leaves_classes_absent_from_the_batch_out_of_the_mean():
    # four background pixels, uniform probabilities over three classes:
    # background dice = (2*4/3 + 2) / (4/3 + 4 + 2) = 7/11; absent classes are left out
    # (with them, the mean would include two more terms of 1 - 1/(4/3 + 1) = 4/7)
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    assert float(build_loss("dice")(logits, target)) == pytest.approx(4 / 11, rel=1e-6)
    # jaccard: (4/3 + 1) / (4/3 + 4 - 4/3 + 1) = 7/15
    assert float(build_loss("jaccard")(logits, target)) == pytest.approx(8 / 15, rel=1e-6)


def test_dice_pools_classes_over_the_whole_batch():
    # class 1 is present in patch 0 only; patch 1 holds only background. The loss is
    # the same as for one image holding both patches side by side.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, generator=gen)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    side = torch.cat([logits[0], logits[1]], dim=2)[None]
    side_t = torch.cat([target[0], target[1]], dim=1)[None]
    loss = build_loss("dice")
    assert float(loss(logits, target)) == pytest.approx(float(loss(side, side_t)), rel=1e-6)


def test_focal_is_below_cross_entropy():
    logits, target = hand_case()
    ce = float(build_loss("ce")(logits, target))
    focal = float(build_loss("focal")(logits, target))
    assert focal < ce


# ----------------------------------------------------------------- class weights
@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([90, 10], [100 / 180, 100 / 20]),
        ([30, 30, 30], [1.0, 1.0, 1.0]),
        ([600, 300, 100], [1000 / 1800, 1000 / 900, 1000 / 300]),
        # a class with no pixels gets the largest weight of the others
        ([100, 0, 50], [150 / 300, 150 / 150, 150 / 150]),
        ([100, 0, 0], [1 / 3, 1 / 3, 1 / 3]),
        # clipped to max_weight (50) and 1/max_weight
        ([1, 9999], [50.0, 10000 / 19998]),
        ([0, 0], [1.0, 1.0]),
    ],
)
def test_balanced_class_weights(counts, expected):
    w = balanced_class_weights(counts)
    assert isinstance(w, list) and all(isinstance(v, float) for v in w)
    assert w == pytest.approx(expected, rel=1e-9)


def test_balanced_class_weights_clip_both_ways():
    assert balanced_class_weights([1, 99], max_weight=10.0) == pytest.approx([10.0, 100 / 198])
    # n / (K count) >= 1/K, so the lower clip shows only with max_weight < K
    assert balanced_class_weights([100000, 1, 1], max_weight=2.0) == pytest.approx([0.5, 2, 2])


def test_balanced_weighted_ce_is_the_mean_of_per_class_means():
    """With n / (K * count) weights every class counts equally, whatever its size."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 10, 10, generator=gen)
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :2] = 1  # 20 pixels of class 1
    target[0, 9, :3] = 2  # 3 pixels of class 2, 77 of background
    counts = np.bincount(target.ravel().numpy(), minlength=3)
    w = balanced_class_weights(counts)
    value = float(build_loss("ce", w)(logits, target))
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0]
    per_class = [float(per_pixel[target[0] == c].mean()) for c in range(3)]
    assert value == pytest.approx(np.mean(per_class), rel=1e-5)


@pytest.mark.parametrize("name", ["bce", "", "focal+lovasz", "+"])
def test_unknown_loss_is_a_clear_error(name):
    with pytest.raises(CellfitError, match=r"unknown loss .*ce, focal, dice, jaccard, tversky"):
        build_loss(name)
