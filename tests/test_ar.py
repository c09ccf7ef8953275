"""The autoregressive reference (model.kind=ar): causal, trained and evaluated by the same
trainer on the same blocks as the diffusion bound, resumes bitwise, approaches the entropy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import tiny_config

from sedd_ray import checkpoint as ckpt
from sedd_ray.ar import ARModel, ancestral_sample, block_nll
from sedd_ray.config import ConfigError, RunConfig
from sedd_ray.diffusion.bound import paired_difference, spread_block_indices
from sedd_ray.layout import TrainerFiles
from sedd_ray.model import count_parameters
from sedd_ray.objective import OBJECTIVES
from sedd_ray.sample import load_model
from sedd_ray.synthetic import parse_spec
from sedd_ray.trainer import Trainer, train

SOURCE = "markov:vocab=8,order=1,sharpness=3,seed=0,blocks=4096"


def _random_ar(vocab: int = 11, **params) -> ARModel:
    """A tiny ARModel whose zero-initialised layers are randomised (else logits are 0)."""
    cfg = tiny_config(kind="ar", dropout=0.0, **params).model
    torch.manual_seed(0)
    model = ARModel(cfg, vocab).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def test_prediction_of_token_i_depends_only_on_earlier_tokens():
    model = _random_ar(n_layers=2)
    x = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(1))
    base = model(x)
    assert base.shape == (3, 12, 11) and base.dtype == torch.float32
    for j in (0, 5, 11):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 11
        out = model(y)
        assert torch.equal(out[:, : j + 1], base[:, : j + 1])  # positions <= j never see x_j
        if j + 1 < 12:
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])  # position j+1 does
    # the first token is predicted too, from the learned start state: one distribution
    assert torch.allclose(base[:, 0], base[:1, 0].expand(3, -1))


def test_block_nll_and_sampling_are_consistent():
    model = _random_ar()
    x = torch.randint(0, 11, (5, 8), generator=torch.Generator().manual_seed(2))
    per_block = block_nll(model, x, batch_size=2)
    logp = model(x).log_softmax(-1).gather(-1, x[..., None])[..., 0]  # (5, 8)
    assert per_block.dtype == torch.float64
    torch.testing.assert_close(per_block, -logp.double().mean(1), rtol=1e-5, atol=1e-6)
    s = ancestral_sample(model, batch=64, length=2, generator=torch.Generator().manual_seed(3))
    assert s.shape == (64, 2) and 0 <= int(s.min()) and int(s.max()) < 11
    p0 = model(s[:1])[0, 0].detach().softmax(-1)  # the first token's law: samples follow it
    top = int(p0.argmax())
    assert abs(float((s[:, 0] == top).float().mean()) - float(p0[top])) < 4 * math.sqrt(0.25 / 64)
    assert count_parameters(model)["total"] == sum(p.numel() for p in model.parameters())


def test_model_kind_is_validated_and_frees_the_diffusion_checks():
    with pytest.raises(ConfigError, match=r"unknown model.kind 'gpt'; valid model kinds: ar, diffusion"):
        tiny_config(kind="gpt")
    assert set(OBJECTIVES.names()) == {"ar", "diffusion"}
    with pytest.raises(ConfigError, match="time_conditioning=False"):
        tiny_config(graph="uniform", time_conditioning=False)
    cfg = tiny_config(kind="ar", graph="uniform", time_conditioning=False)  # ignored for AR
    assert RunConfig.from_dict(cfg.to_dict()).model.kind == "ar"
    assert tiny_config().model.kind == "diffusion"


@pytest.fixture(scope="module")
def markov_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return lambda **kw: tiny_config(**{
        "kind": "ar", "corpus": SOURCE, "seq_len": 16, "cache_dir": str(cache), "lr": 3e-3,
        "dropout": 0.0, "final_eval_sequences": 0, "eval_sequences": 64, **kw})


def test_ar_nll_on_a_markov_source_approaches_the_entropy_from_above(tmp_path, markov_cfg):
    """The exact NLL falls with training towards the source's entropy and never below it
    (paired with the true per-block NLL of the same validation blocks)."""
    cfg = markov_cfg(steps=240, eval_every=40, ckpt_every=240)
    rows: list[dict] = []
    res = train(cfg, tmp_path, lambda m, c: rows.append(m))
    evals = [m["val_nll"] for m in rows if "val_nll" in m]
    true_nll = res.data_meta["true_nll"]
    assert evals[0] > evals[-1] == res.val_nll_final
    blocks = pd.read_parquet(TrainerFiles(tmp_path).final_blocks)
    t = Trainer(cfg, tmp_path / "probe")  # the same data: the validation split
    src, _ = parse_spec(SOURCE)
    assert blocks["block"].tolist() == spread_block_indices(t.data.val.shape[0]).tolist()
    truth = -src.log_prob(t.data.val.numpy()) / cfg.data.seq_len  # (n,) nats/token
    gap, se = paired_difference(torch.tensor(blocks["nll"].to_numpy()), torch.tensor(truth))
    assert gap >= -3 * se  # from above: the exact NLL cannot beat the source
    assert gap < 0.1 and res.val_nll_final - true_nll < 0.1  # and it gets close
    assert res.val_nll_final >= true_nll - 3 * res.val_nll_final_stderr
    assert evals[0] - true_nll > gap  # closer at the end than at the first evaluation
    assert res.samples and all(set(s) <= set("abcdefgh") for s in res.samples)
    _evaluate_reports_the_exact_nll_and_ancestral_samples(tmp_path, res, true_nll)


def _evaluate_reports_the_exact_nll_and_ancestral_samples(tmp_path, res, true_nll) -> None:
    """``python -m sedd_ray.evaluate`` on the AR checkpoint: its exact ``nll`` (not a
    bound) on fresh blocks of the source, and samples from its own (ancestral) sampler,
    whose truth NLL is near the entropy; a rerun adds nothing."""
    from sedd_ray import evaluate
    from sedd_ray.results import read_evals

    out = tmp_path / "evals.parquet"
    argv = ["--checkpoint", str(res.checkpoint_dir), "--corpus", SOURCE, "--blocks", "128",
            "--samples", "32", "--steps", "2", "--evals", str(out), "--device", "cpu"]
    assert evaluate.main(argv) == 0
    df = read_evals(out).set_index("metric")
    assert {"nll", "ppl", "nll_gap", "truth_nll"} <= set(df.index)
    assert not {"nll_bound", "ppl_bound", "bound_gap"} & set(df.index)
    nll, se = float(df.loc["nll", "value"]), float(df.loc["nll", "stderr"])
    assert true_nll - 3 * se <= nll < true_nll + 0.15
    truth, tse = float(df.loc["truth_nll", "value"]), float(df.loc["truth_nll", "stderr"])
    assert abs(truth - true_nll) < 3 * tse + 0.15  # ancestral samples: the source's statistics
    n = len(read_evals(out))
    assert evaluate.main(argv) == 0 and len(read_evals(out)) == n


class Stop(Exception):
    pass


def _weights(path) -> dict[str, torch.Tensor]:
    state, _ = ckpt.load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_ar_resume_matches_uninterrupted_run(tmp_path, markov_cfg):
    """60 steps straight == 30 steps, a crash, a resume from the checkpoint, 30 more."""
    cfg = markov_cfg(steps=60, ckpt_every=30, eval_every=30, log_every=5, cosine=True,
                     dropout=0.1, final_eval_sequences=16, eval_sequences=8)
    full = train(cfg, tmp_path / "full")

    def crash_after_checkpoint(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "part", crash_after_checkpoint)
    resumed = train(cfg, tmp_path / "part")
    assert resumed.resumed_from_step == 30 and resumed.step == full.step == 60

    def curve(run):
        rows = [json.loads(line) for line in TrainerFiles(tmp_path / run).metrics.open()]
        return [(m["step"], m["train_loss"]) for m in rows if "train_loss" in m]

    assert len(curve("full")) == 60 // 5 and curve("part") == curve("full")
    wa, wb = _weights(full.checkpoint_dir), _weights(resumed.checkpoint_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.val_nll_final == full.val_nll_final and resumed.samples == full.samples
    _, meta = ckpt.load_checkpoint(full.checkpoint_dir)
    assert meta["model_kind"] == "ar" and meta["graph"] is None  # no graph for AR
    loaded = load_model(full.checkpoint_dir)  # sample.py: ancestral samples of the EMA model
    texts = loaded.generate(num_samples=3, length=10, seed=1)
    assert texts == loaded.generate(num_samples=3, length=10, seed=1)
    assert len(texts) == 3 and all(len(t) == 10 and set(t) <= set("abcdefgh") for t in texts)
    with pytest.raises(ValueError, match="need a diffusion model"):
        loaded.generate(num_samples=1, length=10, prefix="ab")


def test_train_cli_runs_the_ar_reference(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sedd_ray.train", "--no-ray", "--smoke-test", "--kind", "ar",
           "--steps", "4", "--eval-every", "4", "--ckpt-every", "4", "--eval-sequences", "4",
           "--final-eval-sequences", "4", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads(TrainerFiles(out).final.read_text())
    assert final["step"] == 4 and math.isfinite(final["val_nll_final"])
    assert json.loads(TrainerFiles(out).metrics.read_text().splitlines()[-1])["final"]
    _, meta = ckpt.load_checkpoint(final["checkpoint_dir"])
    assert meta["config"]["model"]["kind"] == "ar"


@pytest.mark.ray
def test_ar_is_a_level_of_a_model_kind_ablation(tmp_path):
    """A study over model.kind: the AR trial finishes beside the diffusion one, on the same
    validation blocks, and its row says which kind it is."""
    import ray

    from sedd_ray.results import read_blocks, read_trials
    from sedd_ray.study import StudySpec, run_study

    fixed = {"steps": 20, "log_every": 5, "eval_every": 10, "ckpt_every": 20, "seq_len": 16,
             "corpus": SOURCE, "batch_size": 8, "eval_sequences": 8, "eval_draws": 2,
             "final_eval_sequences": 16, "final_eval_draws": 2, "test_draws": 0,
             "sample_count": 1, "sample_steps": 4, "sample_length": 16, "hidden_size": 32,
             "cond_dim": 16, "progress": False, "cache_dir": str(tmp_path / "cache")}
    spec = StudySpec(name="kinds", base="tiny", fixed=fixed, ablate="kind",
                     levels=["diffusion", "ar"], trials_per_level=1, max_concurrent=2)
    ray.init(address="local", num_cpus=2, resources={"sedd_driver": 1000})
    try:
        run_study(spec, str(tmp_path / "studies"), verbose=0)
    finally:
        ray.shutdown()
    trials = read_trials(tmp_path / "studies", "kinds")
    kind_col = next(c for c in trials.columns if c.endswith("kind"))
    assert sorted(trials[kind_col]) == ["ar", "diffusion"]
    assert (trials["status"] == "terminated").all(), trials[["status", kind_col]]
    assert trials["val_nll_final"].notna().all() and (trials["val_nll_final"] > 0).all()
    blocks = read_blocks(tmp_path / "studies", "kinds")
    per_trial = [sorted(g["block"]) for _, g in blocks.groupby("trial_id")]
    assert len(per_trial) == 2 and per_trial[0] == per_trial[1] and len(per_trial[0]) == 16


def test_the_ar_reference_is_an_evaluation_lm(tmp_path, tiny_bundle):
    """`--eval-lm` accepts an AR checkpoint: text that encodes to validation blocks scores
    exactly the AR's own block NLL, random tokens score far worse, and a diffusion
    checkpoint is refused as not causal."""
    from sedd_ray import quality
    from sedd_ray.ar import block_nll
    from sedd_ray.trainer import train

    res = train(tiny_config(kind="ar", steps=40, lr=3e-3), tmp_path / "ar", bundle=tiny_bundle)
    lm = quality.load_eval_lm(str(tmp_path / "ar"))
    assert isinstance(lm, quality.ReferenceLM)
    tok, blocks = lm.loaded.tokenizer, tiny_bundle.val[:6]
    texts = [tok.decode(row.tolist(), skip_special_tokens=False) for row in blocks]
    keep = [i for i, t in enumerate(texts) if tok.encode(t).ids == blocks[i].tolist()]
    assert len(keep) >= 3  # the BPE round-trips most blocks exactly
    nll, count = lm.nll([texts[i] for i in keep], batch_size=4)
    exact = block_nll(lm.loaded.model, blocks[keep]) * blocks.shape[1]
    assert torch.allclose(nll, exact, rtol=1e-5, atol=1e-4) and (count == blocks.shape[1]).all()
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, tiny_bundle.vocab_size, blocks[:4].shape, generator=g)
    rnd = [tok.decode(row.tolist(), skip_special_tokens=False) for row in noise]
    assert quality.gen_ppl(*lm.nll(rnd)) > 2 * quality.gen_ppl(nll, count)
    diff = train(tiny_config(steps=5, ckpt_every=5), tmp_path / "diff", bundle=tiny_bundle)
    with pytest.raises(quality.EvalLMError, match="not a causal LM"):
        quality.load_eval_lm(str(diff.checkpoint_dir))
    assert res.val_nll_final is not None
