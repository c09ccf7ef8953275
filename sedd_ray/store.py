"""The token store: a corpus tokenized once, in parallel, into shards a run memory-maps.

    uri = build_store(cfg.data)                # or reuse: keyed by (corpus, tokenizer, settings)
    store = TokenStore.open(uri, cfg.data)     # checks every shard (size and checksum)
    rows = store.stream(seq_len=1024, seed=0).rows(start, count)   # LongTensor (count, L)

Layout at ``<data.store_dir or <cache>/stores>/<key>/`` (a local folder or an ``s3://``,
``gs://``, ``file://`` URI, written through ``pyarrow.fs``; :mod:`sedd_ray.io`)::

    tokenizer.json               the tokenizer (written first: every shard uses it)
    shards/00042.train.bin       raw uint16 (or uint32) token ids, EOS after each document
    shards/00042.val.bin         ... of the documents of job 42 held out for validation
    shards/00042.test.bin
    shards/00042.json            the receipt: counts, documents and checksums of the three
    index.json                   written last: settings, tokenizer identity, counts, receipts

**Jobs.** The corpus's rows (over its parts: files, or a dataset's splits, in order;
:mod:`sedd_ray.sources`) are cut into consecutive ranges of about ``data.shard_tokens``
tokens (4 bytes of text a token assumed; small files share a job); job ``i`` reads its rows, tokenizes every document, appends EOS, and writes shard
``i`` of each split, each file atomically, its receipt last. Shard ``i``'s content depends
only on its rows, so the store is the same for any number of workers.

**Splits.** The dataset's own train/validation/test when it has them; otherwise a
hold-out by document: row ``r`` of part ``p`` goes to validation when
``u = mix(split_seed, p, r) / 2**64 < val_fraction``, to test when
``u < val_fraction + test_fraction``, else to train (``data.split_seed``, default 0).

**Parallelism.** Processes on this machine (``multiprocessing`` with ``spawn``,
``data.tokenize_workers``, 0 = every CPU): a study builds its store on the driver before
its trials start, when the cluster's CPUs are not ours to take, and one machine's cores
tokenize ~100 MB/s. When Ray is already initialised and the store is on cloud storage,
the jobs run as Ray tasks instead (one CPU each), so every node of the cluster helps and
writes its shards straight to the bucket. A tokenization worker uses one core
(``TOKENIZERS_PARALLELISM=false``).

**Resume.** A build that stopped (killed, out of disk) is resumed by the next one: each
shard with a receipt whose files match their checksums is kept, the others are rebuilt;
``index.json`` appears only when every shard is there.

**Reading.** :class:`TokenStore` checks every shard's size and checksum against the index
(a truncated or corrupted shard is refused, naming it). A remote store is copied shard by
shard into ``<cache>/store-cache/<key>/`` on each node (checked once, then reused).
:class:`TokenStream` draws training blocks: sample ``j`` of the run starts at token
``mix(seed, j) mod T`` of the ``T`` valid start positions of the train shards, so a batch
depends only on (seed, step, rank) and memory does not grow with the corpus (np.memmap).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sedd_ray import sources
from sedd_ray.data import (
    CODE_VERSION,
    EOS,
    SPLITS,
    DataBundle,
    DataError,
    _gpt2,
    _hash,
    _train_bpe,
    cache_root,
)
from sedd_ray.io import atomic_write, filesystem, is_local, join, normalize

__all__ = [
    "STORE_VERSION",
    "StoreError",
    "TokenStore",
    "TokenStream",
    "build_store",
    "estimate_line",
    "load_bundle",
    "store_uri",
]

log = logging.getLogger(__name__)

STORE_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
BYTES_PER_TOKEN = 4.0  # plans jobs of about shard_tokens tokens from bytes of text
EVAL_TOKENS_CAP = 1 << 22  # validation / test blocks held in memory, at most
_DTYPES = {"uint16": (np.uint16, 1 << 16), "uint32": (np.uint32, 1 << 32)}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


class StoreError(DataError):
    """The token store cannot be built or read as asked; the message says the fix."""


# --- hashing -------------------------------------------------------------------------------

def _checksum_name() -> str:
    try:
        import xxhash  # noqa: F401  (datasets depends on it)

        return "xxh3_64"
    except ImportError:
        return "sha256"


def _hasher(name: str) -> Any:
    if name == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    import hashlib

    return hashlib.new(name)


def _mix(seed: int, *cols: np.ndarray | int) -> np.ndarray:
    """splitmix64 of ``seed`` and integer columns, elementwise: ``uint64`` array."""
    x = np.full(np.broadcast(*cols).shape, 0x9E3779B97F4A7C15 ^ (seed & (2**64 - 1)), np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            x = (x ^ np.asarray(c, np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(31)
            x = x * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(29)
    return x


# --- settings, key, location ---------------------------------------------------------------

def _split_rule(cfg: Any, corpus: sources.Corpus) -> dict[str, Any]:
    if corpus.given_splits:
        return {"method": "given"}
    return {"method": "hold-out by document", "seed": int(getattr(cfg, "split_seed", 0)),
            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}


def store_settings(cfg: Any, corpus: sources.Corpus) -> dict[str, Any]:
    """Everything besides the corpus that changes the store's bytes (its key)."""
    return {"v": STORE_VERSION, "tokenizer": cfg.tokenizer,
            "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
            "tokenizer_sample_mb": cfg.tokenizer_sample_mb if cfg.tokenizer == "bpe" else None,
            "split": _split_rule(cfg, corpus), "shard_tokens": cfg.shard_tokens,
            "token_dtype": cfg.token_dtype}


