"""Parquet results of sedd-ray studies: the only reader and writer of them.

Layout (spelled in :class:`sedd_ray.layout.StudyLayout`), one folder per study under a
storage root (a local path or a URI that ``pyarrow.fs`` understands, e.g.
``s3://bucket/studies``; see :mod:`sedd_ray.io`)::

    <storage>/<study>/trials.parquet                        one row per trial, rewritten whole
    <storage>/<study>/history/part-<trial_id>-<seq>.parquet  per-step metrics, append-only parts

Every file is written (:func:`sedd_ray.io.atomic_write`) under a temporary name that starts with ``.`` and ends with
``.tmp`` in the same folder, then renamed into place (``os.replace`` locally, ``move``
on other filesystems). pyarrow's dataset discovery skips names starting with ``.`` or
``_`` (its default ``ignore_prefixes``) and a ``*.parquet`` glob (duckdb) skips ``.tmp``,
so no reader ever finds a half-written file under a name it would take::

    read_trials(storage, study), read_history(storage, study)    # safe at any moment
    pq.ParquetFile("<storage>/<study>/trials.parquet").read()    # safe at any moment
    pd.read_parquet("<storage>/<study>/history")                 # safe; raw parts, no dedup
    pd.read_parquet("<storage>/<study>/trials.parquet")          # safe once the study is done

One caveat, pyarrow's and not ours: ``pq.read_table(file)`` (so ``pd.read_parquet(file)``)
opens a single file twice, reading the footer from the first open and the pages from
the second; if the writer renames a new version in between, that read fails with an
``OSError`` (never returns wrong data). History parts are never rewritten, so only
``trials.parquet`` of a running study is affected: read it with :func:`read_trials` or
``pq.ParquetFile`` (one open handle), or retry.

Each table has ONE fixed, explicit schema (:data:`TRIALS_SCHEMA`, :data:`HISTORY_SCHEMA`);
nothing is inferred, so parts always read together. The config columns of the trials
table are derived from the :mod:`sedd_ray.config` dataclasses (see :func:`config_columns`):
a new config field becomes a typed column with no change here.

Keys outside the schema (a metric the trainer started logging, a knob of a component
registered from outside, e.g. ``diffusion.eps`` -> ``diffusion_eps``) are never dropped and
never change a file's schema: they are kept in the row's ``extra`` JSON, and
:func:`read_trials`, :func:`read_history`, :func:`get_trial` and :func:`best_trial` return
each of them as a typed column of its own (int64, float64, bool or string, from its values;
see :func:`with_extra_columns`).

Column naming for config fields (``section.key`` -> column):

- the section is dropped: ``optim.lr`` -> ``lr``, ``train.steps`` -> ``steps`` (planned steps;
  ``step`` is the last step reached);
- ``model.name`` -> ``model`` (the model size name);
- a key that appears in two sections, or that equals a result column (``status``,
  ``step``, ``val_nll``...), keeps its section as a prefix in EVERY section it appears
  in: a ``data.seed`` next to ``train.seed`` gives ``data_seed`` and ``train_seed``.

This module imports neither Ray nor torch (``experiments/`` analyse through it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import threading
import time
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sedd_ray.config import RunConfig
from sedd_ray.io import atomic_write, filesystem
from sedd_ray.layout import StudyLayout
from sedd_ray.values import coerce

__all__ = [
    "EVALS_SCHEMA",
    "FINISHED_STATUSES",
    "HISTORY_SCHEMA",
    "STATUSES",
    "TRIALS_SCHEMA",
    "ResultsError",
    "ResultsWriter",
    "BLOCKS_SCHEMA",
    "append_evals",
    "best_trial",
    "config_columns",
    "get_trial",
    "list_studies",
    "read_blocks",
    "read_evals",
    "read_history",
    "read_trials",
    "resolve_study",
    "same_data_identity",
    "scrub",
    "trial_row_from_config",
    "trials_schema",
    "with_extra_columns",
    "write_blocks",
]


class ResultsError(ValueError):
    """Results are missing, ambiguous or a value does not fit its column; says what to do."""


STATUSES = ("running", "terminated", "stopped_early", "error")
# Trials whose metrics are final: trained to the end, or stopped by the scheduler.
FINISHED_STATUSES = ("terminated", "stopped_early")

REDACTED = "***"

_UTC_US = pa.timestamp("us", tz="UTC")

# --- schemas ---------------------------------------------------------------------------------

# Trials columns before and after the config block (the config block is derived).
_TRIALS_HEAD: list[pa.Field] = [
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("ablated_axis", pa.string()),
    pa.field("level", pa.string()),
    # Which phase of a study ran the trial (study.PHASES: "tune" | "replicate") and, for a
    # replicate, the id of the tuning trial whose config it re-runs with a fresh seed.
    pa.field("phase", pa.string()),
    pa.field("replicate_of", pa.string()),
]
_TRIALS_TAIL: list[pa.Field] = [
    pa.field("n_params", pa.int64()),
    pa.field("n_params_non_embedding", pa.int64()),
    pa.field("step", pa.int64()),  # last step reached
    pa.field("tokens_seen", pa.int64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("device_hours", pa.float64()),
    pa.field("final_val_nll", pa.float64()),
    pa.field("best_val_nll", pa.float64()),
    # val_nll: = val_nll_final on a trial that ran to its end (the trainer's final row);
    # = best_val_nll (the best periodic evaluation) while running or when stopped early
    pa.field("val_nll", pa.float64()),
    pa.field("val_ppl_bound", pa.float64()),
    pa.field("val_nll_stderr", pa.float64()),
    # the final evaluation of the final EMA weights on the study-common blocks and draws
    # (train.final_eval_sequences x final_eval_draws, seeded by eval_seed): the trial's number
    pa.field("val_nll_final", pa.float64()),
    pa.field("val_nll_final_stderr", pa.float64()),
    pa.field("val_nll_best", pa.float64()),  # the best periodic evaluation (curves, ASHA)
    pa.field("data_identity", pa.string()),  # sedd_ray.data.data_identity: compare only equal
    pa.field("test_nll", pa.float64()),
    pa.field("test_ppl_bound", pa.float64()),
    pa.field("test_nll_stderr", pa.float64()),
    pa.field("true_nll", pa.float64()),  # synthetic sources only
    pa.field("bound_gap", pa.float64()),  # synthetic sources only
    pa.field("checkpoint_path", pa.string()),
    pa.field("git_sha", pa.string()),
    pa.field("torch_version", pa.string()),
    pa.field("ray_version", pa.string()),
    pa.field("start_time", _UTC_US),
    pa.field("end_time", _UTC_US),
    pa.field("extra", pa.string()),  # JSON object of every other key; "{}" when none
]

HISTORY_SCHEMA = pa.schema(
    [
        pa.field("study", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64()),
        pa.field("train_loss", pa.float64()),
        pa.field("val_nll", pa.float64()),
        pa.field("val_nll_stderr", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("grad_norm", pa.float64()),
        pa.field("tokens_per_s", pa.float64()),
        pa.field("time_s", pa.float64()),
        pa.field("timestamp", _UTC_US),
        pa.field("extra", pa.string()),
    ],
    metadata={"sedd_ray.table": "history", "sedd_ray.schema_version": "1"},
)

# Config keys whose column name is chosen by hand.
_CONFIG_ALIASES = {"model.name": "model", "data.split_seed": "data_split_seed"}
_RESERVED = {f.name for f in _TRIALS_HEAD + _TRIALS_TAIL} | set(_CONFIG_ALIASES.values())


@dataclass(frozen=True)
class _TrialsLayout:
    schema: pa.Schema
    config_columns: dict[str, str]  # flat config key "section.key" -> column
    kinds: dict[str, str]  # column -> int | float | bool | str | json | timestamp


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> X; ``Literal["a", "b"]`` -> str (the type of its values)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap_optional(args[0])
    if origin is typing.Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        if len(kinds) == 1:
            return kinds.pop()
    return tp


def _config_leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``(flat key, python type)`` for every scalar field, walking nested dataclasses."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is dict:  # a component's parameters: see _COMPONENT_LEAVES
            continue
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.extend(_config_leaves(tp, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, tp))
    return out


_PY_TO_ARROW = {
    bool: ("bool", pa.bool_()),
    int: ("int", pa.int64()),
    float: ("float", pa.float64()),
    str: ("str", pa.string()),
}


def _kind_of(arrow_type: pa.DataType) -> str:
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_timestamp(arrow_type):
        return "timestamp"
    return "str"


# The built-in graphs' and noises' parameters (``RunConfig.flat()`` spells them
# ``diffusion.noise_params.<name>``) as fixed, typed columns, so the columns the studies
# compare stay stable; a component registered from outside lands its parameters in typed
# extra columns instead (results never imports the math, so it cannot ask the registry).
_COMPONENT_LEAVES = (
    ("diffusion.noise_params.sigma_min", float),  # geometric
    ("diffusion.noise_params.sigma_max", float),  # geometric
    ("diffusion.noise_params.eps", float),  # loglinear
)


@functools.cache
def _layout(config_cls: type) -> _TrialsLayout:
    leaves = _config_leaves(config_cls)
    if any(k.startswith("diffusion.") for k, _ in leaves):
        leaves += [leaf for leaf in _COMPONENT_LEAVES if leaf[0] not in dict(leaves)]
    leaf_count: dict[str, int] = {}
    for key, _ in leaves:
        leaf_count[key.rsplit(".", 1)[-1]] = leaf_count.get(key.rsplit(".", 1)[-1], 0) + 1
    cols: dict[str, str] = {}
    fields: list[pa.Field] = []
    kinds: dict[str, str] = {}
    for key, tp in leaves:
        leaf = key.rsplit(".", 1)[-1]
        if key in _CONFIG_ALIASES:
            col = _CONFIG_ALIASES[key]
        elif "." in key and (leaf_count[leaf] > 1 or leaf in _RESERVED):
            col = key.replace(".", "_")
        else:
            col = leaf
        if col in kinds or (col in _RESERVED and key not in _CONFIG_ALIASES):
            raise TypeError(
                f"config field {key!r} maps to column {col!r}, which is already taken; add an "
                "entry to sedd_ray.results._CONFIG_ALIASES"
            )
        # Non-scalar config types (lists, dicts) are stored as a JSON string column.
        kind, arrow_type = _PY_TO_ARROW.get(tp, ("json", pa.string()))
        cols[key] = col
        kinds[col] = kind
        fields.append(pa.field(col, arrow_type))
    for f in _TRIALS_HEAD + _TRIALS_TAIL:
        kinds[f.name] = _kind_of(f.type)
    schema = pa.schema(
        _TRIALS_HEAD + fields + _TRIALS_TAIL,
        metadata={"sedd_ray.table": "trials", "sedd_ray.schema_version": "1"},
    )
    return _TrialsLayout(schema=schema, config_columns=cols, kinds=kinds)


def trials_schema(config_cls: type = RunConfig) -> pa.Schema:
    """The trials table schema for a run-config dataclass (default :class:`RunConfig`)."""
    return _layout(config_cls).schema


def config_columns(config_cls: type = RunConfig) -> dict[str, str]:
    """Flat config key (``"optim.lr"``) -> trials column (``"lr"``), in schema order."""
    return dict(_layout(config_cls).config_columns)


TRIALS_SCHEMA = trials_schema()
_HISTORY_KINDS = {f.name: _kind_of(f.type) for f in HISTORY_SCHEMA}

# --- secrets ---------------------------------------------------------------------------------

# A wandb API key: 40 hex characters not inside a longer hex run.
_HEX40 = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{40}(?![0-9A-Fa-f])")
# Env var names that hold secrets: HF_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY...
_SECRET_ENV = re.compile(
    r"(^|_)(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)",
    re.IGNORECASE,
)


def _env_secrets() -> list[str]:
    """Values of WANDB_API_KEY and other secret-looking env vars (>= 8 chars), longest first."""
    vals = {
        v
        for k, v in os.environ.items()
        if (k == "WANDB_API_KEY" or _SECRET_ENV.search(k)) and len(v) >= 8
    }
    return sorted(vals, key=len, reverse=True)


def _scrub(value: Any, secrets: list[str], hex40: bool) -> Any:
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return _HEX40.sub(REDACTED, value) if hex40 else value
    if isinstance(value, Mapping):
        return {_scrub(k, secrets, hex40): _scrub(v, secrets, hex40) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_scrub(v, secrets, hex40) for v in value]
    return value


def scrub(value: Any) -> Any:
    """Replace secrets in ``value`` (str, or dict/list of them, recursively) with ``***``.

    Removes the value of ``WANDB_API_KEY`` (and of any env var whose name looks like a
    key, token, secret or password, 8+ characters) and anything that looks like a wandb
    key (40 hex characters). Applied to the ``error`` and ``extra`` columns; the exact
    env values are also removed from every other string column (not the 40-hex rule:
    ``git_sha`` is 40 hex characters).
    """
    return _scrub(value, _env_secrets(), hex40=True)


# --- coercion --------------------------------------------------------------------------------


def _is_null(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT


def _fail(col: str, value: Any, want: str) -> ResultsError:
    return ResultsError(
        f"column {col!r}: cannot store {value!r} ({type(value).__name__}) as {want}"
    )


def _scalar(col: str, value: Any, want: str) -> Any:
    """Unwrap numpy / torch scalars (anything with ``.item()``)."""
    try:
        return value.item()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        raise _fail(col, value, want) from None


def _to_int(col: str, v: Any) -> int:
    out = coerce(v, int, f"column {col!r}", ResultsError)
    if not -(2**63) <= out < 2**63:
        raise _fail(col, v, "int64 (out of range)")
    return out


def _to_float(col: str, v: Any) -> float:
    return coerce(v, float, f"column {col!r}", ResultsError)


def _to_bool(col: str, v: Any) -> bool:
    return coerce(v, bool, f"column {col!r}", ResultsError)


def _to_str(col: str, v: Any) -> str:
    if isinstance(v, str):
        return str(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (bool, int, float)):
        return str(v)
    if hasattr(v, "item"):
        return _to_str(col, _scalar(col, v, "string"))
    raise _fail(col, v, "string")


def _to_timestamp(col: str, v: Any) -> _dt.datetime | None:
    """datetime (naive = local time, Python's convention), epoch seconds, or ISO string."""
    if isinstance(v, pd.Timestamp):
        v = v.to_pydatetime()
    if isinstance(v, _dt.datetime):
        return v.astimezone(_dt.timezone.utc)
    if isinstance(v, bool):
        raise _fail(col, v, "timestamp")
    if isinstance(v, (int, float)):
        if math.isnan(v):
            return None
        return _dt.datetime.fromtimestamp(v, tz=_dt.timezone.utc)
    if isinstance(v, str):
        try:
            return _dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00")).astimezone(
                _dt.timezone.utc
            )
        except ValueError:
            raise _fail(col, v, "timestamp (ISO 8601)") from None
    try:
        return pd.Timestamp(v).to_pydatetime().astimezone(_dt.timezone.utc)  # np.datetime64
    except (TypeError, ValueError):
        raise _fail(col, v, "timestamp") from None


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, _dt.datetime):
        return v.isoformat()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _jsonable(dataclasses.asdict(v))
    if _is_null(v):
        return None
    if hasattr(v, "item"):
        try:
            return _jsonable(v.item())
        except (TypeError, ValueError, RuntimeError):
            pass  # a multi-element array: fall through to tolist / str
    if hasattr(v, "tolist"):
        return _jsonable(v.tolist())
    return str(v)


