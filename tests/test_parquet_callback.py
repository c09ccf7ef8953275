"""The study's Parquet callback, driven by fake Tune trials (no Ray cluster): best-value
tracking, resume bookkeeping, history rows, and a metric that flows through untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import tiny_config

from sedd_ray.layout import StudyLayout
from sedd_ray.parquet_callback import (
    TUNE_KEYS,
    ParquetCallback,
    history_row,
    last_error_line,
    merge_metrics,
    metrics_of,
)
from sedd_ray.results import read_history, read_trials
from sedd_ray.study import StudySpec
from sedd_ray.trainer import Trainer

STUDY = "cb"
# What Tune adds to every result it hands a callback (never metrics of the run).
TUNE_EXTRAS = {"training_iteration": 3, "time_total_s": 1.5, "time_this_iter_s": 0.5,
               "timestamp": 1_700_000_000, "pid": 123, "done": False, "trial_id": "t1",
               "iterations_since_restore": 3, "hostname": "h", "date": "2026-01-01"}


def _spec(steps: int = 40) -> StudySpec:
    return StudySpec(name=STUDY, base="tiny", fixed={"steps": steps}).validate()


def _trial(trial_id: str = "t1", **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 1e-3, "seed": 0, **config},
                           last_result={}, error_msg=None, error_file=None)


def _result(trial: SimpleNamespace, cb: ParquetCallback, **metrics) -> None:
    trial.last_result = {**TUNE_EXTRAS, **metrics}
    cb.on_trial_result(0, [], trial, trial.last_result)


def _row(storage, trial_id: str = "t1") -> dict:
    df = read_trials(storage, STUDY)
    return df[df["trial_id"] == trial_id].iloc[0].to_dict()


# --- pure functions --------------------------------------------------------------------------

def test_metrics_of_keeps_every_number_but_tunes_own_keys():
    result = {**TUNE_EXTRAS, "step": 5, "train_loss": 2.5, "brand_new": 7, "final": True,
              "checkpoint_path": "/x", "val_nll_stderr": None}
    assert metrics_of(result) == {"step": 5, "train_loss": 2.5, "brand_new": 7}
    assert {"training_iteration", "time_total_s", "timestamp", "pid", "done"} <= TUNE_KEYS
    assert history_row("s", "t", result) == {"study": "s", "trial_id": "t", "step": 5,
                                             "train_loss": 2.5, "brand_new": 7}


def test_merge_tracks_the_best_and_the_final_val_nll():
    row: dict = {"true_nll": 1.0}
    for nll, se in ((3.0, 0.3), (2.5, 0.2), (2.8, 0.1)):
        merge_metrics(row, {"step": 1, "val_nll": nll, "val_nll_stderr": se}, started=None)
    assert row["best_val_nll"] == row["val_nll"] == 2.5 and row["best_val_nll_stderr"] == 0.2
    assert row["final_val_nll"] == 2.8 and row["val_nll_stderr"] == 0.1
    assert row["val_ppl_bound"] == pytest.approx(math.exp(2.5))
    assert row["bound_gap"] == pytest.approx(1.5)  # from the best, not the last
    merge_metrics(row, {"step": 2, "val_nll": float("nan")}, started=None)
    assert row["val_nll"] == 2.5 and row["final_val_nll"] == 2.8  # a NaN is no evaluation


def test_merge_never_overwrites_a_config_column_and_renames_tokens():
    row = {"lr": 3e-4}
    merge_metrics(row, {"lr": 1e-6, "tokens": 640, "new_metric": 0.25}, started=None,
                  keep=frozenset({"lr"}))
    assert row["lr"] == 3e-4 and row["tokens_seen"] == 640 and row["new_metric"] == 0.25
    assert "tokens" not in row


def test_last_error_line_finds_the_exception_of_a_nested_traceback():
    text = ("Traceback (most recent call last):\n  File 'x'\nray.exceptions.RayTaskError: "
            "outer\n  more\nNonFiniteLossError: loss became non-finite at step 7\n")
    assert last_error_line(text) == "NonFiniteLossError: loss became non-finite at step 7"


# --- the callback -----------------------------------------------------------------------------

def test_callback_writes_rows_history_and_statuses(tmp_path):
    cb = ParquetCallback(_spec(steps=40), str(tmp_path))
    ok, short = _trial("t1"), _trial("t2", lr=2e-3)
    for trial in (ok, short):
        cb.on_trial_start(0, [], trial)
    assert set(read_trials(tmp_path, STUDY)["status"]) == {"running"}
    for step, nll in ((20, 3.0), (40, 2.0)):
        _result(ok, cb, step=step, tokens=step * 8, train_loss=nll + 1, lr=1e-6,
                val_nll=nll, val_nll_stderr=0.1, my_gauge=step / 10)
    _result(short, cb, step=20, val_nll=4.0, train_loss=5.0)
    cb.on_trial_complete(0, [], ok)
    cb.on_trial_complete(0, [], short)
    row, early = _row(tmp_path, "t1"), _row(tmp_path, "t2")
    assert row["status"] == "terminated" and early["status"] == "stopped_early"
    assert row["val_nll"] == 2.0 and row["final_val_nll"] == 2.0 and row["step"] == 40
    assert row["lr"] == 1e-3 and early["lr"] == 2e-3  # the configured lr, not the schedule's
    assert row["tokens_seen"] == 320 and row["my_gauge"] == 4.0
    assert row["start_time"] <= row["end_time"] and row["wall_time_s"] >= 0
    hist = read_history(tmp_path, STUDY)
    t1 = hist[hist["trial_id"] == "t1"]
    assert list(t1["step"]) == [20, 40] and list(t1["my_gauge"]) == [2.0, 4.0]
    assert list(t1["lr"]) == [1e-6, 1e-6]  # history keeps the schedule's value
    assert not {"training_iteration", "time_total_s", "pid"} & set(hist)


def test_an_errored_trial_keeps_its_reason_and_its_curve_from_metrics_jsonl(tmp_path):
    cb = ParquetCallback(_spec(), str(tmp_path))
    trial = _trial()
    cb.on_trial_start(0, [], trial)
    files = StudyLayout(str(tmp_path), STUDY).trial("t1").trainer_files()
    files.root.mkdir(parents=True)
    lines = [json.dumps({"step": s, "train_loss": 1.0, "only_in_the_log": s}) for s in (5, 10)]
    files.metrics.write_text("\n".join(lines) + '\n{"step": 15, "train_lo')  # cut by a crash
    trial.error_msg = "Traceback ...\nNonFiniteLossError: non-finite at step 12"
    cb.on_trial_error(0, [], trial)
    row = _row(tmp_path)
    assert row["status"] == "error" and row["error"] == "NonFiniteLossError: non-finite at step 12"
    hist = read_history(tmp_path, STUDY)
    assert list(hist["step"]) == [5, 10] and list(hist["only_in_the_log"]) == [5, 10]


def test_a_restored_driver_keeps_start_time_and_best_value(tmp_path):
    storage = str(tmp_path)
    first = ParquetCallback(_spec(), storage)
    trial = _trial()
    first.on_trial_start(0, [], trial)
    _result(trial, first, step=20, val_nll=2.0)
    before = _row(tmp_path)
    trial.error_msg = "RuntimeError: the node died"
    first.on_trial_error(0, [], trial)
    # The driver is killed; Tune.restore resumes the errored trial with a new callback.
    second = ParquetCallback(_spec(), storage)
    trial.error_msg = None
    second.on_trial_start(0, [], trial)
    _result(trial, second, step=40, val_nll=2.4)  # worse than before the restart
    second.on_trial_complete(0, [], trial)
    row = _row(tmp_path)
    assert len(read_trials(tmp_path, STUDY)) == 1
    assert row["status"] == "terminated" and pd.isna(row["error"])
    assert row["best_val_nll"] == row["val_nll"] == 2.0 and row["final_val_nll"] == 2.4
    assert row["start_time"] == before["start_time"]


def test_a_config_error_is_the_trials_reason(tmp_path):
    cb = ParquetCallback(_spec(), str(tmp_path))
    trial = _trial(seq_len=100_000)
    cb.on_trial_start(0, [], trial)
    row = _row(tmp_path)
    assert "seq_len" in row["error"] and row["seq_len"] == 100_000


# --- a new metric from the trainer reaches Parquet, no list edited ----------------------------

class ProbeTrainer(Trainer):
    """A trainer that logs one more metric than sedd_ray knows of."""

    def _emit(self, metrics, checkpoint_dir, report=True):
        super()._emit({**metrics, "probe_entropy": 0.5 * metrics["step"]}, checkpoint_dir,
                      report=report)


def test_a_new_trainer_metric_reaches_history_and_trials(tmp_path, tiny_bundle):
    """The trainer's reports go to the callback as Tune hands them over (Tune's own keys
    added, the checkpoint as ``checkpoint_path``); the trainer writes its files where a
    study's trial does, so rows Tune never saw (report_every_s) come from metrics.jsonl."""
    cfg = tiny_config(steps=20, log_every=5, eval_every=10, ckpt_every=10, report_every_s=1e9)
    cb = ParquetCallback(_spec(steps=20), str(tmp_path))
    trial = _trial()
    cb.on_trial_start(0, [], trial)

    def report(metrics, checkpoint_dir):
        extra = {"checkpoint_path": checkpoint_dir} if checkpoint_dir else {}
        _result(trial, cb, **metrics, **extra)

    out = StudyLayout(str(tmp_path), STUDY).trial("t1").trainer_files().root
    ProbeTrainer(cfg, out, report, bundle=tiny_bundle).run()
    cb.on_trial_complete(0, [], trial)

    hist = read_history(tmp_path, STUDY)
    assert list(hist["step"]) == [5, 10, 15, 20]
    assert list(hist["probe_entropy"]) == [2.5, 5.0, 7.5, 10.0]
    assert str(hist["probe_entropy"].dtype) == "float64"
    row = _row(tmp_path)
    assert row["status"] == "terminated" and row["probe_entropy"] == 10.0
    assert Path(row["checkpoint_path"]).name == "ckpt-00000020"


