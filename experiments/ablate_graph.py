"""Graph ablation: uniform vs absorbing SEDD, same budget per graph, then the report.

    python experiments/ablate_graph.py                  # CPU, offline Shakespeare, 5-10 min
    python experiments/ablate_graph.py --smoke-test     # 1-2 minutes
    python experiments/ablate_graph.py --address auto --gpus-per-trial 1 \\
        --preset small --steps 100000 --trials-per-level 4 --seeds 0,1 --storage s3://b/studies

Runs the ``graph-ablation`` study of :mod:`sedd_ray.study`: each graph gets the same
number of trials, steps and seeds, and its own Optuna search over the noise schedule,
learning rate and warm-up. Results land in ``<storage>/graph-ablation`` (Parquet);
``experiments/analyze.py`` then writes ``report.md`` and its plots there. ``--resume``
finishes an interrupted study. Prints the study directory and the report's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import Defaults, apply_defaults, make_parser, run_and_report  # noqa: E402

# 2 levels x 2 trials (seeds 0, 1) of the tiny model, 2 at a time on 2 CPU cores: measured
# 7 minutes with the cores shared by other jobs (load 13-21), peak memory (PSS) 4 GB.
DEFAULTS = Defaults(preset="tiny", steps=1000, trials_per_level=2)


def main(argv: list[str] | None = None) -> int:
    args = apply_defaults(make_parser("python experiments/ablate_graph.py", __doc__, DEFAULTS)
                          .parse_args(argv), DEFAULTS)
    return run_and_report([("graph-ablation", {})], args)


if __name__ == "__main__":
    raise SystemExit(main())
