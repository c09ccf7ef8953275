"""Extending sedd-ray from outside the package: a new graph and a new noise schedule.

The two toys below are defined here, not in ``sedd_ray/`` (``docs/extending.md`` shows the
same code, checked verbatim by :func:`test_docs_show_this_code`), and registered with the
public registries. Nothing in ``sedd_ray/`` names them. They then run through everything
a built-in component does: the shared property suites (``tests/suites.py``), the run
config (typed parameters, flags, fix-it errors), a 20-step training run of the plain
trainer, the ELBO, and both samplers with the final denoiser.

They are registered for this module only (a fixture; a plug-in would use the decorators,
``@GRAPHS.register("cycle")``): the other test modules' registry-driven parametrisations
and the studies' level lists stay those of the built-in components.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from suites import GraphSuite, N, NoiseSuite
from toy import F64, P0, L, exact_log_score_model, exact_score_fn

from sedd_ray.config import ConfigError, RunConfig, apply_params, preset, short_names
from sedd_ray.diffusion import (
    GRAPHS,
    NOISES,
    Graph,
    Noise,
    elbo_nll,
    get_graph,
    get_noise,
    sample,
)

ROOT = Path(__file__).resolve().parents[1]


# --- the toy components (the same code as docs/extending.md) ---------------------------------

class Cycle(Graph):
    """Tokens on a ring: each jumps to either neighbour at rate ``jump_rate``.

    Q[x +- 1 mod N, x] = jump_rate, Q[x, x] = -2 jump_rate. Small vocabularies only: the
    transition is a dense matrix exponential, exp(sigma_bar Q), in float64.
    """

    def __init__(self, vocab_size: int, jump_rate: float = 1.0) -> None:
        super().__init__(vocab_size)
        if not jump_rate > 0:
            raise ValueError(f"cycle jump_rate must be > 0, got {jump_rate}; try 1.0")
        self.jump_rate = float(jump_rate)

    @property
    def dim(self) -> int:
        return self.vocab_size

    def _q(self, dtype=torch.float64, device=None) -> torch.Tensor:
        n, x = self.dim, torch.arange(self.dim, device=device)
        q = torch.zeros(n, n, dtype=dtype, device=device)
        for step in (1, -1):  # index_put_ accumulates: N = 2 has one neighbour, twice
            q.index_put_(((x + step) % n, x), torch.tensor(self.jump_rate, dtype=dtype,
                                                           device=device), accumulate=True)
        return q - torch.diag(q.sum(0))

    def _expm(self, sigma_bar, like: torch.Tensor) -> torch.Tensor:
        """exp(sigma_bar Q) (*sigma_bar, dim, dim) in float64."""
        sb = torch.as_tensor(sigma_bar, device=like.device).to(torch.float64)
        return torch.linalg.matrix_exp(sb[..., None, None] * self._q(device=like.device))

    def _out_dtype(self, sigma_bar, like: torch.Tensor) -> torch.dtype:
        sb = torch.as_tensor(sigma_bar)
        dtype = sb.dtype if sb.is_floating_point() else torch.get_default_dtype()
        return torch.promote_types(dtype, torch.float32)

    def rate(self, i, dtype=None):
        return self._q(dtype or torch.get_default_dtype(), i.device).T[i]

    def transp_rate(self, i, dtype=None):
        return self._q(dtype or torch.get_default_dtype(), i.device)[i]

    def _pick(self, p: torch.Tensor, i: torch.Tensor, axis: int) -> torch.Tensor:
        """Column (axis=-1) or row (axis=-2) ``i`` of ``p`` (*s, dim, dim) -> (*, dim)."""
        p = p if axis == -2 else p.transpose(-1, -2)
        shape = torch.broadcast_shapes(i.shape, p.shape[:-2])
        idx = i.expand(shape)[..., None, None].expand(*shape, 1, self.dim)
        return p.expand(*shape, self.dim, self.dim).gather(-2, idx).squeeze(-2)

    def transition(self, i, sigma_bar):
        out = self._pick(self._expm(sigma_bar, i), i, axis=-1)
        return out.to(self._out_dtype(sigma_bar, i))

    def transp_transition(self, i, sigma_bar):
        out = self._pick(self._expm(sigma_bar, i), i, axis=-2)
        return out.to(self._out_dtype(sigma_bar, i))

    def forward_marginal(self, p0, sigma_bar):
        out = (self._expm(sigma_bar, p0) @ p0.to(torch.float64)[..., None]).squeeze(-1)
        return out.to(torch.promote_types(p0.dtype, self._out_dtype(sigma_bar, p0)))

    def staggered_score(self, score, dsigma):
        back = self._expm(-torch.as_tensor(dsigma, device=score.device), score)
        out = (back @ score.to(torch.float64)[..., None]).squeeze(-1)
        return out.to(torch.promote_types(score.dtype, self._out_dtype(dsigma, score)))

    def sample_limit(self, *batch_dims, device=None, generator=None):
        gen_device = generator.device if generator is not None else device
        x = torch.randint(0, self.dim, batch_dims, generator=generator, device=gen_device)
        return x.to(device)

    def prior_kl(self, x0, sigma_bar):
        """KL(p(. | x_0) at sigma_bar || uniform): Q is doubly stochastic."""
        p = self.transition(x0, torch.as_tensor(sigma_bar, dtype=torch.float64)).clamp_min(1e-300)
        kl = (p * torch.log(p * self.dim)).sum(-1).clamp_min(0.0)
        return kl.to(self._out_dtype(sigma_bar, x0))


class Linear(Noise):
    """sigma_bar(t) = sigma_end * t: a constant rate, sigma(t) = sigma_end."""

    def __init__(self, sigma_end: float = 12.0) -> None:
        if not sigma_end > 0:
            raise ValueError(f"linear sigma_end must be > 0, got {sigma_end}; try 12")
        self.sigma_end = float(sigma_end)

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_end * t

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.sigma_end)


# --- registered for this module only -----------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def registered():
    GRAPHS.register("cycle")(Cycle)
    NOISES.register("linear")(Linear)
    yield
    GRAPHS.unregister("cycle")
    NOISES.unregister("linear")


def test_docs_show_this_code():
    """docs/extending.md's class definitions are this module's, character for character."""
    doc = (ROOT / "docs" / "extending.md").read_text()
    source = Path(__file__).read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    classes = [b for b in blocks if "class Cycle(Graph)" in b or "class Linear(Noise)" in b]
    assert len(classes) == 2
    for block in classes:
        body = block[block.index("class "):]  # the decorator line is the plug-in's
        assert body in source, body[:60]


# --- the shared suites -----------------------------------------------------------------------


class TestCycleGraph(GraphSuite):
    @pytest.fixture(params=[0.5, 1.0, 3.0])
    def graph(self, request) -> Graph:
        return get_graph("cycle", vocab_size=N, jump_rate=request.param)


class TestLinearNoise(NoiseSuite):
    @pytest.fixture(params=[6.0, 12.0])
    def noise(self, request) -> Noise:
        return get_noise("linear", sigma_end=request.param)


def test_registered_names_and_parameters():
    assert "cycle" in GRAPHS.names() and "linear" in NOISES.names()
    assert Cycle.params()["jump_rate"].type is float and Cycle.params()["jump_rate"].default == 1.0
    with pytest.raises(TypeError, match=r"no argument 'jump_rte' \(did you mean 'jump_rate'\?\)"):
        get_graph("cycle", vocab_size=N, jump_rte=2.0)
    with pytest.raises(ValueError, match="jump_rate must be > 0"):
        get_graph("cycle", vocab_size=N, jump_rate=0.0)
    with pytest.raises(TypeError, match="valid arguments: sigma_end"):
        get_noise("linear", eps=1e-3)


# --- the run config ------------------------------------------------------------------------------


def test_config_takes_the_registered_parameters():
    """Short names (CLI flags, study parameters), typed from the declaration."""
    assert short_names()["jump_rate"] == "diffusion.graph_params.jump_rate"
    assert short_names()["sigma_end"] == "diffusion.noise_params.sigma_end"
    cfg = apply_params(preset("tiny"), {"graph": "cycle", "noise": "linear",
                                        "jump_rate": "2.5", "sigma_end": 14}).validate()
    assert cfg.diffusion.graph_params == {"jump_rate": 2.5}
    assert cfg.diffusion.noise_params == {"sigma_end": 14.0}
    graph, noise = cfg.diffusion.build_graph(8), cfg.diffusion.build_noise()
    assert isinstance(graph, Cycle) and graph.jump_rate == 2.5 and graph.vocab_size == 8
    assert isinstance(noise, Linear) and noise.sigma_end == 14.0
    flat = cfg.flat()
    assert flat["diffusion.graph_params.jump_rate"] == 2.5
    assert flat["diffusion.noise_params.sigma_end"] == 14.0
    assert all(not isinstance(v, (dict, list)) for v in flat.values())  # scalar columns
    # the flat view reads back (Parquet rows -> configs)
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    again = RunConfig.from_dict(nested).validate()
    assert again.diffusion.build_graph(8).jump_rate == 2.5
    # defaults are the component's own
    cfg = apply_params(preset("tiny"), {"graph": "cycle", "noise": "linear"}).validate()
    assert cfg.flat()["diffusion.graph_params.jump_rate"] == 1.0
    assert cfg.diffusion.build_noise().sigma_end == 12.0


@pytest.mark.parametrize("params,message", [
    ({"jump_rate": 0}, r"diffusion.graph_params \(cycle\): cycle jump_rate must be > 0, got 0"),
    ({"jump_rate": "fast"}, r"diffusion.graph_params.jump_rate must be a number, got 'fast'"),
    ({"diffusion.graph_params.jump_rte": 1},
     r"unknown config key diffusion.graph_params.jump_rte \(did you mean "
     r"diffusion.graph_params.jump_rate\?\): the cycle graph takes jump_rate"),
    ({"sigma_end": -1}, r"linear sigma_end must be > 0, got -1.0; try 12"),
    ({"sigma_min": 1e-3}, r"noise_params.sigma_min \(it belongs to --noise geometric\)"),
    ({"time_conditioning": False},
     r"model.time_conditioning=False \(RADD\) needs a graph whose score factorises"),
])
def test_config_errors_say_the_fix(params, message):
    with pytest.raises(ConfigError, match=message):
        apply_params(preset("tiny"), {"graph": "cycle", "noise": "linear", **params}).validate()


def test_built_in_components_own_their_parameters_and_old_keys_still_read():
    """Geometric's sigma_min/sigma_max and loglinear's eps through the same mechanism; the
    old flat keys (checkpoints, Parquet rows, --set diffusion.sigma_min) keep working."""
    names = short_names()
    assert names["sigma_min"] == "diffusion.noise_params.sigma_min"  # --sigma-min
    assert names["sigma_max"] == "diffusion.noise_params.sigma_max"
    assert "eps" not in names or names["eps"] == "optim.eps"  # ambiguous: dotted key only
    cfg = apply_params(preset("tiny"), {"diffusion.noise_params.eps": "1e-4"}).validate()
    assert cfg.diffusion.build_noise().eps == 1e-4
    geo = apply_params(preset("tiny"), {"noise": "geometric", "sigma_min": 1e-3}).validate()
    noise = geo.diffusion.build_noise()
    assert (noise.sigma_min, noise.sigma_max) == (1e-3, 20.0)
    flat = geo.flat()
    assert flat["diffusion.noise_params.sigma_min"] == 1e-3
    assert flat["diffusion.noise_params.sigma_max"] == 20.0
    assert "diffusion.sigma_min" not in flat
    old = preset("tiny").to_dict()
    del old["diffusion"]["graph_params"], old["diffusion"]["noise_params"]
    for noise_name, sigma_min in (("geometric", 5e-4), ("loglinear", 1e-4)):
        d = {**old, "diffusion": {**old["diffusion"], "noise": noise_name,
                                  "sigma_min": sigma_min, "sigma_max": 20.0}}
        back = RunConfig.from_dict(d).validate()
        if noise_name == "geometric":
            assert back.diffusion.build_noise().sigma_min == 5e-4
        else:  # every old config held the (ignored) defaults for other schedules
            assert back.diffusion.noise_params == {}
    moved = geo.with_overrides({"diffusion.sigma_min": 2e-4}).validate()
    assert moved.diffusion.build_noise().sigma_min == 2e-4
    with pytest.raises(ConfigError, match=r"unknown config key diffusion.noise_params.sigma_min "
                       r"\(it belongs to --noise geometric\): the loglinear noise takes eps"):
        preset("tiny").with_overrides({"diffusion.sigma_min": 1e-3}).validate()
    code = ("import sys; from sedd_ray.config import RunConfig; "
            f"RunConfig.from_dict({d!r}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # reading: no torch


# --- training, the ELBO, the samplers ------------------------------------------------------------

SOURCE = "markov:vocab=8,order=1,sharpness=3,seed=0,blocks=256"


def test_twenty_step_training_run(tmp_path):
    """The plain trainer (no Ray) on the toy graph and noise: losses, evaluation (the
    ELBO), test bound and end-of-run samples, all finite; the checkpoint's config
    rebuilds the same components."""
    from conftest import tiny_config

    from sedd_ray.trainer import train

    cfg = tiny_config(graph="cycle", noise="linear", jump_rate=2.0, sigma_end=10.0,
                      corpus=SOURCE, seq_len=16, steps=20, batch_size=8, eval_every=10,
                      ckpt_every=10, eval_sequences=8, test_draws=2, test_sequences=8,
                      sample_count=2, sample_length=16, sample_steps=8,
                      cache_dir=str(tmp_path / "cache"))
    rows: list[dict] = []
    result = train(cfg, tmp_path / "run", lambda m, c: rows.append(m))
    assert result.step == 20
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.val_nll) and result.val_nll > 0
    assert math.isfinite(result.test_nll) and result.test_nll > 0
    assert len(result.samples) == 2
    saved = RunConfig.from_dict(cfg.to_dict()).validate()
    assert saved.diffusion.build_graph(8).jump_rate == 2.0


def _draw_x0(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(P0, batch, replacement=True, generator=g).T.contiguous()  # (B, L)


def test_elbo_with_the_exact_score_is_the_nll_and_a_wrong_model_is_above():
    graph, noise = get_graph("cycle", vocab_size=N, jump_rate=2.0), get_noise("linear")
    x0 = _draw_x0(1000, seed=1)
    truth = -P0.gather(1, x0.T).log().T.mean(-1)  # (B,) nats per token
    nll = elbo_nll(exact_log_score_model(graph), graph, noise, x0, draws=16,
                   generator=torch.Generator().manual_seed(2))
    assert nll.shape == (1000,) and torch.isfinite(nll).all()
    gap = nll.double() - truth
    se = gap.std() / len(gap) ** 0.5
    assert abs(gap.mean()) < 4 * se + 0.01 * truth.mean(), (gap.mean(), se)
    wrong = elbo_nll(lambda x, sb: torch.zeros(*x.shape, graph.dim), graph, noise, x0,
                     draws=4, generator=torch.Generator().manual_seed(3))
    assert wrong.mean() > 1.1 * truth.mean()


@pytest.mark.parametrize("predictor,steps", [("euler", 256), ("analytic", 48)])
def test_samplers_with_the_exact_score_recover_the_data(predictor, steps):
    """Both predictors and the final denoiser: per-position frequencies match P0. (Euler is
    first order: at a constant rate it needs small steps, dt sigma(t) = 12/256 here.)"""
    graph, noise = get_graph("cycle", vocab_size=N, jump_rate=1.0), get_noise("linear")
    x = sample(exact_score_fn(graph), graph, noise, batch=4000, length=L, steps=steps,
               predictor=predictor, denoise=True, generator=torch.Generator().manual_seed(4))
    assert x.shape == (4000, L) and ((x >= 0) & (x < N)).all()
    freq = torch.stack([torch.bincount(x[:, pos], minlength=N) for pos in range(L)]).to(F64)
    tv = 0.5 * (freq / 4000 - P0).abs().sum(-1).max().item()
    assert tv < 0.06, tv
    bad = sample(lambda xt, sb: torch.ones(*xt.shape, graph.dim), graph, noise, batch=4000,
                 length=L, steps=steps, predictor=predictor,
                 generator=torch.Generator().manual_seed(5))
    freq = torch.stack([torch.bincount(bad[:, pos], minlength=N) for pos in range(L)]).to(F64)
    assert 0.5 * (freq / 4000 - P0).abs().sum(-1).max().item() > 0.18  # the check has teeth
