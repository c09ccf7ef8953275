"""Sample quality: numbers about a model's samples, with no likelihood of the model itself.

    x = sample_tokens(loaded, num_samples=64, length=128, steps=128, seed=0)   # (n, L) long
    unigram_entropy(x), distinct_n(x, 2), repetition_rate(x)                   # (n,) each
    truth_nll(src, x)               # (n,) exact nats/token under a synthetic source
    lm = load_eval_lm("path/to/hf-causal-lm")                                   # or a Hub id
    nll, count = lm.nll(texts)      # (n,) summed nats and (n,) scored tokens per text
    gen_ppl(nll, count)             # exp(total nats / total tokens)

Definitions (per sample; a study reports the mean over samples and its standard error):

- **unigram entropy** (``sample_entropy``): the entropy, in nats, of the empirical token
  distribution of one sample (MDLM / ReMDM's sample entropy). Degenerate, repetitive
  samples have a low one; gen-PPL alone rewards them, so the two are reported together.
- **distinct-n**: unique n-grams / n-grams of one sample (1 when nothing repeats).
- **repetition rate** (``rep_4``): ``1 - distinct-4``, the share of a sample's 4-grams
  that already occurred in it (``seq-rep-4`` of Welleck et al., 2019).
- **truth NLL** (``truth_nll``): ``-log p_true(x) / L`` under a synthetic source
  (:mod:`sedd_ray.synthetic`), exact. Its mean over samples drawn from the source itself
  is the source's entropy per token (``true_nll``); ``truth_gap = truth_nll - true_nll``
  is, in expectation, ``KL(p_model || p_true) / L >= 0``: an exact quality number with no
  evaluation LM in between.
- **gen-PPL** (``gen_ppl``): ``exp(sum of NLL / sum of tokens)`` of the samples under an
  evaluation LM, token-weighted over all samples (as MDLM computes it). Re-encoding: each
  sample's ids are decoded to text by the model's own tokenizer (EOS as its literal
  ``<|endoftext|>``, which GPT-2's tokenizer maps back to its EOS token) and encoded by the
  evaluation LM's tokenizer with no special tokens; the LM's BOS token (else its EOS) is
  put in front as context so every sample token is scored; with neither, the first token
  is context only. Texts longer than the LM's context are cut to it. The evaluation LM
  may also be the platform's own autoregressive reference (a checkpoint trained with
  ``--kind ar``, :class:`ReferenceLM`): it encodes with its own tokenizer and scores every
  token, the first from its learned start state (no BOS needed).

Everything here is plain torch/numpy; the evaluation LM needs ``transformers``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sedd_ray.config import ConfigError

__all__ = [
    "EvalLM",
    "EvalLMError",
    "ReferenceLM",
    "distinct_n",
    "gen_ppl",
    "load_eval_lm",
    "repetition_rate",
    "sample_tokens",
    "truth_nll",
    "unigram_entropy",
]


class EvalLMError(ConfigError):
    """The evaluation LM cannot be loaded as a causal LM; the message says why."""


# --- statistics of token ids -----------------------------------------------------------------

def unigram_entropy(samples: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each sample's empirical token distribution: (n, L) -> (n,) float64."""
    out = []
    for row in samples.cpu():
        counts = torch.unique(row, return_counts=True)[1].to(torch.float64)
        p = counts / counts.sum()
        out.append(float(-(p * p.log()).sum()))
    return torch.tensor(out, dtype=torch.float64)


def distinct_n(samples: torch.Tensor, n: int) -> torch.Tensor:
    """Unique n-grams / n-grams of each sample: (n_samples, L) -> (n_samples,) float64.
    A sample shorter than ``n`` tokens has no n-gram and gets NaN."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = []
    for row in samples.cpu().tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        out.append(len(set(grams)) / len(grams) if grams else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def repetition_rate(samples: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Share of each sample's n-grams that repeat an earlier one (``1 - distinct_n``). (n,)"""
    return 1.0 - distinct_n(samples, n)


