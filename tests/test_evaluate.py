"""python -m sedd_ray.evaluate: zero-shot bounds on several corpora, rows in evals.parquet,
resumable, and bad input refused before anything is written. Tiny models, no Ray."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import tiny_config

from sedd_ray import evaluate
from sedd_ray.results import read_evals

MARKOV = "markov:vocab=8,order=1,sharpness=2,blocks=512"
FAST = ["--blocks", "16", "--draws", "4", "--batch-size", "64"]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_bundle) -> Path:
    """A tiny model trained a few steps on the test corpus (its BPE tokenizer)."""
    from sedd_ray.trainer import train

    out = tmp_path_factory.mktemp("text-run")
    res = train(tiny_config(steps=20, ckpt_every=20, eval_every=20), out, bundle=tiny_bundle)
    return Path(res.checkpoint_dir)


@pytest.fixture(scope="module")
def markov_ckpt(tmp_path_factory) -> Path:
    """A tiny model trained on a Markov source (its own 8-symbol tokenizer)."""
    from sedd_ray.trainer import train

    out = tmp_path_factory.mktemp("markov-run")
    cfg = tiny_config(corpus=MARKOV, seq_len=16, steps=60, ckpt_every=60, eval_every=60)
    return Path(train(cfg, out).checkpoint_dir)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[Path]:
    """Two local corpora: plain English text, different from each other."""
    d = tmp_path_factory.mktemp("texts")
    a, b = d / "a.txt", d / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    b.write_text("\n".join(f"Line {i}: to be, or not to be, that is the question." for i in
                           range(80)))
    return [a, b]


def _run(capfd, argv: list[str]) -> tuple[int, str, str]:
    rc = evaluate.main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def test_two_local_corpora_and_a_synthetic_source_land_in_evals_and_rerun_adds_nothing(
        text_ckpt, markov_ckpt, texts, tmp_path, capfd):
    evals = tmp_path / "evals.parquet"
    corpora = f"text:{texts[0]},text:{texts[1]}"
    rc, out, err = _run(capfd, ["--checkpoint", str(text_ckpt), "--corpus", corpora,
                                "--evals", str(evals), *FAST])
    assert rc == 0, err
    assert "zero-shot text:" in out and "no detokeniser" in out
    rc, out, err = _run(capfd, ["--checkpoint", str(markov_ckpt), "--corpus",
                                "markov:vocab=8,order=1,sharpness=2", "--evals", str(evals),
                                *FAST])
    assert rc == 0, err
    df = read_evals(evals)
    assert set(df["corpus"]) == {f"text:{texts[0]}", f"text:{texts[1]}",
                                 "markov:vocab=8,order=1,sharpness=2"}
    bound = df[df["metric"] == "nll_bound"]
    assert len(bound) == 3 and (bound["n"] == 16).all() and (bound["stderr"] > 0).all()
    assert all(json.loads(s)["draws"] == 4 for s in bound["settings"])
    # the bound on the synthetic source is not below its exact entropy (up to noise)
    syn = bound[bound["corpus"].str.startswith("markov")].iloc[0]
    assert syn["reference"] > 0
    assert syn["value"] >= syn["reference"] - 3 * syn["stderr"], syn
    gap = df[df["metric"] == "bound_gap"].iloc[0]
    assert math.isclose(gap["value"], syn["value"] - syn["reference"], rel_tol=1e-9)
    # a rerun adds nothing and recomputes nothing
    before = evals.stat().st_mtime_ns
    for ckpt, corpus in ((text_ckpt, corpora), (markov_ckpt, "markov:vocab=8,order=1,sharpness=2")):
        rc, out, err = _run(capfd, ["--checkpoint", str(ckpt), "--corpus", corpus,
                                    "--evals", str(evals), *FAST])
        assert rc == 0 and "0 new row(s)" in out and "0 checkpoint(s) evaluated" in out, out
    assert evals.stat().st_mtime_ns == before and len(read_evals(evals)) == len(df)
    # other settings are a new evaluation
    rc, out, err = _run(capfd, ["--checkpoint", str(markov_ckpt), "--corpus",
                                "markov:vocab=8,order=1,sharpness=2", "--evals", str(evals),
                                *FAST[:2], "--draws", "2"])
    assert rc == 0 and "3 new row(s)" in out, out


def test_samples_of_a_synthetic_model_get_truth_rows(markov_ckpt, tmp_path, capfd):
    evals = tmp_path / "evals.parquet"
    rc, out, err = _run(capfd, ["--checkpoint", str(markov_ckpt), "--samples", "16",
                                "--steps", "8", "--evals", str(evals)])
    assert rc == 0, err
    df = read_evals(evals)
    metrics = set(df["metric"])
    assert {"sample_entropy", "distinct_2", "rep_4", "truth_nll", "truth_gap"} <= metrics
    truth = df[df["metric"] == "truth_nll"].iloc[0]
    assert truth["corpus"] == MARKOV and truth["n"] == 16 and truth["seed"] == 0
    assert json.loads(truth["settings"])["steps"] == 8
    # exact entropy of an 8-symbol block per token is at most log 8
    assert 0 < truth["reference"] <= math.log(8) and truth["value"] > 0


def test_the_default_next_to_a_checkpoint(markov_ckpt, tmp_path, capfd):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(markov_ckpt.parent.parent, run)
    rc, out, err = _run(capfd, ["--checkpoint", str(run), "--corpus",
                                "markov:vocab=8,order=1", *FAST])
    assert rc == 0, err
    assert (run / "checkpoints" / "evals.parquet").is_file()
    assert not (run / "checkpoints" / markov_ckpt.name / "evals.parquet").exists()


def test_corpus_list_keeps_synthetic_specs_whole():
    corpora = evaluate.parse_corpora("markov:vocab=8,order=1,shakespeare")
    assert [c.spec for c in corpora] == ["markov:vocab=8,order=1", "shakespeare"]


def test_detokenisers_undo_the_benchmarks_spacing():
    assert evaluate.DETOKENIZERS.get("wikitext")("a @-@ b , c ( d )") == "a-b, c (d)"
    assert evaluate.DETOKENIZERS.get("ptb")("it 's N dogs do n't") == "it's 1 dogs don't"
    assert evaluate.DETOKENIZERS.get("lambada")(" \u201chi\u201d ") == '"hi"'
    lm1b = evaluate.DETOKENIZERS.get("lm1b")
    assert lm1b('He said " hi there " , I don \'t ( really ) know .') == \
        'He said "hi there", I don\'t (really) know.'
    assert lm1b("See http : / / x.org for $ 5 !") == "See http://x.org for $5!"


# --- bad input: one error line, exit 2, no traceback, nothing written -------------------------

def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _not_a_causal_lm(tmp_path: Path) -> str:
    from transformers import ViTConfig

    d = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=8).save_pretrained(d)
    return str(d)


BAD = {
    "unknown corpus": (["--corpus", "wikitext9"], r"unknown corpus 'wikitext9'.*benchmark"),
    "hub offline": (["--corpus", "ptb"], r"corpus ptb needs .*Hub.*offline.*text:PATH"),
    "1bw offline": (["--corpus", "lm1b"], r"corpus lm1b needs billion-word-benchmark/lm1b .*"
                                          r"Hub.*offline"),
    "eval-lm missing": (["--samples", "2", "--eval-lm", "/nonexistent/lm"], r"no such directory"),
    "eval-lm not causal": (["--samples", "2", "--eval-lm", "VIT"], r"not a loadable causal LM"),
    "tokenizer mismatch": (["--corpus", "markov:vocab=8"], r"tokenizer mismatch.*8-symbol"),
    "steps 0": (["--samples", "2", "--steps", "0"], r"--steps must be >= 1, got 0"),
    "nothing": ([], r"nothing to evaluate"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(case, text_ckpt, tmp_path, capfd):
    flags, match = BAD[case]
    if "VIT" in flags:
        flags = [_not_a_causal_lm(tmp_path) if f == "VIT" else f for f in flags]
    run = tmp_path / "run"
    import shutil

    shutil.copytree(text_ckpt.parent.parent, run)
    before = _snapshot(tmp_path)
    rc, out, err = _run(capfd, ["--checkpoint", str(run), *flags])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err and _snapshot(tmp_path) == before


def test_smoke_test_runs(capfd):
    rc, out, err = _run(capfd, ["--smoke-test"])
    assert rc == 0, err
    assert "nll_bound" in out and "truth_nll" in out and "new row(s)" in out


# --- many checkpoints of a study as Ray tasks (CPU only) -------------------------------------

def test_all_trials_of_a_study_as_ray_tasks(text_ckpt, markov_ckpt, tmp_path, capfd):
    """Two finished trials (and one running, skipped) evaluated as Ray tasks; the rows
    carry study and trial ids and land in the study's evals.parquet; --trial best too."""
    import shutil

    import ray

    from sedd_ray.layout import StudyLayout
    from sedd_ray.results import ResultsWriter

    storage = tmp_path / "results"
    copy = tmp_path / "copy"  # the same weights in another run folder: another checkpoint
    shutil.copytree(markov_ckpt.parent.parent, copy)
    with ResultsWriter(storage, "s") as w:
        w.upsert_trial({"trial_id": "t1", "status": "terminated", "val_nll": 3.0,
                        "checkpoint_path": str(markov_ckpt)})
        w.upsert_trial({"trial_id": "t2", "status": "terminated", "val_nll": 2.0,
                        "checkpoint_path": str(copy)})
        w.upsert_trial({"trial_id": "t3", "status": "running", "checkpoint_path": None})
    try:
        rc, out, err = _run(capfd, ["--storage", str(storage), "--study", "s", "--all-trials",
                                    "--ray", "--corpus", "markov:vocab=8", *FAST])
    finally:
        ray.shutdown()
    assert rc == 0, err
    evals = StudyLayout(str(storage), "s").evals_file
    df = read_evals(evals)
    bound = df[df["metric"] == "nll_bound"]
    assert sorted(bound["trial_id"]) == ["t1", "t2"] and set(bound["study"]) == {"s"}
    # the same weights with the same draws give the same number
    assert bound["value"].nunique() == 1
    rc, out, err = _run(capfd, ["--storage", str(storage), "--trial", "best", "--corpus",
                                "markov:vocab=8", *FAST])
    assert rc == 0 and "0 new row(s)" in out, out


