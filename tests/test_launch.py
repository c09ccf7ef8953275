"""Ray Train on a real multi-node local cluster: placement, DDP agreement, worker failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from raytools import (
    committed_steps,
    jsonl,
    launch_in_thread,
    multinode_cluster,
    node_logs,
    plain_reference,
)

from sedd_ray.launch import LaunchError, launch
from sedd_ray.layout import RunLayout, TrainerFiles

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """Three nodes with one CPU each, shared by every test of this module."""
    with multinode_cluster({"num_cpus": 1}) as c:
        yield c


def _log(dir_: Path, rank: int) -> list[dict]:
    path = dir_ / f"rank{rank}.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_workers_on_different_nodes_agree(cluster, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg = tiny_config(steps=20, ckpt_every=10, eval_every=10)
    with node_logs(logs):
        result = launch(cfg, name="spread", storage=str(tmp_path / "runs"), num_workers=2,
                        placement_strategy="STRICT_SPREAD", max_failures=0)
    r0, r1 = _log(logs, 0), _log(logs, 1)
    assert r0[0]["node"] != r1[0]["node"]  # the two ranks ran on different nodes
    assert r0[-1]["weights_sha256"] == r1[-1]["weights_sha256"]  # DDP kept them identical
    assert result["step"] == 20 and result["final"] is True
    assert result["checkpoint_dir"].endswith("ckpt-00000020")
    assert Path(result["checkpoint_dir"], "state.pt").is_file()
    # The address pinned for Ray Train's helpers is gone again: a later ray.init in this
    # process must not be sent to this cluster once it is shut down.
    assert "RAY_ADDRESS" not in os.environ


def test_killed_worker_resumes_from_checkpoint_and_matches(cluster, tmp_path):
    cfg = tiny_config(steps=300, ckpt_every=100, eval_every=100, log_every=10)
    _, reference = plain_reference(cfg, tmp_path / "plain")  # no Ray, one thread

    logs = tmp_path / "logs"
    logs.mkdir()
    runs = tmp_path / "runs"
    thread, out = launch_in_thread(cfg, name="faulty", storage=str(runs), num_workers=1,
                                   node_log=str(logs), max_failures=2)
    metrics = RunLayout(str(runs), "faulty").trainer_files().metrics
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and thread.is_alive():
        # Kill once Ray's controller has committed the step-100 checkpoint (its snapshot
        # names it): a checkpoint reported but not yet registered is lost with the worker.
        steps = [r["step"] for r in jsonl(metrics)]
        snapshot = Path(RunLayout(str(runs), "faulty").dir, "checkpoint_manager_snapshot.json")
        if 100 in committed_steps(snapshot) and steps:
            killed_after = max(steps)
            os.kill(_log(logs, 0)[0]["pid"], signal.SIGKILL)
            break
        time.sleep(0.02)
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert killed_after is not None and killed_after < cfg.train.steps, "the run was not interrupted"
    starts = [e for e in _log(logs, 0) if "start_step" in e]
    assert len(starts) == 2 and starts[1]["pid"] != starts[0]["pid"]
    resumed_at = starts[1]["start_step"]
    assert resumed_at >= 100 and killed_after - resumed_at <= cfg.train.ckpt_every
    result = out["result"]
    assert result["step"] == reference.step
    assert result["val_nll"] == reference.val_nll  # same final metrics as without the fault
    assert result["train_loss"] == json.loads(
        TrainerFiles(tmp_path / "plain").metrics.read_text().splitlines()[-1])["train_loss"]


def test_failed_run_exits_nonzero_with_the_worker_error(cluster, tmp_path, capsys, monkeypatch):
    from sedd_ray.train import main

    # The NaN drill at step 3: the cluster is already up, so it reaches the worker through
    # launch's forwarded environment.
    monkeypatch.setenv("SEDD_RAY_DRILL_NAN_AT", "3")
    rc = main(["--preset", "tiny", "--steps", "10",
               "--vocab-size", "300", "--seq-len", "32", "--max-failures", "0",
               "--storage", str(tmp_path), "--progress", "false", "--name", "nan-run"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "step 3" in err


def test_bad_settings_fail_before_any_worker_starts(cluster, tmp_path):
    with pytest.raises(LaunchError, match="not divisible by num_workers"):
        launch(tiny_config(batch_size=9), name="x", storage=str(tmp_path), num_workers=2)


def test_ray_train_console_lines_below_the_level_are_dropped(monkeypatch):
    """Ray Train logs every report (its whole metrics dict) at INFO through a logger named
    by its file path; the worker's console filter drops those and keeps everything else."""
    import logging

    import ray

    from sedd_ray import launch as launch_mod

    path = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "context.py")

    def record(name, level, pathname):
        return logging.LogRecord(name, level, pathname, 1, "msg", None, None)

    monkeypatch.delenv("SEDD_RAY_TRAIN_LOG_LEVEL", raising=False)
    f = launch_mod._BelowLevelRayTrain(logging.getLevelName(launch_mod._train_log_level()))
    assert not f.filter(record(path, logging.INFO, path))  # "Reporting training result ..."
    assert not f.filter(record("ray.train.v2.x", logging.INFO, "x.py"))
    assert f.filter(record(path, logging.WARNING, path))
    assert f.filter(record("sedd_ray.trainer", logging.INFO, "/x/sedd_ray/trainer.py"))
    monkeypatch.setenv("SEDD_RAY_TRAIN_LOG_LEVEL", "info")
    f = launch_mod._BelowLevelRayTrain(logging.getLevelName(launch_mod._train_log_level()))
    assert f.filter(record(path, logging.INFO, path))


CONNECT_ENV = r"""
import os, ray
from sedd_ray.launch import connect

@ray.remote(num_cpus=0)
def seen():
    return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

out = []
for preset in (None, "1"):
    if preset is not None:
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = preset
    connect("local")
    out.append([ray.get(seen.remote()), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")])
    ray.shutdown()
print(out)
"""


def test_a_local_cluster_runs_without_the_preemption_watcher(tmp_path):
    """A cluster that connect() starts has one node that is never drained: its processes
    (Ray Train's controllers among them) see RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0, the
    driver's own environment is left alone, and a value the user set wins."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    proc = subprocess.run([sys.executable, "-c", CONNECT_ENV], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[['0', None], ['1', '1']]"