def truth_nll(source: Any, samples: torch.Tensor) -> torch.Tensor:
    """Exact ``-log p(x) / L`` of each sample under a synthetic source. (n, L) -> (n,) float64.

    ``source`` is a :class:`sedd_ray.synthetic.Synthetic`; ids must be in ``[0, vocab)``
    (a sample that still holds the absorbing mask is refused: it is not a sequence of
    the source's symbols)."""
    x = samples.cpu().numpy().astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= source.vocab):
        raise ValueError(f"samples hold ids outside [0, {source.vocab}) (a mask left by the "
                         "sampler?); sample with denoise=True")
    return torch.from_numpy(-source.log_prob(x) / x.shape[1]).to(torch.float64)


def gen_ppl(nll: torch.Tensor, count: torch.Tensor) -> float:
    """``exp(sum(nll) / sum(count))``: token-weighted perplexity over all texts."""
    total = float(torch.as_tensor(count).sum())
    if total <= 0:
        raise ValueError("no token was scored: the texts are empty")
    return math.exp(float(torch.as_tensor(nll, dtype=torch.float64).sum()) / total)


# --- samples of a checkpoint -------------------------------------------------------------------

@torch.no_grad()
def sample_tokens(loaded: Any, *, num_samples: int, length: int, steps: int,
                  predictor: str = "analytic", seed: int = 0, batch_size: int = 64,
                  cache: str | bool = "batch") -> torch.Tensor:
    """``num_samples`` unconditional samples of a loaded checkpoint
    (:class:`sedd_ray.sample.LoadedModel`): LongTensor (n, length) on the CPU.

    One generator seeded by ``seed`` on the model's device draws every batch in turn, so
    the samples are a fixed function of (checkpoint, settings, seed, device). ``cache``:
    the RADD denoiser cache mode of a time-independent model (:func:`model_score_fn`)."""
    from sedd_ray.objective import build_objective
    from sedd_ray.trainer import bf16_autocast

    if steps < 1 or num_samples < 1 or length < 1:
        raise ValueError(f"steps, num_samples and length must be >= 1, got {steps}, "
                         f"{num_samples} and {length}")
    device = next(loaded.model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    autocast = bf16_autocast(loaded.cfg.train.precision, device)
    # the model kind's own sampler (the AR reference: ancestral; steps, predictor, cache unused)
    objective = build_objective(loaded.cfg, loaded.graph, loaded.noise)
    return torch.cat([objective.sample(loaded.model, batch=min(batch_size, num_samples - start),
                                       length=length, steps=steps, generator=g, device=device,
                                       autocast=autocast, predictor=predictor, cache=cache).cpu()
                      for start in range(0, num_samples, batch_size)])


# --- the evaluation LM -------------------------------------------------------------------------

@dataclass
class EvalLM:
    """A Hugging Face causal LM and its tokenizer; ``name`` is what rows record."""

    model: Any
    tokenizer: Any
    name: str
    max_length: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Text -> the ids the LM scores, with its BOS (else EOS) in front when it has one;
        cut to the LM's context."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        start = self.tokenizer.bos_token_id
        start = self.tokenizer.eos_token_id if start is None else start
        return ([start] if start is not None else []) + list(ids)[: self.max_length - 1]

    @torch.no_grad()
    def nll(self, texts: Sequence[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (nats) of every text's tokens after the first, and how many tokens
        were scored: two (n,) tensors (float64, int64)."""
        encoded = [self.encode(t) for t in texts]
        nll, count = torch.zeros(len(texts), dtype=torch.float64), torch.zeros(len(texts),
                                                                                dtype=torch.long)
        for start in range(0, len(encoded), batch_size):
            part = encoded[start:start + batch_size]
            width = max(max(len(ids) for ids in part), 1)
            ids = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.long)
            for i, row in enumerate(part):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, :len(row)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            keep = mask[:, 1:].to(logp.dtype)
            nll[start:start + len(part)] = (-(logp * keep).sum(-1)).double().cpu()
            count[start:start + len(part)] = keep.sum(-1).long().cpu()
        return nll, count


@dataclass
class ReferenceLM:
    """The platform's autoregressive reference (:mod:`sedd_ray.ar`) as an evaluation LM:
    ``loaded`` is a :class:`sedd_ray.sample.LoadedModel` of a ``model.kind=ar``
    checkpoint. Same ``nll(texts)`` contract as :class:`EvalLM`; every token is scored."""

    loaded: Any
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Text -> the reference's own token ids, cut to its training block length."""
        return self.loaded.tokenizer.encode(text).ids[: self.loaded.cfg.data.seq_len]

    @torch.no_grad()
    def nll(self, texts: Sequence[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (nats) of every text's tokens and how many were scored: (n,), (n,).
        Texts are right-padded in a batch: causal attention never looks at the padding."""
        from sedd_ray.ar import token_nll

        encoded = [self.encode(t) for t in texts]
        nll = torch.zeros(len(texts), dtype=torch.float64)
        count = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        for start in range(0, len(encoded), batch_size):
            part = encoded[start:start + batch_size]
            width = max(max(len(ids) for ids in part), 1)
            ids = torch.zeros(len(part), width, dtype=torch.long)
            for i, row in enumerate(part):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            keep = (torch.arange(width)[None, :] < count[start:start + len(part), None]).double()
            per_token = token_nll(self.loaded.model, ids.to(self.device)).double().cpu()
            nll[start:start + len(part)] = (per_token * keep).sum(-1)
        return nll, count


def _reference_lm(spec: str, path: Path, device: str | torch.device) -> ReferenceLM | None:
    """``spec`` as a sedd-ray checkpoint (or run folder) of the AR reference; None when it
    is not a checkpoint; EvalLMError when it is a diffusion one (not a causal LM)."""
    from sedd_ray.checkpoint import CheckpointError
    from sedd_ray.sample import checkpoint_dir, load_model

    if not path.is_dir() or (path / "config.json").is_file():
        return None
    try:
        loaded = load_model(checkpoint_dir(str(path)), device)
    except CheckpointError:
        return None
    if loaded.cfg.model.kind != "ar":
        raise EvalLMError(f"--eval-lm {spec}: a {loaded.cfg.model.kind} checkpoint is not a "
                          "causal LM; pass an autoregressive reference (trained with --kind ar) "
                          "or a Hugging Face causal LM")
    loaded.model.eval()
    return ReferenceLM(loaded, str(path.resolve()))


def load_eval_lm(spec: str, device: str | torch.device = "cpu") -> EvalLM | ReferenceLM:
    """A local Hugging Face causal-LM directory (``save_pretrained``), a Hub id, or a
    sedd-ray checkpoint of the autoregressive reference (``--kind ar``).

    Raises :class:`EvalLMError` (one line) when a path does not exist, the folder or id
    is not a causal LM, or the Hub is needed and unreachable."""
    looks_like_path = os.sep in spec or spec.startswith((".", "~"))
    path = Path(spec).expanduser()
    reference = _reference_lm(spec, path, device)
    if reference is not None:
        return reference
    if looks_like_path and not path.exists():
        raise EvalLMError(f"--eval-lm {spec}: no such directory; pass a folder written by "
                          "save_pretrained (config.json, weights, tokenizer) or a Hub id")
    if path.exists() and not (path / "config.json").is_file():
        raise EvalLMError(f"--eval-lm {spec}: not a Hugging Face model folder (no "
                          "config.json); pass a causal LM saved with save_pretrained")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = str(path) if path.exists() else spec
    try:
        model = AutoModelForCausalLM.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EvalLMError(f"--eval-lm {spec} is not a loadable causal LM with a tokenizer "
                          f"({first}); pass a local causal-LM folder or a reachable Hub id") from None
    cfg = model.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    model.to(device).eval()
    return EvalLM(model, tokenizer, spec if not path.exists() else str(path.resolve()),
                  int(limit or 1024))
