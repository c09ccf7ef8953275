"""Graph ablation: does absorbing beat uniform SEDD? Tune, replicate, compare, report.

    python experiments/ablate_graph.py                  # CPU, offline Shakespeare: a verdict
    python experiments/ablate_graph.py --smoke-test     # both phases, tiny settings, ~2 min
    python experiments/ablate_graph.py --ar-reference   # and the autoregressive reference
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

``--ar-reference`` also runs the ``ar-reference`` study (``<storage>/graph-ablation-ar``):
the same backbone with causal attention and next-token loss, tuned with as many trials as
one graph gets and replicated with the same fresh seeds. Its exact NLL is measured on the
same validation blocks, so the report draws it as a reference line and states each graph's
diffusion-to-AR gap, paired by seed and block, with its confidence interval.

The defaults are sized to reach a verdict on 2 CPU cores within 15 minutes: the tiny
model, 1,000 steps, 2 tuning trials per graph and 5 replicates, i.e. 14 trials, 2 at a
time (see DEFAULTS for the measurement and why 5).
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
from sedd_ray.layout import ar_reference_study  # noqa: E402

# 2 graphs x (2 tuning trials + 5 replicates) of the tiny model at 1,000 steps, 2 trials at
# a time on 2 CPU cores: 7 rounds of 2 trials, about 90 s each on a quiet machine (final
# evaluation of 1024 blocks x 8 draws included). Why 5 replicates and not the study's
# default 3: at this budget the absorbing model leaves the unigram plateau (about 5.1
# nats/token) at a seed-dependent step, so its final bound is bimodal across seeds (4.59
# vs 4.92-4.98 in a measured run), while uniform stays on its plateau (5.27-5.28). Every
# seed's paired difference favoured absorbing (+0.29, +0.69, +0.36), but with 3 seeds the
# t-interval (t = 4.30 on 2 degrees of freedom) still covered 0 (95% CI -0.09 to 0.99, 450 s).
# Five seeds (t = 2.78 on 4) make the interval about a third as wide.
DEFAULTS = Defaults(preset="tiny", steps=1000, trials_per_level=2, replicates=5)


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python experiments/ablate_graph.py", __doc__, DEFAULTS)
    p.add_argument("--ar-reference", action="store_true",
                   help="also train the autoregressive reference (same backbone, causal, "
                        "same data, budget and seeds; the study <name>-ar) and show it in "
                        "the report: a reference line and each graph's diffusion-to-AR gap "
                        "with its CI. About 4 more minutes on 2 CPU cores")
    args = apply_defaults(p.parse_args(argv), DEFAULTS)
    studies: list[tuple[str, dict]] = [("graph-ablation", {})]
    if args.ar_reference:
        of = args.name or "graph-ablation"
        studies.append(("ar-reference", {"of": of, "name": ar_reference_study(of)}))
    return run_and_report(studies, args)


if __name__ == "__main__":
    raise SystemExit(main())
