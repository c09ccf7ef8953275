"""Official SEDD checkpoints -> ScoreModel (no Hub: folders built here with random weights).

The folder is shaped like ``louaaron/sedd-small`` on the Hub: the run's whole config as
``config.json`` and a state dict under the official key names (``model.safetensors``, or
the older ``pytorch_model.bin``). :func:`official_forward` is an independent, plain
re-implementation of the official ``SEDD.forward`` (``model/transformer.py``,
``model/rotary.py``) over those key names; ours must agree with it within 1e-5 in float32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sedd_ray import hub
from sedd_ray import sample as sample_cli
from sedd_ray.model import ScoreModel

TOKENS = 50257  # GPT-2: every official model
H, HEADS, COND, BLOCKS, LENGTH = 32, 4, 16, 2, 64


def official_config(graph: str = "absorb", noise: str = "loglinear",
                    scale_by_sigma: bool = True) -> dict:
    """A config.json shaped like the official Hub config (the training run's config)."""
    return {
        "ngpus": 8, "tokens": TOKENS,
        "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "ema": 0.9999,
                     "weight": "standard", "snapshot_sampling": True},
        "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
        "graph": {"type": graph, "file": "data", "report_all": False},
        "noise": {"type": noise, "sigma_min": 1e-4, "sigma_max": 20},
        "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
        "eval": {"batch_size": 512, "perplexity": True, "perplexity_batch_size": 32},
        "optim": {"weight_decay": 0, "optimizer": "AdamW", "lr": 3e-4, "beta1": 0.9,
                  "beta2": 0.999, "eps": 1e-8, "warmup": 2500, "grad_clip": 1.0},
        "model": {"name": "small", "type": "ddit", "hidden_size": H, "cond_dim": COND,
                  "length": LENGTH, "n_blocks": BLOCKS, "n_heads": HEADS,
                  "scale_by_sigma": scale_by_sigma, "dropout": 0.1},
    }