def store_root(cfg: Any) -> str:
    """``data.store_dir``, else ``<cache>/stores`` (see :func:`sedd_ray.data.cache_root`)."""
    return normalize(cfg.store_dir or str(cache_root(cfg) / "stores"))


def store_uri(cfg: Any, corpus: sources.Corpus) -> str:
    """Where the store of ``(corpus, tokenizer, settings)`` lives."""
    key = _hash({"corpus": corpus.identity, **store_settings(cfg, corpus)})
    return join(store_root(cfg), key)


# --- planning and the split by document ------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """Shard ``shard``: the rows ``[start, stop)`` of part ``part`` for each
    ``(part, start, stop)`` of ``segments``, in order."""

    shard: int
    segments: tuple[tuple[int, int, int], ...]

    def documents(self, corpus: sources.Corpus, rule: dict[str, Any]) -> Iterator[
            tuple[str, int]]:
        """``(text, split code)`` of every row of the job, in order."""
        for part, start, stop in self.segments:
            texts = sources.read_rows(corpus, part, start, stop)
            codes = split_codes(rule, corpus.parts[part], part, start, stop)
            yield from zip(texts, codes.tolist())


def plan_jobs(corpus: sources.Corpus, shard_tokens: int) -> list[Job]:
    """Consecutive row ranges of about ``shard_tokens`` tokens each (at
    :data:`BYTES_PER_TOKEN` bytes a token), spanning parts: small files share a shard."""
    budget = shard_tokens * BYTES_PER_TOKEN
    jobs: list[Job] = []
    current: list[tuple[int, int, int]] = []
    size = 0.0
    for i, p in enumerate(corpus.parts):
        per_row = max(p.nbytes / max(p.rows, 1), 1.0)
        a = 0
        while a < p.rows:
            take = max(1, min(p.rows - a, int((budget - size) / per_row)))
            current.append((i, a, a + take))
            size += take * per_row
            a += take
            if size >= budget - per_row:
                jobs.append(Job(len(jobs), tuple(current)))
                current, size = [], 0.0
    if current:
        jobs.append(Job(len(jobs), tuple(current)))
    return jobs


def split_codes(rule: dict[str, Any], part: sources.Part, index: int, start: int,
                stop: int) -> np.ndarray:
    """``(stop - start,)`` int8: 0 train, 1 val, 2 test for rows ``[start, stop)``."""
    if part.split is not None:
        return np.full(stop - start, _SPLIT_CODE[part.split], np.int8)
    if rule["method"] == "given":  # a part outside the given splits: train
        return np.zeros(stop - start, np.int8)
    u = (_mix(rule["seed"], index, np.arange(start, stop)) >> np.uint64(11)) / float(1 << 53)
    vf, tf = rule["val_fraction"], rule["test_fraction"]
    return np.where(u < vf, 1, np.where(u < vf + tf, 2, 0)).astype(np.int8)


# --- one shard -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to write one shard (pickled to a process or a Ray task)."""

    uri: str
    corpus: sources.Corpus
    job: Job
    tokenizer_json: str
    eos_id: int
    dtype: str
    rule: dict[str, Any]
    checksum: str


def _shard_file(shard: int, split: str) -> str:
    return f"shards/{shard:05d}.{split}.bin"


def _receipt_file(shard: int) -> str:
    return f"shards/{shard:05d}.json"


