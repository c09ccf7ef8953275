"""cluster.yaml: Ray's own offline validation, this project's rules, and a local twin.

The first tests never start Ray: they run ``prepare_config`` + ``validate_config`` (what
``ray up`` does before it touches the cloud) and the project's rules of
:func:`sedd_ray.cluster.check`, as functions and as the command a user runs
(``python -m sedd_ray.cluster check cluster.yaml``). The ``ray``-marked test derives a ``fake_multinode``
config from cluster.yaml (same node types and custom resources, every GPU turned into a
CPU slot, the head still CPU 0), starts it on this machine with token authentication on,
runs a small study whose Train workers only fit on autoscaled nodes, and stops exactly
the processes it started (by pid: ``ray stop --force`` would also kill any other Ray
instance on a shared machine).
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from sedd_ray import cluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg() -> dict:
    return cluster.load()


def _rename(d: dict, key: str, new: str) -> None:
    d[new] = d.pop(key)


# --- Ray's own schema ----------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validation(cfg):
    prepared = cluster.validate(cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merged the common setup into head and worker setup, in order.
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        assert cmds[: len(cfg["setup_commands"])] == cfg["setup_commands"]
        assert any("scripts/setup.sh" in c for c in cmds)
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("where, key, typo", [
    ((), "idle_timeout_minutes", "idle_timout_minutes"),
    ((), "worker_start_ray_commands", "worker_start_commands"),
    (("auth",), "ssh_user", "ssh_usr"),
    (("available_node_types", "gpu_1x"), "max_workers", "max_worker"),
    (("available_node_types", "gpu_8x"), "resources", "resource"),
    (("provider", "security_group"), "IpPermissions", "IpPermission"),
])
def test_misspelled_key_fails_rays_validation(cfg, where, key, typo):
    bad = copy.deepcopy(cfg)
    node = bad
    for k in where:
        node = node[k]
    _rename(node, key, typo)
    with pytest.raises(jsonschema.ValidationError):
        cluster.validate(bad)


def test_unknown_head_node_type_fails(cfg):
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "ray.head.defualt"
    with pytest.raises(ValueError, match="head_node_type"):
        cluster.validate(bad)


@pytest.mark.parametrize("where, key, typo", [
    (("provider",), "cache_stopped_nodes", "cache_stoped_nodes"),
    (("available_node_types", "gpu_1x", "node_config"), "InstanceType", "InstanceTyp"),
    (("available_node_types", "ray.head.default", "node_config"), "IamInstanceProfile",
     "IAMInstanceProfile"),
])
def test_typos_rays_schema_misses_are_caught_by_check(cfg, where, key, typo):
    """Ray treats provider and node_config as free-form; check() has allowlists."""
    bad = copy.deepcopy(cfg)
    node = bad
    for k in where:
        node = node[k]
    _rename(node, key, typo)
    cluster.validate(bad)  # passes Ray's schema ...
    assert any(repr(typo) in p for p in cluster.check(bad))  # ... but not ours


# --- this project's rules --------------------------------------------------------------------


def test_project_rules_hold(cfg):
    assert cluster.check(cfg) == []


def test_head_hosts_the_tune_drivers_and_nothing_else(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert head.get(cluster.DRIVER_RESOURCE, 0) >= 1
    assert head.get("CPU") == 0 and head.get("GPU", 0) == 0
    assert cfg["metadata"]["sedd_ray"]["driver_resource"] == cluster.DRIVER_RESOURCE
    for name, nt in cluster.worker_types(cfg).items():
        assert cluster.DRIVER_RESOURCE not in nt["resources"], name
    bad = copy.deepcopy(cfg)
    del bad["available_node_types"][cfg["head_node_type"]]["resources"][cluster.DRIVER_RESOURCE]
    assert any(cluster.DRIVER_RESOURCE in p for p in cluster.check(bad))


def test_gpu_worker_types_autoscale(cfg):
    workers = cluster.worker_types(cfg)
    gpus = sorted(nt["resources"]["GPU"] for nt in workers.values())
    assert gpus[0] == 1 and gpus[-1] >= 8  # a 1-GPU type and an 8-GPU type
    for name, nt in workers.items():
        assert nt["resources"]["CPU"] >= nt["resources"]["GPU"], name
        assert 0 == nt["min_workers"] < nt["max_workers"] <= cfg["max_workers"], name
        assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.", nt["node_config"]["InstanceType"])
    assert cfg["idle_timeout_minutes"] > 0
    bad = copy.deepcopy(cfg)
    del bad["available_node_types"]["gpu_1x"]["resources"]["GPU"]
    assert any("GPU" in p for p in cluster.check(bad))


def test_nothing_but_ssh_is_reachable(cfg):
    sg = cfg["provider"]["security_group"]
    assert all(r["FromPort"] == r["ToPort"] == 22 for r in sg["IpPermissions"])
    for name, nt in cfg["available_node_types"].items():
        assert "SecurityGroupIds" not in nt["node_config"], name  # Ray creates the checked one
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "--ray-client-server-port" not in starts
    bad = copy.deepcopy(cfg)
    bad["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert any("more than SSH" in p for p in cluster.check(bad))


def test_token_auth_on_every_node(cfg):
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    bad = copy.deepcopy(cfg)
    bad["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                        for c in bad["worker_start_ray_commands"]]
    assert any("worker_start_ray_commands" in p for p in cluster.check(bad))


def test_setup_pins_the_project_and_its_heavy_dependencies(cfg):
    import ray

    ref = cluster.pinned_ref(cfg)
    assert ref and ref not in ("main", "master", "HEAD")
    pins = cluster.pinned_versions(cfg)
    assert pins["ray"] == ray.__version__  # the `ray up` CLI and the cluster must match
    setup_sh = (REPO / "scripts" / "setup.sh").read_text()
    torch_default = re.search(r"TORCH_VERSION:-([0-9.]+)", setup_sh).group(1)
    assert pins["torch"] == torch_default
    for bad_ref in ("main", "HEAD", "feature/x"):
        bad = copy.deepcopy(cfg)
        bad["setup_commands"] = [c.replace(f"SEDD_RAY_REF={ref};", f"SEDD_RAY_REF={bad_ref};")
                                 for c in bad["setup_commands"]]
        assert any("SEDD_RAY_REF" in p for p in cluster.check(bad)), bad_ref


def _clone_command(cfg) -> str:
    return next(c for c in cfg["setup_commands"] if "SEDD_RAY_REF=" in c)


def test_clone_command_checks_out_the_pinned_commit(cfg, tmp_path):
    """The real setup command, run against this repository at its HEAD commit."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        pytest.skip("not a git checkout with a commit")
    cmd = _clone_command(cfg)
    env = {**os.environ, "HOME": str(tmp_path)}
    # As written, the placeholder URL stops the setup with a clear message.
    r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SEDD_RAY_REPO" in r.stderr
    ref = cluster.pinned_ref(cfg)
    cmd = re.sub(r"SEDD_RAY_REPO=\S+;", f"SEDD_RAY_REPO={REPO};", cmd)
    cmd = cmd.replace(f"SEDD_RAY_REF={ref};", f"SEDD_RAY_REF={sha};")
    for _ in range(2):  # idempotent: a second `ray up` re-runs it
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "sedd-ray.version").read_text().strip() == sha
    assert (tmp_path / "sedd-ray" / "scripts" / "setup.sh").is_file()


