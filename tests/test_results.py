"""sedd_ray.results: fixed schemas, atomic writes, upsert/resume, readers, secrets."""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from sedd_ray import results as R
from sedd_ray.config import (
    DataConfig,
    DiffusionConfig,
    RunConfig,
    TrainConfig,
    apply_params,
    preset,
)
from sedd_ray.layout import StudyLayout

STUDY = "s1"


def _trial(trial_id: str, status: str = "terminated", val: float | None = 3.0, **kw) -> dict:
    row = {"trial_id": trial_id, "status": status, "config": preset("tiny").to_dict()}
    if val is not None:
        row["best_val_nll"] = val
    row.update(kw)
    return row


def _trials_file(tmp_path, study=STUDY) -> str:
    return StudyLayout(str(tmp_path), study).trials_file


def _history(tmp_path, study=STUDY) -> Path:
    return Path(StudyLayout(str(tmp_path), study).history_dir)


# --- schema --------------------------------------------------------------------------------


def test_config_columns_cover_the_required_names():
    required = [
        "graph",
        "noise",
        "model",
        "lr",
        "warmup_steps",
        "batch_size",
        "seq_len",
        "steps",
        "vocab_size",
        "hidden_size",
        "n_layers",
        "n_heads",
        "sigma_min",
        "sigma_max",
        "corpus",
        "tokenizer",
        "ema_decay",
        "seed",
    ]
    cols = R.config_columns()
    assert set(required) <= set(cols.values())
    assert cols["model.name"] == "model" and cols["optim.lr"] == "lr"
    # every config field is a column, typed from its annotation, and so is every built-in
    # noise's parameter (geometric's and loglinear's)
    geometric = apply_params(RunConfig(), {"noise": "geometric"})
    assert set(cols) == set(RunConfig().flat()) | set(geometric.flat())
    assert cols["diffusion.noise_params.sigma_min"] == "sigma_min"
    s = R.TRIALS_SCHEMA
    assert s.field("lr").type == pa.float64()
    assert s.field("steps").type == pa.int64()
    assert s.field("graph").type == pa.string()
    assert s.field("cosine").type == pa.bool_()
    assert s.field("start_time").type == pa.timestamp("us", tz="UTC")
    row = R.trial_row_from_config(preset("tiny"))
    assert row == R.trial_row_from_config(preset("tiny").to_dict())
    assert row == R.trial_row_from_config(preset("tiny").flat())
    assert row["model"] == "tiny" and row["preset"] == "tiny" and row["lr"] == 1e-3


def test_written_schema_is_exactly_the_declared_one(tmp_path):
    with R.ResultsWriter(tmp_path, STUDY) as w:
        w.upsert_trial(_trial("t1", start_time=dt.datetime.now(dt.timezone.utc), n_params=10))
        w.append_history("t1", [{"step": 1, "train_loss": 2.0}])
    got = pq.read_schema(_trials_file(tmp_path))
    assert got.equals(R.TRIALS_SCHEMA, check_metadata=True)
    parts = list(_history(tmp_path).glob("part-*.parquet"))
    assert len(parts) == 1
    assert pq.read_schema(parts[0]).equals(R.HISTORY_SCHEMA, check_metadata=True)
    # and pandas reads both directly
    assert len(pd.read_parquet(_trials_file(tmp_path))) == 1
    assert len(pd.read_parquet(_history(tmp_path))) == 1


# --- upsert / resume / history -------------------------------------------------------------


def test_upsert_twice_keeps_one_row_and_merges(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY)
    w.upsert_trial(_trial("t1", status="running", val=None, step=10, custom_metric=1.5))
    w.upsert_trial({"trial_id": "t1", "status": "TERMINATED", "best_val_nll": 2.5, "step": "20"})
    df = R.read_trials(tmp_path, STUDY)
    assert len(df) == 1
    r = df.iloc[0]
    assert r["status"] == "terminated" and r["step"] == 20
    assert r["val_nll"] == 2.5  # val_nll = best_val_nll when not given
    assert r["graph"] == "absorb" and r["lr"] == 1e-3  # kept from the first upsert
    assert '"custom_metric": 1.5' in r["extra"]
    # merge=False replaces the row whole
    w.upsert_trial({"trial_id": "t1", "status": "error", "error": "boom"}, merge=False)
    r = R.get_trial(tmp_path, STUDY, "t1")
    assert r["graph"] is None and r["error"] == "boom" and r["extra"] == "{}"


