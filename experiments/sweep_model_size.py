"""Model-size sweep: the bound against parameters and training compute, on log-log axes.

    python experiments/sweep_model_size.py                        # tiny, mini, base on CPU
    python experiments/sweep_model_size.py --sizes tiny,mini --smoke-test
    python experiments/sweep_model_size.py --address auto --gpus-per-trial 1 \\
        --preset small --sizes small,medium --steps 100000

Runs the ``model-size`` study of :mod:`sedd_ray.study`: every size gets the same steps,
data and seeds and its own learning-rate search. The report (``experiments/analyze.py``)
fits ``val_nll ≈ a·N^b`` against non-embedding parameters N and against training compute
C ≈ 6·N·D FLOPs (D training tokens; attention and evaluation ignored), on the best trial
per size, and plots both on log-log axes. Prints the study directory and the report's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import Defaults, apply_defaults, make_parser, run_and_report  # noqa: E402

DEFAULTS = Defaults(preset="tiny", steps=600, trials_per_level=2)
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
