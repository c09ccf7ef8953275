"""CLI: zero-shot likelihood bounds on many corpora, and sample quality, for any checkpoint.

    python -m sedd_ray.evaluate --trial best --corpus wikitext2,ptb,text:held_out.txt
    python -m sedd_ray.evaluate --study graph-ablation --trial 3f2a_00001 --corpus lambada
    python -m sedd_ray.evaluate --checkpoint runs/x --corpus markov:vocab=16,order=1 \\
        --samples 64 --steps 128 --eval-lm path/to/hf-gpt2
    python -m sedd_ray.evaluate --all-trials --study S --address auto --corpus wikitext2

**The bound** is the trainer's precise estimator (:mod:`sedd_ray.diffusion.bound`):
``split_bound`` over ``--blocks`` evenly spread blocks, ``--draws`` stratified
importance-sampled noise levels each, seeded by ``(--seed, block)``, with the per-block
standard error (``mean_stderr``). Rows: ``nll_bound`` (nats/token), ``ppl_bound``
(``exp`` of it; stderr by the delta method) and, on a synthetic source, ``bound_gap``
(``nll_bound`` minus the exact entropy per token, which is also each row's ``reference``).
An autoregressive reference (``model.kind=ar``) gets its exact ``nll``, ``ppl`` and
``nll_gap`` on the same blocks instead (no draws), and its samples are ancestral.
The model runs in bf16 autocast on GPU (``--precision``), float32 on CPU.

**Zero-shot** means: the model's own tokenizer (saved in its checkpoint), the model's
training block length, and these fixed detokenisation choices (stated in the output):

==============  ==========================================  ==============================
corpus          text evaluated                              detokeniser
==============  ==========================================  ==============================
wikitext2/103   Hub ``Salesforce/wikitext`` raw, test split,  ``wikitext`` (SEDD/GPT-2's
                one document per article                      ``wt_detokenizer``)
ptb             Hub ``ptb-text-only/ptb_text_only``, test,    ``ptb`` (SEDD's
                one document per sentence                     ``ptb_detokenizer``)
lambada         Hub ``EleutherAI/lambada_openai``, test,      ``lambada`` (curly quotes ->
                one document per passage                      ``"``, stripped)
lm1b            Hub ``billion-word-benchmark/lm1b`` (its      ``lm1b`` (spacing before
                Parquet conversion), test, one document       punctuation, in quotes and
                per sentence                                  brackets undone)
text:PATH       every ``.txt`` file, whole (pass held-out     none
                text: nothing is split off)
shakespeare     the whole corpus (includes training text)     none
markov:/copy:   fresh blocks drawn from the source with       none (ids are the symbols)
                ``--seed``, ``--blocks`` of them
==============  ==========================================  ==============================

Each document's ids are followed by EOS, the stream cut into blocks of the model's
``seq_len`` (remainder dropped), as the trainer packs its corpus.

**Sample quality** (``--samples N``): ``N`` samples (``--steps``, ``--predictor``,
``--length``, ``--sample-seed``) and, per :mod:`sedd_ray.quality`, ``sample_entropy``,
``distinct_1..3``, ``rep_4``; ``gen_ppl`` and ``gen_nll`` with ``--eval-lm``; on a
synthetic source (the model's own, or one given in ``--corpus``) ``truth_nll`` and
``truth_gap``. Quality rows have corpus ``samples`` (truth rows: the source's spec).

**Results**: one row per (checkpoint, corpus, metric) in ``<storage>/<study>/evals.parquet``
(``--checkpoint``: next to the checkpoint folder; ``--evals PATH`` overrides), with the
settings, their hash, the seed, the sample count and the evaluation LM. A (checkpoint,
corpus, settings) already there is not recomputed. ``--all-trials`` evaluates every
finished trial of a study, as Ray tasks when ``--address`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sedd_ray.cli import parse_list
from sedd_ray.config import ConfigError
from sedd_ray.layout import EVALS_FILE
from sedd_ray.registry import Registry

__all__ = [
    "BENCHMARKS",
    "DETOKENIZERS",
    "EvalCorpus",
    "EvalSettings",
    "ModelRef",
    "evaluate_model",
    "load_for_eval",
    "main",
    "parse_corpora",
    "resolve_corpus",
]


class EvalInputError(ConfigError):
    """A bad evaluation request (corpus, tokenizer, flags); the message says the fix."""


# --- detokenisers (zero-shot text as the papers feed it) -------------------------------------

DETOKENIZERS: Registry[Callable[[str], str]] = Registry("detokenizer")
DETOKENIZERS.register("none")(lambda s: s)


@DETOKENIZERS.register("wikitext")
def wikitext_detokenizer(s: str) -> str:
    """WikiText's tokenised spacing undone (GPT-2's / SEDD's ``wt_detokenizer``)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                 (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"),
                 (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


@DETOKENIZERS.register("ptb")
def ptb_detokenizer(s: str) -> str:
    """Penn Treebank's spacing undone (SEDD's ``ptb_detokenizer``); ``<unk>`` -> ``?``."""
    for a, b in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        s = s.replace(a, b)
    for _ in range(10):
        s = s.replace(" N ", " 1 ")
    return s.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


@DETOKENIZERS.register("lambada")
def lambada_detokenizer(s: str) -> str:
    """LAMBADA (OpenAI's version): curly quotes -> ``"``, surrounding space stripped."""
    return s.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace(
        "\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()


@DETOKENIZERS.register("lm1b")
def lm1b_detokenizer(s: str) -> str:
    """One Billion Word's tokenised spacing undone: no space before punctuation or an
    apostrophe suffix, none inside quotes and brackets, URLs and currency signs rejoined."""
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" '(\w+)", r"'\1", s)  # "don 't" -> "don't"
    s = re.sub(r" ([.?!,:;])(?= |$)", r"\1", s)
    s = s.replace(" / ", "/").replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")
    for open_, close in (('"', '"'), ("'", "'"), ("(", ")"), ("[", "]")):
        o, c = re.escape(open_), re.escape(close)
        s = re.sub(rf"{o} ([^{o}{c}]+) {c}", rf"{open_}\1{close}", s)
    return s


# --- corpora -------------------------------------------------------------------------------

@dataclass
class EvalCorpus:
    """One evaluation corpus: its documents (read lazily) or a synthetic source.

    ``documents(progress) -> [str]`` (detokenised); ``identity`` goes into the settings
    hash; ``describe`` is the zero-shot statement printed and stored with the rows."""

    spec: str
    identity: dict[str, Any]
    describe: str
    documents: Callable[[bool], list[str]] | None = None
    synthetic: Any = None  # a sedd_ray.synthetic.Synthetic
    hub: str | None = None


BENCHMARKS: Registry[Callable[[], EvalCorpus]] = Registry("benchmark corpus", "benchmark corpora")
_HUB_FIX = ("the Hugging Face Hub is not reachable (offline); evaluate on local text with "
            "--corpus text:PATH, or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE with a network")


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_corpus(spec: str, repo: str, config: str | None, column: str, detok: str,
                group: Callable[[list[str]], list[str]], unit: str,
                revision: str | None = None) -> EvalCorpus:
    def read(progress: bool) -> list[str]:
        import datasets

        from sedd_ray.data import DataError

        try:
            rows = datasets.load_dataset(repo, config, split="test", revision=revision)[column]
        except (ConnectionError, OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise DataError(f"corpus {spec} could not be loaded from the Hugging Face Hub "
                            f"({first}); {_HUB_FIX}") from None
        return [DETOKENIZERS.get(detok)(d) for d in group(list(rows)) if d.strip()]

    where = f"{repo}" + (f" ({config})" if config else "")
    identity = {"corpus": spec, "hub": repo, "config": config, "split": "test",
                "detokenizer": detok, **({"revision": revision} if revision else {})}
    return EvalCorpus(spec, identity,
                      f"{spec}: Hub {where}, test split, one document per {unit}, "
                      f"detokeniser {detok}", documents=read, hub=repo)


def _wikitext(n: str) -> Callable[[], EvalCorpus]:
    from sedd_ray.data import wikitext_articles

    return lambda: _hub_corpus(f"wikitext{n}", "Salesforce/wikitext", f"wikitext-{n}-raw-v1",
                               "text", "wikitext", wikitext_articles, "article")


BENCHMARKS.register("wikitext2")(_wikitext("2"))
BENCHMARKS.register("wikitext103")(_wikitext("103"))
BENCHMARKS.register("ptb")(lambda: _hub_corpus("ptb", "ptb-text-only/ptb_text_only", None,
                                               "sentence", "ptb",
                                               list, "sentence"))
BENCHMARKS.register("lambada")(lambda: _hub_corpus(
    "lambada", "EleutherAI/lambada_openai", "default", "text", "lambada", list, "passage"))
# One Billion Word: the Hub repo holds a loading script (which `datasets` no longer runs);
# its Parquet conversion is read instead.
BENCHMARKS.register("lm1b")(lambda: _hub_corpus(
    "lm1b", "billion-word-benchmark/lm1b", "plain_text", "text", "lm1b", list, "sentence",
    revision="refs/convert/parquet"))


def resolve_corpus(spec: str) -> EvalCorpus:
    """A benchmark name, or any corpus of :func:`sedd_ray.data.resolve_corpus` (cheap)."""
    from sedd_ray.data import DataError
    from sedd_ray.data import resolve_corpus as data_corpus

    name = spec.partition(":")[0]
    if name in BENCHMARKS and ":" not in spec:
        corpus = BENCHMARKS.get(name)()
        if _hub_offline():
            raise EvalInputError(f"corpus {spec} needs {corpus.hub} from the Hub, but {_HUB_FIX}")
        return corpus
    try:
        source = data_corpus(spec)
    except DataError as err:
        valid = ", ".join(BENCHMARKS.names())
        raise EvalInputError(f"{err}" + (f"; benchmark corpora: {valid}"
                                         if str(err).startswith("unknown corpus") else "")) from None
    if source.synthetic is not None:
        return EvalCorpus(spec, source.identity, f"{spec}: fresh blocks drawn from the source",
                          synthetic=source.synthetic[0])

    def read(progress: bool) -> list[str]:
        docs = source.read(progress)
        docs = [d for split in ("train", "val", "test") for d in docs[split]] \
            if isinstance(docs, dict) else docs
        return [t for _, t in docs if t.strip()]

    return EvalCorpus(spec, source.identity, f"{spec}: every document whole, no detokeniser",
                      documents=read)


def parse_corpora(value: str) -> list[EvalCorpus]:
    """``--corpus a,b,markov:vocab=8,order=1`` -> corpora. Items are split at commas by
    :func:`sedd_ray.cli.parse_list`; a ``key=value`` item (no ``:``) continues the
    synthetic spec before it."""
    items = parse_list(value, "--corpus", str, kind="corpus", example="wikitext2,text:a.txt")
    merged: list[str] = []
    for item in items:
        if "=" in item and ":" not in item and merged and ":" in merged[-1]:
            merged[-1] += "," + item
        else:
            merged.append(item)
    if not merged:
        raise EvalInputError("--corpus is empty; e.g. --corpus wikitext2,text:held_out.txt")
    return [resolve_corpus(s) for s in dict.fromkeys(merged)]


# --- models --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """What to evaluate: a checkpoint folder, and the trial it belongs to (if any)."""

    checkpoint: str
    study: str | None = None
    trial_id: str | None = None

    @property
    def label(self) -> str:
        return f"trial {self.trial_id}" if self.trial_id else self.checkpoint


def load_for_eval(ref: ModelRef | str, device: str = "cpu") -> Any:
    """The one loader behind every evaluation: a checkpoint (or run) folder ->
    :class:`sedd_ray.sample.LoadedModel` (EMA weights, graph, noise, tokenizer, config).

    The plug point for other formats (an exported / official folder through
    ``ScoreModel.from_pretrained``) is here and only here."""
    from sedd_ray.hub import is_pretrained_ref
    from sedd_ray.sample import checkpoint_dir, load_model

    path = ref.checkpoint if isinstance(ref, ModelRef) else ref
    return load_model(path if is_pretrained_ref(path) else checkpoint_dir(path), device)


def model_tokenizer(ref: ModelRef) -> Any:
    """The tokenizer saved in a checkpoint, read without loading any weights."""
    from tokenizers import Tokenizer

    from sedd_ray.checkpoint import CheckpointError
    from sedd_ray.hub import is_pretrained_ref, load_pretrained
    from sedd_ray.trainer import TOKENIZER_FILE

    if is_pretrained_ref(ref.checkpoint):  # an export or official folder / Hub id
        return load_pretrained(ref.checkpoint).tokenizer
    path = Path(ref.checkpoint) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ref.checkpoint} has no {TOKENIZER_FILE}")
    return Tokenizer.from_str(path.read_text())


def model_kind(ref: ModelRef) -> str:
    """``model.kind`` of a checkpoint (``diffusion`` or ``ar``), read without its weights;
    a pretrained folder or Hub id is a diffusion model (SEDD's or an export)."""
    return str(_own_config(ref, ("model", "kind")) or "diffusion")


def check_tokenizer(corpus: EvalCorpus, tokenizer: Any, ref: ModelRef) -> None:
    """Refuse a corpus the model's tokenizer cannot be evaluated on (zero-shot means the
    model's own tokenizer): a synthetic source needs exactly its symbols; text needs a
    text tokenizer (one that has EOS)."""
    from sedd_ray import synthetic
    from sedd_ray.data import EOS

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if corpus.synthetic is not None:
        want = {s: i for i, s in enumerate(synthetic.symbols(corpus.synthetic.vocab))}
        if vocab != want:
            raise EvalInputError(
                f"tokenizer mismatch: corpus {corpus.spec} needs its own "
                f"{corpus.synthetic.vocab}-symbol tokenizer, but {ref.label} has "
                f"{len(vocab)} tokens; evaluate a model trained on this source")
    elif EOS not in vocab:
        raise EvalInputError(
            f"tokenizer mismatch: corpus {corpus.spec} is text, but {ref.label} has a "
            f"{len(vocab)}-symbol synthetic tokenizer; evaluate a model trained on text")


# --- settings and rows -----------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers (hashed into ``settings_key``)."""

    blocks: int = 256  # blocks per corpus (evenly spread; a synthetic source draws this many)
    draws: int = 16  # importance-sampled noise levels per block
    seed: int = 0  # the bound's draws and a synthetic corpus's blocks
    batch_size: int = 64  # rows per network call (does not change the numbers)
    precision: str = "auto"  # auto: bf16 autocast on GPU, float32 on CPU
    samples: int = 0  # sample-quality samples (0: none)
    steps: int = 128
    predictor: str = "analytic"
    length: int | None = None  # default: the model's seq_len
    sample_seed: int = 0
    eval_lm: str | None = None
    cache: str = "batch"  # the RADD denoiser cache of a time-independent model

    def bound_settings(self, corpus: EvalCorpus) -> dict[str, Any]:
        return {"kind": "bound", "blocks": self.blocks, "draws": self.draws, "seed": self.seed,
                "precision": self.precision, "corpus": corpus.identity,
                "zero_shot": corpus.describe}

    def sample_settings(self, source: EvalCorpus | None = None) -> dict[str, Any]:
        out = {"kind": "samples", "samples": self.samples, "steps": self.steps,
               "predictor": self.predictor, "length": self.length, "seed": self.sample_seed,
               "precision": self.precision, "eval_lm": self.eval_lm}
        if self.cache != "batch":  # "batch" gives the uncached samples exactly
            out["cache"] = self.cache
        return out if source is None else {**out, "source": source.identity}


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row(ref: ModelRef, step: int, corpus: str, metric: str, value: float, stderr: float | None,
         n: int, unit: str, settings: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"study": ref.study, "trial_id": ref.trial_id, "checkpoint": ref.checkpoint,
            "step": step, "corpus": corpus, "metric": metric, "value": value,
            "stderr": stderr, "n": n, "unit": unit, "seed": settings.get("seed"),
            "settings": json.dumps(settings, sort_keys=True, default=str),
            "settings_key": settings_key(settings),
            "created_at": _dt.datetime.now(_dt.timezone.utc), **more}


# --- the bound on one corpus ----------------------------------------------------------------

def corpus_blocks(corpus: EvalCorpus, tokenizer: Any, seq_len: int, settings: EvalSettings,
                  progress: bool = False) -> Any:
    """The evaluation blocks of ``corpus`` for a model: LongTensor (n, seq_len)."""
    import numpy as np
    import torch

    from sedd_ray.data import EOS, pack_blocks

    if corpus.synthetic is not None:
        rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 7]))
        return torch.from_numpy(corpus.synthetic.sample(settings.blocks, seq_len, rng))
    eos = tokenizer.token_to_id(EOS)
    docs = corpus.documents(progress)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids + [eos] for e in encode(docs, add_special_tokens=False)]
    stream = np.fromiter((i for row in ids for i in row), dtype=np.int64)
    blocks = pack_blocks(stream, seq_len)
    if len(blocks) < 2:
        raise EvalInputError(f"corpus {corpus.spec} gives {len(blocks)} block(s) of the model's "
                             f"seq_len {seq_len}; a standard error needs at least 2: use more text")
    return torch.from_numpy(blocks)


