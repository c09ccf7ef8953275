"""A real study on a local Ray cluster: Tune + Optuna + ASHA, one Parquet row per trial;
an ablation's two phases (tuning, then replication of each level's best config with
fresh seeds) on the same cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sedd_ray.config import ConfigError
from sedd_ray.layout import StudyLayout
from sedd_ray.results import read_history, read_trials
from sedd_ray.study import Choice, Float, ReplicationError, StudySpec, run_study

pytestmark = pytest.mark.ray

COMBOS = [{"graph": g, "noise": n} for g in ("uniform", "absorb") for n in ("geometric", "loglinear")]
FIXED = {"steps": 40, "log_every": 5, "eval_every": 10, "ckpt_every": 20, "vocab_size": 300,
         "seq_len": 32, "batch_size": 8, "eval_sequences": 8, "eval_draws": 2, "test_draws": 0,
         "sample_count": 1, "sample_steps": 4, "sample_length": 16, "hidden_size": 32,
         "cond_dim": 16, "progress": False,
         # Tune gets evaluation and checkpoint rows only; history/ must still hold every
         # log row (completed from each trial's metrics.jsonl, errored trials included).
         "report_every_s": 1e9}


# The one trial whose loss the NaN drill turns NaN at step 7 (sedd_ray.trainer.DRILL_NAN_AT):
# picked by its learning rate, which no other trial has.
NAN_LR = 2.5e-3


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # The drill is armed before ray.init: every process of the cluster inherits it.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SEDD_RAY_DRILL_NAN_AT", "7")
        env.setenv("SEDD_RAY_DRILL_NAN_IF", json.dumps({"lr": NAN_LR}))
        ray.init(address="local", num_cpus=2, resources={"sedd_driver": 1000})
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory):
    """4 trials over {uniform, absorb} x {geometric, loglinear} plus one whose loss the NaN
    drill turns NaN at step 7; 2 concurrent; ASHA on. Parquet is read in a loop while it is written."""
    storage = tmp_path_factory.mktemp("studies")
    spec = StudySpec(
        name="grid", base="tiny", fixed=FIXED, num_trials=5, asha=True, grace_period=10,
        space={"graph": Choice(["uniform", "absorb"]), "noise": Choice(["geometric", "loglinear"]),
               "lr": Float(1e-3, 3e-3, log=True)},
        points=[{**c, "lr": 2e-3} for c in COMBOS]
        + [{"graph": "absorb", "noise": "loglinear", "lr": NAN_LR}],
        max_concurrent=2, seeds=[0, 1],
    )
    # Another process reads the Parquet in a loop while the study writes it.
    stop = storage / "stop-reading"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(storage), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        study_dir = run_study(spec, str(storage), verbose=0)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    return storage, study_dir, json.loads(out)


READER = """
import json, pathlib, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from sedd_ray.layout import StudyLayout
from sedd_ray.results import read_history, read_trials
storage, stop = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
reads = {"ok": 0, "errors": []}
while not stop.exists():
    try:
        if Path(StudyLayout(str(storage), "grid").trials_file).exists():
            read_trials(storage, "grid")
            read_history(storage, "grid")
            reads["ok"] += 1
    except Exception as e:
        reads["errors"].append(repr(e))
    time.sleep(0.05)
