"""Requests the cluster cannot meet are refused before anything starts, in one line.

The packing and wording are checked on made-up nodes (no Ray). Then, on ONE real local
cluster of 2 CPUs shared by the module: more workers than CPUs, a GPU on a machine
without one, a custom resource nobody has, a study whose single trial cannot fit and a
study whose concurrent trials cannot - each one ``error:`` line, exit code 2, no
traceback, nothing written, no Train worker or trial started. Last, a simulated
autoscaling cluster (Ray's ``fake_multinode`` provider, one node type of 1 CPU up to 2
nodes): a run that fits only after scaling up waits and then runs; one that never fits is
refused at once.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sedd_ray import preflight
from sedd_ray.layout import RunLayout
from sedd_ray.preflight import STUDY_FLAGS, Ask, Capacity, ResourceError, explain

# --- packing and wording, no Ray ----------------------------------------------------------


@pytest.mark.parametrize("ask, nodes, line", [
    (Ask(4, {"CPU": 1}), [{"CPU": 2}],
     "4 workers x 1 CPU need 4 CPUs; this cluster has 2 (here). Use --num-workers 2, or "
     "--address to join a bigger cluster"),
    (Ask(1, {"CPU": 1, "GPU": 1}), [{"CPU": 2}],
     "1 worker x (1 CPU, 1 GPU) needs 1 GPU; this cluster has 0 (here). Use "
     "--gpus-per-worker 0, or --address to join a cluster with GPUs"),
    (Ask(1, {"CPU": 1, "tpu": 1}), [{"CPU": 2}],
     "1 worker x (1 CPU, 1 tpu) needs 1 'tpu'; this cluster has 0 (here). No node has "
     "'tpu': drop it from --worker-resources, or use --address to join a cluster whose "
     "nodes declare it"),
    (Ask(1, {"CPU": 3}), [{"CPU": 2}, {"CPU": 2}],
     "1 worker x 3 CPU: one worker needs 3 CPUs on one node; the largest node of this "
     "cluster has 2 (here). Use --cpus-per-worker 2, or --address to join a bigger cluster"),
    (Ask(2, {"CPU": 1}, strategy="STRICT_SPREAD"), [{"CPU": 2}],
     "2 workers x 1 CPU do not fit on the nodes of this cluster (here: 1 nodes, one worker "
     "per node). Use --num-workers 1, or --address to join a bigger cluster"),
    (Ask(1, {"CPU": 1}, trials=3, driver={"CPU": 0, "sedd_driver": 0.001}, flags=STUDY_FLAGS),
     [{"CPU": 2, "sedd_driver": 1000}],
     "3 trials x 1 worker x 1 CPU need 3 CPUs; this cluster has 2 (here). Use "
     "--max-concurrent 2, or --address to join a bigger cluster"),
    (Ask(2, {"CPU": 1}, flags=STUDY_FLAGS), [{"CPU": 1}],
     "2 workers x 1 CPU need 2 CPUs; this cluster has 1 (here). Use --workers-per-trial 1, "
     "or --address to join a bigger cluster"),
])
def test_what_does_not_fit_says_what_was_asked_what_there_is_and_the_fix(ask, nodes, line):
    assert explain(ask, nodes, "here") == line


@pytest.mark.parametrize("ask, nodes", [
    (Ask(2, {"CPU": 1}), [{"CPU": 2}]),
    (Ask(2, {"CPU": 1}, strategy="STRICT_SPREAD"), [{"CPU": 1}, {"CPU": 1}]),
    (Ask(2, {"CPU": 1, "GPU": 0}), [{"CPU": 1}, {"CPU": 1}]),  # a zero ask is no ask
    (Ask(1, {"CPU": 2}, trials=2, driver={"sedd_driver": 0.001}),
     [{"CPU": 2, "sedd_driver": 1}, {"CPU": 2}]),
])
def test_what_fits_is_not_refused(ask, nodes):
    assert explain(ask, nodes, "here") is None


def test_a_fixed_cluster_refuses_at_once_and_an_autoscaling_one_by_its_largest_size():
    ask = Ask(2, {"CPU": 1})
    head = [{"CPU": 0, "sedd_driver": 1}]
    with pytest.raises(ResourceError, match=r"this cluster has 0 \(fixed\)"):
        preflight.check(ask, capacity=Capacity(head, head, False, "fixed"))
    grown = head + [{"CPU": 1}]  # at most one 1-CPU node: two workers never fit
    with pytest.raises(ResourceError, match=r"this cluster has 1 \(autoscaling: w up to 1\)"):
        preflight.check(ask, capacity=Capacity(head, grown, True, "autoscaling: w up to 1"))
    preflight.check(ask, capacity=Capacity(head + [{"CPU": 2}], None, True, "autoscaling"))


# --- one real local cluster (2 CPUs, no GPU) ------------------------------------------------

TINY = ["--preset", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
        "--steps", "4", "--eval-every", "2", "--ckpt-every", "2", "--eval-sequences", "8",
        "--eval-draws", "2", "--test-draws", "0", "--sample-count", "1", "--sample-length",
        "16", "--sample-steps", "4", "--progress", "false", "--hidden-size", "32",
        "--cond-dim", "16", "--n-heads", "2", "--n-layers", "1"]
STUDY = ["--smoke-test", "--set", "vocab_size=300", "--set", "seq_len=32"]


@pytest.fixture(scope="module")
def local_cluster():
    """What connect() starts for a user on a laptop: one node, 2 CPUs, no GPU."""
    import ray

    from sedd_ray.study import DRIVER_RESOURCE

    ray.init(num_cpus=2, num_gpus=0, resources={DRIVER_RESOURCE: 1000})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail if a Train run or a Tune study is built."""
    from sedd_ray import launch, study

    def boom(*a, **k):
        raise AssertionError("a Train run or a study was started")

    monkeypatch.setattr(launch, "_torch_trainer", boom)
    monkeypatch.setattr(study, "_new_tuner", boom)