def _autocast(loaded: Any, precision: str) -> Any:
    from sedd_ray.trainer import bf16_autocast

    device = next(loaded.model.parameters()).device
    return bf16_autocast(precision, device) or nullcontext()


def bound_rows(ref: ModelRef, loaded: Any, corpus: EvalCorpus, settings: EvalSettings,
               progress: bool = False) -> list[dict[str, Any]]:
    """``nll_bound``, ``ppl_bound`` (and ``bound_gap`` on a synthetic source) rows; for the
    autoregressive reference (``model.kind=ar``) its exact ``nll``, ``ppl`` (``nll_gap``)
    on the same blocks, through the model kind's objective (:mod:`sedd_ray.objective`)."""
    from sedd_ray.diffusion.bound import mean_stderr
    from sedd_ray.objective import build_objective

    t0 = time.perf_counter()
    seq_len = loaded.cfg.data.seq_len
    blocks = corpus_blocks(corpus, loaded.tokenizer, seq_len, settings, progress)
    device = next(loaded.model.parameters()).device
    objective = build_objective(loaded.cfg, loaded.graph, loaded.noise)
    with _autocast(loaded, settings.precision):
        _, values = objective.split_nll(loaded.model, blocks, count=settings.blocks,
                                        draws=settings.draws, seed=settings.seed,
                                        batch_size=settings.batch_size, device=device)
    nll, ppl, gap = (("nll", "ppl", "nll_gap") if objective.exact_nll
                     else ("nll_bound", "ppl_bound", "bound_gap"))
    mean, se = mean_stderr(values)
    wall = time.perf_counter() - t0
    truth = corpus.synthetic.true_nll(seq_len) if corpus.synthetic is not None else None
    s = settings.bound_settings(corpus)
    common = dict(n=len(values), settings=s, reference=truth, wall_time_s=wall)
    rows = [_row(ref, loaded.step, corpus.spec, nll, mean, se, unit="nats/token", **common),
            _row(ref, loaded.step, corpus.spec, ppl, math.exp(mean),
                 math.exp(mean) * se, unit="perplexity", **{**common, "reference": None})]
    if truth is not None:
        rows.append(_row(ref, loaded.step, corpus.spec, gap, mean - truth, se,
                         unit="nats/token", **common))
    return rows


