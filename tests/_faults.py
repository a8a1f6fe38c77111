"""Write failures on demand, for the files under one folder: a disk that fills up after
a given number of bytes, or a folder the user may not write to. Files elsewhere (the
inputs, pytest's own) are written as usual.

The failures are injected below the code under test: every Python way of opening a
file for writing (``open``, ``Path.open`` / ``write_bytes``, ``os.fdopen`` after
``tempfile.mkstemp``, ``os.open``, ``os.mkdir``) goes through the patched calls, so
a test fails the same way whether the code writes to a temporary name or in place.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _path_of(file) -> Path | None:
    """The path a file argument of ``open`` names (file descriptors through /proc)."""
    if isinstance(file, int):
        try:
            return Path(os.readlink(f"/proc/self/fd/{file}"))  # Linux
        except OSError:
            pass
        try:  # macOS
            import fcntl

            raw = fcntl.fcntl(file, fcntl.F_GETPATH, bytes(1024))
            return Path(raw.split(b"\0", 1)[0].decode())
        except (ImportError, AttributeError, OSError):
            return None
    try:
        return Path(os.fspath(file)).absolute()
    except TypeError:
        return None


def _under(path: Path | None, folder: Path) -> bool:
    return path is not None and (path == folder or folder in path.parents)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _FillingFile:
    """A file object that writes through while the disk has room, then writes what
    still fits and fails like a full disk (``OSError(errno.ENOSPC)``)."""

    def __init__(self, f, disk: dict, name: str) -> None:
        self._f = f
        self._disk = disk
        self._name = name

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        room = self._disk["room"]
        if view.nbytes <= room:
            self._disk["room"] = room - view.nbytes
            return self._f.write(data)
        self._disk["room"] = 0
        if room:
            self._f.write(view[:room])
            self._f.flush()
        self._disk["failures"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def fileno(self) -> int:
        # numpy's ``tofile`` would write through the descriptor, past this object:
        # without one it falls back to ``write``
        raise io.UnsupportedOperation("fileno")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk_under(monkeypatch, folder: Path, room: int) -> dict:
    """From now on the files written under ``folder`` share ``room`` more bytes; the
    write that does not fit writes what fits and raises ``OSError(errno.ENOSPC)``.
    Returns the disk's state: ``room`` left and the number of ``failures``."""
    folder = Path(folder).absolute()
    disk = {"room": int(room), "failures": 0}
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = _path_of(file)
        if _writes(mode) and _under(path, folder):
            return _FillingFile(f, disk, str(path))
        return f

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    return disk


def deny_writes_under(monkeypatch, folder: Path) -> list[str]:
    """From now on creating or opening for writing any file or folder under ``folder``
    raises ``PermissionError(errno.EACCES)`` (reading still works), as for a folder
    the user may not write to. Returns the list of paths refused so far."""
    folder = Path(folder).absolute()
    refused: list[str] = []
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir

    def deny(path) -> None:
        refused.append(str(path))
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def open_(file, mode="r", *args, **kwargs):
        path = _path_of(file)
        if _writes(mode) and _under(path, folder):
            deny(path)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        p = _path_of(path)
        if flags & _WRITE_FLAGS and _under(p, folder):
            deny(p)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        p = _path_of(path)
        if _under(p, folder) and not p.exists():  # an existing one: FileExistsError
            deny(p)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return refused
