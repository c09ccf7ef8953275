"""The Ray Tune searcher of a study: one seeded Optuna search per level, taken in turn.

    subs = [optuna_search(space, {"graph": g}, metric="val_nll", mode="min", seed=0)
            for g in ("uniform", "absorb")]
    searcher = LevelSearcher(subs, ["uniform", "absorb"], per_level=2, seeds=[0, 1],
                             metric="val_nll", mode="min")
    tune.Tuner(driver, tune_config=tune.TuneConfig(search_alg=searcher, ...))

:func:`sedd_ray.study.make_searcher` builds one from a :class:`~sedd_ray.study.StudySpec`
(search mode is the same searcher with the single level ``None``). Tune drives it through
the ``Searcher`` protocol, on the study's driver process:

* ``set_search_properties(metric, mode, config)`` once, before the first trial;
* ``suggest(trial_id)``: a trial's params, ``None`` (ask again later) or
  ``Searcher.FINISHED`` (the budget is spent);
* ``on_trial_result`` for every report and ``on_trial_complete`` once per trial;
* ``save(path)`` / ``restore(path)``: Tune checkpoints the searcher with the experiment
  and restores it on ``Tuner.restore`` (``--resume``), so a resumed study keeps its
  per-level counts and Optuna studies.

The replication phase of a study (nothing searched: each level's best tuned config with
fresh seeds) runs its fixed list of configs through :class:`ListSearcher`, so Tune
checkpoints and restores its position the same way.

Unlike :mod:`sedd_ray.study`, this module imports Ray and Optuna when it is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray import cloudpickle
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sedd_ray.study import DefineByRun, Param


def optuna_search(space: Mapping[str, Param], constants: Mapping[str, Any], *, metric: str,
                  mode: str, seed: int, points: Sequence[Mapping[str, Any]] = ()) -> OptunaSearch:
    """A seeded TPE search over the define-by-run ``space`` (conditional params suggested
    only when their condition holds); ``constants`` (the fixed params and the level) are
    merged into every suggestion; ``points`` are tried first, in order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(space=DefineByRun(space, constants), metric=metric, mode=mode,
                        sampler=optuna.samplers.TPESampler(seed=seed),
                        points_to_evaluate=[dict(p) for p in points] or None)


def _learnable(result: Mapping[str, Any] | None, metric: str) -> bool:
    """Whether ``result`` carries a finite value of ``metric`` (a NaN loss does not)."""
    try:
        return result is not None and math.isfinite(float(result.get(metric)))
    except (TypeError, ValueError):
        return False


class LevelSearcher(Searcher):
    """Round-robin over levels, each with its own sub-searcher (its own Optuna study).

    Every level gets ``per_level`` trials, suggested in turn (the level with the fewest
    trials so far next), and a level's k-th trial runs with ``seeds[k % len(seeds)]``:
    every level gets the same budget and the same seed sequence. Each suggestion carries
    ``seed`` and, unless the level is ``None`` (search mode), ``level`` (its ``str``).

    A trial's results reach only the sub-searcher that suggested it. A completed trial
    without a finite metric (its loss turned NaN) is told to it as an error, so Optuna
    never learns from it.
    """

    def __init__(self, subs: Sequence[Searcher], levels: Sequence[Any], *, per_level: int,
                 seeds: Sequence[int], metric: str, mode: str) -> None:
        if len(subs) != len(levels) or not levels:
            raise ValueError(f"one sub-searcher per level: got {len(subs)} for {len(levels)} levels")
        if per_level < 1 or not seeds:
            raise ValueError(f"per_level must be >= 1 and seeds non-empty, got {per_level}, {seeds}")
        super().__init__(metric=metric, mode=mode)
        self.subs, self.levels = list(subs), list(levels)
        self.per_level, self.seeds = per_level, list(seeds)
        self.counts = [0] * len(self.levels)  # trials suggested per level
        self.owner: dict[str, int] = {}  # running trial id -> its level's index

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        for sub in self.subs:
            sub.set_search_properties(metric, mode, config, **spec)
        return True  # the space is defined by run; Tune's config adds nothing to search

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if min(self.counts) >= self.per_level:
            return Searcher.FINISHED
        i = self.counts.index(min(self.counts))
        params = self.subs[i].suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        k = self.counts[i]
        self.counts[i] += 1
        self.owner[trial_id] = i
        params = {**params, "seed": self.seeds[k % len(self.seeds)]}
        if self.levels[i] is not None:
            params["level"] = str(self.levels[i])
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna records intermediate values by step; only evaluations carry the metric.
        if trial_id in self.owner and _learnable(result, self.metric):
            self.subs[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        if result is not None and not _learnable(result, self.metric):
            result, error = None, True  # Optuna must not learn from a NaN
        self.subs[self.owner.pop(trial_id)].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        state = {"counts": self.counts, "owner": self.owner, "subs": self.subs}
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = cloudpickle.load(f)
        self.counts, self.owner, self.subs = state["counts"], state["owner"], state["subs"]


class ListSearcher(Searcher):
    """The replication phase's searcher: suggests ``configs`` in order, each exactly once,
    then ``FINISHED``. Nothing is searched, so results teach it nothing; its position is
    saved with the experiment, so a restored phase (``--resume``) suggests neither a
    config twice nor one never."""

    def __init__(self, configs: Sequence[Mapping[str, Any]], *, metric: str, mode: str) -> None:
        if not configs:
            raise ValueError("ListSearcher needs at least one config")
        super().__init__(metric=metric, mode=mode)
        self.configs = [dict(c) for c in configs]
        self.next = 0  # index of the next config to suggest

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every config is given; Tune's param_space adds nothing

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return dict(self.configs[self.next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # nothing to learn: the configs are fixed

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump({"configs": self.configs, "next": self.next}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = cloudpickle.load(f)
        self.configs, self.next = state["configs"], state["next"]
