"""Resume checkpoints: the whole state of an unfinished training run in one file.

A checkpoint is a safetensors file, like a model file, so reading one runs no code:
every tensor of the state (weights, optimizer moments, random-number states) is stored
under a name of its own, everything else as JSON in the file's metadata, with markers
where the tensors, tuples and dictionaries with non-text keys were.

It is written atomically: to a temporary file beside it (``.<name>.part``, one fixed
name, so a write broken off by a crash leaves at most that one file, replaced by the
next write), flushed to disk, then renamed over the old checkpoint. A crash at any
moment leaves the previous checkpoint whole.

>>> import tempfile, torch
>>> path = Path(tempfile.mkdtemp()) / "m.cellfit.resume"
>>> _ = write_checkpoint(path, {"step": 3, "weights": {"w": torch.ones(2)}})
>>> read_checkpoint(path)["weights"]["w"]
tensor([1., 1.])
>>> remove_checkpoint(path); path.exists()
False
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from cellfit.errors import CellfitError

__all__ = [
    "FORMAT",
    "VERSION",
    "read_checkpoint",
    "remove_checkpoint",
    "resume_path",
    "write_checkpoint",
]

#: the ``format`` entry of a checkpoint's metadata
FORMAT = "cellfit-resume"
#: the layout of the state; a checkpoint of another version is refused
VERSION = 1

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def resume_path(model_path: str | os.PathLike) -> Path:
    """Where the training that writes ``model_path`` keeps its resume checkpoint:
    beside it, the same name with ``.resume`` added (``m.cellfit.resume``)."""
    path = Path(model_path)
    return path.with_name(path.name + ".resume")


def _part(path: Path) -> Path:
    """The temporary file a checkpoint is written to before it replaces ``path``."""
    return path.with_name(f".{path.name}.part")


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-friendly data, its tensors moved (as CPU copies) into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {_ITEMS: [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__}")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_pack`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_unpack(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_ITEMS}:
            return {k: _unpack(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def write_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (see the module docstring).

    Parameters
    ----------
    path : path
        The checkpoint file; its folder must exist.
    state : dict
        Nested dicts, lists and tuples of tensors (any device), numbers, strings,
        booleans and None.

    Raises
    ------
    OSError
        The write failed (a full disk, no write permission); the previous checkpoint is
        left as it was and the temporary file is removed.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_pack(state, tensors))
    part = _part(path)
    raw = save(tensors, metadata={"format": FORMAT, "version": str(VERSION), "state": meta})
    del tensors
    try:
        with open(part, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old checkpoint
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state in a checkpoint (tensors on the CPU).

    Raises a :class:`CellfitError` in one sentence when the file does not exist, is
    damaged, is not a cellfit checkpoint or was written by another version.
    """
    path = Path(path)
    if not path.is_file():
        raise CellfitError(
            f"there is no interrupted training to resume: {path} does not exist (it is "
            "written while training runs and removed when training finishes), so start the "
            "training without resuming."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError("not a checkpoint")
        if meta.get("version") != str(VERSION):
            raise CellfitError(
                f"{path} was written by another version of cellfit and cannot be resumed: "
                "start the training again without resuming."
            )
        return _unpack(json.loads(meta["state"]), load_file(str(path)))
    except CellfitError:
        raise
    except Exception:
        raise CellfitError(
            f"{path} is damaged or not a cellfit resume checkpoint: delete it and start the "
            "training again without resuming."
        ) from None


def remove_checkpoint(path: str | os.PathLike | None) -> None:
    """Delete a checkpoint and any temporary file of a write broken off (None: nothing)."""
    if path is None:
        return
    path = Path(path)
    for p in (path, _part(path)):
        p.unlink(missing_ok=True)
