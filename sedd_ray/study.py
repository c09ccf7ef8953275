"""Studies: Ray Tune + Optuna over graph, noise schedule, model size and optimiser settings.

A study is a named search space + budget + resources (:class:`StudySpec`). Tune runs
one *driver* per trial (a function trainable using no CPU); the driver launches the Ray
Train run of :mod:`sedd_ray.launch` named ``<trial_id>`` under
``<storage>/<study>/train/``, and ``TuneReportCallback`` forwards the workers' reports to
Tune. A Tune callback writes every trial to Parquet while the study runs
(:mod:`sedd_ray.results`).

Two modes:

* **search** - Optuna (TPE, seeded, define-by-run so conditional parameters work) over
  every axis together.
* **ablation** - the ablated axis (e.g. ``graph``) is not searched: every level gets
  the same budget (``trials_per_level`` trials, the same steps and the same seed
  sequence) and its own Optuna searcher, which tunes only the nuisance parameters within
  that level, so levels compare fairly.

An ablation (and, with ``replicates``, a search) runs in phases, each a Tune experiment
of its own under the study folder and each resumable:

1. **tune** (``<study>/tune/``) - the search above; equal budget per level.
2. **replicate** (``<study>/replicate/``) - each level's best finished tuning trial (by
   ``val_nll_final``, the final evaluation, where the trials have that column; else by the
   study's metric) re-run with ``replicates`` fresh training seeds at the full budget: the
   same seeds for every level (:func:`replicate_seeds`), so levels pair by seed. It starts
   only once every level has a finished tuning trial (else :class:`ReplicationError`).
3. **compare** - the report (``experiments/analyze.py``) compares the levels, from
   Parquet only.

Every row of ``trials.parquet`` says its ``phase`` (``"tune"`` or ``"replicate"``) and,
for a replicate, ``replicate_of`` (the tuning trial whose config it copies).

``--resume`` (or running the same study again) restores whichever phase is unfinished
with ``Tuner.restore`` (unfinished and errored trials resumed; a Train run resumes from
its own latest checkpoint), so every trial is recorded exactly once. Once replication
has started, the tuning phase is final.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sedd_ray import preflight
from sedd_ray.cli import int_list, set_pairs
from sedd_ray.cluster import DRIVER_RESOURCE  # the head's custom resource: Tune drivers live there
from sedd_ray.config import ConfigError, RunConfig, apply_params, preset
from sedd_ray.io import is_local, normalize
from sedd_ray.layout import StudyLayout
from sedd_ray.preflight import DEFAULT_RESOURCE_TIMEOUT_S
from sedd_ray.registry import Registry

# The phases of a study, in order (the ``phase`` column of trials.parquet).
PHASES = ("tune", "replicate")
DEFAULT_REPLICATES = 3  # fresh seeds per level in an ablation's replication phase
SMOKE_REPLICATES = 2  # with --smoke-test: both phases run, in seconds
# Keys of a Tune trial's config that are bookkeeping, not run-config parameters.
TRIAL_KEYS = ("level", "replicate_of")


class ReplicationError(ConfigError):
    """Replication cannot start: a level has no finished tuning trial. ``exit_code`` is 2
    when nothing ran (bad input: replication asked of a study without tuning results)
    and 1 when the study's own tuning trials all failed for a level."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config parameters of a Tune trial's config (its bookkeeping keys aside)."""
    return {k: v for k, v in config.items() if k not in TRIAL_KEYS}


def trial_phase(config: Mapping[str, Any]) -> str:
    """The phase that ran a trial with this Tune config: a replicate names its original."""
    return "replicate" if config.get("replicate_of") else "tune"

# --- search space -------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched parameter. ``when={"noise": "geometric"}`` makes it conditional."""

    kind: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: Mapping[str, Any] | None = None

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(name, list(self.choices))


def Float(low: float, high: float, log: bool = False, when: Mapping[str, Any] | None = None) -> Param:
    if not low < high:
        raise ConfigError(f"Float(low, high) needs low < high, got {low} and {high}")
    return Param("float", low, high, log, when=when)


def Int(low: int, high: int, log: bool = False, when: Mapping[str, Any] | None = None) -> Param:
    if not low <= high:
        raise ConfigError(f"Int(low, high) needs low <= high, got {low} and {high}")
    return Param("int", low, high, log, when=when)


def Choice(choices: Sequence[Any], when: Mapping[str, Any] | None = None) -> Param:
    if not choices:
        raise ConfigError("Choice needs at least one option")
    return Param("choice", choices=tuple(choices), when=when)


