"""The implementations the speed work replaced, kept verbatim as references.

``benchmarks/run.py`` times them against the current code (the "before" figures of
RESULTS.md) and ``tests/test_perf_features.py`` checks the current code's values and
gradients against them. Nothing in ``sedd_ray`` imports this file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from sedd_ray.diffusion import graphs, sampling
from sedd_ray.diffusion.graphs import _as_float, _phi, _rand, _score_dtype
from sedd_ray.model import MASK_LOG_SCORE, ScoreModel, log_expm1


def absorb_score_entropy(graph, log_score: torch.Tensor, sigma, x: torch.Tensor,
                         x0: torch.Tensor) -> torch.Tensor:
    """Unfused absorbing score entropy: ~3 (B, L, dim) temporaries forward, more backward."""
    ls = log_score.to(_score_dtype(log_score))
    sigma = _as_float(sigma, x).to(ls.dtype)
    shape = torch.broadcast_shapes(x.shape, x0.shape, sigma.shape)
    x, x0 = x.expand(shape), x0.expand(shape)
    e = torch.expm1(sigma.expand(shape))
    masked = x == graph.mask_id
    tokens = ls[..., : graph.mask_id]
    others = tokens.masked_fill(~masked[..., None], float("-inf"))
    others = others.scatter(-1, x0[..., None], float("-inf"))
    l_x0 = torch.where(masked, tokens.gather(-1, x0[..., None]).squeeze(-1), 0.0)
    se = others.exp().sum(-1) + _phi(l_x0 + torch.log(e)) / e
    return torch.where(masked, se, 0.0)


def uniform_score_entropy(graph, log_score: torch.Tensor, sigma, x: torch.Tensor,
                          x0: torch.Tensor) -> torch.Tensor:
    """Unfused uniform score entropy."""
    n = graph.dim
    ls = log_score.to(_score_dtype(log_score))
    sigma = _as_float(sigma, x).to(ls.dtype)
    shape = torch.broadcast_shapes(x.shape, x0.shape, sigma.shape)
    x, x0 = x.expand(shape), x0.expand(shape)
    e = torch.expm1(sigma.expand(shape))
    rho = e / (e + n)
    log_rho = torch.log(rho)
    same = x == x0
    c = torch.where(same, log_rho, 0.0)
    w = torch.where(same, rho / n, 1.0 / n)
    fill = c[..., None]
    ls_rest = ls.scatter(-1, x[..., None], fill).scatter(-1, x0[..., None], fill)
    rest = ls_rest.exp().sum(-1) / n - w * ls_rest.sum(-1) + w * n * (c - 1)
    rest = rest.clamp_min(0.0)
    l_x0 = torch.where(same, 0.0, ls.gather(-1, x0[..., None]).squeeze(-1))
    at_x0 = _phi(l_x0 + log_rho) / (n * rho)
    return rest + torch.where(same, 0.0, at_x0)


def score_entropy(graph, log_score, sigma, x, x0):
    """The unfused score entropy of ``graph`` (the built-in absorbing or uniform graph:
    the two with ``fused_score_entropy``)."""
    fn = absorb_score_entropy if graph.absorb else uniform_score_entropy
    return fn(graph, log_score, sigma, x, x0)


# --- the sampler's draw and step distributions -----------------------------------------------

def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The textbook draw: clamp, renormalise, cumsum, searchsorted (7 passes over (*, K))."""
    p = probs.detach().to(torch.float64).clamp_min(0.0)
    total = p.sum(dim=-1, keepdim=True)
    if not bool(torch.isfinite(total).all()):
        raise ValueError("sample_categorical got non-finite probabilities (NaN or inf scores?)")
    p = torch.where(total > 0, p, torch.ones_like(p))
    cdf = p.cumsum(dim=-1)
    u = _rand(cdf.shape[:-1] + (1,), generator, cdf.device) * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    return idx.clamp_max(p.shape[-1] - 1).squeeze(-1)


def tweedie_probs(graph, i, score, dsigma):
    """The generic analytic-step distribution: staggered_score * transp_transition."""
    return graph.staggered_score(score, dsigma) * graph.transp_transition(i, dsigma)


def euler_probs(graph, i, score, step):
    """The generic Euler-step distribution: onehot(i) + step * reverse_rate(i, score)."""
    rate = _as_float(step, score)[..., None] * graph.reverse_rate(i, score)
    return rate.scatter_add(-1, i[..., None], torch.ones_like(rate[..., :1]))


# --- the model's output post-processing --------------------------------------------------------

def model_forward(self: ScoreModel, x_t: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
    """ScoreModel.forward before the speed work (three (B, L, dim) temporaries)."""
    B, L = x_t.shape
    sigma_bar = torch.as_tensor(sigma_bar, dtype=torch.float32, device=x_t.device).reshape(-1)
    sigma_bar = sigma_bar.expand(B)
    raw = self.backbone(x_t, None if self.time_independent else sigma_bar)
    if self.time_independent:
        log_p = raw.log_softmax(dim=-1) - log_expm1(sigma_bar)[:, None, None]
        log_score = torch.cat([log_p, log_p.new_full((B, L, 1), MASK_LOG_SCORE)], dim=-1)
    elif self.cfg.scale_by_sigma and self.absorb:  # the absorbing graph's shift
        log_score = raw - log_expm1(sigma_bar)[:, None, None] - math.log(self.dim - 1)
    else:
        log_score = raw
    return log_score.scatter(-1, x_t[..., None], 0.0)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Run the code as it was before the speed work: the unfused score entropy, model
    post-processing, step distributions and draw (patched in, restored on exit)."""
    saved = [
        (graphs.Absorbing, "score_entropy", graphs.Absorbing.__dict__["score_entropy"]),
        (graphs.Uniform, "score_entropy", graphs.Uniform.__dict__["score_entropy"]),
        (graphs.Absorbing, "tweedie_probs", graphs.Absorbing.__dict__["tweedie_probs"]),
        (graphs.Uniform, "tweedie_probs", graphs.Uniform.__dict__["tweedie_probs"]),
        (graphs.Absorbing, "euler_probs", graphs.Absorbing.__dict__["euler_probs"]),
        (graphs.Graph, "euler_probs", graphs.Graph.__dict__["euler_probs"]),
        (ScoreModel, "forward", ScoreModel.__dict__["forward"]),
        (sampling, "_draw_", sampling._draw_),
    ]
    try:
        graphs.Absorbing.score_entropy = absorb_score_entropy
        graphs.Uniform.score_entropy = uniform_score_entropy
        for cls in (graphs.Absorbing, graphs.Uniform):
            cls.tweedie_probs = tweedie_probs
        graphs.Absorbing.euler_probs = euler_probs
        graphs.Graph.euler_probs = euler_probs
        ScoreModel.forward = model_forward
        sampling._draw_ = sample_categorical
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
