"""Sampler sweep: quality vs steps (and vs seconds per sample) for one checkpoint.

    python experiments/sweep_sampler.py --trial best                 # a few minutes of CPU
    python experiments/sweep_sampler.py --checkpoint runs/x --steps 8,32,128 --eval-lm DIR
    python experiments/sweep_sampler.py --smoke-test                 # < 2 minutes, temp dir

One Ray Tune trial per (predictor x steps x cache mode), in parallel on the cluster's CPUs
(or GPUs with ``--gpus-per-trial``). Each trial draws ``--samples`` samples of
``--length`` tokens with the same seed and records the sample-quality rows of
:mod:`sedd_ray.quality` (``sample_entropy``, ``distinct_n``, ``rep_4``, ``gen_ppl`` with
``--eval-lm``, exact ``truth_nll`` / ``truth_gap`` on a synthetic source) and
``seconds_per_sample`` in the same ``evals.parquet`` as ``python -m sedd_ray.evaluate``
(a finished setting is not redrawn). The report, ``sampler_sweep.png`` beside that file,
plots each quality number against steps and against seconds per sample, one line per
predictor and cache mode (the exact source entropy as a dashed line). ``--smoke-test``
trains a throwaway model on a Markov source first (no model needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sedd_ray.layout import EVALS_FILE  # noqa: E402

# quality numbers plotted (the first found of each pair of panels), lower is better except entropy
PANELS = ("truth_nll", "gen_ppl", "sample_entropy", "distinct_2")


def sweep_trial(config: dict[str, Any]) -> None:
    """One Tune trial: samples at one (predictor, steps, cache), rows reported as JSON."""
    from ray import tune

    from sedd_ray import evaluate as ev

    point = config["point"]
    settings = ev.EvalSettings(**config["settings"], predictor=point["predictor"],
                               steps=point["steps"], cache=point["cache"])
    job = ev.Job(ev.ModelRef(**config["ref"]), samples=True,
                 sources=[ev.resolve_corpus(s) for s in config["sources"]])
    t0 = time.perf_counter()
    rows = ev.evaluate_model(job, settings, config["device"])
    for r in rows:
        r["created_at"] = r["created_at"].isoformat()
    tune.report({"rows": json.dumps(rows), "wall_s": time.perf_counter() - t0})


def run_sweep(args: argparse.Namespace, ref: Any, sources: list[str], base: dict[str, Any],
              grid: list[dict[str, Any]], out: str) -> int:
    """Every grid point not yet in ``out`` as a Tune trial; returns the rows added."""
    from ray import tune

    from sedd_ray.launch import connect
    from sedd_ray.preflight import check_task
    from sedd_ray.results import append_evals

    if not grid:
        return 0
    connect(args.address)
    # a trial no node can hold: one error line, and no trial starts
    check_task(args.cpus_per_trial, args.gpus_per_trial, cpu_flag="--cpus-per-trial",
               gpu_flag="--gpus-per-trial", unit="trial")
    device = "cuda" if args.gpus_per_trial > 0 else "cpu"
    space = {"point": tune.grid_search(grid), "ref": ref.__dict__, "sources": sources,
             "settings": base, "device": device}
    trainable = tune.with_resources(sweep_trial,
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    tuner = tune.Tuner(trainable, param_space=space, run_config=tune.RunConfig(
        name="sampler-sweep", storage_path=str(Path(out).parent / "tune"), verbose=0))
    results = tuner.fit()
    added = 0
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"sweep trial {r.config['point']} failed: {r.error}")
        added += append_evals(out, json.loads(r.metrics["rows"]))
    return added


def _points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (predictor, steps, cache) of the flags, checked."""
    from sedd_ray import evaluate as ev
    from sedd_ray.cli import int_list, name_list
    from sedd_ray.diffusion import PREDICTORS, DenoiserScore

    predictors = name_list(args.predictors, "--predictors", choices=PREDICTORS.names())
    steps = int_list(args.steps, "--steps", example="8,32,128")
    if not steps or min(steps) < 1:
        raise ev.EvalInputError(f"--steps must be >= 1 each, got {args.steps!r}")
    caches = name_list(args.caches, "--caches", choices=DenoiserScore.MODES)
    return [{"predictor": p, "steps": n, "cache": c}
            for p in predictors for n in steps for c in caches]


def _missing(points: list[dict[str, Any]], base: dict[str, Any], ref: Any, sources: list[Any],
             out: str) -> list[dict[str, Any]]:
    """The points whose rows are not all in ``out`` yet."""
    from sedd_ray import evaluate as ev

    done = ev.finished(out)
    left = []
    for point in points:
        settings = ev.EvalSettings(**base, **point)
        keys = [("samples", settings.sample_settings())] + [
            (src.spec, settings.sample_settings(src)) for src in sources]
        if any((ref.checkpoint, corpus, ev.settings_key(st)) not in done for corpus, st in keys):
            left.append(point)
    return left


