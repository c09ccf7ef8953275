"""The score network: shapes, adaLN-zero init, SEDD/RADD output conventions, counts, grads."""

from __future__ import annotations

import math

import pytest
import torch

from sedd_ray.config import MODEL_SIZES, ModelConfig
from sedd_ray.diffusion import get_graph
from sedd_ray.model import MASK_LOG_SCORE, ScoreModel, count_parameters, log_expm1

N = 11  # real tokens
B, L = 3, 16
CFG = dict(hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_seq_len=32, dropout=0.1)
KINDS = ["absorb", "uniform", "radd"]  # radd = absorbing graph, time_conditioning=False


def make(kind: str, seed: int = 0, perturb: bool = False, **overrides) -> ScoreModel:
    """A tiny model; ``perturb`` adds noise to every weight so zero-inits stop hiding bugs."""
    torch.manual_seed(seed)
    graph = get_graph("uniform" if kind == "uniform" else "absorb", vocab_size=N)
    cfg = ModelConfig(**{**CFG, "time_conditioning": kind != "radd", **overrides})
    model = ScoreModel(cfg, graph)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def inputs(model: ScoreModel, seed: int = 1, mask_frac: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.vocab_size, (B, L), generator=g)
    if model.absorb:  # mask about half of the positions
        x = torch.where(torch.rand(B, L, generator=g) < mask_frac, model.dim - 1, x)
    sigma_bar = torch.tensor([1e-3, 0.5, 3.0])
    return x, sigma_bar


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_and_current_token_zero(kind):
    model = make(kind, perturb=True)
    x, s = inputs(model)
    out = model(x, s)
    assert out.shape == (B, L, model.dim) and out.dtype == torch.float32
    assert model.dim == (N if kind == "uniform" else N + 1)
    assert torch.all(out.gather(-1, x[..., None]) == 0)  # score of the current token is 1
    assert model.time_independent == (kind == "radd")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_output_is_float32(kind):
    model = make(kind, perturb=True)
    x, s = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, s)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = model(x, s)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 rounding, not garbage


@pytest.mark.parametrize("kind", KINDS)
def test_adaln_zero_starts_as_identity(kind):
    model = make(kind)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    model.output_layer.register_forward_hook(lambda m, args, out: seen.append(("final", out)))
    x, s = inputs(model)
    model.train()(x, s)  # dropout on: the gates still zero every branch
    assert len(seen) == len(model.blocks) + 1
    for block_in, block_out in seen[:-1]:
        assert torch.equal(block_in, block_out)
    assert torch.all(seen[-1][1] == 0)


def test_absorbing_scale_by_sigma_at_init():
    model = make("absorb")
    x, s = inputs(model)
    out = model(x, s).double()
    const = torch.tensor([-math.log(math.expm1(v)) - math.log(N) for v in s.tolist()],
                         dtype=torch.float64)
    expected = const[:, None, None].expand(B, L, N + 1)
    current = torch.zeros_like(out, dtype=torch.bool).scatter(-1, x[..., None], True)
    torch.testing.assert_close(out[~current], expected[~current], rtol=0, atol=1e-5)
    # the scores over the N real tokens at a mask sum to 1/expm1(sigma_bar), the true total
    masked = x == N
    total = out[..., :N].exp().sum(-1)
    torch.testing.assert_close(
        total[masked], (1 / torch.expm1(s.double()))[:, None].expand(B, L)[masked], rtol=1e-5,
        atol=0,
    )


def test_scale_by_sigma_off_gives_raw_zeros_at_init():
    model = make("absorb", scale_by_sigma=False)
    x, s = inputs(model)
    assert torch.all(model(x, s) == 0)