def test_append_evals_skips_known_keys_and_refuses_unknown_columns(tmp_path):
    from sedd_ray.results import ResultsError, append_evals

    path = str(tmp_path / "e" / "evals.parquet")
    assert read_evals(path).empty
    row = {"checkpoint": "/c", "corpus": "x", "metric": "nll_bound", "value": 1.5,
           "stderr": 0.1, "n": 4, "settings": "{}", "settings_key": "k", "step": 3}
    assert append_evals(path, [row, dict(row)]) == 1
    assert append_evals(path, [row, {**row, "metric": "ppl_bound"}]) == 1
    df = read_evals(path)
    assert list(df["metric"]) == ["nll_bound", "ppl_bound"] and df["step"].tolist() == [3, 3]
    with pytest.raises(ResultsError, match="unknown columns"):
        append_evals(path, [{**row, "metric": "m", "oops": 1}])
    assert len(read_evals(path)) == 2
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["evals.parquet"]  # no temp left


def test_an_exported_folder_evaluates_like_its_checkpoint(markov_ckpt, tmp_path, capfd):
    """evaluate --checkpoint accepts a Hub-style export (sedd_ray.export): the same EMA
    weights, blocks and draws give the same bound as the checkpoint itself."""
    from sedd_ray import export as export_cli

    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(markov_ckpt), str(out)]) == 0, capfd.readouterr()
    values = []
    for ref, evals in ((markov_ckpt, tmp_path / "a.parquet"), (out, tmp_path / "b.parquet")):
        rc, _, err = _run(capfd, ["--checkpoint", str(ref), "--corpus", MARKOV, *FAST,
                                  "--evals", str(evals)])
        assert rc == 0, err
        df = read_evals(evals)
        values.append(df[df["metric"] == "nll_bound"]["value"].tolist())
    assert values[0] and values[0] == pytest.approx(values[1], abs=1e-6)


