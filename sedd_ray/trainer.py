"""One SEDD training run in plain PyTorch: the loop a Ray worker and a unit test share.

    result = train(cfg, output_dir, report=callback)

No Ray here. Under DDP (a process group initialised by the caller, e.g. Ray Train or
``torch.multiprocessing``) the trainer wraps the model in DDP, shards every batch by
rank, averages metrics over ranks, and only rank 0 logs, samples and writes checkpoints.

Reproducibility: every random draw of step ``s`` on rank ``r`` comes from seeds derived
from ``(seed, r, s)`` (dropout through the global RNG, the diffusion time and noise
through a dedicated generator), and the data order from ``(seed, epoch)``. Resuming from
a checkpoint at step ``s`` therefore replays exactly what an uninterrupted run does
(bitwise on CPU in float32).

The report callback ``report(metrics: dict, checkpoint_dir: str | None)`` is called on
every rank at the same steps (log, eval and checkpoint steps, and once at the end);
``checkpoint_dir`` is set on rank 0 when a checkpoint was written at that step.

A divergence drill (no config field): ``SEDD_RAY_DRILL_NAN_AT=<step>`` in the environment
makes that step's loss NaN; see :func:`drill_nan_step`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sedd_ray import checkpoint as ckpt
from sedd_ray.config import RunConfig, apply_params
from sedd_ray.data import DataBundle, announce, load_data
from sedd_ray.diffusion.bound import mean_stderr, spread_block_indices
from sedd_ray.io import atomic_write
from sedd_ray.layout import TrainerFiles
from sedd_ray.model import count_parameters
from sedd_ray.objective import DiffusionObjective, build_objective
from sedd_ray.values import perplexity

PROGRESS_INTERVAL_NO_TTY_S = 10.0  # seconds between progress lines when stderr is no terminal
TOKENIZER_FILE = "tokenizer.json"  # saved in every checkpoint: sampling needs no corpus
ReportFn = Callable[[dict[str, Any], "str | None"], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the step and last finite loss."""


@dataclass
class TrainResult:
    """What a finished run returns (and writes to ``output_dir/final.json``).

    ``val_nll`` is the final evaluation (``val_nll_final``: the final EMA weights on the
    study-common blocks and draws, :meth:`Trainer.evaluation`), not the best periodic one
    (``val_nll_best`` = ``best_val_nll``, kept for curves and early stopping)."""

    step: int
    tokens_seen: int
    val_nll: float | None
    val_nll_stderr: float | None
    val_ppl_bound: float | None
    best_val_nll: float | None
    val_nll_final: float | None = None  # the final evaluation (= val_nll)
    val_nll_final_stderr: float | None = None
    val_nll_best: float | None = None  # the best periodic evaluation (= best_val_nll)
    data_identity: str | None = None  # sedd_ray.data.data_identity
    test_nll: float | None = None
    test_nll_stderr: float | None = None
    test_ppl_bound: float | None = None
    n_params: int = 0
    n_params_non_embedding: int = 0
    wall_time_s: float = 0.0
    started_at: float | None = None  # unix time at which the first step of this call began
    checkpoint_dir: str | None = None
    samples: list[str] = field(default_factory=list)
    resumed_from_step: int = 0
    data_meta: dict[str, Any] = field(default_factory=dict)


# --- distributed helpers ---------------------------------------------------------------