def _refused(capfd, main, argv) -> str:
    rc = main(argv)
    captured = capfd.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert rc == 2, captured.err[-3000:]
    assert len(errors) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert "waiting for the autoscaler" not in captured.out  # refused, not waited for
    return errors[0]


@pytest.mark.ray
@pytest.mark.parametrize("flags, line", [
    (["--num-workers", "4"],
     "error: 4 workers x 1 CPU need 4 CPUs; this cluster has 2 (local). Use --num-workers 2, "
     "or --address to join a bigger cluster"),
    (["--gpus-per-worker", "1"],
     "error: 1 worker x (1 CPU, 1 GPU) needs 1 GPU; this cluster has 0 (local). Use "
     "--gpus-per-worker 0, or --address to join a cluster with GPUs"),
    (["--worker-resources", "tpu=1"],
     "error: 1 worker x (1 CPU, 1 tpu) needs 1 'tpu'; this cluster has 0 (local). No node "
     "has 'tpu': drop it from --worker-resources, or use --address to join a cluster whose "
     "nodes declare it"),
])
def test_a_run_the_cluster_cannot_hold_is_refused(local_cluster, nothing_starts, flags, line,
                                                  tmp_path, capfd):
    from sedd_ray import train

    storage = tmp_path / "runs"
    assert _refused(capfd, train.main, [*TINY, "--storage", str(storage), *flags]) == line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
@pytest.mark.parametrize("flags, line", [
    (["--cpus-per-worker", "3"],
     "error: 1 worker x 3 CPU needs 3 CPUs; this cluster has 2 (local). Use "
     "--cpus-per-worker 2, or --address to join a bigger cluster"),
    (["--workers-per-trial", "4"],
     "error: 4 workers x 1 CPU need 4 CPUs; this cluster has 2 (local). Use "
     "--workers-per-trial 2, or --address to join a bigger cluster"),
    (["--max-concurrent", "3"],
     "error: 3 trials x 1 worker x 1 CPU need 3 CPUs; this cluster has 2 (local). Use "
     "--max-concurrent 2, or --address to join a bigger cluster"),
])
def test_a_study_whose_trials_cannot_fit_is_refused(local_cluster, nothing_starts, flags, line,
                                                    tmp_path, capfd):
    from sedd_ray import study

    storage = tmp_path / "results"
    argv = ["search", *STUDY, "--set", "batch_size=8", "--storage", str(storage), *flags]
    assert _refused(capfd, study.main, argv) == line
    assert list(tmp_path.iterdir()) == []  # no study folder, no trial recorded


