"""Noise ablation: geometric vs log-linear schedule, for each graph, then the reports.

    python experiments/ablate_noise.py                  # both graphs, CPU, ~20 min
    python experiments/ablate_noise.py --graph absorb   # one graph
    python experiments/ablate_noise.py --smoke-test

Runs the ``noise-ablation`` study of :mod:`sedd_ray.study` once per graph (studies
``noise-ablation-<graph>``): both schedules get the same trials, steps and seeds, and
each its own Optuna search over learning rate, warm-up and (geometric) sigma_min. Each
study gets its ``report.md``. Prints the study directories and the reports' paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import Defaults, apply_defaults, make_parser, run_and_report  # noqa: E402

DEFAULTS = Defaults(preset="tiny", steps=600, trials_per_level=2)


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
