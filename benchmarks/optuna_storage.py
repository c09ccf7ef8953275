"""Which Optuna storage file survives a killed writer and concurrent writers (optuna_store.py).

    python benchmarks/optuna_storage.py                 # both kinds, about 2 minutes
    python benchmarks/optuna_storage.py --kills 5 --kinds sqlite

For each kind (an SQLite file through ``RDBStorage``; Optuna's ``JournalStorage`` with a
``JournalFileBackend``): a writer process adds trials as fast as it can (each with 20
intermediate values, like a mirrored trial) and is SIGKILLed at a random moment, ``--kills``
times; after each kill a fresh writer adds one trial and the time it waited is measured.
Then ``--writers`` processes add 50 trials each at once. Finally the study is read back:
every trial must be readable, none duplicated, none of the concurrent ones missing.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time


def _storage(kind: str, path: str):
    import optuna

    if kind == "sqlite":
        return optuna.storages.RDBStorage(f"sqlite:///{path}",
                                          engine_kwargs={"connect_args": {"timeout": 60}})
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(path))


def write(kind: str, path: str, tag: str, n: int) -> None:
    """Add ``n`` COMPLETE trials tagged ``tag-<i>`` to study ``s``."""
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=_storage(kind, path), study_name="s", load_if_exists=True)
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, value=float(i),
            intermediate_values={k: float(k) for k in range(20)}, user_attrs={"tag": f"{tag}-{i}"}))


def _spawn(kind: str, path: str, tag: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--write", kind, path, tag, str(n)])


def measure(kind: str, folder: str, kills: int, writers: int) -> dict:
    import optuna

    path = os.path.join(folder, f"{kind}.store")
    write(kind, path, "init", 1)
    rng, waits, failed = random.Random(0), [], ""
    for r in range(kills):
        proc = _spawn(kind, path, f"killed{r}", 10**6)
        time.sleep(1.5 + rng.random())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.perf_counter()
        try:
            write(kind, path, f"after{r}", 1)
        except Exception as e:  # noqa: BLE001 - the finding itself
            failed = f"writer after kill {r}: {type(e).__name__}: {e}"[:200]
            break
        waits.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rcs = [p.wait() for p in [_spawn(kind, path, f"conc{j}", 50) for j in range(writers)]]
    conc_s = time.perf_counter() - t0
    try:
        trials = optuna.load_study(study_name="s", storage=_storage(kind, path)).get_trials()
        tags = [t.user_attrs.get("tag") for t in trials]
        read = f"{len(trials)} trials, {len(tags) - len(set(tags))} duplicated"
        conc = sum(1 for t in tags if t and t.startswith("conc"))
    except Exception as e:  # noqa: BLE001 - the finding itself
        read, conc = f"unreadable: {type(e).__name__}: {e}"[:200], 0
    return {"kind": kind, "kills": len(waits), "max_wait_s": max(waits, default=float("nan")),
            "failed": failed or "-", "concurrent": f"{conc}/{50 * writers} (exit codes {rcs}) "
            f"in {conc_s:.1f} s", "read_back": read}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="sqlite,journal")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--write", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write:
        kind, path, tag, n = args.write
        write(kind, path, tag, int(n))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            rows.append(measure(kind, folder, args.kills, args.writers))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