def test_coercion_errors_name_the_column(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY)
    with pytest.raises(R.ResultsError, match="'lr'"):
        w.upsert_trial(_trial("t1", lr="fast"))
    with pytest.raises(R.ResultsError, match="'n_params'"):
        w.upsert_trial(_trial("t1", n_params=1.5))
    with pytest.raises(R.ResultsError, match="'step'"):
        w.upsert_trial(_trial("t1", step=True))
    with pytest.raises(R.ResultsError, match="status"):
        w.upsert_trial(_trial("t1", status="paused"))
    with pytest.raises(R.ResultsError, match="status"):
        w.upsert_trial({"trial_id": "t2"})  # a new trial needs a status
    with pytest.raises(R.ResultsError, match="step"):
        w.append_history("t1", [{"train_loss": 1.0}])
    assert issubclass(R.ResultsError, ValueError)


def test_resume_keeps_rows_and_parts(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY)
    for t in ("a", "b"):
        w.upsert_trial(_trial(t, status="running", val=None, extra={"attempt": 1}))
    w.append_history("a", [{"step": s, "train_loss": 1.0} for s in range(3)])
    w.flush()
    w2 = R.ResultsWriter(tmp_path, STUDY)  # the driver restarted: resume
    w2.upsert_trial({"trial_id": "b", "status": "terminated", "best_val_nll": 2.0})
    w2.upsert_trial(_trial("c"))
    w2.append_history("a", [{"step": 3, "train_loss": 0.5}])
    w2.flush()
    df = R.read_trials(tmp_path, STUDY)
    assert sorted(df["trial_id"]) == ["a", "b", "c"]
    b = R.get_trial(tmp_path, STUDY, "b")
    assert b["status"] == "terminated" and b["graph"] == "absorb"
    assert '"attempt": 1' in b["extra"]
    names = sorted(p.name for p in _history(tmp_path).iterdir())
    assert names == ["part-a-000000.parquet", "part-a-000001.parquet"]
    assert list(R.read_history(tmp_path, STUDY)["step"]) == [0, 1, 2, 3]


def test_history_dedup_keeps_last_written(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY, history_flush_rows=10**9, history_flush_s=1e9)
    w.append_history("t1", [{"step": s, "train_loss": 1.0, "tokens": s * 100} for s in range(5)])
    w.append_history("t2", [{"step": 0, "train_loss": 9.0, "my_key": "x"}])
    assert not list(_history(tmp_path).iterdir())  # buffered
    w.flush()
    # trial t1 re-runs from step 3 (a resumed checkpoint): steps 3-4 again, then 5
    w2 = R.ResultsWriter(tmp_path, STUDY)
    w2.append_history("t1", [{"step": s, "train_loss": 0.5} for s in (3, 4, 5)])
    w2.flush()
    raw = pd.read_parquet(_history(tmp_path))
    assert len(raw) == 9
    h = R.read_history(tmp_path, STUDY)
    t1 = h[h["trial_id"] == "t1"]
    assert list(t1["step"]) == [0, 1, 2, 3, 4, 5]
    assert list(t1["train_loss"]) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert len(h[h["trial_id"] == "t2"]) == 1
    assert '"my_key": "x"' in h[h["trial_id"] == "t2"]["extra"].iloc[0]
    assert list(R.read_history(tmp_path, STUDY, trial_id="t2")["trial_id"]) == ["t2"]