def plot(out: str, checkpoint: str, png: Path) -> Path:
    """Quality vs steps and vs seconds per sample, one line per predictor/cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import NullFormatter

    from sedd_ray.results import read_evals

    df = read_evals(out)
    df = df[(df["checkpoint"] == checkpoint) & df["settings"].str.contains('"kind": "samples"')]
    s = pd.DataFrame([json.loads(x) for x in df["settings"]], index=df.index)
    df = df.assign(steps=s["steps"], line=s["predictor"] + "/" + s.get("cache", pd.Series(
        "batch", index=df.index)).fillna("batch"))
    secs = df[df["metric"] == "seconds_per_sample"].set_index(["line", "steps"])["value"]
    metrics = [m for m in PANELS if m in set(df["metric"])][:2] or ["sample_entropy"]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        part = df[df["metric"] == metric]
        for line, g in part.groupby("line"):
            g = g.assign(sec=[secs.get((line, st), float("nan")) for st in g["steps"]])
            for ax, x in ((row[0], "steps"), (row[1], "sec")):
                g = g.sort_values(x)
                ax.errorbar(g[x], g["value"], yerr=2 * g["stderr"].fillna(0), marker="o",
                            capsize=3, label=line)
        ref = part["reference"].dropna()
        for ax, xlabel in ((row[0], "sampling steps"), (row[1], "seconds per sample")):
            if len(ref):
                ax.axhline(ref.iloc[0], ls="--", c="k", label="source entropy (exact)")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric} ({part['unit'].iloc[0]})")
            ax.legend(fontsize=8)
    fig.suptitle(f"sampler sweep of {Path(checkpoint).name} (+- 2 standard errors)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    from sedd_ray.checkpoint import CheckpointError
    from sedd_ray.config import ConfigError
    from sedd_ray.results import ResultsError

    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sedd-ray-sweep-") as tmp:
        try:
            if args.smoke_test:
                _smoke(args, tmp)
            prepared = _prepare(args)
        except (ConfigError, ValueError, CheckpointError, ResultsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        ref, sources, base, grid, out = prepared
        t0 = time.perf_counter()
        try:
            added = run_sweep(args, ref, [s.spec for s in sources], base, grid, out)
        except ConfigError as err:  # the cluster cannot hold one trial: refused, none ran
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            import ray

            ray.shutdown()
        png = plot(out, ref.checkpoint, Path(args.report or Path(out).parent / "sampler_sweep.png"))
        print(f"{len(grid)} trial(s), {added} new row(s) in {out} "
              f"({time.perf_counter() - t0:.1f}s); report {png}")
        if args.smoke_test and args.report:
            print(f"smoke-test report kept at {png}")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any], list, str]:
    from sedd_ray import evaluate as ev
    from sedd_ray import quality

    points = _points(args)
    if args.samples < 2:
        raise ev.EvalInputError(f"--samples must be >= 2 (a standard error), got {args.samples}")
    args.all_trials = False
    refs, out = ev.resolve_models(args)
    ref = refs[0]
    ev.model_tokenizer(ref)  # a missing or broken checkpoint fails here, not in a trial
    if (kind := ev.model_kind(ref)) != "diffusion":
        raise ev.EvalInputError(
            f"{ref.checkpoint} is a model.kind={kind} checkpoint: it samples ancestrally, with "
            "no predictor, steps or cache to sweep; sweep a diffusion checkpoint, or use "
            "python -m sedd_ray.evaluate --samples N for its sample quality")
    lm = quality.load_eval_lm(args.eval_lm) if args.eval_lm else None
    base = {"samples": args.samples, "length": args.length, "sample_seed": args.seed,
            "eval_lm": lm.name if lm else None}
    sources = ev.truth_sources(ref, [])
    return ref, sources, base, _missing(points, base, ref, sources, out), out


SMOKE = {"samples": 16, "steps": "1,4,16", "predictors": "analytic,euler", "caches": "batch"}


def _smoke(args: argparse.Namespace, tmp: str) -> None:
    """``--smoke-test``: small settings for the flags left at their defaults (a flag the
    user gave is kept, and checked before the throwaway checkpoint is trained)."""
    from sedd_ray import evaluate as ev

    defaults = _parser()
    for name, value in SMOKE.items():
        if getattr(args, name) == defaults.get_default(name):
            setattr(args, name, value)
    _points(args)
    if not (args.checkpoint or args.study or args.trial != "best"):
        args.checkpoint = ev.smoke_checkpoint(tmp)
        args.evals = args.evals or os.path.join(tmp, EVALS_FILE)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", default="best", help="'best' (lowest val_nll) or a trial id")
    p.add_argument("--study", default=None)
    p.add_argument("--storage", default="results")
    p.add_argument("--checkpoint", default=None, help="a checkpoint or run folder (no study)")
    p.add_argument("--predictors", default="analytic,euler")
    p.add_argument("--steps", default="4,16,64,256", help="comma-separated step counts")
    p.add_argument("--caches", default="batch", help="RADD cache modes: batch, rows, off")
    p.add_argument("--length", type=int, default=None, help="tokens (default: seq_len)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-lm", default=None, help="HF causal-LM folder or Hub id: gen-PPL")
    p.add_argument("--evals", default=None, help="the evals.parquet (default as evaluate)")
    p.add_argument("--report", default=None, help="the PNG (default beside the evals file)")
    p.add_argument("--address", default=None, help="Ray cluster (default: a local one)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--smoke-test", action="store_true", help="< 2 minutes on CPU, temp dir")
    return p


if __name__ == "__main__":
    sys.exit(main())
