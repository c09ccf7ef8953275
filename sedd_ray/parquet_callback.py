"""A study's trials into Parquet while it runs: the Ray Tune callback on the driver.

:class:`ParquetCallback` keeps one row per trial in ``trials.parquet`` and appends every
reported step to ``history/`` (:mod:`sedd_ray.results`). Metrics flow through without a
list to edit: every numeric key of a Tune result (Tune's own bookkeeping keys aside,
:data:`TUNE_KEYS`) becomes a history value and, with its last value, a value of the
trial's row. Keys that are columns of the fixed schemas land in them; any other lands in
the row's ``extra`` and reaches :func:`sedd_ray.results.read_trials` /
:func:`~sedd_ray.results.read_history` as a typed column of its own. A few trial
columns are derived rather than copied (:data:`DERIVED`): the best and the final
``val_nll``, the perplexity bound, the bound gap and the driver's wall time. ``val_nll`` is
the final evaluation (``val_nll_final``, the trainer's final row) once the trial has one,
else the best periodic evaluation; ``data_identity`` (a string) is copied too. The study's
bookkeeping keys of a trial's config become the ``level``, ``phase`` (``"tune"`` or
``"replicate"``) and ``replicate_of`` columns (:func:`sedd_ray.study.trial_phase`).

Resume: a restored study (the driver restarted) starts this callback afresh; the first
time it sees a trial it takes the trial's start time and best ``val_nll`` back from the
stored row, so neither restarts.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from sedd_ray import optuna_store
from sedd_ray.config import ConfigError
from sedd_ray.layout import StudyLayout
from sedd_ray.results import ResultsWriter, config_columns, trial_row_from_config
from sedd_ray.study import trial_params, trial_phase
from sedd_ray.values import perplexity

__all__ = ["DERIVED", "TUNE_KEYS", "ParquetCallback", "history_row", "merge_metrics",
           "metrics_of"]

# What Tune adds to every result (ids, clocks, hosts, counters): not metrics of the run.
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {
    "done", "trial_id", "experiment_id", "experiment_tag", "should_checkpoint"}
# Trial columns derived from the metrics (merge_metrics) instead of copied from them.
DERIVED = frozenset({"val_nll", "val_nll_stderr", "best_val_nll", "final_val_nll",
                     "val_ppl_bound", "bound_gap", "wall_time_s", "device_hours", "tokens"})


def metrics_of(result: Mapping[str, Any]) -> dict[str, int | float]:
    """Every numeric value of a Tune result (bools, None and text aside), Tune's keys aside."""
    return {k: v for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def history_row(study: str, trial_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """One ``history/`` row: every metric of ``result`` (the trainer's log row)."""
    return {"study": study, "trial_id": trial_id, **metrics_of(result)}


def merge_metrics(row: dict[str, Any], result: Mapping[str, Any], started: float | None,
                  keep: frozenset[str] = frozenset()) -> None:
    """Fold one result into a trial's row: each metric's last value (``tokens`` as
    ``tokens_seen``; names in ``keep``, the config columns, are never overwritten: the
    trainer's ``lr`` metric is the schedule's value, not the configured one), then the
    derived columns."""
    metrics = metrics_of(result)
    row.update({k: v for k, v in metrics.items() if k not in DERIVED and k not in keep})
    if "tokens" in metrics:
        row["tokens_seen"] = metrics["tokens"]
    nll = metrics.get("val_nll")
    final = metrics.get("val_nll_final")  # the trainer's final row: its val_nll is this
    if isinstance(result.get("data_identity"), str):
        row["data_identity"] = result["data_identity"]
    if nll is not None and math.isfinite(nll):
        row["val_nll_stderr"] = metrics.get("val_nll_stderr")
        best = row.get("best_val_nll")
        periodic = nll if final is None else metrics.get("val_nll_best")
        if final is None:
            row["final_val_nll"] = nll  # the last periodic evaluation
        if periodic is not None and (best is None or periodic < best):
            row["best_val_nll"] = periodic
            row["best_val_nll_stderr"] = metrics.get("val_nll_stderr") if final is None else None
        row["val_nll"] = final if final is not None else row["best_val_nll"]
        row["val_ppl_bound"] = perplexity(row["val_nll"])
        if row.get("true_nll") is not None:
            row["bound_gap"] = row["val_nll"] - row["true_nll"]
    if result.get("checkpoint_path"):
        row["checkpoint_path"] = result["checkpoint_path"]
    if started is not None:
        row["wall_time_s"] = time.time() - started
        row["device_hours"] = row["wall_time_s"] / 3600 * row.get("devices", 1)


class ParquetCallback(Callback):
    """Writes ``trials.parquet`` and ``history/`` of ``spec`` (a StudySpec) under
    ``storage`` while Tune runs it. Needs no cluster: Tune calls the ``on_trial_*``
    hooks with its ``Trial`` objects (``trial_id``, ``config``, ``last_result``,
    ``error_msg``/``error_file``), and anything with those attributes will do."""

    def __init__(self, spec: Any, storage: str) -> None:
        self.spec, self.storage = spec, storage
        self.layout = StudyLayout(storage, spec.name)
        self.writer: ResultsWriter | None = None
        self.started: dict[str, float] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.config_columns = frozenset(config_columns().values())

    def _w(self) -> ResultsWriter:
        if self.writer is None:  # lazily, so a restored study reloads existing rows
            self.writer = ResultsWriter(self.storage, self.spec.name)
        return self.writer

    def _resumed(self, trial_id: str) -> dict[str, Any]:
        """The bookkeeping of a trial: on first sight, what its stored row already says
        (a restored study), so its start time and best val_nll carry on."""
        if trial_id not in self.rows:
            stored = next((r for r in self._w().trials() if r["trial_id"] == trial_id), {})
            self.rows[trial_id] = {k: stored[k] for k in ("best_val_nll",)
                                   if stored.get(k) is not None}
            if stored.get("start_time") is not None:
                self.started.setdefault(trial_id, stored["start_time"].timestamp())
        return self.rows[trial_id]

    def _row(self, trial: Any, status: str, error: str | None = None) -> dict[str, Any]:
        spec = self.spec
        params = trial_params(trial.config)
        row = self._resumed(trial.trial_id)
        try:
            row.update(trial_row_from_config(spec.trial_config(params)))
        except ConfigError as e:
            row.update({k: v for k, v in params.items() if isinstance(v, (int, float, str))})
            error = error or str(e)
        row.update(study=spec.name, trial_id=trial.trial_id, status=status, error=error,
                   ablated_axis=spec.ablate, level=trial.config.get("level"),
                   phase=trial_phase(trial.config), replicate_of=trial.config.get("replicate_of"),
                   devices=spec.num_workers * (spec.gpus_per_worker or 1), **_versions())
        return row

    def _merge(self, row: dict[str, Any], trial_id: str, result: Mapping[str, Any]) -> None:
        merge_metrics(row, result, self.started.get(trial_id), keep=self.config_columns)

    def _write(self, row: dict[str, Any], backfill: bool = False) -> None:
        self._w().upsert_trial(row)
        if backfill:
            self._backfill_history(row["trial_id"])
        self._w().flush()
        optuna_store.mirror_row(self.storage, self.spec, row, finished=backfill)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._resumed(trial.trial_id)
        self.started.setdefault(trial.trial_id, time.time())
        row = self._row(trial, "running")
        row["start_time"] = _utc(self.started[trial.trial_id])
        self._write(row)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial, "running")
        self._merge(row, trial.trial_id, result)
        step = history_row(self.spec.name, trial.trial_id, result)
        if not result.get("summary") and "step" in step:
            self._w().append_history(trial.trial_id, [step])
        self._write(row)
        optuna_store.mirror_result(self.storage, self.spec, row, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial, "terminated")
        self._merge(row, trial.trial_id, trial.last_result or {})
        if (row.get("step") or 0) < (row.get("steps") or 0):
            row["status"] = "stopped_early"
        row["end_time"] = _utc(time.time())
        self._write(row, backfill=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial, "error", error=trial_error(trial))
        self._merge(row, trial.trial_id, trial.last_result or {})
        row["end_time"] = _utc(time.time())
        self._write(row, backfill=True)

    def _backfill_history(self, trial_id: str) -> None:
        """Steps a killed driver never recorded (between the checkpoint a resumed trial
        restarted from and the crash), and rows never reported to Tune, are in the
        trial's own metrics.jsonl; the writer keeps one row per (trial, step), so
        re-adding every step is safe. Local storage only."""
        files = self.layout.trial(trial_id).trainer_files()
        if files is None or not files.metrics.is_file():
            return
        rows = []
        try:
            for line in files.metrics.read_text().splitlines():
                try:
                    rows.append(history_row(self.spec.name, trial_id, json.loads(line)))
                except ValueError:  # a line cut short by a crash
                    continue
            self._w().append_history(trial_id, [r for r in rows if "step" in r])
        except Exception as e:  # noqa: BLE001 - the trial's own row is already written
            print(f"warning: history of trial {trial_id} not completed from "
                  f"{files.metrics}: {e}", file=sys.stderr)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


_VERSIONS: dict[str, str] = {}


def _versions() -> dict[str, str]:
    """git_sha, torch_version and ray_version of this driver (computed once)."""
    if not _VERSIONS:
        import subprocess

        import ray
        import torch

        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
        _VERSIONS.update(git_sha=sha or "unknown", torch_version=torch.__version__,
                         ray_version=ray.__version__)
    return dict(_VERSIONS)


def trial_error(trial: Any) -> str:
    """The one line that says why a trial failed (its error message or error file)."""
    msg = getattr(trial, "error_msg", None)
    if msg:
        return last_error_line(msg)
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            return last_error_line(Path(path).read_text())
    except OSError:
        pass
    return "trial failed (no error text recorded)"


def last_error_line(text: str) -> str:
    """The meaningful line of a (possibly nested) Ray traceback: the last exception line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln[:2000]
    return (lines[-1] if lines else str(text))[:2000]