def test_history_autoflush_by_rows(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY, history_flush_rows=4, history_flush_s=1e9)
    w.append_history("t1", [{"step": 0}, {"step": 1}])
    assert len(R.read_history(tmp_path, STUDY)) == 0
    w.append_history("t1", [{"step": 2}, {"step": 3}])
    assert len(R.read_history(tmp_path, STUDY)) == 4


# --- readers while writing -----------------------------------------------------------------

# Readers of trials.parquet open it ONCE (read_trials, pq.ParquetFile): pq.read_table(path)
# and pd.read_parquet(path) open a single file twice and can fail when a rename lands in
# between (see sedd_ray.results._read_file). History parts are never rewritten, so any
# reader of the history folder is safe.
_READER = textwrap.dedent("""
    import os, sys, pandas as pd, pyarrow.dataset as ds, pyarrow.parquet as pq
    path, hist, stop = sys.argv[1:]
    n = 0
    while not os.path.exists(stop) or n == 0:
        pq.ParquetFile(path).read().to_pandas()
        pd.read_parquet(hist)
        ds.dataset(hist, format="parquet").to_table()
        n += 1
    print(n)
""")


def test_readers_never_see_a_partial_file(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY, history_flush_rows=1)
    w.upsert_trial(_trial("t0"))
    path, hist = _trials_file(tmp_path), str(_history(tmp_path))
    stop_file = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", _READER, path, hist, str(stop_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                assert len(R.read_trials(tmp_path, STUDY)) >= 1
                R.read_history(tmp_path, STUDY)
                dset = pads.dataset(hist, format="parquet")
                assert all(os.path.basename(f).startswith("part-") for f in dset.files)
                reads[0] += 1
            except BaseException as e:  # reported below
                errors.append(e)
                return

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for i in range(200):
            w.upsert_trial({"trial_id": f"t{i % 7}", "status": "running", "step": i})
            if i % 10 == 0:
                w.append_history(f"t{i % 7}", [{"step": i}])
    finally:
        stop.set()
        thread.join()
        stop_file.touch()
        out, err = proc.communicate(timeout=60)
    assert not errors, errors[0]
    assert proc.returncode == 0, err
    assert reads[0] > 0 and int(out) > 0
    assert len(R.read_trials(tmp_path, STUDY)) == 7
    # a temp file left by a crashed writer is invisible to readers
    part = Path(StudyLayout(str(tmp_path), STUDY).history_part("t0", 99))
    part.with_name(f".{part.name}.abc.tmp").write_bytes(b"junk")
    trials = Path(_trials_file(tmp_path))
    trials.with_name(f".{trials.name}.abc.tmp").write_bytes(b"junk")
    assert len(pd.read_parquet(hist)) == len(R.read_history(tmp_path, STUDY))
    assert not [f for f in pads.dataset(hist, format="parquet").files if ".tmp" in f]


# --- best / resolve / get --------------------------------------------------------------------


def test_best_trial_ignores_errors_running_and_nan(tmp_path):
    with pytest.raises(R.ResultsError, match="no study"):
        R.best_trial(tmp_path, STUDY)
    w = R.ResultsWriter(tmp_path, STUDY)
    w.upsert_trial(_trial("err", status="error", val=0.1, error="boom"))
    w.upsert_trial(_trial("run", status="running", val=0.2))
    with pytest.raises(R.ResultsError, match="no finished trial"):
        R.best_trial(tmp_path, STUDY)
    w.upsert_trial(_trial("nan", val=float("nan")))
    w.upsert_trial(_trial("good", val=3.0))
    w.upsert_trial(_trial("asha", status="stopped_early", val=4.0))
    best = R.best_trial(tmp_path, STUDY)
    assert best["trial_id"] == "good" and best["val_nll"] == 3.0
    assert isinstance(best["start_time"], type(None)) and best["graph"] == "absorb"
    assert R.best_trial(tmp_path, STUDY, mode="max")["trial_id"] == "asha"
    with pytest.raises(R.ResultsError, match="numeric columns"):
        R.best_trial(tmp_path, STUDY, metric="graph")
    assert math.isnan(R.get_trial(tmp_path, STUDY, "nan")["val_nll"])