def _to_json(col: str, v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(_jsonable(v), sort_keys=True)


_COERCE = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": _to_str,
    "json": _to_json,
    "timestamp": _to_timestamp,
}


def _coerce(col: str, kind: str, v: Any) -> Any:
    if _is_null(v):
        return None
    if kind != "float" and isinstance(v, float) and math.isnan(v):
        return None
    return _COERCE[kind](col, v)


def _extra_dict(col_value: Any) -> dict[str, Any]:
    """An ``extra`` value given by the caller or read back: a dict or a JSON object string."""
    if _is_null(col_value):
        return {}
    if isinstance(col_value, Mapping):
        return dict(col_value)
    if isinstance(col_value, str):
        try:
            parsed = json.loads(col_value) if col_value.strip() else {}
        except json.JSONDecodeError:
            return {"extra": col_value}
        return parsed if isinstance(parsed, dict) else {"extra": parsed}
    raise _fail("extra", col_value, "a dict or a JSON object string")


def _dump_extra(extra: Mapping[str, Any], secrets: list[str]) -> str:
    return json.dumps(
        _scrub(_jsonable(extra), secrets, hex40=True), sort_keys=True, allow_nan=False
    )


# --- names, paths, filesystems ---------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ResultsError(
            f"invalid {what} {name!r}: use letters, digits and _ . = + - (not starting with "
            "'.', '_' or '-', no '..' and no '/')"
        )
    return name


