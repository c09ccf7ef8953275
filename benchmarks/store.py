"""Token store benchmarks; writes benchmarks/STORE.md (+ STORE.json) and a section of RESULTS.md.

    python benchmarks/store.py                 # ~10 min on 2 cores, ~2.5 GB of disk (deleted)
    python benchmarks/store.py --text-mb 20 --big-tokens 100_000_000   # a quick look

1. Tokenization throughput: a generated corpus of ``--text-mb`` MB of English-like text
   in ``.jsonl`` files, built into a store with the GPT-2 tokenizer by 1 and by 2 worker
   processes (``data.tokenize_workers``); tokens/s of the whole build (reading,
   tokenizing, writing shards and checksums).
2. Memory: a store of ``--big-tokens`` random uint16 tokens (shards written directly, no
   text) against one of 10 M tokens; the trainer's peak RSS (VmHWM) training from each
   (tiny model, ``store:PATH`` corpus), each in its own process; and the time from the
   process's launch to the end of its first training step.

Run it under the shared lock (``flock /tmp/sedd-ray-tests.lock ...``); it checks free
disk space first and deletes everything it generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from run import peak_rss_mb, process_started_at  # noqa: E402  (benchmarks/run.py)

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his "
         "from at which but have an they you were her she there one all we their time "
         "people year way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question "
         "work government number night point home water room mother area money story fact "
         "month lot right study book eye job word business issue side kind head house").split()
VOCAB = 4096  # the random stores' vocabulary (a BPE of this size is their tokenizer)


def gen_corpus(root: Path, mb: int) -> int:
    """``mb`` MB of .jsonl documents (random English words, 50-800 words each)."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    written, f_i = 0, 0
    while written < mb << 20:
        lines = []
        for _ in range(2000):
            n = rng.randint(50, 800)
            words = rng.choices(WORDS, k=n)
            text = " ".join(words).capitalize() + "."
            lines.append(json.dumps({"text": text}) + "\n")
        data = "".join(lines)
        (root / f"part-{f_i:04d}.jsonl").write_text(data)
        written += len(data)
        f_i += 1
    return written


def child_build(a: dict[str, Any]) -> dict[str, Any]:
    from sedd_ray.config import DataConfig
    from sedd_ray.store import TokenStore, build_store

    cfg = DataConfig(corpus=f"jsonl:{a['corpus']}/*.jsonl", tokenizer="gpt2",
                     shard_tokens=a["shard_tokens"], tokenize_workers=a["workers"],
                     store_dir=a["store_dir"], cache_dir=a["cache"])
    t0 = time.perf_counter()
    uri = build_store(cfg)
    seconds = time.perf_counter() - t0
    index = TokenStore.open(uri, a["cache"]).index
    tokens = sum(c["tokens"] for c in index["counts"].values())
    nbytes = sum(c["bytes"] for c in index["counts"].values())
    return {"workers": a["workers"], "seconds": seconds, "tokens": tokens, "bytes": nbytes,
            "tokens_per_s": tokens / seconds, "mb_per_s": nbytes / 2**20 / seconds,
            "shards": len(index["shards"]), "build_seconds": index["build_seconds"]}


