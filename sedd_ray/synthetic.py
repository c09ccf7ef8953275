"""Synthetic token sources whose entropy is known exactly: the floor no model can beat.

    src, size = parse_spec("markov:vocab=16,order=1,sharpness=2.0,seed=0")
    src.true_nll(32)                      # exact nats/token of one block of 32 tokens
    x = src.sample(1000, 32, rng)         # (1000, 32) int64 in [0, 16); rows independent
    src.log_prob(x)                       # (1000,) exact log p(x), nats

Selected with ``--corpus NAME:key=value,...`` (:data:`SOURCES`; :mod:`sedd_ray.data`
turns a source into the usual train/val/test blocks and stores ``true_nll`` in the
bundle's meta). Every block is an independent sample, so the NLL per token of a block,
``H(X_1..X_L) / L``, is the bound's floor: ``val_nll - true_nll >= 0`` up to noise.

**markov** (``vocab=16, order=1, sharpness=1.0, seed=0``): a stationary Markov chain of
order ``k`` over ``V`` tokens. Each of the ``V^k`` contexts gets the next-token row
``softmax(sharpness * z)``, ``z ~ N(0, I_V)`` seeded by ``seed``: 0 is uniform (rate
``log V``), larger is more predictable. The chain on k-grams is ergodic (every entry is
positive), with stationary distribution ``pi_k`` (an exact linear solve). A block starts
from ``pi_k``, so every window of ``k`` tokens is ``pi_k``-distributed and

    H(X_1..X_L) = H(pi_j) + max(L - k, 0) * h,     j = min(L, k),
    h = sum_c pi_k(c) H(P(. | c))                  (the entropy rate),

with ``pi_j`` the marginal of the first ``j`` tokens (``k = 0``: i.i.d., ``H = L h``).

**copy** (``vocab=16, mode=copy, noise=0.0, order=0, sharpness=0.0, seed=0``): long-range
dependence. The first ``m = L - L // 2`` tokens are a markov block (defaults: i.i.d.
uniform); each of the last ``c = L // 2`` repeats token ``i`` (``mode=copy``) or
``m - 1 - i`` (``mode=reverse``) of the prefix, replaced with probability ``noise`` by a
uniform token. Given the prefix the copies are independent channels, so

    H(X_1..X_L) = H_markov(m) + c * H_ch,
    H_ch = -q log q - (V - 1) r log r,   q = 1 - noise + noise / V,  r = noise / V.

Every sampler is a fixed function of ``rng.random((n, D))`` (one row of ``D`` uniforms per
block, drawn in row order), so the first ``n`` blocks of a larger draw with the same seed
are exactly the blocks of a draw of ``n``.

Sizes (not part of the source): ``blocks=N`` (total over train/val/test, default
:data:`DEFAULT_BLOCKS`) or ``tokens=N`` (``N // seq_len`` blocks); see :func:`split_sizes`.

The tokenizer (:func:`tokenizer_json`) has exactly ``V`` symbols: ``a..z A..Z 0..9`` for
``V <= 62`` (decoded as one string, ``"abca"``), else ``t0 .. t{V-1}`` separated by spaces.
There is no EOS: blocks never cross, so there is nothing to separate.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from sedd_ray.registry import Registry
from sedd_ray.values import coerce

__all__ = [
    "DEFAULT_BLOCKS",
    "SOURCES",
    "Copy",
    "Markov",
    "Synthetic",
    "SyntheticError",
    "channel_entropy",
    "entropy",
    "parse_spec",
    "sample_splits",
    "split_sizes",
    "stationary",
    "tokenizer_json",
]

DEFAULT_BLOCKS = 4096  # total blocks over the three splits when the spec gives no size
SIZE_KEYS = ("blocks", "tokens")
MAX_VOCAB = 4096
MAX_CONTEXTS = 2048  # V^k: the stationary distribution is a dense linear solve
MAX_SHARPNESS = 20.0  # keeps every transition probability far from float64 underflow
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_CHUNK = 4096  # rows sampled at once (memory: rows x uniforms per block)


class SyntheticError(ValueError):
    """A synthetic source spec is invalid; the message says how to fix it."""


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis``, with ``0 log 0 = 0`` (float64)."""
    p = np.asarray(p, dtype=np.float64)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis)


def channel_entropy(noise: float, vocab: int) -> float:
    """``H(Y | X)`` for ``Y = X`` w.p. ``1 - noise``, else uniform over ``vocab`` tokens."""
    q, r = 1.0 - noise + noise / vocab, noise / vocab
    return float(entropy(np.array([q] + [r] * (vocab - 1))))