def _exists(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def _write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f), fs=fs)


def _read_file(fs: pafs.FileSystem, path: str) -> pa.Table:
    """Read one Parquet file through ONE open handle.

    ``pq.read_table(path)`` (and so ``pd.read_parquet(path)``) opens a single file twice,
    footer first and pages second, reusing the first footer: a rename in between makes it
    fail ("Page was smaller than expected"). One handle always sees one version.
    """
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read()


def _study(storage: str | os.PathLike, study: str) -> tuple[pafs.FileSystem, StudyLayout]:
    """The filesystem of ``storage`` and the study's layout on it."""
    fs, root, _ = filesystem(storage)
    return fs, StudyLayout(root, _check_name("study name", study))


_PART = re.compile(StudyLayout.HISTORY_PART)


def _history_parts(fs: pafs.FileSystem, hist: str) -> list[tuple[str, int, str]]:
    """``(trial_id, seq, path)`` of every finished part, sorted by trial then seq."""
    infos = fs.get_file_info(pafs.FileSelector(hist, allow_not_found=True))
    parts = []
    for info in infos:
        m = _PART.fullmatch(info.base_name)
        if info.type == pafs.FileType.File and m:
            parts.append((m["trial"], int(m["seq"]), info.path))
    return sorted(parts)


def _typed_array(values: list[Any]) -> pa.Array:
    """Values of one ``extra`` key as the narrowest Arrow type that holds them all: int64,
    float64 (ints and floats mixed), bool or string; nested or mixed values as JSON text."""
    try:
        arr = pa.array(values, from_pandas=True)
        if not pa.types.is_nested(arr.type):
            return arr.cast(pa.float64()) if pa.types.is_null(arr.type) else arr
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values],
                    pa.string())


