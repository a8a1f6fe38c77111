"""The one family of progress events every job yields.

Training, prediction and batch jobs are generators; each item they yield is a
:class:`Progress` (or a subclass adding what that job reports), so a front end shows
progress the same way whatever the job: a bar at :attr:`Progress.fraction`, a line of
:attr:`Progress.text`, and :attr:`Progress.notice` (a message for the user, shown
once) when set. The plugin drains the same generators in a thread; the CLI and the
tests drain them in the caller's thread.

Subclasses add their own fields first and may compute ``fraction`` and ``text`` in
``__post_init__``; the base fields are keyword-only so they never get in the way.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Progress", "share_done"]


@dataclass(kw_only=True)
class Progress:
    """Progress of a job.

    Attributes
    ----------
    fraction : float
        Share of the job done, 0 to 1.
    text : str
        One line saying where the job is ("plane 3 of 12"); may be empty.
    notice : str or None
        A message for the user to be shown once (e.g. the tile batch was halved after
        the GPU ran out of memory), or None.
    """

    fraction: float = 0.0
    text: str = ""
    notice: str | None = None


def share_done(done: int, total: int, part_done: int = 0, part_total: int = 0) -> float:
    """The share (0 to 1) of ``total`` items done when ``done`` are finished and the
    next one is ``part_done`` of ``part_total`` parts through (planes and their tiles,
    files and their planes).

    >>> share_done(2, 8, 1, 2)
    0.3125
    """
    inner = part_done / part_total if part_total else 0.0
    return min(1.0, (done + inner) / max(1, total))
