"""sedd_ray.compare on synthetic trial tables (no Ray, no torch): planted effects are
found with a CI that covers them, null effects stay inconclusive, several levels get
Bonferroni intervals, block pairing narrows the CI, and bad comparisons are refused."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sedd_ray.compare import (
    MAX_SUGGESTED_REPLICATES,
    CompareError,
    check_data_identity,
    compare,
    t_quantile,
    t_two_sided_p,
)

ROOT = Path(__file__).resolve().parents[1]


def trial_table(means: dict[str, float], *, seeds=(0, 1, 2), seed_sd=0.05, eval_sd=0.02,
                rng: np.random.Generator, axis: str = "graph", phase: str | None = "replicate",
                seed_shift: dict[str, int] | None = None, identity: str | None = "d1a7") -> pd.DataFrame:
    """One row per (level, seed) with the trials.parquet column names: ``val_nll_final``
    = mean + a seed effect shared by the levels (training seed k draws the same data order)
    + an independent part + evaluation noise; ``val_nll_final_stderr`` = ``eval_sd``."""
    shared = rng.normal(0, seed_sd, len(seeds))
    rows = []
    for lv, mu in means.items():
        for k, s in enumerate(seeds):
            y = 4.0 + mu + shared[k] + rng.normal(0, seed_sd) + rng.normal(0, eval_sd)
            rows.append({
                "study": "abl", "trial_id": f"t{len(rows):03d}", "status": "terminated",
                "ablated_axis": axis, "level": lv, axis: lv,
                "seed": s + (seed_shift or {}).get(lv, 0),
                "val_nll_final": y, "val_nll_final_stderr": eval_sd, "val_nll": y,
                "phase": phase, "replicate_of": None, "data_identity": identity,
            })
    return pd.DataFrame(rows)


def block_table(trials: pd.DataFrame, *, n_blocks=64, block_sd=1.0, noise_sd=0.05,
                rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-block values whose mean is each trial's number: block difficulty (shared by all
    trials, ``block_sd``) dominates, plus a small trial x block part; the trials' numbers
    and stderrs are recomputed from the blocks."""
    difficulty = rng.normal(0, block_sd, n_blocks)
    rows, out = [], trials.copy()
    for i, t in trials.iterrows():
        nll = t["val_nll_final"] + difficulty + rng.normal(0, noise_sd, n_blocks)
        out.loc[i, "val_nll_final"] = nll.mean()
        out.loc[i, "val_nll_final_stderr"] = nll.std(ddof=1) / math.sqrt(n_blocks)
        rows += [{"trial_id": t["trial_id"], "block": b, "nll": v} for b, v in enumerate(nll)]
    return out, pd.DataFrame(rows)


# --- the t distribution --------------------------------------------------------------------------

@pytest.mark.parametrize(("q", "df", "expected"), [
    (0.975, 1, 12.706204736174705), (0.975, 2, 4.302652729911275),
    (0.975, 10, 2.228138851986274), (0.995, 30, 2.749995653567), (0.975, math.inf, 1.959963984540054),
])
def test_t_quantile_matches_tables(q, df, expected):
    assert t_quantile(q, df) == pytest.approx(expected, rel=1e-8)


def test_t_p_value_inverts_the_quantile_for_fractional_df():
    for df in (1.3, 2.5, 7.9, 55.5):
        assert t_two_sided_p(t_quantile(0.975, df), df) == pytest.approx(0.05, abs=1e-9)
    assert t_two_sided_p(0.0, 4) == pytest.approx(1.0)


# --- planted and null effects ------------------------------------------------------------------

def test_planted_effect_is_found_and_covered():
    t = trial_table({"uniform": 0.0, "absorb": -0.3}, seed_sd=0.03, rng=np.random.default_rng(1))
    c = compare(t, "graph")
    (e,) = c.effects
    assert (e.level, e.reference) == ("absorb", "uniform") and c.rows == "replicate"
    assert e.low < -0.3 < e.high and e.high < 0 and e.conclusive
    assert e.method.startswith("paired by seed") and e.n_level == e.n_reference == 3
    assert e.ratio == pytest.approx(math.exp(e.diff)) and e.ratio_high < 1
    assert len(e.per_seed) == 3 and np.mean(e.per_seed) == pytest.approx(e.diff)
    line = c.verdict()
    assert "\n" not in line and line.startswith("absorb beats uniform by 0.")
    assert "(95% CI " in line and "3 seeds each, paired by seed" in line
    assert line.endswith("— conclusive")
    # the wording does not depend on the reference: the same answer from the other side
    other = compare(t, "graph", reference="absorb")
    assert other.effects[0].diff == pytest.approx(-e.diff)
    assert other.verdict().split(" (")[0] == line.split(" (")[0]


