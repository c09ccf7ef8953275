"""The SEDD score network: a DiT-style bidirectional transformer.

    model = ScoreModel(cfg, graph)
    log_score = model(x_t, sigma_bar)     # (B, L) long, (B,) float -> (B, L, graph.dim) float32

The computation, after the official SEDD ``model/transformer.py``:

    x_t       ── embedding (graph.dim rows) ──────────────────────► h (B, L, hidden)
    sigma_bar ── sinusoidal(256) ── Linear-SiLU-Linear ── SiLU ───► c (B, cond_dim)
    h ── n_layers x DiTBlock(h, c) ── FinalLayer(h, c) ──────────► raw (B, L, out)
    raw ── graph-specific post-processing ────────────────────────► log-scores (B, L, dim)

Every block is adaLN-zero: LayerNorm (float32, no bias) modulated by shift/scale from c,
rotary q/k, bidirectional ``scaled_dot_product_attention`` (no mask), GELU(tanh) MLP, and
each residual branch multiplied by a gate from c. The modulation Linears and the final
projection start at zero, so every block starts as the identity and the raw output as 0.

Post-processing, in float32 even under bf16 autocast (the loss exponentiates it), is the
graph's: ``graph.output_log_score(raw, x_t, sigma_bar, scale_by_sigma, time_independent)``
(:meth:`sedd_ray.diffusion.Graph.output_log_score`), so a module may run the backbone at one
sigma_bar and post-process at another (:meth:`ScoreModel.log_score_from_raw`). Every graph
sets the current token's log-score to 0 (score 1, the loss's convention); the absorbing
graph, with ``cfg.scale_by_sigma``, subtracts log(expm1(sigma_bar)) + log(N) (other graphs
ignore it, as in the official code).
- ``cfg.time_conditioning=False`` (RADD; graphs with ``time_independent_ok``, i.e. absorbing):
  the network never sees sigma_bar and predicts p(x0 | x_t) over the N real tokens
  (out = N). The score is e^{-sb}/(1 - e^{-sb}) p = p / expm1(sb), so log-score =
  log_softmax(raw) - log(expm1(sb)); the mask column is the finite MASK_LOG_SCORE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sedd_ray.config import ModelConfig
from sedd_ray.diffusion.graphs import MASK_LOG_SCORE, Graph, log_expm1

__all__ = ["MASK_LOG_SCORE", "ScoreModel", "count_parameters", "log_expm1"]

FREQ_EMBED_DIM = 256  # width of the sinusoidal sigma_bar features (official value)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 1e4):
    """Sinusoidal features of a (B,) float tensor -> (B, dim) float32 (GLIDE/DiT style)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_cos_sin(seq_len: int, head_dim: int, device: torch.device, base: float = 1e4):
    """cos, sin tables for rotary embeddings, each (L, head_dim) float32 (rotate-half layout)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)  # (L, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, L, hd) queries or keys by position, in float32; returns x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, H) * (1 + scale) + shift, with shift/scale (B, 1, H)."""
    return x * (1 + scale) + shift


