"""Throughput and overhead benchmarks; writes benchmarks/RESULTS.md.

    python benchmarks/run.py            # CPU, about 10 minutes on 2 cores
    python benchmarks/run.py --quick    # about 2-3 minutes: fewer steps and repeats, no study
    python benchmarks/run.py --gpu      # the GPU figures (benchmarks/gpu.sh runs this)
    python benchmarks/run.py --only sample,radd --out /tmp/r.md

Every measurement runs in its own subprocess (a fresh peak RSS, its own thread setting,
its own Ray cluster that it always shuts down); the parent samples the child's whole
process tree from /proc once a second for the summed RSS and PSS. Every figure is the
median of repeats after warm-up. "before" rows patch in the pre-speed-work code from
``benchmarks/reference.py``.

Sections (``--only`` takes their names): ``train`` (tokens/s, step time, peak memory per
preset; fused vs unfused; torch.compile on/off), ``loss`` (the score entropy alone at the
GPT-2 vocabulary: time and peak memory, fused vs unfused), ``sample`` (tokens/s per
predictor and steps, before/after), ``radd`` (the cached sampler of a time-independent
absorbing model against the plain sampler, same samples), ``ray`` (Ray Train 1 worker and
a 1-trial study against the plain trainer: start-up and steady state), ``study`` (trials
per hour of the tiny preset at 1 and 2 concurrent trials, with the study's summed memory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sedd_ray.layout import RunLayout, StudyLayout, TrainerFiles  # noqa: E402

SECTIONS = ("train", "loss", "sample", "radd", "ray", "study")
GPU_SECTIONS = ("gpu_train", "gpu_loss", "gpu_sample", "radd")


# ============================================================================================
# helpers shared by parent and children
# ============================================================================================

def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rss_mb() -> float:
    """Current RSS of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    return _status_mb("VmHWM")


def process_started_at() -> float:
    """Wall-clock time at which this process started (``/proc/self/stat`` start time, in
    clock ticks since boot, against ``CLOCK_BOOTTIME``): so a start-up figure includes the
    interpreter's start and every import, as a user's ``python -m ...`` pays them."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss_mb()


def _variants(a: dict[str, Any]) -> list[bool]:
    """The code variants a child measures, interleaved: after (False) and/or before (True)."""
    return [False, True] if a.get("compare") else [False]


def _patched(unfused: bool):
    from benchmarks import reference

    return reference.unfused() if unfused else contextlib.nullcontext()


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cfg(preset_name: str, **params: Any):
    from sedd_ray.config import apply_params, preset

    return apply_params(preset(preset_name), {"progress": False, **params}).validate()


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters that multiply, i.e. all but the input
    embedding lookup) + 12 n_layers hidden seq_len (attention scores and values)."""
    from sedd_ray.model import count_parameters

    counts = count_parameters(model)
    inner = model
    while not hasattr(inner, "embed"):
        inner = getattr(inner, "_orig_mod", None) or inner.module
    n = counts["total"] - inner.embed.weight.numel()
    cfg = inner.cfg
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.hidden_size * seq_len


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12}


def peak_flops(device) -> float | None:
    import torch

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ============================================================================================
# children: each prints one JSON line
# ============================================================================================

