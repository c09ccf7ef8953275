"""The implementations the speed work replaced, kept verbatim as references.

``benchmarks/run.py`` times them against the current code (the "before" figures of
RESULTS.md) and ``tests/test_perf_features.py`` checks the current code's values and
gradients against them. Nothing in ``sedd_ray`` imports this file.
"""

from __future__ import annotations

import torch

from sedd_ray.diffusion.graphs import _as_float, _phi, _score_dtype


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
    """The unfused score entropy of ``graph`` (absorbing or uniform)."""
    fn = absorb_score_entropy if graph.absorb else uniform_score_entropy
    return fn(graph, log_score, sigma, x, x0)
