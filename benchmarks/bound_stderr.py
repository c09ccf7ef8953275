"""Standard error of the final evaluation at the default study's budget, for every graph x
schedule pair, and of the paired difference between two trials.

    PYTHONPATH=. python benchmarks/bound_stderr.py              # ~15 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/bound_stderr.py --steps 50   # quick look

Trains one tiny model per graph x schedule pair (the default study's preset and steps,
``experiments/ablate_graph.py``; one data split, ``data.split_seed``), plus a second
training seed of absorb/loglinear, then evaluates each exactly as the trainer's final
evaluation does (:meth:`sedd_ray.trainer.Trainer.evaluation`: ``final_eval_sequences``
blocks evenly spread over the validation split x ``final_eval_draws`` importance-sampled
draws, float32), at the preset's budget and at any ``--budgets``:

- ``stderr``: the standard error the trial reports (spread over blocks / sqrt(n));
- ``eval noise``: the standard deviation of the estimate over ``--repeats`` evaluation
  seeds (``train.eval_seed``) on the same blocks: the Monte Carlo noise alone;
- ``paired``: the stderr of the difference of two trials on the same blocks and draws
  (common random numbers), for the study's contrasts and for two training seeds.

Writes ``benchmarks/BOUND_STDERR.json`` and ``.md``. Targets (issue 15): stderr <= 0.05
nats/token at the default study's final-eval budget; paired stderr <= 0.02.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_ray.config import apply_params, preset  # noqa: E402
from sedd_ray.data import load_data  # noqa: E402
from sedd_ray.diffusion.bound import mean_stderr, paired_difference  # noqa: E402
from sedd_ray.trainer import Trainer  # noqa: E402

PRESET = "tiny"  # the default study's (experiments/ablate_graph.py: DEFAULTS)
TRIALS = [("uniform", "geometric", 0), ("uniform", "loglinear", 0),
          ("absorb", "geometric", 0), ("absorb", "loglinear", 0), ("absorb", "loglinear", 1)]
CONTRASTS = [  # (a, b): the study comparisons, then two training seeds of one config
    (("absorb", "loglinear", 0), ("uniform", "loglinear", 0)),
    (("absorb", "geometric", 0), ("uniform", "geometric", 0)),
    (("absorb", "loglinear", 0), ("absorb", "geometric", 0)),
    (("uniform", "loglinear", 0), ("uniform", "geometric", 0)),
    (("absorb", "loglinear", 1), ("absorb", "loglinear", 0)),
]


def _name(key: tuple[str, str, int]) -> str:
    return f"{key[0]}/{key[1]} seed {key[2]}"


def train_all(steps: int, out: Path) -> dict[tuple[str, str, int], Trainer]:
    base = {"steps": steps, "eval_every": steps, "ckpt_every": steps, "test_draws": 0,
            "progress": False, "sample_count": 0}
    cfg0 = apply_params(preset(PRESET), base)
    bundle = load_data(cfg0.data)  # data.split_seed: the same split for every trial
    trainers = {}
    for graph, noise, seed in TRIALS:
        cfg = apply_params(cfg0, {"graph": graph, "noise": noise, "seed": seed})
        t0 = time.time()
        tr = Trainer(cfg, out / f"{graph}-{noise}-{seed}", bundle=bundle)
        tr.run(resume=False)
        print(f"trained {graph}/{noise} seed {seed}: {steps} steps in {time.time() - t0:.0f}s",
              flush=True)
        trainers[(graph, noise, seed)] = tr
    return trainers


def measure(trainers, n_blocks: int, draws: int, repeats: int) -> dict:
    rows, per = {}, {}
    for key, tr in trainers.items():
        t0 = time.time()
        evals = [tr.evaluation("val", n_blocks or None, draws, autocast=None)
                 if s == 0 else _with_seed(tr, s, n_blocks, draws) for s in range(repeats)]
        seconds = time.time() - t0
        per[key] = evals[0].nll
        mean, se = mean_stderr(evals[0].nll)
        rows[_name(key)] = {"mean": mean, "stderr": se, "blocks": int(evals[0].ids.numel()),
                            "eval_noise": float(torch.stack([e.nll.mean() for e in evals]).std())
                            if repeats > 1 else None,
                            "seconds_per_eval": seconds / repeats}
    pairs = {}
    for a, b in CONTRASTS:
        diff, se = paired_difference(per[a], per[b])
        pairs[f"{_name(a)} - {_name(b)}"] = {"diff": diff, "stderr": se}
    n = next(iter(rows.values()))["blocks"]
    return {"blocks": n, "draws": draws, "trials": rows, "paired": pairs}


def _with_seed(tr: Trainer, seed: int, n_blocks: int, draws: int):
    """The same evaluation with another ``eval_seed`` (the Monte Carlo noise)."""
    old = tr.cfg.train.eval_seed
    tr.cfg.train.eval_seed = seed
    try:
        return tr.evaluation("val", n_blocks or None, draws, autocast=None)
    finally:
        tr.cfg.train.eval_seed = old


def markdown(result: dict) -> str:
    study = result["budgets"][0]
    lines = ["# Final evaluation: stderr at the default study's budget", "",
             f"Preset `{PRESET}` (the default study, `experiments/ablate_graph.py`), "
             f"{result['steps']} training steps per model, one data split; the final "
             "evaluation of `sedd_ray.trainer` (importance-sampled bound, blocks evenly "
             "spread over the validation split, `eval_seed` draws). Eval noise = std over "
             f"{result['repeats']} evaluation seeds. Nats/token. Targets: stderr <= 0.05, "
             "paired stderr <= 0.02.", "",
             f"The study's final-eval budget: {study['blocks']} blocks x {study['draws']} draws "
             f"(`train.final_eval_sequences` x `train.final_eval_draws` of `{PRESET}`).", ""]
    for i, budget in enumerate(result["budgets"]):
        tag = " (the default study's)" if i == 0 else ""
        lines += [f"## {budget['blocks']} blocks x {budget['draws']} draws{tag}", "",
                  "| trial | mean | stderr | eval noise | s per eval |", "|---|---|---|---|---|"]
        for name, r in budget["trials"].items():
            noise = f"{r['eval_noise']:.4f}" if r["eval_noise"] is not None else "-"
            lines.append(f"| {name} | {r['mean']:.3f} | {r['stderr']:.4f} | {noise} | "
                         f"{r['seconds_per_eval']:.1f} |")
        lines += ["", "| paired difference | diff | stderr |", "|---|---|---|"]
        for name, r in budget["paired"].items():
            lines.append(f"| {name} | {r['diff']:.3f} | {r['stderr']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per model "
                   "(default 1000, the default study's)")
    p.add_argument("--budgets", default="", help="more blocks x draws, comma separated "
                   "(0x8 = every validation block), after the preset's final-eval budget")
    p.add_argument("--repeats", type=int, default=3, help="evaluation seeds per budget")
    p.add_argument("--out", default=str(Path(__file__).with_name("BOUND_STDERR")))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t = preset(PRESET).train
    specs = [(t.final_eval_sequences, t.final_eval_draws)]
    specs += [tuple(int(v) for v in s.lower().split("x")) for s in args.budgets.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="bound-stderr-") as tmp:
        trainers = train_all(args.steps, Path(tmp))
    budgets = []
    for n, k in specs:
        t0 = time.time()
        budgets.append(measure(trainers, n, k, args.repeats))
        print(f"measured {n}x{k} in {time.time() - t0:.0f}s", flush=True)
    result = {"preset": PRESET, "steps": args.steps, "repeats": args.repeats, "budgets": budgets}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(math.isfinite(r["stderr"]) for b in budgets for r in b["trials"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
