"""Before a Train run or a study starts: can the cluster ever give it what it asks for?

    ask = Ask(workers=4, per_worker={"CPU": 1}, flags=TRAIN_FLAGS)
    check(ask, timeout_s=600)   # returns, waits for the autoscaler, or raises ResourceError

Ray itself would wait: a request larger than the cluster leaves Ray Train's worker group
pending until its start-up timeout (60 s), then it retries, with a traceback each time.
Here the ask (workers x resources per worker, and for a study the concurrent trials and
their drivers) is packed onto the nodes the cluster has, or can have:

- **fixed size** (a local cluster, or one without an autoscaler): what does not fit on the
  nodes alive now never will; :class:`ResourceError` at once, one line with what was
  asked, what the cluster has and the fix.
- **autoscaling**: the largest cluster is the alive nodes plus every worker node type at
  its ``max_workers``. Read from the GCS cluster config (autoscaler v2, KubeRay) or else
  from the v1 autoscaler's own config file (the ``--autoscaling-config`` of its monitor
  process on this machine, or ``~/ray_bootstrap_config.yaml`` where ``ray up`` puts it).
  What does not fit even there is refused at once; what fits there but not on the nodes
  alive now is asked of the autoscaler (``request_resources``) and waited for, with one
  progress line, for at most ``timeout_s`` (``--resource-timeout``). When the node types
  cannot be read, nothing is refused: the wait decides.

Packing is first-fit decreasing, one bundle (a worker, a trial driver) per node slot,
``STRICT_SPREAD`` one worker per node. It is an upper bound of what Ray can place (the
alive nodes' totals, not what is free now: other jobs finish), so a refusal is certain.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sedd_ray.config import ConfigError

# --resource-timeout's default: a cloud GPU node takes minutes to boot and set up.
DEFAULT_RESOURCE_TIMEOUT_S = 900.0
# The command-line flag of each part of a request, for the fix in the error line.
TRAIN_FLAGS = {"workers": "--num-workers", "CPU": "--cpus-per-worker", "GPU": "--gpus-per-worker",
               "resources": "--worker-resources"}
STUDY_FLAGS = {"workers": "--workers-per-trial", "CPU": "--cpus-per-worker",
               "GPU": "--gpus-per-trial", "trials": "--max-concurrent"}
TASK_FLAGS = {"workers": "--workers", "CPU": "--cpus-per-task", "GPU": "--gpus-per-task"}
# Node types whose max_workers is unlimited (-1) count as this many nodes.
_UNLIMITED = 10_000
_EPS = 1e-9


class ResourceError(ConfigError):
    """The cluster cannot (or did not in time) provide what a run or study asks for."""


@dataclass(frozen=True)
class Ask:
    """What a run (``trials=1``, no driver) or a study asks of the cluster."""

    workers: int
    per_worker: Mapping[str, float]
    trials: int = 1
    driver: Mapping[str, float] = field(default_factory=dict)  # per trial (a study)
    strategy: str = "PACK"
    flags: Mapping[str, str] = field(default_factory=lambda: dict(TRAIN_FLAGS))
    unit: str = "worker"  # what one bundle is called in the error line ("task", "trial")

    def bundles(self) -> list[dict[str, float]]:
        worker = {k: float(v) for k, v in self.per_worker.items() if v}
        driver = {k: float(v) for k, v in self.driver.items() if v}
        return [worker] * (self.workers * self.trials) + ([driver] * self.trials if driver else [])

    def describe(self) -> str:
        """``4 workers x 1 CPU``; ``2 trials x 1 worker x (1 CPU, 1 GPU)``."""
        parts = [f"{_num(v)} {k}" for k, v in self.per_worker.items() if v]
        each = (parts[0] if len(parts) == 1 else f"({', '.join(parts)})") if parts else "nothing"
        text = f"{self.workers} {self.unit}{'s' * (self.workers != 1)} x {each}"
        return f"{self.trials} trials x {text}" if self.trials > 1 else text


@dataclass(frozen=True)
class Capacity:
    """The nodes alive now and the most the cluster can have (None: unknown)."""

    now: list[dict[str, float]]
    most: list[dict[str, float]] | None
    autoscaling: bool
    where: str  # "local", "3 nodes, fixed size", "autoscaling: gpu_1x up to 8"


def check(ask: Ask, *, timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
          capacity: Capacity | None = None) -> None:
    """Return when ``ask`` fits the cluster (waiting for the autoscaler if it must); raise
    :class:`ResourceError` with one line when it never can, or not within ``timeout_s``.
    For a study (``trials > 1``) every concurrent trial must fit the largest cluster, and
    one trial the nodes alive before it starts. Needs a connected Ray; through Ray Client
    (``ray://``), whose driver cannot read the GCS, nothing is checked."""
    if capacity is None and _through_ray_client():
        return
    cap = capacity or cluster_capacity()
    if cap.most is not None:
        problem = explain(ask, cap.most, cap.where)
        if problem:
            raise ResourceError(problem)
    first = replace(ask, trials=1)
    if cap.autoscaling and _unplaced(first, cap.now):
        _wait_for_autoscaler(first, timeout_s)


def check_task(cpus: float, gpus: float, *, cpu_flag: str = "--cpus-per-task",
               gpu_flag: str = "--gpus-per-task", unit: str = "task",
               timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S) -> None:
    """:func:`check` for one Ray task or Tune trial of ``cpus`` CPUs and ``gpus`` GPUs
    (``evaluate --all-trials``, the sampler sweep): a task no node can ever hold is one
    :class:`ResourceError` line naming the flag, not a task pending forever."""
    flags = {**TASK_FLAGS, "CPU": cpu_flag, "GPU": gpu_flag}
    check(Ask(1, {"CPU": cpus, "GPU": gpus}, flags=flags, unit=unit), timeout_s=timeout_s)


def explain(ask: Ask, nodes: list[dict[str, float]], where: str) -> str | None:
    """Why ``ask`` does not fit on ``nodes`` (one line with the fix), or None if it fits."""
    if _unplaced(ask, nodes) == 0:
        return None
    verb = "needs" if ask.workers * ask.trials == 1 else "need"
    for res, per in ask.per_worker.items():
        need, have = per * ask.workers * ask.trials, sum(n.get(res, 0.0) for n in nodes)
        if per and need > have + _EPS:
            return (f"{ask.describe()} {verb} {_amount(need, res)}; this cluster has "
                    f"{_num(have)} ({where}). {_fix(ask, nodes, res, have)}")
    biggest = {res: max((n.get(res, 0.0) for n in nodes), default=0.0) for res in ask.per_worker}
    for res, per in ask.per_worker.items():
        if per > biggest[res] + _EPS:
            return (f"{ask.describe()}: one {ask.unit} needs "
                    f"{_amount(per, res)} on one node; the largest node of this cluster has "
                    f"{_num(biggest[res])} ({where}). {_fix(ask, nodes, res, biggest[res])}")
    return (f"{ask.describe()} do not fit on the nodes of this cluster ({where}: "
            f"{len(nodes)} nodes, {_strategy_note(ask)}). {_fix(ask, nodes, None, 0.0)}")


def _fix(ask: Ask, nodes: list[dict[str, float]], res: str | None, have: float) -> str:
    """The change that makes ``ask`` fit: fewer trials, fewer workers, or less per worker."""
    flags = ask.flags
    if ask.trials > 1:
        fits = _most_that_fit(ask, nodes, "trials")
        if fits:
            return f"Use {flags['trials']} {fits}, or --address to join a bigger cluster"
    fits = _most_that_fit(replace(ask, trials=1), nodes, "workers")
    if fits:
        return f"Use {flags['workers']} {fits}, or --address to join a bigger cluster"
    if res is None:
        return "Ask for less per worker, or use --address to join a bigger cluster"
    if res not in flags:
        where = flags.get("resources", "the request")
        return (f"No node has {res!r}: drop it from {where}, or use --address to join a "
                f"cluster whose nodes declare it")
    if have <= 0:
        return f"Use {flags[res]} 0, or --address to join a cluster with {res}s"
    return f"Use {flags[res]} {_num(have)}, or --address to join a bigger cluster"


def _most_that_fit(ask: Ask, nodes: list[dict[str, float]], what: str) -> int:
    for n in range(getattr(ask, what) - 1, 0, -1):
        if _unplaced(replace(ask, **{what: n}), nodes) == 0:
            return n
    return 0


def _unplaced(ask: Ask, nodes: list[dict[str, float]]) -> int:
    """How many of ``ask``'s bundles first-fit decreasing cannot place on ``nodes`` (0 = all
    fit). ``STRICT_SPREAD`` (a single run) places at most one worker per node."""
    free = [dict(n) for n in nodes]
    taken: set[int] = set()
    spread = ask.strategy == "STRICT_SPREAD" and ask.trials == 1
    bundles, n_workers = ask.bundles(), ask.workers * ask.trials
    workers, drivers = bundles[:n_workers], bundles[n_workers:]
    left = 0
    for bundle, is_worker in [(b, True) for b in workers] + [(b, False) for b in drivers]:
        for i, node in enumerate(free):
            if spread and is_worker and i in taken:
                continue
            if all(node.get(k, 0.0) + _EPS >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                if is_worker:
                    taken.add(i)
                break
        else:
            left += 1
    return left


def _strategy_note(ask: Ask) -> str:
    return "one worker per node" if ask.strategy == "STRICT_SPREAD" else "workers packed"


def _wait_for_autoscaler(ask: Ask, timeout_s: float, poll_s: float = 1.0) -> None:
    """Ask the autoscaler for ``ask``'s bundles and wait until the alive nodes hold them."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=ask.bundles())
    have = _total(alive_nodes())
    print(f"waiting for the autoscaler: {ask.describe()} pending (the cluster has "
          f"{_summary(have, ask)} now); giving up after {timeout_s:.0f} s (--resource-timeout)",
          flush=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if _unplaced(ask, alive_nodes()) == 0:
                return
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # no standing floor: idle nodes may go again
    raise ResourceError(
        f"{ask.describe()} still pending after {timeout_s:.0f} s: the autoscaler did not add "
        f"the nodes (the cluster has {_summary(_total(alive_nodes()), ask)}). See `ray status`; "
        f"raise --resource-timeout, or ask for less")


# --- what the cluster has, and can have ----------------------------------------------------

def _through_ray_client() -> bool:
    from ray.util.client import ray as client

    return client.is_connected()


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def cluster_capacity() -> Capacity:
    """The connected cluster: its alive nodes, and its largest size when it autoscales."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    now = [dict(n["Resources"]) for n in alive]
    types = autoscaler_node_types()
    if types is None:
        alone = len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()
        return Capacity(now, now, False, "local" if alone else f"{len(now)} nodes, fixed size")
    if not types:  # an autoscaler whose node types we cannot read: only the wait decides
        return Capacity(now, None, True, "autoscaling")
    most = now + [dict(res) for _, res, count in types for _ in range(count)]
    where = "autoscaling: " + ", ".join(f"{name} up to {count}" for name, _, count in types)
    return Capacity(now, most, True, where)


def autoscaler_node_types() -> list[tuple[str, dict[str, float], int]] | None:
    """``[(node type, resources, max_workers)]`` of the worker node types the autoscaler
    may add; ``None`` when the cluster has no autoscaler (or only Ray's read-only one, which
    every ``ray start`` head without ``--autoscaling-config`` and every local cluster
    runs), ``[]`` when it has one whose node types cannot be read from here."""
    from ray._private.state import state

    config = state.get_cluster_config()  # autoscaler v2 and KubeRay report it to the GCS
    if config is not None and config.node_group_configs:
        return [(g.name, {k: float(v) for k, v in g.resources.items()},
                 _UNLIMITED if g.max_count < 0 else g.max_count)
                for g in config.node_group_configs if g.max_count != 0]
    status = _autoscaler_status()
    if status is None:
        return None
    monitor_args = _monitor_args(status)
    path = _config_arg(monitor_args)
    if path is None and (monitor_args or _read_only_report(status)):
        return None  # Ray's read-only autoscaler: it reports, it never adds a node
    bootstrap = Path(os.path.expanduser("~/ray_bootstrap_config.yaml"))  # where `ray up` puts it
    path = path or (bootstrap if bootstrap.is_file() else None)
    return [] if path is None else _node_types_of(path)


def _autoscaler_status() -> dict[str, Any] | None:
    """The v1 autoscaler's status report in the GCS (None: no autoscaler runs)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def _monitor_args(status: Mapping[str, Any]) -> list[str]:
    """The command line of the autoscaler's monitor process when it runs on this machine."""
    try:
        raw = Path(f"/proc/{int(status['monitor_pid'])}/cmdline").read_bytes()
    except (KeyError, TypeError, ValueError, OSError):
        return []
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return args if any("monitor" in a for a in args[:3]) else []


def _config_arg(args: list[str]) -> Path | None:
    """The ``--autoscaling-config`` file among the monitor's arguments, if it exists."""
    for i, arg in enumerate(args):
        value = (arg.partition("=")[2] if arg.startswith("--autoscaling-config=")
                 else args[i + 1] if arg == "--autoscaling-config" and i + 1 < len(args) else "")
        if value and Path(value).is_file():
            return Path(value)
    return None


def _read_only_report(status: Mapping[str, Any]) -> bool:
    """Ray's read-only autoscaler names every node's type ``node_<node id>``."""
    active = (status.get("autoscaler_report") or {}).get("active_nodes") or {}
    return bool(active) and all(str(k).startswith("node_") for k in active)


def _node_types_of(path: Path) -> list[tuple[str, dict[str, float], int]]:
    """The worker node types of an autoscaler config file (cluster.yaml's format)."""
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    head = cfg.get("head_node_type")
    out = []
    for name, nt in (cfg.get("available_node_types") or {}).items():
        count = int(nt.get("max_workers", 0))
        if name != head and count:
            out.append((name, {k: float(v) for k, v in (nt.get("resources") or {}).items()},
                        _UNLIMITED if count < 0 else count))
    return out


# --- wording ----------------------------------------------------------------------------------

def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _amount(x: float, res: str) -> str:
    """``4 CPUs``, ``1 GPU``, ``1 'tpu'``."""
    if res in ("CPU", "GPU"):
        return f"{_num(x)} {res}{'s' * (x != 1)}"
    return f"{_num(x)} {res!r}"


def _total(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _summary(have: Mapping[str, float], ask: Ask) -> str:
    return ", ".join(_amount(have.get(k, 0.0), k) for k, v in ask.per_worker.items() if v) or "-"