@dataclass
class StudySpec:
    """A study: what to search, with what budget, on what resources.

    ``base`` is a preset name; ``fixed`` params apply to every trial; ``space`` is
    searched; ``ablate``/``levels`` name the ablated axis (ablation mode) or are None
    (search mode). Parameter names are the short config names (``lr``, ``graph``,
    ``model`` ...) of :func:`sedd_ray.config.apply_params`.
    """

    name: str
    base: str = "tiny"
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Param] = field(default_factory=dict)
    ablate: str | None = None
    levels: list[Any] = field(default_factory=list)
    trials_per_level: int = 2
    num_trials: int = 4  # search mode
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = "val_nll"
    mode: str = "min"
    asha: bool = False
    grace_period: int = 0  # steps; 0 = a quarter of the run
    reduction_factor: int = 2
    num_workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_concurrent: int = 0  # 0 = derived from the cluster's resources
    max_failures: int = 1  # Train-level retries of one trial
    searcher_seed: int = 0
    points: list[dict[str, Any]] = field(default_factory=list)  # search mode: tried first
    optuna_storage: str | None = None  # Optuna storage URL; None: <study>/optuna.db (optuna_store)
    replicates: int = 0  # fresh seeds per level in the replication phase; 0 = no such phase

    def validate(self) -> StudySpec:
        # A fixed parameter is not searched (``--set lr=1e-3`` pins it).
        self.space = {k: p for k, p in self.space.items() if k not in self.fixed}
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"study name {self.name!r} must be a plain folder name")
        if self.ablate:
            if len(self.levels) < 2:
                raise ConfigError(f"ablating {self.ablate!r} needs at least 2 levels to compare, "
                                  f"got {self.levels}; name two or more")
            if self.ablate in self.space:
                raise ConfigError(f"{self.ablate!r} is ablated; remove it from the search space")
            if self.trials_per_level < 1:
                raise ConfigError("trials_per_level must be >= 1")
        elif self.num_trials < 1:
            raise ConfigError("num_trials must be >= 1")
        if not self.seeds:
            raise ConfigError("a study needs at least one seed")
        if self.replicates < 0:
            raise ConfigError(f"replicates must be >= 0 (0: no replication phase), got "
                              f"{self.replicates}")
        if self.num_workers < 1:
            raise ConfigError(f"workers per trial must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError(f"cpus/gpus per worker must be >= 0, got {self.cpus_per_worker} "
                              f"and {self.gpus_per_worker}")
        if self.max_concurrent < 0 or self.max_failures < 0:
            raise ConfigError(f"max_concurrent and max_failures must be >= 0, got "
                              f"{self.max_concurrent} and {self.max_failures}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be min or max, got {self.mode!r}")
        for point in self.points:
            try:
                self.trial_config({**point})
            except ConfigError as e:
                raise ConfigError(f"study {self.name!r}, point {point}: {e}") from None
        # Fail before any compute: every level x every choice must build a valid config.
        for level in self.levels or [None]:
            try:
                self.trial_config(self.first_params(level))
            except ConfigError as e:
                raise ConfigError(f"study {self.name!r}: {e}") from None
        return self

    def first_params(self, level: Any = None) -> dict[str, Any]:
        """The fixed params, ``level`` of the ablated axis and every searched param's first
        value whose condition holds (a conditional param of another level stays out)."""
        return DefineByRun(self.space, self.constants(level)).resolve(_FirstValues())

    def constants(self, level: Any = None) -> dict[str, Any]:
        """What every trial of ``level`` shares: the fixed params and the level itself."""
        return {**self.fixed, **({self.ablate: level} if self.ablate else {})}

    @property
    def total_trials(self) -> int:
        return len(self.levels) * self.trials_per_level if self.ablate else self.num_trials

    def trial_config(self, params: Mapping[str, Any]) -> RunConfig:
        """The validated RunConfig of a trial with these (searched + fixed) params."""
        merged = {**self.fixed, **{k: v for k, v in params.items() if v is not None}}
        return apply_params(preset(self.base), merged).validate()


STUDIES: Registry[Callable[..., StudySpec]] = Registry("study", "studies")


# --- Optuna define-by-run ------------------------------------------------------------------