def stationary(P: np.ndarray, vocab: int) -> np.ndarray:
    """Stationary distribution ``(n,)`` of the k-gram chain of an order-k transition table.

    ``P`` is ``(n, V)`` with ``n = V^k`` contexts (first token most significant); context
    ``c`` followed by token ``b`` moves to ``(c V + b) mod n``. Solved exactly (dense
    ``pi T = pi``, ``sum pi = 1``); the chain must be irreducible (``P > 0`` suffices).
    """
    n = P.shape[0]
    if n == 1:
        return np.ones(1)
    T = np.zeros((n, n))
    rows = np.arange(n)[:, None]
    T[rows, (rows * vocab + np.arange(vocab)[None]) % n] = P
    A = T.T - np.eye(n)
    A[-1] = 1.0  # replace one (redundant) balance equation by the normalisation
    rhs = np.zeros(n)
    rhs[-1] = 1.0
    pi = np.linalg.solve(A, rhs)
    residual = np.abs(pi @ T - pi).max()
    if pi.min() < -1e-12 or residual > 1e-10:
        raise SyntheticError(f"the chain's stationary distribution is ill-conditioned "
                             f"(residual {residual:.1e}); lower sharpness")
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: row-wise ``cdf`` (n, K) or one shared (K,), ``u`` (n,) -> (n,)."""
    if cdf.ndim == 1:
        return np.searchsorted(cdf[:-1], u, side="right")
    return (u[:, None] >= cdf[:, :-1]).sum(axis=1)


# --- sources ---------------------------------------------------------------------------

class Synthetic(abc.ABC):
    """A distribution over blocks of ``L`` tokens in ``[0, vocab)`` with exact entropy.

    Subclasses are frozen dataclasses whose fields are the spec's keys; they fill in
    :meth:`block_entropy`, :meth:`n_uniforms`, :meth:`transform` and :meth:`log_prob`.
    """

    name: ClassVar[str]
    example: ClassVar[str]
    vocab: int

    @abc.abstractmethod
    def block_entropy(self, length: int) -> float:
        """Exact ``H(X_1..X_L)`` in nats (float64 arithmetic)."""

    @abc.abstractmethod
    def n_uniforms(self, length: int) -> int:
        """How many ``U(0, 1)`` numbers one block of ``length`` consumes."""

    @abc.abstractmethod
    def transform(self, u: np.ndarray, length: int) -> np.ndarray:
        """Uniforms ``(n, n_uniforms(length))`` -> blocks ``(n, length)`` int64."""

    @abc.abstractmethod
    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact ``log p(x)`` in nats of blocks ``x`` (n, L) -> (n,) float64."""

    def true_nll(self, length: int) -> float:
        """Exact NLL per token of one block, ``H(X_1..X_L) / L`` (nats/token)."""
        return self.block_entropy(length) / length

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent blocks (n, length) int64; rows are prefix-stable in ``n``."""
        d = self.n_uniforms(length)
        out = [self.transform(rng.random((min(_CHUNK, n - s), d)), length)
               for s in range(0, n, _CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, length), np.int64)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def arrays(self) -> dict[str, np.ndarray]:
        """The source's tables, for saving next to the data (analysis, re-checks)."""
        return {}

    def check(self) -> None:
        """Raise :class:`SyntheticError` when a field is out of range (cheap: no tables)."""
        _need(2 <= self.vocab <= MAX_VOCAB, f"{self.name}: vocab must be in [2, {MAX_VOCAB}], "
              f"got {self.vocab}")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SyntheticError(msg)


SOURCES: Registry[type[Synthetic]] = Registry("synthetic source")