def test_setup_commands_are_valid_bash(cfg):
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for c in cfg[key]:
            r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
            assert r.returncode == 0, (key, c, r.stderr)


def test_storage_is_s3_and_every_node_has_an_instance_profile(cfg):
    assert cfg["metadata"]["sedd_ray"]["storage"].startswith("s3://")
    for name, nt in cfg["available_node_types"].items():
        assert nt["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


# --- the command a user runs: python -m sedd_ray.cluster ----------------------------------------


def test_check_command_passes_the_repos_cluster_yaml(capsys):
    assert cluster.main(["check", str(cluster.CLUSTER_YAML)]) == 0
    out = capsys.readouterr()
    assert "passes Ray's schema and this project's rules" in out.out and out.err == ""
    assert cluster.main(["check"]) == 0  # the repo's cluster.yaml by default


def _bad_file(kind: str, cfg: dict) -> str | None:
    """The text of a broken cluster.yaml (None: no file at all)."""
    bad = copy.deepcopy(cfg)
    if kind == "missing":
        return None
    if kind == "not yaml":
        return "cluster_name: [sedd-ray\n"
    if kind == "a list":
        return "- cluster_name\n- provider\n"
    if kind == "no provider":
        del bad["provider"]
    elif kind == "schema typo":
        _rename(bad, "idle_timeout_minutes", "idle_timout_minutes")
    elif kind == "node_config typo":
        _rename(bad["available_node_types"]["gpu_1x"]["node_config"], "InstanceType", "InstanceTyp")
    elif kind == "project rule":
        del bad["available_node_types"][cfg["head_node_type"]]["resources"][cluster.DRIVER_RESOURCE]
    return yaml.safe_dump(bad)


@pytest.mark.parametrize("kind, match", [
    ("missing", "No such file"),
    ("not yaml", "expected ',' or ']'"),
    ("a list", "not a YAML mapping"),
    ("no provider", "provider.type is missing"),
    ("schema typo", "'idle_timout_minutes' was unexpected"),
    ("node_config typo", "gpu_1x.node_config: unknown key 'InstanceTyp'"),
    ("project rule", "must declare the custom resource 'sedd_driver'"),
])
def test_check_command_refuses_a_bad_file_with_one_error_line(kind, match, cfg, tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    text = _bad_file(kind, cfg)
    if text is not None:
        path.write_text(text)
    assert cluster.main(["check", str(path)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), out.err
    assert match in lines[0] and out.out == ""


def test_check_command_as_a_process(cfg, tmp_path):
    """What a user types: nothing but one line on stderr (Ray's INFO lines kept out)."""
    cmd = [sys.executable, "-m", "sedd_ray.cluster", "check"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([*cmd, str(cluster.CLUSTER_YAML)], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert ok.stdout.strip().endswith("passes Ray's schema and this project's rules")
    bad = tmp_path / "cluster.yaml"
    bad.write_text(_bad_file("schema typo", cfg))
    r = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_fake_command_writes_the_twin_and_how_to_start_it(cfg, tmp_path, capsys):
    from ray.autoscaler._private.util import validate_config

    out = tmp_path / "fake.yaml"
    assert cluster.main(["fake", str(cluster.CLUSTER_YAML), "-o", str(out),
                         "--gcs-address", "10.0.0.5:6390"]) == 0
    fake = cluster.load(out)
    assert fake == cluster.fake_multinode_config(cfg, gcs_address="10.0.0.5:6390")
    validate_config(fake)
    printed = capsys.readouterr().out
    start = printed.splitlines()[-1].split()
    assert start[:4] == ["RAY_FAKE_CLUSTER=1", "ray", "start", "--head"]
    assert {"--port=6390", "--node-ip-address=10.0.0.5", f"--autoscaling-config={out}",
            "--num-cpus=0", "--num-gpus=0"} <= set(start)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_bad_file("schema typo", cfg))
    assert cluster.main(["fake", str(bad), "-o", str(tmp_path / "f2.yaml")]) == 2
    assert not (tmp_path / "f2.yaml").exists()


# --- the fake_multinode twin -----------------------------------------------------------------


def test_fake_config_mirrors_cluster_yaml(cfg):
    from ray.autoscaler._private.util import validate_config

    fake = cluster.fake_multinode_config(cfg, gcs_address="127.0.0.1:6390")
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["provider"]["gcs_address"] == "127.0.0.1:6390"
    real_workers = cluster.worker_types(cfg)
    fake_workers = cluster.worker_types(fake)
    assert set(fake_workers) == set(real_workers)
    for name, nt in real_workers.items():
        res = fake_workers[name]["resources"]
        assert res["CPU"] == nt["resources"]["GPU"] and "GPU" not in res  # 1 GPU -> 1 CPU slot
        custom = {k: v for k, v in nt["resources"].items() if k not in ("CPU", "GPU")}
        assert custom.items() <= res.items()
        assert 1 <= fake_workers[name]["max_workers"] <= nt["max_workers"]
    head = fake["available_node_types"][fake["head_node_type"]]["resources"]
    assert head == cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert cluster.head_start_args(fake)[:2] == ["--num-cpus=0", "--num-gpus=0"]


# --- a study on the fake cluster ---------------------------------------------------------------

STUDY = "fake_cluster"
FIXED = {"steps": 10, "eval_every": 10, "ckpt_every": 10, "log_every": 5}

# The study's driver runs in its own process, as `python experiments/... --address auto`
# does on the head: sedd_ray.study.run_study, 2 trials of 1 Train worker each, 2 at a time.
DRIVER = textwrap.dedent('''
    import json, sys
    import ray
    from sedd_ray.results import read_trials
    from sedd_ray.study import StudySpec, run_study

    storage, study, fixed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ray.init()  # RAY_ADDRESS points at the fake cluster
    head = ray.get_runtime_context().get_node_id()
    alive = lambda: [n for n in ray.nodes() if n["Alive"]]
    out = {"head": head, "before": len(alive())}
    spec = StudySpec(name=study, base="smoke", fixed=fixed, num_trials=2, num_workers=1,
                     cpus_per_worker=1, max_concurrent=2, max_failures=0)
    run_study(spec, storage, verbose=0)
    nodes = alive()
    out["after"] = len(nodes)
    out["worker_cpus"] = sorted(n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] != head)
    out["trials"] = [{"status": r["status"], "step": int(r["step"])}
                     for r in read_trials(storage, spec.name).to_dict("records")]
    from ray.util.state import list_actors
    placed = {}
    for a in list_actors(detail=True, limit=10000, raise_on_missing_output=False):
        placed.setdefault(a.class_name, []).append(a.node_id)
    out["actors"] = placed
    print("RESULT " + json.dumps(out), flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time, command line) of every process (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out[int(d)] = (int(fields[1]), int(fields[19]), cmd)
        except (OSError, IndexError, ValueError):
            pass
    return out


class _Tracker:
    """Every process of our cluster: descendants of the `ray start --block` process, or
    anything naming our private temp dir. Polled in the background so that processes
    orphaned later (a fake node outliving its monitor) are still known by pid."""

    def __init__(self, root: int, marker: str) -> None:
        self.root, self.marker = root, marker
        self.known: dict[int, int] = {}  # pid -> start time (so a reused pid is not ours)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def scan(self) -> None:
        procs = _procs()
        ours = {self.root} | {p for p in self.known if p in procs}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, cmd) in procs.items():
                if pid not in ours and (ppid in ours or self.marker in cmd):
                    ours.add(pid)
                    grew = True
        for pid in ours:
            if pid in procs:
                self.known.setdefault(pid, procs[pid][1])

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.scan()

    def alive(self) -> list[int]:
        procs = _procs()
        return [p for p, st in self.known.items() if p in procs and procs[p][1] == st]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _stop_cluster(root: subprocess.Popen, tracker: _Tracker, marker: str) -> list[str]:
    """SIGTERM the head (`ray start --block` stops its own processes), then the rest of
    our processes, SIGKILL what is left; returns what could not be stopped."""
    tracker.scan()
    tracker.stop()
    if root.poll() is None:
        root.send_signal(signal.SIGTERM)
        try:
            root.wait(20)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
        pids = tracker.alive()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while tracker.alive() and time.time() < deadline:
            time.sleep(0.2)
    if root.poll() is None:
        root.kill()
        root.wait(5)
    left = [f"{pid} {cmd[:120]}" for pid, (_, _, cmd) in _procs().items()
            if pid in tracker.alive() or marker in cmd]
    return left


@pytest.mark.ray
@pytest.mark.slow
def test_fake_cluster_autoscales_gpu_workers_for_a_study(cfg, tmp_path_factory):
    import ray._private.services as services

    from sedd_ray.config import apply_params, preset
    from sedd_ray.data import load_data
    from sedd_ray.study import DRIVER_RESOURCE

    assert DRIVER_RESOURCE == cluster.DRIVER_RESOURCE  # what study.py asks for is on the head
    # A short private temp dir (Ray's socket paths must stay under 107 bytes) that names
    # every process of this cluster, and private ports: other Ray instances may be running.
    tmp = Path(tempfile.mkdtemp(prefix="sedd-fk-", dir="/tmp"))
    storage = tmp_path_factory.mktemp("cluster-study")
    ip = services.get_node_ip_address()
    port = _free_port()
    gcs = f"{ip}:{port}"
    fake = cluster.fake_multinode_config(cfg, gcs_address=gcs)
    (tmp / "fake.yaml").write_text(json.dumps(fake))
    token = tmp / "auth_token"  # the cluster's token, as file_mounts distributes it
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update({
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        # Every process (the driver, Train's placement-group cleaner...) resolves its
        # address to this cluster, never to another Ray instance on the same machine.
        "RAY_ADDRESS": gcs,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    })
    ray_bin = str(Path(sys.executable).parent / "ray")
    head_log = open(tmp / "head.log", "w")
    t0 = time.time()
    root = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--temp-dir={tmp}/r", f"--port={port}",
         f"--node-ip-address={ip}", f"--dashboard-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}",
         f"--autoscaling-config={tmp / 'fake.yaml'}", *cluster.head_start_args(fake)],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    tracker = _Tracker(root.pid, str(tmp))
    driver_out, proc = "", None
    try:
        # While the head starts: the trials' data, in the shared cache (SEDD_RAY_CACHE),
        # so that the two trial drivers do not both build it.
        run_cfg = apply_params(preset("smoke"), FIXED).validate()
        load_data(run_cfg.data)
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            assert root.poll() is None, (tmp / "head.log").read_text()[-3000:]
            assert time.time() - t0 < 120, "the head did not start in 120 s"
            time.sleep(0.5)
        t_head = time.time() - t0
        (tmp / "driver.py").write_text(DRIVER)
        proc = subprocess.run([sys.executable, str(tmp / "driver.py"), str(storage), STUDY, json.dumps(FIXED)],
                              env=env, capture_output=True, text=True, timeout=420)
        driver_out = proc.stdout + proc.stderr
        (tmp / "driver.log").write_text(driver_out)
        t_study = time.time() - t0 - t_head
    finally:
        left = _stop_cluster(root, tracker, str(tmp))
        head_log.close()
    line = next((ln for ln in driver_out.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"{driver_out[-6000:]}\n(logs in {tmp})"
    out = json.loads(line[len("RESULT "):])
    print(f"head up {t_head:.1f} s, study {t_study:.1f} s, total {time.time() - t0:.1f} s; nodes "
          f"{out['before']} -> {out['after']} (worker CPU slots {out['worker_cpus']})")
    assert left == [], f"processes left running: {left}"

    assert out["before"] == 1  # only the head (CPU 0) at the start ...
    assert out["after"] > out["before"]  # ... the autoscaler added worker nodes
    assert len(out["trials"]) == 2
    assert all(t["status"] == "terminated" and t["step"] == FIXED["steps"] for t in out["trials"]), out
    # Train workers ran on autoscaled nodes, the per-trial drivers on the head.
    workers = out["actors"].get("RayTrainWorker", [])
    assert len(workers) == 2 and out["head"] not in workers, out["actors"]
    drivers = out["actors"].get("ImplicitFunc", [])  # Tune's actor for a function trainable
    assert len(drivers) == 2 and set(drivers) == {out["head"]}, out["actors"]
    assert set(out["actors"].get("TrainController", [])) == {out["head"]}, out["actors"]
    if not os.environ.get("SEDD_CLUSTER_TEST_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)  # kept on failure: head.log, driver.log, r/