def with_extra_columns(table: pa.Table) -> pa.Table:
    """``table`` plus one typed column per key of its ``extra`` JSON (sorted by name, after
    the others; a key that is already a column is left in ``extra`` only). This is how
    a metric or config key outside the fixed schema reaches the readers."""
    if "extra" not in table.column_names or table.num_rows == 0:
        return table
    dicts = [_extra_dict(v) for v in table["extra"].to_pylist()]
    keys = sorted({k for d in dicts for k in d} - set(table.column_names))
    for key in keys:
        table = table.append_column(key, _typed_array([d.get(key) for d in dicts]))
    return table


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast to ``schema``: add missing columns as nulls; keep unknown columns at the end."""
    arrays, fields = [], []
    for f in schema:
        if f.name in table.column_names:
            col = table[f.name]
            try:
                arrays.append(col.cast(f.type) if col.type != f.type else col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ResultsError(
                    f"{where}: column {f.name!r} of type {col.type} cannot be read as {f.type}: {e}"
                ) from None
        else:
            arrays.append(pa.nulls(len(table), f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


# --- writer ----------------------------------------------------------------------------------


class ResultsWriter:
    """Writes one study's trials and history; used by the study's Tune callback (driver).

    - :meth:`upsert_trial` keeps exactly one row per ``trial_id`` and rewrites
      ``trials.parquet`` at once (atomically). Re-opening a study (resume) loads the
      existing rows, so they are kept and updated, never duplicated.
    - :meth:`append_history` buffers rows and writes a new part per trial when
      ``history_flush_rows`` rows are buffered or ``history_flush_s`` seconds passed since
      the last part, and on :meth:`flush` / :meth:`close`. Readers dedup history on
      ``(trial_id, step)`` keeping the last written, so a re-run trial counts each step once.

    One writer per study at a time; a lock makes it safe across the driver's threads.
    Unknown keys of a row go into its ``extra`` JSON; missing columns are null; values are
    coerced to the column type or a :class:`ResultsError` names the column.
    """

    def __init__(
        self,
        storage: str | os.PathLike,
        study: str,
        *,
        config_cls: type = RunConfig,
        history_flush_rows: int = 1000,
        history_flush_s: float = 60.0,
    ) -> None:
        self.study = _check_name("study name", study)
        self.storage = os.fspath(storage)
        self._fs, self._paths = _study(storage, study)
        self.path = self._paths.dir
        self.trials_path = self._paths.trials_file
        self.history_path = self._paths.history_dir
        self._layout = _layout(config_cls)
        self._config_cls = config_cls
        self._flush_rows = history_flush_rows
        self._flush_s = history_flush_s
        self._lock = threading.RLock()
        self._trials: dict[str, dict[str, Any]] = {}  # trial_id -> typed row, extra as dict
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._buffered = 0
        self._last_part = time.monotonic()
        self._fs.create_dir(self.history_path, recursive=True)
        self._next_seq: dict[str, int] = {}
        for trial, seq, _ in _history_parts(self._fs, self.history_path):
            self._next_seq[trial] = max(self._next_seq.get(trial, 0), seq + 1)
        if _exists(self._fs, self.trials_path) == pafs.FileType.File:
            self._load_trials()

    # -- trials --
    def _load_trials(self) -> None:
        table = _read_file(self._fs, self.trials_path)
        schema_names = set(self._layout.schema.names)
        for rec in table.to_pylist():
            extra = _extra_dict(rec.pop("extra", None))
            # Columns this schema no longer has (a removed config field) move into extra.
            for k in [k for k in rec if k not in schema_names]:
                v = rec.pop(k)
                if v is not None:
                    extra.setdefault(k, v)
            row = self._typed_trial(rec, secrets=[], where=self.trials_path)
            row["extra"] = extra
            self._trials[row["trial_id"]] = row

    def _typed_trial(
        self, row: Mapping[str, Any], secrets: list[str], where: str
    ) -> dict[str, Any]:
        """Coerce the known columns of ``row``; everything else goes to ``row['extra']``."""
        kinds = self._layout.kinds
        cfg_cols = self._layout.config_columns
        out: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in row.items():
            if key == "config":
                for col, v in trial_row_from_config(value, config_cls=self._config_cls).items():
                    (out if col in kinds else extra)[col] = v
            elif key == "extra":
                extra.update(_extra_dict(value))
            elif key in kinds:
                out[key] = _coerce(key, kinds[key], value)
            elif key in cfg_cols:
                col = cfg_cols[key]
                out[col] = _coerce(col, kinds[col], value)
            else:
                extra[key] = value
        for col, v in out.items():
            # Exact env secret values leave every string column; 40-hex runs only leave
            # `error` (git_sha is 40 hex characters).
            if (
                isinstance(v, str)
                and col not in ("study", "trial_id", "status")
                and (secrets or col == "error")
            ):
                out[col] = _scrub(v, secrets, hex40=col == "error")
        if "status" in out and out["status"] is not None:
            status = out["status"].lower()
            if status not in STATUSES:
                raise ResultsError(
                    f"{where}: column 'status' must be one of "
                    f"{', '.join(STATUSES)}; got {out['status']!r}"
                )
            out["status"] = status
        out["extra"] = extra
        return out

    def upsert_trial(self, row: Mapping[str, Any], *, merge: bool = True) -> dict[str, Any]:
        """Insert or update the row of ``row["trial_id"]`` and rewrite ``trials.parquet``.

        ``row`` maps column names (or flat config keys like ``"optim.lr"``) to values; a
        ``"config"`` key may hold a :class:`RunConfig` or its ``to_dict()``/``flat()``,
        expanded by :func:`trial_row_from_config`. With ``merge=True`` (default) the keys
        given replace those of the stored row and the others keep their values (``extra``
        is merged key by key); with ``merge=False`` the row is replaced whole. When
        ``val_nll`` is not given, it is set to ``val_nll_final``, else to ``best_val_nll``
        when one of them is given. Returns a
        copy of the stored row (``extra`` as a dict).
        """
        if "trial_id" not in row:
            raise ResultsError("upsert_trial needs a 'trial_id'")
        trial_id = _check_name("trial id", _to_str("trial_id", row["trial_id"]))
        if row.get("study", self.study) != self.study:
            raise ResultsError(
                f"row is for study {row['study']!r} but this writer writes study {self.study!r}"
            )
        new = self._typed_trial(row, secrets=_env_secrets(), where=f"trial {trial_id}")
        new["trial_id"], new["study"] = trial_id, self.study
        if new.get("val_nll") is None:  # the final evaluation, else the best periodic one
            for key in ("val_nll_final", "best_val_nll"):
                if new.get(key) is not None:
                    new["val_nll"] = new[key]
                    break
        with self._lock:
            old = self._trials.get(trial_id)
            if merge and old is not None:
                merged = {**old, **{k: v for k, v in new.items() if k != "extra"}}
                merged["extra"] = {**old["extra"], **new["extra"]}
            else:
                merged = {name: None for name in self._layout.schema.names} | new
            if merged.get("status") is None:
                raise ResultsError(
                    f"trial {trial_id}: column 'status' is required for a new "
                    f"trial; one of {', '.join(STATUSES)}"
                )
            self._trials[trial_id] = merged
            try:
                self._write_trials()
            except BaseException:  # keep memory and file in step; the caller sees the error
                if old is None:
                    del self._trials[trial_id]
                else:
                    self._trials[trial_id] = old
                raise
            return {**merged, "extra": dict(merged["extra"])}

    def _write_trials(self) -> None:
        secrets = _env_secrets()
        rows = [{**r, "extra": _dump_extra(r["extra"], secrets)} for r in self._trials.values()]
        table = pa.Table.from_pylist(rows, schema=self._layout.schema)
        _write_table(self._fs, self.trials_path, table)

    def trials(self) -> list[dict[str, Any]]:
        """Copies of the stored rows (``extra`` as a dict), in insertion order."""
        with self._lock:
            return [{**r, "extra": dict(r["extra"])} for r in self._trials.values()]

    # -- history --
    def append_history(self, trial_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Buffer per-step rows of one trial (each needs ``step``); see the class docstring."""
        trial_id = _check_name("trial id", trial_id)
        secrets = _env_secrets()
        typed = []
        for row in rows:
            out: dict[str, Any] = {"study": self.study, "trial_id": trial_id}
            extra: dict[str, Any] = {}
            for key, value in row.items():
                if key in ("study", "trial_id"):
                    if value != out[key]:
                        raise ResultsError(
                            f"history row has {key}={value!r}, expected {out[key]!r}"
                        )
                elif key == "extra":
                    extra.update(_extra_dict(value))
                elif key in _HISTORY_KINDS:
                    out[key] = _coerce(key, _HISTORY_KINDS[key], value)
                else:
                    extra[key] = value
            if out.get("step") is None:
                raise ResultsError(
                    f"history row of trial {trial_id} needs an integer 'step'; "
                    f"got keys {sorted(row)}"
                )
            out["extra"] = _dump_extra(extra, secrets)
            typed.append(out)
        with self._lock:
            self._history.setdefault(trial_id, []).extend(typed)
            self._buffered += len(typed)
            if (
                self._buffered >= self._flush_rows
                or time.monotonic() - self._last_part >= self._flush_s
            ):
                self._flush_history()

    def _flush_history(self) -> None:
        for trial_id in list(self._history):
            rows = self._history[trial_id]
            if rows:
                seq = self._next_seq.get(trial_id, 0)
                path = self._paths.history_part(trial_id, seq)
                _write_table(self._fs, path, pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA))
                self._next_seq[trial_id] = seq + 1
                self._buffered -= len(rows)
            del self._history[trial_id]
        self._last_part = time.monotonic()

    def flush(self) -> None:
        """Write buffered history parts (trials are written on every upsert already)."""
        with self._lock:
            self._flush_history()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- config -> columns -----------------------------------------------------------------------


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def trial_row_from_config(config: Any, *, config_cls: type = RunConfig) -> dict[str, Any]:
    """Typed config columns (``{"graph": "absorb", "lr": 3e-4, ...}``) of one run config.

    ``config`` is a :class:`RunConfig` (or an instance of ``config_cls``), its nested
    ``to_dict()``, or its ``flat()`` (``"section.key"`` keys). Dicts go through
    ``config_cls.from_dict``: unknown keys are errors and missing keys take the dataclass
    defaults (pass the full config of the run, not only the searched keys).
    """
    if isinstance(config, Mapping):
        nested = _unflatten(config) if any("." in k for k in config) else dict(config)
        config = config_cls.from_dict(nested)
    elif not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise ResultsError(
            f"config must be a {config_cls.__name__} or a dict, got {type(config).__name__}"
        )
    layout = _layout(config_cls)
    # flat(): the components' parameters resolved, defaults included
    flat = config.flat() if hasattr(config, "flat") else _flatten(dataclasses.asdict(config))
    out: dict[str, Any] = {}
    for key, col in layout.config_columns.items():
        out[col] = _coerce(col, layout.kinds[col], flat.get(key))
    out.update(_unknown_config(flat, layout))
    return out


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (every leaf; a non-empty dict is no leaf)."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _unknown_config(flat: Mapping[str, Any], layout: _TrialsLayout) -> dict[str, Any]:
    """Config leaves the dataclass annotations do not declare (a component registered
    from outside may add its own keys, e.g. ``diffusion.<param>``): column
    ``section_key``; they reach ``extra`` and come back typed from the readers."""
    known = layout.config_columns
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in known or any(key.startswith(k + ".") for k in known):
            continue
        col = key.replace(".", "_")
        out[key if col in layout.kinds else col] = value
    return out