def test_merge_takes_the_final_evaluation_as_val_nll():
    """The trainer's final row carries val_nll = val_nll_final: the trial's val_nll, while
    the best periodic evaluation stays best_val_nll (the final one never enters it)."""
    row: dict = {}
    for nll in (3.0, 2.5, 2.8):
        merge_metrics(row, {"step": 1, "val_nll": nll, "val_nll_stderr": 0.1}, started=None)
    final = {"step": 2, "val_nll": 2.4, "val_nll_stderr": 0.01, "val_nll_final": 2.4,
             "val_nll_final_stderr": 0.01, "val_nll_best": 2.45, "data_identity": "abc"}
    merge_metrics(row, final, started=None)
    assert row["val_nll"] == row["val_nll_final"] == 2.4 and row["val_nll_stderr"] == 0.01
    assert row["best_val_nll"] == row["val_nll_best"] == 2.45 and row["final_val_nll"] == 2.8
    assert row["data_identity"] == "abc" and row["val_ppl_bound"] == pytest.approx(math.exp(2.4))


def test_the_final_evaluation_reaches_trials_parquet_and_blocks(tmp_path, tiny_bundle):
    """A real trainer's reports through the callback: typed final-evaluation columns, the
    data identity and split seed, and the per-block values found by read_blocks."""
    from sedd_ray.results import read_blocks

    cfg = tiny_config(steps=10, log_every=5, eval_every=5, ckpt_every=10,
                      final_eval_sequences=6, final_eval_draws=2)
    cb = ParquetCallback(_spec(steps=10), str(tmp_path))
    trial = _trial()
    cb.on_trial_start(0, [], trial)

    def report(metrics, checkpoint_dir):
        _result(trial, cb, **metrics)

    out = StudyLayout(str(tmp_path), STUDY).trial("t1").trainer_files().root
    res = Trainer(cfg, out, report, bundle=tiny_bundle).run()
    cb.on_trial_complete(0, [], trial)
    row = _row(tmp_path)
    assert row["val_nll"] == row["val_nll_final"] == res.val_nll_final
    assert row["val_nll_final_stderr"] == res.val_nll_final_stderr > 0
    assert row["val_nll_best"] == res.val_nll_best == row["best_val_nll"]
    assert row["data_identity"] == tiny_bundle.meta["data_identity"]
    assert row["data_split_seed"] == 0 and row["eval_seed"] == 0
    blocks = read_blocks(tmp_path, STUDY)
    assert blocks["trial_id"].unique().tolist() == ["t1"] and len(blocks) == 6
    assert blocks["nll"].mean() == pytest.approx(row["val_nll_final"], abs=1e-12)
