"""Model-size sweep: the bound against parameters and training compute; tune, replicate.

    python experiments/sweep_model_size.py                        # tiny, mini, base on CPU
    python experiments/sweep_model_size.py --sizes tiny,mini --smoke-test
    python experiments/sweep_model_size.py --address auto --gpus-per-trial 1 \\
        --preset small --sizes small,medium --steps 100000

Runs the ``model-size`` study of :mod:`sedd_ray.study` in phases: tuning (every size gets
the same steps, data and seeds and its own learning-rate search), then replication (each
size's best tuned config with ``--replicates`` fresh seeds, the same for every size). The
report (``experiments/analyze.py``) gives each size's effect against a reference size with
its confidence interval, and fits ``val_nll ≈ a·N^b`` against non-embedding parameters N
and against training compute C ≈ 6·N·D FLOPs (D training tokens; attention and evaluation
ignored), on the best trial per size, on log-log axes. Prints the study directory and the
report's path.

The CPU defaults (tiny, mini, base at 600 steps, 2 tuning trials + 3 replicates per size:
15 trials) show the machinery; they are NOT sized to conclude, and they are slow: a base
trial alone takes about 6 minutes on one core (0.55 s per step measured here), so the
sweep takes about 20-25 minutes on 2 quiet cores. 600 steps also undertrain the larger
sizes, so the bound need not fall with size. A sweep worth reading needs GPUs and a real
budget (the third command).
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

# Per trial on one core, measured here: tiny ~25 s, mini ~55 s, base ~330 s (600 steps),
# plus about 20 s of Ray each; 15 trials 2 at a time. Not sized to conclude.
DEFAULTS = Defaults(preset="tiny", steps=600, trials_per_level=2, replicates=3)
SIZES = "tiny,mini,base"


def main(argv: list[str] | None = None) -> int:
    from sedd_ray.cli import name_list
    from sedd_ray.config import MODEL_SIZES, ConfigError

    p = make_parser("python experiments/sweep_model_size.py", __doc__, DEFAULTS)
    p.add_argument("--sizes", default=SIZES,
                   help=f"comma-separated model sizes (of {', '.join(MODEL_SIZES)}; default {SIZES})")
    args = apply_defaults(p.parse_args(argv), DEFAULTS)
    try:  # the study checks each size against MODEL_SIZES
        sizes = name_list(args.sizes, "--sizes", example="tiny,mini")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_and_report([("model-size", {"sizes": sizes})], args)


if __name__ == "__main__":
    raise SystemExit(main())