# --- readers ---------------------------------------------------------------------------------


def list_studies(storage: str | os.PathLike) -> list[str]:
    """Names of the studies under ``storage`` (folders with trials or history), sorted."""
    fs, root, _ = filesystem(storage)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not _NAME.fullmatch(info.base_name):
            continue
        if (
            _exists(fs, StudyLayout(root, info.base_name).trials_file) == pafs.FileType.File
            or _exists(fs, StudyLayout(root, info.base_name).history_dir)
            == pafs.FileType.Directory
        ):
            out.append(info.base_name)
    return sorted(out)


def _no_study(storage: str | os.PathLike, study: str) -> ResultsError:
    studies = list_studies(storage)
    have = f"studies there: {', '.join(studies)}" if studies else "there are no studies there"
    return ResultsError(
        f"no study {study!r} under {os.fspath(storage)!r} ({have}); run a study "
        "with this storage first (sedd_ray.study) or pass an existing name"
    )


def resolve_study(storage: str | os.PathLike, study: str | None = None) -> str:
    """``study`` if it exists; when None, the only study under ``storage``; else an error."""
    if study is not None:
        _check_name("study name", study)
        if study not in list_studies(storage):
            raise _no_study(storage, study)
        return study
    studies = list_studies(storage)
    if len(studies) == 1:
        return studies[0]
    if not studies:
        raise ResultsError(
            f"no studies under {os.fspath(storage)!r}; run a study with this "
            "storage first (sedd_ray.study) or point to the right storage"
        )
    raise ResultsError(
        f"{len(studies)} studies under {os.fspath(storage)!r}: "
        f"{', '.join(studies)}; name one (--study NAME)"
    )


