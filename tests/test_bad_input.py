"""Bad input and untrusted files, through the user's CLIs.

Every case: a nonzero exit, stderr is ONE line starting with ``error:`` (no traceback),
no compute starts (no training step, no model, no Ray) and nothing is written where
the user pointed the run. Checkpoints are untrusted files: checksummed, and loaded with
``weights_only=True`` so a pickled callable is refused even when its checksum matches.
A wandb key in the environment never reaches the trainer's files or Parquet.

No Ray cluster is started here (the Ray path of ``sedd_ray.train`` is exercised only up to
its pre-flight checks, which must fail before ``ray.init``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from sedd_ray import checkpoint as ckpt
from sedd_ray import results as R
from sedd_ray import sample as sample_cli
from sedd_ray import study as study_cli
from sedd_ray import train as train_cli
from sedd_ray.layout import StudyLayout, TrainerFiles

# The tiny_config of conftest as CLI flags (same data config, so the same data cache).
TINY = ["--preset", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
        "--steps", "4", "--log-every", "2", "--eval-every", "2", "--ckpt-every", "2",
        "--eval-sequences", "8", "--eval-draws", "2", "--test-draws", "0",
        "--sample-count", "1", "--sample-length", "16", "--sample-steps", "4",
        "--progress", "false", "--hidden-size", "32", "--cond-dim", "16", "--n-heads", "2",
        "--n-layers", "1"]


# --- helpers ----------------------------------------------------------------------------------

class ComputeStarted(AssertionError):
    """A guarded entry point into compute was reached (never caught by the CLIs)."""


def _guard(monkeypatch, *, model: bool) -> None:
    import ray

    import sedd_ray.diffusion as diffusion
    import sedd_ray.model as model_mod
    import sedd_ray.sample as sample_mod
    import sedd_ray.trainer as trainer

    def boom(what):
        def f(*a, **k):
            raise ComputeStarted(f"{what} was reached")
        return f

    monkeypatch.setattr(trainer.Trainer, "_train_step", boom("a training step"))
    monkeypatch.setattr(diffusion, "sample", boom("sampling"))
    monkeypatch.setattr(sample_mod.LoadedModel, "generate", boom("LoadedModel.generate"))
    monkeypatch.setattr(ray, "init", boom("ray.init"))
    monkeypatch.setattr(study_cli, "_new_tuner", boom("a Tune study"))
    if model:
        monkeypatch.setattr(model_mod.ScoreModel, "__init__", boom("ScoreModel()"))


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a model is built, a training step runs, Ray starts or sampling runs."""
    _guard(monkeypatch, model=True)


