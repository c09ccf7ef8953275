"""The study's searcher without a Ray cluster: Tune's ``Searcher`` calls, made by hand.

Tune calls ``set_search_properties`` once, ``suggest`` until it returns ``FINISHED``,
``on_trial_result`` per report, ``on_trial_complete`` once per trial, and
``save_to_dir``/``restore_from_dir`` to checkpoint the searcher with the experiment
(``Tuner.restore``). These tests make the same calls on the searcher that
:func:`sedd_ray.study.make_searcher` builds, and on :class:`LevelSearcher` with stub
sub-searchers.
"""

from __future__ import annotations

import math
import pickle

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from sedd_ray.config import ConfigError
from sedd_ray.searcher import LevelSearcher, ListSearcher
from sedd_ray.study import (
    Choice,
    DefineByRun,
    Float,
    Int,
    StudySpec,
    graph_ablation,
    joint_search,
    make_searcher,
    model_size_sweep,
    noise_ablation,
)

METRIC = "val_nll"


def _ready(searcher: Searcher) -> Searcher:
    assert searcher.set_search_properties(METRIC, "min", {}) is True  # as Tune does first
    return searcher


def _drain(searcher: Searcher, prefix: str = "t") -> dict[str, dict]:
    """Suggest until FINISHED, as Tune does: {trial_id: params}, in order."""
    trials = {}
    for i in range(200):
        params = searcher.suggest(f"{prefix}{i}")
        if params == Searcher.FINISHED:
            return trials
        assert isinstance(params, dict), params
        trials[f"{prefix}{i}"] = params
    raise AssertionError("the searcher never finished")


def _result(value: float, step: int = 10) -> dict:
    return {METRIC: value, "step": step, "training_iteration": step // 10}


def _study(searcher: LevelSearcher, level: int) -> optuna.Study:
    return searcher.subs[level]._ot_study  # the OptunaSearch's own study


class _Stub(Searcher):
    """A sub-searcher suggesting {"x": 0}, {"x": 1}, ... after ``pending`` Nones (nothing
    to suggest yet); records what it is told."""

    def __init__(self, pending: int = 0) -> None:
        super().__init__(metric=METRIC, mode="min")
        self.n, self.pending = 0, pending
        self.props, self.results, self.completed = [], [], []

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self.props.append((metric, mode, config))
        return False

    def suggest(self, trial_id):
        if self.pending:
            self.pending -= 1
            return None
        self.n += 1
        return {"x": self.n - 1}

    def on_trial_result(self, trial_id, result):
        self.results.append((trial_id, result))

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, result, error))


def _stubbed(levels=("a", "b"), per_level=2, seeds=(0,), pending=(0, 0)) -> LevelSearcher:
    subs = [_Stub(p) for p in pending[: len(levels)]]
    return _ready(LevelSearcher(subs, list(levels), per_level=per_level, seeds=list(seeds),
                                metric=METRIC, mode="min"))


# --- level balance and seeds -------------------------------------------------------------------


def test_every_level_gets_the_same_budget_in_turn_and_the_same_seeds():
    spec = graph_ablation(trials_per_level=3, seeds=[0, 1]).validate()
    trials = _drain(_ready(make_searcher(spec)))
    assert len(trials) == spec.total_trials == 6
    assert [p["level"] for p in trials.values()] == ["absorb", "uniform"] * 3  # round-robin
    assert all(p["graph"] == p["level"] for p in trials.values())  # the level is the config
    seeds = {lv: [p["seed"] for p in trials.values() if p["level"] == lv]
             for lv in ("uniform", "absorb")}
    assert seeds == {"uniform": [0, 1, 0], "absorb": [0, 1, 0]}


def test_seeds_rotate_per_level():
    searcher = _stubbed(levels=("a", "b", "c"), per_level=5, seeds=(3, 5, 7), pending=(0, 0, 0))
    trials = _drain(searcher)
    for level in "abc":
        assert [p["seed"] for p in trials.values() if p["level"] == level] == [3, 5, 7, 3, 5]
    assert searcher.counts == [5, 5, 5]
    assert [s.n for s in searcher.subs] == [5, 5, 5]  # each sub asked exactly its budget


