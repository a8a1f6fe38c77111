"""Pixel and instance metrics. Never bare accuracy.

* Pixel metrics per class: precision, recall, F1 and IoU over annotated pixels,
  computed with ``segmentation_models_pytorch.metrics``.
* Instance metrics: predicted and true objects matched one-to-one (Hungarian
  assignment on IoU) at IoU thresholds 0.5 … 0.95. At each threshold:
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
  ``f1 = 2TP / (2TP + FP + FN)`` and ``ap = TP / (TP + FP + FN)`` (the "average
  precision" of the 2018 Data Science Bowl, StarDist and Cellpose).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "IOU_THRESHOLDS",
    "aggregate_instance_metrics",
    "instance_metrics",
    "iou_pairs",
    "pixel_metrics",
]

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def pixel_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
) -> dict[str, dict[str, float]]:
    """Per-class precision / recall / F1 / IoU of a class map against a target.

    Parameters
    ----------
    pred, target : ndarray of int, same shape
        Class indices; ``target == ignore_index`` marks pixels left out.

    Returns
    -------
    dict
        ``{class_name: {"precision", "recall", "f1", "iou", "support"}}``.
    """
    # imported here: it takes seconds and imports triton (see cellfit.model.build_model)
    import segmentation_models_pytorch as smp

    p = torch.as_tensor(np.asarray(pred, dtype=np.int64).reshape(1, -1))
    t = torch.as_tensor(np.asarray(target, dtype=np.int64).reshape(1, -1))
    tp, fp, fn, tn = smp.metrics.get_stats(
        p, t, mode="multiclass", num_classes=n_classes, ignore_index=ignore_index
    )
    tp, fp, fn, tn = (s.sum(0, keepdim=True) for s in (tp, fp, fn, tn))
    vals = {
        "precision": smp.metrics.precision(tp, fp, fn, tn, reduction="none", zero_division=0.0),
        "recall": smp.metrics.recall(tp, fp, fn, tn, reduction="none", zero_division=0.0),
        "f1": smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=0.0),
        "iou": smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=0.0),
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    out: dict[str, dict[str, float]] = {}
    for c in range(n_classes):
        out[names[c]] = {k: float(v[0, c]) for k, v in vals.items()}
        out[names[c]]["support"] = int(tp[0, c] + fn[0, c])
    return out


def iou_pairs(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping (pred id, true id, IoU) triples of two label images (ids > 0)."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    truth = np.asarray(truth).ravel().astype(np.int64)
    both = (pred > 0) & (truth > 0)
    n_t = int(truth.max()) + 1 if truth.size else 1
    keys, inter = np.unique(pred[both] * n_t + truth[both], return_counts=True)
    pi, ti = keys // n_t, keys % n_t
    area_p = np.bincount(pred, minlength=int(pred.max()) + 1 if pred.size else 1)
    area_t = np.bincount(truth, minlength=n_t)
    union = area_p[pi] + area_t[ti] - inter
    return pi, ti, inter / np.maximum(union, 1)


def _keep_in_region(pred: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Drop predicted objects that lie mostly outside ``region`` (e.g. unannotated pixels)."""
    pred = np.asarray(pred)
    flat = pred.ravel().astype(np.int64)
    total = np.bincount(flat)
    inside = np.bincount(flat[np.asarray(region, dtype=bool).ravel()], minlength=len(total))
    keep = inside * 2 >= total
    keep[0] = True
    return np.where(keep[pred], pred, 0)


def instance_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    region: np.ndarray | None = None,
) -> dict[float, dict[str, float]]:
    """Match predicted to true objects at each IoU threshold.

    Parameters
    ----------
    pred, truth : ndarray of int, same shape
        Instance labels (0 = none).
    region : ndarray of bool, optional
        Only predicted objects lying mostly inside this mask count (to score against a
        partial annotation without calling unannotated cells false positives).

    Returns
    -------
    dict
        ``{threshold: {"tp", "fp", "fn", "precision", "recall", "f1", "ap"}}``.
    """
    if np.asarray(pred).shape != np.asarray(truth).shape:
        raise ValueError(f"shapes differ: {np.shape(pred)} vs {np.shape(truth)}")
    if region is not None:
        pred = _keep_in_region(pred, region)
    pi, ti, iou = iou_pairs(pred, truth)
    n_pred = len(np.setdiff1d(np.unique(pred), [0]))
    n_true = len(np.setdiff1d(np.unique(truth), [0]))
    out = {}
    for th in thresholds:
        sel = iou >= th
        tp = 0
        if sel.any():
            ups, pinv = np.unique(pi[sel], return_inverse=True)
            uts, tinv = np.unique(ti[sel], return_inverse=True)
            m = np.zeros((len(ups), len(uts)))
            m[pinv, tinv] = iou[sel]
            r, c = linear_sum_assignment(-m)
            tp = int((m[r, c] >= th).sum())
        fp, fn = n_pred - tp, n_true - tp
        out[float(th)] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_true if n_true else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
            "ap": tp / (tp + fp + fn) if (tp + fp + fn) else 1.0,
        }
    return out


def aggregate_instance_metrics(per_image: Sequence[dict[float, dict[str, float]]]) -> dict:
    """Pool TP / FP / FN over images and summarise.

    Returns
    -------
    dict
        ``{"ap50", "f1_50", "precision_50", "recall_50", "ap50_95", "per_threshold"}``.
    """
    if not per_image:
        return {}
    ths = sorted(per_image[0])
    per = {}
    for th in ths:
        tp = sum(m[th]["tp"] for m in per_image)
        fp = sum(m[th]["fp"] for m in per_image)
        fn = sum(m[th]["fn"] for m in per_image)
        per[th] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
            "ap": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        }
    first = per[ths[0]]
    return {
        "ap50": first["ap"],
        "f1_50": first["f1"],
        "precision_50": first["precision"],
        "recall_50": first["recall"],
        "ap50_95": float(np.mean([per[t]["ap"] for t in ths])),
        "per_threshold": per,
    }
