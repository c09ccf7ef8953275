"""Each study's Optuna studies in a persistent Optuna storage, mirrored from its Parquet.

A sedd-ray study keeps one Optuna study per level of its ablated axis (search mode: one),
named like its Ray Tune searchers (:func:`sedd_ray.study.make_searcher`)::

    graph-ablation/graph=uniform   graph-ablation/graph=absorb   search

in an Optuna storage that ``optuna.load_study``, ``optuna-dashboard`` and Optuna's
visualisation and importance functions read::

    optuna-dashboard sqlite:///results/graph-ablation/optuna.db

**Where.** By default ``<study dir>/optuna.db`` (:attr:`StudyLayout.optuna_file`), an
SQLite database opened with Optuna's ``RDBStorage``. ``--optuna-storage URL`` puts it in
any database SQLAlchemy reaches (``postgresql://user@host/db`` on a cluster: several
studies and machines share it) or another SQLite file (a plain path); ``none`` turns the
mirror off. A study stored remotely (``--storage s3://...``) cannot hold an SQLite file:
its default is a local file under ``~/.cache/sedd_ray/optuna/`` (printed when the study
starts), or pass ``--optuna-storage``. An unreachable URL is one ``error:`` line before
anything runs (:func:`check_url`).

**Why SQLite, not Optuna's journal file.** Both were tested here (15 writers SIGKILLed
mid-write, then 4 concurrent writers; ``benchmarks/optuna_storage.py``): SQLite rolls a
killed transaction back and the next writer went on within 0.2 s, and no trial was lost or
duplicated. The journal file (``JournalFileBackend``) also kept every trial, but a writer
killed while holding its lock (the lock is held through an fsync) left the lock behind, and
the next writer waited out the 30 s grace period, every time; a line cut short by a kill
would make every later line unreadable. SQLite on NFS is unsafe: use a database URL there.

**A mirror, not the searcher's own storage.** Ray's ``OptunaSearch(storage=...)`` would
write its asks and tells itself, but a driver killed between two searcher checkpoints
leaves asked trials RUNNING for ever (a resumed searcher never tells them), it reports
intermediate values by Tune's ``training_iteration`` (restarting at 0 after a restore)
rather than by step, and it tells the last report rather than the trial's ``val_nll``. So
the searchers stay in memory (pickled by Tune for ``--resume``) and this module mirrors
the Parquet rows, which are the source of truth, from the Parquet callback: a trial is
added RUNNING with its searched params when it starts, gets each evaluation's ``val_nll``
as an intermediate value at its step, and its final state (COMPLETE, PRUNED for
``stopped_early``, FAIL for ``error``) and value (``val_nll_final`` when present, else
``val_nll``) when it ends. Each Optuna trial carries the Tune trial id (user attr
``tune_trial_id``): writing a trial twice changes nothing, and every start of a study
(``--resume`` included) re-syncs its Optuna studies from Parquet first (:func:`activate`),
so a driver killed at any point leaves no duplicate and no missing trial. Optuna cannot rewrite a finished trial: when Parquet
changes one (an errored trial resumed), its Optuna study is rebuilt from Parquet.

Imports neither torch nor Ray (the analysis scripts use :func:`optuna_study`).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sedd_ray.config import ConfigError
from sedd_ray.io import local_path, normalize
from sedd_ray.layout import OPTUNA_FILE, StudyLayout

__all__ = ["TUNE_ID_ATTR", "OptunaMirror", "OptunaStorageError", "activate", "check_url",
           "mirror_result", "mirror_row", "open_storage", "optuna_study", "optuna_study_names",
           "prepare", "storage_url", "study_name", "write_optuna_plots"]

TUNE_ID_ATTR = "tune_trial_id"  # the user attr that keys an Optuna trial on its Tune trial
STUDY_ATTR = "sedd_ray_study"  # the sedd-ray study an Optuna study belongs to
OFF = ("none", "off")


class OptunaStorageError(ConfigError):
    """A ``--optuna-storage`` that cannot be used (one ``error:`` line)."""


# --- where -------------------------------------------------------------------------------

def storage_url(storage: str, study: str, url: str | None = None) -> str | None:
    """The Optuna storage URL of ``study`` under the results ``storage``: ``url`` (a
    database URL, or a path to an SQLite file), None for ``none``/``off``, else the
    default SQLite file (the study folder, or a local cache for remote storage)."""
    if url is not None and url.strip().lower() in OFF:
        return None
    if url:
        return url if "://" in url else f"sqlite:///{os.path.abspath(os.path.expanduser(url))}"
    layout = StudyLayout(normalize(storage), study)
    path = local_path(layout.optuna_file)
    if path is None:  # s3:// etc.: SQLite needs a local file system
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = cache / "sedd_ray" / "optuna" / quote(layout.dir, safe="") / OPTUNA_FILE
    return f"sqlite:///{path}"


def _shown(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not parseable: hide anything between : and @
        return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # concurrent writers wait, not fail
    if url.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": 10}}  # an unreachable host fails fast
    return {}


def check_url(url: str) -> None:
    """Connect to a user-given storage ``url`` once, or raise :class:`OptunaStorageError`
    with one line saying why (before anything runs). Creates nothing but an empty SQLite
    file when its folder exists."""
    import sqlalchemy

    shown = _shown(url)
    try:
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    except ModuleNotFoundError as e:
        raise OptunaStorageError(f"--optuna-storage {shown}: its database driver is not "
                                 f"installed ({e}); pip install it (postgresql: "
                                 "psycopg2-binary)") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise OptunaStorageError(f"--optuna-storage {shown} is not a database URL "
                                 f"({str(e).replace(url, shown)}); "
                                 "use e.g. postgresql://user@host/db or a .db file path") from None
    try:
        with engine.connect():
            pass
    except Exception as e:  # noqa: BLE001 - OperationalError, a driver's own errors
        line = str(getattr(e, "orig", None) or e).strip().splitlines()[0].replace(url, shown)
        raise OptunaStorageError(f"--optuna-storage {shown} is unreachable ({line}); check the "
                                 "URL and that the database is up and reachable from here, "
                                 "or pass --optuna-storage none") from None
    finally:
        engine.dispose()


def prepare(spec: Any, storage: str) -> str | None:
    """The Optuna storage URL of a study about to run (``spec.optuna_storage`` or the
    default), a user-given one checked now: before Ray starts, writing nothing. A password
    in the URL stays in this process: ``spec.optuna_storage`` keeps the URL without it, so
    the spec that Tune pickles into the study folder holds no secret."""
    url = storage_url(storage, spec.name, spec.optuna_storage)
    if url is not None and spec.optuna_storage:
        check_url(url)
        spec.optuna_storage = _shown(url)
    return url


_STORAGES: dict[str, Any] = {}


def open_storage(url: str):
    """The Optuna ``RDBStorage`` at ``url`` (one per URL in this process)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url not in _STORAGES:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        _STORAGES[url] = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    return _STORAGES[url]


