"""experiments/ and the sample CLI, end to end and offline.

One real study (``experiments/ablate_graph.py --smoke-test``: 1 tuning trial of 20 steps
per graph, then each graph's config with 2 fresh seeds, 6 trials on a local Ray cluster,
in a subprocess) is shared by the module; its report, plots and the
``sample --trial best`` CLI are checked against it. The analysis itself is also tested on
hand-written Parquet (no Ray): importances, scaling fits, the true-entropy plot, and the
errors of the sample CLI.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `experiments` is a folder of scripts, not installed

from experiments import analyze  # noqa: E402
from sedd_ray.config import apply_params, preset  # noqa: E402
from sedd_ray.layout import StudyLayout  # noqa: E402
from sedd_ray.results import (  # noqa: E402
    ResultsWriter,
    get_trial,
    read_trials,
    trial_row_from_config,
)

# --- hand-written studies (no Ray) ------------------------------------------------------------

def fake_study(storage: Path, name: str, axis: str, levels: list[str], per_level: int = 2,
               true_nll: float | None = None, statuses: dict[int, str] | None = None) -> None:
    """A study in Parquet as the Tune callback writes it, with made-up numbers: level i's
    bound falls with i; trial k gets status ``statuses.get(k, "terminated")``."""
    statuses = statuses or {}
    with ResultsWriter(storage, name) as w:
        k = 0
        for i, level in enumerate(levels):
            for j in range(per_level):
                tid = f"t{k:03d}"
                params = {axis: level, "lr": 1e-3 * (1 + j + i), "warmup_steps": 10 + 7 * k,
                          "seed": j}
                cfg = apply_params(preset("tiny"), params)
                non_emb = 12 * cfg.model.n_layers * cfg.model.hidden_size**2
                # A model axis follows a power law in size; any other axis improves with i.
                nll = (8 * non_emb**-0.05 if axis == "model" else 5.0 - 0.3 * i) + 0.02 * j
                row = trial_row_from_config(cfg)
                row.update(trial_id=tid, status=statuses.get(k, "terminated"), ablated_axis=axis,
                           level=level, n_params=non_emb + 2 * 512 * cfg.model.hidden_size,
                           n_params_non_embedding=non_emb, step=200, tokens_seen=200 * 1024,
                           device_hours=0.01)
                if row["status"] == "error":
                    row["error"] = "NonFiniteLossError: training loss became non-finite"
                elif row["status"] != "running":
                    row.update(val_nll=nll, best_val_nll=nll, val_ppl_bound=math.exp(nll))
                    if true_nll is not None:
                        row.update(true_nll=true_nll, bound_gap=nll - true_nll)
                w.upsert_trial(row)
                w.append_history(tid, [{"step": s, "tokens": s * 1024, "train_loss": 6.0,
                                        "val_nll": nll + 50 / s} for s in (50, 100, 150, 200)])
                k += 1


def table_rows(report: str, axis: str) -> list[dict[str, str]]:
    """The data rows of the Markdown table under ``## `axis```."""
    section = report.split(f"## `{axis}`", 1)[1].strip().splitlines()
    lines = []
    for ln in section:  # the first table: a run of "|" lines
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r)) for r in rows]


