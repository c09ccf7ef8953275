"""Samplers, checked end to end with the exact score of a factorised toy distribution."""

from __future__ import annotations

import pytest
import torch
from toy import F64, P0, L, N, exact_score_fn

from sedd_ray.diffusion import (
    GRAPHS,
    NOISES,
    PREDICTORS,
    Graph,
    conditioning_from_prefix_suffix,
    get_graph,
    get_noise,
    get_predictor,
    sample,
)


def uniform_score_fn(graph: Graph):
    """A deliberately wrong score: every ratio 1."""
    return lambda x, sigma_bar: torch.ones(*x.shape, graph.dim)


def position_tv_and_pvalue(x: torch.Tensor) -> tuple[float, float]:
    """Worst per-position total variation to P0, and a pooled chi-square p-value."""
    counts = torch.stack([torch.bincount(x[:, pos], minlength=N)[:N] for pos in range(L)]).to(F64)
    assert (counts.sum(-1) == x.shape[0]).all(), "a sample left the real-token range"
    freq = counts / x.shape[0]
    tv = 0.5 * (freq - P0).abs().sum(-1).max().item()
    expected = x.shape[0] * P0
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(L * (N - 1) / 2, dtype=F64)
    return tv, float(torch.special.gammaincc(dof, stat / 2))


SAMPLES = 4000
TV_TOL = 0.06  # sampling noise at 4000 draws is ~0.015; a wrong score gives ~0.35


@pytest.mark.parametrize("predictor", PREDICTORS.names())
@pytest.mark.parametrize("noise_name", NOISES.names())
@pytest.mark.parametrize("graph_name", GRAPHS.names())
def test_exact_score_recovers_the_data_and_wrong_score_does_not(graph_name, noise_name, predictor):
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
    g = torch.Generator().manual_seed(0)
    x = sample(exact_score_fn(graph), graph, noise, batch=SAMPLES, length=L, steps=48,
               predictor=predictor, generator=g)
    assert x.shape == (SAMPLES, L) and x.dtype == torch.long
    tv, p = position_tv_and_pvalue(x)
    assert tv < TV_TOL, tv
    if predictor == "analytic":  # exact up to eps: a chi-square test must pass
        assert p > 1e-3, p
    bad = sample(uniform_score_fn(graph), graph, noise, batch=SAMPLES, length=L, steps=48,
                 predictor=predictor, generator=g)
    bad_tv, bad_p = position_tv_and_pvalue(bad)
    assert bad_tv > 3 * TV_TOL and bad_p < 1e-3, (bad_tv, bad_p)