class DefineByRun:
    """An Optuna define-by-run space: a conditional param is only suggested when its
    condition holds (e.g. ``sigma_min`` only when ``noise == geometric``). Returns the
    ``constants`` (e.g. the ablated level), which Tune merges into the trial's config.
    A plain class, so the searcher state pickles for ``Tuner.restore``."""

    def __init__(self, space: Mapping[str, Param], constants: Mapping[str, Any]) -> None:
        self.space, self.constants = dict(space), dict(constants)

    def __call__(self, trial: Any) -> dict[str, Any]:
        self.resolve(trial)
        return dict(self.constants)

    def resolve(self, trial: Any) -> dict[str, Any]:
        """The constants plus every param whose condition holds, suggested by ``trial``."""
        values: dict[str, Any] = dict(self.constants)
        skipped: set[str] = set()  # conditional params whose condition did not hold
        pending = dict(self.space)
        while pending:  # conditions may refer to other searched params: resolve in order
            progressed = False
            for name, p in list(pending.items()):
                cond = p.when or {}
                if all(k in values or k in skipped for k in cond):
                    if all(k in values and values[k] == v for k, v in cond.items()):
                        values[name] = p.suggest(trial, name)
                    else:
                        skipped.add(name)  # and so are the params conditioned on it
                    pending.pop(name)
                    progressed = True
            if not progressed:
                raise ConfigError(f"conditions of {sorted(pending)} refer to unknown parameters")
        return values


class _FirstValues:
    """A stand-in Optuna trial that suggests every param's first value (its low end, or
    its first choice): the configs a study checks before any compute."""

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        return low

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return choices[0]


def make_searcher(spec: StudySpec):
    """Search mode: one seeded OptunaSearch over every axis. Ablation mode: one per level
    behind a round-robin, so each level gets the same number of trials and seeds and its
    own Optuna tuning of the nuisance parameters (:class:`sedd_ray.searcher.LevelSearcher`)."""
    from sedd_ray.searcher import LevelSearcher, optuna_search

    levels = list(spec.levels) if spec.ablate else [None]
    subs = [optuna_search(spec.space, spec.constants(lv),
                          metric=spec.metric, mode=spec.mode, seed=spec.searcher_seed,
                          points=() if spec.ablate else spec.points)
            for lv in levels]
    return LevelSearcher(subs, levels, seeds=spec.seeds, metric=spec.metric, mode=spec.mode,
                         per_level=spec.trials_per_level if spec.ablate else spec.num_trials)


# --- the replication phase ------------------------------------------------------------------

def replicate_seeds(spec: StudySpec) -> list[int]:
    """The replication phase's training seeds: the ``replicates`` integers after the
    largest tuning seed. The same for every level (the comparison pairs levels by seed)
    and never a tuning seed (a replicate is a fresh draw, not a tuning trial re-run)."""
    start = max(spec.seeds) + 1
    return list(range(start, start + spec.replicates))


def tuned_winners(spec: StudySpec, trials: Any) -> list[tuple[Any, dict[str, Any]]]:
    """``(level, row)`` of each level's best finished tuning trial in ``trials`` (the
    DataFrame of :func:`sedd_ray.results.read_trials`); search mode: ``[(None, best)]``.
    Ranked by ``val_nll_final`` (the final evaluation) where a trial has one, else by the
    study's metric (``val_nll``, which equals ``val_nll_final`` on a finished trial that
    has both); ties go to the lower trial id. Raises :class:`ReplicationError` naming
    every level without a finished tuning trial."""
    import numpy as np
    import pandas as pd

    from sedd_ray.results import FINISHED_STATUSES

    score = pd.to_numeric(trials[spec.metric], errors="coerce").astype(float)
    if "val_nll_final" in trials.columns:
        final = pd.to_numeric(trials["val_nll_final"], errors="coerce").astype(float)
        score = final.where(np.isfinite(final), score)
    trials = trials.assign(_score=score)
    if "phase" in trials.columns:  # rows written before the column existed are tuning rows
        trials = trials[trials["phase"].fillna("tune") == "tune"]
    winners, missing = [], []
    for level in spec.levels if spec.ablate else [None]:
        rows = trials if level is None else trials[trials["level"] == str(level)]
        ok = rows[rows["status"].isin(FINISHED_STATUSES) & np.isfinite(rows["_score"])]
        if ok.empty:
            missing.append(_no_winner(level, rows))
            continue
        best = ok.sort_values(["_score", "trial_id"], ascending=[spec.mode == "min", True])
        winners.append((level, best.iloc[0].drop("_score").to_dict()))
    if missing:
        raise ReplicationError(
            f"study {spec.name!r} cannot replicate: {'; '.join(missing)}. Replication re-runs "
            "each level's best finished tuning trial, so every level needs one: fix the cause "
            "and run the study again with --resume (errored trials are retried)")
    return winners