def official_state_dict(graph: str = "absorb", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names and shapes (every value distinct)."""
    g = torch.Generator().manual_seed(seed)
    V = TOKENS + (graph == "absorb")

    def w(*shape, scale=0.05, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    sd = {"vocab_embed.embedding": w(V, H, scale=0.5),
          "sigma_map.mlp.0.weight": w(COND, 256), "sigma_map.mlp.0.bias": w(COND),
          "sigma_map.mlp.2.weight": w(COND, COND, scale=0.2), "sigma_map.mlp.2.bias": w(COND),
          "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, H // HEADS, 2).float()
                                                 / (H // HEADS))}
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": w(H, scale=0.1, base=1.0),
                   p + "attn_qkv.weight": w(3 * H, H, scale=0.2),
                   p + "attn_out.weight": w(H, H, scale=0.2),
                   p + "norm2.weight": w(H, scale=0.1, base=1.0),
                   p + "mlp.0.weight": w(4 * H, H, scale=0.2), p + "mlp.0.bias": w(4 * H),
                   p + "mlp.2.weight": w(H, 4 * H, scale=0.1), p + "mlp.2.bias": w(H),
                   p + "adaLN_modulation.weight": w(6 * H, COND, scale=0.2),
                   p + "adaLN_modulation.bias": w(6 * H, scale=0.2)})
    sd.update({"output_layer.norm_final.weight": w(H, scale=0.1, base=1.0),
               "output_layer.linear.weight": w(V, H, scale=0.3),
               "output_layer.linear.bias": w(V, scale=0.3),
               "output_layer.adaLN_modulation.weight": w(2 * H, COND, scale=0.2),
               "output_layer.adaLN_modulation.bias": w(2 * H, scale=0.2)})
    return sd


def write_official(folder: Path, cfg: dict, sd: dict, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


def official_forward(sd: dict, cfg: dict, indices: torch.Tensor, sigma: torch.Tensor):
    """The official SEDD forward pass, written out plainly (float32, eval mode)."""
    m = cfg["model"]
    n_heads, hidden = m["n_heads"], m["hidden_size"]
    d = hidden // n_heads
    B, L = indices.shape

    def layer_norm(x, w):  # no bias; weight applied after the normalisation
        return F.layer_norm(x.float(), [hidden]) * w[None, None, :]

    def linear(x, name, bias=True):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    x = sd["vocab_embed.embedding"][indices]
    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.silu(linear(F.silu(linear(t_freq, "sigma_map.mlp.0")), "sigma_map.mlp.2"))

    angles = torch.arange(L).float()[:, None] * sd["rotary_emb.inv_freq"][None]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # (1, L, 1, d)

    def rotate(t):  # (B, L, h, d): rotate_half pairs (i, i + d/2)
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    for i in range(m["n_blocks"]):
        p = f"blocks.{i}."
        mod = linear(c, p + "adaLN_modulation")[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        h = layer_norm(x, sd[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = linear(h, p + "attn_qkv", bias=False).reshape(B, L, 3, n_heads, d)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        o = torch.einsum("bhlm,bmhd->blhd", att.softmax(dim=-1), v).reshape(B, L, hidden)
        x = x + gate_msa * linear(o, p + "attn_out", bias=False)
        h = layer_norm(x, sd[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        h = linear(F.gelu(linear(h, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
        x = x + gate_mlp * h
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=2)
    x = layer_norm(x, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift
    x = linear(x, "output_layer.linear")
    if m["scale_by_sigma"]:
        esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
        x = x - esigm1.log()[:, None, None] - math.log(x.shape[-1] - 1)
    return torch.scatter(x, -1, indices[..., None], torch.zeros_like(x[..., :1]))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = official_state_dict()
    cfg = official_config()
    return write_official(tmp_path_factory.mktemp("official") / "sedd", cfg, sd), cfg, sd


@pytest.mark.parametrize("graph, noise, sbs, fmt", [
    ("absorb", "loglinear", True, "safetensors"),
    ("absorb", "loglinear", True, "bin"),
    ("absorb", "geometric", False, "safetensors"),
    ("uniform", "geometric", False, "safetensors"),
])
def test_official_forward_matches_the_reference(graph, noise, sbs, fmt, tmp_path):
    cfg = official_config(graph, noise, sbs)
    sd = official_state_dict(graph, seed=1)
    folder = write_official(tmp_path / "m", cfg, sd, fmt)
    pre = ScoreModel.from_pretrained(str(folder))
    model, g, nz = pre
    assert pre.format == "official" and pre.tokenizer_name == "gpt2"
    assert g.dim == TOKENS + (graph == "absorb") and type(g).__name__.lower().startswith(graph[:4])
    assert type(nz).__name__.lower() == noise
    if noise == "geometric":
        assert (nz.sigma_min, nz.sigma_max) == (1e-4, 20.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, g.dim, (3, 24), generator=gen)
    sigma = torch.tensor([1e-3, 0.7, 6.0])
    with torch.no_grad():
        ours = model(x, sigma)
        ref = official_forward(sd, cfg, x, sigma)
    assert ours.shape == ref.shape == (3, 24, g.dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_every_official_parameter_is_used_exactly_once(official):
    folder, cfg, sd = official
    model = ScoreModel.from_pretrained(str(folder)).model
    ours = model.state_dict()
    # every value is distinct, so each of our tensors equals exactly one official tensor
    for name, t in ours.items():
        hits = [k for k, v in sd.items() if v.shape == t.shape and torch.equal(v, t)]
        assert len(hits) == 1, (name, hits)
    used = {k for name, t in ours.items() for k, v in sd.items()
            if v.shape == t.shape and torch.equal(v, t)}
    assert used | {hub.ROTARY_KEY} == set(sd)  # the rotary buffer is checked, not loaded
    assert sum(t.numel() for t in ours.values()) == sum(
        v.numel() for k, v in sd.items() if k != hub.ROTARY_KEY)
    assert {hub.official_key(k) for k in ours} == set(sd) - {hub.ROTARY_KEY}


def _refused(folder: Path) -> str:
    with pytest.raises(hub.HubError) as e:
        ScoreModel.from_pretrained(str(folder))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("case, match", [
    ("missing", r"missing weight 'blocks\.1\.norm2\.weight'"),
    ("extra", r"unexpected weight 'blocks\.0\.attn\.bias'"),
    ("shape", r"weight 'blocks\.0\.attn_qkv\.weight' has shape \(32, 96\), expected \(96, 32\)"),
    ("rotary", r"rotary_emb\.inv_freq is not rotary with base 10000"),
    ("model field", r"unknown config field model\.mlp_ratio"),
    ("top field", r"unknown config field 'extras'"),
    ("missing field", r"missing config field model\.n_heads"),
    ("bad value", r"model\.hidden_size must be int"),
    ("tokens", r"tokens=50000, but the official SEDD models use the GPT-2 tokenizer"),
])
def test_bad_official_folders_are_refused_with_one_line(case, match, tmp_path):
    cfg, sd = official_config(), official_state_dict()
    if case == "missing":
        del sd["blocks.1.norm2.weight"]
    elif case == "extra":
        sd["blocks.0.attn.bias"] = torch.zeros(3 * H)
    elif case == "shape":
        sd["blocks.0.attn_qkv.weight"] = sd["blocks.0.attn_qkv.weight"].T.contiguous()
    elif case == "rotary":
        sd[hub.ROTARY_KEY] = 1.0 / 500000 ** (torch.arange(0, 8, 2).float() / 8)
    elif case == "model field":
        cfg["model"]["mlp_ratio"] = 4
    elif case == "top field":
        cfg["extras"] = {}
    elif case == "missing field":
        del cfg["model"]["n_heads"]
    elif case == "bad value":
        cfg["model"]["hidden_size"] = "wide"
    elif case == "tokens":
        cfg["tokens"] = 50000
    folder = write_official(tmp_path / "m", cfg, sd)
    assert re.search(match, _refused(folder))


def test_truncated_official_weights_are_refused(official, tmp_path):
    folder, cfg, sd = official
    bad = write_official(tmp_path / "m", cfg, {})
    data = (folder / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _refused(bad)


def test_pickled_code_in_an_official_bin_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    sd = official_state_dict()
    sd["evil"] = Payload()
    folder = write_official(tmp_path / "m", official_config(), sd, fmt="bin")
    assert "refused or unreadable (weights_only=True)" in _refused(folder)
    assert not marker.exists()


def test_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError, match=r"^louaaron/sedd-small: not a local folder, and "
                       r"the Hugging Face Hub is unreachable .*--local-dir DIR` and pass DIR$"):
        ScoreModel.from_pretrained("louaaron/sedd-small")
    capfd.readouterr()
    rc = sample_cli.main(["--checkpoint", "louaaron/sedd-small", "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: louaaron/sedd-small: "), err


def test_sample_cli_runs_on_an_official_folder(official, capfd):
    folder, _, _ = official
    rc = sample_cli.main(["--checkpoint", str(folder), "--smoke-test", "--no-progress",
                          "--device", "cpu", "--prefix", "Hello"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert out.count("--- sample") == 2 and "Hello" in out


def test_official_config_maps_to_our_config(official):
    folder, cfg, _ = official
    pre = hub.load_official(str(folder))
    m = pre.config.model
    assert (m.hidden_size, m.n_layers, m.n_heads, m.cond_dim, m.max_seq_len, m.mlp_ratio) == (
        H, BLOCKS, HEADS, COND, LENGTH, 4)
    assert m.scale_by_sigma and m.time_conditioning and m.dropout == 0.1
    assert pre.config.diffusion.graph == "absorb" and pre.config.diffusion.noise == "loglinear"
    assert pre.config.data.tokenizer == "gpt2" and pre.vocab_size == TOKENS
    assert pre.tokenizer.get_vocab_size() == TOKENS
    assert not pre.model.training


def test_fine_tune_starts_from_an_official_folder(official, tmp_path):
    """``train --init-from`` an official folder: GPT-2 data, the official shapes."""
    from conftest import tiny_config

    from sedd_ray.trainer import Trainer

    folder, _, sd = official
    cfg = tiny_config(tokenizer="gpt2", hidden_size=H, n_heads=HEADS, cond_dim=COND,
                      n_layers=BLOCKS, max_train_tokens=20000)
    t = Trainer(cfg, tmp_path / "ft", init_from=str(folder))
    t._resume(False)
    for k, v in t.ema.state_dict().items():
        assert torch.equal(v, sd[hub.official_key(k)]), k
    assert t.step == 0 and not t.opt.state


def test_init_from_an_official_folder_with_another_model_is_one_line(official, tmp_path, capfd):
    from sedd_ray import train as train_cli

    folder, _, _ = official
    rc = train_cli.main(["--smoke-test", "--no-ray", "--output", str(tmp_path / "ft"),
                         "--init-from", str(folder)])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(r"^error: --init-from .*: its model has hidden_size=32 but this run's has "
                     r"64; pass --hidden-size 32 \(or --model small/medium", err[0]), err
    assert not (tmp_path / "ft").exists()


def test_hub_id_loads_from_the_huggingface_cache_offline(official, tmp_path, monkeypatch):
    """A Hub id already in the ``huggingface_hub`` cache needs no network."""
    import shutil

    import huggingface_hub.constants as c

    folder, cfg, sd = official
    repo = tmp_path / "cache" / "models--louaaron--sedd-small"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    pre = ScoreModel.from_pretrained("louaaron/sedd-small")
    assert pre.format == "official" and pre.path.name == commit
    x, sigma = torch.randint(0, TOKENS + 1, (2, 8)), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(pre.model(x, sigma), official_forward(sd, cfg, x, sigma),
                                   rtol=1e-5, atol=1e-5)
