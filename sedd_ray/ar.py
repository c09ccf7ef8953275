"""The autoregressive reference: the score network's backbone with causal attention.

    model = ARModel(cfg, vocab_size)
    logits = model(x)                    # (B, L) long -> (B, L, N) float32
    nll = block_nll(model, blocks)       # (n, L) long -> (n,) float64 nats/token, exact
    x = ancestral_sample(model, batch=4, length=64, generator=g)   # (4, 64) long

The same blocks as :class:`sedd_ray.model.ScoreModel` (rotary q/k, width, depth, heads,
``scaled_dot_product_attention``, adaLN-zero) with ``is_causal=True``. There is no time:
the adaLN condition is one learned vector (as the time-independent RADD network's).

Every token is predicted, the first one too, so the NLL covers all ``L`` tokens of a block
exactly as the diffusion bound does and the two are comparable in nats/token: the input
at position ``i`` is a learned start vector for ``i = 0`` and the embedding of ``x_{i-1}``
otherwise, and the output at ``i`` is the logits of ``p(x_i | x_{<i})``. No BOS token is
added to the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sedd_ray.config import ModelConfig
from sedd_ray.diffusion.graphs import sample_categorical
from sedd_ray.model import DiTBlock, FinalLayer, rotary_cos_sin

__all__ = ["ARModel", "ancestral_sample", "block_nll"]


class ARModel(nn.Module):
    """A causal transformer over ``vocab_size`` tokens; see the module docstring.

    ``forward(x)``: x (B, L) long in [0, vocab_size) -> logits (B, L, vocab_size) float32,
    where ``logits[:, i]`` depends on ``x[:, :i]`` only.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.vocab_size = cfg, vocab_size
        h = cfg.hidden_size
        self.embed = nn.Embedding(vocab_size, h)
        nn.init.uniform_(self.embed.weight, -1 / math.sqrt(h), 1 / math.sqrt(h))
        self.start = nn.Parameter(torch.empty(h).uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h)))
        self.cond = nn.Parameter(torch.randn(cfg.cond_dim))  # no time: one learned condition
        self.blocks = nn.ModuleList(DiTBlock(cfg, causal=True) for _ in range(cfg.n_layers))
        self.output_layer = FinalLayer(h, vocab_size, cfg.cond_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must have shape (B, L), got {tuple(x.shape)}")
        B, L = x.shape
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_seq_len "
                             f"{self.cfg.max_seq_len}; lower --seq-len or pick a larger --model")
        start = self.start[None, None].expand(B, 1, -1)  # (B, 1, H)
        h = torch.cat([start, self.embed(x[:, :-1])], dim=1)  # (B, L, H): shifted right
        c = self.cond[None].expand(B, -1)  # (B, cond_dim)
        cos, sin = rotary_cos_sin(L, self.cfg.hidden_size // self.cfg.n_heads, h.device)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        return self.output_layer(h, c).float()


def token_nll(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """-log p(x_i | x_{<i}) of every token: x (B, L) long -> (B, L) float32 nats."""
    logits = model(x)  # (B, L, N)
    return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").view_as(x)


@torch.no_grad()
def block_nll(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 64,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The exact NLL of each block, mean over its L tokens: (n, L) long -> (n,) float64
    nats/token, ``batch_size`` blocks per call. Put the model in eval mode first."""
    out = [token_nll(model, blocks[i:i + batch_size].to(device)).double().mean(dim=1).cpu()
           for i in range(0, blocks.shape[0], max(1, batch_size))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def ancestral_sample(model: nn.Module, *, batch: int, length: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Plain ancestral sampling at temperature 1, token by token: (batch, length) long.
    One network call per token on the prefix so far (no key/value cache)."""
    x = torch.zeros(batch, length, dtype=torch.long, device=device)
    for i in range(length):
        logits = model(x[:, : i + 1])[:, i]  # (B, N): depends on x[:, :i] only
        x[:, i] = sample_categorical(logits.float().softmax(dim=-1), generator)
    return x