def study_name(study: str, axis: str | None, level: Any = None, phase: str | None = None) -> str:
    """The Optuna study of one level (``graph-ablation/graph=absorb``); search mode: the
    study's name. Replicate-phase trials go to a study of their own (``.../replicate``),
    so the tuning studies hold only what the searchers suggested."""
    name = study if axis is None or level is None else f"{study}/{axis}={level}"
    return name if phase in (None, "", "tune") else f"{name}/{phase}"


# --- one Parquet row -> one Optuna trial -----------------------------------------------------

def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _distribution(param: Any):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if param.kind == "float":
        return FloatDistribution(param.low, param.high, log=param.log)
    if param.kind == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log)
    return CategoricalDistribution(list(param.choices))


def _params(space: Mapping[str, Any], row: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """``(params, distributions, outside)``: the searched params the trial used (a
    conditional one only when its condition holds in the row), and any value outside its
    distribution (a search mode point), which Optuna refuses as a param."""
    params, dists, outside = {}, {}, {}
    for name, p in space.items():
        v = _py(row.get(name))
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if p.when and any(_py(row.get(k)) != w for k, w in p.when.items()):
            continue
        d = _distribution(p)
        v = int(v) if p.kind == "int" else float(v) if p.kind == "float" else v
        if d._contains(d.to_internal_repr(v)) if p.kind != "choice" else v in d.choices:
            params[name], dists[name] = v, d
        else:
            outside[name] = v
    return params, dists, outside


def _state(row: Mapping[str, Any]):
    """``(TrialState, value)`` of a Parquet row (value: ``val_nll_final`` when present,
    else ``val_nll``; None unless COMPLETE or PRUNED)."""
    from optuna.trial import TrialState

    value = _finite(row.get("val_nll_final"))
    value = value if value is not None else _finite(row.get("val_nll"))
    status = row.get("status")
    if status == "terminated" and value is not None:
        return TrialState.COMPLETE, value
    if status == "stopped_early":
        return TrialState.PRUNED, value
    if status in ("terminated", "stopped_early", "error"):
        return TrialState.FAIL, None  # terminated without a finite value: a NaN loss
    return TrialState.RUNNING, None


def frozen_trial(space: Mapping[str, Any], row: Mapping[str, Any],
                 intermediate: Mapping[int, float] = ()):
    """The Optuna trial that mirrors one Parquet row (see the module docstring)."""
    from optuna.trial import create_trial

    from sedd_ray.results import scrub  # secrets never reach the storage (as in Parquet)

    params, dists, outside = _params(space, row)
    state, value = _state(row)
    attrs = {TUNE_ID_ATTR: str(row["trial_id"]), "status": row.get("status")}
    for k in ("level", "seed", "phase", "replicate_of", "error", "checkpoint_path"):
        v = _py(row.get(k))
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            attrs[k] = scrub(v)
    if outside:
        attrs["params_outside_space"] = outside
    return create_trial(state=state, value=value, params=params, distributions=dists,
                        intermediate_values=dict(intermediate) or None, user_attrs=attrs)


def intermediate_values(history: Any, trial_id: str) -> dict[int, float]:
    """``{step: val_nll}`` of one trial's evaluations in a ``read_history`` frame."""
    if history is None or len(history) == 0 or "val_nll" not in history:
        return {}
    h = history[history["trial_id"] == trial_id]
    return {int(s): float(v) for s, v in zip(h["step"], h["val_nll"]) if _finite(v) is not None}


# --- the mirror --------------------------------------------------------------------------------

def _same(have, want) -> bool:
    """Whether a finished Optuna trial already says what the Parquet row says."""
    return (have.state == want.state and have.values == want.values
            and have.params == want.params
            and have.intermediate_values == want.intermediate_values)


class OptunaMirror:
    """The Optuna studies of one sedd-ray study (``spec``: a StudySpec) in the storage at
    ``url``, written from its Parquet rows; every method is idempotent."""

    def __init__(self, spec: Any, storage: str, url: str) -> None:
        self.spec, self.storage, self.url = spec, storage, url
        self.db = open_storage(url)
        self._ids: dict[str, int] = {}  # Optuna study name -> study id
        self._trials: dict[str, tuple[str, int]] = {}  # Tune trial id -> (study, Optuna id)

    def name_of(self, row: Mapping[str, Any]) -> str:
        level = row.get("level") if self.spec.ablate else None
        return study_name(self.spec.name, self.spec.ablate, level, row.get("phase"))

    def create_studies(self) -> list[str]:
        """Every level's Optuna study (empty until its first trial), so they show at once."""
        names = [study_name(self.spec.name, self.spec.ablate, lv)
                 for lv in (self.spec.levels if self.spec.ablate else [None])]
        for name in names:
            self.study_id(name)
        return names

    def study_id(self, name: str) -> int:
        if name not in self._ids:
            import optuna

            direction = "minimize" if self.spec.mode == "min" else "maximize"
            study = optuna.create_study(storage=self.db, study_name=name, direction=direction,
                                        load_if_exists=True)
            rest = name.removeprefix(self.spec.name).strip("/")  # "graph=absorb[/replicate]"
            level, _, phase = rest.partition("=")[2].partition("/") if self.spec.ablate \
                else ("", "", rest)
            attrs = {STUDY_ATTR: self.spec.name, "axis": self.spec.ablate,
                     "metric": self.spec.metric, "level": level or None, "phase": phase or "tune"}
            for k, v in attrs.items():
                if study.user_attrs.get(k) != v:
                    study.set_user_attr(k, v)
            self._ids[name] = study._study_id
        return self._ids[name]

    def _existing(self, name: str) -> dict[str, list]:
        """Tune trial id -> its Optuna trials in study ``name`` (more than one: a duplicate)."""
        out: dict[str, list] = {}
        for t in self.db.get_all_trials(self.study_id(name), deepcopy=False):
            out.setdefault(t.user_attrs.get(TUNE_ID_ATTR), []).append(t)
        return out

    def _find(self, name: str, tune_id: str):
        """The Optuna trial mirroring ``tune_id`` in study ``name``, or None."""
        known = self._trials.get(tune_id)
        if known and known[0] == name:
            return self.db.get_trial(known[1])
        found = self._existing(name).get(tune_id)
        if found:
            self._trials[tune_id] = (name, found[0]._trial_id)
            return found[0]
        return None

    def upsert(self, row: Mapping[str, Any], intermediate: Mapping[int, float] = ()) -> str:
        """Mirror one Parquet row: ``added``, ``updated``, ``same`` or ``rebuilt`` (Optuna
        held a finished trial that Parquet now says otherwise: its study is rebuilt)."""
        from optuna.trial import TrialState

        name, tune_id = self.name_of(row), str(row["trial_id"])
        have = self._find(name, tune_id)
        want = frozen_trial(self.spec.space, row, intermediate)
        if have is None:
            tid = self.db.create_new_trial(self.study_id(name), template_trial=want)
            self._trials[tune_id] = (name, tid)
            return "added"
        if have.state != TrialState.RUNNING:
            if _same(have, want) or (want.state == have.state and not intermediate
                                     and have.values == want.values):
                return "same"
            self.rebuild(name)
            return "rebuilt"
        changed = {s: v for s, v in want.intermediate_values.items()
                   if have.intermediate_values.get(s) != v}
        for step, v in changed.items():
            self.db.set_trial_intermediate_value(have._trial_id, step, v)
        if want.state != TrialState.RUNNING:
            for k, v in want.user_attrs.items():
                if have.user_attrs.get(k) != v:
                    self.db.set_trial_user_attr(have._trial_id, k, v)
            self.db.set_trial_state_values(have._trial_id, want.state, want.values)
            return "updated"
        return "updated" if changed else "same"

    def report(self, row: Mapping[str, Any], step: int, value: float) -> None:
        """One evaluation of a running trial: an intermediate value at ``step``."""
        from optuna.trial import TrialState

        have = self._find(self.name_of(row), str(row["trial_id"]))
        if have is not None and have.state == TrialState.RUNNING:
            self.db.set_trial_intermediate_value(have._trial_id, int(step), float(value))

    def _parquet(self) -> tuple[list[dict], Any]:
        """Every Parquet row of the study and its history (none yet: empty)."""
        from sedd_ray.results import list_studies, read_history, read_trials

        if self.spec.name not in list_studies(self.storage):
            return [], None
        rows = read_trials(self.storage, self.spec.name).to_dict("records")
        return rows, read_history(self.storage, self.spec.name)

    def rebuild(self, name: str) -> int:
        """Delete Optuna study ``name`` and write it again from Parquet; its trial count."""
        import optuna

        rows, history = self._parquet()
        optuna.delete_study(study_name=name, storage=self.db)
        self._ids.pop(name, None)
        self._trials = {k: v for k, v in self._trials.items() if v[0] != name}
        sid = self.study_id(name)
        mine = [r for r in rows if self.name_of(r) == name]
        for r in mine:
            want = frozen_trial(self.spec.space, r, intermediate_values(history, r["trial_id"]))
            self._trials[str(r["trial_id"])] = (name, self.db.create_new_trial(sid, template_trial=want))
        return len(mine)

    def sync(self) -> dict[str, int]:
        """Make every Optuna study of this study match Parquet (every start runs it first):
        missing trials added, running ones brought up to date, and a study holding a trial
        Parquet lacks, a duplicate or a finished trial Parquet contradicts rebuilt."""
        rows, history = self._parquet()
        names = list(dict.fromkeys([*self.create_studies(), *map(self.name_of, rows)]))
        counts = {"added": 0, "updated": 0, "same": 0, "rebuilt": 0}
        for name in names:
            mine = {str(r["trial_id"]): r for r in rows if self.name_of(r) == name}
            existing = self._existing(name)
            if any(k not in mine or len(v) > 1 for k, v in existing.items()):
                counts["rebuilt"] += self.rebuild(name)
                continue
            for tid, r in mine.items():
                how = self.upsert(r, intermediate_values(history, tid))
                counts[how] += 1
                if how == "rebuilt":
                    break  # the rebuild wrote every trial of this study
        return counts


# --- the study's hooks ---------------------------------------------------------------------------

_ACTIVE: dict[tuple[str, str], OptunaMirror] = {}  # (results storage, study) -> its mirror


def activate(spec: Any, storage: str, url: str | None) -> OptunaMirror | None:
    """Start mirroring ``spec``'s trials into the storage at ``url`` (None: stop), after
    bringing its Optuna studies in line with the Parquet (nothing to do for a new study;
    after a driver kill, what the dead driver had not written). Called by
    :func:`sedd_ray.study.run_study` after its storage checks, before the first trial."""
    key = (normalize(storage), spec.name)
    _ACTIVE.pop(key, None)
    if url is None:
        return None
    mirror = OptunaMirror(spec, normalize(storage), url)
    counts = mirror.sync()
    if counts["added"] + counts["updated"] + counts["rebuilt"]:
        print(f"Optuna storage re-synced from Parquet: {counts}", flush=True)
    _ACTIVE[key] = mirror
    print(f"Optuna studies in {_shown(url)}; to watch them: optuna-dashboard {_shown(url)}",
          flush=True)
    return mirror


def _warn(storage: str, spec: Any, e: Exception) -> None:
    print(f"warning: Optuna storage of study {spec.name!r} not updated ({e}); the Parquet "
          "rows are intact and --resume re-syncs it", file=sys.stderr, flush=True)


def mirror_row(storage: str, spec: Any, row: Mapping[str, Any], finished: bool = False) -> None:
    """The Parquet callback's hook after writing a trial's row: mirror it (a finished
    trial with its evaluations from ``history/``). Never raises: Parquet is the record."""
    mirror = _ACTIVE.get((normalize(storage), spec.name))
    if mirror is None:
        return
    try:
        history = None
        if finished:
            from sedd_ray.results import read_history

            history = read_history(mirror.storage, spec.name, str(row["trial_id"]))
        mirror.upsert(row, intermediate_values(history, str(row["trial_id"])))
    except Exception as e:  # noqa: BLE001 - a mirror failure never stops the study
        _warn(storage, spec, e)


def mirror_result(storage: str, spec: Any, row: Mapping[str, Any],
                  result: Mapping[str, Any]) -> None:
    """The Parquet callback's hook for one report: an evaluation (``val_nll`` at ``step``)
    becomes an intermediate value of the running trial."""
    mirror = _ACTIVE.get((normalize(storage), spec.name))
    value, step = _finite(result.get("val_nll")), result.get("step")
    if mirror is None or value is None or step is None or result.get("summary"):
        return
    try:
        mirror.report(row, int(step), value)
    except Exception as e:  # noqa: BLE001 - a mirror failure never stops the study
        _warn(storage, spec, e)


# --- reading it back (analysis) ----------------------------------------------------------------

def optuna_study_names(storage: str, study: str, optuna_storage: str | None = None) -> list[str]:
    """The Optuna studies of sedd-ray ``study`` (one per level; search mode: one)."""
    import optuna

    url = storage_url(storage, study, optuna_storage)
    if url is None:
        raise OptunaStorageError("no Optuna storage: --optuna-storage none turned it off")
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path is not None and not Path(path).is_file():
        raise OptunaStorageError(f"no Optuna storage at {path}: run the study (or "
                                 "--resume it) with this version to create it")
    summaries = optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)
    return [s.study_name for s in summaries if s.user_attrs.get(STUDY_ATTR) == study]


