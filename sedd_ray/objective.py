"""What a run trains and how it is scored, by ``model.kind``: the trainer's only switch.

    objective = build_objective(cfg, graph, noise)       # OBJECTIVES.get(cfg.model.kind)
    model = objective.build_model(cfg.model)
    per_seq = objective.loss(model, x0, generator)       # (B, L) long -> (B,) nats/sequence
    ids, nll = objective.split_nll(model, split, count=, rank=, world=, draws=, seed=,
                                   batch_size=, device=)  # (n, L) -> (k_r,) long, (k_r,) f64
    x = objective.sample(model, batch=, length=, steps=, generator=, device=, autocast=,
                         predictor="analytic", cache="batch")  # (batch, length) long
    objective.exact_nll                                  # split_nll is exact, not a bound

``split_nll`` takes the blocks :func:`~sedd_ray.diffusion.bound.spread_block_indices`
``(n, count)[rank::world]`` for every kind, so a diffusion trial's bound and an AR trial's
exact NLL cover the same validation blocks in the same nats/token (all ``L`` tokens).

- ``diffusion``: SEDD (:func:`~sedd_ray.diffusion.score_entropy_loss`, the importance-sampled
  bound :func:`~sedd_ray.diffusion.bound.split_bound`, the sampler with its ``predictor``
  and the RADD denoiser ``cache`` mode).
- ``ar``: the autoregressive reference (:mod:`sedd_ray.ar`): next-token cross-entropy, the
  exact NLL (``draws`` and ``seed`` are unused: nothing is random), ancestral sampling
  (``steps``, ``predictor`` and ``cache`` are unused: one network call per token). The graph
  and noise are ignored.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from sedd_ray.ar import ARModel, ancestral_sample, block_nll, token_nll
from sedd_ray.config import DiffusionConfig, ModelConfig, RunConfig
from sedd_ray.diffusion import model_score_fn, sample, score_entropy_loss
from sedd_ray.diffusion.bound import score_model_log_score_fn, split_bound, spread_block_indices
from sedd_ray.model import ScoreModel
from sedd_ray.registry import Registry

__all__ = ["OBJECTIVES", "ARObjective", "DiffusionObjective", "build_objective"]

OBJECTIVES: Registry[type] = Registry("model kind")


@OBJECTIVES.register("diffusion")
class DiffusionObjective:
    """SEDD: the score network, score entropy, the bound, the analytic sampler."""

    exact_nll = False  # split_nll is the ELBO's bound

    def __init__(self, graph: Any, noise: Any, settings: DiffusionConfig | None = None) -> None:
        self.graph, self.noise = graph, noise
        self.settings = settings or DiffusionConfig()

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return ScoreModel(cfg, self.graph)

    def loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return score_entropy_loss(model, self.graph, self.noise, x0, eps_t=self.settings.eps_t,
                                  antithetic=self.settings.antithetic, generator=generator)

    def split_nll(self, model: nn.Module, split: torch.Tensor, **kwargs: Any):
        return split_bound(score_model_log_score_fn(model), self.graph, self.noise, split,
                           **kwargs)

    def sample(self, model: nn.Module, *, batch: int, length: int, steps: int,
               generator: torch.Generator, device: torch.device, autocast: Any = None,
               predictor: str = "analytic", cache: str | bool = "batch"):
        # a time-independent (RADD) model reuses its output while no token changed
        score_fn = model_score_fn(model, cache=cache, autocast=autocast)
        return sample(score_fn, self.graph, self.noise, batch=batch, length=length, steps=steps,
                      predictor=predictor, denoise=True, eps=self.settings.sampling_eps,
                      generator=generator, device=device)


@OBJECTIVES.register("ar")
class ARObjective:
    """The autoregressive reference; the graph and noise are accepted and ignored."""

    exact_nll = True  # split_nll is the model's exact NLL

    def __init__(self, graph: Any, noise: Any = None, settings: Any = None) -> None:
        self.vocab_size = graph.vocab_size  # the real tokens (no mask)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return ARModel(cfg, self.vocab_size)

    def loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return token_nll(model, x0).sum(dim=1)  # (B,) nats/sequence; dropout: global RNG

    def split_nll(self, model: nn.Module, split: torch.Tensor, *, count: int | None = None,
                  rank: int = 0, world: int = 1, batch_size: int = 64,
                  device: torch.device | str = "cpu", **unused: Any):
        ids = spread_block_indices(split.shape[0], count)[rank::world]
        return ids, block_nll(model, split[ids], batch_size=batch_size, device=device)

    def sample(self, model: nn.Module, *, batch: int, length: int, steps: int,
               generator: torch.Generator, device: torch.device, autocast: Any = None,
               **unused: Any):
        with autocast or nullcontext():
            return ancestral_sample(model, batch=batch, length=length, generator=generator,
                                    device=device)


def build_objective(cfg: RunConfig, graph: Any, noise: Any) -> Any:
    """The objective of ``cfg.model.kind`` for a graph (its ``vocab_size``) and noise."""
    return OBJECTIVES.get(cfg.model.kind)(graph, noise, cfg.diffusion)
