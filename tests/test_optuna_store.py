"""Each study's Optuna studies in an Optuna storage, mirrored from Parquet (optuna_store.py).

Without Ray: the Parquet callback driven by fake Tune trials (as in test_parquet_callback)
writes the mirror; a simulated driver kill and resume (a fresh callback, ``--resume``'s
re-sync) leaves no duplicate and no missing trial; bad ``--optuna-storage`` URLs are one
``error:`` line. With Ray (one local cluster for the module): a smoke graph ablation, then
``optuna.load_study`` on its default storage, one ``--resume``, and ``optuna-dashboard``
serving the storage on 127.0.0.1 read through its HTTP API.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from sedd_ray import optuna_store
from sedd_ray.layout import StudyLayout
from sedd_ray.parquet_callback import ParquetCallback
from sedd_ray.results import read_history, read_trials
from sedd_ray.study import Choice, Float, StudySpec

STATES = {"terminated": TrialState.COMPLETE, "stopped_early": TrialState.PRUNED,
          "error": TrialState.FAIL, "running": TrialState.RUNNING}


def assert_mirrors_parquet(storage, study: str, url: str | None = None) -> int:
    """Every Parquet row of ``study`` is exactly one Optuna trial of its level's study, with
    the row's state, value (``val_nll_final`` when present, else ``val_nll``) and its
    evaluations (history ``val_nll`` by step) as intermediate values; no other trial.
    Returns the number of trials."""
    rows = read_trials(storage, study).to_dict("records")
    hist = read_history(storage, study)
    db = optuna_store.open_storage(url or optuna_store.storage_url(str(storage), study))
    seen: list[str] = []
    for name in optuna_store.optuna_study_names(str(storage), study, url):
        for t in optuna.load_study(study_name=name, storage=db).get_trials():
            tid = t.user_attrs[optuna_store.TUNE_ID_ATTR]
            seen.append(tid)
            row = next(r for r in rows if r["trial_id"] == tid)
            assert name == optuna_store.study_name(study, row["ablated_axis"], row["level"],
                                                   row.get("phase")), (name, tid)
            assert t.state == STATES[row["status"]] or (
                t.state == TrialState.FAIL and row["status"] == "terminated"), (tid, t.state)
            want = _value(row)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                assert t.value == pytest.approx(want, rel=1e-12), (tid, t.value, want)
            if row["status"] != "running":
                h = hist[(hist["trial_id"] == tid) & hist["val_nll"].notna()]
                assert t.intermediate_values == dict(zip(h["step"].astype(int), h["val_nll"]))
    assert sorted(seen) == sorted(r["trial_id"] for r in rows), "duplicate or missing trials"
    return len(seen)


def _value(row) -> float:
    """What the Optuna value of a finished Parquet row must be."""
    final = row.get("val_nll_final")
    return final if final is not None and math.isfinite(final) else row["val_nll"]


# --- without Ray: the Parquet callback and fake trials -----------------------------------------

STUDY = "og"


def _spec() -> StudySpec:
    return StudySpec(name=STUDY, base="tiny", fixed={"steps": 40}, ablate="graph",
                     levels=["uniform", "absorb"], trials_per_level=2,
                     space={"lr": Float(1e-4, 1e-2, log=True),
                            "noise": Choice(["geometric", "loglinear"]),
                            "sigma_min": Float(1e-5, 1e-3, log=True,
                                               when={"noise": "geometric"})}).validate()


def _trial(trial_id: str, level: str, noise: str = "geometric", lr: float = 1e-3):
    config = {"graph": level, "level": level, "noise": noise, "lr": lr, "seed": 0}
    if noise == "geometric":
        config["sigma_min"] = 1e-4
    return SimpleNamespace(trial_id=trial_id, config=config, last_result={}, error_msg=None,
                           error_file=None)


def _report(cb, trial, **metrics) -> None:
    trial.last_result = {"training_iteration": 1, **metrics}
    cb.on_trial_result(0, [], trial, trial.last_result)


@pytest.fixture
def mirrored(tmp_path):
    """A callback writing Parquet under ``tmp_path/results`` with the mirror active."""
    storage, spec = str(tmp_path / "results"), _spec()
    url = optuna_store.storage_url(storage, STUDY)
    optuna_store.activate(spec, storage, url)
    yield storage, spec, ParquetCallback(spec, storage)
    optuna_store.activate(spec, storage, None)


def _first_run(cb):
    """t1 finishes (a final evaluation), t2 is stopped early, t3 errors, t4 is in flight."""
    t1, t2, t3, t4 = (_trial("t1", "uniform"), _trial("t2", "absorb", "loglinear"),
                      _trial("t3", "absorb", lr=2e-3), _trial("t4", "uniform", "loglinear"))
    for t in (t1, t2, t3, t4):
        cb.on_trial_start(0, [], t)
    _report(cb, t1, step=10, val_nll=3.0)
    _report(cb, t1, step=15, train_loss=9.0)  # no evaluation: no intermediate value
    _report(cb, t1, step=20, val_nll=2.5)
    _report(cb, t1, step=40, val_nll=2.7, val_nll_final=2.61, summary=True)
    cb.on_trial_complete(0, [], t1)
    _report(cb, t2, step=10, val_nll=2.0)
    cb.on_trial_complete(0, [], t2)  # step 10 < 40 steps: stopped early
    _report(cb, t3, step=10, val_nll=4.0)
    t3.error_msg = "RuntimeError: boom"
    cb.on_trial_error(0, [], t3)
    _report(cb, t4, step=10, val_nll=3.5)
    return t1, t2, t3, t4


def test_callback_mirrors_states_values_params_and_evaluations(mirrored):
    storage, spec, cb = mirrored
    _first_run(cb)
    assert assert_mirrors_parquet(storage, STUDY) == 4
    assert optuna_store.optuna_study_names(storage, STUDY) == ["og/graph=uniform",
                                                               "og/graph=absorb"]
    uni = optuna_store.optuna_study(storage, STUDY, "uniform")
    t1, t4 = sorted(uni.get_trials(), key=lambda t: t.user_attrs["tune_trial_id"])
    assert (t1.state, t1.value) == (TrialState.COMPLETE, 2.61)  # val_nll_final wins
    assert t1.intermediate_values == {10: 3.0, 20: 2.5}
    assert t1.params == {"lr": 1e-3, "noise": "geometric", "sigma_min": 1e-4}
    assert t4.state == TrialState.RUNNING and t4.intermediate_values == {10: 3.5}
    assert t4.params == {"lr": 1e-3, "noise": "loglinear"}  # sigma_min: not geometric
    absorb = {t.user_attrs["tune_trial_id"]: t
              for t in optuna_store.optuna_study(storage, STUDY, "absorb").get_trials()}
    assert (absorb["t2"].state, absorb["t2"].value) == (TrialState.PRUNED, 2.0)
    assert absorb["t3"].state == TrialState.FAIL and absorb["t3"].value is None
    assert uni.best_trial.user_attrs["tune_trial_id"] == "t1"
    with pytest.raises(optuna_store.OptunaStorageError, match="pass a level"):
        optuna_store.optuna_study(storage, STUDY)


def test_a_killed_driver_resumed_leaves_no_duplicate_or_missing_trial(mirrored):
    storage, spec, cb = mirrored
    _, _, t3, t4 = _first_run(cb)
    # The driver dies; --resume re-syncs from Parquet, twice changes nothing, and a fresh
    # callback (restored by Tune) sees the in-flight and the errored trial again.
    url = optuna_store.storage_url(storage, STUDY)
    for _ in range(2):
        optuna_store.activate(spec, storage, url)
        assert assert_mirrors_parquet(storage, STUDY) == 4
    cb = ParquetCallback(spec, storage)
    for t in (t3, t4):  # resume_errored: t3 runs again; Optuna's FAIL must not stay
        t.error_msg = None
        cb.on_trial_start(0, [], t)
        _report(cb, t, step=20, val_nll=2.2)
        _report(cb, t, step=40, val_nll=2.1)
        cb.on_trial_complete(0, [], t)
    assert assert_mirrors_parquet(storage, STUDY) == 4
    absorb = optuna_store.optuna_study(storage, STUDY, "absorb").get_trials()
    assert {t.user_attrs["tune_trial_id"]: t.state for t in absorb} == {
        "t2": TrialState.PRUNED, "t3": TrialState.COMPLETE}


def test_optuna_plots_and_the_analysis_import(mirrored, tmp_path):
    import matplotlib

    from experiments.analyze import optuna_study, write_optuna_plots

    storage, spec, cb = mirrored
    _first_run(cb)
    assert optuna_study(storage, STUDY, "absorb").study_name == "og/graph=absorb"
    style = dict(matplotlib.rcParams)
    paths = write_optuna_plots(storage, STUDY, tmp_path / "plots")
    assert dict(matplotlib.rcParams) == style  # Optuna's ggplot style stays inside
    assert sorted(p.name for p in paths) == [
        f"optuna-{k}-graph={lv}.png" for k in ("history", "intermediate")
        for lv in ("absorb", "uniform")]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_resync_repairs_a_lost_or_duplicated_mirror(mirrored):
    storage, spec, cb = mirrored
    _first_run(cb)
    url = optuna_store.storage_url(storage, STUDY)
    db = optuna_store.open_storage(url)
    study = optuna.load_study(study_name="og/graph=absorb", storage=db)
    study.add_trial(study.trials[0])  # a duplicate of t2
    optuna.delete_study(study_name="og/graph=uniform", storage=db)  # t1, t4 lost
    counts = optuna_store.OptunaMirror(spec, storage, url).sync()
    assert counts["rebuilt"] == 2 and counts["added"] == 2, counts
    assert assert_mirrors_parquet(storage, STUDY) == 4


def test_replicates_get_a_study_of_their_own(mirrored):
    """A replicate-phase row (helper "phases") never joins its level's tuning study."""
    storage, spec, _ = mirrored
    mirror = optuna_store.OptunaMirror(spec, storage, optuna_store.storage_url(storage, STUDY))
    row = {"trial_id": "r1", "level": "absorb", "phase": "replicate", "replicate_of": "t2",
           "status": "terminated", "val_nll": 2.0, "noise": "loglinear", "lr": 1e-3, "seed": 1}
    assert mirror.upsert(row) == "added" and mirror.upsert(row) == "same"
    rep = optuna_store.optuna_study(storage, STUDY, "absorb", phase="replicate")
    assert rep.study_name == "og/graph=absorb/replicate"
    assert rep.user_attrs["phase"] == "replicate" and rep.user_attrs["level"] == "absorb"
    (t,) = rep.get_trials()
    assert t.value == 2.0 and t.user_attrs["replicate_of"] == "t2" and t.user_attrs["seed"] == 1
    assert optuna_store.optuna_study(storage, STUDY, "absorb").get_trials() == []


