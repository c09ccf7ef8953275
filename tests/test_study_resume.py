"""The study driver killed mid-study (SIGKILL by pid); ``--resume`` completes it and the
Parquet output holds every trial exactly once. The tuning phase alone (``--phase tune``);
a kill mid-replication is in ``tests/test_faults.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from raytools import kill_session

from sedd_ray.results import read_trials

pytestmark = pytest.mark.ray

FLAGS = ["graph-ablation", "--smoke-test", "--phase", "tune", "--trials-per-level", "2",
         "--max-concurrent", "1",
         "--set", "steps=30", "--set", "ckpt_every=10", "--set", "eval_every=10",
         "--set", "vocab_size=300", "--set", "seq_len=32", "--set", "hidden_size=32",
         "--set", "cond_dim=16", "--set", "test_draws=0", "--set", "eval_sequences=8"]


def _study(storage, *extra: str) -> subprocess.Popen:
    # Its own session, so the local Ray cluster it starts can be cleaned up with it.
    return subprocess.Popen([sys.executable, "-m", "sedd_ray.study", *FLAGS, "--storage",
                             str(storage), *extra], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _finished(storage) -> int:
    try:
        df = read_trials(storage, "graph-ablation")
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return int(df["status"].isin(["terminated", "stopped_early"]).sum())


def test_killed_driver_resumes_and_keeps_every_trial_once(tmp_path):
    proc = _study(tmp_path)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and _finished(tmp_path) < 1:
        time.sleep(0.5)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    assert 1 <= _finished(tmp_path) < 4
    kill_session(proc)

    resumed = _study(tmp_path, "--resume")
    try:
        assert resumed.wait(timeout=600) == 0
    finally:
        if resumed.poll() is None:
            kill_session(resumed)
        else:
            try:
                os.killpg(resumed.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    df = read_trials(tmp_path, "graph-ablation")
    assert len(df) == 4 and df["trial_id"].is_unique
    assert (df["status"] == "terminated").all(), df[["trial_id", "status", "error"]]
    assert sorted(df["level"]) == ["absorb", "absorb", "uniform", "uniform"]
    assert (df["phase"] == "tune").all()  # --phase tune: no replication
    assert (df["step"] == 30).all()
