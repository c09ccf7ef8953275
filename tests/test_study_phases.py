"""A study's phases without a Ray cluster: tuning -> replication planning from Parquet,
the ``phase``/``replicate_of`` columns, and the bad input that must stop before anything
runs or is written (``--replicates 0``, an axis with one level, replication asked of a
study without a finished tuning trial).

The phases on a real cluster (replication run, resumed and recorded once) are in
``tests/test_study.py``; the driver killed mid-replication in ``tests/test_faults.py``.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_bad_input import no_compute, run_cli, snapshot  # noqa: F401  (a fixture)
from test_bad_input import test_experiment_scripts_refuse_bad_input as script_refuses

from sedd_ray import study as study_cli
from sedd_ray.parquet_callback import ParquetCallback
from sedd_ray.results import ResultsWriter, read_trials, trial_row_from_config
from sedd_ray.study import (
    Choice,
    Float,
    ReplicationError,
    StudySpec,
    replicate_configs,
    replicate_seeds,
    trial_params,
    tuned_winners,
)

LEVELS = ["uniform", "absorb"]


def _spec(**kw) -> StudySpec:
    kw = {"name": "abl", "base": "tiny", "ablate": "graph", "levels": LEVELS,
          "trials_per_level": 2, "seeds": [0, 1], "replicates": 3,
          "space": {"lr": Float(3e-4, 3e-3, log=True), "noise": Choice(["geometric", "loglinear"]),
                    "sigma_min": Float(1e-5, 1e-3, log=True, when={"noise": "geometric"})},
          **kw}
    return StudySpec(**kw).validate()


def _tuned(storage: Path, spec: StudySpec, trials: list[tuple[str, dict, str, float | None]],
           **extra_cols) -> None:
    """Write tuning rows ``(trial_id, params, status, val_nll)`` as the callback would."""
    with ResultsWriter(storage, spec.name) as w:
        for tid, params, status, nll in trials:
            row = trial_row_from_config(spec.trial_config(params))
            row.update(trial_id=tid, status=status, ablated_axis=spec.ablate,
                       level=params.get(spec.ablate), phase="tune", step=200,
                       **({"val_nll": nll} if nll is not None else {}),
                       **({"error": "NonFiniteLossError: loss became non-finite at step 7"}
                          if status == "error" else {}))
            row.update(extra_cols.get(tid, {}))
            w.upsert_trial(row)


GEO = {"noise": "geometric", "sigma_min": 2e-5}
LOG = {"noise": "loglinear"}
TRIALS = [  # uniform's best is u1 (geometric); absorb's best finished is a1 (a2 errored)
    ("u0", {"graph": "uniform", "lr": 1e-3, "seed": 0, **LOG}, "terminated", 5.9),
    ("u1", {"graph": "uniform", "lr": 2e-3, "seed": 1, **GEO}, "terminated", 5.7),
    ("a0", {"graph": "absorb", "lr": 1e-3, "seed": 0, **GEO}, "stopped_early", 5.2),
    ("a1", {"graph": "absorb", "lr": 5e-4, "seed": 1, **LOG}, "terminated", 4.9),
    ("a2", {"graph": "absorb", "lr": 3e-3, "seed": 0, **LOG}, "error", None),
]


# --- planning --------------------------------------------------------------------------------

def test_replicate_seeds_are_fresh_shared_and_deterministic():
    spec = _spec(seeds=[3, 0, 1], replicates=3)
    assert replicate_seeds(spec) == [4, 5, 6] == replicate_seeds(_spec(seeds=[3, 0, 1]))
    assert not set(replicate_seeds(spec)) & set(spec.seeds)
    assert replicate_seeds(_spec(replicates=1)) == [2]


def test_each_levels_best_finished_tuning_trial_is_replicated_with_the_same_seeds(tmp_path):
    spec = _spec()
    _tuned(tmp_path, spec, TRIALS)
    configs = replicate_configs(spec, str(tmp_path))
    assert [(c["level"], c["seed"], c["replicate_of"]) for c in configs] == [
        ("uniform", 2, "u1"), ("absorb", 2, "a1"), ("uniform", 3, "u1"), ("absorb", 3, "a1"),
        ("uniform", 4, "u1"), ("absorb", 4, "a1")]  # seed by seed: levels pair by seed
    rows = read_trials(tmp_path, "abl").set_index("trial_id")
    for c in configs:  # the tuned config exactly, but for the seed
        got = trial_row_from_config(spec.trial_config(trial_params(c)))
        want = rows.loc[c["replicate_of"], list(got)].to_dict()
        assert got.pop("seed") in replicate_seeds(spec)
        want.pop("seed")
        assert {k: v for k, v in got.items() if v is not None} == {
            k: v for k, v in want.items() if not (isinstance(v, float) and math.isnan(v))}
    assert "sigma_min" not in configs[1]  # a1 is loglinear: the conditional param stays out


def test_the_final_evaluation_ranks_where_a_trial_has_it(tmp_path):
    spec = _spec()
    # val_nll says a1, the final evaluation says a0 (and u0 over u1)
    _tuned(tmp_path, spec, TRIALS, u0={"val_nll_final": 5.0}, u1={"val_nll_final": 5.5},
           a0={"val_nll_final": 4.5}, a1={"val_nll_final": 4.8})
    winners = tuned_winners(spec, read_trials(tmp_path, "abl"))
    assert [(lv, row["trial_id"]) for lv, row in winners] == [("uniform", "u0"), ("absorb", "a0")]
    # a finished trial without a final evaluation is ranked by its val_nll
    _tuned(tmp_path / "b", spec, TRIALS, u0={"val_nll_final": 5.0}, a0={"val_nll_final": 4.95})
    winners = tuned_winners(spec, read_trials(tmp_path / "b", "abl"))
    assert [row["trial_id"] for _, row in winners] == ["u0", "a1"]  # a1: val_nll 4.9


def test_replicate_rows_never_win_and_search_mode_replicates_its_top_config(tmp_path):
    spec = _spec()
    _tuned(tmp_path, spec, TRIALS, u1={"phase": "replicate", "replicate_of": "u0"})
    winners = dict((lv, r["trial_id"]) for lv, r in tuned_winners(spec, read_trials(tmp_path, "abl")))
    assert winners == {"uniform": "u0", "absorb": "a1"}
    search = StudySpec(name="abl", base="tiny", space=dict(spec.space, graph=Choice(LEVELS)),
                       replicates=2, seeds=[0, 1]).validate()
    configs = replicate_configs(search, str(tmp_path))
    assert [(c["replicate_of"], c["seed"], "level" in c) for c in configs] == [
        ("a1", 2, False), ("a1", 3, False)]
    assert configs[0]["graph"] == "absorb" and configs[0]["noise"] == "loglinear"


def test_a_level_whose_tuning_trials_all_failed_is_named(tmp_path):
    spec = _spec()
    _tuned(tmp_path, spec, [t for t in TRIALS if t[0].startswith("u")]
           + [("a2", TRIALS[4][1], "error", None), ("a3", TRIALS[3][1], "running", None)])
    with pytest.raises(ReplicationError) as e:
        replicate_configs(spec, str(tmp_path))
    msg = str(e.value)
    assert "level 'absorb' has no finished tuning trial (1 error, 1 running; e.g. " \
           "NonFiniteLossError" in msg and "uniform" not in msg and "--resume" in msg
    assert e.value.exit_code == 2


# --- the Parquet columns -----------------------------------------------------------------------

def test_the_callback_records_phase_and_replicate_of_as_typed_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sedd_ray.layout import StudyLayout

    spec = _spec(fixed={"steps": 40})
    cb = ParquetCallback(spec, str(tmp_path))
    tuned = {"lr": 1e-3, "noise": "loglinear", "graph": "absorb", "seed": 0, "level": "absorb"}
    for tid, config in (("t0", tuned), ("r0", {**tuned, "seed": 2, "replicate_of": "t0"})):
        trial = SimpleNamespace(trial_id=tid, config=config, last_result={"step": 40},
                                error_msg=None, error_file=None)
        cb.on_trial_start(0, [], trial)
        cb.on_trial_complete(0, [], trial)
    df = read_trials(tmp_path, "abl").set_index("trial_id")
    assert df.loc["t0", "phase"] == "tune" and pd.isna(df.loc["t0", "replicate_of"])
    assert df.loc["r0", "phase"] == "replicate" and df.loc["r0", "replicate_of"] == "t0"
    assert df.loc["r0", "seed"] == 2 and df.loc["r0", "level"] == "absorb"
    assert "extra" not in df or "replicate_of" not in str(df.loc["r0"].get("extra"))
    schema = pq.read_schema(StudyLayout(str(tmp_path), "abl").trials_file)
    assert schema.field("phase").type == schema.field("replicate_of").type == pa.string()


# --- bad input: one error line, exit 2, nothing run or written ---------------------------------

@pytest.mark.parametrize("flags, match", [
    (["graph-ablation", "--replicates", "0"], r"--replicates must be >= 1, got 0"),
    (["graph-ablation", "--replicates", "-2"], r"--replicates must be >= 1, got -2"),
    (["search", "--phase", "replicate"], r"--phase replicate needs --replicates K"),
    (["graph-ablation", "--phase", "replicate"],
     r"study 'graph-ablation' has no tuning results under .*run the tuning phase first"),
])
def test_study_cli_refuses_bad_replication_input(flags, match, tmp_path, capfd, no_compute):  # noqa: F811
    rc, line = run_cli(capfd, study_cli.main, [*flags, "--smoke-test", "--storage",
                                               str(tmp_path / "results")])
    assert rc == 2 and re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


def test_replication_of_a_study_without_a_finished_tuning_trial_is_refused(
        tmp_path, capfd, no_compute):  # noqa: F811
    spec = study_cli.spec_from_args("graph-ablation", study_cli_args(tmp_path))
    _tuned(tmp_path, spec, [("u0", {"graph": "uniform", "seed": 0}, "terminated", 5.0),
                            ("a0", {"graph": "absorb", "seed": 0}, "error", None)])
    before = snapshot(tmp_path)
    rc, line = run_cli(capfd, study_cli.main, ["graph-ablation", "--smoke-test", "--phase",
                                               "replicate", "--storage", str(tmp_path)])
    assert rc == 2, line
    assert "level 'absorb' has no finished tuning trial (1 error; e.g. NonFiniteLossError" in line
    assert snapshot(tmp_path) == before


def study_cli_args(storage: Path) -> SimpleNamespace:
    """The parsed flags of ``graph-ablation --smoke-test --storage storage``."""
    import argparse

    p = argparse.ArgumentParser()
    study_cli.add_study_flags(p)
    return p.parse_args(["--smoke-test", "--storage", str(storage)])


@pytest.mark.parametrize("script, flags, match", [
    ("sweep_model_size", ["--sizes", "tiny"],
     r"ablating 'model' needs at least 2 levels to compare, got \['tiny'\]"),
    ("ablate_graph", ["--replicates", "0"], r"--replicates must be >= 1, got 0"),
    ("ablate_noise", ["--replicates", "-1"], r"--replicates must be >= 1, got -1"),
])
def test_experiment_scripts_refuse_bad_replication_input(script, flags, match, tmp_path, capfd,
                                                         no_compute):  # noqa: F811
    script_refuses(script, flags, match, tmp_path, capfd, no_compute)


def test_a_script_whose_tuning_left_a_level_without_a_trial_reports_and_exits_1(
        tmp_path, capfd, monkeypatch):
    """The tuning ran (here: its Parquet) but a level has no finished trial: the script
    still writes the report, says which level and why, and exits 1."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        ablate_graph = importlib.import_module("experiments.ablate_graph")
    finally:
        sys.path.pop(0)
    spec = _spec(name="graph-ablation")
    _tuned(tmp_path, spec, [("u0", TRIALS[0][1], "terminated", 5.0),
                            ("a2", TRIALS[4][1], "error", None)])

    def after_tuning(spec, storage, **kw):  # what run_study raises once its tuning ran
        try:
            replicate_configs(spec, storage)
        except ReplicationError as e:
            raise ReplicationError(str(e), exit_code=1) from None
        raise AssertionError("replication planned without a finished absorb trial")

    monkeypatch.setattr(study_cli, "run_study", after_tuning)
    rc = ablate_graph.main(["--smoke-test", "--storage", str(tmp_path)])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: study 'graph-ablation' cannot replicate: level 'absorb' "
                               "has no finished tuning trial (1 error; e.g. NonFiniteLossError")
    assert (tmp_path / "graph-ablation" / "report.md").is_file()
    assert f"report: {tmp_path / 'graph-ablation' / 'report.md'}" in out
