"""CLI: one SEDD training run.

    python -m sedd_ray.train --smoke-test --no-ray               # seconds, in-process
    python -m sedd_ray.train --preset cpu --graph uniform --no-ray --output runs/u
    python -m sedd_ray.train --preset tiny --num-workers 2       # Ray Train, 2 DDP workers
    python -m sedd_ray.train --preset small --num-workers 8 --gpus-per-worker 1 --address auto \\
        --storage s3://bucket/sedd

Every config field with a unique name is a flag (``--lr``, ``--warmup-steps``,
``--eval-draws`` ...); ``--model`` picks a named size; ``--set section.key=value`` sets
anything else. A bad config fails here, before any compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sedd_ray.cli import name_values, set_pairs
from sedd_ray.config import (
    MODEL_SIZES,
    PRESETS,
    ConfigError,
    RunConfig,
    apply_params,
    preset,
    short_names,
)
from sedd_ray.preflight import DEFAULT_RESOURCE_TIMEOUT_S, ResourceError


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset``, ``--smoke-test``, ``--model``, ``--set`` and one flag per config leaf."""
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="the 'smoke' preset: a run of seconds on the offline corpus")
    parser.add_argument("--model", help=f"model size: {', '.join(MODEL_SIZES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config value by dotted path, e.g. --set train.eval_draws=8")
    group = parser.add_argument_group("config overrides (default: the preset's value)")
    for short in sorted(short_names()):
        group.add_argument("--" + short.replace("_", "-"), dest=f"cfg_{short}", metavar="V")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build and validate the run config from parsed flags; raises ConfigError."""
    cfg = preset("smoke" if args.smoke_test else args.preset)
    params: dict[str, Any] = {}
    if args.model:
        params["model"] = args.model
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            params[key[4:]] = value
    params.update(set_pairs(args.set))
    cfg = apply_params(cfg, params)
    return cfg.validate()


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Where the run goes, whether it resumes, and what it starts from."""
    parser.add_argument("--output", default=None,
                        help="where checkpoints and metrics go (default runs/<name>); resumes "
                             "from its latest checkpoint if there is one")
    parser.add_argument("--no-ray", action="store_true", help="plain in-process run, no Ray")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--name", default=None, help="run name (default: <preset>-<graph>-<noise>)")
    parser.add_argument("--init-from", default=None, metavar="DIR_OR_ID",
                        help="fine-tune: start from the weights of an exported folder "
                        "(python -m sedd_ray.export) or an official SEDD model "
                        "(louaaron/sedd-small); fresh optimizer; the model config must match")


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a Ray Train run: workers, their resources, the cluster, the storage."""
    ray_args = parser.add_argument_group("Ray Train")
    ray_args.add_argument("--num-workers", type=int, default=1)
    ray_args.add_argument("--gpus-per-worker", type=float, default=0)
    ray_args.add_argument("--cpus-per-worker", type=float, default=1)
    ray_args.add_argument("--address", default=None,
                          help="Ray cluster to join (auto, host:port, ray://...); default: "
                          "$RAY_ADDRESS if set, else a new local cluster")
    ray_args.add_argument("--storage", default=None,
                          help="Ray storage path or URI (s3://, gs://); default ./runs")
    ray_args.add_argument("--max-failures", type=int, default=2)
    ray_args.add_argument("--worker-resources", default="", metavar="NAME=N,...",
                          help="custom resources per worker, e.g. --worker-resources tpu=1")
    ray_args.add_argument("--resource-timeout", type=float, default=DEFAULT_RESOURCE_TIMEOUT_S,
                          help="seconds to wait for an autoscaling cluster to provide the "
                          f"workers (default {DEFAULT_RESOURCE_TIMEOUT_S:.0f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sedd_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    _add_run_flags(parser)
    _add_ray_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        custom = name_values(args.worker_resources, "--worker-resources", example="tpu=1")
        init_from = _check_init_from(args.init_from, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{cfg.preset}-{cfg.diffusion.graph}-{cfg.diffusion.noise}"
    from sedd_ray.checkpoint import CheckpointError, StorageError
    from sedd_ray.data import DataError

    if args.no_ray:
        from sedd_ray.trainer import NonFiniteLossError, train

        output = os.path.abspath(args.output or os.path.join("runs", name))
        print(f"run {name}: output in {output}")
        try:
            result = train(cfg, output, resume=not args.no_resume, run_name=name,
                           init_from=init_from)
        except (NonFiniteLossError, CheckpointError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_result(result.__dict__, output)
        return 0
    from sedd_ray.launch import LaunchError, launch

    try:
        result = launch(cfg, name=name, storage=args.storage or os.path.abspath("runs"),
                        num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                        cpus_per_worker=args.cpus_per_worker, resources_per_worker=custom,
                        address=args.address, max_failures=args.max_failures,
                        resume=not args.no_resume, resource_timeout=args.resource_timeout,
                        init_from=init_from)
    except ResourceError as e:  # the cluster can never hold it: nothing ran or was written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LaunchError, StorageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_result(result, result.get("run_dir", ""))
    return 0


def _check_init_from(ref: str | None, cfg: RunConfig) -> str | None:
    """``--init-from`` once its config fits ``cfg`` (checked before any data or compute):
    a local folder as an absolute path, a Hub id as given (each Ray worker fetches it, or
    finds it in its cache). Raises ConfigError with one line otherwise."""
    if ref is None:
        return None
    from sedd_ray.hub import HubError, model_mismatch, pretrained_config

    try:
        pre, _, folder = pretrained_config(ref)
    except HubError as e:
        raise ConfigError(f"--init-from: {e}") from None
    why = model_mismatch(pre, cfg)
    if why is not None:
        raise ConfigError(f"--init-from {ref}: {why}")
    return str(folder.absolute()) if os.path.isdir(os.path.expanduser(ref)) else ref


def _print_result(result: dict[str, Any], where: str) -> None:
    keep = ("step", "tokens_seen", "val_nll", "val_nll_stderr", "val_ppl_bound", "val_nll_best",
            "test_nll", "test_ppl_bound", "n_params", "data_identity", "wall_time_s",
            "checkpoint_dir")
    print(json.dumps({k: result.get(k) for k in keep}, indent=1))
    for s in result.get("samples", [])[:2]:
        print("sample:", repr(s[:200]))
    print(f"results and checkpoints: {where}")


if __name__ == "__main__":
    sys.exit(main())