def test_planted_effect_ci_covers_the_truth_at_its_level():
    covered = conclusive = 0
    for rep in range(100):
        t = trial_table({"uniform": 0.0, "absorb": -0.25}, rng=np.random.default_rng(rep))
        (e,) = compare(t, "graph").effects
        covered += e.low <= -0.25 <= e.high
        conclusive += e.conclusive
    assert covered >= 88  # 95% nominal; 88 of 100 is 2.3 binomial s.d. below
    # d_k has s.d. about 0.076 (seed and evaluation noise of two trials): the effect is
    # about 5.7 standard errors of the mean of 3 seeds, above t(0.975, 2) = 4.3 mostly
    assert conclusive >= 60


def test_null_effect_is_inconclusive_at_least_90_of_100_times():
    verdicts = [compare(trial_table({"uniform": 0.0, "absorb": 0.0},
                                    rng=np.random.default_rng(1000 + rep)), "graph").verdict()
                for rep in range(100)]
    inconclusive = [v for v in verdicts if v.startswith("inconclusive: the CI includes 0; ")]
    assert len(inconclusive) >= 90
    assert all(v.endswith("— conclusive") for v in verdicts if v not in inconclusive)
    n = [int(v.split("--replicates ")[1].split(":")[0]) for v in inconclusive]
    assert all(6 <= k <= MAX_SUGGESTED_REPLICATES for k in n)  # at least double the 3 seeds


def test_suggested_replicates_would_resolve_the_observed_difference():
    t = trial_table({"uniform": 0.0, "absorb": -0.04}, rng=np.random.default_rng(7))
    (e,) = compare(t, "graph").effects
    assert not e.conclusive and 6 <= e.suggest_replicates <= MAX_SUGGESTED_REPLICATES
    n, sd = e.suggest_replicates, float(np.std(e.per_seed, ddof=1))
    if n < MAX_SUGGESTED_REPLICATES:  # the half-width at n seeds is below |diff|, not at n - 1
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) < abs(e.diff)
        if n > 6:
            assert t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) >= abs(e.diff)


# --- several levels, methods ---------------------------------------------------------------------

def test_three_level_axis_gets_bonferroni_effects_against_the_reference():
    t = trial_table({"tiny": 0.0, "mini": -0.5, "base": -0.02}, axis="model", seed_sd=0.02,
                    rng=np.random.default_rng(3))
    c = compare(t, "model")
    assert c.reference == "tiny" and c.levels == ("tiny", "mini", "base")
    assert [e.level for e in c.effects] == ["mini", "base"]
    assert all(e.confidence == pytest.approx(0.975) for e in c.effects)
    assert "Bonferroni over 2 comparisons" in c.adjustment
    lines = c.verdict().splitlines()
    assert len(lines) == 2 and lines[0].startswith("mini beats tiny by 0.")
    assert "97.5% CI" in lines[0] and lines[0].endswith("— conclusive [Bonferroni, 2 comparisons]")
    assert lines[1].startswith("inconclusive: the CI includes 0; rerun with --replicates ")
    assert ": base - tiny = " in lines[1] and c.effects[0].conclusive
    table = c.table()
    assert list(table["level"]) == ["mini", "base"] and (table["low"] <= table["high"]).all()
    # a wider family interval than the single comparison of the same two levels
    alone = compare(t[t["model"] != "base"], "model").effects[0]
    assert alone.high - alone.low < c.effects[0].high - c.effects[0].low
    assert compare(t, "model", reference="base").reference == "base"


def test_numeric_axis_is_ordered_numerically():
    t = trial_table({"128": 0.0, "32": 0.1, "64": 0.05}, axis="hidden_size",
                    rng=np.random.default_rng(4))
    assert compare(t, "hidden_size").levels == ("32", "64", "128")


