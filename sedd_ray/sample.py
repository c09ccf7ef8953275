"""CLI: generate text from a trained checkpoint, found through the study's Parquet.

    python -m sedd_ray.sample --trial best                      # the one study under ./results
    python -m sedd_ray.sample --study graph-ablation --trial 3f2a_00001 --steps 256
    python -m sedd_ray.sample --checkpoint runs/x/checkpoints/ckpt-00000200 \\
        --prefix "ROMEO:" --suffix "." --length 64 --jsonl samples.jsonl

Loads the EMA weights (checksummed, ``weights_only=True``) and the tokenizer saved in
the checkpoint, so no corpus or hub is needed. Deterministic for a fixed ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sedd_ray import checkpoint as ckpt
from sedd_ray.config import ConfigError, RunConfig


@dataclass
class LoadedModel:
    """A checkpoint ready to sample from: EMA model, graph, noise, tokenizer, config."""

    model: torch.nn.Module
    graph: Any
    noise: Any
    tokenizer: Any
    cfg: RunConfig
    step: int
    path: Path

    @torch.no_grad()
    def generate(self, *, num_samples: int = 4, length: int = 128, steps: int = 128,
                 predictor: str = "analytic", seed: int = 0, prefix: str = "", suffix: str = "",
                 progress: bool = False) -> list[str]:
        from sedd_ray.diffusion import conditioning_from_prefix_suffix, sample

        if length > self.cfg.model.max_seq_len:
            raise ValueError(f"--length {length} exceeds the model's max_seq_len "
                             f"{self.cfg.model.max_seq_len}")
        device = next(self.model.parameters()).device
        pre = self._encode(prefix)
        suf = self._encode(suffix)
        if len(pre) + len(suf) > length:
            raise ValueError(f"--prefix and --suffix take {len(pre) + len(suf)} tokens, more than "
                             f"--length {length}; shorten them or raise --length")
        fixed_mask = fixed_tokens = None
        if pre or suf:
            fixed_mask, fixed_tokens = conditioning_from_prefix_suffix(pre, suf, length, num_samples)
            fixed_mask, fixed_tokens = fixed_mask.to(device), fixed_tokens.to(device)
        g = torch.Generator(device=device).manual_seed(seed)

        def score_fn(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
            return self.model(x, sigma_bar).float().exp()

        x = sample(score_fn, self.graph, self.noise, batch=num_samples, length=length, steps=steps,
                   predictor=predictor, denoise=True, eps=self.cfg.diffusion.sampling_eps,
                   generator=g, device=device, fixed_mask=fixed_mask, fixed_tokens=fixed_tokens,
                   progress=progress)
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False) for row in x.cpu()]

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint directory for sampling; raises CheckpointError with the reason."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from sedd_ray.diffusion import get_graph, get_noise
    from sedd_ray.model import ScoreModel
    from sedd_ray.trainer import TOKENIZER_FILE

    path = Path(path)
    state, meta = ckpt.load_checkpoint(path, map_location=device)
    try:
        cfg = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path} has no usable config: {e}") from None
    tok_path = path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ckpt.CheckpointError(f"checkpoint {path} has no {TOKENIZER_FILE}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_path.read_text()),
                                        eos_token="<|endoftext|>")
    vocab = int(meta["vocab_size"])
    if len(tokenizer) != vocab:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: tokenizer has {len(tokenizer)} tokens but the model was trained "
            f"with vocab_size {vocab}"
        )
    graph = get_graph(cfg.diffusion.graph, vocab_size=vocab)
    d = cfg.diffusion
    noise = (get_noise("geometric", sigma_min=d.sigma_min, sigma_max=d.sigma_max)
             if d.noise == "geometric" else get_noise(d.noise))
    model = ScoreModel(cfg.model, graph)
    model.load_state_dict(state["ema"])
    model.to(device).eval()
    return LoadedModel(model, graph, noise, tokenizer, cfg, int(meta["step"]), path)


def resolve_checkpoint(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """The checkpoint to load from ``--checkpoint`` or ``--trial``/``--study``/``--storage``."""
    if args.checkpoint:
        return args.checkpoint, None
    from sedd_ray.results import best_trial, get_trial, resolve_study

    study = resolve_study(args.storage, args.study)
    row = best_trial(args.storage, study) if args.trial == "best" else get_trial(args.storage, study, args.trial)
    path = row.get("checkpoint_path")
    if not path:
        raise ckpt.CheckpointError(f"trial {row['trial_id']} of study {study!r} has no checkpoint")
    return path, row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sedd_ray.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", default="best", help="'best' (lowest val_nll) or a trial id")
    p.add_argument("--study", default=None, help="study name (optional if only one)")
    p.add_argument("--storage", default="results", help="results folder or URI (default ./results)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (skips Parquet)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--predictor", default="analytic", help="analytic or euler")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=None, help="tokens (default: the training seq_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="")
    p.add_argument("--suffix", default="")
    p.add_argument("--jsonl", default=None, help="also write the samples as JSON lines")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke-test", action="store_true", help="4 steps, 2 short samples")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.steps, args.num_samples, args.length = 4, 2, args.length or 16
    for name in ("steps", "num_samples"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from sedd_ray.diffusion import PREDICTORS
    from sedd_ray.results import ResultsError

    try:
        PREDICTORS.get(args.predictor)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        path, row = resolve_checkpoint(args)
        loaded = load_model(path, device)
        length = args.length or loaded.cfg.data.seq_len
        texts = loaded.generate(num_samples=args.num_samples, length=length, steps=args.steps,
                                predictor=args.predictor, seed=args.seed, prefix=args.prefix,
                                suffix=args.suffix, progress=True)
    except (ResultsError, ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = f"trial {row['trial_id']} " if row else ""
    print(f"# {where}checkpoint {path} (step {loaded.step}, {loaded.cfg.diffusion.graph}/"
          f"{loaded.cfg.diffusion.noise}), {args.predictor} x {args.steps} steps, seed {args.seed}")
    for i, t in enumerate(texts):
        print(f"--- sample {i} ---\n{t}")
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"index": i, "seed": args.seed, "checkpoint": str(path),
                                    "text": t}) + "\n")
        print(f"wrote {args.jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