class LayerNorm(nn.Module):
    """LayerNorm in float32 with a learned gain and no bias (the shift comes from adaLN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float())


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """One adaLN-zero transformer block; (B, L, H), (B, cond_dim) -> (B, L, H).

    ``causal=True`` masks attention to earlier positions (the autoregressive reference,
    :mod:`sedd_ray.ar`); the score network's blocks are bidirectional."""

    def __init__(self, cfg: ModelConfig, causal: bool = False) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.n_heads, self.causal = cfg.n_heads, causal
        self.norm1 = LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.norm2 = LayerNorm(h)
        self.mlp = nn.Sequential(
            nn.Linear(h, cfg.mlp_ratio * h),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * h, h),
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN_modulation = _zero_linear(cfg.cond_dim, 6 * h)

    def forward(self, x, c, cos, sin):
        B, L, H = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # each (B, 1, H)
        )
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))  # (B, L, 3H)
        q, k, v = qkv.view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, L, hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, L, hd)
        a = a.transpose(1, 2).reshape(B, L, H)
        x = x + gate1 * self.dropout(self.attn_out(a))
        x = x + gate2 * self.dropout(self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a zero-initialised Linear; (B, L, H) -> (B, L, out)."""

    def __init__(self, hidden: int, out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm(hidden)
        self.adaLN_modulation = _zero_linear(cond_dim, 2 * hidden)
        self.linear = _zero_linear(hidden, out)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ScoreModel(nn.Module):
    """The score network s_theta(x_t, sigma_bar) for one graph; see the module docstring.

    graph: a :class:`sedd_ray.diffusion.Graph` (``dim``, ``vocab_size``, ``output_dim``,
    ``output_log_score``, ``time_independent_ok``). Inputs are not range-checked (that
    would sync the GPU): x_t must lie in [0, graph.dim).
    """

    def __init__(self, cfg: ModelConfig, graph: Graph) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.graph = graph
        self.dim, self.vocab_size, self.absorb = graph.dim, graph.vocab_size, graph.absorb
        self.time_independent = not cfg.time_conditioning
        if self.time_independent and not graph.time_independent_ok:
            raise ValueError("model.time_conditioning=False (RADD) needs a graph whose score "
                             "factorises over time (the absorbing graph); use --graph absorb "
                             "or keep time conditioning on")

        h = cfg.hidden_size
        self.embed = nn.Embedding(self.dim, h)
        nn.init.uniform_(self.embed.weight, -1 / math.sqrt(h), 1 / math.sqrt(h))  # official init
        if self.time_independent:
            # No sigma input: the adaLN condition is one learned vector shared by all inputs.
            self.cond = nn.Parameter(torch.randn(cfg.cond_dim))
        else:
            self.sigma_map = nn.Sequential(
                nn.Linear(FREQ_EMBED_DIM, cfg.cond_dim),
                nn.SiLU(),
                nn.Linear(cfg.cond_dim, cfg.cond_dim),
            )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.output_layer = FinalLayer(h, graph.output_dim(self.time_independent), cfg.cond_dim)

    @classmethod
    def from_pretrained(cls, id_or_dir: str, device: str | torch.device = "cpu") -> Any:
        """Load an official SEDD checkpoint (``louaaron/sedd-small``, a folder of one) or a
        folder written by ``python -m sedd_ray.export``; see :mod:`sedd_ray.hub`.

        Returns a :class:`sedd_ray.hub.Pretrained`: ``.model`` (this class, eval mode),
        ``.graph``, ``.noise``, ``.tokenizer_name``, ``.config``; it unpacks as
        ``model, graph, noise``.
        """
        from sedd_ray.hub import load_pretrained

        return load_pretrained(id_or_dir, device)

    def backbone(self, x_t: torch.Tensor, sigma_bar: torch.Tensor | None) -> torch.Tensor:
        """Raw network output (B, L, out) float32, before any post-processing.

        out = graph.output_dim(time_independent): N for the time-independent (RADD)
        model, which ignores sigma_bar (pass None), else graph.dim.
        :meth:`log_score_from_raw` turns it into log-scores.
        """
        return self._raw(x_t, sigma_bar).float()

    def _raw(self, x_t: torch.Tensor, sigma_bar: torch.Tensor | None) -> torch.Tensor:
        """:meth:`backbone` in the compute dtype (bfloat16 under autocast)."""
        if x_t.dim() != 2:
            raise ValueError(f"x_t must have shape (B, L), got {tuple(x_t.shape)}")
        B, L = x_t.shape
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_seq_len "
                             f"{self.cfg.max_seq_len}; lower --seq-len or pick a larger --model")
        if self.time_independent:
            c = self.cond[None].expand(B, -1)  # (B, cond_dim)
        else:
            c = F.silu(self.sigma_map(timestep_embedding(sigma_bar)))  # (B, cond_dim)
        x = self.embed(x_t)  # (B, L, H), float32: the residual stream stays float32
        cos, sin = rotary_cos_sin(L, self.cfg.hidden_size // self.cfg.n_heads, x.device)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return self.output_layer(x, c)

    def forward(self, x_t: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, L, dim) float32 from x_t (B, L) long and sigma_bar (B,) float."""
        B, L = x_t.shape
        sigma_bar = torch.as_tensor(sigma_bar, dtype=torch.float32, device=x_t.device).reshape(-1)
        if sigma_bar.numel() not in (1, B):
            raise ValueError(f"sigma_bar must have shape (B,) = ({B},), got {tuple(sigma_bar.shape)}")
        sigma_bar = sigma_bar.expand(B)
        raw = self._raw(x_t, None if self.time_independent else sigma_bar)
        return self.log_score_from_raw(raw, x_t, sigma_bar)

    def log_score_from_raw(self, raw: torch.Tensor, x_t: torch.Tensor,
                           sigma_bar: torch.Tensor) -> torch.Tensor:
        """The graph's post-processing of a raw output: log-scores (B, L, dim) float32.

        ``raw`` (B, L, out) from :meth:`backbone` (possibly at another sigma_bar), ``x_t``
        (B, L), ``sigma_bar`` (B,) float32. ``forward(x_t, sb)`` is exactly
        ``log_score_from_raw(backbone(x_t, sb), x_t, sb)``. May write into a float32 raw.
        """
        return self.graph.output_log_score(raw, x_t, sigma_bar, self.cfg.scale_by_sigma,
                                           self.time_independent)

    def log_score_from_denoiser(self, log_p: torch.Tensor, x_t: torch.Tensor,
                                sigma_bar: torch.Tensor) -> torch.Tensor:
        """RADD: log-scores (B, L, dim) from log p(x0 | x_t) (B, L, N) and sigma_bar (B,).

        ``forward`` of a time-independent model is exactly
        ``log_score_from_denoiser(denoiser_logprobs(x_t), x_t, sigma_bar)``, bit for bit:
        a sampler that caches :meth:`denoiser_logprobs` reproduces it.
        """
        return self.graph.denoiser_log_score(log_p, x_t, sigma_bar)

    def denoiser_logprobs(self, x_t: torch.Tensor) -> torch.Tensor:
        """RADD only: log p(x0 | x_t) over the N real tokens, (B, L) -> (B, L, N) float32.

        Meaningful at masked positions; it does not depend on sigma_bar, so a sampler may
        reuse it until some token changes (see :class:`sedd_ray.diffusion.DenoiserScore`).
        """
        if not self.time_independent:
            raise ValueError("denoiser_logprobs needs a time-independent model; build it "
                             "with model.time_conditioning=False (absorbing graph)")
        return self._raw(x_t, None).float().log_softmax(dim=-1)

    def num_parameters(self, non_embedding: bool = True) -> int:
        return count_parameters(self)["non_embedding" if non_embedding else "total"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a ScoreModel or an :class:`sedd_ray.ar.ARModel` (also inside
    DDP or torch.compile wrappers).

    ``embedding`` is the input embedding plus the output projection (weight and bias);
    ``non_embedding`` is everything else, the number the SEDD paper quotes (~90M for small).
    """
    from sedd_ray.ar import ARModel  # ar builds on this module

    inner = model
    while not isinstance(inner, (ScoreModel, ARModel)):
        nxt = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if nxt is None:
            raise TypeError(f"count_parameters expects a ScoreModel or an ARModel, got "
                            f"{type(model).__name__}")
        inner = nxt
    total = sum(p.numel() for p in inner.parameters())
    embedding = inner.embed.weight.numel() + sum(
        p.numel() for p in inner.output_layer.linear.parameters()
    )
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}