def test_a_level_with_nothing_to_suggest_yet_is_asked_again_and_balance_holds():
    searcher = _stubbed(pending=(0, 2))  # level b's sub answers None twice
    got = [searcher.suggest(f"t{i}") for i in range(4)]
    assert got[0]["level"] == "a"
    assert got[1] is None and got[2] is None  # Tune asks again later
    assert got[3]["level"] == "b"  # b is still the level behind, not a again
    assert searcher.counts == [1, 1] and set(searcher.owner) == {"t0", "t3"}
    rest = _drain(searcher, "r")
    assert [p["level"] for p in rest.values()] == ["a", "b"]
    assert searcher.counts == [2, 2]


def test_search_mode_is_one_level_with_points_first_and_no_level_key():
    point = {"graph": "absorb", "noise": "loglinear", "lr": 1e-3, "warmup_steps": 20,
             "batch_size": 16}
    spec = joint_search(num_trials=5, seeds=[0, 1], points=[point]).validate()
    searcher = _ready(make_searcher(spec))
    assert len(searcher.subs) == 1
    trials = list(_drain(searcher).values())
    assert len(trials) == 5 and all("level" not in p for p in trials)
    assert [p["seed"] for p in trials] == [0, 1, 0, 1, 0]
    assert point.items() <= trials[0].items() and "sigma_min" not in trials[0]


def test_levels_need_one_sub_searcher_each():
    with pytest.raises(ValueError, match="one sub-searcher per level"):
        LevelSearcher([_Stub()], ["a", "b"], per_level=1, seeds=[0], metric=METRIC, mode="min")
    with pytest.raises(ValueError, match="per_level"):
        LevelSearcher([_Stub()], ["a"], per_level=0, seeds=[0], metric=METRIC, mode="min")


def test_search_properties_reach_every_level():
    searcher = _stubbed()
    assert [s.props for s in searcher.subs] == [[(METRIC, "min", {})]] * 2


# --- define-by-run conditionals -----------------------------------------------------------------


