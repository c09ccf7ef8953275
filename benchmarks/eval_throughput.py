"""Throughput of ``python -m sedd_ray.evaluate``: bound tokens/s and samples/s.

    python benchmarks/eval_throughput.py                  # CPU, ~1 minute -> benchmarks/EVAL.md
    python benchmarks/eval_throughput.py --device cuda    # GPU (benchmarks/gpu.sh runs it)

A model of the given size is trained for a few steps on a Markov source (throughput does
not depend on the weights), then evaluated through the CLI's own functions
(:func:`sedd_ray.evaluate.bound_rows`, :func:`sedd_ray.evaluate.quality_rows`), in the
precision ``evaluate`` uses (bf16 autocast on GPU). Figures are the median of repeats
after one warm-up:

- bound: ``blocks * seq_len`` evaluated tokens per second, and network tokens/s
  (times ``draws``: each draw is one forward pass over the block);
- samples: samples/s (and tokens/s) of unconditional sampling at ``--steps``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {  # device -> (model size, seq_len, vocab, blocks, draws, samples, steps)
    "cpu": ("tiny", 64, 64, 32, 8, 16, 32),
    "cuda": ("small", 1024, 4096, 64, 16, 64, 128),
}


def _checkpoint(size: str, seq_len: int, vocab: int, out: str, device: str) -> str:
    from sedd_ray.config import apply_params, preset
    from sedd_ray.trainer import train

    cfg = apply_params(preset("tiny"), {
        "model": size, "corpus": f"markov:vocab={vocab},order=1,sharpness=2,blocks=256",
        "seq_len": seq_len, "steps": 2, "batch_size": 2, "eval_every": 2, "ckpt_every": 2,
        "eval_sequences": 2, "test_draws": 0, "sample_count": 0, "progress": False,
        "device": device}).validate()
    return str(train(cfg, out).checkpoint_dir)


def measure(device: str, repeats: int) -> dict:
    import torch

    from sedd_ray import evaluate as ev

    size, seq_len, vocab, blocks, draws, samples, steps = SIZES[device]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(size, seq_len, vocab, tmp, device)
        ref = ev.ModelRef(ckpt)
        loaded = ev.load_for_eval(ref, device)
        corpus = ev.resolve_corpus(f"markov:vocab={vocab},order=1,sharpness=2")
        settings = ev.EvalSettings(blocks=blocks, draws=draws, samples=samples, steps=steps,
                                   batch_size=64)
        bound, sample = [], []
        for i in range(repeats + 1):
            b = ev.bound_rows(ref, loaded, corpus, settings)[0]["wall_time_s"]
            s = ev.quality_rows(ref, loaded, settings, [])[0]["wall_time_s"]
            if i:  # the first is warm-up
                bound.append(b)
                sample.append(s)
        n_params = sum(p.numel() for p in loaded.model.parameters())
    b, s = statistics.median(bound), statistics.median(sample)
    return {"device": device, "model": size, "n_params": n_params, "seq_len": seq_len,
            "vocab": vocab, "blocks": blocks, "draws": draws, "samples": samples,
            "steps": steps, "bound_s": b, "bound_tokens_per_s": blocks * seq_len / b,
            "bound_network_tokens_per_s": blocks * seq_len * draws / b,
            "sample_s": s, "samples_per_s": samples / s,
            "sample_tokens_per_s": samples * seq_len / s, "repeats": repeats,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "when": dt.datetime.now(dt.timezone.utc).isoformat(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "load_average": os.getloadavg()[0]}


def markdown(r: dict) -> str:
    where = r["gpu"] or f"CPU ({r['threads']} threads, {r['machine']})"
    return "\n".join([
        f"## Evaluation throughput on {where}",
        "",
        f"`python benchmarks/eval_throughput.py --device {r['device']}`, {r['when'][:16]} UTC, "
        f"torch {r['torch']}; model `{r['model']}` ({r['n_params']:,} parameters), absorbing "
        f"graph, seq_len {r['seq_len']}, vocabulary {r['vocab']}; median of {r['repeats']}; "
        f"1-minute load average {r['load_average']:.1f} when it finished (a shared machine "
        "is slower: small batches, as sampling uses, suffer most).",
        "",
        "| what | settings | wall (s) | throughput |",
        "|---|---|---:|---:|",
        f"| bound (`nll_bound`) | {r['blocks']} blocks x {r['draws']} draws | {r['bound_s']:.3f} "
        f"| {r['bound_tokens_per_s']:,.0f} evaluated tokens/s "
        f"({r['bound_network_tokens_per_s']:,.0f} network tokens/s) |",
        f"| samples (quality rows) | {r['samples']} samples x {r['steps']} steps, analytic | "
        f"{r['sample_s']:.3f} | {r['samples_per_s']:,.2f} samples/s "
        f"({r['sample_tokens_per_s']:,.0f} tokens/s) |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=sorted(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/EVAL.md, "
                   "EVAL_GPU.md on cuda); a .json beside it")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "benchmarks" / ("EVAL_GPU.md" if args.device == "cuda"
                                                  else "EVAL.md"))
    r = measure(args.device, args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(r))
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