def _encode(tokenizer: Any, texts: list[str], eos_id: int, dtype: Any) -> np.ndarray:
    """``text_0 EOS text_1 EOS ...`` as ``dtype`` (1-D)."""
    if not texts:
        return np.zeros(0, dtype)
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    parts = []
    for a in range(0, len(texts), 1024):
        for e in encode_batch(texts[a: a + 1024], add_special_tokens=False):
            parts.append(np.asarray(e.ids + [eos_id], dtype))
    return np.concatenate(parts)


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Tokenize one job into its three split files and its receipt (each written
    atomically, the receipt last); returns the receipt."""
    from tokenizers import Tokenizer

    job = task.job
    rows = list(job.documents(task.corpus, task.rule))
    tok = Tokenizer.from_str(task.tokenizer_json)
    fs, root, _ = filesystem(task.uri)
    splits = {}
    for split, code in _SPLIT_CODE.items():
        docs = [t for t, c in rows if c == code and t.strip()]
        arr = _encode(tok, docs, task.eos_id, _DTYPES[task.dtype][0])
        data = arr.tobytes()
        h = _hasher(task.checksum)
        h.update(data)
        atomic_write(f"{root}/{_shard_file(job.shard, split)}", data, fs=fs)
        splits[split] = {"file": _shard_file(job.shard, split), "tokens": int(arr.size),
                         "docs": len(docs), "bytes": sum(len(t.encode()) for t in docs),
                         task.checksum: h.hexdigest()}
    receipt = {"shard": job.shard, "segments": [list(g) for g in job.segments],
               "splits": splits}
    atomic_write(f"{root}/{_receipt_file(job.shard)}", json.dumps(receipt), fs=fs)
    return receipt


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker


def _run_tasks(tasks: list[ShardTask], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Every task's receipt, in order: in this process (one worker), as Ray tasks (Ray up
    and a remote store), else in a pool of ``spawn`` processes."""
    if not tasks:
        return []
    if workers == 1 or len(tasks) == 1:
        return [build_shard(t) for t in _bar(tasks, progress)]
    ray = sys.modules.get("ray")  # imported by whoever started Ray; never here
    if ray is not None and ray.is_initialized() and not is_local(tasks[0].uri):
        remote = ray.remote(num_cpus=1)(build_shard)
        return ray.get([remote.remote(t) for t in tasks])
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
        return list(_bar(pool.imap(build_shard, tasks), progress, total=len(tasks)))


def _bar(it: Any, progress: bool, total: int | None = None) -> Any:
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc="tokenize shards", unit="shard")


# --- the build -----------------------------------------------------------------------------

def _check_dtype(cfg: Any, vocab_size: int) -> None:
    limit = _DTYPES[cfg.token_dtype][1]
    if vocab_size > limit:
        raise StoreError(f"a vocabulary of {vocab_size} tokens does not fit {cfg.token_dtype} "
                         f"token ids (at most {limit}); set --set data.token_dtype=uint32")


def _sample_texts(corpus: sources.Corpus, jobs: list[Job], rule: dict[str, Any],
                  budget: int) -> list[str]:
    """Train documents in job order until ``budget`` bytes: the BPE's bounded sample."""
    out, size = [], 0
    for job in jobs:
        for t, c in job.documents(corpus, rule):
            if c == 0 and t.strip():
                out.append(t)
                size += len(t.encode())
                if size >= budget:
                    return out
    return out


def _tokenizer(cfg: Any, corpus: sources.Corpus, jobs: list[Job], rule: dict[str, Any],
               fs: Any, root: str, progress: bool) -> tuple[str, str]:
    """The store's tokenizer JSON (the one already in the store when resuming) and where
    it came from."""
    path = f"{root}/{TOKENIZER_FILE}"
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            return f.read().decode(), "the store's own (resumed build)"
    if cfg.tokenizer == "gpt2":
        return _gpt2()[0].to_str(), "gpt2"
    budget = cfg.tokenizer_sample_mb << 20
    texts = _sample_texts(corpus, jobs, rule, budget)
    if not texts:
        raise StoreError(f"corpus {corpus.spec} has no training text to train a tokenizer on")
    tok = _train_bpe(texts, cfg.vocab_size, progress)
    return tok.to_str(), f"bpe trained on {sum(len(t.encode()) for t in texts)} bytes of train text"


def _tokenizer_identity(tok_json: str, name: str, source: str) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise StoreError(f"the {name} tokenizer has no {EOS} token")
    import hashlib

    return {"name": name, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "eos_id": eos, "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
            "source": source}


