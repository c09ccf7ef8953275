"""CLI: export a trained trial or checkpoint as a Hub-style model folder.

    python -m sedd_ray.export --trial best OUT_DIR               # the one study under ./results
    python -m sedd_ray.export --study graph-ablation --trial 3f2a_00001 OUT_DIR
    python -m sedd_ray.export --checkpoint runs/x/checkpoints/ckpt-00000200 OUT_DIR
    python -m sedd_ray.export --trial best OUT_DIR --push-to-hub me/sedd-shakespeare
    python -m sedd_ray.export --smoke-test                       # a tiny run, exported, reloaded

OUT_DIR gets ``config.json`` (the model, diffusion and data config sections that rebuild
model, graph and noise; the vocabulary size; the tokenizer's identity; the source and
its metrics), ``model.safetensors`` (the EMA weights: no pickle, no code), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``: ``AutoTokenizer.from_pretrained`` reads
them) and a model card ``README.md`` (config, metrics with standard errors, study and
trial). It is built in a hidden sibling folder, reloaded and compared bit for bit, then
renamed into place. Load it with ``ScoreModel.from_pretrained(OUT_DIR)`` or
``python -m sedd_ray.sample --checkpoint OUT_DIR``; fine-tune with
``python -m sedd_ray.train --init-from OUT_DIR``.

Bad input exits 2 with one ``error:`` line and writes nothing: OUT_DIR exists and is not
empty (``--overwrite`` replaces it), ``--push-to-hub`` without Hugging Face credentials
(``hf auth login`` or ``HF_TOKEN``) or while offline. The token is never written or printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sedd_ray import checkpoint as ckpt
from sedd_ray import hub
from sedd_ray.io import atomic_dir

# Trial columns (and final.json keys) that go into config.json's "metrics" and the card;
# a metric's standard error is the column of the same name with "_stderr".
METRIC_KEYS = ("val_nll_final", "val_nll", "val_nll_best", "best_val_nll", "val_ppl_bound",
               "test_nll", "test_ppl_bound", "true_nll", "bound_gap")
INFO_KEYS = ("step", "tokens_seen", "n_params", "n_params_non_embedding", "data_identity",
             "data_split_seed", "eval_seed", "phase", "replicate_of", "status", "wall_time_s")


class ExportError(ValueError):
    """Bad export arguments (exit 2): the message is one line that says the fix."""


# --- what goes in the folder ----------------------------------------------------------------


def source_info(loaded: Any, row: dict[str, Any] | None) -> tuple[dict, dict]:
    """``(source, metrics)`` of the export: where the weights come from and its numbers.

    From the trial's Parquet row when there is one, else from the run's ``final.json``
    next to the checkpoint (when it is of the same step), else the checkpoint's meta."""
    from sedd_ray.layout import TrainerFiles
    from sedd_ray.results import scrub

    values: dict[str, Any] = dict(row or {})
    if row is not None and isinstance(row.get("extra"), str):  # metrics without a column
        values = {**_extra(row["extra"]), **values}
    if row is None:
        final = TrainerFiles(Path(loaded.path).parent.parent).final
        done = json.loads(final.read_text()) if final.is_file() else {}
        if done.get("step") == loaded.step:
            values = done
        else:
            values = {"best_val_nll": ckpt.read_meta(loaded.path).get("best_val_nll")}
    metrics = {}
    for key in METRIC_KEYS:
        for k in (key, key + "_stderr"):
            v = values.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics[k] = float(v)
    source = {"study": values.get("study"), "trial_id": values.get("trial_id"),
              "checkpoint": Path(loaded.path).name, "step": loaded.step}
    source.update({k: values[k] for k in INFO_KEYS if values.get(k) is not None})
    source["step"] = loaded.step  # the exported weights' step, whatever the row says
    return scrub({k: v for k, v in source.items() if v is not None}), metrics


def _extra(text: str) -> dict[str, Any]:
    try:
        out = json.loads(text)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def config_json(loaded: Any, source: dict[str, Any], metrics: dict[str, Any]) -> dict:
    """The export's ``config.json`` (read back by :func:`sedd_ray.hub.export_run_config`)."""
    cfg = loaded.cfg.to_dict()
    data = {k: cfg["data"][k] for k in ("corpus", "tokenizer", "vocab_size", "seq_len")}
    return {
        "format": hub.FORMAT, "format_version": hub.FORMAT_VERSION,
        "config": {"model": cfg["model"], "diffusion": cfg["diffusion"], "data": data},
        "vocab_size": loaded.vocab_size,
        "tokenizer": {"name": loaded.cfg.data.tokenizer, "file": hub.TOKENIZER_FILE,
                      "vocab_size": loaded.tokenizer.get_vocab_size(),
                      **({"data_identity": source["data_identity"]}
                         if source.get("data_identity") else {})},
        "source": source, "metrics": metrics,
    }