def test_analyze_imports_neither_torch_nor_ray():
    code = ("import sys, experiments.analyze; "
            "print([m for m in ('torch', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_report_of_an_ablation_with_a_failed_trial(tmp_path):
    fake_study(tmp_path, "abl", "graph", ["uniform", "absorb"], per_level=3, statuses={0: "error"})
    files = StudyLayout(str(tmp_path), "abl").trial("t003").trainer_files()  # the best trial
    files.root.mkdir(parents=True)
    files.samples.write_text(json.dumps({"step": 100, "text": "OLD SAMPLE"}) + "\n"
                                     + json.dumps({"step": 200, "text": "ROMEO: hello"}) + "\n")
    path = analyze.write_report(tmp_path, "abl")
    report = path.read_text()
    rows = {r["graph"]: r for r in table_rows(report, "graph")}
    assert rows["uniform"]["n"] == "2 of 3" and rows["absorb"]["n"] == "3"
    assert float(rows["absorb"]["val_ppl_bound mean"]) == pytest.approx(
        math.exp(4.7) / 3 + math.exp(4.72) / 3 + math.exp(4.74) / 3, rel=1e-3)
    assert rows["absorb"]["best trial"] == "`t003`"
    assert "lr=" in rows["absorb"]["best config"]
    for png in ("graph_bars.png", "learning_curves.png", "importances.png"):
        assert (tmp_path / "abl" / png).stat().st_size > 1000
    assert "PedAnovaImportanceEvaluator" in report and "| `graph` |" in report
    assert "ROMEO: hello" in report and "OLD SAMPLE" not in report  # the last samples only
    assert "## Failed trials" in report and "NonFiniteLossError" in report


def test_too_few_trials_for_importances_is_a_note(tmp_path):
    fake_study(tmp_path, "two", "noise", ["geometric", "loglinear"], per_level=1)
    report = analyze.write_report(tmp_path, "two").read_text()
    assert "Too few finished trials for parameter importances (2" in report
    rows = table_rows(report, "noise")
    assert [r["n"] for r in rows] == ["1", "1"] and rows[0]["s.e."] == "–"


def test_report_of_a_study_without_finished_trials(tmp_path):
    fake_study(tmp_path, "bad", "graph", ["uniform", "absorb"], per_level=1,
               statuses={0: "running", 1: "error"})
    report = analyze.write_report(tmp_path, "bad").read_text()
    assert [r["n"] for r in table_rows(report, "graph")] == ["0 of 1", "0 of 1"]
    assert "No finished trial yet." in report and "NonFiniteLossError" in report


def test_model_size_report_fits_power_laws(tmp_path):
    fake_study(tmp_path, "sizes", "model", ["base", "tiny", "mini"])
    report = analyze.write_report(tmp_path, "sizes").read_text()
    assert [r["model"] for r in table_rows(report, "model")] == ["tiny", "mini", "base"]
    assert (tmp_path / "sizes" / "scaling.png").is_file()
    assert "6·N·D" in report
    exps = [float(x) for x in re.findall(r"\^([+-][0-9.]+) \(3 points\)", report)]
    assert exps[0] == pytest.approx(-0.05, abs=0.01)  # the best trial per size: the law itself
    assert len(exps) == 2 and exps[1] < 0  # same tokens: compute grows with N


def test_fit_power_law_recovers_the_exponent():
    fit = analyze.fit_power_law([1e3, 1e4, 1e5], [2 * x**-0.1 for x in (1e3, 1e4, 1e5)])
    assert fit.b == pytest.approx(-0.1) and fit.a == pytest.approx(2)
    assert analyze.fit_power_law([1e3, 1e3], [1.0, 2.0]) is None


def test_synthetic_source_plots_bound_vs_entropy(tmp_path):
    fake_study(tmp_path, "syn", "graph", ["uniform", "absorb"], true_nll=4.0)
    report = analyze.write_report(tmp_path, "syn").read_text()
    assert (tmp_path / "syn" / "graph_bound_vs_entropy.png").is_file()
    assert "gap (nats)" in report


def test_analyze_cli_errors_are_short(tmp_path, capsys):
    assert analyze.main(["--storage", str(tmp_path)]) == 2
    assert "no studies under" in capsys.readouterr().err
    fake_study(tmp_path, "a", "graph", ["uniform", "absorb"], per_level=1)
    fake_study(tmp_path, "b", "graph", ["uniform", "absorb"], per_level=1)
    assert analyze.main(["--storage", str(tmp_path)]) == 2
    assert "name one (--study NAME)" in capsys.readouterr().err
    assert analyze.main([str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.md").is_file()


# --- sample CLI errors on hand-written studies ---------------------------------------------------

def run_sample(capsys, *args: str) -> tuple[int, str, str]:
    from sedd_ray import sample

    rc = sample.main(["--no-progress", "--steps", "2", "--num-samples", "1", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_sample_without_a_study_or_finished_trial(tmp_path, capsys):
    rc, _, err = run_sample(capsys, "--storage", str(tmp_path))
    assert rc == 1 and "no studies under" in err
    fake_study(tmp_path, "s", "graph", ["uniform", "absorb"], per_level=1,
               statuses={0: "running", 1: "error"})
    rc, _, err = run_sample(capsys, "--storage", str(tmp_path))
    assert rc == 1 and "no finished trial" in err and "1 running, 1 error" in err
    rc, _, err = run_sample(capsys, "--storage", str(tmp_path), "--trial", "t001")
    assert rc == 1 and "t001" in err and "has no checkpoint (status error)" in err
    rc, _, err = run_sample(capsys, "--storage", str(tmp_path), "--trial", "nope")
    assert rc == 1 and "no trial 'nope'" in err and "t000" in err
    rc, _, err = run_sample(capsys, "--storage", str(tmp_path), "--study", "other")
    assert rc == 1 and "no study 'other'" in err


# --- one real study, shared by the tests below ------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """``python experiments/ablate_graph.py --smoke-test --ar-reference`` in a subprocess
    (its own Ray): the graph study and its AR reference study beside it."""
    storage = tmp_path_factory.mktemp("results")
    # Its own local cluster: never attach to one another test or session started.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "ablate_graph.py"), "--smoke-test",
         "--ar-reference", "--storage", str(storage)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage, proc.stdout, proc.stderr


@pytest.mark.ray
def test_script_prints_study_dir_and_report(smoke_study):
    storage, stdout, stderr = smoke_study
    study_dir = storage / "graph-ablation"
    assert f"study directory: {study_dir}" in stdout
    assert f"report: {study_dir / 'report.md'}" in stdout
    # a local cluster runs no preemption watcher (launch.LOCAL_CLUSTER_ENV): no actor, and
    # none of the core-worker error lines its creation printed on every trial
    assert "PreemptionWatcher" not in stdout + stderr


@pytest.mark.ray
def test_report_has_one_row_per_level_and_its_plots(smoke_study):
    storage, *_ = smoke_study
    study_dir = storage / "graph-ablation"
    report = (study_dir / "report.md").read_text()
    rows = table_rows(report, "graph")
    assert sorted(r["graph"] for r in rows) == ["absorb", "uniform"]
    assert all(r["n"] == "3" for r in rows)  # the smoke test: 1 tuning trial + 2 replicates
    assert all(float(r["val_ppl_bound mean"]) > 1 for r in rows)
    for png in ("graph_bars.png", "learning_curves.png"):
        assert (study_dir / png).stat().st_size > 1000
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (study_dir / ref).is_file()
    assert "Too few finished trials" in report  # 2 tuning trials: importances noted, not faked
    assert "## Samples from the best trial" in report and "```text" in report
    trials = read_trials(storage, "graph-ablation")
    assert set(trials["status"]) == {"terminated"} and trials["checkpoint_path"].notna().all()
    # both phases: each graph's tuned config re-run with the same 2 fresh seeds (the
    # script's tuning seeds are 0 and 1: the replicates get 2 and 3)
    assert sorted(trials["phase"]) == ["replicate"] * 4 + ["tune"] * 2
    rep = trials[trials["phase"] == "replicate"]
    assert sorted(zip(rep["level"], rep["seed"])) == [("absorb", 2), ("absorb", 3),
                                                      ("uniform", 2), ("uniform", 3)]


@pytest.mark.ray
def test_the_ar_reference_runs_beside_the_ablation_and_joins_its_report(smoke_study):
    """``--ar-reference``: the study ``graph-ablation-ar`` (model.kind=ar, the same tuning
    budget as one graph, replicated with the graphs' seeds, on the same data) and the
    graph report's reference lines and plots."""
    storage, stdout, _ = smoke_study
    ar = read_trials(storage, "graph-ablation-ar")
    graph = read_trials(storage, "graph-ablation")
    kind = next(c for c in ar.columns if c.endswith("kind"))
    assert set(ar[kind]) == {"ar"} and set(ar["status"]) == {"terminated"}
    assert sorted(ar["phase"]) == ["replicate"] * 2 + ["tune"]
    assert sorted(ar.loc[ar["phase"] == "replicate", "seed"]) == [2, 3]
    assert set(ar["data_identity"]) == set(graph["data_identity"])
    assert (ar["val_nll_final"] > 0).all()
    report = (storage / "graph-ablation" / "report.md").read_text()
    verdicts = [ln for ln in stdout.splitlines() if ln.startswith("AR reference (")]
    assert verdicts and verdicts[0] in report and "`graph-ablation-ar`" in verdicts[0]
    for level in ("absorb", "uniform"):
        assert f"diffusion-to-AR gap (an upper bound, as the diffusion number is): {level} - AR" \
            in report
    assert "2 seeds each, paired by seed and block" in report
    assert (storage / "graph-ablation" / "ar_gap.png").stat().st_size > 1000
    assert f"study directory: {storage / 'graph-ablation-ar'}" in stdout


@pytest.mark.ray
def test_sample_best_prints_text_and_is_deterministic(smoke_study, capsys, tmp_path):
    storage, *_ = smoke_study
    args = ["--storage", str(storage), "--study", "graph-ablation", "--trial", "best",
            "--length", "16", "--seed", "3"]
    rc, out, err = run_sample(capsys, *args, "--jsonl", str(tmp_path / "a.jsonl"))
    assert rc == 0, err
    assert out.startswith("# trial ") and "--- sample 0 ---" in out
    text = out.split("--- sample 0 ---\n", 1)[1].split("\nwrote", 1)[0]
    assert text.strip()
    rows = [json.loads(ln) for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == text and rows[0]["study"] == "graph-ablation"
    rc, out2, _ = run_sample(capsys, *args)
    assert rc == 0 and out2.split("--- sample 0 ---\n", 1)[1] in out  # same seed, same text
    rc, out3, _ = run_sample(capsys, *args[:-1], "4")
    assert rc == 0 and out3.split("--- sample 0 ---\n", 1)[1] != out2.split("--- sample 0 ---\n", 1)[1]


@pytest.mark.ray
def test_sample_infill_keeps_prefix_and_suffix(smoke_study, capsys):
    storage, *_ = smoke_study
    from sedd_ray.results import best_trial
    from sedd_ray.sample import load_model

    m = load_model(best_trial(storage, "graph-ablation")["checkpoint_path"])
    texts = m.generate(num_samples=2, length=24, steps=4, seed=0, prefix="ROMEO:", suffix=" end.")
    assert all(t.startswith("ROMEO:") and t.endswith(" end.") for t in texts)
    rc, _, err = run_sample(capsys, "--storage", str(storage), "--study", "graph-ablation",
                            "--length", "4",
                            "--prefix", "ROMEO: a prefix much longer than four tokens")
    assert rc == 1 and "--prefix takes" in err and "more than --length 4" in err


@pytest.mark.ray
def test_sample_missing_or_corrupt_checkpoint(smoke_study, capsys, tmp_path):
    storage, *_ = smoke_study
    rc, _, err = run_sample(capsys, "--checkpoint", str(tmp_path / "nowhere"))
    assert rc == 1 and "does not exist" in err
    trial_id = read_trials(storage, "graph-ablation")["trial_id"].iloc[0]
    ckpt = Path(get_trial(storage, "graph-ablation", trial_id)["checkpoint_path"])
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "state.pt", "r+b") as f:
        f.truncate(100)
    rc, _, err = run_sample(capsys, "--checkpoint", str(bad))
    assert rc == 1 and "fails its checksum" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
