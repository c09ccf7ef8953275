"""What the study scripts share: their flags and defaults, running studies, the reports.

A script names a study of :mod:`sedd_ray.study` and its CPU defaults (base preset, steps,
tuning trials per level, replicates, settings such as the final evaluation's budget);
:func:`run_and_report` runs its phases (tuning, then each level's best config replicated
with fresh seeds) with Ray Tune, always shuts Ray down, then writes each study's report
with :mod:`experiments.analyze` (Parquet only: the comparison of the levels comes first)
and prints where everything is. The same script runs the real study on a GPU cluster:
``--address auto --gpus-per-trial 1 --preset small --steps 100000``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import analyze  # noqa: E402  (no torch, no Ray)
from sedd_ray.config import ConfigError  # noqa: E402

# The final evaluation's budget for every study script's full run (not --smoke-test): each
# trial's number is the importance-sampled bound of its final EMA weights on the same
# validation blocks with the same draws (common random numbers; benchmarks/BOUND_STDERR.md:
# s.e. 0.014-0.021 nats/token per trial, <= 0.019 for a paired difference, on the tiny model).
FINAL_EVAL: dict[str, Any] = {"final_eval_sequences": 1024, "final_eval_draws": 8}


@dataclass(frozen=True)
class Defaults:
    """A script's full-run defaults; ``--smoke-test`` ignores them (the smoke preset, 1
    tuning trial per level, 2 replicates)."""

    preset: str = "tiny"
    steps: int = 400
    trials_per_level: int = 2  # tuning phase
    seeds: str = "0,1"  # tuning trial k of every level uses seed k % 2: levels share seeds
    replicates: int = 3  # replication phase: each level's best config with 3 fresh seeds
    # Parameters every trial gets unless the user ``--set``s them (short config names).
    settings: Mapping[str, Any] = field(default_factory=lambda: dict(FINAL_EVAL))


def make_parser(prog: str, doc: str, defaults: Defaults) -> argparse.ArgumentParser:
    from sedd_ray.study import add_study_flags

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_flags(p, default_trials=defaults.trials_per_level)
    p.set_defaults(preset=None, steps=None, seeds=defaults.seeds)
    for action in p._actions:  # show the script's defaults in --help
        if action.dest == "preset":
            action.help = f"base preset of every trial (default {defaults.preset})"
        elif action.dest == "steps":
            action.help = f"training steps per trial (default {defaults.steps})"
        elif action.dest == "seeds":
            action.help = ("comma-separated tuning seeds, reused by every level (default "
                           f"{defaults.seeds})")
        elif action.dest == "replicates":
            action.help = ("replication phase: re-run each level's best tuned config with K "
                           f"fresh seeds, the same for every level (default {defaults.replicates}"
                           "; 2 with --smoke-test)")
    return p


def apply_defaults(args: argparse.Namespace, defaults: Defaults) -> argparse.Namespace:
    """Fill in the script's preset, steps, replicates and settings unless given (or
    ``--smoke-test``)."""
    if not args.smoke_test:
        args.preset = args.preset or defaults.preset
        args.steps = defaults.steps if args.steps is None else args.steps  # 0 is an error
        # None (not given) takes the default; a given 0 stays, and is an error.
        args.replicates = defaults.replicates if args.replicates is None else args.replicates
        given = {item.partition("=")[0].strip() for item in args.set}
        args.set = [f"{k}={v}" for k, v in defaults.settings.items() if k not in given] + args.set
    return args


def run_and_report(studies: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> int:
    """Build every study first (``(name in sedd_ray.study.STUDIES, its keyword arguments)``,
    from the script's flags), then run each (``--resume`` restores), shut Ray down, write
    and print the reports.

    Returns 0 when every study has a finished trial, 1 when one has none, 2 on a bad
    configuration (nothing run)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from sedd_ray.checkpoint import StorageError
    from sedd_ray.data import DataError
    from sedd_ray.io import normalize
    from sedd_ray.layout import StudyLayout
    from sedd_ray.study import ReplicationError, run_study, spec_from_args

    try:  # every spec validated before the first study starts
        specs = [spec_from_args(study, args, **kw) for study, kw in studies]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dirs: list[str] = []
    failures: list[str] = []  # studies whose tuning left a level without a finished trial
    try:
        for spec in specs:
            try:
                dirs.append(run_study(spec, args.storage, resume=args.resume, phase=args.phase,
                                      address=args.address,
                                      resource_timeout=args.resource_timeout))
            except ReplicationError as e:
                if e.exit_code == 2 and not dirs:  # nothing ran at all: bad input
                    raise
                failures.append(str(e))  # its tuning, or an earlier study, ran: report them
                if e.exit_code != 2:
                    dirs.append(StudyLayout(normalize(args.storage), spec.name).dir)
    except (ConfigError, DataError, StorageError) as e:  # bad input: one line, nothing run
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()  # never leave a local cluster behind
    train_s = time.perf_counter() - t0
    rc = 1 if failures else 0
    lines = []
    for d in dirs:
        storage, name = analyze.split_study_dir(d)
        try:
            report = analyze.write_report(storage, name)
        except (analyze.CompareError, analyze.ResultsError) as e:  # e.g. mixed data identities
            print(f"error: {e}", file=sys.stderr)
            return 2
        study = analyze.load_study(storage, name)
        if study.finished.empty:
            rc = 1
        print("\n".join(analyze.read_verdicts(report)))  # the answer first
        lines += [f"study directory: {d}", f"report: {report}",
                  f"  {len(study.finished)} of {len(study.trials)} trials finished"]
    print("\n".join(lines))
    print(f"wall time: {time.perf_counter() - t0:.0f} s (studies {train_s:.0f} s)")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if rc and not failures:
        print("error: a study has no finished trial; see the report's failed trials",
              file=sys.stderr)
    return rc
