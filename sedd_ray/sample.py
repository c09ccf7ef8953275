"""CLI: generate text from a trained checkpoint, found through the study's Parquet.

    python -m sedd_ray.sample --trial best                      # the one study under ./results
    python -m sedd_ray.sample --study graph-ablation --trial 3f2a_00001 --steps 256
    python -m sedd_ray.sample --checkpoint runs/x/checkpoints/ckpt-00000200 \\
        --prefix "ROMEO:" --suffix "." --length 64 --jsonl samples.jsonl
    python -m sedd_ray.sample --checkpoint louaaron/sedd-small     # or an exported folder

``--trial best`` is the finished trial with the lowest ``val_nll``. Loads the EMA weights
(checksummed, ``weights_only=True``) and the tokenizer saved in the checkpoint, so no
corpus or hub is needed; a pretrained folder (``python -m sedd_ray.export``, an official
SEDD model) or Hub id loads through :mod:`sedd_ray.hub`. ``--prefix``/``--suffix`` pin
the first/last tokens (infilling). Deterministic for a fixed ``--seed`` on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sedd_ray import checkpoint as ckpt
from sedd_ray.config import ConfigError, RunConfig
from sedd_ray.data import decode
from sedd_ray.io import local_path
from sedd_ray.layout import RunLayout, TrainerFiles


@dataclass
class LoadedModel:
    """A checkpoint ready to sample from: EMA model, graph, noise, tokenizer, config."""

    model: torch.nn.Module
    graph: Any
    noise: Any
    tokenizer: Any  # a tokenizers.Tokenizer
    vocab_size: int
    cfg: RunConfig
    step: int
    path: Path

    @torch.no_grad()
    def generate(self, *, num_samples: int = 4, length: int = 128, steps: int = 128,
                 predictor: str = "analytic", seed: int = 0, prefix: str = "", suffix: str = "",
                 progress: bool = False) -> list[str]:
        """``num_samples`` texts of ``length`` tokens; ``prefix``/``suffix`` are pinned."""
        from sedd_ray.diffusion import conditioning_from_prefix_suffix, model_score_fn, sample
        from sedd_ray.trainer import bf16_autocast

        if length < 1:
            raise ValueError(f"--length must be >= 1, got {length}")
        if length > self.cfg.model.max_seq_len:
            raise ValueError(f"--length {length} exceeds the model's max_seq_len "
                             f"{self.cfg.model.max_seq_len}")
        device = next(self.model.parameters()).device
        pre, suf = self.encode(prefix), self.encode(suffix)
        if len(pre) + len(suf) > length:
            what = {(True, False): "--prefix takes", (False, True): "--suffix takes"}.get(
                (bool(pre), bool(suf)), "--prefix and --suffix take")
            raise ValueError(f"{what} {len(pre) + len(suf)} tokens, more than --length "
                             f"{length}; shorten it or raise --length")
        g = torch.Generator(device=device).manual_seed(seed)
        if self.cfg.model.kind != "diffusion":  # the AR reference: ancestral, no infilling
            return self._generate_by_objective(num_samples, length, steps, g, pre, suf)
        fixed_mask = fixed_tokens = None
        if pre or suf:
            fixed_mask, fixed_tokens = conditioning_from_prefix_suffix(pre, suf, length, num_samples)
        # exp(model(x, sigma_bar)), (B, L, dim), in the trained run's precision; a
        # time-independent (RADD) absorbing model skips the network call when no token
        # changed since the last one (same samples).
        score_fn = model_score_fn(self.model,
                                  autocast=bf16_autocast(self.cfg.train.precision, device))
        x = sample(score_fn, self.graph, self.noise, batch=num_samples, length=length, steps=steps,
                   predictor=predictor, denoise=True, eps=self.cfg.diffusion.sampling_eps,
                   generator=g, device=device, fixed_mask=fixed_mask, fixed_tokens=fixed_tokens,
                   progress=progress)
        return [self.decode(row.tolist()) for row in x.cpu()]

    def _generate_by_objective(self, num_samples: int, length: int, steps: int,
                               g: torch.Generator, pre: list[int], suf: list[int]) -> list[str]:
        """Texts from the model kind's own sampler (:mod:`sedd_ray.objective`); the
        autoregressive reference samples token by token and ignores ``steps``."""
        from sedd_ray.objective import build_objective
        from sedd_ray.trainer import bf16_autocast

        if pre or suf:
            raise ValueError(f"--prefix/--suffix need a diffusion model; this checkpoint is "
                             f"model.kind={self.cfg.model.kind}")
        device = next(self.model.parameters()).device
        x = build_objective(self.cfg, self.graph, self.noise).sample(
            self.model, batch=num_samples, length=length, steps=steps, generator=g,
            device=device, autocast=bf16_autocast(self.cfg.train.precision, device))
        return [self.decode(row.tolist()) for row in x.cpu()]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; an id outside the vocabulary (the absorbing mask) shows as [MASK]."""
        return decode(self.tokenizer, ids, self.vocab_size)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint directory for sampling, or a pretrained folder / Hub id (an
    official SEDD model or an export, :mod:`sedd_ray.hub`); raises CheckpointError."""
    from tokenizers import Tokenizer

    from sedd_ray.hub import is_pretrained_ref
    from sedd_ray.objective import build_objective
    from sedd_ray.trainer import TOKENIZER_FILE

    if is_pretrained_ref(path):
        return _load_pretrained(path, device)
    path = Path(path)
    state, meta = ckpt.load_checkpoint(path, map_location=device)
    try:
        cfg = RunConfig.from_dict(meta["config"])
        vocab = int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ckpt.CheckpointError(f"checkpoint {path} has no usable config: {e}") from None
    tok_path = path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ckpt.CheckpointError(f"checkpoint {path} has no {TOKENIZER_FILE}")
    try:
        tokenizer = Tokenizer.from_str(tok_path.read_text())
    except Exception as e:  # noqa: BLE001 - the tokenizers error types are not exported
        raise ckpt.CheckpointError(f"checkpoint {path}: unreadable {TOKENIZER_FILE}: {e}") from None
    if tokenizer.get_vocab_size() != vocab:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
            f"was trained with vocab_size {vocab}"
        )
    graph = cfg.diffusion.build_graph(vocab)
    noise = cfg.diffusion.build_noise()
    model = build_objective(cfg, graph, noise).build_model(cfg.model)  # by model.kind
    if "ema" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path} has no EMA weights")
    try:
        model.load_state_dict(state["ema"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ckpt.CheckpointError(f"checkpoint {path}: weights do not fit its config: {first}") from None
    model.to(device).eval()
    return LoadedModel(model, graph, noise, tokenizer, vocab, cfg, int(meta["step"]), path)


def _load_pretrained(ref: str | Path, device: str | torch.device) -> LoadedModel:
    """A pretrained folder or Hub id (:func:`sedd_ray.hub.load_pretrained`) to sample from."""
    from sedd_ray.hub import load_pretrained

    pre = load_pretrained(ref, device)
    return LoadedModel(pre.model, pre.graph, pre.noise, pre.tokenizer, pre.vocab_size,
                       pre.config, pre.step, pre.path)


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory from ``path``: the checkpoint itself, a folder with
    ``latest.json`` (the trainer's ``checkpoints/``), or a run folder holding one."""
    p = local_path(path)
    if p is None:
        raise ckpt.CheckpointError(
            f"checkpoint {path} is on remote storage; copy it to a local folder and pass "
            "--checkpoint DIR")
    if (p / ckpt.META_FILE).is_file() or not p.is_dir():
        return p  # a checkpoint, or a missing path that load_checkpoint reports
    for root in (p, TrainerFiles(p).checkpoints, RunLayout.at(p).trainer_files().checkpoints):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:
            return latest
    return p


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path | str, dict[str, Any] | None]:
    """The checkpoint to load from ``--checkpoint`` or ``--trial``/``--study``/``--storage``,
    and the trial's Parquet row (None with ``--checkpoint``)."""
    if args.checkpoint:
        from sedd_ray.hub import is_pretrained_ref

        if is_pretrained_ref(args.checkpoint):  # a pretrained folder or a Hub id, as given
            return args.checkpoint, None
        return checkpoint_dir(args.checkpoint), None
    from sedd_ray.results import best_trial, get_trial, resolve_study

    study = resolve_study(args.storage, args.study)
    row = (best_trial(args.storage, study) if args.trial == "best"
           else get_trial(args.storage, study, args.trial))
    path = row.get("checkpoint_path")
    if not path:
        raise ckpt.CheckpointError(
            f"trial {row['trial_id']} of study {study!r} has no checkpoint (status "
            f"{row.get('status')}); pick a finished trial or --trial best")
    return checkpoint_dir(path), row


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke_test:
        args.steps, args.num_samples, args.length = 4, 2, args.length or 16
    for name in ("steps", "num_samples", "length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
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
                                suffix=args.suffix, progress=not args.no_progress)
    except (ResultsError, ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = f"trial {row['trial_id']} of {row['study']}, " if row else ""
    print(f"# {where}checkpoint {path} (step {loaded.step}, {loaded.cfg.diffusion.graph}/"
          f"{loaded.cfg.diffusion.noise}), {args.predictor} x {args.steps} steps, "
          f"length {length}, seed {args.seed}")
    for i, t in enumerate(texts):
        print(f"--- sample {i} ---\n{t}")
    if args.jsonl:
        _write_jsonl(args, texts, length, path, loaded.step, row)
        print(f"wrote {args.jsonl}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sedd_ray.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", default="best", help="'best' (lowest val_nll) or a trial id")
    p.add_argument("--study", default=None, help="study name (optional if only one)")
    p.add_argument("--storage", default="results", help="results folder or URI (default ./results)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint directory, a run folder with latest.json, a pretrained "
                   "folder (sedd_ray.export, official SEDD) or a Hub id such as "
                   "louaaron/sedd-small (skips Parquet)")
    p.add_argument("--steps", type=int, default=128, help="sampling steps (default 128)")
    p.add_argument("--predictor", default="analytic", help="analytic or euler")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=None, help="tokens (default: the training seq_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="", help="text the samples start with")
    p.add_argument("--suffix", default="", help="text the samples end with (infilling)")
    p.add_argument("--jsonl", default=None, help="also write the samples as JSON lines")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--smoke-test", action="store_true", help="4 steps, 2 short samples")
    return p


def _write_jsonl(args: argparse.Namespace, texts: list[str], length: int, path: Path,
                 step: int, row: dict[str, Any] | None) -> None:
    """One JSON line per sample with the settings and the checkpoint that made it."""
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({
                "index": i, "text": t, "seed": args.seed, "steps": args.steps,
                "predictor": args.predictor, "length": length, "prefix": args.prefix,
                "suffix": args.suffix, "checkpoint": str(path), "step": step,
                "study": row["study"] if row else None,
                "trial_id": row["trial_id"] if row else None,
            }) + "\n")


if __name__ == "__main__":
    sys.exit(main())
