"""The speed work, checked for correctness only (timings live in benchmarks/, never here).

- the fused score entropy (graphs that declare ``fused_score_entropy``): values and
  gradients equal the unfused formulation, and it allocates one (B, L, dim) tensor
  (forward and backward together);
- the one-tensor model post-processing and step distributions equal the old formulas;
- the in-place categorical draw draws exactly what the textbook draw does;
- the cached RADD sampler gives the same samples as the plain one, with fewer calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts, not installed

from benchmarks import reference  # noqa: E402
from sedd_ray.config import ModelConfig  # noqa: E402
from sedd_ray.diffusion import (  # noqa: E402
    GRAPHS,
    DenoiserScore,
    conditioning_from_prefix_suffix,
    get_graph,
    get_noise,
    model_score_fn,
    sample,
    sample_categorical,
)
from sedd_ray.model import ScoreModel  # noqa: E402

F64 = torch.float64
# The fused score entropy is an optimisation a graph may declare; only those are held to it.
FUSED = [n for n in GRAPHS.names() if GRAPHS.get(n).fused_score_entropy]


def _case(name: str, n: int = 7, shape=(4, 9), seed: int = 0, scale: float = 3.0,
          dtype=torch.float32):
    graph = get_graph(name, vocab_size=n)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, n, shape, generator=g)
    sigma = torch.logspace(-4, 1.3, shape[0], dtype=dtype)[:, None]  # (B, 1)
    x = graph.sample_transition(x0, sigma.clamp_min(0.5), generator=g)
    log_score = (scale * torch.randn(*shape, graph.dim, generator=g, dtype=F64)).to(dtype)
    return graph, log_score, sigma, x, x0


# --- fused score entropy --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", FUSED)
def test_fused_score_entropy_matches_unfused_values_and_gradients(name, dtype):
    for seed, scale in ((0, 0.5), (1, 3.0), (2, 12.0)):
        graph, ls, sigma, x, x0 = _case(name, seed=seed, scale=scale, dtype=dtype)
        a = ls.clone().requires_grad_()
        b = ls.clone().requires_grad_()
        weight = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        ours = graph.score_entropy(a, sigma, x, x0)
        ref = reference.score_entropy(graph, b, sigma, x, x0)
        assert ours.dtype == ref.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(ours, ref, **tol)
        (ours * weight).sum().backward()
        (ref * weight).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("name", FUSED)
def test_fused_score_entropy_bfloat16_input_gets_a_bfloat16_gradient(name):
    graph, ls, sigma, x, x0 = _case(name)
    a = ls.bfloat16().requires_grad_()
    b = ls.bfloat16().requires_grad_()
    graph.score_entropy(a, sigma, x, x0).sum().backward()
    reference.score_entropy(graph, b, sigma, x, x0).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", GRAPHS.names())
def test_fused_score_entropy_refuses_a_sigma_that_needs_a_gradient(name):
    graph, ls, sigma, x, x0 = _case(name)
    with pytest.raises(ValueError, match="detach"):
        graph.score_entropy(ls, sigma.requires_grad_(), x, x0)
    with torch.no_grad():  # evaluation is fine
        graph.score_entropy(ls, sigma, x, x0)


class _BigAllocations(TorchDispatchMode):
    """Counts the distinct storages of at least ``numel`` elements that ops produce."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("name", FUSED)
def test_fused_score_entropy_allocates_one_big_tensor(name):
    graph, ls, sigma, x, x0 = _case(name, n=50, shape=(4, 32))
    big = ls.shape[0] * ls.shape[1] * graph.vocab_size  # (B, L, N): smaller than (B, L, dim)

    def count(fn):
        leaf = ls.clone().requires_grad_()
        with _BigAllocations(big) as mode:
            fn(graph, leaf, sigma, x, x0).sum().backward()
        return len(mode.storages - {leaf.untyped_storage().data_ptr()})

    assert count(lambda g, *a: g.score_entropy(*a)) == 1
    assert count(reference.score_entropy) >= 3  # the check has teeth