def _kept(fs: Any, root: str, jobs: list[Job], checksum: str,
          dtype: str) -> dict[int, dict[str, Any]]:
    """Receipts of the shards a previous build finished whose files still check out."""
    import pyarrow.fs as pafs

    itemsize = np.dtype(_DTYPES[dtype][0]).itemsize
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/shards", allow_not_found=True))
    for i in infos:  # a killed build's temporary files (one builder per store at a time)
        if i.base_name.startswith(".") and i.base_name.endswith(".tmp"):
            fs.delete_file(i.path)
    names = {i.base_name for i in infos}
    kept = {}
    for job in jobs:
        if f"{job.shard:05d}.json" not in names:
            continue
        with fs.open_input_stream(f"{root}/{_receipt_file(job.shard)}") as f:
            receipt = json.loads(f.read())
        try:
            for entry in receipt["splits"].values():
                _verify(fs, f"{root}/{entry['file']}", entry, checksum, itemsize)
        except StoreError:
            continue  # rebuilt below
        if receipt.get("segments") == [list(g) for g in job.segments]:
            kept[job.shard] = receipt
    return kept


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def build_store(cfg: Any, progress: bool = False, corpus: sources.Corpus | None = None) -> str:
    """Build (or finish, or find) the store of ``cfg`` (a :class:`DataConfig` whose corpus
    is a store corpus; ``corpus``: it resolved); returns its URI. Bad input fails before
    anything is written."""
    corpus = corpus or sources.parse_corpus(cfg.corpus, cfg.text_field)
    if cfg.tokenizer == "bpe":
        _check_dtype(cfg, cfg.vocab_size)
    uri = store_uri(cfg, corpus)
    fs, root, _ = filesystem(uri)
    if _exists(fs, f"{root}/{INDEX_FILE}"):
        return uri
    t0 = time.perf_counter()
    rule, checksum = _split_rule(cfg, corpus), _checksum_name()
    jobs = plan_jobs(corpus, cfg.shard_tokens)
    tok_json, tok_source = _tokenizer(cfg, corpus, jobs, rule, fs, root, progress)
    tok_id = _tokenizer_identity(tok_json, cfg.tokenizer, tok_source)
    _check_dtype(cfg, tok_id["vocab_size"])
    atomic_write(f"{root}/{TOKENIZER_FILE}", tok_json, fs=fs)  # the first write
    kept = _kept(fs, root, jobs, checksum, cfg.token_dtype)
    reused = len(kept)
    tasks = [ShardTask(uri, corpus, j, tok_json, tok_id["eos_id"], cfg.token_dtype, rule,
                       checksum) for j in jobs if j.shard not in kept]
    t_tok = time.perf_counter()
    workers = cfg.tokenize_workers or os.cpu_count() or 1
    for receipt in _run_tasks(tasks, workers, progress):
        kept[receipt["shard"]] = receipt
    receipts = [kept[j.shard] for j in jobs]
    seconds = {"plan_tokenizer": round(t_tok - t0, 3),
               "tokenize": round(time.perf_counter() - t_tok, 3)}
    index = _index(cfg, corpus, rule, tok_id, receipts, checksum, seconds, reused)
    atomic_write(f"{root}/{INDEX_FILE}", json.dumps(index, indent=1), fs=fs)
    log.info("built the store of %s in %.1fs: %s tokens -> %s", corpus.spec,
             time.perf_counter() - t0, index["counts"]["train"]["tokens"], uri)
    return uri


def _index(cfg: Any, corpus: sources.Corpus, rule: dict[str, Any], tok_id: dict[str, Any],
           receipts: list[dict[str, Any]], checksum: str, seconds: dict[str, float],
           reused: int) -> dict[str, Any]:
    counts = {s: {k: sum(r["splits"][s][k] for r in receipts) for k in ("tokens", "docs", "bytes")}
              for s in SPLITS}
    return {"store_version": STORE_VERSION, "code_version": CODE_VERSION,
            "corpus": sources.describe(corpus), "identity": corpus.identity,
            "settings": store_settings(cfg, corpus), "split": rule, "tokenizer": tok_id,
            "token_dtype": cfg.token_dtype, "checksum": checksum, "counts": counts,
            "shards": receipts, "build_seconds": seconds, "reused_shards": reused,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- reading -------------------------------------------------------------------------------

def _verify(fs: Any, path: str, entry: dict[str, Any], checksum: str, itemsize: int) -> None:
    """Refuse a shard that is missing, of the wrong size, or not matching its checksum."""
    import pyarrow.fs as pafs

    info, want = fs.get_file_info(path), entry["tokens"] * itemsize
    name, fix = entry["file"], ("delete it, its receipt and index.json; the next run rebuilds "
                                "only the missing shards")
    if info.type != pafs.FileType.File:
        raise StoreError(f"store shard {name} is missing at {path}; {fix}")
    if info.size != want:
        what = "truncated" if info.size < want else "too long"
        raise StoreError(f"store shard {name} is {what}: {info.size} bytes, the index says "
                         f"{want}; {fix}")
    h = _hasher(checksum)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != entry[checksum]:
        raise StoreError(f"store shard {name} does not match its {checksum} checksum "
                         f"({h.hexdigest()} != {entry[checksum]}); {fix}")


def _fetch(fs: Any, path: str, dest: Path, entry: dict[str, Any], checksum: str,
           itemsize: int) -> None:
    """Copy a remote shard into the node's cache (checked on the way), once."""
    if dest.is_file() and dest.stat().st_size == entry["tokens"] * itemsize:
        return  # copied and checked by an earlier run on this node
    _verify(fs, path, entry, checksum, itemsize)

    def write(out: Any) -> None:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 24):
                out.write(chunk)

    atomic_write(dest, write)


