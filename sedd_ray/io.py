"""The one atomic write and the one reading of a storage location.

Atomic writes: :func:`atomic_write` writes a file under a hidden temporary name in the
same folder (``.<name>.<random>.tmp``), flushes and fsyncs it, then renames it into place;
on any failure the temporary file is deleted and the error re-raised, so a reader finds
the old file or the new one, never half of one. :func:`atomic_dir` does the same for a
folder (a checkpoint-like bundle of files). Both work on local paths; :func:`atomic_write`
also on any ``pyarrow.fs`` filesystem (``move`` instead of ``os.replace``).

Storage locations: a study's or a run's storage is a local path or a URI. ``file://``
URIs and plain paths are *local* (the same folder); ``s3://``, ``gs://`` and any other
scheme are *remote*. Every module asks these helpers rather than looking for ``"://"``:

    is_local("results"), is_local("file:///data/r")   -> True
    local_path("file:///data/r")                       -> Path("/data/r")
    normalize("file:///data/r/"), normalize("s3://b/r/") -> "/data/r", "s3://b/r"
    join("s3://b/r", "study", "x")                     -> "s3://b/r/study/x"
    filesystem("gs://b/r")                             -> (pyarrow GcsFileSystem, "b/r", False)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = [
    "atomic_dir",
    "atomic_write",
    "filesystem",
    "is_local",
    "join",
    "local_path",
    "normalize",
]

Writer = Callable[[IO[bytes]], Any]


# --- storage locations ---------------------------------------------------------------------

def is_local(storage: str | os.PathLike) -> bool:
    """A plain path or a ``file://`` URI (local); any other ``scheme://`` is remote."""
    text = os.fspath(storage)
    return "://" not in text or text.startswith("file://")


def local_path(storage: str | os.PathLike) -> Path | None:
    """The absolute local path of ``storage`` (``file://`` stripped, ``~`` expanded), or
    None for remote storage."""
    if not is_local(storage):
        return None
    text = os.fspath(storage).removeprefix("file://")
    return Path(os.path.abspath(os.path.expanduser(text)))


def normalize(storage: str | os.PathLike) -> str:
    """One spelling per location: local -> its absolute path; remote -> the URI without a
    trailing ``/``."""
    path = local_path(storage)
    return str(path) if path is not None else os.fspath(storage).rstrip("/")


def join(storage: str | os.PathLike, *parts: str) -> str:
    """``storage/part/...`` for a local path or a URI (never ``os.path.join``: a URI keeps
    its ``/``)."""
    return "/".join([os.fspath(storage).rstrip("/"), *parts])


def filesystem(storage: str | os.PathLike) -> tuple[pafs.FileSystem, str, bool]:
    """``(pyarrow filesystem, path on it, is_local)`` of ``storage``."""
    import pyarrow.fs as pafs

    path = local_path(storage)
    if path is not None:
        return pafs.LocalFileSystem(), str(path), True
    fs, where = pafs.FileSystem.from_uri(os.fspath(storage))
    return fs, where.rstrip("/"), False


# --- atomic writes -------------------------------------------------------------------------

def _tmp_name(folder: str, name: str) -> str:
    return f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, *,
                 fs: pafs.FileSystem | None = None) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function writing to a binary stream) to
    ``path`` atomically: hidden temp file in the same folder, fsync, rename; the temp file
    is removed on failure. ``fs``: a ``pyarrow.fs`` filesystem (default: local files;
    the local folder is created)."""
    text = os.fspath(path)
    folder, name = text.rsplit("/", 1) if "/" in text else (".", text)
    tmp = _tmp_name(folder, name)
    write: Writer = data if callable(data) else (
        lambda f: f.write(data.encode() if isinstance(data, str) else data))
    local = fs is None or type(fs).__name__ == "LocalFileSystem"
    try:
        if local:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, text)
        else:
            with fs.open_output_stream(tmp) as f:
                write(f)
            fs.move(tmp, text)
    except BaseException:
        _remove(tmp, fs if not local else None)
        raise


def _remove(tmp: str, fs: pafs.FileSystem | None) -> None:
    try:
        if fs is None:
            os.unlink(tmp)
        else:
            fs.delete_file(tmp)
    except OSError:
        pass  # never created, or already renamed


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], Any], *,
               keep_existing: bool = False) -> Path:
    """Build a folder atomically: ``write(tmp)`` fills a hidden sibling folder, each file
    in it is fsynced, then it is renamed to ``final``. ``keep_existing``: when another
    process renamed its own ``final`` first, keep theirs (a cache); otherwise an existing
    ``final`` is replaced. The temp folder is removed on failure. Returns ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_tmp_name(str(final.parent), final.name))
    tmp.mkdir()
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists() and not keep_existing:
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