def test_sigma_min_is_suggested_only_when_noise_is_geometric():
    space = {"sigma_min": Float(1e-5, 1e-3, log=True, when={"noise": "geometric"}),
             "noise": Choice(["geometric", "loglinear"]), "lr": Float(1e-4, 1e-2, log=True)}
    define = DefineByRun(space, {"graph": "absorb"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        assert define(trial) == {"graph": "absorb"}  # constants only; Optuna keeps the rest
        noise = trial.params["noise"]
        seen.add(noise)
        assert ("sigma_min" in trial.params) == (noise == "geometric"), trial.params
        assert "lr" in trial.params
    assert seen == {"geometric", "loglinear"}


def test_conditions_on_a_constant_and_on_a_chain_of_params():
    space = {"c": Int(1, 3, when={"b": 1}), "b": Int(0, 1, when={"a": "on"}),
             "a": Choice(["on", "off"])}
    on = optuna.trial.FixedTrial({"a": "on", "b": 1, "c": 2})
    DefineByRun(space, {})(on)  # every param asked for: FixedTrial raises on a missing one
    assert DefineByRun(space, {})(optuna.trial.FixedTrial({"a": "off"})) == {}  # b, c not asked
    # A condition on a constant (the ablated level, a fixed param) holds or not per level.
    geo = {"sigma_min": Float(1e-5, 1e-3, log=True, when={"noise": "geometric"})}
    with pytest.raises(ValueError, match="sigma_min"):
        DefineByRun(geo, {"noise": "geometric"})(optuna.trial.FixedTrial({}))
    assert DefineByRun(geo, {"noise": "loglinear"})(optuna.trial.FixedTrial({})) == {
        "noise": "loglinear"}


def test_a_condition_on_an_unknown_parameter_is_an_error():
    space = {"sigma_min": Float(1e-5, 1e-3, when={"nosie": "geometric"})}
    with pytest.raises(ConfigError, match="refer to unknown parameters"):
        DefineByRun(space, {})(optuna.trial.FixedTrial({}))


def test_noise_ablation_suggests_sigma_min_for_the_geometric_level_only():
    spec = noise_ablation(trials_per_level=3).validate()
    trials = _drain(_ready(make_searcher(spec))).values()
    assert {p["level"] for p in trials} == {"geometric", "loglinear"}
    for p in trials:
        assert p["noise"] == p["level"] and p["graph"] == "absorb"
        assert ("sigma_min" in p) == (p["level"] == "geometric"), p


def test_space_kinds_and_their_checks():
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert 1e-4 <= Float(1e-4, 1e-2, log=True).suggest(trial, "f") <= 1e-2
    assert Int(2, 4).suggest(trial, "i") in (2, 3, 4)
    assert Choice(["x", "y"]).suggest(trial, "c") in ("x", "y")
    assert trial.distributions["f"].log and isinstance(trial.params["i"], int)
    with pytest.raises(ConfigError, match="low < high"):
        Float(1.0, 1.0)
    with pytest.raises(ConfigError, match="low <= high"):
        Int(3, 2)
    with pytest.raises(ConfigError, match="at least one"):
        Choice([])


# --- one Optuna study per level: results, completions, best values -----------------------------


def test_each_level_tunes_its_own_optuna_study_and_tracks_its_best():
    spec = model_size_sweep(sizes=("tiny", "mini"), trials_per_level=3).validate()
    searcher = _ready(make_searcher(spec))
    trials = _drain(searcher)
    values = {"tiny": [3.0, 2.0, 2.5], "mini": [5.0, 4.5, 4.0]}
    best = {}
    for tid, p in trials.items():
        v = values[p["level"]].pop(0)
        searcher.on_trial_result(tid, _result(v + 1, step=10))
        searcher.on_trial_complete(tid, _result(v, step=20))
        if v < best.get(p["level"], (math.inf,))[0]:
            best[p["level"]] = (v, p)
    assert searcher.owner == {}
    assert _study(searcher, 0) is not _study(searcher, 1)
    for i, level in enumerate(("tiny", "mini")):
        study = _study(searcher, i)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        assert study.best_value == best[level][0]
        assert study.best_params.items() <= best[level][1].items()  # that trial's own lr
        assert all(t.intermediate_values for t in study.trials)


def test_completion_bookkeeping():
    searcher = _stubbed(per_level=3)
    trials = _drain(searcher)  # t0 a, t1 b, t2 a, t3 b, t4 a, t5 b
    a, b = searcher.subs
    searcher.on_trial_result("t0", {METRIC: None, "step": 5})  # a log row: no evaluation
    searcher.on_trial_result("t0", _result(2.0))
    searcher.on_trial_result("t1", _result(float("nan")))
    assert a.results == [("t0", _result(2.0))] and b.results == []
    searcher.on_trial_complete("t0", _result(1.5))
    searcher.on_trial_complete("t1", _result(float("nan")))  # told as an error, no value
    searcher.on_trial_complete("t2", {"step": 5})  # stopped before any evaluation
    searcher.on_trial_complete("t3", None, error=True)
    searcher.on_trial_complete("t0", _result(0.1))  # a second completion: ignored
    searcher.on_trial_complete("unknown", _result(0.1))  # not ours: ignored
    assert a.completed == [("t0", _result(1.5), False), ("t2", None, True)]
    assert b.completed == [("t1", None, True), ("t3", None, True)]
    assert set(searcher.owner) == {"t4", "t5"} and len(trials) == 6


def test_a_nan_trial_is_a_failure_in_the_levels_optuna_study():
    spec = graph_ablation(trials_per_level=1).validate()
    searcher = _ready(make_searcher(spec))
    trials = _drain(searcher)
    nan_id, ok_id = trials
    searcher.on_trial_complete(nan_id, _result(float("nan")))
    searcher.on_trial_complete(ok_id, _result(2.0))
    assert [t.state for t in _study(searcher, 0).trials] == [TrialState.FAIL]
    assert [t.state for t in _study(searcher, 1).trials] == [TrialState.COMPLETE]


# --- resume: save / restore --------------------------------------------------------------------


def test_save_and_restore_continue_exactly_where_the_study_stopped(tmp_path):
    spec = graph_ablation(trials_per_level=3, seeds=[0, 1]).validate()
    first = _ready(make_searcher(spec))
    before = {f"t{i}": first.suggest(f"t{i}") for i in range(3)}  # uniform, absorb, uniform
    first.on_trial_complete("t0", _result(2.0))
    first.save_to_dir(str(tmp_path))  # what Tune writes into the experiment folder
    assert list(tmp_path.glob("searcher-state-*.pkl"))

    resumed = _ready(make_searcher(spec))  # Tuner.restore rebuilds it, then restores
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.counts == first.counts == [2, 1]
    assert resumed.owner == first.owner == {"t1": 1, "t2": 0}
    assert len(_study(resumed, 0).trials) == 2  # t0 told, t2 asked
    # The in-flight trials complete into the restored studies.
    resumed.on_trial_complete("t2", _result(1.0))
    assert _study(resumed, 0).best_value == 1.0
    first.on_trial_complete("t2", _result(1.0))
    # The rest of the budget: the same levels, seeds and params as without the interruption.
    rest_first, rest_resumed = _drain(first, "r"), _drain(resumed, "r")
    assert rest_resumed == rest_first
    assert [p["level"] for p in rest_resumed.values()] == ["uniform", "absorb", "uniform"]
    assert [p["seed"] for p in rest_resumed.values()] == [1, 0, 0]
    levels = [p["level"] for p in [*before.values(), *rest_resumed.values()]]
    assert levels.count("uniform") == levels.count("absorb") == 3


def test_the_searcher_pickles_by_reference():
    """Tune pickles the search algorithm with the tuner; a module-level class needs no
    copy of its code in the pickle."""
    spec = StudySpec(name="x", base="tiny", space={"lr": Float(1e-4, 1e-2, log=True)},
                     num_trials=2)
    searcher = _ready(make_searcher(spec.validate()))
    searcher.suggest("t0")
    blob = pickle.dumps(searcher)
    assert b"sedd_ray.searcher" in blob and b"LevelSearcher" in blob
    copy = pickle.loads(blob)
    assert type(copy) is LevelSearcher and copy.counts == [1] and copy.owner == {"t0": 0}


# --- the replication phase's fixed list --------------------------------------------------------


def test_list_searcher_suggests_each_config_once_in_order_across_a_restore(tmp_path):
    configs = [{"lr": 1e-3, "seed": s, "level": lv, "replicate_of": f"t-{lv}"}
               for s in (2, 3) for lv in ("uniform", "absorb")]
    first = _ready(ListSearcher(configs, metric=METRIC, mode="min"))
    got = [first.suggest("r0"), first.suggest("r1")]
    first.on_trial_complete("r0", _result(2.0))  # nothing to learn; no error
    first.save_to_dir(str(tmp_path))
    resumed = _ready(ListSearcher(configs[:1], metric=METRIC, mode="min"))
    resumed.restore_from_dir(str(tmp_path))  # the saved list and position win
    got += list(_drain(resumed, "r").values())
    assert got == configs  # every config exactly once, in order
    assert resumed.suggest("late") == Searcher.FINISHED
    got[0]["seed"] = 99
    assert configs[0]["seed"] == 2  # suggestions are copies
    with pytest.raises(ValueError, match="at least one config"):
        ListSearcher([], metric=METRIC, mode="min")
