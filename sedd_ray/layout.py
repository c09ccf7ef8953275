"""Where every file of a study, a trial and a run lives: the only place it is spelled.

A study (``StudyLayout(storage, study)``)::

    <storage>/<study>/trials.parquet                          one row per trial (results.py)
    <storage>/<study>/evals.parquet                           evaluations (sedd_ray.evaluate)
    <storage>/<study>/history/part-<trial>-<seq>.parquet      per-step rows (results.py)
    <storage>/<study>/tune/                                   Ray Tune's experiment: tuning phase
    <storage>/<study>/replicate/                              Ray Tune's experiment: replication
    <storage>/<study>/optuna.db                               its Optuna studies (optuna_store.py)
    <storage>/<study>/train/<trial>/                          the trial's Ray Train run
    <storage>/<study>-ar/                                     its AR reference (a study)

A Ray Train run (``RunLayout(storage, name)``; a study's trial is ``study.trial(id)``)::

    <storage>/<name>/                  Ray Train: checkpoint_* folders, controller state
    <storage>/<name>/trainer/          the trainer's own files (local storage only)

A trainer's output folder (``TrainerFiles(output_dir)``: ``python -m sedd_ray.train
--no-ray --output DIR``, or a run's ``trainer/``)::

    metrics.jsonl  samples.jsonl  final.json  final_blocks.parquet  checkpoints/

``storage`` is a local path or a URI (see :mod:`sedd_ray.io`); paths are strings joined
with ``/`` so a URI stays one. Pure Python: the analysis scripts import it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sedd_ray.io import join, local_path

__all__ = ["RunLayout", "StudyLayout", "TrainerFiles", "ar_reference_study", "evals_beside"]


EVALS_FILE = "evals.parquet"
OPTUNA_FILE = "optuna.db"


# A study's autoregressive reference (``ablate_graph.py --ar-reference``) is a study of its
# own beside it: ``<storage>/<study>-ar`` (the report of ``<study>`` finds it there).
AR_REFERENCE_SUFFIX = "-ar"


def ar_reference_study(study: str) -> str:
    """``graph-ablation`` -> ``graph-ablation-ar``: the study holding its AR reference."""
    return f"{study}{AR_REFERENCE_SUFFIX}"


def evals_beside(checkpoint_dir: str | os.PathLike) -> str:
    """Where ``python -m sedd_ray.evaluate --checkpoint DIR`` writes its rows: next to the
    checkpoint folder (``.../checkpoints/evals.parquet``), never inside it (a checkpoint's
    files are checksummed)."""
    return join(os.fspath(checkpoint_dir).rstrip("/").rpartition("/")[0] or ".", EVALS_FILE)


@dataclass(frozen=True)
class TrainerFiles:
    """The files one trainer writes into its output folder ``root``."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def metrics(self) -> Path:
        """Every log row, one JSON object per line (also on resume: appended)."""
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def final(self) -> Path:
        """:class:`sedd_ray.trainer.TrainResult` as JSON, written when the run ends."""
        return self.root / "final.json"

    @property
    def final_blocks(self) -> Path:
        """The final evaluation's per-block values (``sedd_ray.results.write_blocks``)."""
        return self.root / "final_blocks.parquet"

    @property
    def checkpoints(self) -> Path:
        """Checkpoint folders and ``latest.json`` (:mod:`sedd_ray.checkpoint`)."""
        return self.root / "checkpoints"


@dataclass(frozen=True)
class RunLayout:
    """One Ray Train run named ``name`` under ``storage``."""

    storage: str
    name: str

    @classmethod
    def at(cls, run_dir: str | os.PathLike) -> RunLayout:
        """The run whose folder is ``run_dir``."""
        storage, _, name = os.fspath(run_dir).rstrip("/").rpartition("/")
        return cls(storage, name)

    @property
    def dir(self) -> str:
        """Ray Train's run folder (``RunConfig(name=name, storage_path=storage)``)."""
        return join(self.storage, self.name)

    @property
    def trainer_dir(self) -> str:
        """Where the trainer of this run writes its own files (on local storage)."""
        return join(self.dir, "trainer")

    def trainer_files(self) -> TrainerFiles | None:
        """The trainer's files, or None on remote storage (the trainer keeps them in a
        temporary folder of its worker there)."""
        path = local_path(self.trainer_dir)
        return None if path is None else TrainerFiles(path)


@dataclass(frozen=True)
class StudyLayout:
    """One study named ``study`` under ``storage``."""

    storage: str
    study: str

    @property
    def dir(self) -> str:
        return join(self.storage, self.study)

    @property
    def trials_file(self) -> str:
        return join(self.dir, "trials.parquet")

    @property
    def evals_file(self) -> str:
        """One row per (checkpoint, corpus, metric, settings): ``sedd_ray.evaluate``."""
        return join(self.dir, EVALS_FILE)

    @property
    def history_dir(self) -> str:
        return join(self.dir, "history")

    def history_part(self, trial_id: str, seq: int) -> str:
        return join(self.history_dir, f"part-{trial_id}-{seq:06d}.parquet")

    # Part names as a regex (results.py lists the finished parts with it).
    HISTORY_PART = r"part-(?P<trial>.+)-(?P<seq>\d+)\.parquet"

    @property
    def optuna_file(self) -> str:
        """The default Optuna storage (an SQLite file) of the study's Optuna studies."""
        return join(self.dir, OPTUNA_FILE)

    # Ray Tune's experiment: RunConfig(name=TUNE_NAME, storage_path=study.dir).
    TUNE_NAME = "tune"

    @property
    def tune_dir(self) -> str:
        return join(self.dir, self.TUNE_NAME)

    # The replication phase's own Tune experiment, beside the tuning phase's.
    REPLICATE_NAME = "replicate"

    @property
    def replicate_dir(self) -> str:
        return join(self.dir, self.REPLICATE_NAME)

    @property
    def train_dir(self) -> str:
        """The ``storage`` of the trials' Ray Train runs (one run per trial id)."""
        return join(self.dir, "train")

    def trial(self, trial_id: str) -> RunLayout:
        """The Ray Train run of one trial."""
        return RunLayout(self.train_dir, trial_id)

    def relative(self, path: str) -> str:
        """``path`` below this study's folder, e.g. for messages: ``train/<t>/trainer``."""
        return path.removeprefix(self.dir + "/")