def optuna_study(storage: str, study: str, level: Any = None, *, phase: str | None = None,
                 optuna_storage: str | None = None):
    """The ``optuna.Study`` of a sedd-ray study (``level``: which level's, for an
    ablation; ``phase="replicate"``: its replicates' study), for ``optuna.visualization``,
    ``optuna.importance`` and friends::

        from experiments.analyze import optuna_study
        s = optuna_study("results", "graph-ablation", "absorb")
        optuna.visualization.matplotlib.plot_intermediate_values(s)
    """
    import optuna

    names = optuna_study_names(storage, study, optuna_storage)
    suffix = ("" if level is None else f"={level}") + (
        "" if phase in (None, "", "tune") else f"/{phase}")
    pick = [n for n in names if (n == study + suffix if level is None else n.endswith(suffix))]
    if len(pick) != 1:
        listing = ", ".join(names) or "none"
        raise OptunaStorageError(
            f"{'no' if not pick else 'several'} Optuna studies of {study!r} match "
            f"level={level!r}; its studies: {listing}" + ("" if level else "; pass a level"))
    return optuna.load_study(study_name=pick[0],
                             storage=open_storage(storage_url(storage, study, optuna_storage)))




def write_optuna_plots(storage: str, study: str, out_dir: str | os.PathLike, *,
                       optuna_storage: str | None = None) -> list[Path]:
    """Optuna's own plots (``optuna.visualization.matplotlib``) of every Optuna study of
    ``study``, as PNGs in ``out_dir``: the optimisation history and the intermediate values
    (each trial's periodic ``val_nll`` by step), one pair per level, e.g.
    ``optuna-history-graph=absorb.png``. Returns the paths written."""
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    url = storage_url(storage, study, optuna_storage)
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for name in optuna_study_names(storage, study, optuna_storage):
        s = optuna.load_study(study_name=name, storage=open_storage(url))
        tag = name.removeprefix(study).strip("/").replace("/", "-") or "search"
        for kind, plot in (("history", ovm.plot_optimization_history),
                           ("intermediate", ovm.plot_intermediate_values)):
            # rc_context: Optuna's plots call plt.style.use("ggplot"), for good otherwise.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
                ax = plot(s)
                ax.set_title(f"{name}: {ax.get_title()}")
                path = out / f"optuna-{kind}-{tag}.png"
                ax.figure.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(ax.figure)
            paths.append(path)
    return paths