def _no_winner(level: Any, rows: Any) -> str:
    """Why ``level`` (None: the search) has no finished tuning trial, in a few words."""
    what = "the search" if level is None else f"level {str(level)!r}"
    if rows.empty:
        return f"{what} has no tuning trial yet"
    counts = rows["status"].value_counts()
    seen = ", ".join(f"{n} {s}" for s, n in counts.items())
    errors = [e for e in rows.get("error", []) if isinstance(e, str) and e]
    return (f"{what} has no finished tuning trial ({seen}"
            + (f"; e.g. {errors[0]}" if errors else "") + ")")


def tuned_params(spec: StudySpec, level: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    """The params that rebuild the tuning trial of ``row`` (a trials.parquet row): the
    level and every searched parameter's column value (a conditional one that was not
    suggested is null there and stays out). ``spec.trial_config`` adds the fixed ones."""
    import math

    from sedd_ray.config import short_names
    from sedd_ray.results import config_columns

    columns, names = config_columns(), short_names()
    params: dict[str, Any] = dict(spec.constants(level))
    for name in spec.space:
        flat = "model.name" if name == "model" else names.get(name, name)
        value = row.get(columns.get(flat, name))
        if hasattr(value, "item"):  # a numpy scalar from pandas: a plain Python value
            value = value.item()
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            params[name] = value
    return {k: v for k, v in params.items() if k not in spec.fixed}


def replicate_configs(spec: StudySpec, storage: str) -> list[dict[str, Any]]:
    """The replication phase's Tune configs, seed by seed (every level's replicate of one
    seed before the next seed's): each level's best tuned params with a fresh seed, its
    ``level`` and ``replicate_of`` (the tuning trial's id). Raises
    :class:`ReplicationError` (nothing written) when a level has no finished tuning trial
    or the study has no results at all."""
    from sedd_ray.results import ResultsError, read_trials

    try:
        trials = read_trials(storage, spec.name)
    except (ResultsError, FileNotFoundError):
        raise ReplicationError(
            f"study {spec.name!r} has no tuning results under {storage}: replication re-runs "
            "each level's best finished tuning trial; run the tuning phase first (without "
            "--phase, or --phase tune)") from None
    winners = tuned_winners(spec, trials)
    return [{**tuned_params(spec, level, row), "seed": seed,
             **({} if level is None else {"level": str(level)}), "replicate_of": row["trial_id"]}
            for seed in replicate_seeds(spec) for level, row in winners]


# --- the per-trial driver ------------------------------------------------------------------

def _trial_driver(config: dict[str, Any], spec: dict[str, Any], storage: str) -> None:
    """Tune function trainable: build the trial's config and run it with Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sedd_ray.launch import launch

    spec = StudySpec(**{**spec, "space": {}})
    cfg = spec.trial_config(trial_params(config))  # ConfigError -> the trial errors with the message
    trial_id = ray.tune.get_context().get_trial_id()
    # The workers' reports reach Tune through TuneReportCallback, the final one with the
    # final checkpoint's path ("checkpoint_path"); nothing more to report here.
    launch(
        cfg, name=trial_id, storage=StudyLayout(storage, spec.name).train_dir,
        num_workers=spec.num_workers, gpus_per_worker=spec.gpus_per_worker,
        cpus_per_worker=spec.cpus_per_worker, max_failures=spec.max_failures,
        callbacks=[TuneReportCallback()], group=spec.name,
        check_resources=False,  # run_study checked the whole study before it started
    )


# --- results callback ----------------------------------------------------------------------

def _results_callback(spec: StudySpec, storage: str):
    """The Tune callback that writes the study's Parquet (:mod:`sedd_ray.parquet_callback`)."""
    from sedd_ray.parquet_callback import ParquetCallback

    return ParquetCallback(spec, storage)


# --- running a study -----------------------------------------------------------------------

def driver_resources() -> dict[str, float]:
    """What one trial driver asks for: a sliver of the head's ``sedd_driver`` resource,
    or, on a cluster that lacks it, a little memory - never a CPU or GPU that a Train
    worker needs (Tune refuses an empty request)."""
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        return {"CPU": 0, DRIVER_RESOURCE: 0.001}
    return {"CPU": 0, "memory": 32 * 2**20}


def max_concurrent_trials(spec: StudySpec) -> int:
    """Concurrent trials the cluster can hold: its GPUs (or CPUs) over one trial's share."""
    import ray

    if spec.max_concurrent:
        return spec.max_concurrent
    res = ray.cluster_resources()
    if spec.gpus_per_worker > 0:
        per_trial, have = spec.num_workers * spec.gpus_per_worker, res.get("GPU", 0)
    else:
        per_trial, have = spec.num_workers * spec.cpus_per_worker, res.get("CPU", 0)
    return max(1, int(have // per_trial))


def run_study(spec: StudySpec, storage: str, *, resume: bool = False, phase: str = "all",
              address: str | None = None, verbose: int = 1,
              resource_timeout: float = DEFAULT_RESOURCE_TIMEOUT_S) -> str:
    """Run (or restore and finish) the study's phases; returns the study directory.

    ``phase``: ``"all"`` (tuning, then replication when ``spec.replicates``), ``"tune"`` or
    ``"replicate"`` (only that phase). A phase whose Tune experiment exists is restored,
    with or without ``resume``, so nothing runs twice. A study the cluster can never hold
    raises :class:`~sedd_ray.preflight.ResourceError`, and replication asked of a study
    without a finished tuning trial per level :class:`ReplicationError`, before anything
    is written; on an autoscaling cluster the first trial's resources are waited for, for
    at most ``resource_timeout`` seconds."""
    from ray import tune

    from sedd_ray import optuna_store
    from sedd_ray.checkpoint import ensure_writable_dir, precheck_writable_dir
    from sedd_ray.launch import connect

    spec.validate()
    phases = study_phases(spec, phase)
    storage = normalize(storage)
    layout = StudyLayout(storage, spec.name)
    if phases == ("replicate",) and not tune.Tuner.can_restore(layout.replicate_dir):
        replicate_configs(spec, storage)  # no tuned config for a level: fails writing nothing
    if is_local(storage):  # an impossible storage path fails now, creating nothing
        precheck_writable_dir(storage, "--storage")
    optuna_url = optuna_store.prepare(spec, storage)  # an unreachable URL fails before Ray
    _precheck_data(spec)  # a missing, empty or too short corpus fails before Ray starts
    # A new local cluster gets the driver resource too (cluster.yaml declares it on the head).
    connect(address, resources={DRIVER_RESOURCE: 1000})
    preflight.check(study_ask(spec), timeout_s=resource_timeout)  # before anything is written
    if is_local(storage):  # read-only or full disk: fails here, before any trial
        ensure_writable_dir(storage, "--storage")
    # Train reports val_nll only at evaluation steps; ASHA and Optuna skip results without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our trimmed CLIReporter table
    spec_dict = {k: v for k, v in asdict(spec).items() if k != "space"}
    driver = tune.with_resources(
        tune.with_parameters(_trial_driver, spec=spec_dict, storage=storage), driver_resources()
    )
    print(f"study {spec.name!r}: results in {layout.dir}", flush=True)
    optuna_store.activate(spec, storage, optuna_url)  # Optuna's storage re-synced from Parquet
    # Once replication has started the tuning phase is final (its winners are chosen).
    if "tune" in phases and not tune.Tuner.can_restore(layout.replicate_dir):
        _tuning_tuner(spec, storage, driver, resume, verbose).fit()
    if "replicate" in phases:
        _replication_tuner(spec, storage, driver, resume, verbose).fit()
    return layout.dir


def study_phases(spec: StudySpec, phase: str = "all") -> tuple[str, ...]:
    """The phases a run of ``spec`` with ``--phase phase`` goes through, in order."""
    if phase not in ("all", *PHASES):
        raise ConfigError(f"unknown phase {phase!r}; valid phases: all, {', '.join(PHASES)}")
    if phase == "replicate" and not spec.replicates:
        raise ConfigError("--phase replicate needs --replicates K (fresh seeds per level), "
                          "e.g. --replicates 3")
    if phase == "all":
        return PHASES if spec.replicates else PHASES[:1]
    return (phase,)


def _restore(path: str, driver: Any, what: str, resume: bool) -> Any:
    """The Tune experiment at ``path``, restored: unfinished and errored trials go on."""
    from ray import tune

    if not resume:
        print(f"{what} already started at {path}: resuming it (pass --name for a new study)",
              flush=True)
    return tune.Tuner.restore(path, trainable=driver, resume_unfinished=True,
                              resume_errored=True)


def _tuning_tuner(spec: StudySpec, storage: str, driver: Any, resume: bool, verbose: int):
    from ray import tune

    tune_dir = StudyLayout(storage, spec.name).tune_dir
    if tune.Tuner.can_restore(tune_dir):
        return _restore(tune_dir, driver, f"the tuning phase of study {spec.name!r}", resume)
    if resume:
        print(f"nothing to resume at {tune_dir}; starting the study", flush=True)
    return _new_tuner(spec, storage, driver, verbose)


def _replication_tuner(spec: StudySpec, storage: str, driver: Any, resume: bool, verbose: int):
    """The replication phase's Tuner: restored when it has started (its configs fixed
    then), else new, from the tuning phase's winners in Parquet."""
    from ray import tune

    from sedd_ray.searcher import ListSearcher

    rep_dir = StudyLayout(storage, spec.name).replicate_dir
    if tune.Tuner.can_restore(rep_dir):
        return _restore(rep_dir, driver, f"the replication phase of study {spec.name!r}",
                        resume)
    try:
        configs = replicate_configs(spec, storage)
    except ReplicationError as e:  # the study's own tuning trials failed: compute ran
        raise ReplicationError(str(e), exit_code=1) from None
    originals = {c.get("level", "top config"): c["replicate_of"] for c in configs}
    print(f"study {spec.name!r}: replicating the best tuning trial of each level ("
          + ", ".join(f"{lv}: {t}" for lv, t in originals.items())
          + f") with seeds {replicate_seeds(spec)}: {len(configs)} trials", flush=True)
    searcher = ListSearcher(configs, metric=spec.metric, mode=spec.mode)
    return _tuner(spec, storage, driver, verbose, StudyLayout.REPLICATE_NAME, searcher,
                  len(configs), scheduler=None)


def study_ask(spec: StudySpec) -> preflight.Ask:
    """What the study asks of the cluster: its concurrent trials (``max_concurrent``, or
    one when derived from the cluster), each with its workers and its driver."""
    per_worker = {"CPU": spec.cpus_per_worker, "GPU": spec.gpus_per_worker}
    return preflight.Ask(spec.num_workers, per_worker, trials=spec.max_concurrent or 1,
                         driver=driver_resources(), flags=preflight.STUDY_FLAGS)


def _precheck_data(spec: StudySpec) -> None:
    """Load (building the shared cache) the data of each level's first trial config, so a
    bad corpus is one DataError line before any folder, Ray or trial; the trial drivers
    then hit the cache."""
    from sedd_ray.data import announce, load_data

    seen = []
    for level in spec.levels or [None]:
        cfg = spec.trial_config({**spec.first_params(level), "seed": spec.seeds[0]})
        if cfg.data not in seen:  # the split is data.split_seed's, never train.seed's
            seen.append(cfg.data)
            bundle = load_data(cfg.data)  # a store corpus: built here, once
            print(announce(cfg, bundle.meta["n_tokens"]["train"], bundle.vocab_size), flush=True)


def _new_tuner(spec: StudySpec, storage: str, driver, verbose: int):
    """The tuning phase's Tuner: the study's searcher, ASHA when asked."""
    from ray.tune.schedulers import ASHAScheduler

    base = preset(spec.base)
    steps = int(spec.fixed.get("steps", base.train.steps))
    scheduler = None
    if spec.asha:
        scheduler = ASHAScheduler(
            time_attr="step", max_t=steps, grace_period=spec.grace_period or max(1, steps // 4),
            reduction_factor=spec.reduction_factor, stop_last_trials=False,
        )
    return _tuner(spec, storage, driver, verbose, StudyLayout.TUNE_NAME, make_searcher(spec),
                  spec.total_trials, scheduler)


def _tuner(spec: StudySpec, storage: str, driver, verbose: int, name: str, searcher: Any,
           num_samples: int, scheduler: Any):
    """A Tune experiment ``<study>/<name>`` of the study's trials, writing its Parquet."""
    from ray import tune

    reporter = tune.CLIReporter(
        metric_columns=["step", "train_loss", "val_nll", "val_ppl_bound"],
        # Only keys every trial's config has: the reporter's best-trial line raises a
        # KeyError on a missing one (e.g. "model" in a graph ablation, a conditional param).
        parameter_columns=[c for c in dict.fromkeys(
            ["level" if spec.ablate else None, spec.ablate,
             *(k for k, p in spec.space.items() if p.when is None), "seed"]) if c],
        max_report_frequency=30,
    )
    return tune.Tuner(
        driver,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials(spec), metric=spec.metric, mode=spec.mode,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=StudyLayout(storage, spec.name).dir,
            callbacks=[_results_callback(spec, storage)], progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=0), verbose=verbose,
        ),
    )


# --- named studies and the CLI ---------------------------------------------------------------

_LR = Float(3e-4, 3e-3, log=True)
_WARMUP = Int(10, 100)
_SIGMA_MIN = Float(1e-5, 1e-3, log=True, when={"noise": "geometric"})


@STUDIES.register("graph-ablation")
def graph_ablation(**kw: Any) -> StudySpec:
    """Uniform vs absorbing; noise schedule, lr and warm-up tuned within each graph."""
    kw.setdefault("name", "graph-ablation")  # --name renames it
    kw.setdefault("replicates", DEFAULT_REPLICATES)
    from sedd_ray.diffusion import GRAPHS, NOISES  # registries, not lists (imports torch)

    return StudySpec(ablate="graph", levels=GRAPHS.names(),
                     space={"lr": _LR, "warmup_steps": _WARMUP, "noise": Choice(NOISES.names()),
                            "sigma_min": _SIGMA_MIN}, **kw)


@STUDIES.register("noise-ablation")
def noise_ablation(graph: str = "absorb", **kw: Any) -> StudySpec:
    """Geometric vs loglinear for one graph; lr and warm-up tuned within each schedule."""
    kw.setdefault("name", f"noise-ablation-{graph}")
    kw.setdefault("replicates", DEFAULT_REPLICATES)
    kw["fixed"] = {"graph": graph, **kw.get("fixed", {})}
    from sedd_ray.diffusion import NOISES  # registries, not lists (imports torch)

    return StudySpec(ablate="noise", levels=NOISES.names(),
                     space={"lr": _LR, "warmup_steps": _WARMUP,
                            "sigma_min": _SIGMA_MIN}, **kw)


@STUDIES.register("model-size")
def model_size_sweep(sizes: Sequence[str] = ("tiny", "mini", "base"), **kw: Any) -> StudySpec:
    """A size sweep (each size its own lr); the bound against parameters and compute."""
    kw.setdefault("name", "model-size")
    kw.setdefault("replicates", DEFAULT_REPLICATES)
    return StudySpec(ablate="model", levels=list(sizes),
                     space={"lr": _LR}, **kw)


@STUDIES.register("ar-reference")
def ar_reference(of: str = "graph-ablation", trials_per_level: int = 2, **kw: Any) -> StudySpec:
    """The autoregressive reference of the ablation ``of``: the same backbone with causal
    attention and next-token loss (``model.kind=ar``), on the same data, budget and seeds.
    Its lr and warm-up are tuned with as many trials as one level of ``of`` gets, then the
    best is replicated with the same fresh seeds as ``of``'s levels, so the report of
    ``of`` can pair each level with it by seed and block (the diffusion-to-AR gap)."""
    from sedd_ray.layout import ar_reference_study

    kw.setdefault("name", ar_reference_study(of))
    kw.setdefault("replicates", DEFAULT_REPLICATES)
    kw["fixed"] = {**kw.get("fixed", {}), "kind": "ar"}
    kw["num_trials"] = trials_per_level
    return StudySpec(space={"lr": _LR, "warmup_steps": _WARMUP}, **kw)


@STUDIES.register("search")
def joint_search(**kw: Any) -> StudySpec:
    """Optuna over every axis together (``replicates=k``: then its top config with k seeds)."""
    kw.setdefault("name", "search")
    from sedd_ray.diffusion import GRAPHS, NOISES  # registries, not lists (imports torch)

    return StudySpec(space={
        "graph": Choice(GRAPHS.names()), "noise": Choice(NOISES.names()), "sigma_min": _SIGMA_MIN,
        "lr": _LR, "warmup_steps": _WARMUP, "batch_size": Choice([8, 16, 32]),
    }, **kw)


# The smoke preset's training length for --smoke-test; seconds per trial on CPU.
SMOKE_FIXED = {"steps": 20, "eval_every": 10, "ckpt_every": 10, "log_every": 5}


def add_study_flags(p: Any, default_trials: int = 2) -> None:
    """Flags every study script shares (experiments/*.py and ``python -m sedd_ray.study``)."""
    p.add_argument("--preset", default=None, help="base preset of every trial (default: the study's)")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial")
    p.add_argument("--trials-per-level", type=int, default=None,
                   help=f"ablation: trials per level (default {default_trials}; 1 with --smoke-test)")
    p.add_argument("--num-trials", type=int, default=None,
                   help="search mode: number of trials (default 4; 2 with --smoke-test)")
    p.set_defaults(default_trials=default_trials)
    p.add_argument("--seeds", default="0", help="comma-separated seeds, reused by every level")
    p.add_argument("--storage", default="results", help="results folder or URI (s3://...)")
    p.add_argument("--name", default=None, help="study name (default: the study's)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, host:port, ray://...); default: "
                   "$RAY_ADDRESS if set, else a new local cluster")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per Train worker")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-concurrent", type=int, default=0, help="0 = from the cluster's resources")
    p.add_argument("--resource-timeout", type=float, default=DEFAULT_RESOURCE_TIMEOUT_S,
                   help="seconds to wait for an autoscaling cluster to provide a trial's "
                   f"workers (default {DEFAULT_RESOURCE_TIMEOUT_S:.0f})")
    p.add_argument("--asha", action="store_true", help="early-stop weak trials with ASHA")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted study: whichever phase is unfinished")
    p.add_argument("--replicates", type=int, default=None, metavar="K",
                   help="replication phase: re-run each level's best tuned config with K fresh "
                   f"seeds (default {DEFAULT_REPLICATES} for an ablation, {SMOKE_REPLICATES} with "
                   "--smoke-test; search mode: its top config, only when given)")
    p.add_argument("--phase", choices=("all", *PHASES), default="all",
                   help="run only this phase (default: tuning, then replication)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a parameter for every trial, e.g. --set batch_size=32")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"seconds per trial, 1 trial per level, {SMOKE_REPLICATES} replicates")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="Optuna storage of the study's Optuna studies: a database URL "
                   "(postgresql://...), an SQLite file path, or none (default: "
                   "<storage>/<study>/optuna.db; remote --storage: a local cache file)")