def test_unpaired_seeds_use_welch_and_single_trials_pool():
    t = trial_table({"uniform": 0.0, "absorb": -0.3}, rng=np.random.default_rng(5),
                    seed_shift={"absorb": 10})
    (e,) = compare(t, "graph").effects
    assert e.method.startswith("Welch t-interval") and e.low < -0.3 < e.high
    one = t.drop(t.index[(t["level"] == "absorb")][1:])
    (e1,) = compare(one, "graph").effects
    assert e1.method.startswith("pooled-variance") and (e1.n_level, e1.n_reference) == (1, 3)


def test_one_seed_per_level_is_never_conclusive():
    t = trial_table({"uniform": 0.0, "absorb": -2.0}, seeds=(0,), rng=np.random.default_rng(6))
    (e,) = compare(t, "graph").effects
    assert e.high < 0 and not e.conclusive
    assert "evaluation noise only" in e.method and "not conclusive by design" in e.method
    assert e.high - e.low == pytest.approx(2 * 1.959964 * math.hypot(0.02, 0.02), rel=1e-5)
    v = compare(t, "graph").verdict()
    assert v.startswith("absorb beats uniform by 2.") and "1 seed each" in v
    assert "not conclusive by design" in v and "--replicates 3" in v


def test_block_pairing_narrows_the_ci_when_block_noise_dominates():
    rng = np.random.default_rng(8)
    t, blocks = block_table(trial_table({"uniform": 0.0, "absorb": -0.05}, seeds=(0,), rng=rng),
                            rng=rng)
    (paired,) = compare(t, "graph", blocks=blocks).effects
    (unpaired,) = compare(t, "graph").effects
    assert "paired by block over 64 blocks" in paired.method
    assert (paired.high - paired.low) < 0.2 * (unpaired.high - unpaired.low)
    assert paired.diff == pytest.approx(unpaired.diff)  # every block common: same difference
    assert paired.high < 0 and not paired.conclusive  # one seed: still not conclusive


def test_seed_and_block_pairing_agree_when_every_block_is_common():
    rng = np.random.default_rng(9)
    t, blocks = block_table(trial_table({"uniform": 0.0, "absorb": -0.2}, rng=rng), rng=rng)
    (both,) = compare(t, "graph", blocks=blocks).effects
    (seed_only,) = compare(t, "graph").effects
    assert both.method.startswith("paired by seed and block")
    assert seed_only.method.startswith("paired by seed;")
    assert (both.diff, both.low, both.high) == pytest.approx(
        (seed_only.diff, seed_only.low, seed_only.high))
    # blocks only some trials share: the differences use the common ones
    some = blocks[~((blocks["trial_id"] == "t000") & (blocks["block"] < 32))]
    (part,) = compare(t, "graph", blocks=some).effects
    assert part.method.startswith("paired by seed and block")
    nll = blocks.set_index(["trial_id", "block"])["nll"]
    d0 = (nll["t003"].loc[32:] - nll["t000"].loc[32:]).mean()
    assert part.per_seed[0] == pytest.approx(d0)


# --- which rows ----------------------------------------------------------------------------------

def test_replicate_rows_are_used_when_there_are_any():
    rng = np.random.default_rng(10)
    tune = trial_table({"uniform": 0.0, "absorb": -1.0}, phase="tune", rng=rng)
    rep = trial_table({"uniform": 0.0, "absorb": 0.0}, seeds=(5, 6, 7), seed_sd=0.0, rng=rng)
    rep["trial_id"] = [f"r{i}" for i in range(len(rep))]
    both = pd.concat([tune, rep], ignore_index=True)
    c = compare(both, "graph")
    assert c.rows == "replicate" and abs(c.effects[0].diff) < 0.2
    assert compare(tune, "graph").rows == "finished"  # no replicate: every finished trial
    rep.loc[0, "status"] = "error"
    assert compare(pd.concat([tune, rep]), "graph").effects[0].n_reference == 2
    # mid-replication: a level with no finished replicate yet is named, not compared
    partial = pd.concat([tune, rep[rep["level"] == "uniform"]])
    with pytest.raises(CompareError, match="has 1 level with finished replicate trials"):
        compare(partial, "graph")
    three = trial_table({"a": 0.0, "b": 0.0, "c": 0.0}, axis="x", phase="tune", rng=rng)
    rep3 = trial_table({"a": 0.0, "b": -0.5}, axis="x", rng=rng)
    c = compare(pd.concat([three, rep3.assign(trial_id=lambda d: "r" + d["trial_id"])]), "x")
    assert [e.level for e in c.effects] == ["b"] and c.missing == ("c",)
    assert c.verdict().splitlines()[-1] == "not compared: c has no finished replicate trial yet"