# --- sample quality ----------------------------------------------------------------------------

def _stat_rows(ref: ModelRef, step: int, corpus: str, stats: dict[str, Any],
               settings: dict[str, Any], wall: float, **more: Any) -> list[dict[str, Any]]:
    from sedd_ray.diffusion.bound import mean_stderr

    rows = []
    for metric, (values, unit) in stats.items():
        mean, se = mean_stderr(values)
        rows.append(_row(ref, step, corpus, metric, mean, se, len(values), unit, settings,
                         wall_time_s=wall, **more))
    return rows


def quality_rows(ref: ModelRef, loaded: Any, settings: EvalSettings, sources: list[EvalCorpus],
                 eval_lm: Any = None) -> list[dict[str, Any]]:
    """Sample-quality rows of one checkpoint (see :mod:`sedd_ray.quality`)."""
    import torch

    from sedd_ray import quality

    length = settings.length or loaded.cfg.data.seq_len
    t0 = time.perf_counter()
    with _autocast(loaded, settings.precision):
        x = quality.sample_tokens(loaded, num_samples=settings.samples, length=length,
                                  steps=settings.steps, predictor=settings.predictor,
                                  seed=settings.sample_seed, cache=settings.cache)
    wall = time.perf_counter() - t0
    s = settings.sample_settings()
    stats: dict[str, Any] = {"sample_entropy": (quality.unigram_entropy(x), "nats"),
                             "rep_4": (quality.repetition_rate(x, 4), "fraction")}
    stats.update({f"distinct_{n}": (quality.distinct_n(x, n), "fraction") for n in (1, 2, 3)})
    stats["seconds_per_sample"] = (torch.full((len(x),), wall / len(x)), "s")
    rows = _stat_rows(ref, loaded.step, "samples", stats, s, wall)
    if eval_lm is not None:
        nll, count = eval_lm.nll([loaded.decode(row.tolist()) for row in x])
        per_token = nll / count.clamp(min=1)
        ppl = quality.gen_ppl(nll, count)
        rows += _stat_rows(ref, loaded.step, "samples", {"gen_nll": (per_token, "nats/token")},
                           s, wall, eval_lm=eval_lm.name)
        se = rows[-1]["stderr"]
        rows.append(_row(ref, loaded.step, "samples", "gen_ppl", ppl, ppl * se, len(x),
                         "perplexity", s, wall_time_s=wall, eval_lm=eval_lm.name))
    for src in sources:
        truth = src.synthetic.true_nll(length)
        nll = quality.truth_nll(src.synthetic, x)
        st = settings.sample_settings(src)
        rows += _stat_rows(ref, loaded.step, src.spec, {"truth_nll": (nll, "nats/token"),
                                                        "truth_gap": (nll - truth, "nats/token")},
                           st, wall, reference=truth)
    return rows