def _check_local(fs: Any, root: str, entries: list[dict[str, Any]], index: dict[str, Any],
                 itemsize: int, cache_dir: Path) -> None:
    """Check a local store's shards: their checksums the first time (and whenever a file's
    size or time changed), else their sizes; a note in ``<cache>/store-cache/verified``
    records a full check, so the ranks and trials of a node hash each shard once."""
    stats = []
    for e in entries:
        try:
            st = os.stat(f"{root}/{e['file']}")
            stats.append([e["file"], st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([e["file"], None, None])
    note = cache_dir / "store-cache" / "verified" / _hash({"root": root, "stats": stats,
                                                          "index": index["shards"]})
    if note.is_file():
        return
    for e in entries:
        _verify(fs, f"{root}/{e['file']}", e, index["checksum"], itemsize)
    atomic_write(note, root)


class TokenStore:
    """A built store, opened for reading: its index, tokenizer and memory-mapped shards.

    :meth:`open` checks every shard (size and checksum) against the index; a remote store
    is first copied into ``<cache>/store-cache/<key>`` (each node once, then reused).
    """

    def __init__(self, uri: str, index: dict[str, Any], root: Path) -> None:
        self.uri, self.index, self.root = uri, index, root
        self.dtype = _DTYPES[index["token_dtype"]][0]

    @classmethod
    def open(cls, uri: str, cache_dir: str | Path) -> TokenStore:
        """Read the index and check (local) or fetch into ``cache_dir`` (remote) every shard."""
        import pyarrow.fs as pafs

        fs, root, local = filesystem(uri)
        path = f"{root}/{INDEX_FILE}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise StoreError(f"no token store at {uri} (no {INDEX_FILE}); build it by running "
                             "with the corpus it was made from (data.corpus)")
        with fs.open_input_stream(path) as f:
            index = json.loads(f.read())
        if index.get("store_version") != STORE_VERSION:
            raise StoreError(f"the store at {uri} has version {index.get('store_version')}, "
                             f"this code reads {STORE_VERSION}; rebuild it")
        itemsize = np.dtype(_DTYPES[index["token_dtype"]][0]).itemsize
        entries = [e for r in index["shards"] for e in r["splits"].values()]
        if local:
            _check_local(fs, root, entries, index, itemsize, Path(cache_dir))
            return cls(normalize(uri), index, Path(root))
        where = Path(cache_dir) / "store-cache" / _hash(normalize(uri))
        for entry in entries:
            _fetch(fs, f"{root}/{entry['file']}", where / entry["file"], entry,
                   index["checksum"], itemsize)
        return cls(normalize(uri), index, where)

    def arrays(self, split: str) -> list[np.ndarray]:
        """The split's shards, memory-mapped, in order (empty shards left out)."""
        out = []
        for receipt in self.index["shards"]:
            entry = receipt["splits"][split]
            if entry["tokens"]:
                out.append(np.memmap(self.root / entry["file"], dtype=self.dtype, mode="r"))
        return out

    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.root / TOKENIZER_FILE)) if (
            self.root / TOKENIZER_FILE).is_file() else Tokenizer.from_str(self._remote_tokenizer())

    def _remote_tokenizer(self) -> str:
        fs, root, _ = filesystem(self.uri)
        with fs.open_input_stream(f"{root}/{TOKENIZER_FILE}") as f:
            return f.read().decode()

    def blocks(self, split: str, seq_len: int, cap_tokens: int = EVAL_TOKENS_CAP) -> torch.Tensor:
        """LongTensor ``(n, seq_len)``: the split's stream packed into blocks, at most
        ``cap_tokens`` tokens of it (validation and test are held in memory)."""
        parts, n = [], 0
        for arr in self.arrays(split):
            take = min(len(arr), cap_tokens - n)
            parts.append(np.asarray(arr[:take], dtype=np.int64))
            n += take
            if n >= cap_tokens:
                break
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        k = len(stream) // seq_len
        return torch.from_numpy(np.ascontiguousarray(stream[: k * seq_len].reshape(k, seq_len)))

    def stream(self, seq_len: int, seed: int = 0, max_tokens: int = 0) -> TokenStream:
        return TokenStream(self.arrays("train"), seq_len, seed, max_tokens)


