"""Ray Train: the plain trainer on many workers and nodes, surviving worker failures.

    result = launch(cfg, name="absorb-run", storage="/shared/runs", num_workers=2)

Uses the Ray Train V2 API of Ray >= 2.60: a ``TorchTrainer`` whose per-worker function
runs :func:`sedd_ray.trainer.train`. Ray initialises the process group (gloo on CPU,
nccl on GPU); the trainer wraps the model in DDP, shards the data by rank and reports
on every rank at the same steps (``ray.train.report`` is a barrier), rank 0 attaching
its checkpoint. Ray persists each checkpoint to ``<storage>/<name>/ckpt-<step>`` and, on a
worker failure, restarts the worker group from the latest one (``FailureConfig``).
Running again with the same ``name`` and ``storage`` resumes the run.

Storage may be a local path or any URI ``pyarrow.fs`` understands (``s3://``,
``gs://``), so every node of a multi-node cluster sees it.

Ray Train's own console lines are kept to warnings; ``SEDD_RAY_TRAIN_LOG_LEVEL=INFO``
brings back its INFO lines (every report, every checkpoint upload).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sedd_ray import preflight
from sedd_ray.config import RunConfig
from sedd_ray.io import is_local, normalize
from sedd_ray.layout import RunLayout
from sedd_ray.preflight import DEFAULT_RESOURCE_TIMEOUT_S

# How often Ray Train's controller polls its workers unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# says otherwise: below TrainConfig.report_every_s (1.0 s by default).
HEALTH_CHECK_INTERVAL_S = 0.5
# Environment variables a worker on any node needs to see like the driver does.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "WANDB_MODE", "WANDB_API_KEY",
    "WANDB_DIR", "SEDD_RAY_CACHE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "SEDD_RAY_DRILL_NAN_AT", "SEDD_RAY_DRILL_NAN_IF",  # the NaN drill (sedd_ray.trainer)
)
# The environment a local cluster that connect() starts is created with, each unless the user
# set it: the raylet, and with it every process of the cluster (a study's trial drivers and
# Ray Train controllers too), inherits it. Its one node is never drained or preempted, so
# Ray Train's preemption watcher (an actor process per run: ~3 CPU-s to start on the 2-core
# machines we measure on, and a core-worker error line on every run) has nothing to watch.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Tune overwrites these metric names (see RAY_NOTES); never report them.
_RESERVED = {"pid", "hostname", "node_ip", "date", "timestamp", "done"}


class LaunchError(RuntimeError):
    """A Ray Train run failed for good; the message carries the worker's error."""


def _train_log_level() -> str:
    return os.environ.get("SEDD_RAY_TRAIN_LOG_LEVEL", "WARNING").upper()


