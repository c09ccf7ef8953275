"""A factorised toy distribution with a known exact score, shared by the loss and sampler tests.

Each of the ``L`` positions is independent with its own categorical over ``N`` tokens, so
the time-t marginal is ``graph.forward_marginal(P0, sigma_bar)`` and the exact score is a
ratio of its entries.
"""

from __future__ import annotations

import torch

from sedd_ray.diffusion import Graph

N, L = 5, 4
F64 = torch.float64

# each position independent with its own categorical over N tokens. (L, N)
P0 = torch.tensor([
    [0.50, 0.25, 0.15, 0.07, 0.03],
    [0.03, 0.07, 0.15, 0.25, 0.50],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.60, 0.10, 0.10, 0.10, 0.10],
], dtype=F64)


def _marginal(graph: Graph, p0: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
    """p_t for the factorised ``p0`` (L, N) at ``sigma_bar`` (B,), in float64. (B, L, dim)."""
    return graph.forward_marginal(p0, sigma_bar.to(F64)[:, None])


def exact_score_fn(graph: Graph, p0: torch.Tensor = P0):
    """score_fn(x_t, sigma_bar) -> p_t(y) / p_t(x_t) for the factorised p0 (L, N)."""

    def score_fn(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        pt = _marginal(graph, p0, sigma_bar)  # (B, L, dim)
        return (pt / pt.gather(-1, x[..., None])).float()

    return score_fn


def exact_log_score_model(graph: Graph, p0: torch.Tensor = P0):
    """model(x_t, sigma_bar) -> log p_t(y) / p_t(x_t), the exact marginal log-ratio."""

    def model(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        pt = _marginal(graph, p0, sigma_bar)  # (B, L, dim)
        return (pt.log() - pt.gather(-1, x[..., None]).log()).float()

    return model
