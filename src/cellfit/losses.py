"""Losses for sparse, imbalanced annotation, built on ``segmentation_models_pytorch.losses``.

Every loss takes logits ``(B, K, H, W)`` and a target ``(B, H, W)`` of class indices in
which ``ignore_index`` (255) marks unannotated pixels. Ignored pixels contribute nothing,
and so receive exactly zero gradient.

* ``ce`` / ``focal``: pixel-wise, softmax cross-entropy with optional focusing
  (gamma = 2), weighted per class and averaged over the annotated pixels by weight.
  (smp's ``FocalLoss`` is one-vs-rest sigmoid without class weights, so the softmax
  form is written here from ``torch.nn.functional.cross_entropy``.)
* ``dice`` / ``jaccard`` / ``tversky``: smp's soft scores (``soft_dice_score`` etc.)
  computed per class over the whole batch (from three per-class sums, without a
  one-hot tensor). A class absent from the batch's annotated
  pixels is left out of the mean, so a batch of background-only patches neither
  explodes nor dominates. They are already insensitive to class frequency, so class
  weights act on the pixel-wise terms.
* ``a+b``: the sum, e.g. ``focal+dice`` (the default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellfit.errors import CellfitError
from cellfit.targets import IGNORE

__all__ = [
    "DEFAULT_LOSS",
    "LOSS_NAMES",
    "CombinedLoss",
    "FocalCELoss",
    "OverlapLoss",
    "balanced_class_weights",
    "build_loss",
    "grouped_class_weights",
]

DEFAULT_LOSS = "focal+dice"
PIXEL_LOSSES = ("ce", "focal")
OVERLAP_LOSSES = ("dice", "jaccard", "tversky")
LOSS_NAMES = PIXEL_LOSSES + OVERLAP_LOSSES


def balanced_class_weights(counts: Sequence[int] | np.ndarray, max_weight: float = 50.0) -> list[float]:
    """``n_pixels / (n_classes * count)`` per class; classes with no pixels get the largest weight.

    Weights are clipped to ``max_weight`` so a class with a handful of pixels cannot
    swamp the loss.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k = len(counts)
    total = counts.sum()
    w = np.ones(k)
    present = counts > 0
    if present.any():
        w[present] = total / (k * counts[present])
        w[~present] = w[present].max()
    return [float(v) for v in np.clip(w, 1.0 / max_weight, max_weight)]


def grouped_class_weights(counts: Sequence[int] | np.ndarray, max_weight: float = 50.0) -> list[float]:
    """Semantic mode's "balanced" weights: background weighs as much as all the other
    classes together, and those classes are balanced among themselves:
    ``n / (2 count_0)`` for background, ``n / (2 K count_k)`` for each of the K other
    classes with pixels (classes with no pixels get the largest of those).

    With one class this is :func:`balanced_class_weights`. With many, weighing each
    class against background alone (``n / ((K + 1) count)``) makes a rare class
    hundreds of times heavier than background, and the network calls much of the
    background some rare class (``benchmarks/manyclass.py``: 15 % of it with 31
    classes). Clipped to ``max_weight`` like :func:`balanced_class_weights`.

    >>> grouped_class_weights([600, 100, 200])
    [0.75, 2.25, 1.125]
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    w = np.ones(len(counts))
    if total <= 0 or len(counts) < 2:
        return [float(v) for v in w]
    if counts[0] > 0:
        w[0] = total / (2 * counts[0])
    rest = counts[1:]
    present = rest > 0
    if present.any():
        w[1:][present] = total / (2 * present.sum() * rest[present])
        w[1:][~present] = w[1:][present].max()
    return [float(v) for v in np.clip(w, 1.0 / max_weight, max_weight)]


class FocalCELoss(nn.Module):
    """Softmax focal loss (``gamma=0``: cross-entropy) with class weights and an ignore index.

    Parameters
    ----------
    gamma : float
        Focusing parameter; 0 gives plain (weighted) cross-entropy.
    class_weights : sequence of float, optional
        One weight per class.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", w, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.long()
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        ce = F.cross_entropy(logits, safe, reduction="none")
        if self.gamma > 0:
            pt = torch.exp(-ce)
            ce = (1.0 - pt).pow(self.gamma) * ce
        w = valid.to(logits.dtype)
        if self.class_weights is not None:
            w = w * self.class_weights.to(logits.device)[safe]
        denom = w.sum()
        if denom <= 0:
            return logits.sum() * 0.0
        return (ce * w).sum() / denom


