r"""A precise, schedule-independent estimate of the NLL bound, per validation block.

**The bound.** For one block ``x_0`` of ``L`` tokens and a forward process with total
noise ``sigma_bar`` running from 0 to ``S = sigma_bar(1)`` (the trained schedule's end),

    -log p_theta(x_0) <= int_0^S F(s) ds + sum_l prior_l,
    F(s) = E_{x_s ~ p_s(.|x_0)} [ sum_l SE_l(x_s, s) ]                 (nats per block)

(``SE`` is the denoising score entropy of :class:`~sedd_ray.diffusion.Graph`). Since
``sigma(t) dt = d sigma_bar``, the continuous-time bound depends on the schedule only
through ``sigma_bar(0)`` and ``S``; the lower end is always 0 here, so the stretch
``[0, sigma_bar(0)]`` that a geometric schedule (``sigma_min = 1e-4``) skips is counted.

- **Uniform graph**: the path is the base process; ``prior_l = KL(p_S(.|x_0,l) || uniform)``.
- **Absorbing graph**: the reverse chain starts from all-mask, which the base process
  reaches only with probability ``M = 1 - e^{-S}`` per position. The path is the process
  conditioned on it (:class:`~sedd_ray.diffusion.noise.MaskConditioned`): its mask
  probability is ``m_A = m / M`` and its total noise ``sigma_bar_A = -log(1 - m_A)`` runs
  from 0 to infinity; ``prior_l = -log M`` (as :func:`~sedd_ray.diffusion.elbo_nll`
  does). The *sampled* chain unmasks at rate ``sigma(t) s_theta(x, sigma_bar(t))``; the
  same rate written in the conditioned process's clock is ``sigma_A(t) s_A`` with
  ``s_A = s_theta * E / E_A`` (``E = expm1(sigma_bar)``, ``E_A = expm1(sigma_bar_A)``,
  since ``sigma / E = sigma_A / E_A``). So the network is queried at the sampler's
  ``sigma_bar`` (``sigma_bar_net``) and the score entropy is taken at ``sigma_bar_A``
  (``sigma_bar_path``) with the log-score shifted by ``log E - log E_A``; for a model that
  scales by sigma this is the scale-by-sigma shift taken with ``sigma_bar_A``.
  (Note: with that shift the integral alone is already a bound on the sampled chain,
  whose reverse rates coincide with the conditioned process's; ``-log M`` is kept as the
  design asks, a slack of ``-log(1 - eps)`` per token for loglinear, 2e-9 for S = 20.)

**Change of variables and the proposal.** Both graphs draw the path's move (mask)
probability ``m = 1 - e^{-s}`` on ``[0, m_top]``, ``m_top = M`` (uniform) or 1 (absorbing),
as ``m = m_top v^p`` with ``v ~ U(0, 1)`` and ``p = power = 2`` (density ``~ m^{-1/2}``);
the uniform graph mixes in a *defensive* share ``d = 0.1`` drawn uniform in ``s`` on
``[0, S]`` (:class:`Proposal`). With ``q`` the density of ``s_path`` and ``u ~ U(0, 1)``,

    q(s) = (1 - d) m^{1/p - 1} e^{-s} / (p m_top^{1/p}) + d / S,   m = 1 - e^{-s}
    int_0^S F(s) ds = E_u [ F(s_path(u)) / q(s_path(u)) ]         (S = inf for absorbing)
    s_net(u) = -log(1 - M m_A(u)) (absorbing: the sampler's noise at the same time),
               s_path(u) (uniform)

Why this ``q``: at a small move probability a few positions moved, each costing
``~ NLL / m``: the per-draw variance grows like ``1/m``, and a density ``~ m^{-1/2}``
(the ``sqrt`` of it) keeps the estimator's variance finite where uniform in ``m`` makes
it diverge logarithmically (measured: p = 2 beats 1 and 3 on trained tiny models; see
``benchmarks/bound_stderr.py``). In ``m`` the absorbing ``F`` is ``L`` times the mean NLL
of the masked tokens (bounded); the uniform graph's ``F`` does not vanish at large ``s``
for a poor model, and the defensive share keeps ``1 / q <= S / d`` there (uniform in
``m`` alone would give weights up to ``e^S``). The proposal depends on the schedule only
through ``S``, never on the training schedule's shape: a geometric and a loglinear trial
with the same end points get the same draws.

**Draws.** Each block gets ``K = draws`` *stratified* times ``u_k = (k + U_k) / K``
(``U_k ~ U(0, 1)`` independent, ``k = 0..K-1``) and one ``x_s ~ p_s(.|x_0)`` each, all
from a CPU generator seeded by ``(seed, block_id)`` only: not by the rank, the batch,
the device or the training seed. So any split of the blocks over ranks and batches gives
the same per-block numbers (up to the network's rounding for a different batch shape),
and two trials evaluated with the same ``seed`` see the same blocks, times and noise
(common random numbers): pair them block by block with :func:`paired_difference`.

Shapes: ``blocks`` / ``x_0`` / ``x_t`` are LongTensors ``(B, L)``; noise levels,
weights and per-block estimates are ``(B,)`` float64; log-scores ``(B, L, dim)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sedd_ray.diffusion.graphs import Graph, log_expm1
from sedd_ray.diffusion.noise import Noise

# log_score_fn(x_t (B, L) long, sigma_bar_net (B,), sigma_bar_path (B,)) -> (B, L, dim)
# log-scores of the sampled chain re-expressed for the path's clock (see the module doc).
LogScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# model(x_t (B, L) long, sigma_bar (B,)) -> log-scores (B, L, dim)
LogScoreModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_F64 = torch.float64
_OPEN = 2.0**-55  # shifts U from [0, 1) into (0, 1): no u is exactly 0 or 1


class Proposal:
    r"""The fixed proposal over the path's total noise; see the module docstring.

    ``Proposal(graph, noise, defensive=None, power=2.0)``. ``proposal(u)`` maps ``u``
    (R,) in (0, 1) to ``(sigma_bar_net, sigma_bar_path, weight)``, each (R,) float64, where
    ``weight = 1 / q(sigma_bar_path)`` and ``q`` (:meth:`density`) is the density of
    ``sigma_bar_path`` when ``u ~ U(0, 1)``:

    - ``u < 1 - defensive``: the path's move probability ``m = m_top v^power`` with
      ``v = u / (1 - defensive)``;
    - ``u >= 1 - defensive`` (uniform graph only): ``sigma_bar_path`` uniform on ``[0, S]``.

    ``defensive`` defaults to 0.1 for the uniform graph (it bounds the weight by ``10 S``
    whatever the model) and must be 0 for the absorbing graph (the conditioned path's
    noise is unbounded; there ``weight * F`` stays bounded for any model, as the score
    entropy at a mask is ``O(1 / E_A) = O(1 - m)``).
    """

    def __init__(self, graph: Graph, noise: Noise, defensive: float | None = None,
                 power: float = 2.0) -> None:
        self.absorb = graph.absorb
        self.defensive = float((0.0 if self.absorb else 0.1) if defensive is None else defensive)
        if not 0 <= self.defensive < 1 or (self.absorb and self.defensive):
            raise ValueError(f"defensive must be in [0, 1) (0 for the absorbing graph, whose "
                             f"path noise is unbounded), got {defensive}")
        if not power >= 1:
            raise ValueError(f"power must be >= 1, got {power}; 2 (density ~ m^-1/2) is the "
                             "default, 1 is uniform in the move probability")
        self.power = float(power)
        self.end = float(noise.total_noise(torch.ones((), dtype=_F64)))  # S = sigma_bar(1)
        self.move_end = -math.expm1(-self.end)  # M = 1 - e^{-S}
        self.path_top = 1.0 if self.absorb else self.move_end

    def __repr__(self) -> str:
        return (f"Proposal(end={self.end:.6g}, path_top={self.path_top:.6g}, "
                f"defensive={self.defensive}, power={self.power})")

    def __call__(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = u.to(_F64).clamp(_OPEN, 1.0 - 2.0**-53)  # keep sigma_bar finite: drops < 1e-16
        a, p = 1.0 - self.defensive, self.power  # a: the share drawn in m
        m = self.path_top * (u / a).clamp(max=1.0) ** p
        sigma_path = -torch.log1p(-m)
        if self.defensive:
            uniform_s = self.end * ((u - a) / self.defensive).clamp(min=0.0)
            sigma_path = torch.where(u < a, sigma_path, uniform_s.clamp(min=1e-30))
        return self._net(m, sigma_path), sigma_path, 1.0 / self.density(sigma_path)

    def density(self, sigma_path: torch.Tensor) -> torch.Tensor:
        """``q(sigma_bar_path)`` (R,) float64: the mixture's density in the path's noise."""
        p = self.power
        log_m = torch.log(-torch.expm1(-sigma_path))  # m = (m_top v^p): dm/ds = e^{-s}
        log_in_m = (1 / p - 1) * log_m - math.log(self.path_top) / p - math.log(p)
        return (1 - self.defensive) * torch.exp(log_in_m - sigma_path) + self.defensive / self.end

    def _net(self, m: torch.Tensor, sigma_path: torch.Tensor) -> torch.Tensor:
        # absorbing: the sampler's mask probability is M m_A; uniform: the same noise
        return -torch.log1p(-self.move_end * m) if self.absorb else sigma_path


def block_generator(seed: int, block_id: int) -> torch.Generator:
    """The CPU generator of one block's draws, seeded by ``(seed, block_id)`` only."""
    digest = hashlib.blake2b(f"sedd-ray-bound/{int(seed)}/{int(block_id)}".encode(),
                             digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def draw_block(graph: Graph, proposal: Proposal, x0: torch.Tensor, block_id: int,
               draws: int, seed: int) -> tuple[torch.Tensor, ...]:
    """One block's stratified draws: ``x0`` (L,) long (CPU) -> ``x_t`` (K, L) long and
    ``sigma_bar_net``, ``sigma_bar_path``, ``weight``, each (K,) float64 (K = ``draws``)."""
    g = block_generator(seed, block_id)
    jitter = torch.rand(draws, generator=g, dtype=_F64) + _OPEN
    u = (torch.arange(draws, dtype=_F64) + jitter) / draws
    sigma_net, sigma_path, weight = proposal(u)
    x_t = graph.sample_transition(x0.expand(draws, -1), sigma_path[:, None], generator=g)
    return x_t, sigma_net, sigma_path, weight


def weighted_score_entropy(log_score_fn: LogScoreFn, graph: Graph, x0: torch.Tensor,
                           x_t: torch.Tensor, sigma_bar_net: torch.Tensor,
                           sigma_bar_path: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * sum_l SE_l(x_t, sigma_bar_path)`` per row, nats: (R,) float64.

    ``x0``, ``x_t`` (R, L) long; ``sigma_bar_net`` (the network's), ``sigma_bar_path``
    (the score entropy's) and ``weight`` (R,). Everything on the model's device.
    """
    log_score = log_score_fn(x_t, sigma_bar_net, sigma_bar_path)  # (R, L, dim)
    se = graph.score_entropy(log_score, sigma_bar_path[:, None], x_t, x0)  # (R, L)
    return se.to(_F64).sum(-1) * weight.to(_F64)


@torch.no_grad()
def per_block_bound(log_score_fn: LogScoreFn, graph: Graph, noise: Noise,
                    blocks: torch.Tensor, block_ids: torch.Tensor | Sequence[int], *,
                    draws: int = 16, seed: int = 0, batch_size: int = 256,
                    proposal: Proposal | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The NLL bound of each block, nats per token: ``blocks`` (B, L) -> (B,) float64.

    ``block_ids`` (B,): each block's global index in its split (seeds its draws; see the
    module docstring). ``draws`` stratified times per block; the network sees at most
    ``batch_size`` rows (block x draw) at once, on ``device`` (default: ``blocks``'s).
    Wrap the call in an autocast context to run the network in bfloat16.
    """
    ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
    if blocks.dim() != 2 or ids.numel() != blocks.shape[0]:
        raise ValueError(f"need blocks (B, L) and block_ids (B,), got {tuple(blocks.shape)} "
                         f"and {tuple(ids.shape)}")
    if draws < 1 or batch_size < 1:
        raise ValueError(f"draws and batch_size must be >= 1, got {draws} and {batch_size}")
    device = torch.device(device) if device is not None else blocks.device
    proposal = proposal or Proposal(graph, noise)
    cpu_blocks = blocks.cpu()
    parts = [draw_block(graph, proposal, cpu_blocks[i], int(ids[i]), draws, seed)
             for i in range(len(ids))]
    x_t, s_net, s_path, weight = (torch.cat(p).to(device) for p in zip(*parts))
    x0 = cpu_blocks.repeat_interleave(draws, dim=0).to(device)  # (B K, L)
    values = torch.cat([
        _chunk(log_score_fn, graph, batch_size, x0[r:r + batch_size], x_t[r:r + batch_size],
               s_net[r:r + batch_size], s_path[r:r + batch_size], weight[r:r + batch_size])
        for r in range(0, x0.shape[0], batch_size)
    ])
    integral = values.view(-1, draws).mean(-1)  # (B,) nats per block
    prior = graph.prior_kl(x0[::draws], torch.tensor(proposal.end, dtype=_F64, device=device))
    return ((integral + prior.to(_F64).sum(-1)) / blocks.shape[1]).cpu()


def _chunk(log_score_fn: LogScoreFn, graph: Graph, rows: int, *tensors: torch.Tensor):
    """:func:`weighted_score_entropy` of up to ``rows`` rows, padded to exactly ``rows``
    (repeating the first) so that every network call has the same shape, whichever
    blocks a rank holds: a row's value then does not depend on its neighbours."""
    n = tensors[0].shape[0]
    if n == rows:  # a full chunk: nothing to pad
        return weighted_score_entropy(log_score_fn, graph, *tensors)
    pad = [torch.cat([t, t[:1].expand(rows - n, *t.shape[1:])]) for t in tensors]
    return weighted_score_entropy(log_score_fn, graph, *pad)[:n]


# --- adapters: from a model to a LogScoreFn -------------------------------------------------

def plain_log_score_fn(model: LogScoreModel) -> LogScoreFn:
    """Both noise levels equal: ``model(x_t, sigma_bar_path)``.

    Right for the uniform graph (where they coincide), for a time-independent model, and
    for a model that already gives the conditioned process's scores (e.g. exact ratios of
    its marginal). For a time-conditioned absorbing network this is what ``elbo_nll``
    does today: it bounds a model other than the one sampled.
    """
    return lambda x_t, sigma_bar_net, sigma_bar_path: model(x_t, sigma_bar_path)


def sampler_log_score_fn(model: LogScoreModel, graph: Graph) -> LogScoreFn:
    """Any log-score model of the *sampled* chain, queried at ``sigma_bar_net``.

    Absorbing graph: adds ``log E(sigma_bar_net) - log E(sigma_bar_path)`` (the same
    reverse rate in the path's clock; see the module docstring); uniform: unchanged.
    The current token's log-score stays 0.
    """
    def fn(x_t: torch.Tensor, sigma_bar_net: torch.Tensor,
           sigma_bar_path: torch.Tensor) -> torch.Tensor:
        log_score = model(x_t, sigma_bar_net)
        log_score = log_score.to(torch.promote_types(log_score.dtype, torch.float32))
        if graph.absorb:
            shift = log_expm1(sigma_bar_net, _F64) - log_expm1(sigma_bar_path, _F64)
            log_score = log_score + shift.to(log_score.dtype)[:, None, None]
        return log_score.scatter_(-1, x_t[..., None], 0.0)

    return fn


def score_model_log_score_fn(model: Any) -> LogScoreFn:
    """Adapter for :class:`sedd_ray.model.ScoreModel` (also inside DDP / torch.compile).

    The backbone runs at ``sigma_bar_net``; the post-processing (scale by sigma, the RADD
    denoiser's ``1 / E``) uses ``sigma_bar_path``. Equals ``model(x_t, sigma_bar)`` when
    the two are equal, and :func:`sampler_log_score_fn` of the model otherwise. Put the
    model in eval mode first (dropout); the trainer's EMA copy already is.
    """
    net = _unwrap(model)

    def fn(x_t: torch.Tensor, sigma_bar_net: torch.Tensor,
           sigma_bar_path: torch.Tensor) -> torch.Tensor:
        if net.time_independent:
            log_p = net.backbone(x_t, None).log_softmax(dim=-1)  # (B, L, N)
            return net.log_score_from_denoiser(log_p, x_t, sigma_bar_path.float())
        raw = net.backbone(x_t, sigma_bar_net.float())  # (B, L, dim) float32
        return _post_process(net, raw, x_t, sigma_bar_net, sigma_bar_path)

    return fn


def _post_process(net: Any, raw: torch.Tensor, x_t: torch.Tensor,
                  sigma_bar_net: torch.Tensor, sigma_bar_path: torch.Tensor) -> torch.Tensor:
    """ScoreModel's post-processing with the path's noise level. (B, L, dim) float32.

    A scale-by-sigma network's output is a score only through the graph's shift, so the
    shift takes the path's noise level (``graph.output_log_score`` at ``sigma_bar_path``).
    Any other absorbing network's log-score is the sampler's at ``sigma_bar_net``; the
    conditioned path's differs from it at a mask by ``log E_net - log E_path``.
    """
    if net.cfg.scale_by_sigma or not net.graph.absorb:
        return net.log_score_from_raw(raw, x_t, sigma_bar_path.float())
    shift = log_expm1(sigma_bar_path, _F64) - log_expm1(sigma_bar_net, _F64)
    log_score = raw - shift.to(raw.dtype)[:, None, None]
    return log_score.scatter_(-1, x_t[..., None], 0.0)


def _unwrap(model: Any) -> Any:
    """The ScoreModel inside DDP (``.module``) or torch.compile (``._orig_mod``)."""
    while not hasattr(model, "backbone"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a ScoreModel (with .backbone), got {type(model).__name__}")
        model = inner
    return model


# --- blocks and statistics ------------------------------------------------------------------

def spread_block_indices(n_blocks: int, count: int | None = None) -> torch.Tensor:
    """A fixed, evenly spread sample of ``count`` block indices out of ``n_blocks``. (k,) long.

    Index ``i`` of ``k = min(count, n_blocks)`` is ``floor((i + 1/2) n_blocks / k)``: the
    midpoints of ``k`` equal slices of the split. ``count=None`` (or >= ``n_blocks``)
    takes every block. Depends on nothing else, so every trial of a study gets the same.
    """
    if n_blocks < 1:
        raise ValueError(f"the split has no blocks (n_blocks={n_blocks}); lower data.seq_len "
                         "or use a larger validation split")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 (or None for all blocks), got {count}")
    k = n_blocks if count is None else min(count, n_blocks)
    return torch.div((2 * torch.arange(k) + 1) * n_blocks, 2 * k, rounding_mode="floor")


def split_bound(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, split: torch.Tensor, *,
                count: int | None = None, rank: int = 0, world: int = 1,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the evaluation of a split: ``split`` (n, L) -> ``(ids, bound)``.

    The blocks are :func:`spread_block_indices` ``(n, count)``; rank ``r`` of ``world``
    takes every ``world``-th of them from the ``r``-th on. Returns their global indices
    (k_r,) long and their bounds (k_r,) float64 (nats per token; ``kwargs`` go to
    :func:`per_block_bound`). Gather ``(ids, bound)`` from all ranks and sort by ``ids``:
    the result is the same for any ``world``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    ids = spread_block_indices(split.shape[0], count)[rank::world]
    return ids, per_block_bound(log_score_fn, graph, noise, split[ids], ids, **kwargs)


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-block estimates (n,) and its standard error (sample std / sqrt(n))."""
    v = torch.as_tensor(values, dtype=_F64).reshape(-1)
    if v.numel() < 2:
        raise ValueError(f"need at least 2 per-block estimates for a standard error, got {v.numel()}")
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over blocks and its standard error; ``a``, ``b`` (n,) on the same
    blocks with the same draws (same ``seed`` and ``block_ids``)."""
    a = torch.as_tensor(a, dtype=_F64).reshape(-1)
    b = torch.as_tensor(b, dtype=_F64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired estimates need the same blocks: got {a.numel()} and {b.numel()}")
    return mean_stderr(a - b)
