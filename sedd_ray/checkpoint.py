"""Checkpoints: atomic, checksummed, loaded without unpickling code.

Layout of one checkpoint (a directory)::

    ckpt-00000100/
      state.pt     torch.save of tensors and plain values (model, EMA, optimizer, ...)
      meta.json    step, tokens, config, sha256 of state.pt, format version

A checkpoint is written into a hidden temporary directory next to its final place and
renamed into place only when whole, then ``latest.json`` (written the same way) is
pointed at it. A crash at any moment leaves either the previous checkpoint or the new
one, never a half-written directory under a checkpoint's name. Loading verifies the
checksum and uses ``torch.load(weights_only=True)``, so a tampered or truncated file is
refused with a clear error and no code in a checkpoint is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from sedd_ray.io import atomic_write

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or fails its checksum."""


class StorageError(OSError):
    """An output or storage folder cannot be created or written; one line says which and why."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(
    root: str | os.PathLike, step: int, state: dict[str, Any], meta: dict[str, Any],
    keep: int | None = None, extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically write checkpoint ``root/ckpt-<step>`` and point ``root/latest.json`` at it.

    ``state`` must hold only tensors and plain Python values (loadable with
    ``weights_only=True``). ``meta`` must be JSON-serialisable. ``extra_files`` (name ->
    text, e.g. the tokenizer) are written beside them and checksummed too. ``keep``
    deletes all but the newest ``keep`` checkpoints afterwards. Returns the directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        full_meta = dict(meta)
        names = [STATE_FILE, *(extra_files or {})]
        full_meta.update(
            format_version=FORMAT_VERSION, step=step,
            files={n: sha256_file(tmp / n) for n in names},
        )
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / LATEST_FILE, json.dumps({"name": final.name, "step": step}))
    except OSError as e:  # disk full, quota, read-only: say what survived
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            kept = latest_checkpoint(root)
        except CheckpointError:
            kept = None
        survived = f"{kept.name} is intact" if kept else "no earlier checkpoint exists"
        raise StorageError(
            f"checkpoint {final} could not be written ({e.strerror or e}); {survived}: free "
            "some space and run again to resume from it"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a meta file), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("ckpt-") and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest.json`` points at, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["name"]
    path = root / name
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{pointer} points at {name}, which is not a complete checkpoint")
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        raise CheckpointError(f"checkpoint {path} is incomplete: no {META_FILE}")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has a corrupt {META_FILE}: {e}") from None


def verify_files(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Check every file recorded in ``meta['files']`` exists and matches its sha256."""
    path = Path(path)
    files = meta.get("files") or {}
    if STATE_FILE not in files:
        raise CheckpointError(f"checkpoint {path} records no checksum for {STATE_FILE}")
    for name, expected in files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: no {name}")
        actual = sha256_file(path / name)
        if expected != actual:
            raise CheckpointError(
                f"checkpoint {path}/{name} fails its checksum (truncated or modified): "
                f"sha256 {actual[:12]}... != recorded {str(expected)[:12]}..."
            )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load a checkpoint directory; returns ``(state, meta)``.

    Raises :class:`CheckpointError` when the directory is missing or incomplete, when a
    file's sha256 differs from the one recorded at save time (truncated or tampered), or
    when the file cannot be loaded safely.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    verify_files(path, meta)
    state_path = path / STATE_FILE
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: code, not weights
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else repr(e))
        raise CheckpointError(
            f"checkpoint {state_path} holds more than tensors and plain values and is refused "
            f"(weights_only=True; unpickling it could run code): {why}"
        ) from None
    except Exception as e:  # noqa: BLE001 - re-raised with the path and reason, one line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), repr(e))
        raise CheckpointError(f"checkpoint {state_path} cannot be loaded safely: {first}") from None
    return state, meta


# --- output folders ---------------------------------------------------------------------

def precheck_writable_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Fail fast, creating nothing, when ``path`` cannot become a writable folder.

    Walks up to the nearest existing ancestor: it must be a folder that this process may
    write. Catches a path under a regular file (which fails even for root) and, for
    other users, a read-only folder. Returns the absolute path. See
    :func:`ensure_writable_dir` for the check that writes.
    """
    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(
            f"{flag} {target} cannot be created: {probe} is a file, not a folder; "
            f"pass a writable {flag}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"{flag} {target} cannot be written: {probe} is not writable; "
                           f"pass a writable {flag}")
    return target


def ensure_writable_dir(path: str | os.PathLike, flag: str = "--output",
                        probe_bytes: int = 1 << 16) -> Path:
    """Create ``path`` (and parents) and prove it takes a write: a ``probe_bytes`` file is
    written, fsynced and deleted. A read-only mount, a full disk (ENOSPC) or a quota
    fails here, before any training, as one :class:`StorageError` line."""
    target = precheck_writable_dir(path, flag)
    probe = target / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(
            f"{flag} {target} is not writable ({e.strerror or e}); free some space or pass "
            f"a writable {flag}"
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return target