# --- one checkpoint, many corpora ------------------------------------------------------------

@dataclass
class Job:
    """The work left for one checkpoint: corpora whose bound is missing, and whether the
    sample-quality rows (with these truth sources) are missing."""

    ref: ModelRef
    corpora: list[EvalCorpus] = field(default_factory=list)
    samples: bool = False
    sources: list[EvalCorpus] = field(default_factory=list)


def evaluate_model(job: Job, settings: EvalSettings, device: str = "cpu",
                   progress: bool = False) -> list[dict[str, Any]]:
    """Every row of ``job``: loads the checkpoint once (:func:`load_for_eval`). Runs in the
    driver or as a Ray task (plain dataclasses in and out)."""
    from sedd_ray import quality

    loaded = load_for_eval(job.ref, device)
    rows: list[dict[str, Any]] = []
    for corpus in job.corpora:
        rows += bound_rows(job.ref, loaded, corpus, settings, progress)
    if job.samples:
        lm = quality.load_eval_lm(settings.eval_lm, device) if settings.eval_lm else None
        rows += quality_rows(job.ref, loaded, settings, job.sources, lm)
    return rows


# --- the driver: which checkpoints, what is left, where the rows go ----------------------------

def resolve_models(args: argparse.Namespace) -> tuple[list[ModelRef], str]:
    """The checkpoints to evaluate and the ``evals.parquet`` their rows go to."""
    from sedd_ray.checkpoint import CheckpointError
    from sedd_ray.hub import is_pretrained_ref
    from sedd_ray.io import normalize
    from sedd_ray.layout import StudyLayout, evals_beside
    from sedd_ray.results import FINISHED_STATUSES, read_trials, resolve_study
    from sedd_ray.sample import checkpoint_dir, resolve_checkpoint

    if args.checkpoint and is_pretrained_ref(args.checkpoint):  # export / official / Hub id
        local = os.path.isdir(os.path.expanduser(args.checkpoint))
        path = normalize(os.path.expanduser(args.checkpoint)) if local else args.checkpoint
        return [ModelRef(path)], args.evals or (evals_beside(path) if local else EVALS_FILE)
    if args.checkpoint:
        path = normalize(checkpoint_dir(args.checkpoint))
        return [ModelRef(path)], args.evals or evals_beside(path)
    study = resolve_study(args.storage, args.study)
    out = args.evals or StudyLayout(args.storage, study).evals_file
    if not args.all_trials:
        path, row = resolve_checkpoint(argparse.Namespace(**{**vars(args), "study": study}))
        return [ModelRef(normalize(path), study, row["trial_id"])], out
    trials = read_trials(args.storage, study)
    done = trials[trials["status"].isin(FINISHED_STATUSES) & trials["checkpoint_path"].notna()]
    if done.empty:
        raise CheckpointError(f"study {study!r} has no finished trial with a checkpoint")
    refs = [ModelRef(normalize(checkpoint_dir(p)), study, t)
            for t, p in zip(done["trial_id"], done["checkpoint_path"])]
    return refs, out