def test_old_tables_without_phase_or_final_columns():
    t = trial_table({"uniform": 0.0, "absorb": -0.3}, rng=np.random.default_rng(11))
    old = t.drop(columns=["phase", "replicate_of", "data_identity", "val_nll_final",
                          "val_nll_final_stderr", "graph"])
    c = compare(old, "graph", metric="val_nll")  # the level column names the levels
    assert c.metric == "val_nll" and c.rows == "finished" and c.effects[0].conclusive


# --- refusals ------------------------------------------------------------------------------------

def test_refusals_are_one_clear_line():
    rng = np.random.default_rng(12)
    t = trial_table({"uniform": 0.0, "absorb": -0.3}, rng=rng)
    mixed = t.copy()
    mixed.loc[mixed["seed"] == 2, "data_identity"] = "beef"
    cases = [
        (lambda: compare(mixed, "graph"), "measured on different data"),
        (lambda: check_data_identity(mixed), "different data (data_identity d1a7"),
        (lambda: compare(t[t["level"] == "absorb"], "graph"), "has 1 level with finished replicate trials (absorb)"),
        (lambda: compare(t, "graph", reference="radd"), "'radd' is not a level of 'graph'; levels: "
                                                        "uniform, absorb"),
        (lambda: compare(t, "noise"), "no column 'noise'"),
        (lambda: compare(t, "graph", metric="val_nll_best"), "no column 'val_nll_best'"),
        (lambda: compare(t, "graph", confidence=95), "confidence must be in (0, 1)"),
    ]
    for call, text in cases:
        with pytest.raises(CompareError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert text in str(info.value) and "\n" not in str(info.value)
    check_data_identity(t.assign(data_identity=None))  # older rows: nothing to check


def test_compare_imports_neither_torch_nor_ray():
    code = "import sys, sedd_ray.compare; print([m for m in ('torch', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# --- the report (experiments/analyze.py) on hand-written Parquet ---------------------------------

sys.path.insert(0, str(ROOT))  # `experiments` is a folder of scripts, not installed

from experiments import analyze  # noqa: E402
from sedd_ray import results  # noqa: E402
from sedd_ray.config import apply_params, preset  # noqa: E402
from sedd_ray.results import ResultsWriter, trial_row_from_config  # noqa: E402


def write_study(storage: Path, name: str, table: pd.DataFrame, axis: str = "graph",
                tune_per_level: int = 2) -> None:
    """``table``'s rows as replicates, after ``tune_per_level`` tuning trials per level
    (different lr; the first is the one replicated), with learning curves."""
    rng = np.random.default_rng(0)
    with ResultsWriter(storage, name) as w:
        k = 0
        for level, rows in table.groupby("level", sort=False):
            tuned = []
            for j in range(tune_per_level):
                y = float(rows["val_nll_final"].mean()) + 0.1 * j
                tuned.append(f"t{k:03d}")
                _write_trial(w, f"t{k:03d}", axis, level, {"lr": 1e-3 * (j + 1), "seed": j}, y,
                             "tune", None, rows["data_identity"].iloc[0], rng)
                k += 1
            for _, r in rows.iterrows():
                _write_trial(w, r["trial_id"], axis, level, {"lr": 1e-3, "seed": int(r["seed"])},
                             float(r["val_nll_final"]), r["phase"], tuned[0] if tuned else None,
                             r["data_identity"], rng)


def _write_trial(w, tid, axis, level, params, y, phase, replicate_of, identity, rng,
                 ablated=True):
    cfg = apply_params(preset("tiny"), {axis: level, **params})
    row = trial_row_from_config(cfg)
    non_emb = 12 * cfg.model.n_layers * cfg.model.hidden_size**2
    row.update(n_params=2 * non_emb, n_params_non_embedding=non_emb)
    row.update(trial_id=tid, status="terminated", ablated_axis=axis if ablated else None,
               level=level if ablated else None, step=40,
               tokens_seen=40 * 512, val_nll=y, best_val_nll=y - 0.01, val_ppl_bound=math.exp(y),
               val_nll_final=y, val_nll_final_stderr=0.02, phase=phase, replicate_of=replicate_of,
               data_identity=identity)
    w.upsert_trial(row)
    w.append_history(tid, [{"step": s, "tokens": s * 512, "val_nll": y + 5 / s + rng.normal(0, .01)}
                           for s in (10, 20, 40)])


def test_report_states_the_verdict_first_then_effects(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(20)
    t = trial_table({"uniform": 0.0, "absorb": -0.4}, seed_sd=0.03, rng=rng)
    t["trial_id"] = [f"r{i}" for i in range(len(t))]
    t, blocks = block_table(t, rng=rng)
    write_study(tmp_path, "abl", t)
    monkeypatch.setattr(results, "read_blocks", lambda storage, study: blocks, raising=False)
    assert analyze.main(["--storage", str(tmp_path), "--study", "abl"]) == 0
    out = capsys.readouterr().out.splitlines()
    report = (tmp_path / "abl" / "report.md").read_text()
    first = report.splitlines()[0]
    assert first.startswith("absorb beats uniform by 0.") and first.endswith("— conclusive")
    assert "3 seeds each, paired by seed and block" in first and out[0] == first
    assert analyze.read_verdicts(tmp_path / "abl" / "report.md") == [first]
    assert report.index("## Effect of `graph` against `uniform`") < report.index("## `graph`")
    diff = float(re.search(r"\| absorb \| ([-+0-9.]+) \|", report).group(1))
    assert diff == pytest.approx(-0.4, abs=0.1) and "paired by seed and block" in report
    assert "Over the replicate trials" in report
    assert "(4 tune, 6 replicate)" in report
    for png in ("graph_effects.png", "learning_curves.png", "graph_bars.png", "importances.png"):
        assert (tmp_path / "abl" / png).stat().st_size > 1000
    # importances over the 4 tuning trials only, not the replicates
    assert "over 4 finished tuning trials" in report


def test_report_of_a_three_level_axis_and_too_few_tuning_trials(tmp_path):
    t = trial_table({"tiny": 0.0, "mini": -0.5, "base": -0.6}, axis="model", seed_sd=0.02,
                    rng=np.random.default_rng(21))
    t["trial_id"] = [f"r{i}" for i in range(len(t))]
    write_study(tmp_path, "sizes", t, axis="model", tune_per_level=0)
    report = analyze.write_report(tmp_path, "sizes").read_text()
    lines = report.splitlines()
    assert lines[0].startswith("mini beats tiny by 0.") and lines[2].startswith("base beats tiny")
    assert all("[Bonferroni, 2 comparisons]" in ln for ln in (lines[0], lines[2]))
    assert lines[4] == "# Study `sizes`"
    assert "p (Bonferroni)" in report and "97.5% CI" in report
    assert "Too few finished trials for parameter importances (0" in report
    assert "Only tuning trials count" in report


def test_report_of_old_parquet_falls_back_to_val_nll(tmp_path):
    t = trial_table({"uniform": 0.0, "absorb": 0.0}, seeds=(0,), rng=np.random.default_rng(22))
    with ResultsWriter(tmp_path, "old") as w:
        for _, r in t.iterrows():
            row = trial_row_from_config(apply_params(preset("tiny"), {"graph": r["level"]}))
            row.update(trial_id=r["trial_id"], status="terminated", ablated_axis="graph",
                       level=r["level"], val_nll=r["val_nll"], val_nll_stderr=0.3,
                       val_ppl_bound=math.exp(r["val_nll"]))
            w.upsert_trial(row)
    report = analyze.write_report(tmp_path, "old").read_text()
    first = report.splitlines()[0]
    assert "1 seed each, evaluation noise only, no seed spread" in first
    assert "not conclusive by design; rerun with --replicates 3" in first
    assert "`val_nll`: level" not in report and "| absorb |" in report
    assert "Each trial contributes its best evaluation" in report
    assert (tmp_path / "old" / "graph_effects.png").stat().st_size > 1000


def test_report_refuses_trials_of_different_data(tmp_path, capsys):
    t = trial_table({"uniform": 0.0, "absorb": -0.4}, rng=np.random.default_rng(23))
    t["trial_id"] = [f"r{i}" for i in range(len(t))]
    t.loc[t["seed"] == 0, "data_identity"] = "beef"
    write_study(tmp_path, "mixed", t)
    assert analyze.main([str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different data" in err and "beef" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["history", "trials.parquet"]


def test_search_study_states_its_best_config(tmp_path):
    rng = np.random.default_rng(24)
    with ResultsWriter(tmp_path, "search") as w:
        for k, (graph, lr) in enumerate([("uniform", 1e-3), ("absorb", 1e-3), ("absorb", 3e-3)]):
            _write_trial(w, f"t{k:03d}", "graph", graph, {"lr": lr, "seed": 0}, 4.0 - 0.1 * k,
                         "tune", None, "d1a7", rng, ablated=False)
    report = analyze.write_report(tmp_path, "search")
    first = report.read_text().splitlines()[0]
    assert first.startswith("search study: best trial `t002` val_nll_final 3.800 nats/token")
    assert "± 0.020 evaluation s.e., the minimum over 3 trials (biased low" in first
    with ResultsWriter(tmp_path, "search") as w:
        for k, y in enumerate((3.9, 3.95, 3.85)):
            _write_trial(w, f"r{k}", "graph", "absorb", {"lr": 3e-3, "seed": 10 + k}, y,
                         "replicate", "t002", "d1a7", rng, ablated=False)
    (line,) = analyze.read_verdicts(analyze.write_report(tmp_path, "search"))
    half = t_quantile(0.975, 2) * 0.05 / math.sqrt(3)
    assert line == (f"best config (replicates of `t002`): val_nll_final 3.900 nats/token "
                    f"(95% CI {3.9 - half:.3f} to {3.9 + half:.3f}; 3 seeds)")


def _write_ar_reference(storage: Path, name: str, ys: dict[int, float], identity="d1a7",
                        ids: list[str] | None = None, kind: str = "ar",
                        replicated: bool = True) -> None:
    """An AR reference study as ``ablate_graph.py --ar-reference`` writes it: search mode
    (no ablated axis), ``kind=ar``, one tuning trial, replicates on ``ys``'s seeds (or,
    ``replicated=False``, tuning trials only)."""
    rng = np.random.default_rng(1)
    ids = ids or [f"a{k + 1:03d}" for k in range(len(ys))]
    with ResultsWriter(storage, name) as w:
        if replicated:
            _write_trial(w, "a000", "kind", kind, {"lr": 1e-3, "seed": 0}, min(ys.values()),
                         "tune", None, identity, rng, ablated=False)
        for tid, (seed, y) in zip(ids, ys.items()):
            _write_trial(w, tid, "kind", kind, {"lr": 1e-3, "seed": seed}, y,
                         "replicate" if replicated else "tune", "a000" if replicated else None,
                         identity, rng, ablated=False)


def test_report_shows_the_ar_reference_and_each_levels_gap_to_it(tmp_path, monkeypatch, capsys):
    """The AR study's trial ids are the ablation's own (two Tune experiments may repeat an
    id): its per-block values must still pair with the right trials."""
    rng = np.random.default_rng(25)
    t = trial_table({"uniform": 0.0, "absorb": -0.4}, seed_sd=0.02, rng=rng)
    t["trial_id"] = [f"r{i}" for i in range(len(t))]
    t, blocks = block_table(t, rng=rng)
    write_study(tmp_path, "abl", t)
    monkeypatch.setattr(results, "read_blocks", lambda storage, study: blocks, raising=False)
    plain = analyze.write_report(tmp_path, "abl").read_text()
    assert "AR reference" not in plain and not (tmp_path / "abl" / "ar_gap.png").exists()
    # AR: 0.7 below uniform per block, plus its own seed spread; the same trial ids r0..r2
    uni = t[t["level"] == "uniform"].reset_index(drop=True)
    spread = np.array([0.03, -0.05, 0.02])
    ar_blocks = blocks[blocks["trial_id"].isin(uni["trial_id"])].copy()
    ar_blocks["nll"] -= 0.7 - ar_blocks["trial_id"].map(dict(zip(uni["trial_id"], spread)))
    ar_y = dict(zip(uni["seed"], ar_blocks.groupby("trial_id")["nll"].mean()[uni["trial_id"]]))
    _write_ar_reference(tmp_path, "abl-ar", ar_y, ids=list(uni["trial_id"]))
    monkeypatch.setattr(results, "read_blocks", lambda storage, study:
                        ar_blocks if study == "abl-ar" else blocks, raising=False)
    assert analyze.main([str(tmp_path / "abl")]) == 0
    out = capsys.readouterr().out.splitlines()
    report = (tmp_path / "abl" / "report.md").read_text()
    verdicts = analyze.read_verdicts(tmp_path / "abl" / "report.md")
    assert verdicts[0].startswith("absorb beats uniform by 0.")
    assert verdicts[1].startswith("AR reference (`abl-ar`: the same backbone, causal, exact NLL):")
    assert verdicts[1].endswith("; 3 seeds)") and out[:3] == verdicts[:3]
    gap_re = (r"diffusion-to-AR gap \(an upper bound, as the diffusion number is\): (\w+) - AR = "
              r"([-+0-9.]+) nats/token \(97.5% CI ([-+0-9.]+) to ([-+0-9.]+); 3 seeds each, "
              r"paired by seed and block\)")
    gaps = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(gap_re, report)}
    # uniform - AR = 0.7 - spread per seed: the CI is the t-interval of those three values
    d = 0.7 - spread
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.9875, 2) is wider; below
    assert gaps["uniform"][0] == pytest.approx(d.mean(), abs=1e-3)
    assert gaps["uniform"][1] < d.mean() - half < d.mean() + half < gaps["uniform"][2]
    assert gaps["absorb"][0] == pytest.approx(0.3, abs=0.1)
    assert "## Autoregressive reference" in report and "![diffusion-to-AR gap](ar_gap.png)" in report
    assert "Over the replicate trials of both studies." in report
    for png in ("ar_gap.png", "graph_bars.png"):
        assert (tmp_path / "abl" / png).stat().st_size > 1000


def test_an_ar_reference_that_cannot_be_compared_says_why(tmp_path, capsys):
    rng = np.random.default_rng(26)
    t = trial_table({"uniform": 0.0, "absorb": -0.4}, rng=rng)
    t["trial_id"] = [f"r{i}" for i in range(len(t))]
    write_study(tmp_path, "abl", t)

    def ar_lines(name: str) -> list[str]:
        report = analyze.write_report(tmp_path, "abl", ar_reference_name=name).read_text()
        return [ln for ln in analyze.read_verdicts(tmp_path / "abl" / "report.md")
                if "AR" in ln] + (["<gap plot>"] if "![diffusion-to-AR gap]" in report else [])

    _write_ar_reference(tmp_path, "other-data", {0: 3.0, 1: 3.1}, identity="beef")
    lines = ar_lines("other-data")
    assert lines == [lines[0]] and lines[0].startswith(
        "AR reference `other-data` not shown: refusing to compare: trials were measured on "
        "different data")
    _write_ar_reference(tmp_path, "not-ar", {0: 3.0, 1: 3.1}, kind="diffusion")
    assert ar_lines("not-ar") == ["AR reference `not-ar` not shown: its trials are model.kind "
                                  "diffusion, not ar"]
    # the AR study's tuning trials only: said so, and compared as what they are
    _write_ar_reference(tmp_path, "tuned-only", {0: 3.0, 1: 3.2}, replicated=False)
    lines = ar_lines("tuned-only")
    assert lines[0].startswith("AR reference (`tuned-only`: the same backbone, causal, exact "
                               "NLL; not replicated yet): 3.100 nats/token, the mean of 2 tuning")
    assert all("(the ablation's replicate trials and the AR reference's tuning trials)" in ln
               for ln in lines[1:3]) and lines[3] == "<gap plot>"
    assert analyze.main([str(tmp_path / "abl"), "--ar-reference", "missing"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
