"""Helpers of the Ray fault tests: runs in a thread, what Ray has committed, kills."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def multinode_cluster(head: dict[str, Any], workers: int = 2) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` on this machine: a head started with ``head``
    (its ``num_cpus``, ``resources``) and ``workers`` 1-CPU nodes, this process connected
    to it; shut down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(workers):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def jsonl(path: Path) -> list[dict]:
    """The whole rows of a JSON-lines file (a row being written right now is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def committed_steps(snapshot: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered: its
    ``checkpoint_manager_snapshot.json`` names them. A checkpoint reported but not yet
    registered is lost with a killed worker, so tests kill only after this lists one."""
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return sorted({int(m) for m in re.findall(r"ckpt-(\d{8})", text)})


def weights_sha(model) -> str:
    import torch

    flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def plain_reference(cfg, out: Path):
    """The uninterrupted run without Ray, on one thread like a 1-CPU Ray worker
    (OMP_NUM_THREADS=1), so float reductions run in the same order: the bitwise reference."""
    import torch

    from sedd_ray.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, out)
        return trainer, trainer.run(resume=False)
    finally:
        torch.set_num_threads(threads)


def _logging_worker_fn(logs: str):
    """A Ray Train worker function that runs launch's own and logs, to
    ``<logs>/rank<r>.log``, where and as which pid each rank started and from which step
    (after restoring Ray's checkpoint), then the sha256 of its final weights. A closure
    without module-level references, so cloudpickle ships it by value to the workers
    (which cannot import this test module)."""

    def worker_fn(config: dict) -> None:
        import hashlib
        import json
        import os
        import time
        from pathlib import Path

        import ray
        import ray.train
        import torch

        from sedd_ray import launch as launch_mod
        from sedd_ray.trainer import Trainer

        run = Trainer.run

        def write(entry: dict) -> None:
            rank = ray.train.get_context().get_world_rank()
            with open(Path(logs) / f"rank{rank}.log", "a") as f:
                f.write(json.dumps({**entry, "time": time.time()}) + "\n")

        def logged_run(self, *args, **kwargs):
            node = ray.get_runtime_context().get_node_id()
            write({"node": node, "pid": os.getpid(), "start_step": self.step})
            out = run(self, *args, **kwargs)
            flat = torch.cat([p.detach().flatten().cpu() for p in self.raw_model.parameters()])
            write({"node": node, "weights_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest()})
            return out

        Trainer.run = logged_run  # this worker process only
        launch_mod._worker_fn(config)

    return worker_fn


@contextlib.contextmanager
def node_logs(logs: Path | str) -> Iterator[None]:
    """Inside the block, the Ray Train workers of ``launch()`` log where each rank ran, as
    which pid, from which step, and its final weights' sha256 to ``<logs>/rank<r>.log``
    (see :func:`_logging_worker_fn`). Test-side: launch's module attribute is swapped."""
    import sedd_ray.launch as launch_mod

    original = launch_mod._worker_fn
    launch_mod._worker_fn = _logging_worker_fn(str(logs))
    try:
        yield
    finally:
        launch_mod._worker_fn = original


def launch_in_thread(cfg, node_log: str | None = None,
                     **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """``launch(cfg, **kw)`` in a thread; ``out`` gets ``result`` or ``error`` when it ends.
    With ``node_log``, the workers log there as :func:`node_logs` says."""
    from sedd_ray.launch import launch

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with node_logs(node_log) if node_log else contextlib.nullcontext():
                out["result"] = launch(cfg, **kw)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test's assertion
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started with ``start_new_session=True`` (by pid), then what it left
    behind in its session: its local Ray cluster."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