def _own_corpus(ref: ModelRef) -> str | None:
    """The training corpus recorded in a checkpoint's meta (no weights read)."""
    return _own_config(ref, ("data", "corpus"))


def _own_config(ref: ModelRef, key: tuple[str, str]) -> Any:
    """``config[section][field]`` of a checkpoint, from its ``meta.json`` (a pretrained
    folder: its config), without loading weights; None where it cannot be read."""
    from sedd_ray.checkpoint import META_FILE
    from sedd_ray.hub import HubError, is_pretrained_ref, pretrained_config

    section, name = key
    if is_pretrained_ref(ref.checkpoint):
        try:
            return getattr(getattr(pretrained_config(ref.checkpoint)[0], section), name)
        except (HubError, OSError, ValueError, AttributeError):
            return None
    try:
        meta = json.loads((Path(ref.checkpoint) / META_FILE).read_text())
        return meta["config"][section][name]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def plan(refs: list[ModelRef], corpora: list[EvalCorpus], settings: EvalSettings,
         done: set[tuple[str, str, str]]) -> list[Job]:
    """Check every (model, corpus) pair before any work, and keep only what is missing
    from ``done`` ((checkpoint, corpus, settings_key) of finished evaluations)."""
    jobs = []
    for ref in refs:
        tokenizer = model_tokenizer(ref)
        for corpus in corpora:
            check_tokenizer(corpus, tokenizer, ref)
        job = Job(ref, [c for c in corpora if (ref.checkpoint, c.spec, settings_key(
            settings.bound_settings(c))) not in done])
        if settings.samples:
            sources = truth_sources(ref, corpora)
            job.sources = [s for s in sources if (ref.checkpoint, s.spec, settings_key(
                settings.sample_settings(s))) not in done]
            key = settings_key(settings.sample_settings())
            job.samples = bool(job.sources) or (ref.checkpoint, "samples", key) not in done
        if job.corpora or job.samples:
            jobs.append(job)
    return jobs