print(json.dumps(reads))
"""


def test_one_row_per_trial_with_statuses(study):
    storage, study_dir, _ = study
    assert study_dir == f"{storage}/grid"
    df = read_trials(storage, "grid")
    assert len(df) == 5 and df["trial_id"].is_unique
    ok = df[df["lr"] != NAN_LR]
    assert sorted(zip(ok["graph"], ok["noise"])) == sorted((c["graph"], c["noise"]) for c in COMBOS)
    assert set(ok["status"]) <= {"terminated", "stopped_early"}
    assert (ok["status"] == "terminated").any()
    finished = ok[ok["status"] == "terminated"]
    assert (finished["step"] == 40).all() and finished["val_nll"].notna().all()
    assert (finished["val_ppl_bound"] > 1).all()
    for path in finished["checkpoint_path"]:
        assert path.endswith("ckpt-00000040")
    assert set(df["seed"]) == {0, 1}  # seeds recorded per trial
    assert df["git_sha"].notna().all() and df["ray_version"].notna().all()


def test_failing_trial_is_recorded_with_its_reason(study):
    storage, _, _ = study
    df = read_trials(storage, "grid")
    bad = df[df["lr"] == NAN_LR]
    assert len(bad) == 1
    row = bad.iloc[0]
    assert row["status"] == "error"
    assert "non-finite" in row["error"] and "step 7" in row["error"]
    # Its curve up to the failure is kept (log_every=5: step 5), though Tune was sent no
    # plain log row (report_every_s): completed from the trial's metrics.jsonl.
    hist = read_history(storage, "grid")
    assert sorted(hist[hist["trial_id"] == row["trial_id"]]["step"]) == [5]


def test_history_holds_every_log_step_of_every_trial(study):
    storage, _, _ = study
    hist = read_history(storage, "grid")
    for _, row in read_trials(storage, "grid").iterrows():
        if row["status"] == "error":
            continue
        steps = sorted(hist[hist["trial_id"] == row["trial_id"]]["step"])
        assert steps == list(range(5, steps[-1] + 1, 5)) and steps[-1] >= row["step"], steps


def test_parquet_types_are_the_fixed_schema(study):
    storage, _, _ = study
    schema = pq.read_schema(StudyLayout(str(storage), "grid").trials_file)
    expect = {"study": pa.string(), "trial_id": pa.string(), "status": pa.string(),
              "error": pa.string(), "graph": pa.string(), "noise": pa.string(),
              "model": pa.string(), "lr": pa.float64(), "seed": pa.int64(), "step": pa.int64(),
              "val_nll": pa.float64(), "val_ppl_bound": pa.float64(),
              "checkpoint_path": pa.string()}
    for name, typ in expect.items():
        assert schema.field(name).type == typ, name
    hist = read_history(storage, "grid")
    assert {"trial_id", "step", "tokens", "train_loss", "val_nll", "lr", "tokens_per_s"} <= set(hist)
    assert not hist.duplicated(["trial_id", "step"]).any()
    assert hist.groupby("trial_id")["step"].max().max() == 40


def test_reading_while_the_study_writes_never_fails(study):
    _, _, reads = study
    assert reads["errors"] == [] and reads["ok"] > 10


def test_bad_study_fails_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter 'lrr'"):
        StudySpec(name="x", base="tiny", fixed={"lrr": 1}).validate()
    with pytest.raises(ConfigError, match="seq_len 4096 exceeds"):
        StudySpec(name="x", base="tiny", points=[{"seq_len": 4096}]).validate()
    assert not list(tmp_path.iterdir())


# --- phases: tuning, then replication --------------------------------------------------------

# Shorter trials for the phase tests (the drill still fires at step 7 where it applies).
SHORT = {**FIXED, "steps": 20, "ckpt_every": 10}


@pytest.fixture(scope="module")
def replicated(ray_cluster, tmp_path_factory):
    """A graph ablation, 1 tuning trial per level (seed 0), then each level's best config
    with 2 fresh seeds; then the finished study run again with ``resume``."""
    storage = tmp_path_factory.mktemp("phases")
    spec = StudySpec(name="abl", base="tiny", fixed=SHORT, ablate="graph",
                     levels=["uniform", "absorb"], trials_per_level=1, replicates=2, seeds=[0],
                     space={"lr": Float(1e-3, 2e-3, log=True)}, max_concurrent=2)
    run_study(spec, str(storage), verbose=0)
    first = read_trials(storage, "abl")
    run_study(spec, str(storage), resume=True, verbose=0)  # both phases restored: no-ops
    return storage, first


def test_replication_reruns_each_levels_tuned_config_with_shared_fresh_seeds(replicated):
    storage, first = replicated
    df = read_trials(storage, "abl")
    assert len(df) == 6 and df["trial_id"].is_unique, df[["trial_id", "phase", "level"]]
    assert (df["status"] == "terminated").all() and (df["step"] == 20).all()
    tune, rep = df[df["phase"] == "tune"], df[df["phase"] == "replicate"]
    assert sorted(tune["level"]) == ["absorb", "uniform"] and tune["replicate_of"].isna().all()
    assert list(tune["seed"]) == [0, 0]
    # each (level, seed) once; the same fresh seeds for both levels, never a tuning seed
    assert sorted(zip(rep["level"], rep["seed"])) == [("absorb", 1), ("absorb", 2),
                                                      ("uniform", 1), ("uniform", 2)]
    tuned = tune.set_index("trial_id")
    for _, r in rep.iterrows():  # the level's tuned config, but for the seed
        orig = tuned.loc[r["replicate_of"]]
        assert (orig["level"], orig["graph"], orig["lr"]) == (r["level"], r["graph"], r["lr"])
        assert r["val_nll"] > 0 and r["checkpoint_path"].endswith("ckpt-00000020")
    # the second run re-ran nothing and recorded nothing twice
    assert first.set_index("trial_id")["end_time"].equals(df.set_index("trial_id")["end_time"])
    schema = pq.read_schema(StudyLayout(str(storage), "abl").trials_file)
    assert schema.field("phase").type == schema.field("replicate_of").type == pa.string()


def test_a_level_whose_tuning_trials_all_failed_stops_before_replication(ray_cluster, tmp_path):
    """The NaN drill fails uniform's only tuning trial: replication never starts, and the
    error names the level and the reason (exit code 1 in the CLIs: the tuning ran)."""
    spec = StudySpec(name="fail", base="tiny", fixed={**SHORT, "steps": 10}, ablate="graph",
                     levels=["uniform", "absorb"], trials_per_level=1, replicates=1,
                     space={"lr": Choice([NAN_LR], when={"graph": "uniform"})}, max_concurrent=2)
    with pytest.raises(ReplicationError, match=r"level 'uniform' has no finished tuning trial "
                       r"\(1 error; e\.g\. .*non-finite") as e:
        run_study(spec, str(tmp_path), verbose=0)
    assert e.value.exit_code == 1 and "absorb" not in str(e.value)
    df = read_trials(tmp_path, "fail")
    assert sorted(df["status"]) == ["error", "terminated"] and (df["phase"] == "tune").all()
    assert not (tmp_path / "fail" / StudyLayout.REPLICATE_NAME).exists()
