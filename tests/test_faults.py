"""Fault suite: what survives which fault, on a local Ray cluster (marker ``faults``).

- a full disk: refused before training when it is full from the start; a checkpoint that
  cannot be written mid-run leaves the previous one intact and the run resumable;
- the study driver killed twice (SIGKILL by pid), once mid-tuning and once
  mid-replication: ``--resume`` completes both phases and Parquet holds every trial
  exactly once (each tuning trial, each (level, replicate seed)), and no secret from the
  environment;
- a Ray Train worker killed three times in one run: it completes from its checkpoints
  with the same final metrics and weights as an uninterrupted run;
- a node of a ``ray.cluster_utils.Cluster`` removed mid-trial: the trial is retried on
  another node, resumes from its checkpoint, and the study completes.

Budget: about 6 minutes on 2 CPU cores. The NaN-trial case (recorded as an error with
its step and reason while the study completes) is covered by ``tests/test_study.py``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from raytools import (
    committed_steps,
    jsonl,
    kill_session,
    launch_in_thread,
    multinode_cluster,
    plain_reference,
    weights_sha,
)
from test_optuna_store import assert_mirrors_parquet

from sedd_ray import checkpoint as ckpt
from sedd_ray.layout import StudyLayout, TrainerFiles
from sedd_ray.results import read_history, read_trials

pytestmark = pytest.mark.faults

FAKE_KEY = "fa6e0123456789abcdef0123456789abcdef0123"  # 40 hex, like a wandb key


# --- a full disk (no Ray) -------------------------------------------------------------------

TINY = ["--preset", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
        "--log-every", "5", "--eval-every", "10", "--ckpt-every", "10", "--eval-sequences", "8",
        "--eval-draws", "2", "--test-draws", "0", "--sample-count", "1", "--sample-length", "16",
        "--sample-steps", "4", "--progress", "false", "--hidden-size", "32", "--cond-dim", "16",
        "--n-heads", "2", "--n-layers", "1", "--no-ray"]


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_refused_before_the_first_step(tmp_path, capfd, monkeypatch):
    """ENOSPC surfaces at fsync on many filesystems: every fsync fails, as on a full disk."""
    from sedd_ray import train as train_cli
    from sedd_ray.trainer import Trainer

    monkeypatch.setattr(os, "fsync", _enospc)
    monkeypatch.setattr(Trainer, "_train_step", lambda self: pytest.fail("a step ran"))
    out = tmp_path / "out"
    assert train_cli.main([*TINY, "--steps", "20", "--output", str(out)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {out} is not writable (No space left on device); free "
                   "some space or pass a writable --output"]
    assert [p.name for p in out.iterdir()] == []  # not even the probe file is left


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, capfd,
                                                                      monkeypatch, tiny_bundle):
    """The disk fills while checkpoint 20 is written: the run stops with one line naming
    the intact checkpoint 10, leaves no debris, and a rerun resumes from 10 to the end."""
    import torch

    from sedd_ray import train as train_cli

    real_save = torch.save

    def filling_save(obj, f, *a, **k):
        if "ckpt-00000020" in str(f):
            with open(f, "wb") as fh:  # part of the file, then the disk is full
                fh.write(b"\x80\x02partial")
            _enospc()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", filling_save)
    out = tmp_path / "out"
    args = [*TINY, "--steps", "30", "--output", str(out)]
    assert train_cli.main(args) == 1
    err = capfd.readouterr().err.strip().splitlines()
    root = TrainerFiles(out).checkpoints
    assert err == [f"error: checkpoint {root}/ckpt-00000020 could not be written (No "
                   "space left on device); ckpt-00000010 is intact: free some space and run "
                   "again to resume from it"]
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000010", "latest.json"]
    ckpt.load_checkpoint(root / "ckpt-00000010")  # whole and checksummed
    monkeypatch.setattr(ckpt.torch, "save", real_save)  # space freed
    assert train_cli.main(args) == 0
    final = json.loads(TrainerFiles(out).final.read_text())
    assert final["resumed_from_step"] == 10 and final["step"] == 30


# --- the study driver killed twice ------------------------------------------------------------

STUDY_FLAGS = ["graph-ablation", "--smoke-test", "--trials-per-level", "1", "--replicates", "1",
               "--max-concurrent", "1", "--set", "steps=30", "--set", "ckpt_every=10", "--set", "eval_every=10",
               "--set", "log_every=5", "--set", "vocab_size=300", "--set", "seq_len=32",
               "--set", "hidden_size=32", "--set", "cond_dim=16", "--set", "n_layers=1",
               "--set", "test_draws=0", "--set", "eval_sequences=8", "--set", "sample_steps=4"]


def _study(storage: Path, *extra: str) -> subprocess.Popen:
    # Its own session (so what it leaves can be killed with it) and its own local cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["WANDB_API_KEY"] = FAKE_KEY  # forwarded to every worker; must be stored nowhere
    return subprocess.Popen([sys.executable, "-m", "sedd_ray.study", *STUDY_FLAGS,
                             "--storage", str(storage), *extra], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _trials(storage: Path) -> list[dict]:
    try:
        return read_trials(storage, "graph-ablation").to_dict("records")
    except Exception:  # noqa: BLE001 - not written yet
        return []


def _kill_mid_trial(proc: subprocess.Popen, storage: Path, finished_before: int,
                    phase: str = "tune") -> dict:
    """SIGKILL the driver once ``finished_before`` trials have finished and one trial of
    ``phase`` is in flight with a checkpoint that Ray has committed."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = _trials(storage)
        done = {r["trial_id"] for r in rows if r["status"] == "terminated"}
        for r in rows:
            run = StudyLayout(str(storage), "graph-ablation").trial(r["trial_id"])
            committed = committed_steps(Path(run.dir, "checkpoint_manager_snapshot.json"))
            if (len(done) >= finished_before and r["status"] == "running"
                    and r["phase"] == phase and committed):
                kill_session(proc)
                return {"done": done, "in_flight": r["trial_id"], "committed": committed[-1]}
        time.sleep(0.2)
    kill_session(proc)
    pytest.fail(f"no kill point reached (exit code {proc.returncode}); trials: "
                f"{[(r['trial_id'], r['status'], r['step']) for r in _trials(storage)]}")


