"""The cellfit model inside a bioimage.io model package (a ``.zip``).

``cellfit export --format bioimageio`` (:mod:`cellfit.export`) ships the ``.cellfit``
file itself in the package, as an attachment, so that cellfit can use the package as
a model file: :func:`cellfit.model.load_model` and :func:`cellfit.model.read_model_info`
read that attachment straight from the zip (nothing is extracted, nothing else in the
package is read) and check it as they check any model file.

A package is shared like a model file, so it is checked before it is read, and a zip
cellfit cannot use is refused in one sentence (a :class:`CellfitError`):

- the zip's central directory is bounded (:data:`MAX_ENTRIES` files,
  :data:`MAX_DIRECTORY_BYTES`) before :mod:`zipfile` reads it; zip64 archives (more
  than 65,535 files or 4 GiB) are not cellfit packages;
- a zip without ``rdf.yaml`` / ``bioimageio.yaml`` is no package; a package without
  exactly one ``*.cellfit`` file at its top is not cellfit's (it is run with
  bioimageio.core, deepImageJ or ilastik);
- the attachment must be stored or deflated, unencrypted, at most
  :data:`MAX_MODEL_BYTES`; it is read no further than its declared size, and its
  CRC is checked when it is read whole.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO

from cellfit.errors import CellfitError

__all__ = [
    "DESCRIPTION_NAMES",
    "MAX_DIRECTORY_BYTES",
    "MAX_ENTRIES",
    "MAX_MODEL_BYTES",
    "MODEL_SUFFIX",
    "READ_ERRORS",
    "PackagedModel",
    "find_packaged_model",
    "is_zip",
    "packaged_model_name",
]

#: the names a bioimage.io package's description has at the top of the zip
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: the suffix of the cellfit model attachment
MODEL_SUFFIX = ".cellfit"
#: most files a package cellfit reads may hold (cellfit's own hold 7)
MAX_ENTRIES = 10_000
#: largest central directory cellfit reads, in bytes
MAX_DIRECTORY_BYTES = 4 * 2**20
#: largest model attachment cellfit reads, in bytes (the largest encoders smp builds
#: are a few hundred MB)
MAX_MODEL_BYTES = 2**31

#: what reading an attachment may raise: a cut or damaged zip, a bad CRC, bad deflate data
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_MAX_COMMENT = 0xFFFF


class _NotZip(Exception):
    """The file is not a zip archive cellfit can read the directory of."""


def is_zip(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive does (a local file header, or the end
    record of an empty zip)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"PK\x03\x04", _EOCD)


def _check_directory(path: Path) -> None:
    """Refuse a zip whose central directory is larger than cellfit reads, with bounded
    reads of its end record; raises :class:`_NotZip` when there is none."""
    size = path.stat().st_size
    with path.open("rb") as f:
        start = max(0, size - _EOCD_SIZE - _MAX_COMMENT)
        f.seek(start)
        tail = f.read(size - start)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < _EOCD_SIZE:
        raise _NotZip
    _sig, disk, _d, _n_here, entries, dir_size, _offset, _comment = struct.unpack(
        "<4s4H2LH", tail[at : at + _EOCD_SIZE]
    )
    # a zip64 locator just before the end record makes zipfile read the zip64 record's
    # counts instead of these: such a zip is refused too
    if at >= 20:
        zip64 = tail[at - 20 : at - 16] == _ZIP64_LOCATOR
    else:  # the locator would lie before what was read: look there
        zip64 = start + at >= 20 and _zip64_locator_at(path, start + at - 20)
    if zip64 or entries == 0xFFFF or dir_size == 0xFFFFFFFF or disk == 0xFFFF:
        raise CellfitError(
            f"{path} is a zip64 archive (more than 65,535 files or 4 GiB), which is not a "
            "model package cellfit exported: give a cellfit model file or a package made by "
            "cellfit export."
        )
    if entries > MAX_ENTRIES or dir_size > MAX_DIRECTORY_BYTES:
        raise CellfitError(
            f"{path} lists {entries} files in a {dir_size}-byte directory, more than the "
            f"{MAX_ENTRIES} files cellfit reads in a package: give a cellfit model file or a "
            "package made by cellfit export."
        )


def _zip64_locator_at(path: Path, offset: int) -> bool:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(4) == _ZIP64_LOCATOR


def packaged_model_name(path: Path, zf: zipfile.ZipFile) -> str:
    """The name of the cellfit model in the package ``zf`` (read from ``path``).

    Raises
    ------
    CellfitError
        A zip that is no bioimage.io package, a package not made by cellfit (no
        ``.cellfit`` attachment), or one with several.
    """
    names = zf.namelist()
    if not any(n in DESCRIPTION_NAMES or n.endswith(".bioimageio.yaml") for n in names):
        raise CellfitError(
            f"{path} is a zip file but neither a cellfit model nor a bioimage.io model "
            "package: give a model saved by cellfit, or a package made by cellfit export."
        )
    models = [n for n in names if n.endswith(MODEL_SUFFIX) and "/" not in n.strip("/")]
    if not models:
        raise CellfitError(
            f"{path} is a bioimage.io model package that was not made by cellfit, so cellfit "
            "cannot run it: run it with bioimageio.core, deepImageJ or ilastik, or give a "
            "cellfit model."
        )
    if len(models) > 1:
        raise CellfitError(
            f"{path} holds {len(models)} cellfit models ({', '.join(models[:3])}), not one: "
            "give a package made by cellfit export, or one of the model files itself."
        )
    return models[0]


def _check_member(path: Path, item: zipfile.ZipInfo) -> None:
    where = f"{item.filename} in {path}"
    if item.flag_bits & 0x1:
        raise CellfitError(f"{where} is encrypted: give a package made by cellfit export.")
    if item.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CellfitError(
            f"{where} is compressed in a way cellfit does not read (method "
            f"{item.compress_type}): give a package made by cellfit export."
        )
    if item.file_size > MAX_MODEL_BYTES:
        raise CellfitError(
            f"{where} claims {item.file_size} bytes, more than the "
            f"{MAX_MODEL_BYTES // 2**30} GiB cellfit reads: give a package made by cellfit "
            "export."
        )


class PackagedModel:
    """The cellfit model attachment of a package, found and checked (see
    :func:`find_packaged_model`); a context manager that closes the zip."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, item: zipfile.ZipInfo) -> None:
        self.path = path
        self.name = item.filename
        #: the attachment's declared size: no more is ever read
        self.size = item.file_size
        self._zf = zf
        self._item = item

    def __enter__(self) -> PackagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()

    def open(self) -> IO[bytes]:
        """A binary stream of the attachment (it ends at its declared size)."""
        try:
            return self._zf.open(self._item)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError):
            raise CellfitError(
                f"{self.name} in {self.path} cannot be read (the package is damaged): get an "
                "intact copy, or export the model again."
            ) from None

    def read(self) -> bytes:
        """The whole attachment, its length and CRC checked."""
        with self.open() as stream:
            try:
                data = stream.read(self.size + 1)
            except READ_ERRORS as exc:
                raise CellfitError(
                    f"{self.name} in {self.path} is damaged ({exc}): get an intact copy, or "
                    "export the model again."
                ) from None
        if len(data) != self.size:
            raise CellfitError(
                f"{self.name} in {self.path} is damaged (it holds {len(data)} bytes, the "
                f"package's directory says {self.size}): get an intact copy, or export the "
                "model again."
            )
        return data


def find_packaged_model(path: Path) -> PackagedModel | None:
    """The cellfit model in the package ``path``, or None when ``path`` is not a zip
    archive (the caller words it as any file that is not a model). Nothing is written
    to disk, and nothing of the package but its directory is read.

    Raises
    ------
    CellfitError
        ``path`` is a zip cellfit cannot use (see the module's notes).
    """
    if not is_zip(path):
        return None
    try:
        _check_directory(path)
        zf = zipfile.ZipFile(path)
    except (_NotZip, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error):
        return None
    try:
        item = zf.getinfo(packaged_model_name(path, zf))
        _check_member(path, item)
    except BaseException:
        zf.close()
        raise
    return PackagedModel(path, zf, item)
