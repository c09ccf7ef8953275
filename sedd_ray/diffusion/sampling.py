"""Reverse-time samplers: predictors, the final denoiser, the loop, and conditioning.

The loop starts from the graph's limit at ``t = 1`` and walks the grid
``linspace(1, eps, steps + 1)``; each step calls a predictor from :data:`PREDICTORS`:

- ``euler``: ``p = onehot(x) + dt sigma(t) reverse_rate(x, s)``, negatives clamped,
  renormalised.
- ``analytic`` (Tweedie tau-leaping): with ``d = sigma_bar(t) - sigma_bar(t - dt)``,
  ``p = staggered_score(s, d) * transp_transition(x, d)``; exact for one position when
  ``s`` is the exact score.

``denoise=True`` adds an analytic step from ``eps`` to 0 that removes all remaining noise;
for the absorbing graph the mask is excluded from that draw, so no mask survives. Fixed
positions (prefix / infill conditioning) are overwritten before every step and at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sedd_ray.diffusion.graphs import Graph, sample_categorical
from sedd_ray.diffusion.noise import Noise
from sedd_ray.registry import Registry

# score_fn(x (B, L) long, sigma_bar (B,) float) -> scores, not log-scores, (B, L, dim)
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# predictor(score_fn, graph, noise, x (B, L), t (B,), t_next (B,), generator) -> x (B, L)
Predictor = Callable[
    [ScoreFn, Graph, Noise, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Generator | None"],
    torch.Tensor,
]

PREDICTORS: Registry[Predictor] = Registry("predictor")


def get_predictor(name: str) -> Predictor:
    """The predictor step registered as ``name``; unknown names list the valid ones."""
    return PREDICTORS.get(name)


def _score(score_fn: ScoreFn, x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
    # the network sees float32 noise levels; the math around it stays in float64
    return score_fn(x, sigma_bar.to(torch.float32))


@PREDICTORS.register("euler")
def euler_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
               t: torch.Tensor, t_next: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One Euler step of the reverse CTMC from ``t`` to ``t_next`` (both (B,)). x (B, L)."""
    sigma_bar, dsigma = noise(t)
    score = _score(score_fn, x, sigma_bar)
    step = ((t - t_next) * dsigma)[:, None, None]
    return graph.sample_rate(x, step * graph.reverse_rate(x, score), generator)


@PREDICTORS.register("analytic")
def analytic_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
                  t: torch.Tensor, t_next: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One Tweedie tau-leaping step from ``t`` to ``t_next`` (both (B,)). x (B, L)."""
    sigma_bar, _ = noise(t)
    d = (sigma_bar - noise(t_next)[0])[:, None]
    score = _score(score_fn, x, sigma_bar)
    probs = graph.staggered_score(score, d) * graph.transp_transition(x, d)
    return sample_categorical(probs, generator)


def denoise_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
                 t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Analytic step from ``t`` (B,) all the way to ``sigma_bar = 0``; never draws a mask."""
    sigma_bar, _ = noise(t)
    sb = sigma_bar[:, None]
    score = _score(score_fn, x, sigma_bar)
    probs = graph.staggered_score(score, sb) * graph.transp_transition(x, sb)
    if graph.mask_id is not None:  # the mask is the last state: draw among real tokens only
        probs = probs[..., : graph.mask_id]
    return sample_categorical(probs, generator)


def conditioning_from_prefix_suffix(prefix_ids: list[int], suffix_ids: list[int], length: int,
                                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed positions for prefix / suffix conditioning: ``(fixed_mask, fixed_tokens)``.

    Returns a bool (batch, length) mask, True on the first ``len(prefix_ids)`` and the last
    ``len(suffix_ids)`` positions, and long (batch, length) tokens (0 where not fixed).
    """
    n_pre, n_suf = len(prefix_ids), len(suffix_ids)
    if n_pre + n_suf > length:
        raise ValueError(
            f"prefix ({n_pre} tokens) + suffix ({n_suf} tokens) = {n_pre + n_suf} exceeds the "
            f"sample length {length}; pass a longer length or shorter prompts"
        )
    mask = torch.zeros(length, dtype=torch.bool)
    tokens = torch.zeros(length, dtype=torch.long)
    if n_pre:
        mask[:n_pre] = True
        tokens[:n_pre] = torch.tensor(prefix_ids, dtype=torch.long)
    if n_suf:
        mask[length - n_suf:] = True
        tokens[length - n_suf:] = torch.tensor(suffix_ids, dtype=torch.long)
    return mask.expand(batch, length).clone(), tokens.expand(batch, length).clone()


@torch.no_grad()
def sample(score_fn: ScoreFn, graph: Graph, noise: Noise, batch: int, length: int, steps: int,
           predictor: str = "analytic", denoise: bool = True, eps: float = 1e-5,
           generator: torch.Generator | None = None,
           device: torch.device | str | None = None,
           fixed_mask: torch.Tensor | None = None, fixed_tokens: torch.Tensor | None = None,
           progress: bool = False) -> torch.Tensor:
    """Draw ``batch`` sequences of ``length`` tokens. -> LongTensor (batch, length).

    ``score_fn(x (B, L) long, sigma_bar (B,) float32) -> scores (B, L, dim)`` (not log).
    ``fixed_mask`` (B, L) bool and ``fixed_tokens`` (B, L) long pin positions (see
    :func:`conditioning_from_prefix_suffix`). ``device`` defaults to the generator's device
    (else CPU). All randomness comes from ``generator``.
    """
    step_fn = get_predictor(predictor)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}; the SEDD default is 1e-5")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if (fixed_mask is None) != (fixed_tokens is None):
        raise ValueError("pass fixed_mask and fixed_tokens together (or neither)")
    if fixed_mask is not None:
        fixed_mask = fixed_mask.to(device=device, dtype=torch.bool).expand(batch, length)
        fixed_tokens = fixed_tokens.to(device=device, dtype=torch.long).expand(batch, length)

    def project(x: torch.Tensor) -> torch.Tensor:
        return x if fixed_mask is None else torch.where(fixed_mask, fixed_tokens, x)

    x = graph.sample_limit(batch, length, device=device, generator=generator)
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64, device=device)
    ones = torch.ones(batch, dtype=torch.float64, device=device)
    indices = range(steps)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"sampling ({predictor})", leave=False)
    for i in indices:
        x = project(x)
        x = step_fn(score_fn, graph, noise, x, grid[i] * ones, grid[i + 1] * ones, generator)
    if denoise:
        x = project(x)
        x = denoise_step(score_fn, graph, noise, x, grid[-1] * ones, generator)
    return project(x)