def _trials_table(storage: str | os.PathLike, study: str) -> pa.Table:
    fs, paths = _study(storage, study)
    file = paths.trials_file
    if _exists(fs, file) != pafs.FileType.File:
        if study in list_studies(storage):  # history only, no trial row yet
            return TRIALS_SCHEMA.empty_table()
        raise _no_study(storage, study)
    return with_extra_columns(_conform(_read_file(fs, file), TRIALS_SCHEMA, file))


def read_trials(storage: str | os.PathLike, study: str) -> pd.DataFrame:
    """One row per trial: the :data:`TRIALS_SCHEMA` columns, then any unknown ones, then
    one typed column per key of ``extra``."""
    return _trials_table(storage, study).to_pandas()


def read_history(
    storage: str | os.PathLike, study: str, trial_id: str | None = None
) -> pd.DataFrame:
    """Per-step rows, deduplicated on ``(trial_id, step)`` keeping the last written part.

    Sorted by trial_id then step. ``trial_id`` restricts the read to that trial's parts.
    Keys of ``extra`` (metrics outside :data:`HISTORY_SCHEMA`) come back as typed columns.
    """
    fs, paths = _study(storage, study)
    if study not in list_studies(storage):
        raise _no_study(storage, study)
    if trial_id is not None:
        _check_name("trial id", trial_id)
    parts = [
        p
        for t, _, p in _history_parts(fs, paths.history_dir)
        if trial_id is None or t == trial_id
    ]
    tables = []
    if parts:
        dataset = pads.dataset(parts, schema=HISTORY_SCHEMA, format="parquet", filesystem=fs)
        order = {p: i for i, p in enumerate(parts)}
        frags = sorted(dataset.get_fragments(), key=lambda fr: order[fr.path])
        tables = [fr.to_table(schema=HISTORY_SCHEMA) for fr in frags]
    table = pa.concat_tables(tables) if tables else HISTORY_SCHEMA.empty_table()
    df = with_extra_columns(table).to_pandas()
    df = df.drop_duplicates(subset=["trial_id", "step"], keep="last")
    return df.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)