@SOURCES.register("markov")
@dataclass(frozen=True)
class Markov(Synthetic):
    """Stationary order-``k`` Markov chain; see the module docstring for the formulas."""

    name: ClassVar[str] = "markov"
    example: ClassVar[str] = "markov:vocab=16,order=1,sharpness=2.0,seed=0"
    vocab: int = 16
    order: int = 1
    sharpness: float = 1.0
    seed: int = 0

    def check(self) -> None:
        super().check()
        _need(self.order >= 0, f"markov: order must be >= 0, got {self.order}")
        _need(self.vocab ** self.order <= MAX_CONTEXTS,
              f"markov: vocab^order = {self.vocab}^{self.order} contexts exceeds "
              f"{MAX_CONTEXTS}; lower order or vocab")
        _need(0.0 <= self.sharpness <= MAX_SHARPNESS,
              f"markov: sharpness must be in [0, {MAX_SHARPNESS:g}], got {self.sharpness}")
        _need(self.seed >= 0, f"markov: seed must be >= 0, got {self.seed}")

    @property
    def n_contexts(self) -> int:
        return self.vocab ** self.order

    @cached_property
    def transition(self) -> np.ndarray:
        """``P`` (V^k, V): row ``c`` is ``p(next | context c)``, context digits base V."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EDD]))
        logits = self.sharpness * rng.standard_normal((self.n_contexts, self.vocab))
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    @cached_property
    def pi(self) -> np.ndarray:
        """Stationary distribution of k-grams (V^k,); ``[1.0]`` for order 0."""
        return stationary(self.transition, self.vocab)

    @cached_property
    def entropy_rate(self) -> float:
        """``h = sum_c pi(c) H(P(. | c))``, nats per token."""
        return float(self.pi @ entropy(self.transition))

    def marginal(self, j: int) -> np.ndarray:
        """Distribution of the first ``j <= k`` tokens of a block (V^j,)."""
        return self.pi.reshape(self.vocab ** j, -1).sum(axis=1)

    def block_entropy(self, length: int) -> float:
        j = min(length, self.order)
        return float(entropy(self.marginal(j))) + max(length - self.order, 0) * self.entropy_rate

    def n_uniforms(self, length: int) -> int:
        return (1 if self.order else 0) + max(length - self.order, 0)

    def transform(self, u: np.ndarray, length: int) -> np.ndarray:
        n, k, v, nc = u.shape[0], self.order, self.vocab, self.n_contexts
        x = np.empty((n, length), dtype=np.int64)
        ctx = np.zeros(n, dtype=np.int64)
        col = 0
        if k:  # the first k tokens: one draw of a k-gram from pi
            ctx = _draw(np.cumsum(self.pi), u[:, 0])
            col = 1
            for i in range(min(k, length)):
                x[:, i] = (ctx // v ** (k - 1 - i)) % v
        cdf = np.cumsum(self.transition, axis=1)
        for t in range(k, length):
            b = _draw(cdf[ctx], u[:, col])
            x[:, t] = b
            ctx = (ctx * v + b) % nc
            col += 1
        return x

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        n, length = x.shape
        k, v, nc = self.order, self.vocab, self.n_contexts
        j = min(k, length)
        ctx = np.zeros(n, dtype=np.int64)
        for i in range(j):
            ctx = ctx * v + x[:, i]
        with np.errstate(divide="ignore"):
            lp = np.log(self.marginal(j)[ctx])
            logp = np.log(self.transition)
        for t in range(k, length):
            lp = lp + logp[ctx, x[:, t]]
            ctx = (ctx * v + x[:, t]) % nc
        return lp

    def arrays(self) -> dict[str, np.ndarray]:
        return {"transition": self.transition, "stationary": self.pi}


@SOURCES.register("copy")
@dataclass(frozen=True)
class Copy(Synthetic):
    """A markov prefix, then a (noisy) copy or reversal of it; see the module docstring."""

    name: ClassVar[str] = "copy"
    example: ClassVar[str] = "copy:vocab=16,mode=reverse,noise=0.1"
    vocab: int = 16
    mode: str = "copy"
    noise: float = 0.0
    order: int = 0
    sharpness: float = 0.0
    seed: int = 0

    def check(self) -> None:
        _need(self.mode in ("copy", "reverse"),
              f"copy: mode must be copy or reverse, got {self.mode!r}")
        _need(0.0 <= self.noise <= 1.0, f"copy: noise must be in [0, 1], got {self.noise}")
        self.prefix.check()

    @cached_property
    def prefix(self) -> Markov:
        return Markov(vocab=self.vocab, order=self.order, sharpness=self.sharpness,
                      seed=self.seed)

    @staticmethod
    def halves(length: int) -> tuple[int, int]:
        """``(m, c)``: prefix length ``L - L // 2`` and number of copies ``L // 2``."""
        return length - length // 2, length // 2

    def sources(self, length: int) -> np.ndarray:
        """For each copied position ``m + i``, the prefix position it repeats (c,)."""
        m, c = self.halves(length)
        i = np.arange(c)
        return i if self.mode == "copy" else m - 1 - i

    def block_entropy(self, length: int) -> float:
        m, c = self.halves(length)
        return self.prefix.block_entropy(m) + c * channel_entropy(self.noise, self.vocab)

    def n_uniforms(self, length: int) -> int:
        m, c = self.halves(length)
        return self.prefix.n_uniforms(m) + 2 * c

    def transform(self, u: np.ndarray, length: int) -> np.ndarray:
        m, c = self.halves(length)
        d = self.prefix.n_uniforms(m)
        head = self.prefix.transform(u[:, :d], m)
        copied = head[:, self.sources(length)]
        fresh = np.minimum((u[:, d + c:] * self.vocab).astype(np.int64), self.vocab - 1)
        tail = np.where(u[:, d:d + c] < self.noise, fresh, copied)
        return np.concatenate([head, tail], axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        m, c = self.halves(x.shape[1])
        q, r = 1.0 - self.noise + self.noise / self.vocab, self.noise / self.vocab
        same = x[:, m:] == x[:, self.sources(x.shape[1])]
        with np.errstate(divide="ignore"):
            ch = np.where(same, np.log(q), np.log(r) if r > 0 else -np.inf)
        return self.prefix.log_prob(x[:, :m]) + ch.sum(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        return self.prefix.arrays()


# --- specs, sizes, splits, tokenizer ------------------------------------------------------

def parse_spec(spec: str) -> tuple[Synthetic, dict[str, int]]:
    """``"NAME:key=value,..."`` -> (source, size); size holds ``blocks`` or ``tokens`` if given.

    Unknown names and keys raise :class:`SyntheticError` listing the valid ones. Cheap:
    no tables are built.
    """
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise SyntheticError(f"unknown synthetic source {name!r}; valid: {', '.join(SOURCES)}")
    cls = SOURCES.get(name)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    size: dict[str, int] = {}
    for item in (s.strip() for s in arg.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise SyntheticError(f"{name}: {item!r} is not key=value; e.g. --corpus {cls.example}")
        if key in kwargs or key in size:
            raise SyntheticError(f"{name}: {key} given twice in {spec!r}")
        if key in SIZE_KEYS:
            size[key] = coerce(value, int, f"{name}: {key}", SyntheticError)
            _need(size[key] > 0, f"{name}: {key} must be > 0, got {size[key]}")
        elif key in defaults:
            kwargs[key] = coerce(value, type(defaults[key]), f"{name}: {key}", SyntheticError)
        else:
            valid = ", ".join([*defaults, *SIZE_KEYS])
            raise SyntheticError(f"{name}: unknown key {key!r}; valid keys: {valid}")
    _need(len(size) <= 1, f"{name}: give blocks= or tokens=, not both")
    src = cls(**kwargs)
    src.check()
    return src, size


def split_sizes(size: dict[str, int], seq_len: int, val_fraction: float, test_fraction: float,
                max_train_tokens: int = 0) -> dict[str, int]:
    """Blocks per split: a total of ``blocks`` (or ``tokens // seq_len``, default
    :data:`DEFAULT_BLOCKS`) shared by the fractions, each split at least one block; train
    then capped at ``max_train_tokens // seq_len`` when that is > 0."""
    total = size["tokens"] // seq_len if "tokens" in size else size.get("blocks", DEFAULT_BLOCKS)
    n_val = max(1, round(total * val_fraction))
    n_test = max(1, round(total * test_fraction))
    n_train = total - n_val - n_test
    if n_train < 1:
        raise SyntheticError(f"{total} blocks of seq_len {seq_len} leave no training block after "
                             f"{n_val} val and {n_test} test; raise blocks= or tokens=")
    if max_train_tokens:
        n_train = min(n_train, max_train_tokens // seq_len)
    return {"train": n_train, "val": n_val, "test": n_test}


def sample_splits(src: Synthetic, seq_len: int, sizes: dict[str, int],
                  seed: int) -> dict[str, np.ndarray]:
    """Independent draws per split, ``{split: (n, seq_len) int64}``; split ``i`` (train,
    val, test) uses the seed sequence ``[seed, i]``."""
    out = {}
    for i, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        out[split] = src.sample(sizes[split], seq_len, rng)
    return out


def symbols(vocab: int) -> list[str]:
    """The ``vocab`` token strings: ``a..z A..Z 0..9`` if they suffice, else ``t0..``."""
    return list(CHARS[:vocab]) if vocab <= len(CHARS) else [f"t{i}" for i in range(vocab)]


def tokenizer_json(vocab: int) -> str:
    """A ``tokenizers`` JSON with exactly ``vocab`` tokens (id i = ``symbols(vocab)[i]``)
    and no special tokens. Single characters encode without separators (whitespace is
    skipped) and decode to one string; ``t0 t1`` style tokens are space separated."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    syms = symbols(vocab)
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(syms)}))
    if vocab <= len(CHARS):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")])
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def describe(src: Synthetic, seq_len: int) -> dict[str, Any]:
    """What a bundle's meta records about a source at ``seq_len`` (json-able)."""
    info: dict[str, Any] = {"source": src.name, **src.params(),
                            "log_vocab": math.log(src.vocab),
                            "block_entropy": src.block_entropy(seq_len)}
    if isinstance(src, Markov):
        info["entropy_rate"] = src.entropy_rate
    elif isinstance(src, Copy):
        info["prefix_entropy_rate"] = src.prefix.entropy_rate
        info["channel_entropy"] = channel_entropy(src.noise, src.vocab)
    return info
