"""Join per-slice instance labels into 3D objects by overlap.

Slice by slice (so a stack streams through with one previous slice in memory), each
object of the new slice takes the id of the object of the previous slice it overlaps
most, when most of the smaller of the two lies inside the other; pairs are taken one
to one, best overlap (IoU) first. Objects left unmatched start new ids. A nucleus
thus keeps one id through the stack; two nuclei that touch in one slice keep theirs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SliceLinker", "link_stack", "match_objects"]

#: a pair is linked when their overlap covers at least this fraction of the smaller one
DEFAULT_MIN_OVERLAP = 0.5


def match_objects(
    prev: np.ndarray, cur: np.ndarray, min_overlap: float = DEFAULT_MIN_OVERLAP
) -> dict[int, int]:
    """One-to-one matches ``{cur_id: prev_id}`` between two label images of one shape."""
    a = prev.ravel()
    b = cur.ravel()
    both = (a > 0) & (b > 0)
    if not both.any():
        return {}
    ua, ca = np.unique(a[a > 0], return_counts=True)
    ub, cb = np.unique(b[b > 0], return_counts=True)
    key = np.stack([a[both].astype(np.int64), b[both].astype(np.int64)], axis=1)
    pairs, inter = np.unique(key, axis=0, return_counts=True)
    sa = ca[np.searchsorted(ua, pairs[:, 0])]
    sb = cb[np.searchsorted(ub, pairs[:, 1])]
    ok = inter >= min_overlap * np.minimum(sa, sb)
    pairs, inter, sa, sb = pairs[ok], inter[ok], sa[ok], sb[ok]
    iou = inter / (sa + sb - inter)
    matches: dict[int, int] = {}
    taken: set[int] = set()
    for k in np.argsort(-iou, kind="stable"):
        p, c = int(pairs[k, 0]), int(pairs[k, 1])
        if c in matches or p in taken:
            continue
        matches[c] = p
        taken.add(p)
    return matches


class SliceLinker:
    """Links the slices of a stack as they stream past.

    ``lead_shape`` is the stack's leading shape: slices are linked along its last axis
    (Z in a TZYX stack; time in a TYX series), starting afresh at each index of the
    axes before it (each time point's volume), with ids unique over the whole file.
    """

    def __init__(
        self, lead_shape: tuple[int, ...] = (), min_overlap: float = DEFAULT_MIN_OVERLAP
    ) -> None:
        self.run = int(lead_shape[-1]) if lead_shape else 1
        self.min_overlap = min_overlap
        self.next_id = 1
        self.prev: np.ndarray | None = None

    def __call__(self, p: int, labels: np.ndarray) -> np.ndarray:
        """Linked labels (uint32) of plane ``p`` (planes must come in order)."""
        labels = np.asarray(labels)
        if p % self.run == 0:
            self.prev = None
        n = int(labels.max()) if labels.size else 0
        lut = np.zeros(n + 1, np.uint32)
        matches = match_objects(self.prev, labels, self.min_overlap) if self.prev is not None else {}
        ids = np.unique(labels)
        for i in ids[ids > 0]:
            m = matches.get(int(i))
            if m is None:
                lut[i] = self.next_id
                self.next_id += 1
            else:
                lut[i] = m
        out = lut[labels]
        self.prev = out
        return out


def link_stack(
    labels: np.ndarray, lead_shape: tuple[int, ...] | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> np.ndarray:
    """Link a whole label stack ``lead_shape + (Y, X)`` (in memory); see :class:`SliceLinker`."""
    if lead_shape is None:
        lead_shape = labels.shape[:-2]
    flat = labels.reshape(-1, *labels.shape[-2:])
    linker = SliceLinker(tuple(lead_shape), min_overlap)
    out = np.stack([linker(p, s) for p, s in enumerate(flat)])
    return out.reshape(labels.shape)
