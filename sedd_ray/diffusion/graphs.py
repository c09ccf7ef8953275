"""Forward processes of SEDD: the rate matrix Q of each graph, in closed form.

Register a new graph with ``@GRAPHS.register("name")`` (from anywhere: see
``docs/extending.md``); the shared property suite in ``tests/suites.py`` checks it
against a dense matrix exponential. Everything the rest of the code does differently for
a graph is a method or capability of :class:`Graph` with a default (the ELBO's path noise,
the model's output parameterisation, RADD time-independence, the fused score entropy).
"""

from __future__ import annotations

import abc
import math
import operator

import torch
import torch.nn.functional as F

from sedd_ray.diffusion.noise import MaskConditioned, Noise
from sedd_ray.diffusion.params import Param, check_param_names, declared_params
from sedd_ray.registry import Registry

GRAPHS: Registry[type[Graph]] = Registry("graph")

MASK_LOG_SCORE = -1e4  # RADD: log-score of jumping to the mask; exp() is exactly 0 in float32


def get_graph(name: str, vocab_size: int, **params: float | int | bool | str) -> Graph:
    """The graph registered as ``name`` over ``vocab_size`` real tokens, with ``params``.

    Unknown names raise ``ValueError`` listing the valid ones; a parameter the graph does
    not declare raises ``TypeError`` naming the ones it does (:meth:`Graph.params`).
    """
    cls = GRAPHS.get(name)
    check_param_names("graph", name, params, cls.params())
    return cls(vocab_size, **params)