@pytest.mark.ray
def test_driver_killed_twice_resume_completes_every_trial_once(tmp_path):
    """Two tuning trials (one per graph), then each graph's config with one fresh seed, one
    trial at a time. Kill 1: the first tuning trial in flight; kill 2 (after a resume that
    finishes the tuning and starts the replication): the tuning trials finished, a
    replicate in flight. A second resume ends the study."""
    storage = tmp_path / "results"
    first = _kill_mid_trial(_study(storage), storage, finished_before=0)
    second = _kill_mid_trial(_study(storage, "--resume"), storage, finished_before=2,
                             phase="replicate")
    assert first["in_flight"] in second["done"] and second["in_flight"] != first["in_flight"]
    final = _study(storage, "--resume")
    try:
        assert final.wait(timeout=400) == 0
    finally:
        kill_session(final)

    df = read_trials(storage, "graph-ablation")
    assert len(df) == 4 and df["trial_id"].is_unique  # every trial exactly once
    assert (df["status"] == "terminated").all(), df[["trial_id", "status", "error"]]
    tune, rep = df[df["phase"] == "tune"], df[df["phase"] == "replicate"]
    assert sorted(tune["level"]) == ["absorb", "uniform"]  # each tuning trial once
    assert sorted(zip(rep["level"], rep["seed"])) == [("absorb", 1), ("uniform", 1)]
    assert dict(zip(rep["level"], rep["replicate_of"])) == dict(zip(tune["level"],
                                                                    tune["trial_id"]))
    assert (df["step"] == 30).all() and df["val_nll"].notna().all()
    # Optuna's storage mirrors Parquet after both kills: no duplicate, no missing trial.
    assert assert_mirrors_parquet(storage, "graph-ablation") == 4  # 2 tuning + 2 replicates
    hist = read_history(storage, "graph-ablation")
    for kill in (first, second):
        # The trial in flight at each kill resumed from its checkpoint, not from step 0:
        # its trainer log (every step, complete) restarts after the committed step.
        run = StudyLayout(str(storage), "graph-ablation").trial(kill["in_flight"])
        log = jsonl(run.trainer_files().metrics)
        steps = [m["step"] for m in log]
        restarts = [b for a, b in zip(steps, steps[1:]) if b <= a]
        assert restarts and min(restarts) > kill["committed"], steps
        assert sorted(set(steps)) == [5, 10, 15, 20, 25, 30]
        # History in Parquet: every step exactly once, including the steps the driver had
        # not recorded when it died (backfilled from the trial's metrics.jsonl).
        h = list(hist[hist["trial_id"] == kill["in_flight"]]["step"])
        assert h == [5, 10, 15, 20, 25, 30]
    leaked = [str(p) for p in storage.rglob("*") if p.is_file() and FAKE_KEY.encode()
              in p.read_bytes()]
    assert leaked == []


# --- one local multi-node cluster for the Ray Train faults ----------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A head with the study's driver resource and no CPU, and two 1-CPU worker nodes."""
    with multinode_cluster({"num_cpus": 0, "resources": {"sedd_driver": 1000}}) as c:
        yield c