def test_model_output_is_the_old_formula_with_fewer_temporaries():
    torch.manual_seed(0)
    for graph_name, time_conditioning in (("absorb", True), ("uniform", True), ("absorb", False)):
        graph = get_graph(graph_name, vocab_size=40)
        cfg = ModelConfig(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16, max_seq_len=16,
                          dropout=0.0, time_conditioning=time_conditioning)
        model = ScoreModel(cfg, graph).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        x = torch.randint(0, graph.dim, (3, 16))
        sb = torch.tensor([1e-3, 0.7, 5.0])
        torch.testing.assert_close(model(x, sb), reference.model_forward(model, x, sb))
        if not time_conditioning:  # the cached sampler's identity: forward, bit for bit
            assert torch.equal(model(x, sb),
                               model.log_score_from_denoiser(model.denoiser_logprobs(x), x, sb))


# --- sampler step distributions and the draw -------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS.names())
def test_step_distributions_equal_the_generic_formulas(name):
    graph = get_graph(name, vocab_size=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, graph.dim, (5, 8), generator=g)
    score = torch.rand(5, 8, graph.dim, generator=g) * 2
    score = score.scatter(-1, x[..., None], 1.0)  # s_x = 1, the model's convention
    d = torch.tensor([1e-4, 0.01, 0.3, 2.0, 9.0], dtype=F64)[:, None]
    ours = graph.tweedie_probs(x, score, d)
    assert ours.dtype == F64
    torch.testing.assert_close(ours, reference.tweedie_probs(graph, x, score, d))
    ours = graph.euler_probs(x, score, d)
    assert ours.dtype == F64
    torch.testing.assert_close(ours, reference.euler_probs(graph, x, score, d))