@pytest.fixture
def no_training(monkeypatch):
    """Like ``no_compute`` but a model may be built (resuming builds it, then loads)."""
    _guard(monkeypatch, model=False)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (folders too, as size -1)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (-1, 0) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def run_cli(capfd, main, argv: list[str]) -> tuple[int, str]:
    """Run a CLI's ``main``; return (exit code, its one stderr line) after asserting the
    stderr is exactly one line that starts with ``error:``."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-3000:]
    assert rc not in (0, None), err
    return rc, lines[0]


def train_cli_args(tmp_path: Path, *extra: str, ray: bool = False) -> list[str]:
    where = ["--storage", str(tmp_path / "runs")] if ray else ["--no-ray", "--output",
                                                              str(tmp_path / "out")]
    return [*TINY, *where, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bundle) -> Path:
    """One finished tiny run; tests copy its checkpoint before tampering with it."""
    from sedd_ray.trainer import train

    out = tmp_path_factory.mktemp("trained")
    res = train(tiny_config(steps=4, ckpt_every=2, eval_every=2, log_every=2), out,
                bundle=tiny_bundle)
    return Path(res.checkpoint_dir)


def copy_run(trained: Path, dest: Path) -> Path:
    """A copy of the whole run folder (its checkpoints and logs) at ``dest``."""
    shutil.copytree(trained.parent.parent, dest)
    return TrainerFiles(dest).checkpoints / trained.name


def rewrite_checksums(ckpt_dir: Path) -> None:
    """What an attacker does: recompute the checksums in meta.json over the altered files."""
    meta = json.loads((ckpt_dir / ckpt.META_FILE).read_text())
    meta["files"] = {n: ckpt.sha256_file(ckpt_dir / n) for n in meta["files"]}
    (ckpt_dir / ckpt.META_FILE).write_text(json.dumps(meta))


# --- unknown names, bad numbers, bad keys: the config edge ------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--graph", "unifrom"], r"unknown graph 'unifrom'; valid graphs: absorb, uniform$"),
    (["--noise", "cosine"], r"unknown noise 'cosine'; valid noises: geometric, loglinear$"),
    (["--preset", "huge"], r"unknown preset 'huge'; valid presets: smoke, tiny, cpu, small"),
    (["--model", "huge"], r"unknown model size 'huge'; valid sizes: tiny, mini, base"),
    (["--kind", "gpt"], r"unknown model.kind 'gpt'; valid model kinds: ar, diffusion$"),
    (["--tokenizer", "bytes"], r"unknown tokenizer 'bytes'; valid tokenizers: bpe, gpt2"),
    (["--lr", "0"], r"optim.lr must be > 0, got 0.0; pass --lr 3e-4"),
    (["--lr", "-1"], r"optim.lr must be > 0, got -1.0"),
    (["--lr", "fast"], r"optim.lr must be a number, got 'fast'"),
    (["--steps", "0"], r"train.steps must be a positive integer, got 0; set --steps"),
    (["--steps", "-5"], r"train.steps must be a positive integer, got -5"),
    (["--batch-size", "0"], r"train.batch_size must be a positive integer, got 0"),
    (["--batch-size", "-8"], r"train.batch_size must be a positive integer, got -8"),
    (["--seq-len", "4096"], r"seq_len 4096 exceeds the model's max_seq_len 128; lower --seq-len"),
    (["--set", "optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"),
    (["--set", "lrr=1"], r"unknown parameter 'lrr' \(did you mean 'lr'\?\); valid: model, "),
    (["--set", "bogus.x=1"], r"unknown config section 'bogus' in 'bogus.x'; valid: model, "),
    (["--set", "lr"], r"--set expects KEY=VALUE, got 'lr'"),
])
@pytest.mark.parametrize("path", ["no-ray", "ray"])
def test_train_cli_refuses_bad_config(flags, match, path, tmp_path, capfd, no_compute):
    rc, line = run_cli(capfd, train_cli.main, train_cli_args(tmp_path, *flags, ray=path == "ray"))
    assert rc == 2
    assert re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, match", [
    (["bogus"], r"unknown study 'bogus'; valid studies: ar-reference, graph-ablation, model-size"),
    (["graph-ablation", "--preset", "huge"], r"unknown preset 'huge'; valid presets: "),
    (["graph-ablation", "--set", "lr=-1"], r"optim.lr must be > 0, got -1.0"),
    (["graph-ablation", "--set", "noise=cosine"], r"unknown noise 'cosine'; valid noises: "),
    (["graph-ablation", "--steps", "0"], r"train.steps must be a positive integer, got 0"),
    (["graph-ablation", "--set", "batch_size=0"], r"train.batch_size must be a positive"),
    (["graph-ablation", "--set", "seq_len=4096"], r"seq_len 4096 exceeds the model's max_seq_len"),
    (["graph-ablation", "--set", "lrr=1"], r"unknown parameter 'lrr' \(did you mean 'lr'\?\)"),
    (["graph-ablation", "--trials-per-level", "0"], r"trials_per_level must be >= 1"),
    (["search", "--num-trials", "0"], r"num_trials must be >= 1"),
    (["graph-ablation", "--workers-per-trial", "0"], r"workers per trial must be >= 1, got 0"),
    (["graph-ablation", "--seeds", ","], r"a study needs at least one seed"),
    (["graph-ablation", "--name", "../up"], r"study name '../up' must be a plain folder name"),
])
def test_study_cli_refuses_bad_input(flags, match, tmp_path, capfd, no_compute):
    rc, line = run_cli(capfd, study_cli.main, [*flags, "--smoke-test", "--storage",
                                               str(tmp_path / "results")])
    assert rc == 2 and re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, flags, match", [
    ("ablate_graph", ["--steps", "0"], r"train.steps must be a positive integer, got 0"),
    ("ablate_graph", ["--set", "lr=0"], r"optim.lr must be > 0, got 0.0"),
    ("ablate_noise", ["--steps", "0"], r"train.steps must be a positive integer, got 0"),
    ("ablate_noise", ["--preset", "huge"], r"unknown preset 'huge'; valid presets: "),
    ("sweep_model_size", ["--sizes", "tiny,huge"], r"unknown model size 'huge'; valid sizes: "),
    ("sweep_model_size", ["--set", "graph=ring"], r"unknown graph 'ring'; valid graphs: "),
])
def test_experiment_scripts_refuse_bad_input(script, flags, match, tmp_path, capfd, no_compute):
    """The README's study scripts: no default quietly replaces a bad value (``--steps 0``
    is an error, not "the default steps"), and nothing runs or is written."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        module = importlib.import_module(f"experiments.{script}")
    finally:
        sys.path.pop(0)
    rc, line = run_cli(capfd, module.main, [*flags, "--storage", str(tmp_path / "results")])
    assert rc == 2 and re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """The same through ``python -m``: no warning or traceback from any import on stderr."""
    proc = subprocess.run([sys.executable, "-m", "sedd_ray.train", "--no-ray", "--lr", "-1",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: optim.lr must be > 0, got -1.0; pass --lr 3e-4 for the SEDD default"]
    assert list(tmp_path.iterdir()) == []


# --- corpora --------------------------------------------------------------------------------

def _corpus(tmp_path: Path, kind: str) -> str:
    d = tmp_path / "corpus"
    d.mkdir()
    if kind == "no files":
        pass
    elif kind == "blank files":
        (d / "a.txt").write_text(" \n\n\t\n")
        (d / "b.txt").write_text("")
    else:  # shorter than one block of seq_len 32 in every split
        (d / "a.txt").write_text("To be, or not to be.\n")
    return f"text:{d}"


@pytest.mark.parametrize("kind, match", [
    ("no files", r"corpus text:\S+ is empty: no .txt files under"),
    ("blank files", r"corpus text:\S+ is empty: its files hold no text"),
    ("one line", r"has only at most \d+ \w+ tokens, fewer than one block of seq_len \d+; "
                 r"lower --seq-len or use a larger corpus"),
])
@pytest.mark.parametrize("cli", ["train --no-ray", "train (Ray)", "study"])
def test_empty_or_too_short_corpus(kind, match, cli, tmp_path, capfd, no_compute):
    corpus = _corpus(tmp_path, kind)
    before = snapshot(tmp_path)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    if cli == "study":
        rc, line = run_cli(capfd, study_cli.main, [
            "graph-ablation", "--smoke-test", "--storage", str(tmp_path / "results"),
            "--set", f"corpus={corpus}", "--set", f"cache_dir={tmp_path / 'cache'}"])
        assert rc == 2
    else:
        rc, line = run_cli(capfd, train_cli.main, train_cli_args(
            tmp_path, "--corpus", corpus, *cache, ray=cli == "train (Ray)"))
        assert rc == 1
    assert re.search(match, line), line
    assert snapshot(tmp_path) == before  # no output, storage or cache folder


# --- storage: a path that cannot be a folder, even for root -----------------------------------

@pytest.mark.parametrize("cli", ["train --no-ray", "train (Ray)", "study"])
def test_storage_under_a_regular_file_fails_first(cli, tmp_path, capfd, no_compute, monkeypatch):
    """``chmod`` does not stop root; a path below a regular file stops everyone. The check
    runs before the data is even loaded."""
    import sedd_ray.data as data

    monkeypatch.setattr(data, "load_data", lambda *a, **k: (_ for _ in ()).throw(
        ComputeStarted("load_data was reached")))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub"
    if cli == "study":
        rc, line = run_cli(capfd, study_cli.main, ["graph-ablation", "--smoke-test",
                                                   "--storage", str(target)])
    elif cli == "train (Ray)":
        rc, line = run_cli(capfd, train_cli.main, [*TINY, "--storage", str(target)])
    else:
        rc, line = run_cli(capfd, train_cli.main, [*TINY, "--no-ray", "--output", str(target)])
    flag = "--output" if cli == "train --no-ray" else "--storage"
    assert line == (f"error: {flag} {target} cannot be created: {blocker} is a file, not a "
                    f"folder; pass a writable {flag}")
    assert rc in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# --- results: trial ids ----------------------------------------------------------------------

@pytest.fixture
def fake_study(tmp_path) -> Path:
    storage = tmp_path / "results"
    w = R.ResultsWriter(storage, "s")
    for i in range(2):
        w.upsert_trial({"trial_id": f"t{i}", "status": "terminated",
                        "config": tiny_config().to_dict(), "best_val_nll": 3.0,
                        "checkpoint_path": str(tmp_path / "nowhere")})
    w.close()
    return storage


@pytest.mark.parametrize("args, match", [
    (["--trial", "nope"], r"no trial 'nope' in study 's'; valid ids: t0, t1$"),
    (["--trial", "../s"], r"invalid trial id '../s'"),
    (["--trial", "../../etc/passwd"], r"invalid trial id '../../etc/passwd'"),
    (["--trial", ".."], r"invalid trial id '..'"),
    (["--trial", "/etc"], r"invalid trial id '/etc'"),
    (["--trial", "t0/../t1"], r"invalid trial id 't0/../t1'"),
    (["--study", "../results", "--trial", "t0"], r"invalid study name '../results'"),
    (["--study", "other", "--trial", "t0"], r"no study 'other' under .*\(studies there: s\); run a study"),
    (["--predictor", "leap"], r"unknown predictor 'leap'; valid predictors: analytic, euler$"),
    (["--steps", "0"], r"--steps must be >= 1, got 0$"),
    (["--num-samples", "-1"], r"--num-samples must be >= 1, got -1$"),
])
def test_sample_cli_refuses_bad_trial_ids(args, match, fake_study, tmp_path, capfd, no_compute):
    before = snapshot(tmp_path)
    rc, line = run_cli(capfd, sample_cli.main, [
        "--storage", str(fake_study), "--no-progress", "--jsonl", str(tmp_path / "s.jsonl"),
        *args])
    assert rc in (1, 2) and re.search(match, line), line
    assert snapshot(tmp_path) == before


# --- checkpoints: truncated, tampered, mismatched, malicious --------------------------------

def _truncate_state(c: Path) -> None:
    with open(c / ckpt.STATE_FILE, "r+b") as f:
        f.truncate(os.path.getsize(c / ckpt.STATE_FILE) // 3)


def _flip_byte(c: Path) -> None:
    data = bytearray((c / ckpt.STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (c / ckpt.STATE_FILE).write_bytes(bytes(data))


def _edit_tokenizer(c: Path) -> None:
    tok = json.loads((c / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-injected"] = 99999
    (c / "tokenizer.json").write_text(json.dumps(tok))


def _drop_checksums(c: Path) -> None:
    meta = json.loads((c / ckpt.META_FILE).read_text())
    del meta["files"]
    (c / ckpt.META_FILE).write_text(json.dumps(meta))


TAMPER = {
    "truncated state.pt": (_truncate_state, r"state.pt fails its checksum \(truncated or modified\)"),
    "one flipped bit": (_flip_byte, r"state.pt fails its checksum"),
    "edited tokenizer": (_edit_tokenizer, r"tokenizer.json fails its checksum"),
    "no checksums": (_drop_checksums, r"records no checksum for state.pt"),
    "corrupt meta.json": (lambda c: (c / ckpt.META_FILE).write_text("{ not json"),
                          r"has a corrupt meta.json"),
    "missing state.pt": (lambda c: (c / ckpt.STATE_FILE).unlink(), r"is incomplete: no state.pt"),
    "future format": (lambda c: (c / ckpt.META_FILE).write_text(json.dumps(
        {**json.loads((c / ckpt.META_FILE).read_text()), "format_version": 99})),
        r"has format version 99, this code reads version 1"),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
@pytest.mark.parametrize("cli", ["sample", "train resume"])
def test_tampered_checkpoint_is_refused_by_the_clis(tamper, cli, trained, tmp_path, capfd,
                                                    no_training):
    how, match = TAMPER[tamper]
    c = copy_run(trained, tmp_path / "run")
    how(c)
    before = snapshot(tmp_path)
    if cli == "sample":
        rc, line = run_cli(capfd, sample_cli.main, ["--checkpoint", str(c), "--no-progress",
                                                    "--jsonl", str(tmp_path / "s.jsonl")])
    else:  # resume the run in place (8 steps > its 4): refused before a step, nothing added
        rc, line = run_cli(capfd, train_cli.main, [*TINY, "--steps", "8", "--no-ray",
                                                   "--output", str(tmp_path / "run")])
    assert rc == 1 and re.search(match, line), line
    assert snapshot(tmp_path) == before


def test_resume_with_another_vocabulary_is_refused(trained, tmp_path, capfd, no_training):
    copy_run(trained, tmp_path / "run")
    before = snapshot(tmp_path)
    rc, line = run_cli(capfd, train_cli.main, [*TINY, "--vocab-size", "320", "--steps", "8",
                                               "--no-ray", "--output", str(tmp_path / "run")])
    assert rc == 1
    assert re.search(r"has vocab_size 300 but the data has 320; resume with the same "
                     r"--tokenizer/--vocab-size$", line), line
    assert snapshot(tmp_path) == before


def test_tokenizer_that_does_not_match_the_weights_is_refused(trained, tmp_path, capfd,
                                                              no_compute):
    """Checksums recomputed (they pass): the vocabulary check is what refuses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    c = copy_run(trained, tmp_path / "run")
    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    (c / "tokenizer.json").write_text(other.to_str())
    rewrite_checksums(c)
    ckpt.verify_files(c, json.loads((c / ckpt.META_FILE).read_text()))  # checksums pass
    before = snapshot(tmp_path)
    rc, line = run_cli(capfd, sample_cli.main, ["--checkpoint", str(c), "--no-progress"])
    assert rc == 1 and re.search(
        r"tokenizer has 50 tokens but the model was trained with vocab_size 300$", line), line
    assert snapshot(tmp_path) == before


def test_unknown_key_in_a_checkpoints_config_is_refused(trained, tmp_path, capfd, no_compute):
    c = copy_run(trained, tmp_path / "run")
    meta = json.loads((c / ckpt.META_FILE).read_text())
    meta["config"]["optim"]["lrr"] = 1.0
    (c / ckpt.META_FILE).write_text(json.dumps(meta))
    rc, line = run_cli(capfd, sample_cli.main, ["--checkpoint", str(c), "--no-progress"])
    assert rc == 1 and "has no usable config: unknown config key 'optim.lrr'" in line, line


def test_sample_length_above_the_models_maximum(trained, tmp_path, capfd, monkeypatch):
    import sedd_ray.diffusion as diffusion

    monkeypatch.setattr(diffusion, "sample", lambda *a, **k: pytest.fail("sampling ran"))
    rc, line = run_cli(capfd, sample_cli.main, ["--checkpoint", str(trained), "--no-progress",
                                                "--length", "4096", "--jsonl",
                                                str(tmp_path / "s.jsonl")])
    assert rc == 1 and line == "error: --length 4096 exceeds the model's max_seq_len 128"
    assert list(tmp_path.iterdir()) == []


# --- untrusted files: code in a checkpoint is never run --------------------------------------

class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("cli", ["sample", "train resume"])
def test_checkpoint_with_a_pickled_callable_is_refused(cli, trained, tmp_path, capfd,
                                                       no_training):
    c = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    import torch

    state = torch.load(c / ckpt.STATE_FILE, weights_only=True)
    state["model"]["evil"] = _Payload(str(marker))
    torch.save(state, c / ckpt.STATE_FILE)
    rewrite_checksums(c)  # the checksum passes: weights_only=True is what stops it
    ckpt.verify_files(c, json.loads((c / ckpt.META_FILE).read_text()))
    # Sanity: the payload really runs when unpickled without weights_only.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))
    assert probe.exists()
    probe.unlink()
    before = snapshot(tmp_path)
    if cli == "sample":
        rc, line = run_cli(capfd, sample_cli.main, ["--checkpoint", str(c), "--no-progress"])
    else:
        rc, line = run_cli(capfd, train_cli.main, [*TINY, "--steps", "8", "--no-ray",
                                                   "--output", str(tmp_path / "run")])
    assert rc == 1
    assert re.search(r"state.pt holds more than tensors and plain values and is refused "
                     r"\(weights_only=True; unpickling it could run code\): .*GLOBAL", line), line
    assert not marker.exists()
    assert snapshot(tmp_path) == before


# --- secrets: a wandb key in the environment is written nowhere ------------------------------

def test_wandb_key_never_reaches_trainer_files_or_parquet(tmp_path, capfd, monkeypatch):
    """A tiny run with wandb on (offline) and a results write, with a fake key in the
    environment: no file written anywhere under the run or the results holds it."""
    key = "0123456789abcdef0123456789abcdef01234567"  # 40 hex, like a real wandb key
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    rc = train_cli.main([*TINY, "--wandb", "true", "--no-ray", "--output", str(out),
                         "--name", "secret-run"])
    assert rc == 0, capfd.readouterr().err[-2000:]
    final = json.loads(TrainerFiles(out).final.read_text())
    cfg = tiny_config(steps=4, wandb=True)
    w = R.ResultsWriter(tmp_path / "results", "s", history_flush_rows=1)
    w.upsert_trial({"trial_id": "t0", "status": "error", "config": cfg.to_dict(),
                    "error": f"wandb.errors.AuthenticationError: bad key {key}",
                    "env": dict(os.environ), **{k: v for k, v in final.items()
                                                if k not in ("samples", "data_meta")}})
    for line in TrainerFiles(out).metrics.read_text().splitlines():
        w.append_history("t0", [{**json.loads(line), "note": f"WANDB_API_KEY={key}"}])
    w.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    run = TrainerFiles(out)
    assert {run.metrics.name, run.final.name, run.samples.name, "state.pt", "meta.json",
            Path(StudyLayout(".", "s").trials_file).name, "debug.log"} <= names, names
    leaked = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaked == []
    row = R.get_trial(tmp_path / "results", "s", "t0")
    assert "***" in row["error"] and key not in row["extra"]