def test_resolve_study_zero_one_two(tmp_path):
    with pytest.raises(R.ResultsError, match="no studies"):
        R.resolve_study(tmp_path)
    R.ResultsWriter(tmp_path, "alpha").upsert_trial(_trial("t1"))
    assert R.resolve_study(tmp_path) == "alpha"
    assert R.resolve_study(tmp_path, "alpha") == "alpha"
    R.ResultsWriter(tmp_path, "beta")
    (tmp_path / ".hidden").mkdir()
    assert R.list_studies(tmp_path) == ["alpha", "beta"]
    with pytest.raises(R.ResultsError, match="alpha, beta"):
        R.resolve_study(tmp_path)
    with pytest.raises(R.ResultsError, match="alpha, beta"):
        R.resolve_study(tmp_path, "gamma")
    assert R.list_studies(tmp_path / "missing") == []
    assert len(R.read_trials(tmp_path, "beta")) == 0  # a study with no trials yet


def test_get_trial_rejects_escapes_and_unknown_ids(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY)
    for i in range(7):
        w.upsert_trial(_trial(f"t{i}"))
    for bad in ("../etc", "a/b", "..", ".x", "", "a\\b"):
        with pytest.raises(R.ResultsError, match="invalid trial id"):
            R.get_trial(tmp_path, STUDY, bad)
    with pytest.raises(R.ResultsError, match=r"valid ids: t0, t1, .*7 in all"):
        R.get_trial(tmp_path, STUDY, "nope")
    with pytest.raises(R.ResultsError, match="invalid study"):
        R.read_trials(tmp_path, "../x")
    with pytest.raises(R.ResultsError, match="invalid trial id"):
        w.append_history("../x", [{"step": 1}])
    assert R.get_trial(tmp_path, STUDY, "t3")["trial_id"] == "t3"


# --- a new config field is a new column ------------------------------------------------------


@dataclass
class _TrainPlus(TrainConfig):
    new_knob: float = 0.5
    tags: list = field(default_factory=lambda: ["a"])


@dataclass
class _DataPlus(DataConfig):
    seed: int = 7  # collides with train.seed


@dataclass
class _RunPlus(RunConfig):
    train: _TrainPlus = field(default_factory=_TrainPlus)
    data: _DataPlus = field(default_factory=_DataPlus)


def test_new_config_field_becomes_a_column(tmp_path):
    s = R.trials_schema(_RunPlus)
    assert s.field("new_knob").type == pa.float64()
    assert s.field("tags").type == pa.string()  # non-scalar: JSON text
    assert "seed" not in s.names  # collision: both prefixed with their section
    assert s.field("train_seed").type == pa.int64() and s.field("data_seed").type == pa.int64()
    w = R.ResultsWriter(tmp_path, STUDY, config_cls=_RunPlus)
    cfg = _RunPlus()
    cfg.train.new_knob = 0.25
    w.upsert_trial({"trial_id": "t1", "status": "terminated", "config": cfg})
    assert pq.read_schema(_trials_file(tmp_path)).equals(s)
    r = R.get_trial(tmp_path, STUDY, "t1")
    assert r["new_knob"] == 0.25 and r["data_seed"] == 7 and r["tags"] == '["a"]'
    # the default reader still reads it (unknown columns kept after the known ones)
    assert R.read_trials(tmp_path, STUDY)["new_knob"].iloc[0] == 0.25


# --- keys outside the schema come back typed ---------------------------------------------------