def child_train(a: dict[str, Any]) -> dict[str, Any]:
    """Time the trainer's optimizer step (the hot loop) on one preset.

    ``compare`` alternates two variants in rounds on the same trainer, so both see the same
    machine load: ``"code"`` (current vs pre-speed-work code), ``"compile"`` (the
    torch.compile'd model vs the eager one; its warm-up holds the compilation) or
    ``"threads"`` (1 vs 2 torch threads)."""
    import contextlib

    import torch

    from sedd_ray.trainer import Trainer

    _threads(a["threads"])
    device = torch.device(a.get("device", "cpu"))
    compare = a.get("compare")
    params = dict(a.get("params", {}))
    params.update(compile="on" if compare == "compile" else a.get("compile", "off"),
                  device=device.type)
    if "precision" in a:
        params["precision"] = a["precision"]
    cfg = _cfg(a["preset"], **params)
    out = tempfile.mkdtemp(prefix="sedd-bench-train-")
    bundle = _random_bundle(cfg) if a.get("random_data") else None
    trainer = Trainer(cfg, out, device=device, bundle=bundle)
    compiled = trainer.model
    variants = {  # name -> (fields of its row, context that sets it up)
        "code": [({"unfused": False}, contextlib.nullcontext),
                 ({"unfused": True}, lambda: _patched(True))],
        "compile": [({"compile": "on"}, lambda: _swap(trainer, compiled)),
                    ({"compile": "off"}, lambda: _swap(trainer, trainer.raw_model))],
        "threads": [({"threads": 1}, lambda: _nthreads(1)), ({"threads": 2}, lambda: _nthreads(2))],
    }.get(compare, [({}, contextlib.nullcontext)])
    rounds = a.get("rounds", 4)
    per_round = max(1, a["measure"] // rounds)
    times: list[list[float]] = [[] for _ in variants]
    extra = [0.0 for _ in variants]
    cuda_peak = [0.0 for _ in variants]
    warmup_s = [0.0 for _ in variants]
    for k, (_, ctx) in enumerate(variants):  # warm-up, each variant
        with ctx():
            t0 = time.perf_counter()
            for _ in range(a["warmup"]):
                trainer._train_step()
            _sync(device)
            warmup_s[k] = time.perf_counter() - t0
    for _ in range(rounds):
        for k, (_, ctx) in enumerate(variants):
            base = reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with ctx():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    loss, _ = trainer._train_step()
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
            extra[k] = max(extra[k], peak_rss_mb() - base)
            if device.type == "cuda":
                cuda_peak[k] = max(cuda_peak[k], torch.cuda.max_memory_allocated(device) / 2**20)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    common = {
        "preset": a.get("label", a["preset"]), "model": cfg.model.name,
        "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "vocab": trainer.data.vocab_size, "graph": cfg.diffusion.graph,
        "threads": torch.get_num_threads(), "device": str(device),
        "compile": cfg.train.compile, "unfused": False, "loss": float(loss),
        "n_params": trainer.params["total"], "rss_mb": rss_mb(),
        "process_peak_rss_mb": peak_rss_mb(),
    }
    rows = []
    for k, (fields, _) in enumerate(variants):
        ts = sorted(times[k])
        step = median(ts)
        row = {**common, **fields, "step_s": step, "step_s_p10": ts[len(ts) // 10],
               "step_s_p90": ts[(9 * len(ts)) // 10], "tokens_per_s": tokens / step,
               "step_extra_peak_mb": extra[k], "warmup_s": warmup_s[k]}
        if device.type == "cuda":
            row["cuda_peak_mb"] = cuda_peak[k]
            row["gpu"] = torch.cuda.get_device_name(device)
            fpt = flops_per_token(trainer.raw_model, cfg.data.seq_len)
            row["flops_per_token"] = fpt
            row["tflops"] = fpt * row["tokens_per_s"] / 1e12
            peak = peak_flops(device)
            if peak:
                row["mfu"] = fpt * row["tokens_per_s"] / peak
        rows.append(row)
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows}


@contextlib.contextmanager
def _swap(trainer, model):
    before = trainer.model
    trainer.model = model
    try:
        yield
    finally:
        trainer.model = before


@contextlib.contextmanager
def _nthreads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _random_bundle(cfg):
    """Uniformly random token blocks of the config's vocabulary and length: throughput does
    not depend on the text, and a GPU box may have no corpus (or network) at hand."""
    import torch

    from sedd_ray.data import DataBundle

    vocab = 50257 if cfg.data.tokenizer == "gpt2" else cfg.data.vocab_size
    g = torch.Generator().manual_seed(0)

    def blocks(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n, cfg.data.seq_len), generator=g)

    return DataBundle(train=blocks(max(256, 4 * cfg.train.batch_size)), val=blocks(64),
                      test=blocks(64), vocab_size=vocab, eos_id=0, backend=None,
                      meta={"corpus": "random"})


def child_loss(a: dict[str, Any]) -> dict[str, Any]:
    """The score entropy alone, forward + backward, on a (B, L, N+1) log-score; the
    variants alternate."""
    import torch

    from sedd_ray.diffusion import get_graph

    _threads(a["threads"])
    device = torch.device(a.get("device", "cpu"))
    b, length, n = a["batch"], a["length"], a["vocab"]
    graph = get_graph(a["graph"], vocab_size=n)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, n, (b, length), generator=g, device=device)
    sigma = torch.linspace(0.01, 3.0, b, device=device)[:, None]
    x = graph.sample_transition(x0, sigma, generator=g)
    ls = torch.randn(b, length, graph.dim, generator=g, device=device)
    variants = _variants(a)
    times: dict[bool, list[float]] = {v: [] for v in variants}
    extra: dict[bool, float] = {v: 0.0 for v in variants}
    for i in range(a["warmup"] + a["repeats"]):
        for v in variants:
            leaf = ls.clone().requires_grad_()
            base = reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base_cuda = torch.cuda.memory_allocated(device)
            _sync(device)
            with _patched(v):
                t0 = time.perf_counter()
                graph.score_entropy(leaf, sigma, x, x0).sum().backward()
                _sync(device)
                dt_ = time.perf_counter() - t0
            if i >= a["warmup"]:
                times[v].append(dt_)
                peak = ((torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
                        if device.type == "cuda" else peak_rss_mb() - base)
                extra[v] = max(extra[v], peak)
            del leaf
    return {"rows": [{"graph": a["graph"], "shape": [b, length, graph.dim], "unfused": v,
                      "time_s": median(times[v]), "extra_peak_mb": extra[v],
                      "tensor_mb": b * length * graph.dim * 4 / 2**20} for v in variants]}


def _sample_model(model_name: str, graph_name: str, vocab: int, time_conditioning: bool, device):
    import torch

    from sedd_ray.config import model_size
    from sedd_ray.diffusion import get_graph
    from sedd_ray.model import ScoreModel

    torch.manual_seed(0)
    cfg = model_size(model_name)
    cfg.dropout, cfg.time_conditioning = 0.0, time_conditioning
    graph = get_graph(graph_name, vocab_size=vocab)
    model = ScoreModel(cfg, graph).to(device).eval()
    with torch.no_grad():  # non-zero weights: adaLN-zero would make every block the identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, graph


def child_sample(a: dict[str, Any]) -> dict[str, Any]:
    """Sampling tokens/s per predictor and steps (time-conditioned model, exp(model(x, t)));
    the variants alternate."""
    import torch

    from sedd_ray.diffusion import get_noise, model_score_fn, sample

    _threads(a["threads"])
    device = torch.device(a.get("device", "cpu"))
    model, graph = _sample_model(a["model"], a["graph"], a["vocab"], True, device)
    noise = get_noise(graph.default_noise)  # the schedule the graph is built for
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    score_fn = model_score_fn(model, autocast=autocast)
    variants = _variants(a)
    rows = []
    for predictor in a["predictors"]:
        grid = a["steps"][predictor] if isinstance(a["steps"], dict) else a["steps"]
        for steps in grid:
            times: dict[bool, list[float]] = {v: [] for v in variants}
            for i in range(a["repeats"] + 1):  # the first round is the warm-up
                for v in variants:
                    with _patched(v):
                        _sync(device)
                        t0 = time.perf_counter()
                        sample(score_fn, graph, noise, batch=a["batch"], length=a["length"],
                               steps=steps, predictor=predictor, device=device,
                               generator=torch.Generator(device=device).manual_seed(i))
                        _sync(device)
                    if i:
                        times[v].append(time.perf_counter() - t0)
            for v in variants:
                t = median(times[v])
                rows.append({"predictor": predictor, "steps": steps, "unfused": v, "time_s": t,
                             "tokens_per_s": a["batch"] * a["length"] / t})
    return {"model": a["model"], "graph": a["graph"], "vocab": a["vocab"], "batch": a["batch"],
            "length": a["length"], "rows": rows, "threads": torch.get_num_threads(),
            "device": str(device)}


def child_radd(a: dict[str, Any]) -> dict[str, Any]:
    """Cached vs plain sampling of a time-independent absorbing model, same seeds."""
    import torch

    from sedd_ray.diffusion import get_noise, model_score_fn, sample

    _threads(a["threads"])
    device = torch.device(a.get("device", "cpu"))
    model, graph = _sample_model(a["model"], "absorb", a["vocab"], False, device)
    noise = get_noise("loglinear")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    length = a["length"]
    rows = []
    for batch, mult, mode in a["configs"]:
        steps = int(mult * length)
        plain_fn = model_score_fn(model, cache="off", autocast=autocast)
        cached_fn = model_score_fn(model, cache=mode, autocast=autocast)
        res: dict[str, list[float]] = {"off": [], mode: []}
        outs: dict[str, Any] = {}
        for i in range(a["repeats"] + 1):  # the first pair is the warm-up
            for name, fn in (("off", plain_fn), (mode, cached_fn)):
                fn.calls = fn.rows = 0
                _sync(device)
                t0 = time.perf_counter()
                x = sample(fn, graph, noise, batch=batch, length=length, steps=steps,
                           predictor="analytic", device=device,
                           generator=torch.Generator(device=device).manual_seed(100 + i))
                _sync(device)
                if i:
                    res[name].append(time.perf_counter() - t0)
                outs[name] = (x, fn.calls, fn.rows)
        same = bool(torch.equal(outs["off"][0], outs[mode][0]))
        agree = float((outs["off"][0] == outs[mode][0]).float().mean())
        t_off, t_c = median(res["off"]), median(res[mode])
        rows.append({"batch": batch, "length": length, "steps": steps, "cache": mode,
                     "plain_s": t_off, "cached_s": t_c, "speedup": t_off / t_c,
                     "plain_calls": outs["off"][1], "cached_calls": outs[mode][1],
                     "plain_rows": outs["off"][2], "cached_rows": outs[mode][2],
                     "identical": same, "token_agreement": agree,
                     "nfe_bound": (steps + 1) / (1 + steps * (1 - (1 - 1 / steps) ** length))})
    return {"model": a["model"], "vocab": a["vocab"], "rows": rows,
            "threads": torch.get_num_threads(), "device": str(device)}


def _steady(metrics_path: str | Path, steps: int) -> dict[str, Any]:
    """Steady state from the trainer's own ``metrics.jsonl`` (first window, the warm-up,
    left out):

    - *loop* step: the time between consecutive log rows over the steps between them, so
      it holds everything the training loop does (steps, logging, every report to Ray
      Train: its barrier, and any wait for the controller to take it);
    - *step*: the trainer's ``step_time_s``, the optimizer steps alone (no reporting).

    ``train_s`` = the trainer's clock at the last step (``time_s`` of the final row).
    """
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    logs = [r for r in rows if "step_time_s" in r and not r.get("final")]
    loop = [(b["time_s"] - a["time_s"]) / (b["step"] - a["step"])
            for a, b in zip(logs[1:], logs[2:]) if "val_nll" not in a]
    step = sorted(r["step_time_s"] for r in logs[1:])
    loop.sort()
    final = [r for r in rows if r.get("final")]
    return {"loop_step_s": median(loop), "loop_step_p10_s": loop[len(loop) // 10],
            "steady_step_s": median(step), "steady_step_p10_s": step[len(step) // 10],
            "steady_tokens_per_s": median([r["tokens_per_s"] for r in logs[1:]]),
            "windows": len(loop), "train_s": final[-1]["time_s"] if final else None}


def _overhead_params(steps: int) -> dict[str, Any]:
    # evaluation, checkpoint and samples once, at the end; the same for every runner;
    # report_every_s at its default (a log row to Ray at most once a second)
    return {"steps": steps, "log_every": 10, "eval_every": steps, "ckpt_every": 0,
            "test_draws": 0, "seed": 0}


def child_plain_run(a: dict[str, Any]) -> dict[str, Any]:
    """The plain trainer in this process. *Start-up* = from this process's start (the
    interpreter, importing torch and sedd_ray, building the trainer: what ``python -m
    sedd_ray.train --no-ray`` pays) to the first step."""
    born = process_started_at()
    import torch

    from sedd_ray.trainer import Trainer

    _threads(a["threads"])
    cfg = _cfg("tiny", **_overhead_params(a["steps"]), device="cpu")
    out = Path(tempfile.mkdtemp(prefix="sedd-bench-plain-"))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out, device=torch.device("cpu"))
    ready = time.perf_counter()
    result = trainer.run(resume=False)
    t_end = time.time()
    steady = _steady(TrainerFiles(out).metrics, a["steps"])
    shutil.rmtree(out, ignore_errors=True)
    return {"runner": "plain", "wall_s": t_end - born, "startup_s": result.started_at - born,
            "trainer_init_s": ready - t0,
            "end_s": t_end - result.started_at - steady["train_s"], **steady,
            "threads": torch.get_num_threads()}


def _started_at(run: RunLayout) -> float:
    """When the trainer of a ``launch`` run took its first step (its ``final.json``)."""
    return json.loads(run.trainer_files().final.read_text())["started_at"]


def child_ray_train(a: dict[str, Any]) -> dict[str, Any]:
    """``launch`` with one worker on a new local cluster, then, on the same cluster, Ray
    Train's own floor (an empty train function) and a second, short ``launch``.

    - *start-up* = from this process's start to the worker's first step: the imports,
      ``ray.init`` (``ray_init_s``) and ``launch`` (``launch_s``: to the first step);
    - *floor* = ``TorchTrainer.fit()`` to the first line of an empty train function on
      the now warm cluster: what Ray Train costs before any user code runs;
    - *warm launch* = ``launch`` to the first step of a later run on that cluster (its
      detached autoscaling coordinator already up): what each later run of a running
      cluster, such as a study's next trial, pays.
    """
    born = process_started_at()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer  # what launch imports: counted as imports

    from sedd_ray.launch import connect, launch

    cfg = _cfg("tiny", **_overhead_params(a["steps"]), device="cpu")
    storage = tempfile.mkdtemp(prefix="sedd-bench-ray-")
    try:
        t_imports = time.time()
        connect("local")  # a new local cluster of our own, even if $RAY_ADDRESS is set
        t_init = time.time()
        launch(cfg, name="bench", storage=storage, num_workers=1, max_failures=0)
        t_fit = time.time()
        started = _started_at(RunLayout(storage, "bench"))

        def empty(config: dict[str, Any]) -> None:  # pickled by value: no import of ours
            Path(config["mark"]).write_text(repr(time.time()))

        mark = Path(storage) / "floor-mark"
        t_floor = time.time()
        TorchTrainer(empty, train_loop_config={"mark": str(mark)},
                     scaling_config=ray.train.ScalingConfig(num_workers=1),
                     run_config=ray.train.RunConfig(name="floor", storage_path=storage)).fit()
        floor = float(mark.read_text()) - t_floor
        t_warm = time.time()
        launch(_cfg("tiny", **_overhead_params(20), device="cpu"), name="bench-warm",
               storage=storage, num_workers=1, max_failures=0)
        warm = _started_at(RunLayout(storage, "bench-warm")) - t_warm
    finally:
        ray.shutdown()
    t_end = time.time()
    steady = _steady(RunLayout(storage, "bench").trainer_files().metrics, a["steps"])
    shutil.rmtree(storage, ignore_errors=True)
    return {"runner": "ray_train", "wall_s": t_fit - born, "startup_s": started - born,
            "imports_s": t_imports - born, "ray_init_s": t_init - t_imports,
            "launch_s": started - t_init, "end_s": t_fit - started - steady["train_s"],
            "floor_s": floor, "warm_launch_s": warm, "shutdown_s": t_end - t_fit, **steady}


def _local_ray_for_study() -> None:
    """What run_study's own connect does without an address (a new local cluster with the
    driver resource; here even if $RAY_ADDRESS is set), before the clock starts."""
    from sedd_ray.launch import connect
    from sedd_ray.study import DRIVER_RESOURCE

    connect("local", resources={DRIVER_RESOURCE: 1000})


def child_ray_study(a: dict[str, Any]) -> dict[str, Any]:
    import ray

    from sedd_ray.study import StudySpec, run_study

    storage = tempfile.mkdtemp(prefix="sedd-bench-study-")
    _local_ray_for_study()
    spec = StudySpec(name="bench-1trial", base="tiny", num_trials=1,
                     fixed={**_overhead_params(a["steps"]), "device": "cpu", "progress": False})
    try:
        t0 = time.perf_counter()
        run_study(spec, storage, verbose=0)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    from sedd_ray.results import read_trials

    trial_ids = list(read_trials(storage, spec.name)["trial_id"])
    if len(trial_ids) != 1:
        raise RuntimeError(f"expected one trial, found {trial_ids}")
    files = StudyLayout(storage, spec.name).trial(trial_ids[0]).trainer_files()
    steady = _steady(files.metrics, a["steps"])
    shutil.rmtree(storage, ignore_errors=True)
    return {"runner": "study_1trial", "wall_s": wall, **steady,
            "fixed_s": wall - steady["train_s"]}


def child_study(a: dict[str, Any]) -> dict[str, Any]:
    """The README's default study (graph ablation, tiny preset), shorter: trials/hour."""
    import ray

    from sedd_ray.study import StudySpec, graph_ablation, run_study

    storage = tempfile.mkdtemp(prefix="sedd-bench-tput-")
    _local_ray_for_study()
    spec: StudySpec = graph_ablation(
        base="tiny", trials_per_level=a["trials_per_level"], seeds=[0, 1],
        max_concurrent=a["concurrent"], name=f"bench-c{a['concurrent']}",
        fixed={"steps": a["steps"], "progress": False, "device": "cpu"})
    try:
        t0 = time.perf_counter()
        run_study(spec, storage, verbose=0)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    from sedd_ray.results import read_trials

    trials = read_trials(storage, spec.name)
    finished = int((trials["status"] == "terminated").sum())
    shutil.rmtree(storage, ignore_errors=True)
    n = spec.total_trials
    return {"concurrent": a["concurrent"], "trials": n, "finished": finished,
            "steps": a["steps"], "wall_s": wall, "trials_per_hour": 3600 * n / wall}


CHILDREN = {
    "train": child_train, "loss": child_loss, "sample": child_sample, "radd": child_radd,
    "plain_run": child_plain_run, "ray_train": child_ray_train, "ray_study": child_ray_study,
    "study": child_study,
}


# ============================================================================================
# parent: run children under a memory monitor
# ============================================================================================

def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in KiB from /proc/<pid>/smaps_rollup; zeros when the process is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process tree once a second; keeps the peaks."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.peak_procs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            rss = pss = 0
            for p in pids:
                r, s = _mem_kb(p)
                rss, pss = rss + r, pss + s
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


class Runner:
    def __init__(self, log_dir: Path, env: dict[str, str], timeout: float) -> None:
        self.log_dir, self.env, self.timeout = log_dir, env, timeout
        self.n = 0

    def __call__(self, task: str, args: dict[str, Any], env: dict[str, str] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        self.n += 1
        log = self.log_dir / f"{self.n:02d}-{task}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, json.dumps(args)]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True,
                                    env={**self.env, **(env or {})}, cwd=ROOT)
            mon = TreeMemory(proc.pid)
            mon.start()
            try:
                out, _ = proc.communicate(timeout=timeout or self.timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(_tree(proc.pid)):  # our own child's tree only
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                proc.communicate()
                out = ""
            finally:
                mon.stop.set()
                mon.join()
        wall = time.perf_counter() - t0
        result: dict[str, Any] = {"task": task, "args": args, "process_wall_s": wall,
                                  "tree_peak_rss_mb": mon.peak_rss_mb,
                                  "tree_peak_pss_mb": mon.peak_pss_mb,
                                  "tree_peak_procs": mon.peak_procs}
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            result.update(json.loads(lines[-1]))
            print(f"  [{wall:6.1f}s] {task} {json.dumps(args)[:90]}", flush=True)
        else:
            tail = log.read_text().strip().splitlines()[-3:]
            result["error"] = f"rc={proc.returncode}: " + " | ".join(tail)
            print(f"  [{wall:6.1f}s] {task} FAILED: {result['error'][:300]}", flush=True)
        return result


# ============================================================================================
# the plan
# ============================================================================================

def plan_cpu(run: Runner, quick: bool, only: set[str], R: dict[str, Any], save) -> None:
    th = 1  # = a Ray worker with 1 CPU (OMP_NUM_THREADS=1); see RESULTS.md on threads
    if "train" in only:
        print("train: per preset, after vs before (interleaved), compile on/off", flush=True)
        presets = ["smoke", "tiny"] if quick else ["smoke", "tiny", "cpu"]
        w, m = (3, 8) if quick else (4, 24)
        R["train"] = []
        for p in presets:
            R["train"].append(run("train", {"preset": p, "warmup": w, "measure": m,
                                            "threads": th, "compare": "code"}))
        if not quick:
            R["train"].append(run("train", {
                "preset": "tiny", "label": "tiny, GPT-2 vocab", "warmup": 3, "measure": 12,
                "threads": th, "compare": "code", "random_data": True,
                "params": {"tokenizer": "gpt2", "batch_size": 8}}))
        save()
        for p in ("tiny",) if quick else ("tiny", "cpu"):
            R["train"].append(run("train", {"preset": p, "warmup": w, "measure": m,
                                            "threads": th, "compare": "threads"}))
        save()
        if not quick:
            for p in ("tiny", "cpu"):
                R["train"].append(run("train", {"preset": p, "warmup": 3, "measure": m,
                                                "threads": th, "compare": "compile"},
                                      timeout=600))
                save()
    if "loss" in only:
        print("loss: score entropy alone at the GPT-2 vocabulary", flush=True)
        b, length = (2, 128) if quick else (4, 256)
        R["loss"] = [run("loss", {"graph": graph, "batch": b, "length": length, "vocab": 50257,
                                  "warmup": 1, "repeats": 2 if quick else 4, "threads": th,
                                  "compare": True}) for graph in ("absorb", "uniform")]
        save()
    if "sample" in only:
        print("sample: tokens/s per predictor and steps", flush=True)
        common = {"model": "mini", "vocab": 1024, "batch": 8, "length": 128, "threads": th,
                  "predictors": ["analytic"] if quick else ["analytic", "euler"],
                  "repeats": 1 if quick else 2, "compare": True}
        R["sample"] = [run("sample", {**common, "graph": "absorb", "steps": {
            "analytic": [32] if quick else [32, 128], "euler": [32]}})]
        if not quick:
            R["sample"].append(run("sample", {**common, "graph": "uniform", "steps": [32]}))
        save()
    if "radd" in only:
        print("radd: cached vs plain sampler, time-independent absorbing model", flush=True)
        configs = ([[1, 1, "batch"]] if quick else
                   [[1, 1, "batch"], [1, 4, "batch"], [8, 1, "rows"], [8, 2, "rows"]])
        R["radd"] = run("radd", {"model": "mini", "vocab": 1024, "length": 128,
                                 "configs": configs, "repeats": 1 if quick else 2,
                                 "threads": th})
        save()
    if "ray" in only:
        print("ray: plain trainer vs Ray Train (1 worker) vs a 1-trial study, interleaved",
              flush=True)
        steps, rounds = (60, 1) if quick else (400, 3)
        one = {"OMP_NUM_THREADS": "1"}
        # plain, ray_train, study per round, and a plain run closing the last round: each
        # Ray run is compared with the plain runs just before and after it (same load)
        R["ray"] = []
        for i in range(rounds + 1):
            R["ray"].append(run("plain_run", {"steps": steps, "threads": 1, "round": i}, env=one))
            if i < rounds:
                R["ray"].append(run("ray_train", {"steps": steps, "round": i}, env=one))
                if not quick:
                    R["ray"].append(run("ray_study", {"steps": steps, "round": i}, env=one))
            save()
    if "study" in only and not quick:
        print("study: trials/hour, tiny preset, graph ablation", flush=True)
        steps = 100
        R["study"] = []
        for c, per_level in ((1, 1), (2, 2)):
            R["study"].append(run("study", {"concurrent": c, "trials_per_level": per_level,
                                            "steps": steps}, env={"OMP_NUM_THREADS": "1"},
                                  timeout=900))
            save()


def plan_gpu(run: Runner, quick: bool, only: set[str], R: dict[str, Any], save,
             dry_run: bool = False) -> None:
    """The GPU figures; ``dry_run`` runs every child on the CPU at toy sizes (a check of
    the script itself on a machine without a GPU)."""
    dev = {"device": "cpu" if dry_run else "cuda", "threads": 1 if dry_run else 4}
    vocab = 512 if dry_run else 50257
    big, len_train = ("tiny", 64) if dry_run else (None, 1024)
    def train(preset_name: str, comp: str) -> None:
        params: dict[str, Any] = {"batch_size": 16}
        if dry_run:
            params.update(model="tiny", seq_len=len_train, batch_size=4, sample_length=32)
        R["train"].append(run("train", {
            **dev, "preset": preset_name, "warmup": 3 if comp == "off" else 4,
            "measure": 8 if quick else 12, "rounds": 2, "compile": comp,
            "compare": "code" if comp == "off" else "compile", "precision": "bf16",
            "random_data": True,
            "params": params}, timeout=200))
        save()

    if "gpu_train" in only:  # eager first; compile (minutes of compilation) at the very end
        print("gpu_train: bf16 tokens/s, MFU, before/after", flush=True)
        R["train"] = []
        # batch 16 x 1024: the (B, L, 50258) float32 log-score alone is 3.3 GB
        for preset_name in ("small", "medium"):
            train(preset_name, "off")
    if "gpu_loss" in only:
        print("gpu_loss: score entropy at the GPT-2 vocabulary", flush=True)
        b, length = (2, 64) if dry_run else (8, 1024)
        R["loss"] = [run("loss", {**dev, "graph": g, "batch": b, "length": length,
                                  "vocab": vocab, "warmup": 2, "repeats": 5, "compare": True})
                     for g in ("absorb", "uniform")]
        save()
    if "gpu_sample" in only:
        print("gpu_sample: tokens/s per predictor and steps", flush=True)
        # (4, 1024, 50258) float64 step distributions: 1.6 GB each
        R["sample"] = [run("sample", {**dev, "model": big or "small", "graph": "absorb",
                                      "vocab": vocab, "batch": 4, "length": len_train,
                                      "predictors": ["analytic", "euler"], "steps": [64],
                                      "repeats": 1, "compare": True}, timeout=300)]
        save()
    if "radd" in only:
        print("radd: cached vs plain sampler", flush=True)
        R["radd"] = run("radd", {**dev, "model": big or "small", "vocab": vocab,
                                 "length": 64 if dry_run else 256,
                                 "configs": [[1, 1, "batch"], [1, 4, "batch"], [16, 1, "rows"]],
                                 "repeats": 1}, timeout=300)
        save()
    if "gpu_train" in only and not dry_run:
        print("gpu_train: torch.compile on", flush=True)
        for preset_name in ("small", "medium"):
            train(preset_name, "on")


# ============================================================================================
# RESULTS.md
# ============================================================================================

def _f(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def _err(r: dict[str, Any]) -> str:
    return f"FAILED ({r['error'][:160]})" if "error" in r else ""


def _row(cells: list[str]) -> str:
    """A Markdown table row; an empty cell is one space."""
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def _table(columns: list[str]) -> list[str]:
    """A Markdown table's header and separator rows."""
    return [_row(columns), "|" + "---|" * len(columns)]


def _error_row(columns: list[str], r: dict[str, Any], lead: list[str], at: int) -> str:
    """A measurement that failed: the ``lead`` cells, its error in column ``at``, and
    empty cells to the table's width."""
    cells = [*lead, *[""] * (at - len(lead)), _err(r)]
    return _row(cells + [""] * (len(columns) - len(cells)))


def environment(cmd: str) -> dict[str, Any]:
    import torch

    try:
        import ray

        ray_v = ray.__version__
    except ImportError:
        ray_v = "-"
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": cmd, "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray_v,
        "git": sha + (" (uncommitted changes)" if dirty else ""),
        "load_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _rows(R: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [x for r in R.get(key) or [] if "error" not in r for x in r["rows"]]


def _pairs(R: dict[str, Any], compare: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(first, second) rows of each training measurement that compared two variants."""
    return [(r["rows"][0], r["rows"][1]) for r in R.get("train") or []
            if "error" not in r and r["args"].get("compare") == compare and len(r["rows"]) == 2]


def _ray_overhead(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each Ray run's loop-step ratio against the mean of the plain runs of its round and
    the next (run just before and just after it)."""
    ok = [x for x in rows if "error" not in x]
    plain = {x["args"]["round"]: x for x in ok if x["task"] == "plain_run"}
    by_runner: dict[str, list[dict[str, Any]]] = {}
    for x in ok:
        rnd = x["args"].get("round")
        if x["task"] == "plain_run" or rnd not in plain or rnd + 1 not in plain:
            continue
        def base(key: str, rnd: int = rnd) -> float:
            return (plain[rnd][key] + plain[rnd + 1][key]) / 2

        row = {**x, "ratio": x["loop_step_s"] / base("loop_step_s"),
               "ratio_p10": x["loop_step_p10_s"] / base("loop_step_p10_s")}
        if x["runner"] == "ray_train":  # with start-up: whole runs of the same steps
            row.update(wall_ratio=x["wall_s"] / base("wall_s"),
                       added_s=x["startup_s"] - base("startup_s"))
        by_runner.setdefault(x["runner"], []).append(row)
    ps = list(plain.values())
    return {"by_runner": by_runner,
            "plain_startup_s": median([p["startup_s"] for p in ps]) if ps else None,
            "plain_init_s": median([p["trainer_init_s"] for p in ps]) if ps else None,
            "plain_end_s": median([p["end_s"] for p in ps]) if ps else None}


def headline(R: dict[str, Any], gpu: bool) -> list[str]:
    """The summary: acceptance figures and the keep/drop evidence of each speed change,
    computed from this run's numbers."""
    L = ["## Summary", ""]
    for after, before in _pairs(R, "code"):
        L.append(f"- training, {after['preset']}: **{before['step_s'] / after['step_s']:.2f}x** "
                 f"faster than before the speed work ({_f(after['tokens_per_s'], 0)} tokens/s, "
                 f"{after['threads']} thread(s)).")
    for x in [r for r in R.get("loss") or [] if "error" not in r]:
        a = [y for y in x["rows"] if not y["unfused"]]
        b = [y for y in x["rows"] if y["unfused"]]
        if a and b:
            a, b = a[0], b[0]
            L.append(f"- fused score entropy ({a['graph']}, {tuple(a['shape'])}): forward + "
                     f"backward **{b['time_s'] / a['time_s']:.1f}x** faster, extra peak memory "
                     f"{_f(a['extra_peak_mb'], 0)} MiB (= one (B, L, dim) float32 tensor, "
                     f"{_f(a['tensor_mb'], 0)} MiB) instead of {_f(b['extra_peak_mb'], 0)} MiB.")
    for on, off in _pairs(R, "compile"):
        r = on["step_s"] / off["step_s"]
        L.append(f"- torch.compile, {on['preset']}: compiled step / eager step = {r:.2f} "
                 f"({'compile wins' if r < 0.9 else 'no clear difference' if r <= 1.05 else 'compile loses'}).")
    for one, two in _pairs(R, "threads"):
        L.append(f"- threads, {one['preset']}: a step with 2 torch threads takes "
                 f"{two['step_s'] / one['step_s']:.2f}x the time of 1 thread.")
    sample_rows = [(r["graph"], y) for r in R.get("sample") or [] if "error" not in r
                   for y in r["rows"]]
    ups = []
    for graph, y in sample_rows:
        if not y["unfused"]:
            b = [z for g2, z in sample_rows if g2 == graph and z["unfused"]
                 and z["predictor"] == y["predictor"] and z["steps"] == y["steps"]]
            if b:
                ups.append(f"{graph}/{y['predictor']}/{y['steps']}: {b[0]['time_s'] / y['time_s']:.2f}x")
    if ups:
        L.append("- sampling, after vs before: " + ", ".join(ups) + ".")
    radd = R.get("radd")
    if radd and "error" not in radd:
        at_l = [y for y in radd["rows"] if y["steps"] == y["length"]]
        more = [y for y in radd["rows"] if y["steps"] > y["length"]]
        same = all(y["identical"] for y in radd["rows"])
        if at_l:
            text = ("- cached RADD sampler at steps = length: " + ", ".join(
                f"**{y['speedup']:.2f}x** (batch {y['batch']}, {y['cache']} cache)" for y in at_l)
                + f"; the expected bound is {at_l[0]['nfe_bound']:.2f}x (target 2x: "
                + ("met" if min(y["speedup"] for y in at_l) >= 2 else "NOT met") + ")")
            if more:
                text += "; at more steps: " + ", ".join(
                    f"**{y['speedup']:.2f}x** at steps = {y['steps'] // y['length']} x length "
                    f"(batch {y['batch']})" for y in more)
            L.append(text + (". Samples identical to the plain sampler's in every case." if same
                             else ". Samples NOT identical in every case (see the table)."))
    ov = _ray_overhead(R.get("ray") or [])
    for runner, xs in ov["by_runner"].items():
        ratios = [x["ratio"] for x in xs]
        r = median(ratios)
        target = (f" (target <= 1.10: {'met' if r <= 1.10 else 'NOT met'})"
                  if runner == "ray_train" else "")
        p10 = [x["ratio_p10"] for x in xs]
        L.append(f"- steady-state training loop (steps + logging + reports), {runner} / plain: "
                 f"**{r:.3f}**, median of {len(ratios)} interleaved round(s) (range "
                 f"{min(ratios):.3f}-{max(ratios):.3f}; fastest-decile windows "
                 f"{median(p10):.3f}){target}.")
    rt = ov["by_runner"].get("ray_train")
    if rt and ov["plain_startup_s"] is not None:
        m = {k: median([x[k] for x in rt]) for k in
             ("startup_s", "added_s", "ray_init_s", "imports_s", "floor_s", "warm_launch_s",
              "end_s", "wall_ratio")}
        warm_added = m["imports_s"] + m["warm_launch_s"] - ov["plain_startup_s"]
        steps = rt[0]["args"]["steps"]
        L.append(f"- Ray Train's fixed cost per run, from `python` to the first training step "
                 f"(imports included on both sides): {m['startup_s']:.1f} s against the plain "
                 f"trainer's {ov['plain_startup_s']:.1f} s = **{m['added_s']:.1f} s added** on a "
                 f"new local cluster (ray.init {m['ray_init_s']:.1f} s of it; target < 10 s: "
                 f"{'met' if m['added_s'] < 10 else 'NOT met'}), **{warm_added:.1f} s** for a "
                 f"later run on a running cluster (driver imports {m['imports_s']:.1f} s + "
                 f"launch to first step {m['warm_launch_s']:.1f} s - plain; target < 10 s: "
                 f"{'met' if warm_added < 10 else 'NOT met'}). Ray Train's own floor on that "
                 f"cluster, `TorchTrainer.fit()` to the first line of an empty train function, "
                 f"is **{m['floor_s']:.1f} s**: warm launch - floor = "
                 f"{m['warm_launch_s'] - m['floor_s']:.1f} s is the driver's data check and the "
                 f"trainer's own start-up inside the worker (the plain trainer's: "
                 f"{ov['plain_init_s']:.1f} s). After the last step {m['end_s']:.1f} s "
                 f"(plain {ov['plain_end_s']:.1f} s).")
        L.append(f"- whole run of {steps} steps with start-up, ray_train / plain wall time: "
                 f"**{m['wall_ratio']:.2f}** (median of {len(rt)} round(s)).")
    for x in [x for x in R.get("study") or [] if "error" not in x]:
        L.append(f"- study, {x['concurrent']} concurrent: **{x['trials_per_hour']:.0f} trials/hour** "
                 f"({x['trials']} trials of {x['steps']} steps); peak memory of the whole Ray "
                 f"tree {x['tree_peak_pss_mb'] / 1024:.1f} GB PSS, {x['tree_peak_rss_mb'] / 1024:.1f} GB "
                 "summed RSS (counts shared pages once per process).")
    if not gpu:
        L.append("- GPU figures (bf16 training with MFU for small/medium, compile on/off, "
                 "sampling): **pending** - no GPU was lent to this run; `bash benchmarks/gpu.sh` "
                 "measures them in under 8 minutes and writes `RESULTS_GPU.md`.")
    L.append("")
    return L


def render(env: dict[str, Any], R: dict[str, Any], gpu: bool) -> str:
    L: list[str] = []
    title = "GPU benchmark results" if gpu else "Benchmark results"
    L += [f"# {title}", "",
          f"Written by `{env['command']}` on {env['date']} (took {env['took_min']:.1f} min).", "",
          "| | |", "|---|---|",
          f"| machine | {env['cpu']}, {env['cores']} cores, {env['memory']} RAM"
          + (f"; GPU {env['gpu']} (CUDA {env['cuda']})" if "gpu" in env else "") + " |",
          f"| versions | Python {env['python']}, torch {env['torch']}, ray {env['ray']} |",
          f"| code | git {env['git']} |",
          "| load average (1/5/15 min) | start " + " / ".join(f"{x:.1f}" for x in env["load_start"])
          + ", end " + " / ".join(f"{x:.1f}" for x in env["load_end"]) + " |",
          "", "Every figure is the median of repeats after warm-up. Each measurement ran in its "
          "own process; *peak RSS* is that process's VmHWM, *tree* memory the summed "
          "RSS/PSS of the process and all its descendants (Ray's processes included), sampled "
          "once a second. *before* = the code before the speed work "
          "(`benchmarks/reference.py`: unfused score entropy, model post-processing, "
          "sampler step distributions and draw), patched in.", ""]
    if env.get("load_start", (0,))[0] > (env.get("cores") or 1):
        L += [f"**The machine was shared and loaded** (load average {env['load_start'][0]:.1f} "
              f"on {env['cores']} cores): absolute figures are noisy and pessimistic; ratios "
              "measured back to back are more reliable than absolute throughput.", ""]

    L += headline(R, gpu)
    if R.get("train"):
        L += ["## Training throughput" + (" (bf16)" if gpu else " (CPU, float32)"), "",
              "The trainer's optimizer step (`Trainer._train_step`: loss, backward, clip, AdamW, "
              "EMA) timed step by step; tokens/s = batch x seq_len / median step time. "
              "Pairs of rows (before/after, 1/2 threads, compile on/off) come from one process, "
              "alternating in rounds (same load). *process peak RSS* = the process's VmHWM (model, data, torch); "
              "*step extra peak* = the most one round of steps raised the RSS above its level "
              "before the round (the steps' transient memory).", ""]
        cols = ["preset", "model", "batch x len", "vocab", "threads", "compile", "code",
                "step (ms)", "p10-p90 (ms)", "tokens/s", "process peak RSS (MiB)",
                "step extra peak (MiB)"] + (["GPU peak (MiB)", "TFLOP/s", "MFU"] if gpu else [])
        L += _table(cols)
        for r in R["train"]:
            a = r["args"]
            if "error" in r:
                L.append(_error_row(cols, r, [a["preset"], "", "", "", str(a["threads"]),
                                              a.get("compile", "off")], 7))
                continue
            for x in r["rows"]:
                row = (f"| {x['preset']} | {x['model']} | {x['batch']} x {x['seq_len']} "
                       f"| {x['vocab']} | {x['threads']} | {x['compile']} "
                       f"| {'before' if x['unfused'] else 'after'} | {_f(x['step_s'] * 1e3)} "
                       f"| {_f(x['step_s_p10'] * 1e3)}-{_f(x['step_s_p90'] * 1e3)} "
                       f"| {_f(x['tokens_per_s'], 0)} | {_f(x['process_peak_rss_mb'], 0)} "
                       f"| {_f(x['step_extra_peak_mb'], 1)} |")
                if gpu:
                    row += (f" {_f(x.get('cuda_peak_mb'), 0)} | {_f(x.get('tflops'))} | "
                            f"{_f(100 * x['mfu']) + ' %' if x.get('mfu') else '-'} |")
                L.append(row)
        comp = [x for r in R["train"] if "error" not in r for x in r["rows"]
                if x["compile"] == "on"]
        if comp:
            L += ["", "torch.compile rows alternate with the eager model in one process; the "
                  "compiled warm-up (the first steps, compilation included; inductor's on-disk "
                  "cache may be warm) took " +
                  ", ".join(f"{x['preset']} {x['warmup_s']:.0f} s" for x in comp) + "."]
        L.append("")

    if R.get("loss"):
        L += ["## Score entropy alone (GPT-2 vocabulary)", "",
              "Forward + backward of `graph.score_entropy` on a random (B, L, N+1) float32 "
              "log-score; before and after alternate in one process. *extra peak* = peak memory "
              "above the inputs during the call (VmHWM on CPU, the allocator on GPU).", ""]
        cols = ["graph", "(B, L, dim)", "one tensor (MiB)", "code", "time (ms)",
                "extra peak (MiB)"]
        L += _table(cols)
        for r in R["loss"]:
            if "error" in r:
                L.append(_error_row(cols, r, [r["args"]["graph"]], 4))
                continue
            for x in r["rows"]:
                L.append(f"| {x['graph']} | {tuple(x['shape'])} | {_f(x['tensor_mb'], 0)} | "
                         f"{'before' if x['unfused'] else 'after'} | {_f(x['time_s'] * 1e3, 0)} | "
                         f"{_f(x['extra_peak_mb'], 0)} |")
        L.append("")

    if R.get("sample"):
        L += ["## Sampling throughput", "",
              "`sample()` with a time-conditioned model (`exp(model(x, sigma_bar))`), "
              "random weights; tokens/s = batch x length / time of one whole sample call "
              "(including the final denoising step).", ""]
        cols = ["graph", "model", "vocab", "batch x len", "predictor", "steps", "code",
                "time (s)", "tokens/s"]
        L += _table(cols)
        for r in R["sample"]:
            if "error" in r:
                L.append(_error_row(cols, r, [r["args"]["graph"]], 7))
                continue
            for row in r["rows"]:
                L.append(f"| {r['graph']} | {r['model']} | {r['vocab']} | {r['batch']} x {r['length']} "
                         f"| {row['predictor']} | {row['steps']} | {'before' if row['unfused'] else 'after'} "
                         f"| {_f(row['time_s'], 2)} | {_f(row['tokens_per_s'], 0)} |")
        L.append("")

    r = R.get("radd")
    if r:
        L += ["## Cached sampler: time-independent absorbing model (RADD)", "",
              "`model_score_fn(model)` with `ModelConfig(time_conditioning=False)` against the "
              "same model's plain score (`cache=\"off\"`: one network call per step), analytic "
              "predictor, the same generator seed for both. *batch* cache: skip the call when "
              "no token of the batch changed (bitwise the plain samples by construction); "
              "*rows* cache: evaluate only the sequences that changed. *bound* = the speed-up "
              "if the network were all the cost: (steps + 1) / expected calls per sequence, "
              "1 + steps (1 - (1 - 1/steps)^L), since with the loglinear schedule every "
              "position unmasks at a uniform time.", ""]
        if "error" in r:
            L += [_err(r), ""]
        else:
            L += _table(["batch x len", "steps", "cache", "plain (s)", "cached (s)", "speed-up",
                         "bound", "network calls (rows) plain -> cached", "same samples"])
            for row in r["rows"]:
                same = "yes (bitwise)" if row["identical"] else f"{100 * row['token_agreement']:.2f} % of tokens"
                L.append(f"| {row['batch']} x {row['length']} | {row['steps']} | {row['cache']} "
                         f"| {_f(row['plain_s'], 2)} | {_f(row['cached_s'], 2)} | "
                         f"**{_f(row['speedup'], 2)}x** | {_f(row['nfe_bound'], 2)}x | "
                         f"{row['plain_calls']} ({row['plain_rows']}) -> {row['cached_calls']} "
                         f"({row['cached_rows']}) | {same} |")
            L.append("")

    if R.get("ray"):
        L += ["## Ray overhead (tiny preset, 1 CPU worker)", "",
              "The same run three ways, interleaved in rounds: the plain trainer in one process, "
              "Ray Train with one worker (`launch` on a new local cluster), and a 1-trial study "
              "(`run_study`: Tune driver + Train run); a plain run before and after each round's "
              "Ray runs is their baseline (same machine load). All with 1 thread "
              "(OMP_NUM_THREADS=1, what Ray gives a 1-CPU worker) and the library's defaults "
              "(a log row reported to Ray at most once a second, `train.report_every_s`; "
              "the Train controller polling every 0.5 s). *loop step* = the median over log "
              "windows (10 steps each, the first left out) of the trainer's clock between "
              "consecutive log rows: the steps and everything the loop does between them, "
              "reports to Ray included; *step* = the optimizer steps alone (`step_time_s`). "
              "*start-up* = from the start of the process (the interpreter, every import, "
              "and for Ray `ray.init` on a new local cluster and `launch`) to the trainer's "
              "first step, the same clock for every runner; *init* = `ray.init`; *launch* = "
              "`launch` to the first step; *floor* = Ray Train alone, `TorchTrainer.fit()` to "
              "the first line of an empty train function, run next on the same (now warm) "
              "cluster; *warm launch* = `launch` to the first step of a second run on that "
              "cluster; *end* = from the last step to the call's return "
              "(final evaluation, checkpoint, samples, and for Ray the report and the worker "
              "group's shutdown); the study's *fixed* = its wall - training time.", ""]
        cols = ["round", "runner", "wall (s)", "loop step (ms)", "step (ms)",
                "loop ratio vs plain", "fastest-decile ratio", "start-up (s)", "init (s)",
                "launch (s)", "floor (s)", "warm launch (s)", "end (s)",
                "tree peak RSS / PSS (MiB)"]
        L += _table(cols)
        ov = _ray_overhead(R["ray"])
        ratio_of = {(x["runner"], x["args"]["round"]): x
                    for xs in ov["by_runner"].values() for x in xs}
        for x in R["ray"]:
            name, rnd = x.get("runner", x["task"]), x["args"].get("round", "")
            if "error" in x:
                L.append(_error_row(cols, x, [str(rnd), name], 2))
                continue
            rx = ratio_of.get((name, rnd))
            ratio = f"**{rx['ratio']:.3f}**" if rx else "-"
            ratio_p10 = f"{rx['ratio_p10']:.3f}" if rx else "-"
            up = x.get("startup_s")
            L.append(f"| {rnd} | {name} | {_f(x['wall_s'])} | {_f(x['loop_step_s'] * 1e3)} "
                     f"| {_f(x['steady_step_s'] * 1e3)} | {ratio} | {ratio_p10} "
                     f"| {_f(up) if up is not None else 'fixed ' + _f(x.get('fixed_s'))} "
                     f"| {_f(x.get('ray_init_s'))} | {_f(x.get('launch_s'))} "
                     f"| {_f(x.get('floor_s'))} | {_f(x.get('warm_launch_s'))} "
                     f"| {_f(x.get('end_s'))} "
                     f"| {_f(x['tree_peak_rss_mb'], 0)} / {_f(x['tree_peak_pss_mb'], 0)} |")
        L.append("")

    if R.get("study"):
        L += ["## Study throughput (graph ablation, tiny preset)", "",
              "`graph_ablation` (the README's default study) with fewer steps per trial; "
              "trials/hour = trials / wall time of `run_study` (Ray start-up included). Tree "
              "memory: the whole Ray process tree of the study (driver, GCS, raylet, "
              "dashboard, Tune driver and Train workers), summed; PSS counts shared pages once.",
              ""]
        cols = ["concurrent", "trials", "steps/trial", "finished", "wall (s)", "trials/hour",
                "tree peak RSS (MiB)", "tree peak PSS (MiB)", "processes"]
        L += _table(cols)
        for x in R["study"]:
            if "error" in x:
                L.append(_error_row(cols, x, [str(x["args"]["concurrent"])], 4))
                continue
            L.append(f"| {x['concurrent']} | {x['trials']} | {x['steps']} | {x['finished']} | "
                     f"{_f(x['wall_s'])} | **{_f(x['trials_per_hour'], 0)}** | "
                     f"{_f(x['tree_peak_rss_mb'], 0)} | {_f(x['tree_peak_pss_mb'], 0)} | "
                     f"{x['tree_peak_procs']} |")
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        res = CHILDREN[argv[1]](json.loads(argv[2]))
        print(json.dumps(res), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 2-3 minutes: fewer steps/repeats")
    p.add_argument("--gpu", action="store_true", help="the GPU figures (needs CUDA)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --gpu: run the GPU plan on the CPU at toy sizes (checks the script)")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ", ".join(SECTIONS)
                   + " (GPU: " + ", ".join(GPU_SECTIONS) + ")")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/RESULTS.md; "
                   "RESULTS_quick.md with --quick, RESULTS_GPU.md with --gpu)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per measurement")
    p.add_argument("--render", default=None, metavar="RESULTS.json",
                   help="only rewrite the markdown from a saved JSON (no measurement)")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        gpu = "--gpu" in saved["env"]["command"].split()
        dest = Path(args.out) if args.out else Path(args.render).with_suffix(".md")
        dest.write_text(render(saved["env"], saved["results"], gpu) + "\n")
        print(f"wrote {dest} from {args.render}")
        return 0
    cmd = "python benchmarks/run.py" + (" " + " ".join(shlex.quote(a) for a in argv) if argv else "")
    sections = GPU_SECTIONS if args.gpu else SECTIONS
    from sedd_ray.cli import name_list
    from sedd_ray.config import ConfigError

    try:
        only = set(name_list(args.only, "--only", choices=sections)) if args.only else set(sections)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.gpu and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: --gpu needs a CUDA device, and torch.cuda.is_available() is False "
                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
            return 2
    name = "RESULTS_GPU.md" if args.gpu else ("RESULTS_quick.md" if args.quick else "RESULTS.md")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / name
    env_vars = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONPATH": str(ROOT)}
    env = environment(cmd)
    t0 = time.perf_counter()
    R: dict[str, Any] = {}

    def save() -> None:  # after every section: a killed run still leaves its figures
        env["took_min"] = (time.perf_counter() - t0) / 60
        env["load_end"] = os.getloadavg()
        out.write_text(render(env, R, args.gpu) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"env": env, "results": R}, indent=1,
                                                       default=str))

    with tempfile.TemporaryDirectory(prefix="sedd-bench-logs-") as logs:
        run = Runner(Path(logs), env_vars, args.timeout)
        if args.gpu:
            plan_gpu(run, args.quick, only, R, save, dry_run=args.dry_run)
        else:
            from sedd_ray.config import preset
            from sedd_ray.data import load_data

            for p_name in ("tiny", "cpu"):  # build the data caches outside any timing
                load_data(preset(p_name).data)
            plan_cpu(run, args.quick, only, R, save)
    save()
    print(f"wrote {out} and {out.with_suffix('.json').name} ({env['took_min']:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