def tokenizer_files(loaded: Any, max_len: int) -> dict[str, str]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` for ``AutoTokenizer``."""
    from sedd_ray.data import EOS

    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
               "clean_up_tokenization_spaces": False}
    if loaded.tokenizer.token_to_id(EOS) is not None:
        tok_cfg["eos_token"] = EOS
    return {hub.TOKENIZER_FILE: loaded.tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(tok_cfg, indent=1) + "\n"}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(conf: dict[str, Any], n_params: int) -> str:
    """The ``README.md`` of an export: what it is, its metrics, how to load it, its config."""
    src, metrics = conf["source"], conf["metrics"]
    d, m = conf["config"]["diffusion"], conf["config"]["model"]
    where = (f"study `{src['study']}`, trial `{src['trial_id']}`" if src.get("study")
             else f"checkpoint `{src['checkpoint']}`")
    lines = ["---", "library_name: sedd-ray",
             "tags: [sedd, discrete-diffusion, score-entropy, text-generation]", "---", "",
             f"# SEDD {m['name']} ({d['graph']} graph, {d['noise']} noise)", "",
             f"A score-entropy discrete diffusion model trained with sedd-ray: {where}, "
             f"step {src['step']}, {n_params:,} parameters, vocabulary "
             f"{conf['vocab_size']} ({conf['tokenizer']['name']} tokenizer).", "",
             "## Metrics", "",
             "Upper bounds on the negative log-likelihood (`*_nll`, nats per token) and on "
             "the perplexity (`*_ppl_bound`); lower is better.", "",
             "| metric | value | stderr |", "|---|---|---|"]
    for k, v in metrics.items():
        if not k.endswith("_stderr"):
            se = metrics.get(k + "_stderr")
            lines.append(f"| {k} | {v:.4f} | {'' if se is None else f'{se:.4f}'} |")
    lines += ["", "## Load", "", "```python", "from sedd_ray.model import ScoreModel",
              'model, graph, noise = ScoreModel.from_pretrained("THIS_FOLDER_OR_REPO")', "```",
              "", "```bash", "python -m sedd_ray.sample --checkpoint THIS_FOLDER_OR_REPO",
              "python -m sedd_ray.train --init-from THIS_FOLDER_OR_REPO ...  # fine-tune", "```",
              "", "## Config", "", "| key | value |", "|---|---|"]
    for section in ("model", "diffusion", "data"):
        for k, v in conf["config"][section].items():
            lines.append(f"| {section}.{k} | {_fmt(json.dumps(v) if isinstance(v, dict) else v)} |")
    lines += [f"| {k} | {_fmt(v)} |" for k, v in src.items()
              if k not in ("study", "trial_id", "checkpoint", "step")]
    return "\n".join(lines) + "\n"


# --- writing -------------------------------------------------------------------------------


def check_target(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an existing non-empty ``out`` (unless ``overwrite``), a file, or a folder
    that holds the checkpoint being exported."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; pick another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it, "
                          "or pick another OUT_DIR")
    if source is not None and out.is_dir() and Path(source).resolve().is_relative_to(out.resolve()):
        raise ExportError(f"{out} holds the checkpoint being exported; pick another OUT_DIR")