def _row_dict(table: pa.Table, i: int) -> dict[str, Any]:
    return table.slice(i, 1).to_pylist()[0]


def get_trial(storage: str | os.PathLike, study: str, trial_id: str) -> dict[str, Any]:
    """The row of one trial as a dict of Python values; unknown ids list some valid ones."""
    _check_name("trial id", trial_id)
    table = _trials_table(storage, study)
    ids = table["trial_id"].to_pylist()
    if trial_id not in ids:
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        raise ResultsError(
            f"no trial {trial_id!r} in study {study!r}; "
            + (f"valid ids: {shown}" if ids else "the study has no trials yet")
        )
    return _row_dict(table, ids.index(trial_id))


def best_trial(
    storage: str | os.PathLike, study: str, metric: str = "val_nll", mode: str = "min"
) -> dict[str, Any]:
    """The finished trial (terminated or stopped_early) with the best finite ``metric``."""
    if mode not in ("min", "max"):
        raise ResultsError(f"mode must be 'min' or 'max', got {mode!r}")
    table = _trials_table(storage, study)
    if metric not in table.column_names or not (
        pa.types.is_integer(table.schema.field(metric).type)
        or pa.types.is_floating(table.schema.field(metric).type)
    ):
        numeric = [
            f.name
            for f in table.schema
            if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        ]
        raise ResultsError(
            f"unknown or non-numeric metric {metric!r}; numeric columns: {', '.join(numeric)}"
        )
    statuses = table["status"].to_pylist()
    values = table[metric].to_pylist()
    best_i = None
    for i, (s, v) in enumerate(zip(statuses, values)):
        if s not in FINISHED_STATUSES or v is None or not math.isfinite(v):
            continue
        if best_i is None or (v < values[best_i] if mode == "min" else v > values[best_i]):
            best_i = i
    if best_i is None:
        counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
        seen = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"
        raise ResultsError(
            f"no finished trial with a finite {metric!r} in study {study!r} "
            f"({seen}); let a study run to completion (sedd_ray.study) first"
        )
    return _row_dict(table, best_i)


# --- per-block values of the final evaluation --------------------------------------------------

# One small file per trial, next to the trainer's final.json (TrainerFiles.final_blocks).
BLOCKS_SCHEMA = pa.schema(
    [pa.field("block", pa.int64(), nullable=False),  # index into the validation split
     pa.field("nll", pa.float64(), nullable=False)],  # nats/token, mean over the draws
    metadata={"sedd_ray.table": "blocks", "sedd_ray.schema_version": "1"},
)


def write_blocks(path: str | os.PathLike, blocks: Iterable[int], nll: Iterable[float], *,
                 meta: Mapping[str, Any] | None = None) -> None:
    """Write one trial's per-block values (``blocks`` and ``nll`` of equal length) to
    ``path`` (local or a URI), atomically: a reader sees the old file or the whole new
    one. ``meta`` (JSON: data_identity, eval_seed, draws, ...) goes into the schema's
    metadata as ``sedd_ray.meta``."""
    ids = [int(b) for b in blocks]
    values = [float(v) for v in nll]
    if len(ids) != len(values):
        raise ResultsError(f"write_blocks needs one nll per block, got {len(ids)} blocks "
                           f"and {len(values)} values")
    schema = BLOCKS_SCHEMA.with_metadata({**BLOCKS_SCHEMA.metadata,
                                          b"sedd_ray.meta": json.dumps(_jsonable(meta or {}))})
    table = pa.Table.from_pydict({"block": ids, "nll": values}, schema=schema)
    fs, where, _ = filesystem(path)
    _write_table(fs, where, table)


