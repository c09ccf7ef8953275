"""experiments/sweep_sampler.py --smoke-test: Ray Tune trials over predictor x steps,
quality rows per trial in evals.parquet, a report PNG; a bad step count is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("sweep_sampler",
                                                  ROOT / "experiments" / "sweep_sampler.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_sweep_writes_rows_per_trial_and_a_report(tmp_path, capfd):
    import ray

    from sedd_ray.results import read_evals

    sweep = _script()
    evals, png = tmp_path / "evals.parquet", tmp_path / "sweep.png"
    try:
        rc = sweep.main(["--smoke-test", "--evals", str(evals), "--report", str(png)])
    finally:
        ray.shutdown()
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "6 trial(s)" in out and png.stat().st_size > 10_000
    df = read_evals(evals)
    truth = df[df["metric"] == "truth_nll"]
    points = {(json.loads(s)["predictor"], json.loads(s)["steps"]) for s in truth["settings"]}
    assert points == {(p, s) for p in ("analytic", "euler") for s in (1, 4, 16)}
    assert (df[df["metric"] == "seconds_per_sample"]["value"] > 0).all()


@pytest.mark.parametrize("flags, match", [(["--steps", "4,0"], "--steps must be >= 1"),
                                          (["--predictors", "leapfrog"], "unknown 'leapfrog'")])
def test_bad_sweep_input_is_one_error_line(flags, match, tmp_path, capfd):
    rc = _script().main(["--checkpoint", str(tmp_path / "missing"), *flags])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not list(tmp_path.iterdir())


def test_an_ar_checkpoint_has_nothing_to_sweep(tmp_path, capfd):
    """The AR reference samples ancestrally (no predictor, steps or cache): one line,
    before Ray starts or anything is written."""
    from conftest import tiny_config

    from sedd_ray.trainer import train

    cfg = tiny_config(kind="ar", corpus="markov:vocab=8,order=1,sharpness=2,blocks=256",
                      seq_len=16, steps=4, ckpt_every=4, eval_every=4, final_eval_sequences=0)
    ckpt = train(cfg, tmp_path / "ar").checkpoint_dir
    before = sorted(tmp_path.rglob("*"))
    rc = _script().main(["--checkpoint", str(ckpt), "--steps", "2", "--samples", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a model.kind=ar checkpoint" in err[0]
    assert sorted(tmp_path.rglob("*")) == before
    import ray

    assert not ray.is_initialized()