def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64); identity without a process group."""
    _, world = _dist()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def resolve_device(spec: str) -> torch.device:
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- schedule and EMA ----------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, cosine: bool, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then constant or cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not cosine or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


# --- data order ------------------------------------------------------------------------

class BatchOrder:
    """Deterministic order of training blocks: a fresh permutation per epoch from ``(seed, epoch)``.

    Global sample ``i`` is block ``perm(i // n)[i % n]``; step ``s`` on rank ``r`` with
    micro-batch ``a`` takes samples ``s*B + a*W*b + r*b + [0, b)`` (B global batch,
    W world size, b micro-batch). The data position is therefore a function of the step.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = []
        for i in range(start, start + count):
            epoch = i // self.n
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(_derive_seed(self.seed, 7919, epoch))
                self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
            out.append(int(self._perm[i % self.n]))
        return torch.tensor(out, dtype=torch.long)


# --- between two log points ----------------------------------------------------------------

@dataclass
class _LogWindow:
    """What the loop gathers between two log points, kept on the device (no host sync per
    step): the summed finite loss, the first step whose loss was not finite, and the clocks
    (``time.perf_counter``) of the run's start, the last log row and the last report."""

    loss: torch.Tensor  # () summed finite loss (nats/token) since the last log row
    bad_step: torch.Tensor  # () long: first non-finite step since the start, -1 if none
    steps: int
    start_wall: float
    last_log_time: float
    last_log_step: int
    last_report: float
    last_finite: tuple[int | None, float | None] = (None, None)  # (step, loss) of the last row

    @classmethod
    def start(cls, device: torch.device, step: int) -> _LogWindow:
        start_wall = time.perf_counter()
        last_log_time = time.perf_counter()
        return cls(torch.zeros((), device=device),
                   torch.full((), -1, dtype=torch.long, device=device), 0,
                   start_wall, last_log_time, step, last_log_time)

    def add(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite,  # full_like: no host sync
                                    torch.full_like(self.bad_step, step), self.bad_step)
        self.loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.steps += 1

    def reset(self, step: int, mean_loss: float) -> None:
        """A log row was made at ``step`` with ``mean_loss``: start a new window."""
        self.last_finite = (step, round(mean_loss, 6))
        self.loss.zero_()
        self.steps = 0

    def logged(self, step: int) -> None:
        self.last_log_time, self.last_log_step = time.perf_counter(), step

    def non_finite_error(self, step: int) -> NonFiniteLossError:
        where = int(self.bad_step.item()) if self.bad_step.item() >= 0 else step
        return NonFiniteLossError(
            f"training loss became non-finite (nan/inf) at step {where}; last finite "
            f"loss {self.last_finite[1]} nats/token at step {self.last_finite[0]}. Lower --lr, "
            "check the data, or enable gradient clipping."
        )


def _show_progress(bar: Any, metrics: dict[str, Any]) -> None:
    if bar is not None:
        val = {"val": f"{metrics['val_nll']:.3f}"} if "val_nll" in metrics else {}
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", refresh=False, **val)  # drawn at its pace


# --- the NaN drill -------------------------------------------------------------------------
# A drill for operators (and the fault tests), not a setting: with SEDD_RAY_DRILL_NAN_AT=<step>
# in the environment the training loss of that step is made NaN, so the run stops at the next
# log point as it would on a real divergence (a study records the trial as an error and goes
# on). SEDD_RAY_DRILL_NAN_IF='{"lr": 0.0025}' (JSON; keys as for --set or a study's params)
# limits it to the runs whose config holds those values, e.g. one trial of a study. Ray
# workers get both from the driver (launch.FORWARDED_ENV). Neither is a config field, a flag
# or a Parquet column.
DRILL_NAN_AT = "SEDD_RAY_DRILL_NAN_AT"
DRILL_NAN_IF = "SEDD_RAY_DRILL_NAN_IF"


def drill_nan_step(cfg: RunConfig) -> int:
    """The step whose loss the NaN drill makes NaN in a run of ``cfg``; 0 = none."""
    at, where = os.environ.get(DRILL_NAN_AT, "").strip(), os.environ.get(DRILL_NAN_IF, "")
    if not at:
        return 0
    try:
        step, select = int(at), json.loads(where or "{}")
        if not isinstance(select, dict):
            raise ValueError("it must be a JSON object")
        selected = apply_params(cfg, select).to_dict() == cfg.to_dict()
    except ValueError as err:  # ConfigError and JSONDecodeError are ValueErrors
        raise ValueError(f"bad NaN drill {DRILL_NAN_AT}={at!r} {DRILL_NAN_IF}={where!r}: {err}; "
                         "fix or unset them") from None
    return step if selected else 0


# --- evaluation ----------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Per-block bounds of one evaluation: ``ids`` (k,) long, ascending (indices into the
    split), ``nll`` (k,) float64 nats/token; the same on every rank."""

    ids: torch.Tensor
    nll: torch.Tensor

    @property
    def mean_stderr(self) -> tuple[float, float]:
        """The mean over blocks and its standard error (NaN for a single block)."""
        if self.nll.numel() < 2:
            return float(self.nll.mean()), math.nan
        return mean_stderr(self.nll)


@torch.no_grad()
def evaluate_bound(
    model: nn.Module, graph, noise, split: torch.Tensor, *, count: int | None, draws: int,
    seed: int, rows: int, device: torch.device, autocast: Any = None, objective: Any = None,
) -> Evaluation:
    """The importance-sampled bound (:func:`sedd_ray.diffusion.bound.split_bound`) of
    ``count`` blocks evenly spread over ``split`` (n, L) (None: all), ``draws`` per block,
    seeded by ``(seed, block id)`` only; ``rows`` (block x draw) per network call.
    ``objective`` (:mod:`sedd_ray.objective`, default the diffusion one of ``graph`` and
    ``noise``) says what is evaluated: the AR reference's exact NLL on the same blocks.

    Blocks are sharded over ranks and the per-block values all-gathered, so every rank
    gets the same :class:`Evaluation`, for any number of ranks.
    """
    rank, world = _dist()
    model.eval()
    with autocast or nullcontext():
        objective = objective or DiffusionObjective(graph, noise)
        ids, nll = objective.split_nll(model, split, count=count, rank=rank, world=world,
                                       draws=draws, seed=seed, batch_size=rows, device=device)
    all_ids = spread_block_indices(split.shape[0], count)
    return Evaluation(all_ids, _all_gather_strided(nll, len(all_ids), device))


def _all_gather_strided(local: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Rank ``r`` holds items ``r::world`` of ``total``: the whole (total,) float64 vector."""
    _, world = _dist()
    if world == 1:
        return local.double().cpu()
    per = -(-total // world)
    padded = torch.zeros(per, dtype=torch.float64, device=device)
    padded[: local.numel()] = local.to(device, torch.float64)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(total, dtype=torch.float64)
    for r, part in enumerate(parts):
        n = len(range(r, total, world))
        out[r::world] = part[:n].cpu()
    return out


# --- the run ------------------------------------------------------------------------------

class Trainer:
    """Holds the state of one run; :func:`train` is the usual entry point."""

    def __init__(self, cfg: RunConfig, output_dir: str | os.PathLike,
                 report: ReportFn | None = None, *, device: torch.device | None = None,
                 bundle: DataBundle | None = None, run_name: str | None = None,
                 group: str | None = None, init_from: str | None = None) -> None:
        cfg.validate()
        self.init_from = init_from  # pretrained weights for a fresh run (sedd_ray.hub)
        self.cfg = cfg
        self.out = Path(output_dir).absolute()
        self.files = TrainerFiles(self.out)
        self.ckpt_dir = self.files.checkpoints
        self.report_fn = report
        self.rank, self.world = _dist()
        self.is_main = self.rank == 0
        self.device = device or resolve_device(cfg.train.device)
        self.run_name, self.group = run_name, group
        t = cfg.train
        self.micro = self._micro_batch()
        if self.is_main:  # an impossible output folder fails now, creating nothing
            ckpt.precheck_writable_dir(self.out)
        bundle = self._load_data() if bundle is None else bundle
        self.data = bundle
        if self.is_main:  # only once the data is good: a bad corpus leaves no folder behind
            ckpt.ensure_writable_dir(self.out)  # read-only or full disk: fails before step 1
        self.graph = cfg.diffusion.build_graph(bundle.vocab_size)
        self.noise = cfg.diffusion.build_noise()
        self.objective = build_objective(cfg, self.graph, self.noise)  # by model.kind
        torch.manual_seed(_derive_seed(t.seed, 1))  # identical initial weights on all ranks
        self._build_model()
        self._build_optimizer()
        self._wrap_model()
        self.batches = bundle.train_source(t.seed)  # in memory, or streamed from the store
        if self.is_main:
            print(announce(cfg, self.batches.n_tokens, bundle.vocab_size), flush=True)
        self.step, self.tokens, self.best_val = 0, 0, math.inf
        self.resumed_from = 0
        self.history: list[dict[str, Any]] = []
        self.wandb_run = None
        self.nan_drill_step = drill_nan_step(cfg)

    def _micro_batch(self) -> int:
        """Sequences per rank per forward pass: the global batch over ranks and accumulation."""
        t = self.cfg.train
        if t.batch_size % (self.world * t.grad_accum):
            raise ValueError(
                f"batch_size {t.batch_size} must be divisible by world_size x grad_accum = "
                f"{self.world} x {t.grad_accum}; change --batch-size or --grad-accum"
            )
        return t.batch_size // self.world // t.grad_accum

    def _load_data(self) -> DataBundle:
        """Rank 0 builds the cache first (with a progress bar), the others then read it. The
        split is ``data.split_seed``'s, never the training seed's."""
        data = self.cfg.data
        bundle = load_data(data, progress=self.cfg.train.progress) if self.is_main else None
        if self.world > 1:
            dist.barrier()
        return bundle if self.is_main else load_data(data)

    def _build_model(self) -> None:
        """The model (on the device) and its EMA copy."""
        self.raw_model = self.objective.build_model(self.cfg.model).to(self.device)
        self.ema = copy.deepcopy(self.raw_model).requires_grad_(False).eval()
        self.params = count_parameters(self.raw_model)

    def _wrap_model(self) -> None:
        """The module the loop calls: DDP-wrapped over ranks, compiled where that pays off;
        and the autocast context training and sampling share."""
        t = self.cfg.train
        self.model: nn.Module = self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        if _use_compile(t.compile, self.device):
            self.model = torch.compile(self.model)
        self.autocast = bf16_autocast(t.precision, self.device)

    def _build_optimizer(self) -> None:
        """AdamW and its learning-rate schedule (warm-up, then constant or cosine)."""
        o, steps = self.cfg.optim, self.cfg.train.steps
        self.opt = torch.optim.AdamW(
            self.raw_model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
            eps=o.eps, weight_decay=o.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, o.warmup_steps, steps, o.cosine, o.min_lr_ratio)
        )

    # -- checkpoints --
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.raw_model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "step": self.step, "tokens": self.tokens, "data_position": self.step * self.cfg.train.batch_size,
            "best_val_nll": self.best_val, "rng": rng,
        }

    def save(self) -> Path:
        meta = {
            "tokens": self.tokens, "config": self.cfg.to_dict(),
            "vocab_size": self.data.vocab_size, "model_kind": self.cfg.model.kind,
            "graph": self.cfg.diffusion.graph if self.cfg.model.kind == "diffusion" else None,
            "data": {k: v for k, v in self.data.meta.items() if _jsonable(v)},
            "best_val_nll": self.best_val if math.isfinite(self.best_val) else None,
        }
        return ckpt.save_checkpoint(
            self.ckpt_dir, self.step, self.state_dict(), meta, keep=self.cfg.train.keep_checkpoints,
            extra_files={TOKENIZER_FILE: self.data.backend.to_str()},
        )

    def load(self, path: str | os.PathLike) -> None:
        state, meta = ckpt.load_checkpoint(path, map_location=self.device)
        if meta.get("vocab_size") != self.data.vocab_size:
            raise ckpt.CheckpointError(
                f"checkpoint {path} has vocab_size {meta.get('vocab_size')} but the data has "
                f"{self.data.vocab_size}; resume with the same --tokenizer/--vocab-size"
            )
        self.raw_model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_val = float(state["best_val_nll"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.resumed_from = self.step

    # -- one optimizer step --
    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, cfg = self.cfg.train, self.cfg
        torch.manual_seed(_derive_seed(t.seed, 2, self.rank, self.step))  # dropout
        g = torch.Generator(device=self.device).manual_seed(_derive_seed(t.seed, 3, self.rank, self.step))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for a in range(t.grad_accum):
            start = self.step * t.batch_size + a * self.world * self.micro + self.rank * self.micro
            x0 = self.batches.rows(start, self.micro)  # (micro, L), from (seed, step, rank)
            if self.device.type == "cuda":  # pinned: the copy below runs asynchronously
                x0 = x0.pin_memory()
            x0 = x0.to(self.device, non_blocking=True)
            sync = a == t.grad_accum - 1 or self.world == 1
            ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else nullcontext()
            with ctx, (self.autocast or nullcontext()):
                per_seq = self.objective.loss(self.model, x0, g)  # (B,) nats/sequence
                loss = per_seq.mean() / t.grad_accum
                if self.step + 1 == self.nan_drill_step:
                    loss = loss * float("nan")  # the NaN drill (SEDD_RAY_DRILL_NAN_AT)
            loss.backward()
            loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        o = cfg.optim
        decay = min(o.ema_decay, (1 + self.step) / (10 + self.step)) if o.ema_warmup else o.ema_decay
        ema_update(self.ema, self.raw_model, decay)
        self.step += 1
        self.tokens += t.batch_size * cfg.data.seq_len
        return loss_sum / cfg.data.seq_len, grad_norm  # nats/token on this rank

    # -- evaluation and samples --
    def evaluate(self, split: str = "val", draws: int | None = None,
                 sequences: int | None = None) -> tuple[float, float, int]:
        """The periodic evaluation of the EMA weights on ``split``: (mean nats/token, its
        stderr, blocks); ``sequences`` / ``draws`` default to ``eval_sequences`` /
        ``eval_draws``."""
        t = self.cfg.train
        ev = self.evaluation(split, sequences or t.eval_sequences, draws or t.eval_draws,
                             self.autocast)
        return (*ev.mean_stderr, int(ev.ids.numel()))

    def evaluation(self, split: str, count: int | None, draws: int,
                   autocast: Any = None) -> Evaluation:
        """Per-block bounds of the EMA weights on ``count`` blocks evenly spread over
        ``split`` (None: all) with ``draws`` each, seeded by ``train.eval_seed`` (never
        the training seed): every trial of a study sees the same blocks and draws."""
        t = self.cfg.train
        return evaluate_bound(self.ema, self.graph, self.noise, getattr(self.data, split),
                              count=count, draws=draws, seed=t.eval_seed,
                              rows=t.eval_batch_size, device=self.device,
                              autocast=autocast, objective=self.objective)

    @torch.no_grad()
    def samples(self) -> list[str]:
        t = self.cfg.train
        if t.sample_count == 0:
            return []
        g = torch.Generator(device=self.device).manual_seed(_derive_seed(t.seed, 5))
        x = self.objective.sample(self.ema, batch=t.sample_count, length=t.sample_length,
                                  steps=t.sample_steps, generator=g, device=self.device,
                                  autocast=self.autocast)
        return [self.data.decode(row.tolist()) for row in x.cpu()]

    # -- reporting --
    def _emit(self, metrics: dict[str, Any], checkpoint_dir: Path | None,
              report: bool = True) -> None:
        """Every row to metrics.jsonl and wandb (rank 0); to the report function when
        ``report``, which is the same on every rank and true whenever a checkpoint is written."""
        if self.is_main:
            self.history.append(metrics)
            with open(self.files.metrics, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                   step=metrics["step"])
        if self.report_fn is not None and report:
            self.report_fn(metrics, str(checkpoint_dir) if checkpoint_dir else None)

    def _init_wandb(self) -> None:
        if not (self.cfg.train.wandb and self.is_main):
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb_run = wandb.init(
            project=self.cfg.train.wandb_project, name=self.run_name, group=self.group,
            id=self.run_name, resume="allow", dir=str(self.out), config=self.cfg.flat(),
        )

    def run(self, resume: str | os.PathLike | bool = True) -> TrainResult:
        """Train to ``cfg.train.steps``; resume from ``resume`` (a checkpoint dir) or, when
        True, from ``output_dir/checkpoints/latest.json`` if present."""
        t = self.cfg.train
        self._resume(resume)
        self._init_wandb()
        started_at = time.time()
        window = _LogWindow.start(self.device, self.step)
        bar = self._progress_bar()
        metrics: dict[str, Any] | None = None
        try:
            while self.step < t.steps:
                loss, grad_norm = self._train_step()
                window.add(loss, self.step)
                if bar is not None:
                    bar.update(1)
                is_log, is_eval, is_ckpt = self._due()
                if not (is_log or is_eval or is_ckpt):
                    continue
                metrics, report_due = self._log_row(window, grad_norm)
                report = report_due or is_eval or is_ckpt
                if is_eval:
                    metrics.update(self._validate())
                _show_progress(bar, metrics)
                if t.sample_every and self.step % t.sample_every == 0 and self.is_main:
                    self._write_samples(self.samples())
                written = self._checkpoint() if is_ckpt and self.step < t.steps else None
                if self.step < t.steps:  # the final row is emitted by _finish
                    self._emit(metrics, written, report=report)
                    if report:
                        window.last_report = time.perf_counter()
                window.logged(self.step)
            return self._finish(metrics if self.step > self.resumed_from else None,
                                window.start_wall, started_at)
        finally:
            if bar is not None:
                bar.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()

    def _resume(self, resume: str | os.PathLike | bool) -> None:
        if resume is True:
            resume = ckpt.latest_checkpoint(self.ckpt_dir)
        if resume:
            self.load(resume)
        if self.init_from and self.step == 0:  # a resumed fine-tune keeps its own weights
            self.init_pretrained(self.init_from)

    def init_pretrained(self, ref: str | os.PathLike) -> None:
        """Start from the weights (model and EMA) of a pretrained folder or Hub id; the
        optimizer and schedule stay fresh (:func:`sedd_ray.hub.init_weights`)."""
        from sedd_ray.hub import init_weights

        init_weights(self.raw_model, ref, self.cfg, self.data.backend)
        self.ema.load_state_dict(self.raw_model.state_dict())

    def _progress_bar(self) -> Any:
        """A tqdm bar on rank 0 when ``train.progress``, else None."""
        if not (self.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        # Not a terminal (a Ray worker's stream, a log file): a line every 10 s, not one
        # per redraw (Ray forwards each redraw of a worker's bar as a new console line).
        tty = getattr(sys.stderr, "isatty", lambda: False)()
        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train",
                    dynamic_ncols=True, mininterval=0.1 if tty else PROGRESS_INTERVAL_NO_TTY_S)

    def _due(self) -> tuple[bool, bool, bool]:
        """Whether the step just taken logs, evaluates, checkpoints (the last one does all)."""
        t, step = self.cfg.train, self.step
        last = step == t.steps
        return (step % t.log_every == 0 or last, step % t.eval_every == 0 or last,
                bool(t.ckpt_every and step % t.ckpt_every == 0) or last)

    def _log_row(self, window: _LogWindow, grad_norm: torch.Tensor) -> tuple[dict[str, Any], bool]:
        """The log row of this step, and whether rank 0's clock says a plain row is due for
        the report function; raises NonFiniteLossError if any rank's loss was not finite.

        One all-reduce per log point: any rank's non-finite loss, the window's loss, and
        rank 0's clock deciding whether a plain log row is reported, for every rank alike
        (each report is a barrier in Ray Train)."""
        t = self.cfg.train
        now = time.perf_counter()
        due = self.is_main and now - window.last_report >= t.report_every_s
        bad, loss_sum, due_sum = _all_reduce_sum(
            [float(window.bad_step.item() >= 0), window.loss.item() / max(window.steps, 1),
             float(due)], self.device)
        if bad:
            raise window.non_finite_error(self.step)
        steps_done = self.step - window.last_log_step
        elapsed = now - window.last_log_time
        mean_loss = loss_sum / self.world
        window.reset(self.step, mean_loss)
        return {
            "step": self.step, "tokens": self.tokens, "train_loss": mean_loss,
            "epochs": self.tokens / max(self.batches.n_tokens, 1),
            "lr": self.sched.get_last_lr()[0], "grad_norm": float(grad_norm),
            "step_time_s": elapsed / max(steps_done, 1),
            "tokens_per_s": steps_done * t.batch_size * self.cfg.data.seq_len / max(elapsed, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
            "time_s": now - window.start_wall,
        }, bool(due_sum)

    def _validate(self) -> dict[str, float]:
        """Evaluate the validation bound and update the best value; the metrics it adds."""
        nll, se, _ = self.evaluate("val")
        self.best_val = min(self.best_val, nll)
        return {"val_nll": nll, "val_nll_stderr": se, "val_ppl_bound": perplexity(nll),
                "best_val_nll": self.best_val}

    def _checkpoint(self) -> Path | None:
        """Rank 0 writes a checkpoint (its folder is returned there), every rank waits."""
        written = self.save() if self.is_main else None
        if self.world > 1:
            dist.barrier()
        return written

    def _finish(self, metrics: dict[str, Any] | None, start_wall: float,
                started_at: float) -> TrainResult:
        t = self.cfg.train
        if metrics is None:  # resumed at the final step: just re-evaluate
            metrics = {"step": self.step, "tokens": self.tokens, **self._validate()}
        final = self._final_evaluation(metrics)
        result = TrainResult(
            step=self.step, tokens_seen=self.tokens, val_nll=metrics["val_nll"],
            val_nll_stderr=metrics["val_nll_stderr"], val_ppl_bound=metrics["val_ppl_bound"],
            best_val_nll=metrics["val_nll_best"], val_nll_final=metrics["val_nll_final"],
            val_nll_final_stderr=metrics["val_nll_final_stderr"],
            val_nll_best=metrics["val_nll_best"], data_identity=metrics["data_identity"],
            n_params=self.params["total"], n_params_non_embedding=self.params["non_embedding"],
            resumed_from_step=self.resumed_from, started_at=started_at,
            data_meta={k: v for k, v in self.data.meta.items() if _jsonable(v)},
        )
        if t.test_draws > 0:  # the same estimator, blocks spread over the test split
            test = self.evaluation("test", t.test_sequences or None, t.test_draws)
            nll, se = test.mean_stderr
            result.test_nll, result.test_nll_stderr = nll, se
            result.test_ppl_bound = perplexity(nll)
            metrics.update(test_nll=nll, test_nll_stderr=se, test_ppl_bound=result.test_ppl_bound)
        written = None
        if self.is_main:
            self._write_final_blocks(final)
            result.samples = self.samples()
            self._write_samples(result.samples)
            written = self.save()
            result.checkpoint_dir = str(written)
        if self.world > 1:
            dist.barrier()
        result.wall_time_s = time.perf_counter() - start_wall
        true_nll = self.data.meta.get("true_nll")  # synthetic sources: the floor of the bound
        if true_nll is not None and metrics.get("val_nll") is not None:
            metrics.update(true_nll=true_nll, bound_gap=metrics["val_nll"] - true_nll)
        metrics.update(n_params=result.n_params, n_params_non_embedding=result.n_params_non_embedding,
                       tokens_seen=self.tokens, wall_time_s=result.wall_time_s)
        self._emit({**metrics, "final": True}, written)
        if self.is_main:
            atomic_write(self.files.final, json.dumps(asdict(result), indent=1))
        return result

    def _final_evaluation(self, metrics: dict[str, Any]) -> Evaluation:
        """The trial's number: the final EMA weights on ``final_eval_sequences`` validation
        blocks (0 = all) x ``final_eval_draws``, in float32. Adds ``val_nll_final``,
        ``val_nll_final_stderr``, ``val_nll_best`` (the best periodic evaluation) and
        ``data_identity`` to the final row, whose ``val_nll`` / ``val_nll_stderr`` /
        ``val_ppl_bound`` become the final evaluation's."""
        t = self.cfg.train
        final = self.evaluation("val", t.final_eval_sequences or None, t.final_eval_draws)
        nll, se = final.mean_stderr
        metrics.update(
            val_nll_final=nll, val_nll_final_stderr=se,
            val_nll_best=self.best_val if math.isfinite(self.best_val) else None,
            val_nll=nll, val_nll_stderr=se, val_ppl_bound=perplexity(nll),
            final_eval_blocks=int(final.ids.numel()),
            data_identity=self.data.meta.get("data_identity"))
        return final

    def _write_final_blocks(self, final: Evaluation) -> None:
        """Rank 0: the final evaluation's per-block values, next to ``final.json``."""
        from sedd_ray import results  # pandas/pyarrow: only when a run ends

        t = self.cfg.train
        results.write_blocks(self.files.final_blocks, final.ids, final.nll, meta={
            "data_identity": self.data.meta.get("data_identity"), "eval_seed": t.eval_seed,
            "draws": t.final_eval_draws, "split": "val", "step": self.step})

    def _write_samples(self, texts: list[str]) -> None:
        with open(self.files.samples, "a") as f:
            for s in texts:
                f.write(json.dumps({"step": self.step, "text": s}) + "\n")


def bf16_autocast(precision: str, device: torch.device) -> torch.autocast | None:
    """The autocast context of ``train.precision`` on ``device`` (auto: bf16 on GPU,
    float32 on CPU), or None for float32; training and sampling use the same."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None


def _use_compile(mode: str, device: torch.device) -> bool:
    # torch.compile pays off on GPU; on CPU the tiny models lose to its start-up cost.
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def train(cfg: RunConfig, output_dir: str | os.PathLike, report: ReportFn | None = None,
          *, resume: str | os.PathLike | bool = True, device: torch.device | None = None,
          bundle: DataBundle | None = None, run_name: str | None = None,
          group: str | None = None, init_from: str | None = None) -> TrainResult:
    """Run (or resume) one training run; see the module docstring. ``init_from``: a
    pretrained folder or Hub id whose weights start a run that has no checkpoint yet."""
    trainer = Trainer(cfg, output_dir, report, device=device, bundle=bundle,
                      run_name=run_name, group=group, init_from=init_from)
    return trainer.run(resume=resume)