def read_blocks(storage: str | os.PathLike, study: str) -> pd.DataFrame:
    """Every trial's final-evaluation values: DataFrame ``[trial_id, block, nll]`` sorted
    by trial then block. Trials of ``trials.parquet`` without the file (not finished, or
    run on remote storage, where the trainer's folder is a worker's temporary one) are
    absent. Pair two trials on ``block``: every trial of a study has the same blocks and
    draws (``eval_seed``), whatever its training seed or number of ranks."""
    layout = StudyLayout(storage, study)
    frames = []
    for trial_id in read_trials(storage, study)["trial_id"]:
        files = layout.trial(trial_id).trainer_files()
        if files is None or not files.final_blocks.is_file():
            continue
        df = _read_file(pafs.LocalFileSystem(), str(files.final_blocks)).to_pandas()
        frames.append(df.assign(trial_id=trial_id)[["trial_id", "block", "nll"]])
    if not frames:
        return pd.DataFrame({"trial_id": pd.Series(dtype=str), "block": pd.Series(dtype="int64"),
                             "nll": pd.Series(dtype="float64")})
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["trial_id", "block"], kind="stable").reset_index(drop=True)


def same_data_identity(trials: pd.DataFrame) -> str:
    """The one ``data_identity`` of ``trials`` (null values, e.g. of unfinished trials,
    ignored; "" when none is known); raises :class:`ResultsError` (a ValueError) when they
    differ: their nats/token were measured on different data and do not compare."""
    if "data_identity" not in trials.columns:
        return ""
    values = trials["data_identity"].dropna()
    counts = values.value_counts()
    if len(counts) > 1:
        seen = ", ".join(f"{k}: {n} trial{'s' * (n != 1)}" for k, n in counts.items())
        raise ResultsError(
            f"trials were measured on different data (data_identity {seen}): compare trials "
            "of one data identity (the same corpus, data.split_seed, fractions and tokenizer)"
        )
    return str(counts.index[0]) if len(counts) else ""
# --- evaluations (sedd_ray.evaluate) ---------------------------------------------------------

# One row per (checkpoint, corpus, metric, settings). ``settings`` is a JSON object of what
# decides the number (draws, blocks, seed, seq_len, detokeniser, sampler, eval LM ...) and
# ``settings_key`` its hash: a row is "done" when (checkpoint, corpus, settings_key, metric)
# is present. ``reference`` is the exact value the metric is compared with, where one is
# known (a synthetic source's entropy per token), else null.
EVALS_SCHEMA = pa.schema(
    [
        pa.field("study", pa.string()),
        pa.field("trial_id", pa.string()),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("stderr", pa.float64()),
        pa.field("n", pa.int64()),  # blocks (bound) or samples (quality) behind the value
        pa.field("unit", pa.string()),
        pa.field("reference", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("eval_lm", pa.string()),
        pa.field("settings", pa.string(), nullable=False),
        pa.field("settings_key", pa.string(), nullable=False),
        pa.field("wall_time_s", pa.float64()),
        pa.field("created_at", _UTC_US),
    ],
    metadata={"sedd_ray.table": "evals", "sedd_ray.schema_version": "1"},
)
EVALS_KEY = ("checkpoint", "corpus", "settings_key", "metric")


def _evals_table(path: str | os.PathLike) -> pa.Table:
    fs, where, _ = filesystem(path)
    if _exists(fs, where) != pafs.FileType.File:
        return EVALS_SCHEMA.empty_table()
    return _conform(_read_file(fs, where), EVALS_SCHEMA, where).select(EVALS_SCHEMA.names)


def read_evals(path: str | os.PathLike) -> pd.DataFrame:
    """Every row of an ``evals.parquet`` (:data:`EVALS_SCHEMA`); empty if there is none."""
    return _evals_table(path).to_pandas()


def append_evals(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Add ``rows`` to the ``evals.parquet`` at ``path``; returns how many were new.

    A row whose :data:`EVALS_KEY` is already in the file is skipped (a rerun adds
    nothing). The whole file is rewritten atomically (one writer at a time: the driver of
    ``sedd_ray.evaluate``), so a reader sees the old rows or all of the new ones.
    """
    fs, where, _ = filesystem(path)
    old = _evals_table(path)
    seen = set(zip(*(old[k].to_pylist() for k in EVALS_KEY)))
    new = []
    for row in rows:
        key = tuple(row[k] for k in EVALS_KEY)
        if key in seen:
            continue
        seen.add(key)
        unknown = set(row) - set(EVALS_SCHEMA.names)
        if unknown:
            raise ResultsError(f"evals row has unknown columns {sorted(unknown)}; "
                               f"columns: {', '.join(EVALS_SCHEMA.names)}")
        kinds = {f.name: _kind_of(f.type) for f in EVALS_SCHEMA}
        new.append({c: _coerce(c, kinds[c], row.get(c)) for c in EVALS_SCHEMA.names})
    if not new:
        return 0
    added = pa.Table.from_pylist(new, schema=EVALS_SCHEMA)
    _write_table(fs, where, pa.concat_tables([old.cast(EVALS_SCHEMA), added]))
    return len(new)