class _BelowLevelRayTrain(logging.Filter):
    """Drops Ray Train's records below a level (every other record passes)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        import ray.train

        self.level = level
        self.package = os.path.dirname(os.path.abspath(ray.train.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        ray_train = (record.name.startswith("ray.train")
                     or os.path.abspath(record.pathname or "").startswith(self.package))
        return not (ray_train and record.levelno < self.level)


def _quiet_ray_train_console() -> None:
    """Ray Train's ``LoggingConfig`` filters the records of the ``ray.train`` loggers, but
    some of its modules log through ``logging.getLogger(__file__)`` (a path, not a
    ``ray.train`` name: every report's whole metrics dict), which reaches the root
    logger's console handler; filter those by the file they come from, on the console
    handlers only (Ray Train's log files in the session directory keep them)."""
    level = logging.getLevelName(_train_log_level())
    for name in ("", "ray"):
        for handler in logging.getLogger(name).handlers:
            console = (isinstance(handler, logging.StreamHandler)
                       and not isinstance(handler, logging.FileHandler))
            if console and not any(isinstance(f, _BelowLevelRayTrain) for f in handler.filters):
                handler.addFilter(_BelowLevelRayTrain(level))


def _worker_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: resume from Ray's checkpoint, train, report."""
    import ray.train
    import ray.train.torch
    import torch

    from sedd_ray.trainer import Trainer

    _quiet_ray_train_console()
    cfg = RunConfig.from_dict(config["run_config"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        metrics = {k: v for k, v in metrics.items() if k not in _RESERVED}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            metrics, checkpoint=checkpoint,
            checkpoint_dir_name=Path(checkpoint_dir).name if checkpoint_dir else None,
            delete_local_checkpoint_after_upload=False,
        )

    output = config["output_dir"] or tempfile.mkdtemp(prefix="sedd-ray-")
    trainer = Trainer(cfg, output, report, device=device, run_name=config["name"],
                      group=config.get("group"), init_from=config.get("init_from"))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            trainer.load(d)
    trainer.run(resume=False)  # everything the driver needs went through ray.train.report


def launch(
    cfg: RunConfig, *, name: str, storage: str, num_workers: int = 1,
    gpus_per_worker: float = 0, cpus_per_worker: float = 1,
    resources_per_worker: Mapping[str, float] | None = None, address: str | None = None,
    max_failures: int = 2, resume: bool = True, callbacks: list[Any] | None = None,
    placement_strategy: str = "PACK", group: str | None = None,
    resource_timeout: float = DEFAULT_RESOURCE_TIMEOUT_S, check_resources: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` with Ray Train; returns the final metrics plus ``run_dir`` and
    ``checkpoint_dir``. Raises :class:`LaunchError` with the worker's error when the run
    fails after ``max_failures`` retries. ``callbacks`` go to the Train ``RunConfig``
    (a study passes ``TuneReportCallback``). ``resources_per_worker`` adds custom
    resources (``{"tpu": 1}``) to each worker's CPUs and GPUs.

    Before anything is written, the request is compared with what the cluster can ever
    provide (:mod:`sedd_ray.preflight`): one that never fits raises
    :class:`~sedd_ray.preflight.ResourceError`; on an autoscaling cluster one that fits
    only after scaling up waits for at most ``resource_timeout`` seconds
    (``check_resources=False``: the caller has checked, as a study does once).
    ``init_from``: a pretrained folder (every worker must see it) or Hub id whose weights
    start the run when it has no checkpoint (``train --init-from``)."""
    resources = _worker_resources(cpus_per_worker, gpus_per_worker, resources_per_worker)
    _check_settings(cfg, num_workers, resources, max_failures)
    storage = _check_storage_and_data(cfg, storage)
    connect(address)
    if check_resources:
        preflight.check(preflight.Ask(num_workers, resources, strategy=placement_strategy),
                        timeout_s=resource_timeout)
    run_dir = _prepare_run_dir(storage, name, resume)
    trainer = _torch_trainer(
        cfg, name=name, group=group, storage=storage, run_dir=run_dir, resources=resources,
        num_workers=num_workers, placement_strategy=placement_strategy,
        max_failures=max_failures, callbacks=callbacks, init_from=init_from)
    print(f"Ray Train run {name!r}: results and checkpoints in {run_dir}", flush=True)
    return _fit(trainer, name, run_dir)


def _worker_resources(cpus: float, gpus: float,
                      custom: Mapping[str, float] | None) -> dict[str, float]:
    """One worker's resource request: ``{"CPU": 1, "GPU": 1, **custom}``."""
    if cpus < 0 or gpus < 0 or any(v < 0 for v in (custom or {}).values()):
        raise LaunchError(f"--cpus-per-worker, --gpus-per-worker and --worker-resources must "
                          f"be >= 0, got {cpus}, {gpus} and {dict(custom or {})}")
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    return {**resources, **{k: float(v) for k, v in (custom or {}).items()}}


def _check_settings(cfg: RunConfig, num_workers: int, resources: Mapping[str, float],
                    max_failures: int) -> None:
    """The run's own settings, before anything else (raises LaunchError or ConfigError)."""
    cfg.validate()
    if num_workers < 1:
        raise LaunchError(f"num_workers must be >= 1, got {num_workers}")
    if cfg.train.batch_size % num_workers:
        raise LaunchError(f"batch_size {cfg.train.batch_size} is not divisible by "
                          f"num_workers {num_workers}; change --batch-size")
    if max_failures < -1:
        raise LaunchError(f"max_failures must be >= 0 (or -1 = retry forever), got {max_failures}")
    if resources.get("GPU", 0) > 0 and cfg.train.device == "cpu":
        raise LaunchError("--gpus-per-worker > 0 with --device cpu; drop one of them")


def _check_storage_and_data(cfg: RunConfig, storage: str) -> str:
    """An impossible local storage path fails first, creating nothing; then the tokenised
    data is built (or found) here: a bad corpus fails before Ray starts, and the workers on
    this node read the cache. Returns the storage (a local one made absolute)."""
    from sedd_ray.checkpoint import precheck_writable_dir
    from sedd_ray.data import load_data

    storage = normalize(storage)
    if is_local(storage):
        precheck_writable_dir(storage, "--storage")
    load_data(cfg.data)  # the split is data.split_seed's, never the training seed's
    return storage


def _prepare_run_dir(storage: str, name: str, resume: bool) -> str:
    """``<storage>/<name>``; a local storage must take a write (read-only or full disk fails
    here, before any worker), and ``resume=False`` clears an earlier run of that name."""
    from sedd_ray.checkpoint import ensure_writable_dir

    run_dir = RunLayout(storage, name).dir
    if is_local(storage):
        ensure_writable_dir(storage, "--storage")
        if not resume and Path(run_dir).exists():
            import shutil

            shutil.rmtree(run_dir)
    return run_dir


def _torch_trainer(cfg: RunConfig, *, name: str, group: str | None, storage: str, run_dir: str,
                   resources: dict[str, float], num_workers: int, placement_strategy: str,
                   max_failures: int, callbacks: list[Any] | None,
                   init_from: str | None = None) -> Any:
    """The Ray Train ``TorchTrainer`` of the run (nothing starts until ``fit``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resources.get("GPU", 0) > 0
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return TorchTrainer(
        _worker_fn,
        train_loop_config={
            "run_config": cfg.to_dict(), "use_gpu": use_gpu, "name": name, "group": group,
            "init_from": init_from,
            # Trainer logs (metrics.jsonl, samples) next to Ray's run folder when local.
            "output_dir": RunLayout.at(run_dir).trainer_dir if is_local(storage) else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            # Ray Train's own INFO lines (every report's whole metrics dict, each checkpoint
            # upload) drown the study table; they stay in Ray's session log files.
            logging_config=ray.train.LoggingConfig(log_level=_train_log_level()),
        ),
    )


def _fit(trainer: Any, name: str, run_dir: str) -> dict[str, Any]:
    """Run the trainer; the final metrics with ``run_dir`` and ``checkpoint_dir``."""
    import ray.train

    try:
        with _ray_train_env():
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise LaunchError(f"run {name!r} failed: {_worker_error(e)} (run folder {run_dir})") from e
    metrics = dict(result.metrics or {})
    metrics["run_dir"] = run_dir
    metrics["checkpoint_dir"] = result.checkpoint.path if result.checkpoint else None
    print(f"Ray Train run {name!r} finished: final checkpoint {metrics['checkpoint_dir']}",
          flush=True)
    return metrics


def connect(address: str | None = None, resources: dict[str, float] | None = None) -> None:
    """Connect this process to Ray once: to ``address`` (``"auto"``, ``host:port`` or
    ``ray://...``) when given, else to ``$RAY_ADDRESS`` when set, else to a new local
    cluster. ``resources`` (custom resources) apply only to a new local cluster.

    Ray's own default for no address also joins whatever cluster ``ray start`` last left
    on the machine (``/tmp/ray/ray_current_cluster``), possibly a stale one; here joining
    an existing cluster is always explicit (``--address auto``). A new local cluster is
    started with :data:`LOCAL_CLUSTER_ENV` (this process's own environment is left as it
    was).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        with _scoped_env({k: v for k, v in LOCAL_CLUSTER_ENV.items() if k not in os.environ}):
            ray.init(address="local", resources=resources, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)


@contextlib.contextmanager
def _ray_train_env() -> Iterator[None]:
    """The environment Ray Train's controller is created with, for one ``fit()``; the
    previous values come back afterwards, so that a later ``ray.init`` in this process is
    not sent to a cluster that is gone.

    - ``RAY_ADDRESS`` = the connected cluster. Ray Train's PlacementGroupCleaner (which
      frees an early-stopped trial's placement group) finds its cluster by
      auto-detection, which fails when another Ray instance runs on the same machine; the
      placement group then leaks and later trials wait forever for its CPUs. Ray Train is
      told to propagate it to its controller, from which the cleaner inherits it.
    - ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = 0.5 s unless set: the controller polls its
      workers (and drains their one-deep report queue) this often. Ray's default, 2 s,
      would stall a worker whose reports come faster (see ``TrainConfig.report_every_s``)
      and is slow to notice that a run finished or failed.
    """
    import ray

    values = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address,
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))}
    try:
        from ray.train.v2._internal import constants

        constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    except (ImportError, AttributeError):  # a Ray version without this internal: no-op
        pass
    with _scoped_env(values):
        yield


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, as it was afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_error(e: Exception) -> str:
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err).strip().splitlines()
        # The last line of a worker traceback is the exception itself.
        return f"worker rank {rank}: {text[-1] if text else type(err).__name__}"
    return str(e).strip().splitlines()[-1]
