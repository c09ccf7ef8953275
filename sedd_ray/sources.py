"""Corpus sources of the token store: local or cloud files, and Hugging Face datasets.

    corpus = parse_corpus("jsonl:/data/owt/*.jsonl.gz:text", text_field="text")
    corpus.parts            # [Part(kind="jsonl", path=..., rows=..., nbytes=...), ...]
    read_rows(corpus, 0, 0, 100)   # the documents (str) of rows [0, 100) of part 0

Spellings (``data.corpus``):

- ``txt:GLOB``: ``.txt`` files, one document each;
- ``jsonl:GLOB[:FIELD]``: JSON lines (``.jsonl`` or ``.jsonl.gz``), one document a line,
  its text in ``FIELD`` (else ``data.text_field``);
- ``parquet:GLOB[:FIELD]``: Parquet files, one document a row;
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset through ``datasets.load_dataset``
  (the Hub or its local cache), or ``hf:/path/to/dir[:SPLIT]`` for a dataset written by
  ``save_to_disk``. Without ``SPLIT``, its own ``train``/``validation``/``test`` splits
  are used when it has all three; otherwise its ``train`` split (or every split) is held
  out by document (:func:`sedd_ray.store.split_codes`). Datasets are downloaded (or
  memory-mapped from disk), not streamed.

``GLOB`` is a local path or a ``file://``, ``s3://``, ``gs://`` URI with ``*``/``?``
(read through ``pyarrow.fs``; see :mod:`sedd_ray.io`). A *part* is one file or one split
of a dataset; parts are sorted by path so the documents have one order everywhere.

Resolving a corpus (:func:`parse_corpus`) lists the files, counts their rows and reads
the first document, so a missing or empty glob, an empty file or a missing field is one
:class:`~sedd_ray.data.DataError` line before any tokenization or write.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from sedd_ray.data import DataError
from sedd_ray.io import filesystem, is_local, local_path

__all__ = ["KINDS", "Corpus", "Part", "parse_corpus", "read_rows"]

KINDS = ("txt", "jsonl", "parquet", "hf")
_EXT = {"txt": (".txt",), "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"),
        "parquet": (".parquet",)}
_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class Part:
    """One unit of input: a file (``path``: a local path or URI) or, for ``hf``, one
    split of a dataset (``path``: the dataset spec, ``hf_split`` its split name).
    ``rows``: documents in it; ``nbytes``: about how many bytes of text (plans shards);
    ``split``: ``train``/``val``/``test`` when the dataset gives it, else None (the
    store's hold-out by document decides)."""

    kind: str
    path: str
    rows: int
    nbytes: int
    split: str | None = None
    hf_split: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A resolved store corpus: its parts in order, the text field, and ``identity``
    (what names its text in the store's key: files with sizes and mtimes, or a
    dataset's fingerprints)."""

    spec: str
    kind: str
    parts: tuple[Part, ...]
    text_field: str
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def given_splits(self) -> bool:
        return any(p.split is not None for p in self.parts)


def parse_corpus(spec: str, text_field: str = "text") -> Corpus:
    """``data.corpus`` -> :class:`Corpus` (lists files, counts rows, checks the field)."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise DataError(f"unknown store corpus {spec!r}; valid: txt:GLOB, jsonl:GLOB[:FIELD], "
                        "parquet:GLOB[:FIELD], hf:NAME[:CONFIG][:SPLIT]")
    if not arg:
        raise DataError(f"corpus {kind} needs a location: --corpus {kind}:PATH_OR_GLOB"
                        if kind != "hf" else "corpus hf needs a dataset: --corpus hf:NAME")
    if kind == "hf":
        return _hf_corpus(spec, arg, text_field)
    ident = file_identity(spec, text_field)
    parts = tuple(_file_part(kind, path, size) for path, size, _ in ident["files"])
    corpus = Corpus(spec, kind, parts, ident["field"], ident)
    _check_first(corpus)
    return corpus


def file_identity(spec: str, text_field: str) -> dict[str, Any]:
    """What names a file corpus's text (``[[path, size, mtime_ns], ...]`` and the field):
    a listing only, no file is read. A ``hf:`` corpus has none (None)."""
    kind, _, arg = spec.partition(":")
    if kind == "hf":
        return {"kind": kind, "files": None}
    pattern, field_name = _split_field(arg, text_field)
    files = _glob(pattern, kind)
    return {"kind": kind, "files": [[p, s, m] for p, s, m in files],
            "field": "" if kind == "txt" else field_name}


def _split_field(arg: str, default: str) -> tuple[str, str]:
    """``PATTERN[:FIELD]``: a last ``:`` segment without ``/`` is the field."""
    head, sep, tail = arg.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.startswith("\\"):
        return head, tail
    return arg, default


def _glob(pattern: str, kind: str) -> list[tuple[str, int, int]]:
    """``(path or URI, size, mtime_ns)`` of the files matching ``pattern``, sorted."""
    import pyarrow.fs as pafs

    fs, where, local = filesystem(pattern)
    base = where if not any(c in where for c in "*?[") else where[: min(
        where.find(c) for c in "*?[" if c in where)].rpartition("/")[0]
    try:
        info = fs.get_file_info(base)
    except OSError as err:
        raise DataError(f"corpus {kind}:{pattern}: cannot read {base} ({err}); "
                        "check the path and the credentials") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"corpus {kind}:{pattern}: {base} does not exist; check the path")
    if info.type == pafs.FileType.File:
        infos = [info] if base == where else []
    else:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    matched = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")
               and (base == where and i.path.endswith(_EXT[kind]) or fnmatch.fnmatch(i.path, where))]
    if not matched:
        raise DataError(f"corpus {kind}:{pattern} matches no {'/'.join(_EXT[kind])} file; "
                        "check the path or the glob")
    prefix = "" if local else pattern.split("://", 1)[0] + "://"
    out = [(prefix + i.path, int(i.size), int(i.mtime_ns or 0)) for i in matched]
    return sorted(out)


def _open(path: str) -> Any:
    """A binary input stream of a file or URI; ``.gz`` decompressed."""
    fs, where, _ = filesystem(path)
    return fs.open_input_stream(where, compression="gzip" if path.endswith(".gz") else None)


def _file_part(kind: str, path: str, size: int) -> Part:
    if kind == "txt":
        return Part(kind, path, 1, size)
    if kind == "jsonl":
        with _open(path) as f:
            rows, last = 0, b"\n"
            while chunk := f.read(1 << 24):
                rows += chunk.count(b"\n")
                last = chunk[-1:]
            rows += last != b"\n"
        return Part(kind, path, rows, size * (4 if path.endswith(".gz") else 1))
    meta = _parquet(path).metadata
    nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return Part(kind, path, meta.num_rows, nbytes)


def _parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, where, _ = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(where))


def _check_first(corpus: Corpus) -> None:
    """Refuse a corpus with no rows, or whose first document lacks the text field."""
    if not any(p.rows for p in corpus.parts):
        raise DataError(f"corpus {corpus.spec} is empty: its files hold no documents")
    first = next(i for i, p in enumerate(corpus.parts) if p.rows)
    read_rows(corpus, first, 0, 1)


# --- reading rows ------------------------------------------------------------------------

def read_rows(corpus: Corpus, part: int, start: int, stop: int) -> list[str]:
    """The documents of rows ``[start, stop)`` of ``corpus.parts[part]`` (``""`` for a
    blank line or a null text)."""
    p = corpus.parts[part]
    if p.kind == "txt":
        with _open(p.path) as f:
            data = f.read()
        try:
            return [data.decode("utf-8").replace("\r\n", "\n")][start:stop]
        except UnicodeDecodeError as err:
            raise DataError(f"{p.path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "convert it or remove it from the corpus") from None
    if p.kind == "jsonl":
        return [_json_text(line, corpus.text_field, p.path, start + i)
                for i, line in enumerate(_lines(p.path, start, stop))]
    if p.kind == "parquet":
        return _parquet_rows(p.path, corpus.text_field, start, stop)
    ds = _hf_split(p.path, p.hf_split)
    _need_column(ds.column_names, corpus.text_field, corpus.spec)
    return [t or "" for t in ds[start:stop][corpus.text_field]]


def _lines(path: str, start: int, stop: int) -> Iterator[bytes]:
    with _open(path) as f:
        for i, line in enumerate(io.BufferedReader(f, 1 << 20)):
            if i >= stop:
                return
            if i >= start:
                yield line


def _json_text(line: bytes, text_field: str, path: str, row: int) -> str:
    if not line.strip():
        return ""
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise DataError(f"{path} line {row + 1} is not JSON ({err}); fix or remove it") from None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path} line {row + 1} has no field {text_field!r} (it has: {keys}); "
                        f"set --set data.text_field=NAME or jsonl:GLOB:NAME")
    return obj[text_field] or ""


def _need_column(columns: list[str], text_field: str, where: str) -> None:
    if text_field not in columns:
        raise DataError(f"{where} has no field {text_field!r} (it has: {', '.join(columns)}); "
                        "set --set data.text_field=NAME")


def _parquet_rows(path: str, text_field: str, start: int, stop: int) -> list[str]:
    pf = _parquet(path)
    _need_column(pf.schema_arrow.names, text_field, path)
    out: list[str] = []
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first < stop and first + n > start:
            col = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
            out += col[max(start - first, 0): stop - first]
        first += n
    return [t or "" for t in out]


# --- Hugging Face datasets ---------------------------------------------------------------

def _hf_args(arg: str) -> tuple[str, str | None, str | None, bool]:
    """``NAME[:CONFIG][:SPLIT]`` or ``PATH[:SPLIT]`` -> (name, config, split, on disk)."""
    head, sep, tail = arg.rpartition(":")
    if _is_saved(arg):
        return str(local_path(arg)), None, None, True
    if sep and _is_saved(head):
        return str(local_path(head)), None, tail or None, True
    bits = arg.split(":")
    if len(bits) > 3 or not bits[0]:
        raise DataError(f"corpus hf:{arg}: expected hf:NAME[:CONFIG][:SPLIT] or "
                        "hf:/path/saved/with/save_to_disk[:SPLIT]")
    bits += [""] * (3 - len(bits))
    return bits[0], bits[1] or None, bits[2] or None, False


def _is_saved(path: str) -> bool:
    p = local_path(path) if is_local(path) else None
    return p is not None and p.is_dir() and (
        (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())


@functools.lru_cache(maxsize=4)
def _hf_load(name: str, config: str | None, on_disk: bool) -> Any:
    """The dataset (a ``Dataset`` or ``DatasetDict``), memory-mapped, once per process."""
    import datasets

    try:
        if on_disk:
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name, config)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise DataError(f"corpus hf:{name} could not be loaded ({type(err).__name__}: {first}); "
                        "check the name, or save it with datasets' save_to_disk and pass "
                        "hf:/path/to/dir") from None


def _hf_split(spec: str, split: str | None) -> Any:
    name, config, on_disk = json.loads(spec)
    ds = _hf_load(name, config, on_disk)
    return ds if split is None else ds[split]


def _hf_chosen(ds: Any, split: str | None, spec: str) -> list[tuple[str | None, str | None]]:
    """``[(dataset split or None, our split or None), ...]``: the dataset's own
    train/validation/test when it has all three (and no split was named), else the named
    split, its ``train`` split, or the whole dataset, held out by document."""
    if not hasattr(ds, "keys"):  # one Dataset
        return [(None, None)]
    names = list(ds.keys())
    if split is not None:
        if split not in names:
            raise DataError(f"corpus {spec}: no split {split!r}; it has {', '.join(names)}")
        return [(split, None)]
    if all(s in names for s in _HF_SPLITS.values()):
        return [(hf, ours) for ours, hf in _HF_SPLITS.items()]
    return [("train", None)] if "train" in names else [(s, None) for s in names]


def _hf_corpus(spec: str, arg: str, text_field: str) -> Corpus:
    name, config, split, on_disk = _hf_args(arg)
    ds = _hf_load(name, config, on_disk)
    key = json.dumps([name, config, on_disk])
    chosen = _hf_chosen(ds, split, spec)
    parts = []
    for hf_split, ours in chosen:
        d = ds if hf_split is None else ds[hf_split]
        _need_column(d.column_names, text_field, spec)
        parts.append(Part("hf", key, d.num_rows, int(d.data.nbytes), ours, hf_split))
    ident = {"kind": "hf", "name": name, "config": config, "split": split, "field": text_field,
             "fingerprints": [getattr(ds if s is None else ds[s], "_fingerprint", "")
                              for s, _ in chosen]}
    corpus = Corpus(spec, "hf", tuple(parts), text_field, ident)
    _check_first(corpus)
    return corpus


def describe(corpus: Corpus) -> dict[str, Any]:
    """A JSON-able summary (the store's index keeps it)."""
    return {"spec": corpus.spec, "kind": corpus.kind, "text_field": corpus.text_field,
            "parts": [asdict(p) for p in corpus.parts]}