def test_in_place_draw_draws_exactly_the_textbook_draw():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(64, 9, generator=g, dtype=F64) - 0.2  # some negatives to clamp
    probs[3] = 0.0  # a row with no mass: uniform
    probs[7] = -1.0
    before = probs.clone()
    for seed in range(3):
        a = sample_categorical(probs, torch.Generator().manual_seed(seed))
        b = reference.sample_categorical(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
    assert torch.equal(probs, before), "sample_categorical must not modify its input"
    with pytest.raises(ValueError, match="non-finite"):
        sample_categorical(torch.tensor([[0.5, float("nan")]]))


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
@pytest.mark.parametrize("name", GRAPHS.names())
def test_sampler_reproduces_the_old_sampler(name, predictor):
    """Same math up to rounding: the old and new samplers agree on (nearly) every token."""
    graph, noise = get_graph(name, vocab_size=6), get_noise("loglinear")

    def score_fn(x, sigma_bar):
        g = torch.Generator().manual_seed(int(sigma_bar[0].item() * 1e6) % 2**31)
        return torch.rand(*x.shape, graph.dim, generator=g).scatter(-1, x[..., None], 1.0)

    kw = dict(batch=32, length=8, steps=12, predictor=predictor)
    new = sample(score_fn, graph, noise, generator=torch.Generator().manual_seed(0), **kw)
    with reference.unfused():
        old = sample(score_fn, graph, noise, generator=torch.Generator().manual_seed(0), **kw)
    assert (new == old).float().mean() > 0.98


# --- cached RADD sampling ---------------------------------------------------------------------

def _radd_model(vocab: int = 30, seed: int = 0) -> ScoreModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_seq_len=32,
                      dropout=0.0, time_conditioning=False)
    model = ScoreModel(cfg, get_graph("absorb", vocab_size=vocab)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
@pytest.mark.parametrize("batch,length,steps", [(1, 16, 16), (1, 12, 48), (4, 16, 64)])
def test_cached_sampler_gives_the_same_samples_bitwise(predictor, batch, length, steps):
    model = _radd_model()
    graph, noise = get_graph("absorb", vocab_size=30), get_noise("loglinear")
    kw = dict(batch=batch, length=length, steps=steps, predictor=predictor)

    def plain(x, sigma_bar):
        return model(x, sigma_bar).exp()

    ref = sample(plain, graph, noise, generator=torch.Generator().manual_seed(7), **kw)
    cached = model_score_fn(model)  # the default: exact ("batch") cache
    assert isinstance(cached, DenoiserScore)
    out = sample(cached, graph, noise, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(out, ref)
    assert (out < graph.mask_id).all()
    assert cached.calls <= steps + 1
    if batch == 1:  # a lone sequence changes in ~1 - (1 - 1/steps)^L of the steps
        assert cached.calls < 0.8 * (steps + 1)
    uncached = model_score_fn(model, cache="off")
    assert torch.equal(sample(uncached, graph, noise,
                              generator=torch.Generator().manual_seed(7), **kw), ref)
    assert uncached.calls == steps + 1


def test_row_cache_evaluates_only_changed_rows_and_matches():
    model = _radd_model()
    graph, noise = get_graph("absorb", vocab_size=30), get_noise("loglinear")
    kw = dict(batch=8, length=16, steps=64)
    ref = sample(lambda x, s: model(x, s).exp(), graph, noise,
                 generator=torch.Generator().manual_seed(3), **kw)
    rows = model_score_fn(model, cache="rows")
    out = sample(rows, graph, noise, generator=torch.Generator().manual_seed(3), **kw)
    # rows evaluated in a smaller batch may round differently in the last bit: the samples
    # agree except where a draw falls within rounding of a boundary (none here)
    assert (out == ref).float().mean() > 0.95
    assert rows.rows < 0.5 * 8 * (64 + 1)


def test_cache_is_keyed_on_the_tokens_and_reset_by_sample():
    model = _radd_model()
    fn = model_score_fn(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 31, (3, 10), generator=g)
    sb = torch.tensor([0.1, 1.0, 3.0])
    a = fn(x, sb)
    assert fn.calls == 1 and torch.equal(a, model(x, sb).exp())
    b = fn(x.clone(), sb * 2)  # same tokens, new time: no call, the new time's score
    assert fn.calls == 1 and torch.equal(b, model(x, sb * 2).exp())
    y = x.clone()
    y[1, 4] = 30
    assert torch.equal(fn(y, sb), model(y, sb).exp()) and fn.calls == 2
    fn.reset()
    fn(y, sb)
    assert fn.calls == 3
    # sample() resets: two runs with one score_fn equal two runs with fresh ones
    graph, noise = get_graph("absorb", vocab_size=30), get_noise("loglinear")
    kw = dict(batch=2, length=10, steps=10)
    first = sample(fn, graph, noise, generator=torch.Generator().manual_seed(1), **kw)
    again = sample(fn, graph, noise, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="batch, rows, off"):
        model_score_fn(model, cache="sometimes")


def test_cached_sampler_keeps_conditioning():
    model = _radd_model()
    graph, noise = get_graph("absorb", vocab_size=30), get_noise("loglinear")
    mask, tokens = conditioning_from_prefix_suffix([3, 1], [4], length=12, batch=2)
    kw = dict(batch=2, length=12, steps=24, fixed_mask=mask, fixed_tokens=tokens)
    ref = sample(lambda x, s: model(x, s).exp(), graph, noise,
                 generator=torch.Generator().manual_seed(2), **kw)
    out = sample(model_score_fn(model), graph, noise,
                 generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(out, ref)
    assert (out[:, :2] == torch.tensor([3, 1])).all() and (out[:, -1] == 4).all()


def test_time_conditioned_model_score_fn_is_the_plain_score():
    torch.manual_seed(0)
    graph = get_graph("uniform", vocab_size=20)
    model = ScoreModel(ModelConfig(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16,
                                   max_seq_len=16, dropout=0.0), graph).eval()
    fn = model_score_fn(model)
    assert not isinstance(fn, DenoiserScore)
    x, sb = torch.randint(0, 20, (2, 16)), torch.tensor([0.5, 2.0])
    assert torch.equal(fn(x, sb), model(x, sb).exp())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_sampler_matches_plain():
    model = _radd_model().cuda()
    graph, noise = get_graph("absorb", vocab_size=30), get_noise("loglinear")
    kw = dict(batch=1, length=16, steps=32, device="cuda")
    ref = sample(lambda x, s: model(x, s).exp(), graph, noise,
                 generator=torch.Generator("cuda").manual_seed(0), **kw)
    out = sample(model_score_fn(model), graph, noise,
                 generator=torch.Generator("cuda").manual_seed(0), **kw)
    assert torch.equal(out, ref)