class OverlapLoss(nn.Module):
    """Soft dice / Jaccard / Tversky over softmax probabilities, per class over the batch.

    Classes absent from the batch's annotated pixels are left out of the mean.

    Parameters
    ----------
    kind : {"dice", "jaccard", "tversky"}
    alpha, beta : float
        Tversky weights of false positives and false negatives.
    """

    def __init__(
        self,
        kind: str = "dice",
        ignore_index: int = IGNORE,
        smooth: float = 1.0,
        alpha: float = 0.3,
        beta: float = 0.7,
    ) -> None:
        super().__init__()
        if kind not in OVERLAP_LOSSES:
            raise ValueError(kind)
        self.kind = kind
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.alpha = alpha
        self.beta = beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Per class k over the batch's annotated pixels: the intersection sum(p_k where
        # target == k), sum(p_k) and the pixel count of k; smp's soft scores of the
        # masked probabilities and one-hot target reduce to these three sums, which
        # are taken here without building the one-hot tensor (fewer, cheaper ops).
        logits = logits.float()
        b, k = logits.shape[:2]
        t = target.long().view(b, 1, -1)
        probs = logits.softmax(dim=1).view(b, k, -1)
        is_k = t == torch.arange(k, device=logits.device).view(1, k, 1)  # ignore matches none
        inter = torch.where(is_k, probs, 0.0).sum(dim=(0, 2))
        psum = torch.where(t != self.ignore_index, probs, 0.0).sum(dim=(0, 2))
        tsum = is_k.sum(dim=(0, 2)).to(probs.dtype)
        present = tsum > 0
        if not bool(present.any()):
            return logits.sum() * 0.0
        # smp's soft_tversky_score; dice is alpha = beta = 0.5, jaccard alpha = beta = 1
        alpha, beta = {"dice": (0.5, 0.5), "jaccard": (1.0, 1.0)}.get(
            self.kind, (self.alpha, self.beta)
        )
        fp, fn = psum - inter, tsum - inter
        score = (inter + self.smooth) / (
            inter + alpha * fp + beta * fn + self.smooth
        ).clamp_min(1e-7)
        return (1.0 - score)[present].mean()


class CombinedLoss(nn.Module):
    """Sum of named losses; ``components`` maps each name to its module."""

    def __init__(self, components: dict[str, nn.Module]) -> None:
        super().__init__()
        self.components = nn.ModuleDict(components)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for module in self.components.values():
            value = module(logits, target)
            total = value if total is None else total + value
        assert total is not None
        return total


def build_loss(
    name: str = DEFAULT_LOSS,
    class_weights: Sequence[float] | None = None,
    ignore_index: int = IGNORE,
) -> CombinedLoss:
    """Build a loss by name: one of ``ce, focal, dice, jaccard, tversky`` or a sum ``a+b``."""
    parts = [p.strip().lower() for p in str(name).split("+") if p.strip()]
    unknown = [p for p in parts if p not in LOSS_NAMES]
    if not parts or unknown:
        raise CellfitError(
            f"unknown loss {name!r}: use one of {', '.join(LOSS_NAMES)} or a sum such as focal+dice."
        )
    comps: dict[str, nn.Module] = {}
    for p in parts:
        if p == "ce":
            comps[p] = FocalCELoss(0.0, class_weights, ignore_index)
        elif p == "focal":
            comps[p] = FocalCELoss(2.0, class_weights, ignore_index)
        else:
            comps[p] = OverlapLoss(p, ignore_index)
    return CombinedLoss(comps)
