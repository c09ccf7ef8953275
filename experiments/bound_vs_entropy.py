"""Bound vs the true entropy: uniform and absorbing SEDD on one Markov source.

    python experiments/bound_vs_entropy.py                # a few minutes of CPU
    python experiments/bound_vs_entropy.py --smoke-test   # seconds, writes to a temp dir

Trains a tiny model per graph with the plain trainer (no Ray) on a synthetic source whose
entropy per token is known exactly (:mod:`sedd_ray.synthetic`), and plots the validation
bound (``val_nll``, nats/token, with a 2-standard-error band) over training steps against
the true entropy: the floor no model can beat. Writes ``docs/bound_vs_entropy.png`` and
the numbers beside it (``.json``). Unlike the Parquet analyses in this folder, this script
trains: the source is cheap and the point is the curve, not a study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sedd_ray.diffusion import GRAPHS as graph_registry  # noqa: E402

SOURCE = "markov:vocab=8,order=1,sharpness=3,seed=0,blocks=8192"
# every registered graph, each with the schedule it is built for
GRAPHS = {g: {"graph": g, "noise": graph_registry.get(g).default_noise}
          for g in graph_registry.names()}


def run_graph(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Train one graph; return its bound curve, final bound and timing."""
    from sedd_ray.config import apply_params, preset
    from sedd_ray.trainer import train

    params = {
        **GRAPHS[name], "corpus": args.corpus, "seq_len": args.seq_len, "steps": args.steps,
        "batch_size": 32, "lr": 3e-3, "cosine": True, "warmup_steps": 20, "ema_decay": 0.99, "dropout": 0.0,
        "hidden_size": 64, "cond_dim": 32, "n_heads": 2, "n_layers": 2,
        "eval_every": args.eval_every, "log_every": args.eval_every, "ckpt_every": 0,
        "eval_sequences": args.eval_sequences, "eval_draws": 4, "test_draws": args.test_draws,
        "test_sequences": args.eval_sequences, "sample_count": 1, "sample_length": args.seq_len,
        "sample_steps": 32, "progress": False, "device": "cpu",
    }
    cfg = apply_params(preset("tiny"), params).validate()
    curve: list[dict] = []

    def report(m: dict, _ckpt: str | None) -> None:
        if "val_nll" in m:
            curve.append({"step": m["step"], "val_nll": m["val_nll"],
                          "stderr": m["val_nll_stderr"]})

    t0 = time.perf_counter()
    res = train(cfg, out / name, report, resume=False)
    seconds = time.perf_counter() - t0
    print(f"{name:8s} {args.steps} steps in {seconds:.0f}s: val_nll {res.val_nll:.4f} "
          f"+- {res.val_nll_stderr:.4f}, test_nll {res.test_nll}, "
          f"true {res.data_meta['true_nll']:.4f}; sample {res.samples[:1]}", flush=True)
    return {"curve": curve, "val_nll": res.val_nll, "val_nll_stderr": res.val_nll_stderr,
            "test_nll": res.test_nll, "test_nll_stderr": res.test_nll_stderr,
            "seconds": round(seconds, 1), "samples": res.samples,
            "true_nll": res.data_meta["true_nll"], "source": res.data_meta["source"]}


def plot(results: dict, path: Path, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    any_run = next(iter(results.values()))
    truth, log_v = any_run["true_nll"], math.log(any_run["source"]["vocab"])
    sample_nll = any_run.get("val_exact_nll")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (name, r), color in zip(results.items(), ("tab:blue", "tab:orange")):
        steps = [p["step"] for p in r["curve"]]
        nll = [p["val_nll"] for p in r["curve"]]
        se = [p["stderr"] for p in r["curve"]]
        ax.plot(steps, nll, "o-", ms=3, color=color,
                label=f"{name}: bound {nll[-1]:.3f} ({nll[-1] / truth - 1:+.1%})")
        ax.fill_between(steps, [a - 2 * s for a, s in zip(nll, se)],
                        [a + 2 * s for a, s in zip(nll, se)], color=color, alpha=0.2, lw=0)
    ax.axhline(truth, color="k", ls="--", label=f"true entropy {truth:.3f}")
    if sample_nll is not None:
        ax.axhline(sample_nll, color="k", ls=":", lw=0.8,
                   label=f"exact NLL of the evaluated blocks {sample_nll:.3f}")
    ax.axhline(log_v, color="gray", ls=":", label=f"log V = {log_v:.3f} (uniform guess)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NLL bound (nats/token)")
    ax.set_ylim(truth * 0.9, log_v * 1.15)
    ax.set_title(f"ELBO vs exact entropy: {corpus.split(',blocks')[0]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=SOURCE)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--test-draws", type=int, default=16)
    p.add_argument("--graphs", default=",".join(GRAPHS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a tiny model gains nothing from more)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bound_vs_entropy.png")
    p.add_argument("--smoke-test", action="store_true", help="a few steps, output in a temp dir")
    args = p.parse_args(argv)
    from sedd_ray.cli import name_list
    from sedd_ray.config import ConfigError

    try:
        graphs = name_list(args.graphs, "--graphs", choices=GRAPHS)
    except ConfigError as e:  # one line, nothing trained or written
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tmp = Path(tempfile.mkdtemp(prefix="bound-vs-entropy-"))
    if args.smoke_test:
        args.steps, args.eval_every, args.eval_sequences, args.test_draws = 20, 10, 16, 2
        args.corpus = args.corpus.replace("blocks=8192", "blocks=512")
        args.out = tmp / "bound_vs_entropy.png"
    os.environ.setdefault("SEDD_RAY_CACHE", str(tmp / "cache"))
    import torch

    torch.set_num_threads(args.threads)
    results = {g: run_graph(g, args, tmp) for g in graphs}
    # the exact NLL of the very blocks the bound was evaluated on (data noise, not a gap)
    from sedd_ray.config import DataConfig
    from sedd_ray.data import load_data
    from sedd_ray.synthetic import parse_spec

    val = load_data(DataConfig(corpus=args.corpus, seq_len=args.seq_len)).val
    val = val[: args.eval_sequences].numpy()
    exact = float(-parse_spec(args.corpus)[0].log_prob(val).mean() / args.seq_len)
    for r in results.values():
        r["val_exact_nll"] = exact
    plot(results, args.out, args.corpus)
    summary = {"corpus": args.corpus, "steps": args.steps, "graphs": results}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