@pytest.mark.parametrize("graph_name", GRAPHS.names())
def test_time_grid_and_noise_levels(graph_name):
    """The score is queried at sigma_bar(linspace(1, eps, steps + 1))[:-1], then at eps."""
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise("loglinear")
    seen = []
    base = exact_score_fn(graph)

    def score_fn(x, sigma_bar):
        assert sigma_bar.shape == (3,) and sigma_bar.dtype == torch.float32
        seen.append(sigma_bar[0].item())
        return base(x, sigma_bar)

    sample(score_fn, graph, noise, batch=3, length=L, steps=5, predictor="euler", eps=1e-5,
           generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(1, 1e-5, 6, dtype=F64)
    expected = noise(torch.cat([grid[:-1], grid[-1:]]))[0]
    torch.testing.assert_close(torch.tensor(seen, dtype=F64), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("predictor", PREDICTORS.names())
@pytest.mark.parametrize("graph_name", GRAPHS.names())
def test_conditioned_positions_never_change(graph_name, predictor):
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise("loglinear")
    fixed_mask, fixed_tokens = conditioning_from_prefix_suffix([3, 1], [4], length=6, batch=16)
    base = uniform_score_fn(graph)
    calls = []

    def score_fn(x, sigma_bar):
        calls.append(1)
        assert torch.equal(x[fixed_mask], fixed_tokens[fixed_mask]), "fixed token overwritten"
        return base(x, sigma_bar)

    x = sample(score_fn, graph, noise, batch=16, length=6, steps=8, predictor=predictor,
               generator=torch.Generator().manual_seed(2), fixed_mask=fixed_mask,
               fixed_tokens=fixed_tokens)
    assert len(calls) == 9
    assert (x[:, :2] == torch.tensor([3, 1])).all() and (x[:, -1] == 4).all()
    assert x[~fixed_mask].numel() == 16 * 3


def test_conditioning_from_prefix_suffix():
    mask, tokens = conditioning_from_prefix_suffix([7], [8, 9], length=5, batch=2)
    assert mask.shape == tokens.shape == (2, 5)
    assert mask.dtype == torch.bool and tokens.dtype == torch.long
    assert mask[0].tolist() == [True, False, False, True, True]
    assert tokens[1].tolist() == [7, 0, 0, 8, 9]
    mask, _ = conditioning_from_prefix_suffix([], [], length=3, batch=1)
    assert not mask.any()
    with pytest.raises(ValueError, match="exceeds the sample length"):
        conditioning_from_prefix_suffix([1, 2], [3, 4], length=3, batch=1)


@pytest.mark.parametrize("predictor", PREDICTORS.names())
def test_no_mask_survives_denoise(predictor):
    """Scores so small that almost nothing unmasks: denoise must still remove every mask."""
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    for scale in (1e-9, 0.0):
        def score_fn(x, sigma_bar, scale=scale):
            score = torch.full((*x.shape, graph.dim), scale)
            return score.scatter(-1, x[..., None], 1.0)  # s_x = p(x)/p(x) = 1

        kwargs = dict(batch=64, length=L, steps=4, predictor=predictor,
                      generator=torch.Generator().manual_seed(3))
        x = sample(score_fn, graph, noise, denoise=True, **kwargs)
        assert (x != graph.mask_id).all() and (x < N).all()
        # the check has teeth: without denoising the masks stay
        x = sample(score_fn, graph, noise, denoise=False, **kwargs)
        assert (x == graph.mask_id).float().mean() > 0.9


def test_reproducible_with_generator_and_progress_bar():
    graph, noise = get_graph("uniform", vocab_size=N), get_noise("geometric")
    score_fn = exact_score_fn(graph)
    a = sample(score_fn, graph, noise, batch=8, length=L, steps=6,
               generator=torch.Generator().manual_seed(4), progress=True)
    b = sample(score_fn, graph, noise, batch=8, length=L, steps=6,
               generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_unknown_predictor_lists_valid_names():
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    with pytest.raises(ValueError, match="analytic, euler"):
        sample(uniform_score_fn(graph), graph, noise, batch=1, length=1, steps=1,
               predictor="ancestral")
    with pytest.raises(ValueError, match="analytic, euler"):
        get_predictor("ancestral")


def test_bad_sampler_arguments_raise():
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    fn = uniform_score_fn(graph)
    with pytest.raises(ValueError, match="steps"):
        sample(fn, graph, noise, batch=1, length=1, steps=0)
    with pytest.raises(ValueError, match="together"):
        sample(fn, graph, noise, batch=1, length=2, steps=1,
               fixed_mask=torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph_name", GRAPHS.names())
def test_cuda_with_cpu_or_cuda_generator(graph_name):
    from sedd_ray.diffusion import elbo_nll, score_entropy_loss

    graph, noise = get_graph(graph_name, vocab_size=N), get_noise("loglinear")
    p0 = P0.cuda()
    score_fn = exact_score_fn(graph, p0)
    for gen in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
        x = sample(score_fn, graph, noise, batch=512, length=L, steps=16, generator=gen,
                   device="cuda")
        assert x.is_cuda and (x < N).all()
        x0 = x[:64]

        def model(xt, sb):
            return score_fn(xt, sb).log()

        loss = score_entropy_loss(model, graph, noise, x0, antithetic=True, generator=gen)
        assert loss.is_cuda and torch.isfinite(loss).all()
        assert elbo_nll(model, graph, noise, x0, draws=2, generator=gen).is_cuda


def test_cli_sampler_skips_unchanged_calls_and_keeps_the_samples(tiny_bundle, monkeypatch):
    """``LoadedModel.generate`` (what ``python -m sedd_ray.sample`` runs) on a RADD model
    (absorbing, time-independent) reuses the network output while no token changed: the
    same text as one network call per step, with fewer calls, prefix and suffix kept."""
    from pathlib import Path

    from conftest import tiny_config

    import sedd_ray.diffusion as diffusion
    from sedd_ray.model import ScoreModel
    from sedd_ray.sample import LoadedModel

    cfg = tiny_config(graph="absorb", noise="loglinear", time_conditioning=False)
    graph, noise = get_graph("absorb", vocab_size=tiny_bundle.vocab_size), get_noise("loglinear")
    torch.manual_seed(0)
    model = ScoreModel(cfg.model, graph).eval()
    calls = []  # network evaluations: forward and denoiser_logprobs both run _raw once
    raw = model._raw
    model._raw = lambda *a: (calls.append(1), raw(*a))[1]
    m = LoadedModel(model, graph, noise, tiny_bundle.backend,
                    tiny_bundle.vocab_size, cfg, 0, Path("."))
    kw = dict(num_samples=2, length=24, steps=24, seed=3, prefix="ROMEO:", suffix=" end.")

    cached = m.generate(**kw)
    cached_calls = len(calls)
    assert cached_calls > 0
    calls.clear()

    def plain(model, autocast=None):  # one network call per step
        return lambda x, sigma_bar: model(x, sigma_bar).float().exp()

    monkeypatch.setattr(diffusion, "model_score_fn", plain)
    assert m.generate(**kw) == cached
    assert cached_calls < len(calls) == kw["steps"] + 1  # + the final denoising step
    assert all(t.startswith("ROMEO:") and t.endswith(" end.") for t in cached)