def spec_from_args(study: str, args: Any, **study_kw: Any) -> StudySpec:
    """Build and validate the named study from :func:`add_study_flags` arguments."""
    fixed: dict[str, Any] = set_pairs(args.set)
    # ``is None``, not ``or``: an explicit 0 is an error for validate(), never the default.
    kw: dict[str, Any] = dict(
        trials_per_level=args.trials_per_level if args.trials_per_level is not None
        else (1 if args.smoke_test else getattr(args, "default_trials", 2)),
        num_trials=args.num_trials if args.num_trials is not None
        else (2 if args.smoke_test else 4),
        seeds=int_list(args.seeds, "--seeds"),
        num_workers=args.workers_per_trial, gpus_per_worker=args.gpus_per_trial,
        cpus_per_worker=args.cpus_per_worker, max_concurrent=args.max_concurrent,
        asha=args.asha, **study_kw,
    )
    if args.preset:
        preset(args.preset)  # an unknown name fails even where --smoke-test replaces it
        kw["base"] = args.preset
    if args.smoke_test:
        kw["base"] = "smoke"
        fixed = {**SMOKE_FIXED, "progress": False, **fixed}
    else:
        fixed.setdefault("progress", False)  # Tune's table is the progress display
    if args.steps is not None:
        fixed["steps"] = args.steps
    if args.name and "name" not in study_kw:
        kw["name"] = args.name
    kw["optuna_storage"] = getattr(args, "optuna_storage", None)
    if getattr(args, "replicates", None) is not None:
        if args.replicates < 1:
            raise ConfigError(f"--replicates must be >= 1, got {args.replicates}: the fresh seeds "
                              "each level's best tuned config is re-run with (--phase tune skips "
                              "replication)")
        kw["replicates"] = args.replicates
    kw["fixed"] = fixed
    spec = STUDIES.get(study)(**kw)
    if args.smoke_test and "replicates" not in kw:
        spec.replicates = min(spec.replicates, SMOKE_REPLICATES)
    return spec.validate()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from sedd_ray.checkpoint import StorageError

    p = argparse.ArgumentParser(prog="python -m sedd_ray.study",
                                description="Run a named study: " + ", ".join(STUDIES))
    p.add_argument("study", help=f"one of: {', '.join(STUDIES)}")
    add_study_flags(p)
    args = p.parse_args(argv)
    try:
        spec = spec_from_args(args.study, args)
        study_dir = run_study(spec, args.storage, resume=args.resume, phase=args.phase,
                              address=args.address, resource_timeout=args.resource_timeout)
    except ReplicationError as e:  # 2: nothing ran; 1: a level's tuning trials all failed
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, ValueError, StorageError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"study directory: {study_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