def truth_sources(ref: ModelRef, corpora: list[EvalCorpus]) -> list[EvalCorpus]:
    """The synthetic sources whose exact NLL the samples get: those in ``--corpus``, and
    the model's own training source (once: a size such as ``blocks=`` is not a new one)."""
    sources = [c for c in corpora if c.synthetic is not None]
    from sedd_ray.synthetic import SOURCES

    own = _own_corpus(ref)
    if own and own.partition(":")[0] in SOURCES:
        extra = resolve_corpus(own)
        if not any(type(c.synthetic) is type(extra.synthetic)
                   and c.synthetic.params() == extra.synthetic.params() for c in sources):
            sources.append(extra)
    return sources


def finished(path: str) -> set[tuple[str, str, str]]:
    """(checkpoint, corpus, settings_key) of the evaluations already in ``path``: a bound
    counts once its ``nll_bound`` row (an AR model's exact ``nll``) is there, samples once
    ``sample_entropy`` (or a source's ``truth_nll``) is."""
    from sedd_ray.results import read_evals

    df = read_evals(path)
    df = df[df["metric"].isin(["nll_bound", "nll", "sample_entropy", "truth_nll"])]
    return set(zip(df["checkpoint"], df["corpus"], df["settings_key"]))


def run_jobs(jobs: list[Job], settings: EvalSettings, args: argparse.Namespace,
             write: Callable[[list[dict[str, Any]]], int]) -> int:
    """Evaluate every job, in this process or as Ray tasks (``--address`` / ``--ray``);
    each job's rows are written as soon as it finishes. Returns the rows added."""
    if not (args.address or args.ray):
        return sum(write(evaluate_model(j, settings, args.device, args.progress)) for j in jobs)
    import ray

    from sedd_ray.launch import connect
    from sedd_ray.preflight import check_task

    connect(args.address)
    check_task(args.cpus_per_task, args.gpus_per_task)  # a task no node can hold: one line
    device = "cuda" if args.gpus_per_task > 0 else "cpu"
    task = ray.remote(num_cpus=args.cpus_per_task, num_gpus=args.gpus_per_task)(evaluate_model)
    pending = [task.remote(j, settings, device) for j in jobs]
    added = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            rows = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:  # the task's own error (a DataError...)
            raise err.as_instanceof_cause() from None
        added += write(rows)
    return added