def test_keys_outside_the_schema_come_back_as_typed_columns(tmp_path):
    w = R.ResultsWriter(tmp_path, STUDY)
    w.upsert_trial(_trial("t1", probe=1, gauge=0.5, flag=True, label="a", nested={"k": 1}))
    w.upsert_trial(_trial("t2", probe=2.5, label=None, extra={"from_extra": 3}))
    w.append_history("t1", [{"step": 1, "probe": 3}, {"step": 2, "probe": 4, "text": "x"}])
    w.flush()
    # The files keep exactly the declared schemas: such keys live in `extra` there.
    assert pq.read_schema(_trials_file(tmp_path)).equals(R.TRIALS_SCHEMA, check_metadata=True)
    df = R.read_trials(tmp_path, STUDY).set_index("trial_id")
    assert str(df["probe"].dtype) == "float64" and list(df["probe"]) == [1.0, 2.5]
    assert df.loc["t1", "gauge"] == 0.5 and math.isnan(df.loc["t2", "gauge"])
    assert df.loc["t1", "flag"] is True and df.loc["t1", "label"] == "a"
    assert df.loc["t1", "nested"] == '{"k": 1}' and df.loc["t2", "from_extra"] == 3
    assert '"probe": 1' in df.loc["t1", "extra"]  # still in extra too
    assert R.best_trial(tmp_path, STUDY, metric="probe", mode="max")["trial_id"] == "t2"
    assert R.get_trial(tmp_path, STUDY, "t1")["gauge"] == 0.5
    h = R.read_history(tmp_path, STUDY)
    assert str(h["probe"].dtype) == "int64" and list(h["probe"]) == [3, 4]
    assert list(h["text"].fillna("-")) == ["-", "x"]


@dataclass
class _DiffusionPlus(DiffusionConfig):
    """A component's own knobs, unknown to the declared RunConfig (registered from outside)."""

    eps: float = 2e-3
    warp: bool = True
    sigma_min: float = 1e-4  # a declared field stays its declared column


def test_unknown_config_keys_land_typed_without_breaking_the_schema(tmp_path):
    cfg = preset("tiny")
    cfg.diffusion = _DiffusionPlus(graph="uniform", noise="geometric")
    row = R.trial_row_from_config(cfg)
    assert row["graph"] == "uniform" and row["diffusion_eps"] == 2e-3 and row["diffusion_warp"]
    w = R.ResultsWriter(tmp_path, STUDY)
    w.upsert_trial({"trial_id": "t1", "status": "terminated", "config": cfg})
    w.upsert_trial(_trial("t2"))  # a trial without the component
    assert pq.read_schema(_trials_file(tmp_path)).equals(R.TRIALS_SCHEMA, check_metadata=True)
    df = R.read_trials(tmp_path, STUDY).set_index("trial_id")
    assert str(df["diffusion_eps"].dtype) == "float64" and df.loc["t1", "diffusion_eps"] == 2e-3
    assert math.isnan(df.loc["t2", "diffusion_eps"]) and df.loc["t1", "diffusion_warp"] is True
    assert df.loc["t1", "sigma_min"] == 1e-4 and "sigma_min" not in R.config_columns().keys()


# --- secrets and import hygiene --------------------------------------------------------------


def test_secrets_never_reach_the_files(tmp_path, monkeypatch):
    key = "not-hex-but-secret-value-123"
    hexkey = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    assert R.scrub(f"x {key} {hexkey} y") == "x *** *** y"
    assert R.scrub({"k": [hexkey]}) == {"k": ["***"]}
    w = R.ResultsWriter(tmp_path, STUDY, history_flush_rows=1)
    sha = "f" * 40
    w.upsert_trial(
        _trial(
            "t1",
            status="error",
            error=f"wandb.init failed: key={key} {hexkey}",
            git_sha=sha,
            note=f"env {key}",
            checkpoint_path=f"/x/{key}",
        )
    )
    w.append_history("t1", [{"step": 1, "msg": key}])
    for f in list(Path(StudyLayout(str(tmp_path), STUDY).dir).rglob("*.parquet")):
        table = pq.read_table(f)
        for col in table.columns:
            if pa.types.is_string(col.type):
                for v in col.to_pylist():
                    assert v is None or (key not in v and hexkey not in v), (f, v)
        raw = f.read_bytes()
        assert key.encode() not in raw and hexkey.encode() not in raw
    r = R.get_trial(tmp_path, STUDY, "t1")
    assert r["git_sha"] == sha and "***" in r["error"]


