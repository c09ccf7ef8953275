"""Command-line values: the one list-flag parser and the one ``--set`` parser, and every
script's list-valued flags through them (one ``error:`` line, exit code 2, nothing run or
written). No Ray starts here."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sedd_ray.cli import FlagError, int_list, name_list, name_values, set_pairs
from sedd_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# --- the parsers --------------------------------------------------------------------------

def test_int_list_skips_blanks_and_strips():
    assert int_list("0, 1,,2,", "--seeds") == [0, 1, 2]
    assert int_list(",", "--seeds") == []  # the caller decides whether empty is allowed
    assert int_list([3, "4"], "--seeds") == [3, 4]  # a default given as a list


@pytest.mark.parametrize("parse, value, line", [
    (lambda v: int_list(v, "--seeds"), "0,a,2",
     "--seeds: 'a' is not a valid integer; expected comma-separated integers, e.g. --seeds 0,1,2"),
    (lambda v: int_list(v, "--seeds"), "1.5",
     "--seeds: '1.5' is not a valid integer; expected comma-separated integers, e.g. --seeds 0,1,2"),
    (lambda v: name_list(v, "--graphs", choices=["absorb", "uniform"]), "absorb,ring",
     "--graphs: unknown 'ring' (valid: absorb, uniform); expected comma-separated names, "
     "e.g. --graphs absorb,uniform"),
    (lambda v: name_values(v, "--worker-resources"), "tpu",
     "--worker-resources: 'tpu' is not a valid NAME=NUMBER pair; expected comma-separated "
     "NAME=NUMBER pairs, e.g. --worker-resources tpu=1"),
    (lambda v: name_values(v, "--worker-resources"), "tpu=many",
     "--worker-resources: 'tpu=many' is not a valid NAME=NUMBER pair; expected "
     "comma-separated NAME=NUMBER pairs, e.g. --worker-resources tpu=1"),
])
def test_a_bad_item_names_the_flag_the_item_and_the_right_form(parse, value, line):
    with pytest.raises(FlagError) as e:
        parse(value)
    assert str(e.value) == line
    assert isinstance(e.value, ConfigError)  # the CLIs print it as one error: line, exit 2


def test_name_values_and_set_pairs():
    assert name_values("tpu=1, ssd=0.5", "--worker-resources") == {"tpu": 1.0, "ssd": 0.5}
    assert set_pairs(["lr=1e-3", " train.eval_draws = 8", "corpus=a=b"]) == {
        "lr": "1e-3", "train.eval_draws": "8", "corpus": "a=b"}
    for bad in ("lr", "=3"):
        with pytest.raises(FlagError, match=rf"--set expects KEY=VALUE, got '{bad}'; e.g. --set lr=3e-4"):
            set_pairs([bad])


def test_one_parser_of_each_kind():
    """No script splits a list flag or a --set item by hand any more."""
    hand_made = re.compile(r"split\(\s*['\"],['\"]\s*\)|\.split\(\"=\", 1\)")
    offenders = [str(p.relative_to(ROOT)) for d in ("sedd_ray", "experiments")
                 for p in (ROOT / d).rglob("*.py")
                 if p.name not in ("cli.py", "synthetic.py") and hand_made.search(p.read_text())]
    assert offenders == []


# --- every script's list flags ------------------------------------------------------------------

def _main(script: str):
    if script.startswith("sedd_ray."):
        return importlib.import_module(script).main
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(script).main
    finally:
        sys.path.pop(0)


def _one_error_line(capfd, main, argv) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return rc, err[0]


SEEDS = "error: --seeds: 'a' is not a valid integer; expected comma-separated integers, e.g. --seeds 0,1,2"


@pytest.mark.parametrize("script, argv, line", [
    ("sedd_ray.study", ["graph-ablation", "--smoke-test", "--seeds", "a,b"], SEEDS),
    ("sedd_ray.study", ["search", "--smoke-test", "--seeds", "0, a"], SEEDS),
    ("sedd_ray.train", ["--smoke-test", "--worker-resources", "tpu"],
     "error: --worker-resources: 'tpu' is not a valid NAME=NUMBER pair; expected "
     "comma-separated NAME=NUMBER pairs, e.g. --worker-resources tpu=1"),
    ("sedd_ray.train", ["--smoke-test", "--set", "lr"],
     "error: --set expects KEY=VALUE, got 'lr'; e.g. --set lr=3e-4"),
    ("experiments.ablate_graph", ["--smoke-test", "--seeds", "a,b"], SEEDS),
    ("experiments.ablate_noise", ["--smoke-test", "--graph", "absorb", "--seeds", "1,a"], SEEDS),
    ("experiments.sweep_model_size", ["--smoke-test", "--sizes", "tiny,mini", "--seeds", "a"], SEEDS),
    ("experiments.ablate_graph", ["--smoke-test", "--set", "lr"],
     "error: --set expects KEY=VALUE, got 'lr'; e.g. --set lr=3e-4"),
    ("experiments.bound_vs_entropy", ["--smoke-test", "--graphs", "absorb,ring"],
     "error: --graphs: unknown 'ring' (valid: absorb, uniform); expected comma-separated "
     "names, e.g. --graphs absorb,uniform"),
    ("benchmarks.run", ["--dry-run", "--only", "bogus"], None),
    ("experiments.sweep_sampler", ["--smoke-test", "--steps", "4,a"],
     "error: --steps: 'a' is not a valid integer; expected comma-separated integers, "
     "e.g. --steps 8,32,128"),
    ("experiments.sweep_sampler", ["--predictors", "analytic,ring"],
     "error: --predictors: unknown 'ring' (valid: analytic, euler); expected comma-separated "
     "names, e.g. --predictors analytic,euler"),
    ("experiments.sweep_sampler", ["--smoke-test", "--caches", "batch,x"],
     "error: --caches: unknown 'x' (valid: batch, rows, off); expected comma-separated "
     "names, e.g. --caches batch,rows"),
    ("sedd_ray.evaluate", ["--smoke-test", "--corpus", "markov:vocab=8,order=1,,bogus"],
     "error: unknown corpus 'bogus'; valid corpora: "),
])
def test_malformed_list_values_in_every_script(script, argv, line, tmp_path, capfd, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)  # anything a script wrote by default would land here
    storage = ["--storage", str(tmp_path / "out")] if "bound" not in script and "bench" not in script else []
    rc, got = _one_error_line(capfd, _main(script), [*argv, *storage])
    assert rc == 2
    if line is None:
        assert got.startswith("error: --only: unknown 'bogus' (valid: ") and "e.g. --only " in got
    elif line.endswith(": "):  # a long list of valid names follows
        assert got.startswith(line), got
    else:
        assert got == line
    assert list(tmp_path.iterdir()) == []


def test_the_issues_command_is_one_line_in_a_real_process(tmp_path):
    """``python experiments/ablate_graph.py --seeds a,b``: no traceback, exit code 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate_graph.py"),
                           "--seeds", "a,b", "--storage", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [SEEDS]
    assert list(tmp_path.iterdir()) == []
