"""Standard error of the NLL-bound evaluation: today's ``elbo_nll`` vs the per-block
importance-sampled bound of :mod:`sedd_ray.diffusion.bound`, for every graph x schedule.

    PYTHONPATH=. python benchmarks/bound_stderr.py              # ~10-20 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/bound_stderr.py --steps 50   # quick look

Trains one tiny model per graph x schedule pair (the default study's preset, same data
split for all four), then evaluates each at fixed budgets (blocks x draws):

- ``stderr``: the standard error each method reports (spread over blocks / sqrt(n));
- ``eval noise``: the standard deviation of the estimate over ``--repeats`` evaluation
  seeds on the same blocks (the Monte Carlo noise of the evaluation alone);
- ``paired``: the stderr of the difference of two trials on the same blocks (the old
  method's draws are seeded by the sequence index, so they are paired too).

Writes ``benchmarks/BOUND_STDERR.json`` and ``.md``. Targets (issue 15): stderr <= 0.05
nats/token at the default study's eval budget; paired stderr <= 0.02.
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
from sedd_ray.diffusion import elbo_nll  # noqa: E402
from sedd_ray.diffusion.bound import (  # noqa: E402
    mean_stderr,
    paired_difference,
    per_block_bound,
    score_model_log_score_fn,
    spread_block_indices,
)
from sedd_ray.trainer import Trainer, _derive_seed  # noqa: E402

PAIRS = [("uniform", "geometric"), ("uniform", "loglinear"),
         ("absorb", "geometric"), ("absorb", "loglinear")]
CONTRASTS = [  # (a, b): the study comparisons
    (("absorb", "loglinear"), ("uniform", "loglinear")),
    (("absorb", "geometric"), ("uniform", "geometric")),
    (("absorb", "loglinear"), ("absorb", "geometric")),
    (("uniform", "loglinear"), ("uniform", "geometric")),
]


@torch.no_grad()
def old_per_sequence(tr: Trainer, blocks: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Today's evaluation (trainer.evaluate_bound, one rank), per sequence. (n,) float64."""
    out = []
    bs = tr.cfg.train.eval_batch_size
    for start in range(0, blocks.shape[0], bs):
        x0 = blocks[start:start + bs]
        g = torch.Generator().manual_seed(_derive_seed(seed, 104729, start))
        out.append(elbo_nll(tr.ema, tr.graph, tr.noise, x0, draws=draws, generator=g).double())
    return torch.cat(out)


@torch.no_grad()
def new_per_block(tr: Trainer, blocks: torch.Tensor, ids: torch.Tensor, draws: int,
                  seed: int) -> torch.Tensor:
    fn = score_model_log_score_fn(tr.ema)
    return per_block_bound(fn, tr.graph, tr.noise, blocks, ids, draws=draws, seed=seed,
                           batch_size=256)


def train_all(steps: int, out: Path) -> dict[tuple[str, str], Trainer]:
    base = {"steps": steps, "eval_every": steps, "ckpt_every": steps, "test_draws": 0,
            "progress": False, "sample_every": 0}
    cfg0 = apply_params(preset("tiny"), base)
    bundle = load_data(cfg0.data)
    trainers = {}
    for graph, noise in PAIRS:
        cfg = apply_params(cfg0, {"graph": graph, "noise": noise})
        t0 = time.time()
        tr = Trainer(cfg, out / f"{graph}-{noise}", bundle=bundle)
        tr.run(resume=False)
        print(f"trained {graph}/{noise}: {steps} steps in {time.time() - t0:.0f}s", flush=True)
        trainers[(graph, noise)] = tr
    return trainers


def measure(trainers, n_blocks: int, draws: int, repeats: int) -> dict:
    any_tr = next(iter(trainers.values()))
    val = any_tr.data.val
    ids = spread_block_indices(val.shape[0], n_blocks)
    old_blocks, new_blocks = val[:n_blocks], val[ids]
    rows, per = {}, {}
    for key, tr in trainers.items():
        olds = [old_per_sequence(tr, old_blocks, draws, s) for s in range(repeats)]
        news = [new_per_block(tr, new_blocks, ids, draws, s) for s in range(repeats)]
        per[key] = (olds[0], news[0])
        (om, ose), (nm, nse) = mean_stderr(olds[0]), mean_stderr(news[0])
        rows["/".join(key)] = {
            "old_mean": om, "old_stderr": ose,
            "old_eval_noise": float(torch.stack([o.mean() for o in olds]).std()),
            "new_mean": nm, "new_stderr": nse,
            "new_eval_noise": float(torch.stack([n.mean() for n in news]).std()),
        }
    pairs = {}
    for a, b in CONTRASTS:
        od, ose = paired_difference(per[a][0], per[b][0])
        nd, nse = paired_difference(per[a][1], per[b][1])
        pairs[f"{'/'.join(a)} - {'/'.join(b)}"] = {"old_diff": od, "old_stderr": ose,
                                                   "new_diff": nd, "new_stderr": nse}
    return {"blocks": int(len(ids)), "draws": draws, "trials": rows, "paired": pairs}


def markdown(result: dict) -> str:
    lines = ["# NLL-bound evaluation: stderr, old (`elbo_nll`) vs new (`bound.per_block_bound`)",
             "", f"Tiny preset, {result['steps']} training steps per model, same data split; "
             f"eval noise = std over {result['repeats']} evaluation seeds. Nats/token.", ""]
    for budget in result["budgets"]:
        lines += [f"## {budget['blocks']} blocks x {budget['draws']} draws", "",
                  "| trial | old mean | old stderr | old eval noise | new mean | new stderr "
                  "| new eval noise |", "|---|---|---|---|---|---|---|"]
        for name, r in budget["trials"].items():
            lines.append(f"| {name} | {r['old_mean']:.3f} | {r['old_stderr']:.4f} | "
                         f"{r['old_eval_noise']:.4f} | {r['new_mean']:.3f} | "
                         f"{r['new_stderr']:.4f} | {r['new_eval_noise']:.4f} |")
        lines += ["", "| paired difference | old diff | old stderr | new diff | new stderr |",
                  "|---|---|---|---|---|"]
        for name, r in budget["paired"].items():
            lines.append(f"| {name} | {r['old_diff']:.3f} | {r['old_stderr']:.4f} | "
                         f"{r['new_diff']:.3f} | {r['new_stderr']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per model "
                   "(default 1000, the default study's)")
    p.add_argument("--budgets", default="32x2,64x4,128x8,256x8", help="blocks x draws, comma separated "
                   "(32x2 is the tiny preset's eval budget, 64x4 its test budget)")
    p.add_argument("--repeats", type=int, default=5, help="evaluation seeds per budget")
    p.add_argument("--out", default=str(Path(__file__).with_name("BOUND_STDERR")))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bound-stderr-") as tmp:
        trainers = train_all(args.steps, Path(tmp))
    budgets = []
    for spec in args.budgets.split(","):
        n, k = (int(v) for v in spec.lower().split("x"))
        t0 = time.time()
        budgets.append(measure(trainers, n, k, args.repeats))
        print(f"measured {spec} in {time.time() - t0:.0f}s", flush=True)
    result = {"steps": args.steps, "repeats": args.repeats, "budgets": budgets}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(math.isfinite(r["new_stderr"]) for b in budgets for r in b["trials"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
