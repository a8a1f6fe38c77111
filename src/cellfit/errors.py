"""The one exception type a user sees: a sentence saying what is wrong and what to do.

A message that tells the user to change a setting names it by a placeholder,
``{setting}``, and the error carries the setting's key. Each front end words the
setting its own way: the command line as its flag (``--diameter PIXELS``), the
plugin as its control's label ("Cell diameter"); ``str(error)`` uses plain words
("the cell diameter").

>>> err = CellfitError("no cells were found: set {setting}.", setting="diameter")
>>> str(err)
'no cells were found: set the cell diameter.'
>>> err.worded({"diameter": "--diameter PIXELS"})
'no cells were found: set --diameter PIXELS.'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

__all__ = ["SETTING_WORDS", "CellfitError", "Notice", "fault", "worded"]

log = logging.getLogger(__name__)

#: plain words for each setting an error can name; front ends map the same keys to
#: their own names (``cellfit.cli.FLAGS``, ``cellfit.plugin._tooltips.LABELS``)
SETTING_WORDS: dict[str, str] = {
    "batch_size": "the tile batch size",
    "device": "the device",
    "diameter": "the cell diameter",
    # the same setting named as a thing to leave out ("leave --diameter out")
    "diameter_option": "the cell diameter",
    "encoder": "the encoder",
    "encoder_weights": "the encoder weights",
    "init": "the model to start from",
    "labels": "the annotations",
    "license": "the package's licence",
    "mode": "the training mode",
    "out": "the output",
    "overwrite": "the overwrite option",
    "patch_size": "the patch size",
    "scheduler": "the cluster scheduler",
    "steps": "the number of training steps",
    "tile": "the tile size",
    "time_limit": "the training time",
    "classify": "how classes are decided (by objects or by pixels)",
}


class CellfitError(Exception):
    """A problem with the user's input or environment.

    The message is a complete sentence (what is wrong, what to do). The CLI prints it
    without a traceback and exits with status 2; the plugin shows it as a notification.

    Parameters
    ----------
    message : str
        The sentence; ``{setting}`` where the setting's name goes (any other braces
        are kept as they are).
    setting : str, optional
        The key of the setting the message asks to change (see :data:`SETTING_WORDS`).
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.setting = setting

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message with the setting named from ``names`` (a front end's names of
        the settings), falling back to :data:`SETTING_WORDS`."""
        return _word(self.message, self.setting, names)

    def __str__(self) -> str:
        return self.worded()

    def __reduce__(self):  # keeps ``setting`` when sent to a cluster worker and back
        return (_rebuild, (self.message, self.setting))


def _rebuild(message: str, setting: str | None) -> CellfitError:
    return CellfitError(message, setting=setting)


def _word(message: str, setting: str | None, names: Mapping[str, str] | None) -> str:
    if setting is None or "{setting}" not in message:
        return message
    name = (names or {}).get(setting) or SETTING_WORDS.get(setting, setting)
    return message.replace("{setting}", name)


class Notice:
    """A message for the user that is not an error (e.g. that the cell diameter was
    estimated), worded as :class:`CellfitError` is: ``{setting}`` in ``message``
    stands for the setting's name in the front end's words.

    Notices join (:meth:`join`) without losing the setting each part names.

    >>> n = Notice("cell diameter estimated at 31 pixels; to choose it, set {setting}",
    ...            setting="diameter_option")
    >>> Notice.join(n, "outputs replaced").worded({"diameter_option": "--diameter"})
    'cell diameter estimated at 31 pixels; to choose it, set --diameter; outputs replaced'
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        self.parts: tuple[tuple[str, str | None], ...] = ((message, setting),)

    @classmethod
    def join(cls, *notices: Notice | str | None) -> Notice | None:
        """The notices that are set, as one (None when none is)."""
        parts = []
        for n in notices:
            if isinstance(n, Notice):
                parts.extend(n.parts)
            elif n:
                parts.append((str(n), None))
        if not parts:
            return None
        out = cls.__new__(cls)
        out.parts = tuple(parts)
        return out

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each setting named from ``names`` (see
        :meth:`CellfitError.worded`)."""
        return "; ".join(_word(m, s, names) for m, s in self.parts)

    def __str__(self) -> str:
        return self.worded()

    def __repr__(self) -> str:
        return f"Notice({self.worded()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Notice):
            return self.parts == other.parts
        return isinstance(other, str) and self.worded() == other

    __hash__ = None  # type: ignore[assignment]


def worded(
    message: BaseException | Notice | str | None, names: Mapping[str, str] | None = None
) -> str | None:
    """A message in a front end's words: a :class:`CellfitError` or :class:`Notice`
    worded with ``names``, any other exception or text as ``str()``; None stays None."""
    if message is None:
        return None
    if isinstance(message, (CellfitError, Notice)):
        return message.worded(names)
    return str(message)


def fault(exc: BaseException, what: str) -> CellfitError:
    """A bug met while doing ``what`` ("segmenting a.tif"), as one plain sentence for
    the user. The exception's own text (``IndexError: list index out of range``) is for
    the developers: it is logged with its traceback, at debug level unless
    ``CELLFIT_DEBUG`` is set, and kept as the error's ``__cause__``.

    >>> str(fault(IndexError("list index out of range"), "segmenting a.tif"))
    'segmenting a.tif stopped on a fault in cellfit itself, not in your data: please report it (run it again with CELLFIT_DEBUG=1 set to see the details).'
    """
    level = logging.ERROR if os.environ.get("CELLFIT_DEBUG") else logging.DEBUG
    log.log(level, "%s failed", what, exc_info=exc)
    err = CellfitError(
        f"{what} stopped on a fault in cellfit itself, not in your data: please report "
        "it (run it again with CELLFIT_DEBUG=1 set to see the details)."
    )
    err.__cause__ = exc
    return err