@pytest.mark.ray
def test_worker_killed_three_times_matches_an_uninterrupted_run(cluster, tmp_path):


    cfg = tiny_config(steps=800, ckpt_every=50, eval_every=400, log_every=10)
    plain, reference = plain_reference(cfg, tmp_path / "plain")
    reference_loss = jsonl(TrainerFiles(tmp_path / "plain").metrics)[-1]["train_loss"]

    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    thread, out = launch_in_thread(cfg, name="thrice", storage=str(runs), num_workers=1,
                                   node_log=str(logs), max_failures=3)
    snapshot = runs / "thrice" / "checkpoint_manager_snapshot.json"
    kills: list[dict] = []
    deadline = time.time() + 300
    while thread.is_alive() and len(kills) < 3 and time.time() < deadline:
        starts = [e for e in jsonl(logs / "rank0.log") if "start_step" in e]
        if len(starts) == len(kills) + 1:  # the current attempt's worker is up
            committed = committed_steps(snapshot)
            # Kill once this attempt has had a checkpoint of its own committed by Ray.
            if committed and committed[-1] > starts[-1]["start_step"]:
                os.kill(starts[-1]["pid"], signal.SIGKILL)
                kills.append({"pid": starts[-1]["pid"], "committed": committed[-1]})
        time.sleep(0.02)
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert len(kills) == 3, f"only {len(kills)} kills before the run ended"
    starts = [e for e in jsonl(logs / "rank0.log") if "start_step" in e]
    assert len(starts) == 4 and len({s["pid"] for s in starts}) == 4
    for kill, restart in zip(kills, starts[1:]):
        assert restart["start_step"] >= kill["committed"] > 0  # resumed, never from scratch
    result = out["result"]
    assert result["step"] == reference.step == 800
    assert result["val_nll"] == reference.val_nll  # bitwise: the same floats
    assert result["train_loss"] == reference_loss
    final_weights = [e for e in jsonl(logs / "rank0.log") if "weights_sha256" in e]
    assert final_weights[-1]["weights_sha256"] == weights_sha(plain.raw_model)


@pytest.mark.ray
def test_node_removed_mid_trial_is_retried_elsewhere_and_the_study_completes(cluster, tmp_path):
    from ray.util.state import list_actors

    from sedd_ray.study import Choice, StudySpec, run_study

    fixed = {"steps": 300, "ckpt_every": 50, "eval_every": 150, "log_every": 10,
             "vocab_size": 300, "seq_len": 32, "batch_size": 8, "eval_sequences": 8,
             "eval_draws": 2, "test_draws": 0, "sample_count": 1, "sample_steps": 4,
             "sample_length": 16, "hidden_size": 32, "cond_dim": 16, "n_layers": 1,
             "progress": False}
    spec = StudySpec(name="node-loss", base="tiny", fixed=fixed, space={"lr": Choice([2e-3])},
                     num_trials=1, max_concurrent=1, max_failures=2)
    storage = tmp_path / "results"
    removed: dict = {}

    def remove_the_workers_node():
        deadline = time.time() + 240
        while time.time() < deadline:
            train_dir = Path(StudyLayout(str(storage), "node-loss").train_dir)
            snaps = list(train_dir.glob("*/checkpoint_manager_snapshot.json"))
            committed = committed_steps(snaps[0]) if snaps else []
            if committed:
                alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                             ("state", "=", "ALIVE")])
                node = next((n for n in cluster.list_all_nodes() if alive
                             and n.node_id == alive[0].node_id), None)
                if node is not None and node is not cluster.head_node:
                    node_id = node.node_id
                    cluster.remove_node(node)
                    removed.update(node=node_id, committed=committed[-1],
                                   trial=snaps[0].parent.name)
                    return
            time.sleep(0.05)

    monitor = threading.Thread(target=remove_the_workers_node)
    monitor.start()
    try:
        run_study(spec, str(storage), verbose=0)
    finally:
        monitor.join(timeout=300)
    assert removed, "the node was never removed"
    row = read_trials(storage, "node-loss").iloc[0]
    assert row["status"] == "terminated" and row["step"] == 300, row.get("error")
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    nodes = {w.node_id for w in workers}
    assert removed["node"] in nodes and len(nodes) >= 2  # ran, lost, ran again elsewhere
    log = jsonl(StudyLayout(str(storage), "node-loss").trial(removed["trial"])
                .trainer_files().metrics)
    steps = [m["step"] for m in log]
    # Resumed from the committed checkpoint, never from 0: the rows up to it appear once.
    # (A row may or may not repeat after it: the node can go between a commit and the next log.)
    assert all(steps.count(s) == 1 for s in steps if s <= removed["committed"]), steps
    restarts = [b for a, b in zip(steps, steps[1:]) if b <= a]
    assert len(restarts) <= 1 and all(b > removed["committed"] for b in restarts), steps
    assert steps[-1] == 300