# --- the CLI ---------------------------------------------------------------------------------

def _settings(args: argparse.Namespace) -> EvalSettings:
    for flag in ("blocks", "draws", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise EvalInputError(f"--{flag.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, flag)}")
    for flag in ("samples", "length"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "samples" else 1):
            raise EvalInputError(f"--{flag} must be >= {0 if flag == 'samples' else 1}, "
                                 f"got {value}")
    if args.precision not in ("auto", "bf16", "fp32"):
        raise EvalInputError(f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    if args.eval_lm and not args.samples:
        raise EvalInputError("--eval-lm scores samples: pass --samples N too")
    from sedd_ray.diffusion import PREDICTORS

    PREDICTORS.get(args.predictor)
    return EvalSettings(blocks=args.blocks, draws=args.draws, seed=args.seed,
                        batch_size=args.batch_size, precision=args.precision,
                        samples=args.samples, steps=args.steps, predictor=args.predictor,
                        length=args.length, sample_seed=args.sample_seed,
                        eval_lm=args.eval_lm)


def smoke_checkpoint(tmp: str) -> str:
    """A throwaway model for ``--smoke-test`` with no model given: the smoke preset on a
    small Markov source, trained in-process for a few steps (seconds)."""
    from sedd_ray.config import apply_params, preset
    from sedd_ray.trainer import train

    cfg = apply_params(preset("smoke"), {
        "corpus": "markov:vocab=8,order=1,sharpness=2,blocks=512", "seq_len": 16,
        "steps": 10, "eval_every": 10, "ckpt_every": 10, "sample_count": 0, "progress": False,
        "eval_sequences": 4, "test_draws": 0}).validate()
    out = os.path.join(tmp, "run")
    return str(train(cfg, out).checkpoint_dir)


def _prepare(args: argparse.Namespace) -> tuple[EvalSettings, list[ModelRef], list[Job], str,
                                                list[EvalCorpus]]:
    """Everything checked before any work: flags, corpora, models, tokenizers, the
    evaluation LM; returns the jobs left and where the rows go."""
    from sedd_ray import quality

    settings = _settings(args)
    if not args.corpus and not settings.samples:
        raise EvalInputError("nothing to evaluate: pass --corpus (e.g. --corpus wikitext2) "
                             "and/or --samples N")
    corpora = parse_corpora(args.corpus) if args.corpus else []
    refs, out = resolve_models(args)
    lm = quality.load_eval_lm(settings.eval_lm, "cpu") if settings.eval_lm else None
    settings = EvalSettings(**{**settings.__dict__, "eval_lm": lm.name if lm else None})
    jobs = plan(refs, corpora, settings, finished(out))
    return settings, refs, jobs, out, corpora


def _report(path: str, refs: list[ModelRef], corpora: list[EvalCorpus],
            settings: EvalSettings) -> None:
    """The rows of these checkpoints for these settings, one line each."""
    from sedd_ray.results import read_evals

    df = read_evals(path)
    keys = {settings_key(settings.bound_settings(c)) for c in corpora}
    keys.add(settings_key(settings.sample_settings()))
    for ref in refs if settings.samples else []:
        keys |= {settings_key(settings.sample_settings(c)) for c in truth_sources(ref, corpora)}
    df = df[df["checkpoint"].isin({r.checkpoint for r in refs}) & df["settings_key"].isin(keys)]
    for c in corpora:
        print(f"# zero-shot {c.describe}")
    for r in df.itertuples(index=False):
        who = f"trial {r.trial_id}" if isinstance(r.trial_id, str) else Path(r.checkpoint).name
        err = f" +- {r.stderr:.4f}" if r.stderr is not None and math.isfinite(r.stderr) else ""
        ref = f" (exact {r.reference:.4f})" if r.reference is not None and \
            math.isfinite(r.reference) else ""
        lm = f" under {r.eval_lm}" if isinstance(r.eval_lm, str) else ""
        print(f"{who} step {r.step}  {r.corpus:<24} {r.metric:<18} {r.value:.4f}{err} "
              f"{r.unit}{ref}  n={r.n}{lm}")


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    from sedd_ray.checkpoint import CheckpointError
    from sedd_ray.preflight import ResourceError
    from sedd_ray.results import ResultsError, append_evals

    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sedd-ray-eval-smoke-") as tmp:
        try:
            if args.smoke_test:
                _smoke_args(args, tmp)
            settings, refs, jobs, out, corpora = _prepare(args)
        except (ConfigError, ValueError, CheckpointError, ResultsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.device == "auto":
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        try:
            added = run_jobs(jobs, settings, args, lambda rows: append_evals(out, rows))
        except ResourceError as err:  # refused before any task started: nothing written
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (ValueError, CheckpointError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        _report(out, refs, corpora, settings)
        print(f"{added} new row(s) in {out} ({len(jobs)} checkpoint(s) evaluated, "
              f"{time.perf_counter() - t0:.1f}s); finished evaluations are not recomputed")
    return 0


def _smoke_args(args: argparse.Namespace, tmp: str) -> None:
    """``--smoke-test``: tiny settings; with no model given, a throwaway checkpoint on a
    Markov source evaluated on that source (rows in the temporary folder)."""
    args.blocks, args.draws, args.samples, args.steps = 8, 2, args.samples or 4, 4
    if args.corpus:
        parse_corpora(args.corpus)  # a bad --corpus fails before the throwaway training
    if not (args.checkpoint or args.study or args.trial != "best"):
        args.checkpoint = smoke_checkpoint(tmp)
        args.corpus = args.corpus or "markov:vocab=8,order=1,sharpness=2"
        args.evals = args.evals or os.path.join(tmp, EVALS_FILE)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sedd_ray.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--trial", default="best", help="'best' (lowest val_nll) or a trial id")
    m.add_argument("--study", default=None, help="study name (optional if only one)")
    m.add_argument("--storage", default="results", help="results folder or URI")
    m.add_argument("--checkpoint", default=None, help="a checkpoint or run folder (no study)")
    m.add_argument("--all-trials", action="store_true", help="every finished trial of --study")
    b = p.add_argument_group("likelihood bound")
    b.add_argument("--corpus", default=None, help="comma-separated: wikitext2, wikitext103, "
                   "ptb, lambada, lm1b, shakespeare, text:PATH, markov:k=v,..., copy:k=v,...")
    b.add_argument("--blocks", type=int, default=256, help="blocks per corpus (default 256)")
    b.add_argument("--draws", type=int, default=16, help="noise draws per block (default 16)")
    b.add_argument("--seed", type=int, default=0, help="the bound's draws (common to models)")
    b.add_argument("--batch-size", type=int, default=64, help="rows per network call")
    q = p.add_argument_group("sample quality")
    q.add_argument("--samples", type=int, default=0, help="samples to draw (0: no quality rows)")
    q.add_argument("--steps", type=int, default=128, help="sampling steps (default 128)")
    q.add_argument("--predictor", default="analytic", help="analytic or euler")
    q.add_argument("--length", type=int, default=None, help="tokens (default: seq_len)")
    q.add_argument("--sample-seed", type=int, default=0)
    q.add_argument("--eval-lm", default=None, help="HF causal-LM folder or Hub id: gen-PPL")
    r = p.add_argument_group("running")
    r.add_argument("--evals", default=None, help="the evals.parquet to use (default: the "
                   "study's, or next to --checkpoint)")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    r.add_argument("--precision", default="auto", help="auto (bf16 on GPU), bf16 or fp32")
    r.add_argument("--ray", action="store_true", help="one Ray task per checkpoint (local cluster)")
    r.add_argument("--address", default=None, help="Ray cluster to run the tasks on")
    r.add_argument("--cpus-per-task", type=float, default=1)
    r.add_argument("--gpus-per-task", type=float, default=0)
    r.add_argument("--progress", action="store_true", help="progress bars")
    r.add_argument("--smoke-test", action="store_true",
                   help="seconds on CPU (no model given: a throwaway one on a Markov source)")
    return p


if __name__ == "__main__":
    sys.exit(main())