class TokenStream:
    """Training blocks drawn from the train shards (``np.memmap`` for their lengths and
    files; each block read with ``os.pread``).

    Sample ``j`` (the trainer's global sample index: step ``s``, rank ``r`` and
    micro-batch ``a`` take ``s*B + a*W*b + r*b + [0, b)``) is the block of ``seq_len``
    tokens starting at valid position ``mix(seed, j) mod T``, where the ``T`` valid
    positions are those of every train shard at which a whole block fits. A batch is
    therefore a function of (seed, step, rank) alone, the same after a resume, and only
    its own bytes are read: the process's memory does not grow with the corpus. ``max_tokens`` > 0 keeps the first
    ``max_tokens`` train tokens (``data.max_train_tokens``).
    """

    def __init__(self, arrays: list[np.ndarray], seq_len: int, seed: int = 0,
                 max_tokens: int = 0) -> None:
        if max_tokens:
            kept, n = [], 0
            for a in arrays:
                kept.append(a[: max_tokens - n])
                n += len(kept[-1])
                if n >= max_tokens:
                    break
            arrays = kept
        self.arrays, self.seq_len, self.seed = arrays, seq_len, seed
        valid = np.array([max(0, len(a) - seq_len + 1) for a in arrays] or [0], np.int64)
        self.cum = np.cumsum(valid)
        self.first = self.cum - valid  # the first valid position of each shard
        self.total = int(self.cum[-1])
        self.n_tokens = int(sum(len(a) for a in arrays))
        if self.total == 0:
            raise StoreError(f"the store's train split holds no block of seq_len {seq_len}; "
                             "lower --seq-len or use a larger corpus")

    def with_seed(self, seed: int) -> TokenStream:
        out = TokenStream.__new__(TokenStream)
        out.__dict__.update(self.__dict__)
        out.seed = seed
        return out

    def rows(self, start: int, count: int) -> torch.Tensor:
        """LongTensor ``(count, seq_len)``: samples ``start .. start + count - 1``."""
        j = np.arange(start, start + count, dtype=np.uint64)
        pos = (_mix(self.seed, 7, j) % np.uint64(self.total)).astype(np.int64)
        shard = np.searchsorted(self.cum, pos, side="right")
        off = pos - self.first[shard]
        out = np.empty((count, self.seq_len), np.int64)
        for s in np.unique(shard).tolist():
            # pread, not the memmap's pages: a fault maps a whole page-cache folio (up to
            # 2 MB) into the process, so random blocks would grow its RSS with the corpus
            arr = self.arrays[s]
            size = arr.dtype.itemsize
            fd = os.open(arr.filename, os.O_RDONLY)
            try:
                for i in np.flatnonzero(shard == s).tolist():
                    data = os.pread(fd, self.seq_len * size, int(off[i]) * size)
                    out[i] = np.frombuffer(data, arr.dtype)
            finally:
                os.close(fd)
        return torch.from_numpy(out)

    def epochs(self, tokens_seen: int) -> float:
        return tokens_seen / max(self.n_tokens, 1)


# --- the bundle a run trains on ----------------------------------------------------------------

def check_tokenizer(index: dict[str, Any], cfg: Any, uri: str) -> None:
    """Refuse a store whose tokenizer is not the one the run asks for."""
    tok, asked = index["tokenizer"], index["settings"]["vocab_size"]
    if tok["name"] == cfg.tokenizer and (cfg.tokenizer != "bpe" or asked == cfg.vocab_size):
        return
    size = f" --vocab-size {asked}" if tok["name"] == "bpe" else ""
    run = f"{cfg.tokenizer} ({cfg.vocab_size} tokens)" if cfg.tokenizer == "bpe" else "gpt2"
    raise StoreError(f"the store at {uri} was built with the {tok['name']} tokenizer "
                     f"({tok['vocab_size']} tokens) but this run asks for {run}; pass "
                     f"--tokenizer {tok['name']}{size}, or use a store built for this tokenizer")


def _pointer(cfg: Any) -> tuple[Any, str]:
    """``(filesystem, path)`` of the note that maps this config's corpus spelling and
    settings to its store (``<store root>/by-corpus/<hash>.json``)."""
    key = _hash({"v": STORE_VERSION, "spec": cfg.corpus, "text_field": cfg.text_field,
                 "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                 "sample": cfg.tokenizer_sample_mb, "seed": getattr(cfg, "split_seed", 0),
                 "fractions": [cfg.val_fraction, cfg.test_fraction],
                 "shard_tokens": cfg.shard_tokens, "dtype": cfg.token_dtype})
    fs, root, _ = filesystem(store_root(cfg))
    return fs, f"{root}/by-corpus/{key}.json"