def _experiment(name: str):
    """``experiments/<name>.py`` as a module (the repo root on the path while importing)."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        return importlib.import_module(f"experiments.{name}")
    finally:
        sys.path.pop(0)


@pytest.mark.ray
def test_the_same_through_an_experiment_script(local_cluster, nothing_starts, tmp_path, capfd):
    ablate_graph = _experiment("ablate_graph")
    line = _refused(capfd, ablate_graph.main, [*STUDY, "--gpus-per-trial", "1",
                                               "--storage", str(tmp_path / "results")])
    assert line == ("error: 1 worker x (1 CPU, 1 GPU) needs 1 GPU; this cluster has 0 (local). "
                    "Use --gpus-per-trial 0, or --address to join a cluster with GPUs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_evaluation_tasks_and_sweep_trials_no_node_can_hold_are_refused(local_cluster, tmp_path,
                                                                       capfd, monkeypatch):
    """``evaluate --ray --gpus-per-task 1`` and ``sweep_sampler.py --gpus-per-trial 1`` on a
    machine without a GPU: one line each, no task or trial started, no row written."""
    from sedd_ray import evaluate

    sweep_sampler = _experiment("sweep_sampler")
    ckpt = evaluate.smoke_checkpoint(str(tmp_path))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = _refused(capfd, evaluate.main, ["--checkpoint", ckpt, "--corpus",
                                           "markov:vocab=8,order=1,sharpness=2", "--ray",
                                           "--gpus-per-task", "1", "--blocks", "4"])
    assert line == ("error: 1 task x (1 CPU, 1 GPU) needs 1 GPU; this cluster has 0 (local). "
                    "Use --gpus-per-task 0, or --address to join a cluster with GPUs")
    import ray

    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the sweep's own; keep this module's cluster
    line = _refused(capfd, sweep_sampler.main, ["--checkpoint", ckpt, "--steps", "2",
                                                "--samples", "2", "--cpus-per-trial", "3"])
    assert line == ("error: 1 trial x 3 CPU needs 3 CPUs; this cluster has 2 (local). "
                    "Use --cpus-per-trial 2, or --address to join a bigger cluster")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- a simulated autoscaling cluster -----------------------------------------------------------

DRIVER = textwrap.dedent('''
    import contextlib, io, json, sys, time
    import ray
    from ray.experimental.internal_kv import _internal_kv_get
    from sedd_ray import train

    storage, flags = sys.argv[1], json.loads(sys.argv[2])
    ray.init()  # RAY_ADDRESS points at the fake cluster
    deadline = time.time() + 60
    while _internal_kv_get("__autoscaling_status") is None and time.time() < deadline:
        time.sleep(0.5)  # the autoscaler's first report: until then the cluster looks fixed
    out = {}
    for name, extra in (("never", ["--num-workers", "4"]),
                        ("grows", ["--num-workers", "1", "--resource-timeout", "180"])):
        err, std = io.StringIO(), io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            rc = train.main([*flags, "--storage", storage, "--name", name, *extra])
        out[name] = {"rc": rc, "err": err.getvalue(), "out": std.getvalue(),
                     "seconds": time.time() - t0,
                     "nodes": sum(1 for n in ray.nodes() if n["Alive"])}
    print("RESULT " + json.dumps(out), flush=True)
''')


@pytest.mark.ray
@pytest.mark.slow
def test_autoscaling_cluster_waits_for_what_fits_after_scaling_and_refuses_what_never_fits(
        tmp_path_factory):
    import ray._private.services as services
    from test_cluster import _free_port, _stop_cluster, _Tracker

    from sedd_ray import cluster

    fake = cluster.fake_multinode_config(cluster.load())
    types = fake["available_node_types"]
    small = min(cluster.worker_types(fake), key=lambda n: types[n]["resources"]["CPU"])
    for name in list(cluster.worker_types(fake)):  # one worker type: 1 CPU, up to 2 nodes
        if name != small:
            del types[name]
    types[small].update(max_workers=2)
    types[small]["resources"]["CPU"] = 1
    fake["max_workers"] = 2
    tmp = Path(tempfile.mkdtemp(prefix="sedd-pf-", dir="/tmp"))  # short: Ray's socket paths
    storage = tmp_path_factory.mktemp("preflight-runs")
    ip = services.get_node_ip_address()
    port = _free_port()
    fake["provider"]["gcs_address"] = f"{ip}:{port}"
    (tmp / "fake.yaml").write_text(json.dumps(fake))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_ADDRESS": f"{ip}:{port}", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    head_log = open(tmp / "head.log", "w")
    root = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--temp-dir={tmp}/r", f"--port={port}", f"--node-ip-address={ip}",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={_free_port()}",
         f"--autoscaling-config={tmp / 'fake.yaml'}", *cluster.head_start_args(fake)],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    tracker = _Tracker(root.pid, str(tmp))
    flags = [*TINY, "--steps", "2", "--max-failures", "0"]
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            assert root.poll() is None and time.time() < deadline, (tmp / "head.log").read_text()
            time.sleep(0.5)
        (tmp / "driver.py").write_text(DRIVER)
        proc = subprocess.run([sys.executable, str(tmp / "driver.py"), str(storage),
                               json.dumps(flags)], env=env, capture_output=True, text=True,
                              timeout=420)
    finally:
        left = _stop_cluster(root, tracker, str(tmp))
        head_log.close()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-6000:]
    assert left == [], f"processes left running: {left}"
    out = json.loads(line[len("RESULT "):])
    never, grows = out["never"], out["grows"]
    # Never fits (4 CPUs; the largest this cluster can become has 2): refused at once.
    assert never["rc"] == 2, never
    assert never["err"].strip().splitlines() == [
        f"error: 4 workers x 1 CPU need 4 CPUs; this cluster has 2 (autoscaling: {small} up "
        "to 2). Use --num-workers 2, or --address to join a bigger cluster"]
    assert "waiting for the autoscaler" not in never["out"]
    assert not (storage / "never").exists()
    # Fits after one node is added: one progress line, then the run.
    assert grows["rc"] == 0, grows
    waits = [ln for ln in grows["out"].splitlines() if ln.startswith("waiting for the autoscaler")]
    assert waits == ["waiting for the autoscaler: 1 worker x 1 CPU pending (the cluster has "
                     "0 CPUs now); giving up after 180 s (--resource-timeout)"], grows["out"]
    assert grows["nodes"] >= 2  # the head and at least one autoscaled node
    assert '"step": 2' in grows["out"] and Path(RunLayout(str(storage), "grows").trainer_dir).is_dir()
    if not os.environ.get("SEDD_CLUSTER_TEST_KEEP"):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # kept on failure: head.log, r/
