"""Sample-quality numbers: gen-PPL under a (random, local) GPT-2 agrees with its own
entropy on its own samples; exact truth-NLL separates an oracle sampler from a too-coarse one."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sedd_ray import quality, synthetic
from sedd_ray.diffusion import get_graph, get_noise, sample
from sedd_ray.diffusion.bound import mean_stderr

V, T = 32, 32  # GPT-2 vocabulary (= the synthetic tokenizer's symbols) and sample length


# --- counting statistics ---------------------------------------------------------------------

def test_entropy_distinct_and_repetition_on_known_rows():
    x = torch.tensor([[0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 1, 0, 1, 0]])
    ent = quality.unigram_entropy(x)
    assert ent[0] == 0 and math.isclose(ent[1], math.log(5))
    assert math.isclose(ent[2], -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert quality.distinct_n(x, 2).tolist() == [0.25, 1.0, 0.5]
    assert quality.repetition_rate(x, 4).tolist() == [0.5, 0.0, 0.0]
    assert math.isnan(quality.distinct_n(x[:, :2], 3)[0])


def test_truth_nll_is_the_exact_log_probability():
    src, _ = synthetic.parse_spec("markov:vocab=4,order=1,sharpness=2")
    x = torch.from_numpy(src.sample(5, 6, np.random.default_rng(0)))
    assert torch.allclose(quality.truth_nll(src, x),
                          torch.from_numpy(-src.log_prob(x.numpy()) / 6).double())
    with pytest.raises(ValueError, match="outside"):
        quality.truth_nll(src, torch.full((1, 6), 4))


# --- gen-PPL under a random-weight GPT-2 -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 (peaked predictions: a large initializer range) saved with the
    32-symbol tokenizer (one character per token, so text round-trips to the same ids)."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     initializer_range=0.6)
    model = GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(d)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(synthetic.tokenizer_json(V)))
    tok.save_pretrained(d)
    return d, model


@torch.no_grad()
def _sample_from(model, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral samples (n, T) (first token uniform: context only) and the model's
    predictive entropy at every scored position (n, T - 1)."""
    x = torch.randint(0, V, (n, 1), generator=g)
    ents = []
    for _ in range(T - 1):
        logp = model(input_ids=x).logits[:, -1].double().log_softmax(-1)
        ents.append(-(logp.exp() * logp).sum(-1))
        x = torch.cat([x, torch.multinomial(logp.exp(), 1, generator=g)], dim=1)
    return x, torch.stack(ents, 1)


def test_gen_ppl_of_the_lms_own_samples_matches_its_entropy(tiny_gpt2):
    path, model = tiny_gpt2
    lm = quality.load_eval_lm(str(path))
    g = torch.Generator().manual_seed(1)
    x, ents = _sample_from(model, 256, g)
    symbols = synthetic.symbols(V)
    texts = ["".join(symbols[i] for i in row) for row in x.tolist()]
    assert lm.encode(texts[0]) == x[0].tolist()  # no BOS/EOS: the first token is context
    nll, count = lm.nll(texts)
    assert (count == T - 1).all()
    ppl, want = quality.gen_ppl(nll, count), math.exp(float(ents.mean()))
    assert want < V / 2, "the random GPT-2 should be peaked"
    assert abs(ppl / want - 1) < 0.04, (ppl, want)
    # uniformly random tokens score far worse under the same LM
    noise = torch.randint(0, V, (256, T), generator=g)
    bad = quality.gen_ppl(*lm.nll(["".join(symbols[i] for i in r) for r in noise.tolist()]))
    assert bad > 3 * ppl, (bad, ppl)


# --- truth-NLL: oracle sampler vs too few steps ---------------------------------------------

def _oracle_score_fn(graph, src, length: int):
    """The exact score of the source's forward marginal, by enumerating all V^L blocks:
    s(x)_{l, y} = p_t(x with x_l = y) / p_t(x). (B, L) -> (B, L, dim), float32."""
    x0 = torch.tensor(list(itertools.product(range(src.vocab), repeat=length)))  # (M, L)
    p0 = torch.from_numpy(np.exp(src.log_prob(x0.numpy())))  # (M,)

    def score_fn(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        trans = [graph.transition(x0[:, i].expand(b, -1), sigma_bar.double()[:, None])
                 for i in range(length)]  # each (B, M, dim)
        f = torch.stack([trans[i].gather(-1, x[:, i, None, None].expand(-1, x0.shape[0], 1))[..., 0]
                         for i in range(length)], -1)  # (B, M, L): p(x_t,l | x0_l)
        denom = (p0 * f.prod(-1)).sum(-1)  # (B,)
        out = []
        for i in range(length):
            loo = p0 * torch.cat([f[..., :i], f[..., i + 1:]], -1).prod(-1)  # (B, M)
            out.append(torch.einsum("bm,bmd->bd", loo, trans[i]) / denom[:, None])
        return torch.stack(out, 1).float()

    return score_fn


def test_oracle_sampler_hits_the_entropy_and_one_step_does_not():
    src, _ = synthetic.parse_spec("markov:vocab=3,order=1,sharpness=3,seed=1")
    length = 4
    graph, noise = get_graph("absorb", vocab_size=3), get_noise("loglinear")
    score_fn = _oracle_score_fn(graph, src, length)
    entropy = src.true_nll(length)
    gaps = {}
    for steps in (64, 1):
        g = torch.Generator().manual_seed(steps)
        x = sample(score_fn, graph, noise, batch=3000, length=length, steps=steps,
                   predictor="analytic", generator=g)
        mean, se = mean_stderr(quality.truth_nll(src, x))
        gaps[steps] = (mean - entropy, se)
    gap, se = gaps[64]
    assert abs(gap) < 3 * se, gaps
    gap1, se1 = gaps[1]
    assert gap1 > 5 * se1 and gap1 > gap + 5 * math.hypot(se, se1), gaps