def _find_or_build(cfg: Any, progress: bool) -> tuple[str, bool]:
    """The store of ``cfg`` and whether it existed. A store built before is found through
    its note, without resolving the corpus again (a node never downloads a Hugging Face
    dataset the driver built the store from); a file corpus's listing must still match."""
    fs, note = _pointer(cfg)
    if _exists(fs, note):
        with fs.open_input_stream(note) as f:
            seen = json.loads(f.read())
        ufs, uroot, _ = filesystem(seen["uri"])
        files = sources.file_identity(cfg.corpus, cfg.text_field)["files"]
        if files == seen["files"] and _exists(ufs, f"{uroot}/{INDEX_FILE}"):
            return seen["uri"], True
    corpus = sources.parse_corpus(cfg.corpus, cfg.text_field)
    uri = store_uri(cfg, corpus)
    ufs, uroot, _ = filesystem(uri)
    hit = _exists(ufs, f"{uroot}/{INDEX_FILE}")
    build_store(cfg, progress, corpus)
    atomic_write(note, json.dumps({"uri": uri, "files": corpus.identity.get("files")}), fs=fs)
    return uri, hit


def load_bundle(cfg: Any, progress: bool = False) -> DataBundle:
    """The :class:`~sedd_ray.data.DataBundle` of a store corpus: ``val``/``test`` blocks
    in memory (at most :data:`EVAL_TOKENS_CAP` tokens each), ``train`` empty and the
    training blocks in ``bundle.stream`` (a :class:`TokenStream`).

    ``data.corpus = "store:URI"`` opens a built store as it is (its tokenizer must be the
    run's); any other store corpus is built first if its store does not exist."""
    spec = cfg.corpus
    if spec.startswith("store:"):
        uri, hit = normalize(spec.removeprefix("store:")), True
    else:
        uri, hit = _find_or_build(cfg, progress)
    store = TokenStore.open(uri, cache_root(cfg))
    index = store.index
    check_tokenizer(index, cfg, uri)
    stream = store.stream(cfg.seq_len, 0, cfg.max_train_tokens)
    held = {s: store.blocks(s, cfg.seq_len) for s in ("val", "test")}
    for s, b in held.items():
        if len(b) == 0:
            raise StoreError(f"the store of {spec} has no {s} block of seq_len {cfg.seq_len} "
                             f"({index['counts'][s]['tokens']} tokens); raise "
                             f"data.{s}_fraction, lower --seq-len or use a larger corpus")
    tok = index["tokenizer"]
    meta = _meta(cfg, store, stream, held, hit)
    return DataBundle(train=torch.zeros((0, cfg.seq_len), dtype=torch.long), val=held["val"],
                      test=held["test"], vocab_size=int(tok["vocab_size"]),
                      eos_id=int(tok["eos_id"]), backend=store.tokenizer(), meta=meta,
                      stream=stream)


def _meta(cfg: Any, store: TokenStore, stream: TokenStream, held: dict[str, torch.Tensor],
          hit: bool) -> dict[str, Any]:
    index, tok = store.index, store.index["tokenizer"]
    counts = index["counts"]
    n_tokens = {"train": stream.n_tokens, **{s: counts[s]["tokens"] for s in held}}
    return {
        "corpus": cfg.corpus, "tokenizer": tok["name"], "tokenizer_source": tok["source"],
        "tokenizer_sha256": tok["sha256"], "vocab_size": tok["vocab_size"],
        "eos_id": tok["eos_id"], "seq_len": cfg.seq_len, "n_tokens": n_tokens,
        "n_blocks": {"train": stream.n_tokens // cfg.seq_len,
                     **{s: int(len(b)) for s, b in held.items()}},
        "n_segments": {s: counts[s]["docs"] for s in SPLITS},
        "n_bytes": {s: counts[s]["bytes"] for s in SPLITS},
        "bytes_per_token": {s: round(counts[s]["bytes"] / max(counts[s]["tokens"], 1), 4)
                            for s in SPLITS},
        "max_train_tokens": cfg.max_train_tokens, "n_documents": sum(
            counts[s]["docs"] for s in SPLITS),
        "split": index["split"], "ranges": None, "true_nll": None,
        "store": store.uri, "store_shards": len(index["shards"]),
        "cache_key": store.uri.rstrip("/").rsplit("/", 1)[-1], "cache_hit": hit,
        "cache_path": str(store.root), "code_version": CODE_VERSION,
    }


# --- the estimate printed before a run or a study --------------------------------------------

GPU_FLOPS = 4e14  # bf16 FLOP/s one GPU sustains on these models (H100 at ~40% utilisation)
REPEAT_WARN_EPOCHS = 4.0