def test_storage_urls():
    assert optuna_store.storage_url("/r", "s") == "sqlite:////r/s/optuna.db"
    assert optuna_store.storage_url("/r", "s", "none") is None
    assert optuna_store.storage_url("/r", "s", "/db/x.db") == "sqlite:////db/x.db"
    url = "postgresql://u:pw@db:5432/optuna"
    assert optuna_store.storage_url("s3://b/r", "s", url) == url
    remote = optuna_store.storage_url("s3://b/r", "s")  # SQLite needs a local file
    assert remote.startswith("sqlite:///") and "/sedd_ray/optuna/" in remote
    assert remote.endswith("s3%3A%2F%2Fb%2Fr%2Fs/optuna.db")


@pytest.mark.parametrize("url, match", [
    ("sqlite:////nonexistent-dir/sub/o.db", r"^error: --optuna-storage sqlite:////nonexistent-"
     r"dir/sub/o.db is unreachable \(unable to open database file\)"),
    ("postgresql://me:s3cret@127.0.0.1:1/optuna", r"^error: --optuna-storage postgresql://me:"
     r"\*\*\*@127.0.0.1:1/optuna"),
    ("nosuchdb://x", r"^error: --optuna-storage nosuchdb://x is not a database URL"),
    ("postgresql://me:s3cret@h:port/db", r"^error: --optuna-storage postgresql://me:\*\*\*@h:port/db "
     r"is not a database URL"),
])
def test_unusable_optuna_storage_is_one_line_before_anything(url, match, tmp_path, capfd,
                                                             monkeypatch):
    """Exit 2, one ``error:`` line (no password), nothing written, before the data is
    loaded or Ray starts."""
    import ray

    from sedd_ray import study as study_cli

    def boom(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(study_cli, "_precheck_data", boom)
    monkeypatch.setattr(ray, "init", boom)
    capfd.readouterr()
    rc = study_cli.main(["graph-ablation", "--smoke-test", "--storage",
                         str(tmp_path / "results"), "--optuna-storage", url])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    assert "s3cret" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_a_password_in_the_url_is_never_pickled_with_the_study(monkeypatch):
    import pickle

    monkeypatch.setattr(optuna_store, "check_url", lambda url: None)  # no server here
    spec = _spec()
    spec.optuna_storage = "postgresql://me:s3cret@db.example/optuna"
    assert optuna_store.prepare(spec, "/r") == "postgresql://me:s3cret@db.example/optuna"
    assert spec.optuna_storage == "postgresql://me:***@db.example/optuna"
    assert b"s3cret" not in pickle.dumps(spec)


# --- with Ray: a smoke study, a resume and the dashboard ---------------------------------------

TINY = {"steps": 20, "log_every": 5, "eval_every": 10, "ckpt_every": 10, "vocab_size": 300,
        "seq_len": 32, "batch_size": 8, "eval_sequences": 8, "eval_draws": 2, "test_draws": 0,
        "sample_count": 1, "sample_steps": 4, "sample_length": 16, "hidden_size": 32,
        "cond_dim": 16, "n_layers": 1, "progress": False, "final_eval_sequences": 16,
        "final_eval_draws": 2}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """A graph ablation, one tuning trial per level (noise, lr, warm-up and the conditional
    sigma_min searched) and one replicate per level, 2 concurrent, on one local cluster;
    then ``--resume`` of the finished study (a re-sync that must change nothing)."""
    import ray

    from sedd_ray.study import STUDIES, run_study

    storage = str(tmp_path_factory.mktemp("optuna") / "results")
    spec = STUDIES.get("graph-ablation")(fixed=dict(TINY), trials_per_level=1,
                                         max_concurrent=2, replicates=1).validate()
    ray.init(address="local", num_cpus=2, resources={"sedd_driver": 1000})
    try:
        run_study(spec, storage, verbose=0)
        n_first = assert_mirrors_parquet(storage, spec.name)
        run_study(spec, storage, resume=True, verbose=0)
    finally:
        ray.shutdown()
    return storage, spec, n_first


@pytest.mark.ray
def test_smoke_study_load_study_returns_every_trial_with_parquet_values(smoke_study):
    storage, spec, n_first = smoke_study
    df = read_trials(storage, spec.name)
    assert n_first == len(df) == 4 and (df["status"] == "terminated").all()
    assert assert_mirrors_parquet(storage, spec.name) == 4  # the resume added nothing
    assert sorted(df["phase"]) == ["replicate", "replicate", "tune", "tune"]
    url = f"sqlite:///{StudyLayout(storage, spec.name).optuna_file}"
    for _, row in df[df["phase"] == "tune"].iterrows():  # replicates: their own study
        s = optuna.load_study(study_name=f"graph-ablation/graph={row['level']}", storage=url)
        (t,) = s.get_trials()
        assert t.state == TrialState.COMPLETE and t.value == _value(row)
        assert t.user_attrs["tune_trial_id"] == row["trial_id"]
        assert sorted(t.intermediate_values) == [10, 20]
        assert t.params["noise"] == row["noise"] and t.params["lr"] == row["lr"]
        assert ("sigma_min" in t.params) == (row["noise"] == "geometric")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.ray
def test_optuna_dashboard_serves_the_study(smoke_study, tmp_path):
    """A real ``optuna-dashboard`` server on the study's storage, bounded in time."""
    storage, spec, _ = smoke_study
    exe = Path(sys.executable).with_name("optuna-dashboard")
    url, port = optuna_store.storage_url(storage, spec.name), _free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([str(exe), url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline and proc.poll() is None:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert studies is not None, (tmp_path / "dashboard.log").read_text()
        names = {s["study_name"]: s["study_id"] for s in studies}
        assert sorted(names) == ["graph-ablation/graph=absorb",
                                 "graph-ablation/graph=absorb/replicate",
                                 "graph-ablation/graph=uniform",
                                 "graph-ablation/graph=uniform/replicate"]
        df = read_trials(storage, spec.name)
        for name, sid in names.items():
            level, _, phase = name.split("=")[1].partition("/")
            detail = _get(f"{base}/api/studies/{sid}")
            (trial,) = detail["trials"]
            row = df[(df["level"] == level) & (df["phase"] == (phase or "tune"))].iloc[0]
            assert trial["state"] == "Complete"
            attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            assert attrs["tune_trial_id"] == row["trial_id"]
            assert trial["values"] == [pytest.approx(_value(row))]
            assert [v["step"] for v in trial["intermediate_values"]] == [10, 20]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