@pytest.mark.parametrize("name, repo, config, revision, column, line, detokenised", [
    ("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", None, "text",
     " The quick @-@ brown fox , jumps over the dog . \n", "The quick-brown fox, jumps"),
    ("lm1b", "billion-word-benchmark/lm1b", "plain_text", "refs/convert/parquet", "text",
     "The fox said \" hi there \" , and left .", 'The fox said "hi there", and left.'),
])
def test_a_hub_corpus_is_read_from_its_repo_and_detokenised(
        name, repo, config, revision, column, line, detokenised, text_ckpt, tmp_path,
        monkeypatch, capfd):
    """The Hub path itself, with the Hub's answer stood in for (no network here): the
    repo, config, test split and revision asked for, the detokeniser applied to what is
    evaluated, and rows that say so."""
    import datasets

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    asked, seen = [], []

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        asked.append((path, name, split, revision))
        heading = [" = Fox = \n"] if name and name.startswith("wikitext") else []
        return {column: heading + [line] * 200}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    real = evaluate.DETOKENIZERS.get(name.rstrip("2"))
    monkeypatch.setitem(evaluate.DETOKENIZERS._items, name.rstrip("2"),
                        lambda s: seen.append(real(s)) or real(s))
    evals = tmp_path / "evals.parquet"
    rc, out, err = _run(capfd, ["--checkpoint", str(text_ckpt), "--corpus", name,
                                "--evals", str(evals), *FAST])
    assert rc == 0, err
    assert asked == [(repo, config, "test", revision)]
    assert seen and detokenised in seen[-1]
    assert f"zero-shot {name}: Hub {repo} ({config}), test split" in out
    df = read_evals(evals)
    row = df[(df["corpus"] == name) & (df["metric"] == "nll_bound")].iloc[0]
    settings = json.loads(row["settings"])
    corpus = settings["corpus"]
    assert corpus["hub"] == repo and corpus["detokenizer"] == name.rstrip("2")
    assert corpus.get("revision") == revision and settings["zero_shot"].startswith(name)
    assert math.isfinite(row["value"]) and row["stderr"] > 0