def model_params(model: Any, vocab_size: int) -> int:
    """About how many parameters: 12 h^2 per layer (attention + MLP) and 2 V h (embedding
    and output)."""
    h = model.hidden_size
    return int(model.n_layers * (4 + 2 * model.mlp_ratio) * h * h + 2 * vocab_size * h)


def estimate(cfg: Any, train_tokens: int, vocab_size: int) -> dict[str, float]:
    """Tokens a run of ``cfg`` draws, the epochs of ``train_tokens`` that is, and the
    GPU-hours at :data:`GPU_FLOPS` (6 N D FLOPs)."""
    t = cfg.train
    tokens = t.steps * t.batch_size * cfg.data.seq_len
    params = model_params(cfg.model, vocab_size)
    return {"tokens": tokens, "train_tokens": train_tokens,
            "epochs": tokens / max(train_tokens, 1), "params": params,
            "gpu_hours": 6 * params * tokens / GPU_FLOPS / 3600}


def _human(n: float) -> str:
    """``20480 -> "20.5 k"``, ``2.1e11 -> "210 B"``."""
    for size, unit in ((1e12, " T"), (1e9, " B"), (1e6, " M"), (1e3, " k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def estimate_line(cfg: Any, train_tokens: int, vocab_size: int) -> str:
    """One line: tokens, epochs and GPU-hours of a run of ``cfg``."""
    e = estimate(cfg, train_tokens, vocab_size)
    t = cfg.train
    hours = f"{e['gpu_hours']:,.3g}" if e["gpu_hours"] >= 0.01 else "< 0.01"
    return (f"estimate: {_human(e['tokens'])} tokens ({t.steps:,} steps x {t.batch_size} x "
            f"{cfg.data.seq_len}) = {e['epochs']:.3g} epochs of {_human(train_tokens)} train "
            f"tokens of {cfg.data.corpus}; {_human(e['params'])} parameters, about {hours} "
            f"GPU-hours at {GPU_FLOPS / 1e12:.0f} TFLOP/s")


def repeat_warning(cfg: Any, train_tokens: int) -> str | None:
    """A warning with the numbers when a run would see its data more than
    :data:`REPEAT_WARN_EPOCHS` times, else None."""
    t = cfg.train
    tokens = t.steps * t.batch_size * cfg.data.seq_len
    epochs = tokens / max(train_tokens, 1)
    if epochs <= REPEAT_WARN_EPOCHS:
        return None
    return (f"this run draws {tokens:,} tokens ({t.steps:,} steps x {t.batch_size} x "
            f"{cfg.data.seq_len}) from {train_tokens:,} train tokens of {cfg.data.corpus}: "
            f"{epochs:,.1f} epochs; use a larger corpus or fewer steps")


# --- command line ----------------------------------------------------------------------------

def _smoke_corpus(folder: Path) -> str:
    """A few hundred KB of generated .jsonl for ``--smoke-test``."""
    import random

    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(2):
        lines = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 200)))})
                 for _ in range(300)]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{folder}/*.jsonl"


def main(argv: list[str] | None = None) -> int:
    """``python -m sedd_ray.store``: build (or find) the store of a config and print where
    it is and the one-line estimate of a run on it. ``--address auto``: on a running Ray
    cluster, with a cloud ``data.store_dir``, the shards are Ray tasks."""
    import argparse
    import tempfile

    from sedd_ray.config import ConfigError
    from sedd_ray.train import add_config_flags, config_from_args

    parser = argparse.ArgumentParser(prog="python -m sedd_ray.store", description=main.__doc__)
    add_config_flags(parser)
    parser.add_argument("--address", default=None, help="a Ray cluster to build on (auto, ...)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = config_from_args(args)
            if args.smoke_test:
                cfg.data.corpus = _smoke_corpus(Path(tmp) / "corpus")
                cfg.data.cache_dir = cfg.data.cache_dir or str(Path(tmp) / "cache")
                cfg.data.shard_tokens, cfg.data.vocab_size = 20_000, 300
            if cfg.data.corpus.partition(":")[0] not in sources.KINDS:
                raise ConfigError(f"data.corpus {cfg.data.corpus!r} is not a store corpus; pass "
                                  f"--corpus with one of {', '.join(k + ':...' for k in sources.KINDS)}")
            if args.address:
                import ray

                ray.init(address=args.address)
            bundle = load_bundle(cfg.data, progress=True)
        except (ConfigError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"store: {bundle.meta['store']} ({bundle.meta['store_shards']} shards, "
              f"{bundle.meta['n_tokens']['train']:,} train tokens)")
        print(estimate_line(cfg, bundle.meta["n_tokens"]["train"], bundle.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
