"""Noise ablation: geometric vs log-linear schedule, for each graph; tune, replicate, report.

    python experiments/ablate_noise.py                  # both graphs, CPU, ~10-20 min
    python experiments/ablate_noise.py --graph absorb   # one graph
    python experiments/ablate_noise.py --smoke-test     # both phases, tiny settings

Runs the ``noise-ablation`` study of :mod:`sedd_ray.study` once per graph (studies
``noise-ablation-<graph>``), in phases: tuning (both schedules get the same trials, steps
and seeds, and each its own Optuna search over learning rate, warm-up and, for geometric,
sigma_min), then replication (each schedule's best tuned config with ``--replicates``
fresh seeds, the same for both schedules). Each study gets its ``report.md``, verdict
first. Prints the study directories and the reports' paths.

The CPU defaults (tiny model, 600 steps, 2 tuning trials + 3 replicates per schedule: 10
trials per graph, 20 in all) show the machinery; they are NOT sized to conclude. The
schedules differ by far less than the graphs do, and at this size and budget the 95%
interval will usually include 0: the report then says "inconclusive" and how many
replicates to try. A conclusive noise ablation needs a larger model and budget, e.g.
``--address auto --gpus-per-trial 1 --preset small --steps 100000 --replicates 6``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    Defaults,
    apply_defaults,
    make_parser,
    run_and_report,
)

# 2 graphs x 2 schedules x (2 tuning trials + 3 replicates) of the tiny model at 600 steps,
# 2 trials at a time: one trial trains in about 25 s on one core plus about 20 s of Ray,
# so about 8 minutes on 2 quiet cores, twice that under load. Not sized to conclude.
DEFAULTS = Defaults(preset="tiny", steps=600, trials_per_level=2, replicates=3)


def main(argv: list[str] | None = None) -> int:
    from sedd_ray.diffusion import GRAPHS  # inside: the module itself imports no torch

    every = GRAPHS.names()  # every registered graph
    p = make_parser("python experiments/ablate_noise.py", __doc__, DEFAULTS)
    p.add_argument("--graph", choices=every, default=None, help="one graph (default: all)")
    args = apply_defaults(p.parse_args(argv), DEFAULTS)
    graphs = [args.graph] if args.graph else every
    # One study per graph: --name X becomes X-<graph> when there are several.
    rename = bool(args.name) and len(graphs) > 1
    return run_and_report([("noise-ablation", {"graph": g, **({"name": f"{args.name}-{g}"}
                                                               if rename else {})})
                           for g in graphs], args)


if __name__ == "__main__":
    raise SystemExit(main())