def test_results_imports_neither_ray_nor_torch():
    code = (
        "import sys, sedd_ray.results; "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- the final evaluation: columns, per-block values, one data identity ----------------------

def test_final_evaluation_columns_are_typed(tmp_path):
    s = R.TRIALS_SCHEMA
    for col in ("val_nll_final", "val_nll_final_stderr", "val_nll_best"):
        assert s.field(col).type == pa.float64()
    assert s.field("data_identity").type == pa.string()
    for col in ("data_split_seed", "eval_seed", "seed", "final_eval_sequences", "final_eval_draws"):
        assert s.field(col).type == pa.int64(), col
    cols = R.config_columns()
    assert cols["data.split_seed"] == "data_split_seed" and cols["train.eval_seed"] == "eval_seed"
    with R.ResultsWriter(tmp_path, STUDY) as w:
        cfg = apply_params(preset("tiny"), {"split_seed": 2, "eval_seed": 5, "seed": 1})
        w.upsert_trial({**_trial("a", val=None, config=cfg.to_dict()), "val_nll_final": 4.25,
                        "val_nll_final_stderr": 0.02, "val_nll_best": 4.0,
                        "best_val_nll": 4.0, "data_identity": "abc123def456"})
    row = R.read_trials(tmp_path, STUDY).iloc[0]
    assert row["val_nll"] == row["val_nll_final"] == 4.25  # the final evaluation, not the best
    assert row["val_nll_best"] == 4.0 and row["val_nll_final_stderr"] == 0.02
    assert (row["data_split_seed"], row["eval_seed"], row["seed"]) == (2, 5, 1)
    assert row["data_identity"] == "abc123def456"


def test_blocks_round_trip_per_trial(tmp_path):
    layout = StudyLayout(str(tmp_path), STUDY)
    with R.ResultsWriter(tmp_path, STUDY) as w:
        for tid in ("a", "b", "c"):
            w.upsert_trial(_trial(tid))
    for tid, shift in (("b", 1.0), ("a", 0.0)):  # c has no file (did not finish)
        path = layout.trial(tid).trainer_files().final_blocks
        path.parent.mkdir(parents=True)
        R.write_blocks(path, [3, 10, 17], [4.0 + shift, 5.0 + shift, 6.0 + shift],
                       meta={"data_identity": "x", "eval_seed": 0})
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
        meta = pq.read_schema(path).metadata[b"sedd_ray.meta"]
        assert b'"data_identity": "x"' in meta
    df = R.read_blocks(tmp_path, STUDY)
    assert list(df.columns) == ["trial_id", "block", "nll"]
    assert df["trial_id"].tolist() == ["a"] * 3 + ["b"] * 3
    assert df["block"].tolist() == [3, 10, 17] * 2 and str(df["block"].dtype) == "int64"
    pairs = df.pivot(index="block", columns="trial_id", values="nll")
    assert (pairs["b"] - pairs["a"]).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(R.ResultsError, match="one nll per block"):
        R.write_blocks(tmp_path / "x.parquet", [1, 2], [1.0])
    with R.ResultsWriter(tmp_path, "empty") as w:
        w.upsert_trial(_trial("z"))
    assert R.read_blocks(tmp_path, "empty").empty


def test_trials_on_different_data_are_not_compared():
    same = pd.DataFrame({"trial_id": ["a", "b", "c"], "data_identity": ["x1", "x1", None]})
    assert R.same_data_identity(same) == "x1"
    assert R.same_data_identity(pd.DataFrame({"trial_id": ["a"]})) == ""
    mixed = pd.DataFrame({"trial_id": ["a", "b", "c"], "data_identity": ["x1", "y2", "x1"]})
    with pytest.raises(ValueError, match=r"measured on different data \(data_identity x1: 2 "
                                         r"trials, y2: 1 trial\): compare trials of one data"):
        R.same_data_identity(mixed)