def log_expm1(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log(e^x - 1) in ``dtype`` (float32 by default); finite for any x > 0 that ``dtype``
    holds (from ~1e-38 up to float32's max in float32).

    expm1 keeps small x exact; for x >= 1 the form x + log1p(-e^{-x}) never overflows.
    """
    x = x.to(dtype)
    small = torch.log(torch.expm1(x.clamp(max=1.0)))
    large = x + torch.log1p(-torch.exp(-x.clamp(min=1.0)))
    return torch.where(x < 1.0, small, large)


# --- small helpers shared by graphs and the sampler -------------------------------------------


def _as_float(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a floating tensor (at least float32) on ``like``'s device."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    return sigma.to(torch.promote_types(sigma.dtype, torch.float32))


def _rand(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
          device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U[0, 1) draws made on the generator's device (a CPU generator works for CUDA data)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _onehot(i: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Float one-hot of ``i`` (*,) -> (*, dim), without an int64 intermediate."""
    out = torch.zeros(*i.shape, dim, dtype=dtype, device=i.device)
    return out.scatter_(-1, i[..., None], True if dtype == torch.bool else 1.0)


def _phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = e^u - u - 1 >= 0, computed without cancellation near u = 0."""
    return (torch.expm1(u) - u).clamp_min(0.0)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of unnormalised ``probs`` (*, K) -> LongTensor (*,).

    Negative entries are clamped to 0 and rows are renormalised; the draw is an inverse
    CDF in float64 (float32 Gumbel-max lowers the effective temperature). A row with no
    positive mass draws uniformly over its K entries; a non-finite entry raises.
    ``probs`` is not modified.
    """
    p = probs.detach()
    p = p.to(torch.float64) if p.dtype != torch.float64 else p.clone()
    return _draw_(p, generator)


def _draw_(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`sample_categorical` of a float64 (*, K) tensor that it may overwrite.

    Works in place (clamp, then cumsum): one pass less than a copy each. Draws exactly
    what the textbook version (clamp, renormalise, cumsum, searchsorted) draws.
    """
    cdf = p.clamp_min_(0.0).cumsum_(dim=-1)
    total = cdf[..., -1:]  # (*, 1)
    if not bool(torch.isfinite(total).all()):
        raise ValueError("sample_categorical got non-finite probabilities (NaN or inf scores?)")
    r = _rand(cdf.shape[:-1] + (1,), generator, cdf.device)
    idx = torch.searchsorted(cdf.contiguous(), r * total, right=True)
    k = p.shape[-1]
    idx = torch.where(total > 0, idx, (r * k).long())  # no mass: uniform over the K entries
    return idx.clamp_max(k - 1).squeeze(-1)


# --- the base class ---------------------------------------------------------------------------


class Graph(abc.ABC):
    r"""A continuous-time Markov chain on ``dim`` states, applied to each position alone.

    Notation (columns are "from", rows are "to"):

    - ``Q`` is ``(dim, dim)``; ``Q[y, x] >= 0`` is the rate of jumping from ``x`` to
      ``y != x`` and each column sums to zero.
    - States ``0 .. vocab_size - 1`` are the real tokens (what ``x_0`` and a finished
      sample hold); any extra state comes after them (a mask is always the last state).
    - Forward marginal: ``p_t(x_t | x_0) = exp(sigma_bar(t) Q)[x_t, x_0]``, where
      ``sigma_bar`` is the total noise of the schedule (:mod:`sedd_ray.diffusion.noise`).
    - Reverse process: ``Qbar_t[y, x] = Q[x, y] * p_t(y) / p_t(x)`` for ``y != x``. The
      network learns the *score* ``s(x)_y ~ p_t(y) / p_t(x)`` (``l = log s``).
    - Denoising score entropy at one position, with ``r_y = p(y | x_0) / p(x_t | x_0)``
      the true conditional ratio and ``K(a) = a (log a - 1)``:

          SE = sum_{y != x_t} Q[x_t, y] (s_y - r_y l_y + K(r_y))
             = sum_{y != x_t} Q[x_t, y] r_y phi(l_y - log r_y),   phi(u) = e^u - u - 1

      (for ``r_y = 0`` the term is ``s_y``). Each term is ``>= 0`` and ``0`` exactly at
      ``s_y = r_y``. Subclasses keep the terms with a large ratio (``r ~ 1/sigma_bar``) in
      the phi form: in the first form their two halves (~ r log r each) cancel in float32.
      Training weights SE by ``sigma(t)``; see :mod:`sedd_ray.diffusion.loss`.
    - Tweedie step back from ``sigma_bar`` to ``sigma_bar - d``:
      ``p(x_{sigma_bar-d} = y | x_sigma_bar = x) = [exp(-d Q) s]_y * exp(d Q)[x, y]``, i.e.
      ``staggered_score(s, d) * transp_transition(x, d)``.

    What a subclass must write: ``dim``, ``rate``, ``transp_rate``, ``transition``,
    ``transp_transition``, ``forward_marginal``, ``staggered_score``, ``sample_limit``,
    ``prior_kl``. Everything else has a generic default it may override: the score
    entropy (:meth:`score_entropy`, dense over ``dim``), the step distributions, the
    ELBO's path noise (:meth:`path_noise`), the model's output (:meth:`output_log_score`).

    Capabilities (class attributes, default off):

    - ``fused_score_entropy``: :meth:`score_entropy` allocates one ``(*, dim)`` tensor
      (forward and backward together); the performance tests hold such a graph to it.
    - ``time_independent_ok``: the score factorises as ``p(x_0 | x_t) f(sigma_bar)`` (RADD),
      so a network without time conditioning works (:meth:`denoiser_log_score`).

    Constructor parameters after ``vocab_size`` are the graph's typed, configurable
    parameters (:meth:`params`; ``diffusion.graph_params`` in the run config).

    Shapes: ``i``, ``x``, ``x0`` are LongTensors ``(*batch)``, e.g. ``(B, L)``;
    ``sigma_bar`` broadcasts against them, e.g. ``(B, 1)``; vectors over states are
    ``(*batch, dim)``.
    """

    fused_score_entropy: bool = False
    time_independent_ok: bool = False
    default_noise: str = "geometric"  # the schedule the graph is built for (experiments' pick)

    def __init__(self, vocab_size: int) -> None:
        try:
            vocab_size = operator.index(vocab_size)
        except TypeError:
            raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}") from None
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    @classmethod
    def params(cls) -> dict[str, Param]:
        """The graph's declared parameters: its constructor's keywords after ``vocab_size``."""
        return declared_params(cls, fixed=("vocab_size",))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k, '?')!r}" for k in self.params())
        return f"{type(self).__name__}(vocab_size={self.vocab_size}{extra}, dim={self.dim})"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Number of states: ``vocab_size`` (+1 for a mask state)."""
        raise NotImplementedError

    @property
    def absorb(self) -> bool:
        """Whether the graph has an absorbing mask (always the last state, ``dim - 1``)."""
        return self.mask_id is not None

    @property
    def mask_id(self) -> int | None:
        """The mask state's id, or ``None`` when the graph has no mask."""
        return None

    # dense form, for tests and small vocabularies
    def rate_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense rate matrix ``Q`` ``(dim, dim)``; column ``x`` is ``rate(x)``."""
        i = torch.arange(self.dim)
        return self.rate(i, dtype=dtype).T.contiguous()

    @abc.abstractmethod
    def rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Column ``i`` of ``Q``: forward rates out of ``i``. ``(*) -> (*, dim)``."""
        raise NotImplementedError

    @abc.abstractmethod
    def transp_rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Row ``i`` of ``Q``: forward rates into ``i``. ``(*) -> (*, dim)``."""
        raise NotImplementedError

    @abc.abstractmethod
    def transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """Column ``i`` of ``exp(sigma_bar Q)``: ``p(x_t = . | x_0 = i)``. ``(*) -> (*, dim)``."""
        raise NotImplementedError

    @abc.abstractmethod
    def transp_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """Row ``i`` of ``exp(sigma_bar Q)``: ``p(x_t = i | x_0 = .)``. ``(*) -> (*, dim)``."""
        raise NotImplementedError

    @abc.abstractmethod
    def forward_marginal(self, p0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """``p_t = exp(sigma_bar Q) p0`` for a distribution over real tokens.

        ``p0`` ``(*, vocab_size)``, ``sigma_bar`` broadcastable to ``p0.shape[:-1]`` ->
        ``(*', dim)`` (the broadcast batch shape).
        """
        raise NotImplementedError

    def sample_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x_t ~ p(. | x_0 = i)``. ``i`` (*), ``sigma_bar`` broadcastable -> (*) long."""
        return sample_categorical(self.transition(i, sigma_bar), generator)

    def reverse_rate(self, i: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Reverse rates out of ``i``: ``Q[i, y] s_y`` off the diagonal, rows sum to 0.

        ``i`` (*), ``score`` (*, dim) (scores, not log-scores) -> (*, dim). The Euler
        step's rate (:meth:`euler_probs` builds it in one tensor).
        """
        rate = self.transp_rate(i, dtype=score.dtype) * score
        rate = rate.scatter(-1, i[..., None], 0.0)
        return rate.scatter(-1, i[..., None], -rate.sum(dim=-1, keepdim=True))

    def euler_probs(self, i: torch.Tensor, score: torch.Tensor,
                    step: torch.Tensor | float) -> torch.Tensor:
        """The Euler step's distribution ``onehot(i) + step * reverse_rate(i, score)``.

        Unnormalised (negatives are clamped by the draw). ``i`` (*), ``score`` (*, dim),
        ``step`` (= dt sigma(t)) broadcastable to ``i``'s shape -> (*, dim), float64 for a
        float64 step. Subclasses may override it with a cheaper closed form.
        """
        step = _as_float(step, score)[..., None]
        rate = self.transp_rate(i, dtype=score.dtype).mul_(score)
        rate.scatter_(-1, i[..., None], 0.0)
        diag = -rate.sum(dim=-1, keepdim=True)
        probs = rate * step
        return probs.scatter_(-1, i[..., None], 1.0 + step * diag)

    def tweedie_probs(self, i: torch.Tensor, score: torch.Tensor,
                      dsigma: torch.Tensor | float) -> torch.Tensor:
        """The analytic step's distribution ``staggered_score(score, d) * transp_transition(i, d)``.

        Unnormalised. ``i`` (*), ``score`` (*, dim), ``dsigma`` broadcastable to ``i``'s
        shape -> (*, dim). Subclasses may override it with a cheaper closed form.
        """
        return self.staggered_score(score, dsigma) * self.transp_transition(i, dsigma)

    @abc.abstractmethod
    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor | float) -> torch.Tensor:
        """``exp(-dsigma Q) s``: the ratio ``p_{sigma_bar - dsigma}(y) / p_sigma_bar(x)``.

        ``score`` (*, dim), ``dsigma`` broadcastable to ``score.shape[:-1]`` -> (*, dim).
        """
        raise NotImplementedError

    @abc.abstractmethod
    def sample_limit(self, *batch_dims: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw from the limit ``sigma_bar -> inf``. -> LongTensor ``batch_dims``."""
        raise NotImplementedError

    def score_entropy(self, log_score: torch.Tensor, sigma_bar: torch.Tensor | float,
                      x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Denoising score entropy in nats, ``>= 0`` (see the class docstring).

        ``log_score`` (*, dim), ``sigma_bar`` (> 0, no gradient) broadcastable to ``x``'s
        shape, ``x = x_t`` and ``x0`` (*) -> (*). Computed in float32 at least (float64
        stays float64). The log-score at ``x_t`` itself (and wherever ``Q[x_t, y] = 0``)
        is ignored. This default is the class docstring's phi form over all ``dim``
        states, from :meth:`transition` and :meth:`transp_rate` (several ``(*, dim)``
        temporaries); a graph with ``fused_score_entropy`` overrides it.
        """
        ls = log_score.to(_score_dtype(log_score))
        sb = _no_grad_sigma(sigma_bar, x).to(ls.dtype)
        shape = torch.broadcast_shapes(x.shape, x0.shape, sb.shape)
        x, x0 = x.expand(shape), x0.expand(shape)
        weight = self.transp_rate(x, dtype=ls.dtype).scatter(-1, x[..., None], 0.0)  # Q[x_t, y]
        on = weight > 0
        cond = self.transition(x0, sb.expand(shape)).to(ls.dtype)  # p(y | x_0), (*, dim)
        log_r = cond.log() - cond.gather(-1, x[..., None]).log()
        has_r = on & (cond > 0)
        log_r = torch.where(has_r, log_r, 0.0)
        ls = ls.expand(*shape, self.dim).masked_fill(~on, 0.0)  # no gradient where ignored
        term = torch.where(has_r, log_r.exp() * _phi(ls - log_r), ls.exp())
        return (weight * term).masked_fill(~on, 0.0).sum(-1)

    @abc.abstractmethod
    def prior_kl(self, x0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """The ELBO's prior term at total noise ``sigma_bar``, per position, in nats.

        ``x0`` (*), ``sigma_bar`` broadcastable -> (*).
        """
        raise NotImplementedError

    # --- what the rest of the code asks of a graph (defaults for a plain graph) ----------

    def path_noise(self, noise: Noise) -> Noise:
        """The schedule whose paths the ELBO integrates (:func:`~sedd_ray.diffusion.elbo_nll`).

        Default: ``noise`` itself. A graph whose reverse chain starts from a limit that
        the schedule reaches only with some probability conditions on reaching it (the
        absorbing graph: :class:`~sedd_ray.diffusion.noise.MaskConditioned`), and its
        :meth:`prior_kl` is the cost of that event.
        """
        return noise

    def output_dim(self, time_independent: bool = False) -> int:
        """Width of the network's raw output: ``dim``; ``vocab_size`` for a RADD network."""
        return self.vocab_size if time_independent else self.dim

    def output_log_score(self, raw: torch.Tensor, x_t: torch.Tensor, sigma_bar: torch.Tensor,
                         scale_by_sigma: bool = True,
                         time_independent: bool = False) -> torch.Tensor:
        """The model's post-processing: raw output -> log-scores (B, L, dim) float32.

        ``raw`` (B, L, output_dim) (any float dtype; bfloat16 under autocast), ``x_t``
        (B, L) long, ``sigma_bar`` (B,) float32: the noise level the scores are for (it
        may differ from the one the network saw). Default: ``raw`` with the current
        token's log-score 0 (score 1, the loss's convention); ``scale_by_sigma`` is the
        graph's to interpret (the absorbing graph shifts by ``log expm1(sigma_bar)``).
        ``time_independent``: ``raw`` is a RADD network's logits over the real tokens
        (:meth:`denoiser_log_score` of their log-softmax). May write into ``raw`` when
        it is float32.
        """
        if time_independent:
            return self.denoiser_log_score(raw.float().log_softmax(dim=-1), x_t, sigma_bar)
        return raw.float().scatter_(-1, x_t[..., None], 0.0)

    def denoiser_log_score(self, log_p: torch.Tensor, x_t: torch.Tensor,
                           sigma_bar: torch.Tensor) -> torch.Tensor:
        """RADD: log-scores (B, L, dim) from ``log p(x_0 | x_t)`` (B, L, vocab_size).

        Only for graphs with ``time_independent_ok``; the default raises.
        """
        raise ValueError(
            f"the {type(self).__name__} graph's score does not factorise over time, so a "
            "time-independent (RADD) network cannot represent it; keep model.time_conditioning "
            f"on, or pick a graph that allows it ({', '.join(_time_independent_graphs())})"
        )


def _time_independent_graphs() -> list[str]:
    return [n for n in GRAPHS.names() if GRAPHS.get(n).time_independent_ok]


def _score_dtype(log_score: torch.Tensor) -> torch.dtype:
    return torch.promote_types(log_score.dtype, torch.float32)


def _no_grad_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    sigma = _as_float(sigma, like)
    if sigma.requires_grad and torch.is_grad_enabled():
        raise ValueError("score_entropy differentiates with respect to log_score only; pass "
                         "sigma_bar detached (sigma_bar.detach())")
    return sigma


# --- fused score entropy ------------------------------------------------------------------
#
# The loss reads a (*, dim) log-score; a plain autograd formulation allocates several
# (*, dim) temporaries in the forward pass (masked copies, exp) and as many again in the
# backward pass. These Functions allocate exactly one (*, dim) float tensor: it holds
# exp(l) in the forward pass, is saved, and becomes the gradient in place in the backward
# pass (so a second backward through the same graph raises, as for any in-place op).
# The formulas are those of the graphs' docstrings; tests/test_perf_features.py checks
# values and gradients against the unfused formulation.


class _AbsorbSE(torch.autograd.Function):
    """Absorbing SE: ``sum_{y != x_0, mask} e^{l_y} + phi(l_{x_0} + log E) / E`` at masks.

    ``ls`` (*, dim) float, ``x0`` (*) long, ``masked`` (*) bool, ``e`` (*) = expm1(sigma).
    """

    @staticmethod
    def forward(ctx, ls, x0, masked, e):
        idx = x0[..., None]
        buf = torch.exp(ls)  # the one (*, dim) tensor
        buf[..., -1] = 0.0  # the mask column is unused
        buf.scatter_(-1, idx, 0.0)  # y = x_0 is the phi term below
        buf.masked_fill_(~masked[..., None], 0.0)  # unmasked positions contribute 0
        l_x0 = torch.where(masked, ls.gather(-1, idx).squeeze(-1), 0.0)
        u = l_x0 + torch.log(e)
        phi_raw = torch.expm1(u) - u
        se = buf.sum(-1) + phi_raw.clamp_min(0.0) / e
        ctx.save_for_backward(buf, idx, masked, e, u, phi_raw >= 0)
        return torch.where(masked, se, 0.0)

    @staticmethod
    def backward(ctx, grad):
        buf, idx, masked, e, u, phi_on = ctx.saved_tensors
        grad = torch.where(masked, grad, 0.0)
        out = buf.mul_(grad[..., None])  # d/dl_y e^{l_y} = e^{l_y}, y != x_0
        g_x0 = torch.where(phi_on, grad * torch.expm1(u) / e, 0.0)  # d/du phi = expm1(u)
        out.scatter_(-1, idx, g_x0[..., None])
        return out, None, None, None


class _UniformSE(torch.autograd.Function):
    """Uniform SE (see :class:`Uniform`): ``rest + [x_t != x_0] phi(l_{x_0} + log rho) / (N rho)``.

    ``rest = (1/N) sum e^{l'} - w sum l' + w N (c - 1)`` with ``l'`` = ``l`` set to ``c`` at
    ``x_t`` and ``x_0``. ``ls`` (*, N) float; ``x``, ``x0`` (*) long; ``c``, ``w``, ``rho``,
    ``log_rho`` (*) float; ``same`` (*) bool.
    """

    @staticmethod
    def forward(ctx, ls, x, x0, c, w, rho, log_rho, same):
        n = ls.shape[-1]
        ix, ix0, fill = x[..., None], x0[..., None], c[..., None]
        buf = ls.scatter(-1, ix, fill).scatter_(-1, ix0, fill)  # the one (*, N) tensor: l'
        sum_l = buf.sum(-1)
        rest_raw = buf.exp_().sum(-1) / n - w * sum_l + w * n * (c - 1)
        rest = rest_raw.clamp_min(0.0)  # a sum of phi >= 0; clamp the rounding
        l_x0 = torch.where(same, 0.0, ls.gather(-1, ix0).squeeze(-1))
        u = l_x0 + log_rho
        phi_raw = torch.expm1(u) - u
        at_x0 = phi_raw.clamp_min(0.0) / (n * rho)
        ctx.save_for_backward(buf, ix, ix0, w, rho, same, u, rest_raw >= 0, phi_raw >= 0)
        return rest + torch.where(same, 0.0, at_x0)

    @staticmethod
    def backward(ctx, grad):
        buf, ix, ix0, w, rho, same, u, rest_on, phi_on = ctx.saved_tensors
        n = buf.shape[-1]
        g_rest = torch.where(rest_on, grad, 0.0)
        # d rest / d l_y = e^{l_y} / N - w off {x_t, x_0}; 0 on them (l' is a constant there)
        out = buf.mul_((g_rest / n)[..., None]).sub_((g_rest * w)[..., None])
        out.scatter_(-1, ix, 0.0)
        g_x0 = torch.where(same | ~phi_on, 0.0, grad * torch.expm1(u) / (n * rho))
        out.scatter_(-1, ix0, g_x0[..., None])  # x_0 = x_t when same: 0 there
        return out, None, None, None, None, None, None, None


@GRAPHS.register("uniform")
class Uniform(Graph):
    r"""Every token jumps to every other at rate ``1/N``: ``Q = (1 1^T - N I) / N``.

    ``exp(sigma_bar Q) = e^{-sigma_bar} I + (1 - e^{-sigma_bar}) 1 1^T / N`` (symmetric); the
    limit is uniform over the ``N`` tokens. With ``E = expm1(sigma_bar)`` the true ratios are
    ``rho = E / (E + N)`` for every ``y`` when ``x_t = x_0``, and, when ``x_t != x_0``,
    ``1 / rho = 1 + N / E`` for ``y = x_0`` and ``1`` otherwise. So

    - ``x_t = x_0``:  ``SE = (rho/N) sum_{y != x_t} phi(l_y - log rho)``
      ``= (1/N) sum e^{l_y} - (rho/N) sum l_y + ((N-1)/N) K(rho)``
    - ``x_t != x_0``: ``SE = (1/(N rho)) phi(l_{x_0} + log rho) + (1/N) sum_{y != x_t, x_0} phi(l_y)``
      ``= (1/N) sum e^{l_y} - (1/N) sum l_y - l_{x_0}/E + (1/N)(K(1 + N/E) - (N - 2))``

    ``rho`` is computed as ``E / (E + N)``, never ``1 - N / (E + N)``: for N = 50257 that
    is 0 (or one rounding error) in float32 for ``sigma_bar`` below ~2e-3.
    """

    fused_score_entropy = True

    @property
    def dim(self) -> int:
        return self.vocab_size

    def rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = self.dim
        dtype = dtype or torch.get_default_dtype()
        out = torch.full((*i.shape, n), 1.0 / n, dtype=dtype, device=i.device)
        return out.scatter_(-1, i[..., None], -(n - 1) / n)

    def transp_rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.rate(i, dtype)

    def transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, i)
        shape = torch.broadcast_shapes(i.shape, sigma_bar.shape)
        move = -torch.expm1(-sigma_bar.expand(shape))[..., None]  # 1 - e^{-sigma_bar}
        stay = torch.exp(-sigma_bar.expand(shape))[..., None]
        out = (move / self.dim).expand(*shape, self.dim)
        return out + stay * _onehot(i.expand(shape), self.dim, out.dtype)

    def transp_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        return self.transition(i, sigma_bar)

    def forward_marginal(self, p0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, p0)[..., None]
        return torch.exp(-sigma_bar) * p0 - torch.expm1(-sigma_bar) / self.dim

    def sample_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, i)
        shape = torch.broadcast_shapes(i.shape, sigma_bar.shape)
        move_chance = -torch.expm1(-sigma_bar.to(torch.float64))
        move = _rand(shape, generator, i.device) < move_chance
        gen_device = generator.device if generator is not None else i.device
        other = torch.randint(0, self.dim, shape, generator=generator, device=gen_device)
        return torch.where(move, other.to(i.device), i)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor | float) -> torch.Tensor:
        dsigma = _as_float(dsigma, score)[..., None]
        # exp(-d Q) = e^d I + (1 - e^d) 1 1^T / N
        return torch.exp(dsigma) * score - torch.expm1(dsigma) * score.mean(-1, keepdim=True)

    def tweedie_probs(self, i: torch.Tensor, score: torch.Tensor,
                      dsigma: torch.Tensor | float) -> torch.Tensor:
        # staggered score st, then st * ((1 - e^{-d}) / N + e^{-d} onehot(i)), in place
        d = _as_float(dsigma, score)[..., None]
        st = torch.exp(d) * score
        st.sub_(torch.expm1(d) * score.mean(-1, keepdim=True))
        st_i = st.gather(-1, i[..., None])
        st.mul_(-torch.expm1(-d) / self.dim)
        return st.scatter_add_(-1, i[..., None], st_i * torch.exp(-d))

    def sample_limit(self, *batch_dims: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        x = torch.randint(0, self.dim, batch_dims, generator=generator, device=gen_device)
        return x.to(device)

    def score_entropy(self, log_score: torch.Tensor, sigma_bar: torch.Tensor | float,
                      x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        n = self.dim
        ls = log_score.to(_score_dtype(log_score))  # (*, N)
        sigma_bar = _no_grad_sigma(sigma_bar, x).to(ls.dtype)
        shape = torch.broadcast_shapes(x.shape, x0.shape, sigma_bar.shape)
        x, x0 = x.expand(shape), x0.expand(shape)
        ls = ls.expand(*shape, n)
        e = torch.expm1(sigma_bar.expand(shape))
        rho = e / (e + n)
        log_rho = torch.log(rho)
        same = x == x0
        # Every y outside {x_t, x_0} (all y != x_t when x_t = x_0) has the same ratio r =
        # e^c and weight w / r: their part is w sum_y phi(l_y - c). Setting l = c at x_t
        # and x_0 makes those entries phi(0) = 0, so the part is a reduction over all y:
        # w (e^{-c} sum e^l - sum l + N (c - 1)), with w e^{-c} = 1/N in both cases.
        # x_t != x_0: y = x_0 has r = 1/rho and weight 1/(N rho); it is kept in phi form,
        # as its two halves are ~ (1/E) log(1/E) each and cancel in float32 otherwise.
        c = torch.where(same, log_rho, 0.0)
        w = torch.where(same, rho / n, 1.0 / n)
        return _UniformSE.apply(ls, x, x0, c, w, rho, log_rho, same)

    def prior_kl(self, x0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """Exact ``KL(p(. | x_0) at sigma_bar || uniform)``. ``x0`` (*) -> (*)."""
        n = self.dim
        sb = _as_float(sigma_bar, x0)
        out_dtype = sb.dtype
        sb = sb.to(torch.float64).expand(torch.broadcast_shapes(x0.shape, sb.shape))
        stay = torch.exp(-sb)
        move = -torch.expm1(-sb)  # N q = 1 - e^{-sigma_bar}, q = p(y != x_0)
        log_move = torch.where(sb < math.log(2), torch.log(move), torch.log1p(-stay))
        p = stay + move / n
        kl = p * torch.log1p((n - 1) * stay) + (n - 1) * (move / n) * log_move
        return kl.clamp_min(0.0).to(out_dtype)


@GRAPHS.register("absorb")
class Absorbing(Graph):
    r"""Every token jumps to the mask (id ``N``) at rate 1; the mask never leaves.

    ``Q = e_mask 1_N^T - diag(1_N, 0)``. Column ``x`` of ``exp(sigma_bar Q)`` puts
    ``e^{-sigma_bar}`` on ``x`` and ``1 - e^{-sigma_bar}`` on the mask; the limit is
    all-mask.
    Only a masked ``x_t`` has incoming neighbours (``Q[mask, y] = 1``); the true ratios
    are ``1/E`` (``E = expm1(sigma_bar)``) for ``y = x_0`` and 0 for other tokens, so

        SE = (1/E) phi(l_{x_0} + log E) + sum_{y != x_0, mask} e^{l_y}
           = sum_{y != mask} e^{l_y} - l_{x_0}/E + K(1/E)

    at masked positions, and 0 elsewhere. By RADD, the true score at a masked position is
    ``p(x_0 = y | unmasked) / E``.

    The rest of the code asks three things of it that a plain graph does not do: the ELBO
    integrates under the process conditioned on all-mask at ``t = 1`` (:meth:`path_noise`),
    the model's output is scaled by sigma with the current token's score 1
    (:meth:`output_log_score`), and a time-independent (RADD) network works
    (:meth:`denoiser_log_score`).
    """

    fused_score_entropy = True
    time_independent_ok = True
    default_noise = "loglinear"

    @property
    def dim(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.get_default_dtype()
        out = _onehot(torch.full_like(i, self.mask_id), self.dim, dtype)
        return out - _onehot(i, self.dim, dtype)

    def transp_rate(self, i: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.get_default_dtype()
        into_mask = torch.ones(self.dim, dtype=dtype, device=i.device)
        into_mask[self.mask_id] = 0.0
        is_mask = (i == self.mask_id)[..., None]
        return torch.where(is_mask, into_mask, -_onehot(i, self.dim, dtype))

    def transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, i)
        shape = torch.broadcast_shapes(i.shape, sigma_bar.shape)
        i = i.expand(shape)
        stay = torch.exp(-sigma_bar.expand(shape))
        stay = torch.where(i == self.mask_id, 1.0, stay)[..., None]
        on_i = _onehot(i, self.dim, stay.dtype)
        on_mask = _onehot(torch.full_like(i, self.mask_id), self.dim, stay.dtype)
        return stay * on_i + (1.0 - stay) * on_mask

    def transp_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, i)
        shape = torch.broadcast_shapes(i.shape, sigma_bar.shape)
        i = i.expand(shape)
        stay = torch.exp(-sigma_bar.expand(shape))[..., None]
        move = -torch.expm1(-sigma_bar.expand(shape))[..., None]
        # row mask: 1 - e^{-sigma_bar} from every token, 1 from the mask itself
        row_mask = move.expand(*shape, self.dim).clone()
        row_mask[..., self.mask_id] = 1.0
        row_token = stay * _onehot(i, self.dim, stay.dtype)
        return torch.where((i == self.mask_id)[..., None], row_mask, row_token)

    def forward_marginal(self, p0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, p0)[..., None]
        tokens = torch.exp(-sigma_bar) * p0
        mask = (-torch.expm1(-sigma_bar)).expand(*tokens.shape[:-1], 1)
        return torch.cat([tokens, mask], dim=-1)

    def sample_transition(self, i: torch.Tensor, sigma_bar: torch.Tensor | float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        sigma_bar = _as_float(sigma_bar, i)
        shape = torch.broadcast_shapes(i.shape, sigma_bar.shape)
        move_chance = -torch.expm1(-sigma_bar.to(torch.float64))
        move = _rand(shape, generator, i.device) < move_chance
        return torch.where(move, self.mask_id, i)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor | float) -> torch.Tensor:
        dsigma = _as_float(dsigma, score)[..., None]
        # exp(-d Q): tokens scale by e^d; the mask gains (1 - e^d) sum_{tokens} s
        tokens = torch.exp(dsigma) * score[..., :-1]
        mask = score[..., -1:] - torch.expm1(dsigma) * score[..., :-1].sum(-1, keepdim=True)
        return torch.cat([tokens, mask], dim=-1)

    def sample_limit(self, *batch_dims: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.full(batch_dims, self.mask_id, dtype=torch.long, device=device)

    # Only a masked position can move, and only to a token. Both predictors' distributions
    # are [k s_y on tokens, base - k sum s on the mask] at a mask and a single entry at i
    # elsewhere; these overrides build them in one (*, dim) tensor instead of five.
    def tweedie_probs(self, i: torch.Tensor, score: torch.Tensor,
                      dsigma: torch.Tensor | float) -> torch.Tensor:
        # e^d s_y (1 - e^{-d}) = expm1(d) s_y; the mask keeps s_mask - expm1(d) sum s;
        # an unmasked i keeps e^d s_i e^{-d} = s_i
        return self._jump_probs(i, score, torch.expm1(_as_float(dsigma, score)), euler=False)

    def euler_probs(self, i: torch.Tensor, score: torch.Tensor,
                    step: torch.Tensor | float) -> torch.Tensor:
        # step s_y on tokens, 1 - step sum s on the mask; 1 on an unmasked i
        return self._jump_probs(i, score, _as_float(step, score), euler=True)

    def _jump_probs(self, i: torch.Tensor, score: torch.Tensor, k: torch.Tensor,
                    euler: bool) -> torch.Tensor:
        probs = score * k[..., None]  # the one (*, dim) tensor, float64 for a float64 k
        masked = (i == self.mask_id)[..., None]
        base = 1.0 if euler else score[..., -1].to(probs.dtype)
        probs[..., -1] = base - probs[..., :-1].sum(-1)
        idx = i[..., None]
        own = torch.ones_like(probs[..., :1]) if euler else score.gather(-1, idx).to(probs.dtype)
        at_i = torch.where(masked, probs.gather(-1, idx), own)
        return probs.masked_fill_(~masked, 0.0).scatter_(-1, idx, at_i)

    def score_entropy(self, log_score: torch.Tensor, sigma_bar: torch.Tensor | float,
                      x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ls = log_score.to(_score_dtype(log_score))
        sigma_bar = _no_grad_sigma(sigma_bar, x).to(ls.dtype)
        shape = torch.broadcast_shapes(x.shape, x0.shape, sigma_bar.shape)
        x, x0 = x.expand(shape), x0.expand(shape)
        e = torch.expm1(sigma_bar.expand(shape))
        # y != x_0: true ratio 0, term e^{l_y}; y = x_0: ratio 1/E, term (1/E) phi(l + log E)
        return _AbsorbSE.apply(ls.expand(*shape, self.dim), x0, x == self.mask_id, e)

    def path_noise(self, noise: Noise) -> Noise:
        """The schedule conditioned on every position being masked at ``t = 1``."""
        return MaskConditioned(noise)

    def output_log_score(self, raw: torch.Tensor, x_t: torch.Tensor, sigma_bar: torch.Tensor,
                         scale_by_sigma: bool = True,
                         time_independent: bool = False) -> torch.Tensor:
        """As :meth:`Graph.output_log_score`; ``scale_by_sigma`` subtracts
        ``log(expm1(sigma_bar)) + log(N)`` from ``raw``, so at init (``raw = 0``) the scores
        over the N real tokens sum to ``1/expm1(sigma_bar)``, the true total at a mask.

        Allocates one (B, L, dim) float32 tensor and edits it in place.
        """
        if time_independent or not scale_by_sigma:
            return super().output_log_score(raw, x_t, sigma_bar, scale_by_sigma, time_independent)
        shift = log_expm1(sigma_bar) + math.log(self.dim - 1)  # (B,) float32
        log_score = raw - shift[:, None, None]  # float32 even for a bfloat16 raw
        return log_score.scatter_(-1, x_t[..., None], 0.0)

    def denoiser_log_score(self, log_p: torch.Tensor, x_t: torch.Tensor,
                           sigma_bar: torch.Tensor) -> torch.Tensor:
        """RADD: the score at a mask is ``p(x_0 = y | x_t) / expm1(sigma_bar)``.

        ``log_p`` (B, L, N) float32, ``x_t`` (B, L), ``sigma_bar`` (B,) -> (B, L, N + 1):
        ``log_p - log expm1(sigma_bar)`` on the tokens, the finite ``MASK_LOG_SCORE`` on
        the mask, 0 at the current token.
        """
        B, L = x_t.shape
        sigma_bar = sigma_bar.to(torch.float32).expand(B)
        log_score = F.pad(log_p, (0, 1), value=MASK_LOG_SCORE)  # (B, L, N + 1)
        log_score[..., :-1].sub_(log_expm1(sigma_bar)[:, None, None])
        return log_score.scatter_(-1, x_t[..., None], 0.0)

    def prior_kl(self, x0: torch.Tensor, sigma_bar: torch.Tensor | float) -> torch.Tensor:
        """``-log(1 - e^{-sigma_bar})``: the cost of starting the reverse chain at all-mask.

        The exact KL to the all-mask limit is infinite (a token survives with probability
        ``e^{-sigma_bar}``); this is the standard approximation that conditions on every
        position being masked at the end of the forward process. ``x0`` (*) -> (*).
        """
        sb = _as_float(sigma_bar, x0)
        out_dtype = sb.dtype
        sb = sb.to(torch.float64).expand(torch.broadcast_shapes(x0.shape, sb.shape))
        return (-torch.log(-torch.expm1(-sb))).to(out_dtype)
