"""Reverse-time samplers: predictors, the final denoiser, the loop, and conditioning.

The loop starts from the graph's limit at ``t = 1`` and walks the grid
``linspace(1, eps, steps + 1)``; each step calls a predictor from :data:`PREDICTORS`:

- ``euler``: ``p = onehot(x) + dt sigma(t) Graph.reverse_rate(x, s)``, negatives clamped,
  renormalised (:meth:`Graph.euler_probs`).
- ``analytic`` (Tweedie tau-leaping): with ``d = sigma_bar(t) - sigma_bar(t - dt)``,
  ``p = staggered_score(s, d) * transp_transition(x, d)``; exact for one position when
  ``s`` is the exact score (:meth:`Graph.tweedie_probs`).

Each step builds its (B, L, dim) float64 distribution in one tensor and draws from it in
place (clamp, cumsum, searchsorted): the graphs' closed forms replace the products of
dense (B, L, dim) factors.

``denoise=True`` adds an analytic step from ``eps`` to 0 that removes all remaining noise;
it draws among the real tokens only, so no extra state (a mask) survives. Fixed
positions (prefix / infill conditioning) are overwritten before every step and at the end.

Cached sampling (RADD): for the absorbing graph the score at a mask factorises as
``p(x0 = y | x_t) / expm1(sigma_bar)``, so a time-independent network's output can be
reused while no token changed. :class:`DenoiserScore` is such a ``score_fn``;
:func:`model_score_fn` builds the right ``score_fn`` for a model. With the loglinear
schedule every position unmasks at a uniform time, so a sequence changes in a fraction
``1 - (1 - 1/steps)^L`` of the steps: about 63% at ``steps = L``, 39% at ``steps = 2 L``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from sedd_ray.diffusion.graphs import Graph, _draw_
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


class DenoiserScore:
    """``score_fn`` of a time-independent absorbing network (RADD) that reuses its output.

        score_fn = DenoiserScore(model.denoiser_logprobs, model.log_score_from_denoiser)
        x = sample(score_fn, graph, noise, ...)  # = sample(exp(model(x, sb)), ...), fewer calls

    ``denoiser(x (B, L) long) -> out (B, L, K)`` is the time-independent network part;
    ``to_log_score(out, x (B, L), sigma_bar (B,)) -> log-scores (B, L, dim)`` the cheap
    time-dependent rest. Scores are ``exp(to_log_score(...))``. ``cache``:

    - ``"batch"`` (or True): call the denoiser only when ``x`` differs from the previous
      call's ``x``, else reuse its output. A deterministic denoiser would return the same
      tensor, so the samples are bit for bit those of the uncached sampler.
    - ``"rows"``: call it on the rows (sequences) of ``x`` that changed. Far fewer calls for
      a batch, but a row evaluated in a smaller batch may round differently in the last
      bit (matmul blocking depends on the batch size), so the samples match the uncached
      ones except where a draw falls within rounding of a category boundary.
    - ``"off"`` (or False): call it every time (the reference).

    The cache assumes a fixed denoiser: :meth:`reset` (which :func:`sample` calls at its
    start and end) after changing weights. ``calls`` and ``rows`` count the denoiser calls
    and the sequences evaluated.
    """

    time_independent = True
    MODES = ("batch", "rows", "off")

    def __init__(self, denoiser: Callable[[torch.Tensor], torch.Tensor],
                 to_log_score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 cache: str | bool = "batch",
                 context: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        cache = {True: "batch", False: "off"}.get(cache, cache)
        if cache not in self.MODES:
            raise ValueError(f"cache must be one of {', '.join(self.MODES)}, got {cache!r}")
        self.denoiser, self.to_log_score, self.cache = denoiser, to_log_score, cache
        self.context = context
        self.calls = self.rows = 0
        self.reset()

    def reset(self) -> None:
        """Forget the cached output (and the ``x`` it belongs to)."""
        self._x: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def _evaluate(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        with self.context():
            return self.denoiser(x)

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for ``x`` (B, L), from the cache where it allows."""
        last, out = self._x, self._out
        if self.cache == "off" or last is None or last.shape != x.shape or last.device != x.device:
            out = self._evaluate(x)
        elif self.cache == "rows":
            changed = (x != last).any(dim=-1).nonzero().squeeze(-1)  # (n_changed,)
            if changed.numel():
                out.index_copy_(0, changed, self._evaluate(x.index_select(0, changed)))
        elif not torch.equal(x, last):
            out = self._evaluate(x)
        if self.cache != "off":
            self._x, self._out = x.clone(), out
        return out

    def __call__(self, x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        out = self.denoise(x)
        with self.context():
            return self.to_log_score(out, x, sigma_bar).float().exp()


def model_score_fn(model: Any, cache: str | bool = "batch",
                   autocast: AbstractContextManager[Any] | None = None) -> ScoreFn:
    """The sampler's ``score_fn`` for a score model: ``exp(model(x, sigma_bar))``.

    A time-independent model (``model.time_independent``, with ``denoiser_logprobs`` and
    ``log_score_from_denoiser``, as :class:`sedd_ray.model.ScoreModel` with
    ``time_conditioning=False``) gets a :class:`DenoiserScore` with ``cache``; its default
    ``"batch"`` cache gives the same samples as the plain score. ``autocast`` (e.g.
    ``torch.autocast("cuda", dtype=torch.bfloat16)``) wraps every model call.
    """
    context = (lambda: autocast) if autocast is not None else nullcontext
    if getattr(model, "time_independent", False):
        return DenoiserScore(model.denoiser_logprobs, model.log_score_from_denoiser, cache,
                             context)

    def score_fn(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        with context():
            return model(x, sigma_bar).float().exp()

    return score_fn


@PREDICTORS.register("euler")
def euler_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
               t: torch.Tensor, t_next: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One Euler step of the reverse CTMC from ``t`` to ``t_next`` (both (B,)). x (B, L)."""
    sigma_bar, dsigma = noise(t)
    score = _score(score_fn, x, sigma_bar)
    step = ((t - t_next) * dsigma)[:, None]
    return _draw_(graph.euler_probs(x, score, step).to(torch.float64), generator)


@PREDICTORS.register("analytic")
def analytic_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
                  t: torch.Tensor, t_next: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One Tweedie tau-leaping step from ``t`` to ``t_next`` (both (B,)). x (B, L)."""
    sigma_bar, _ = noise(t)
    d = (sigma_bar - noise(t_next)[0])[:, None]
    score = _score(score_fn, x, sigma_bar)
    return _draw_(graph.tweedie_probs(x, score, d).to(torch.float64), generator)


def denoise_step(score_fn: ScoreFn, graph: Graph, noise: Noise, x: torch.Tensor,
                 t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Analytic step from ``t`` (B,) all the way to ``sigma_bar = 0``.

    Draws among the real tokens only (states ``0 .. vocab_size - 1``, the Graph contract):
    a state beyond them (the absorbing graph's mask) never survives.
    """
    sigma_bar, _ = noise(t)
    sb = sigma_bar[:, None]
    score = _score(score_fn, x, sigma_bar)
    probs = graph.tweedie_probs(x, score, sb)
    if graph.vocab_size < graph.dim:  # drop the extra states (a view: no copy otherwise)
        probs = probs[..., : graph.vocab_size].contiguous()
    return _draw_(probs.to(torch.float64), generator)


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
    (else CPU). All randomness comes from ``generator``. A ``score_fn`` with a ``reset()``
    method (a :class:`DenoiserScore` cache) is reset at the start and at the end.
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

    reset = getattr(score_fn, "reset", None)
    if reset is not None:
        reset()
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
    if reset is not None:
        reset()
    return project(x)