def test_radd_output_is_time_independent_up_to_expm1():
    model = make("radd", perturb=True)
    assert not hasattr(model, "sigma_map")
    x, _ = inputs(model)
    s1, s2 = torch.full((B,), 1e-4), torch.full((B,), 7.0)
    o1, o2 = model(x, s1), model(x, s2)
    masked = x == N
    shift = (log_expm1(s2) - log_expm1(s1))[:, None, None]
    torch.testing.assert_close(o1[..., :N][masked], (o2[..., :N] + shift)[masked])
    for s, o in ((s1, o1), (s2, o2)):
        total = o[..., :N].exp().sum(-1)[masked]
        torch.testing.assert_close(total, (1 / torch.expm1(s))[:, None].expand(B, L)[masked])
    # the mask column: 0 at masks (current token), a finite large negative elsewhere
    assert torch.all(o1[..., N][masked] == 0) and torch.all(o1[..., N][~masked] == MASK_LOG_SCORE)
    # the cached-sampler entry point matches forward at masked positions
    logp = model.denoiser_logprobs(x)
    assert logp.shape == (B, L, N)
    torch.testing.assert_close(logp[masked], (o1[..., :N] + log_expm1(s1)[:, None, None])[masked])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_backbone_then_the_graphs_post_processing(kind):
    """forward(x, sb) = log_score_from_raw(backbone(x, sb), x, sb), bit for bit, and the
    post-processing may use another sigma_bar than the backbone saw (issue 15's bound)."""
    model = make(kind, perturb=True)
    x, s = inputs(model)
    seen = None if model.time_independent else s
    assert torch.equal(model(x, s), model.log_score_from_raw(model.backbone(x, seen), x, s))
    other = s * 1.7
    shifted = model.log_score_from_raw(model.backbone(x, seen), x, other)
    if kind == "uniform":  # no sigma_bar in the uniform graph's post-processing
        assert torch.equal(shifted, model.log_score_from_raw(model.backbone(x, seen), x, s))
    else:  # absorbing: only the log(expm1(sigma_bar)) shift moves, on the real tokens
        delta = (log_expm1(s) - log_expm1(other))[:, None, None]
        own = torch.zeros_like(shifted, dtype=torch.bool).scatter(-1, x[..., None], True)
        base = model(x, s)
        torch.testing.assert_close(shifted[..., :N][~own[..., :N]],
                                   (base[..., :N] + delta)[~own[..., :N]])


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
def test_time_conditioned_network_sees_sigma(kind):
    model = make(kind, perturb=True)
    x, _ = inputs(model)
    raw1, raw2 = model.backbone(x, torch.full((B,), 0.01)), model.backbone(x, torch.full((B,), 5.0))
    assert (raw1 - raw2).abs().amax() > 1e-3


def test_radd_refuses_uniform_and_denoiser_needs_radd():
    with pytest.raises(ValueError, match="absorbing"):
        ScoreModel(ModelConfig(**CFG, time_conditioning=False), get_graph("uniform", vocab_size=N))
    with pytest.raises(ValueError, match="time_conditioning=False"):
        make("absorb").denoiser_logprobs(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
def test_attention_is_bidirectional(kind):
    model = make(kind, perturb=True)
    x, s = inputs(model)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % model.vocab_size  # change only the last token
    diff = (model(x, s) - model(y, s))[:, 0].abs().amax(-1)
    assert torch.all(diff > 1e-6)  # the first position saw it


@pytest.mark.parametrize("kind", KINDS)
def test_rotary_makes_position_matter(kind):
    """Without positions the network is permutation-equivariant: f(x[perm]) == f(x)[perm]."""
    model = make(kind, perturb=True)
    x, s = inputs(model)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    diff = (model(x[:, perm], s) - model(x, s)[:, perm]).abs().amax(-1)  # (B, L)
    assert torch.all(diff.amax(-1) > 1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_finite_over_the_sigma_range(kind):
    model = make(kind, perturb=True)
    x, _ = inputs(model)
    for sb in torch.logspace(-5, math.log10(20.0), 8):
        assert torch.isfinite(model(x, sb.expand(B))).all(), float(sb)


def test_log_expm1_is_accurate_and_finite():
    s = torch.logspace(-5, math.log10(30.0), 200)
    ref = torch.log(torch.expm1(s.double()))
    got = log_expm1(s)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(log_expm1(torch.tensor([200.0]))).all()  # exp(200) overflows float32


def test_bad_shapes_say_what_is_wrong():
    model = make("absorb")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, CFG["max_seq_len"] + 1, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError, match="sigma_bar"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.ones(3))
    assert model(torch.zeros(2, 4, dtype=torch.long), torch.tensor(0.5)).shape == (2, 4, N + 1)


def test_parameter_counts():
    """Closed form for a tiny model; SEDD-small has ~90M non-embedding parameters."""
    model = make("absorb")
    h, c, d, r = CFG["hidden_size"], CFG["cond_dim"], N + 1, 4
    block = 4 * h * h + (2 * r * h * h + r * h + h) + (c * 6 * h + 6 * h) + 2 * h
    rest = (256 * c + c + c * c + c) + (c * 2 * h + 2 * h + h)
    counts = count_parameters(model)
    assert counts == {
        "total": d * h + CFG["n_layers"] * block + rest + h * d + d,
        "non_embedding": CFG["n_layers"] * block + rest,
        "embedding": d * h + h * d + d,
    }
    assert model.num_parameters() == counts["non_embedding"]
    assert model.num_parameters(non_embedding=False) == counts["total"]

    graph = get_graph("absorb", vocab_size=50257)
    rows = {}
    for name, make_cfg in MODEL_SIZES.items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            rows[name] = count_parameters(ScoreModel(make_cfg(), graph))
    print("\nsize     non-embedding   embedding       total   (absorbing, N=50257)")
    for name, cnt in rows.items():
        print(f"{name:7s} {cnt['non_embedding']:14,d} {cnt['embedding']:11,d} {cnt['total']:13,d}")
    assert 85e6 <= rows["small"]["non_embedding"] <= 95e6


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind):
    model = make(kind, perturb=True).train()
    x, s = inputs(model)
    out = model(x, s)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