def write_random_store(root: Path, train_tokens: int, shard_tokens: int,
                       held_tokens: int = 1 << 20) -> Path:
    """A valid store of random tokens < VOCAB: index, tokenizer, shards with checksums."""
    import numpy as np
    import xxhash

    from sedd_ray import store as st
    from sedd_ray.data import _train_bpe

    tok = _train_bpe([" ".join(random.Random(i).choices(WORDS, k=2000)) for i in range(200)],
                     VOCAB, False)
    ident = st._tokenizer_identity(tok.to_str(), "bpe", "benchmark")
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / st.TOKENIZER_FILE).write_text(tok.to_str())
    rng = np.random.default_rng(0)
    receipts, left, i = [], train_tokens, 0
    while left > 0:
        n = {"train": min(shard_tokens, left), "val": held_tokens if i == 0 else 0,
             "test": held_tokens if i == 0 else 0}
        splits = {}
        for split, k in n.items():
            arr = rng.integers(0, ident["vocab_size"], k, dtype=np.uint16)
            name = st._shard_file(i, split)
            arr.tofile(root / name)
            splits[split] = {"file": name, "tokens": k, "docs": 0, "bytes": 0,
                             "xxh3_64": xxhash.xxh3_64(arr.tobytes()).hexdigest()}
        receipts.append({"shard": i, "segments": [], "splits": splits})
        left -= n["train"]
        i += 1
    counts = {s: {"tokens": sum(r["splits"][s]["tokens"] for r in receipts), "docs": 0,
                  "bytes": 0} for s in ("train", "val", "test")}
    settings = {"v": st.STORE_VERSION, "tokenizer": "bpe", "vocab_size": VOCAB}
    index = {"store_version": st.STORE_VERSION, "code_version": 0, "corpus": {},
             "identity": {}, "settings": settings, "split": {"method": "random"},
             "tokenizer": ident, "token_dtype": "uint16", "checksum": "xxh3_64",
             "counts": counts, "shards": receipts, "build_seconds": {}, "reused_shards": 0}
    (root / st.INDEX_FILE).write_text(json.dumps(index))
    return root


def child_train(a: dict[str, Any]) -> dict[str, Any]:
    """Train the tiny model from ``store:PATH``: peak RSS, launch -> first step."""
    launched = process_started_at()
    import torch

    from sedd_ray.config import apply_params, preset
    from sedd_ray.trainer import train

    torch.set_num_threads(1)
    cfg = apply_params(preset("tiny"), {
        "corpus": f"store:{a['store']}", "vocab_size": VOCAB, "seq_len": 128, "batch_size": 8,
        "steps": a["steps"], "log_every": 1, "report_every_s": 0.0, "eval_every": a["steps"],
        "ckpt_every": 0, "eval_sequences": 8, "test_draws": 0, "sample_count": 0,
        "progress": False, "cache_dir": a["cache"]}).validate()
    first: list[float] = []
    result = train(cfg, a["out"], lambda m, c: first.append(time.time()) if not first else None)
    return {"store_tokens": result.data_meta["n_tokens"]["train"], "peak_rss_mb": peak_rss_mb(),
            "launch_to_first_step_s": first[0] - launched, "steps": result.step}


CHILDREN = {"build": child_build, "train": child_train}