def export(loaded: Any, out_dir: str | Path, row: dict[str, Any] | None = None, *,
           overwrite: bool = False) -> Path:
    """Write ``loaded`` (a :class:`sedd_ray.sample.LoadedModel`: its EMA weights) to
    ``out_dir`` atomically; the folder is reloaded and checked bit for bit first."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_target(out, overwrite, loaded.path)
    source, metrics = source_info(loaded, row)
    conf = config_json(loaded, source, metrics)
    state = {k: v.detach().to("cpu").contiguous() for k, v in loaded.model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / hub.WEIGHTS_FILE), metadata={"format": "pt"})
        files = {**tokenizer_files(loaded, loaded.cfg.model.max_seq_len),
                 hub.CONFIG_FILE: json.dumps(conf, indent=1) + "\n",
                 "README.md": model_card(conf, sum(t.numel() for t in state.values()))}
        for name, text in files.items():
            (tmp / name).write_text(text)
        mode = (tmp / "README.md").stat().st_mode & 0o777
        (tmp / hub.WEIGHTS_FILE).chmod(mode)  # safetensors writes it owner-only
        back = hub.load_pretrained(tmp).model.state_dict()
        if back.keys() != state.keys() or not all(torch.equal(back[k], state[k]) for k in state):
            raise hub.HubError(f"{out}: the written weights do not read back identically")

    return atomic_dir(out, write)


# --- the Hub ---------------------------------------------------------------------------------


def check_push(repo: str) -> str:
    """The Hugging Face token for ``--push-to-hub repo``; :class:`ExportError` without one,
    offline, or for a malformed repo id. The token is returned, never shown."""
    from huggingface_hub import constants, get_token

    if not hub.is_hub_id(repo):
        raise ExportError(f"--push-to-hub {repo!r} is not a repo id; use OWNER/NAME")
    token = get_token()
    if not token:
        raise ExportError("--push-to-hub needs Hugging Face credentials: run `hf auth login` "
                          "or set HF_TOKEN; nothing was exported")
    if constants.HF_HUB_OFFLINE:
        raise ExportError("--push-to-hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; "
                          "unset it, or export without --push-to-hub and upload later")
    return token


def push(out: Path, repo: str, token: str, private: bool) -> str:
    """Upload ``out`` to the model repo ``repo`` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    from sedd_ray.results import scrub

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), repo_type="model",
                          commit_message="sedd-ray export")
    except Exception as e:  # noqa: BLE001 - HTTP, auth, network: one line, token removed
        text = scrub(hub.first_line(e)).replace(token, "***")
        raise hub.HubError(f"--push-to-hub {repo}: {text}; the folder is at {out}, push it "
                           "again with `hf upload`") from None
    return str(url)


# --- the CLI -------------------------------------------------------------------------------


def _smoke(out: Path | None, overwrite: bool) -> tuple[Any, Path]:
    """A tiny run trained in a temporary folder, exported to ``out`` (default: temporary)."""
    from sedd_ray.config import preset
    from sedd_ray.sample import load_model
    from sedd_ray.trainer import train

    cfg = preset("smoke")
    cfg.train.steps, cfg.train.progress, cfg.train.sample_count = 4, False, 0
    cfg.train.test_draws = 0
    work = Path(tempfile.mkdtemp(prefix="sedd-export-smoke-"))
    result = train(cfg, work / "run", resume=False)
    loaded = load_model(result.checkpoint_dir)
    return loaded, out or work / "export"


def run(args: argparse.Namespace) -> Path:
    """Resolve the source, export it, push it if asked; raises on any failure."""
    from sedd_ray.sample import load_model, resolve_checkpoint

    out = Path(args.out_dir) if args.out_dir else None
    if out is not None:
        check_target(out, args.overwrite)
    token = check_push(args.push_to_hub) if args.push_to_hub else None
    row = None
    if args.smoke_test:
        loaded, out = _smoke(out, args.overwrite)
    else:
        if out is None:
            raise ExportError("OUT_DIR is required (the folder to write)")
        path, row = resolve_checkpoint(args)
        if hub.is_pretrained_ref(path):
            raise ExportError(f"{path} is already a pretrained folder; copy it instead")
        loaded = load_model(path)
    written = export(loaded, out, row, overwrite=args.overwrite)
    print(f"exported {loaded.path} (step {loaded.step}) to {written}")
    if token is not None:
        print(f"pushed to {push(written, args.push_to_hub, token, args.private)}")
    return written


def main(argv: list[str] | None = None) -> int:
    from sedd_ray.config import ConfigError
    from sedd_ray.results import ResultsError

    args = _parser().parse_args(argv)
    try:
        written = run(args)
        if args.smoke_test:
            pre = hub.load_pretrained(written)
            print(f"smoke test: reloaded {pre.format} folder, {len(pre.model.state_dict())} "
                  f"tensors, vocabulary {pre.vocab_size}")
    except (ExportError, ConfigError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ckpt.CheckpointError, OSError, ValueError) as e:
        print(f"error: {hub.first_line(e)}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sedd_ray.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="the folder to write")
    p.add_argument("--trial", default="best", help="'best' (lowest val_nll) or a trial id")
    p.add_argument("--study", default=None, help="study name (optional if only one)")
    p.add_argument("--storage", default="results", help="results folder or URI (default ./results)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint directory, or a run folder with latest.json (skips Parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="also upload the folder to this Hugging Face model repo (OWNER/NAME)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--smoke-test", action="store_true",
                   help="export a tiny run trained on the spot (to OUT_DIR or a temp folder)")
    return p


if __name__ == "__main__":
    sys.exit(main())
