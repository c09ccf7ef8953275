"""Graph ablation: does absorbing beat uniform SEDD? Tune, replicate, compare, report.

    python experiments/ablate_graph.py                  # CPU, offline Shakespeare: a verdict
    python experiments/ablate_graph.py --smoke-test     # both phases, tiny settings, ~2 min
    python experiments/ablate_graph.py --address auto --gpus-per-trial 1 \\
        --preset small --steps 100000 --trials-per-level 4 --replicates 3 --storage s3://b/studies

Runs the ``graph-ablation`` study of :mod:`sedd_ray.study` in phases. Tuning: each graph
gets the same number of trials, steps and seeds, and its own Optuna search over the noise
schedule, learning rate and warm-up. Replication: each graph's best finished tuning trial
is re-run with ``--replicates`` fresh training seeds (the same seeds for both graphs, so
the comparison pairs them) at the full budget. Results land in ``<storage>/graph-ablation``
(Parquet, one row per trial with its ``phase``); ``experiments/analyze.py`` then writes
``report.md``, which opens with the verdict (the effect in nats/token with its 95%
confidence interval), and its plots. ``--resume`` (or the same command again) finishes
whichever phase is unfinished. Prints the study directory and the report's path.

The defaults are sized to reach a verdict on 2 CPU cores within 15 minutes: the tiny
model, 1,000 steps, 2 tuning trials per graph and 3 replicates, i.e. 10 trials, 2 at a
time (see DEFAULTS for the measurement).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    FINAL_EVAL,
    Defaults,
    apply_defaults,
    make_parser,
    run_and_report,
)

# 2 graphs x (2 tuning trials + 3 replicates) of the tiny model at 1,000 steps, 2 trials at
# a time on 2 CPU cores: 5 rounds of 2 trials. Measured here: one trial trains in 38-55 s
# on one core (plain trainer, quiet); one round of 2 such trials in a study took 73 s
# (86 s with ray.init) with the cores shared by other jobs (load 5), so the study takes
# about 6-7 minutes, and about twice that under heavier load. The final evaluation's
# budget (common.FINAL_EVAL) adds to every trial: re-measure when it is set. A whole run
# without it (each trial's number its best periodic evaluation, s.e. 0.17-0.29) took 364 s
# (load 4) and was inconclusive: +0.52 nats/token, 95% CI -0.04 to 1.08, 3 paired seeds.
DEFAULTS = Defaults(preset="tiny", steps=1000, trials_per_level=2, replicates=3,
                    settings=FINAL_EVAL)


def main(argv: list[str] | None = None) -> int:
    args = apply_defaults(make_parser("python experiments/ablate_graph.py", __doc__, DEFAULTS)
                          .parse_args(argv), DEFAULTS)
    return run_and_report([("graph-ablation", {})], args)


if __name__ == "__main__":
    raise SystemExit(main())