def run_child(kind: str, args: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_disk(where: Path, need_gb: float) -> None:
    free = shutil.disk_usage(where).free / 2**30
    if free < need_gb + 5:
        raise SystemExit(f"error: {where} has {free:.1f} GiB free; the benchmark needs "
                         f"{need_gb:.1f} GiB and leaves 5 GiB")
    print(f"disk: {free:.1f} GiB free at {where}, using about {need_gb:.1f} GiB", flush=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cache = str(work / "cache")
    trains = []
    for tokens in (10_000_000, args.big_tokens):
        where = write_random_store(work / f"random-{tokens}", tokens, args.shard_tokens)
        res = run_child("train", {"store": str(where), "steps": args.steps, "cache": cache,
                                  "out": str(work / f"run-{tokens}")})
        print(f"train from {tokens:,} tokens: peak RSS {res['peak_rss_mb']:.0f} MiB, first "
              f"step after {res['launch_to_first_step_s']:.1f} s", flush=True)
        trains.append(res)
        shutil.rmtree(where)
    text = gen_corpus(work / "corpus", args.text_mb)
    print(f"corpus: {text / 2**20:.0f} MB of .jsonl", flush=True)
    builds = []
    for workers in (1, 2):
        res = run_child("build", {"corpus": str(work / "corpus"), "workers": workers,
                                  "shard_tokens": args.shard_tokens, "cache": cache,
                                  "store_dir": str(work / f"stores-{workers}")})
        print(f"build, {workers} process(es): {res['tokens_per_s']:,.0f} tokens/s", flush=True)
        builds.append(res)
        shutil.rmtree(work / f"stores-{workers}")
    return {"text_bytes": text, "builds": builds, "trains": trains}


def render(r: dict[str, Any], meta: dict[str, Any]) -> tuple[str, str]:
    """(STORE.md, the short section for RESULTS.md)."""
    b1, b2 = r["builds"]
    small, big = r["trains"]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    speed = b2["tokens_per_s"] / b1["tokens_per_s"]
    summary = [
        f"- tokenization into the store (GPT-2 tokenizer, {r['text_bytes'] / 2**20:.0f} MB of "
        f"generated .jsonl): **{b1['tokens_per_s']:,.0f} tokens/s** with 1 process, "
        f"**{b2['tokens_per_s']:,.0f} tokens/s** with 2 ({speed:.2f}x; {b1['mb_per_s']:.1f} "
        f"and {b2['mb_per_s']:.1f} MB/s of text).",
        f"- trainer peak RSS from a store of {big['store_tokens'] / 1e9:.2f} B tokens: "
        f"**{big['peak_rss_mb']:.0f} MiB**, against {small['peak_rss_mb']:.0f} MiB from "
        f"{small['store_tokens'] / 1e6:.0f} M tokens: **{ratio:.3f}x** (target within 10%: "
        f"{'met' if ratio <= 1.10 else 'NOT met'}).",
        f"- launch to the end of the first step with the {big['store_tokens'] / 1e9:.2f} B-token "
        f"store: **{big['launch_to_first_step_s']:.1f} s** (10 M tokens: "
        f"{small['launch_to_first_step_s']:.1f} s; every shard's checksum is checked at open).",
    ]
    head = [
        "# Token store benchmarks", "",
        f"Written by `python benchmarks/store.py` on {meta['when']} (took {meta['minutes']:.1f} "
        f"min) on {meta['machine']}; code git {meta['git']}.", "",
        "Each measurement ran in its own process; peak RSS is that process's VmHWM. The "
        "machine's 2 cores were shared with other work, so throughput figures are noisy.", "",
        "## Summary", "", *summary, "",
        "## Builds", "", "| processes | tokens | shards | seconds | tokens/s | MB/s of text |",
        "|---|---|---|---|---|---|",
        *[f"| {b['workers']} | {b['tokens']:,} | {b['shards']} | {b['seconds']:.1f} | "
          f"{b['tokens_per_s']:,.0f} | {b['mb_per_s']:.2f} |" for b in r["builds"]], "",
        "## Training from a store (tiny model, batch 8 x 128, random uint16 tokens)", "",
        "| train tokens | steps | peak RSS (MiB) | launch to first step (s) |", "|---|---|---|---|",
        *[f"| {t['store_tokens']:,} | {t['steps']} | {t['peak_rss_mb']:.0f} | "
          f"{t['launch_to_first_step_s']:.1f} |" for t in r["trains"]], "",
    ]
    section = ["## Token store (benchmarks/store.py)", "",
               "Full tables: [STORE.md](STORE.md).", "", *summary, ""]
    return "\n".join(head), "\n".join(section)


def update_results(section: str) -> None:
    """Add (or replace) the token store section of RESULTS.md; the rest stays."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find("## Token store (benchmarks/store.py)")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n\n" + section)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        print(json.dumps(CHILDREN[argv[1]](json.loads(argv[2]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-mb", type=int, default=200)
    p.add_argument("--big-tokens", type=lambda s: int(s.replace("_", "")), default=1_000_000_000)
    p.add_argument("--shard-tokens", type=int, default=1 << 24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--out", default=str(HERE / "STORE.md"))
    args = p.parse_args(argv)
    check_disk(Path(args.dir), args.big_tokens * 2 / 2**30 + args.text_mb * 2 / 1024)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="sedd-store-bench-", dir=args.dir))
    try:
        r = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git,
            "minutes": (time.time() - t0) / 60,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    md, section = render(r, meta)
    Path(args.out).write_text(md)
    Path(args.out).with_suffix(".json").write_text(json.dumps({**r, **meta}, indent=1))
    if Path(args.out) == HERE / "STORE.md":
        update_results(section)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
