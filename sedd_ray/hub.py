"""Pretrained SEDD models in Hub-style folders: the official checkpoints and our exports.

    from sedd_ray.model import ScoreModel
    pre = ScoreModel.from_pretrained("louaaron/sedd-small")   # or a local folder
    model, graph, noise = pre                                   # like the official load_model
    log_score = model(x_t, sigma_bar)                           # (B, L) , (B,) -> (B, L, dim)
    pre.tokenizer_name, pre.tokenizer, pre.config               # "gpt2", tokenizers.Tokenizer, RunConfig

Two folder formats, told apart by ``config.json``:

- **official** (``louaaron/sedd-small``, ``louaaron/sedd-medium``; written by the SEDD repo's
  ``PyTorchModelHubMixin``): ``config.json`` is the training run's whole config (``tokens``,
  ``graph``, ``noise``, ``model``, ...); the weights are ``model.safetensors`` or the older
  ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``: never unpickles code).
  Keys and computation are mapped as ``docs/official_checkpoints.md`` explains.
- **sedd-ray** (written by :mod:`sedd_ray.export`): ``config.json`` holds
  ``"format": "sedd-ray"``, the config sections that rebuild model, graph and noise, the
  vocabulary size and the tokenizer identity; ``model.safetensors`` holds our own key names
  (the EMA weights); ``tokenizer.json`` the tokenizer.

Every file is checked before a weight is copied: an unknown config field, a missing or
extra weight, a wrong shape or an unreadable (truncated) weights file raises
:class:`HubError` with one line naming it. A Hub id is fetched with ``huggingface_hub``
(its cache works offline); offline and not cached, one line says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from sedd_ray.checkpoint import CheckpointError
from sedd_ray.config import ConfigError, DataConfig, DiffusionConfig, ModelConfig, RunConfig
from sedd_ray.values import coerce

__all__ = [
    "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "HubError", "Pretrained", "TOKENIZER_FILE",
    "WEIGHTS_FILE", "first_line", "is_hub_id", "is_pretrained_ref", "load_official",
    "load_pretrained", "model_mismatch", "official_key", "pretrained_config", "read_config",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"  # the official mixin's older format
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "sedd-ray"
FORMAT_VERSION = 1
OFFICIAL_TOKENIZER = ("gpt2", 50257)  # every official SEDD model uses GPT-2's BPE
ROTARY_KEY = "rotary_emb.inv_freq"  # official buffer: checked against our rotary, not loaded
ROTARY_BASE = 1e4
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(CheckpointError):
    """A pretrained folder or Hub id cannot be loaded; the message is one line saying why."""


@dataclass
class Pretrained:
    """A loaded pretrained model. Unpacks as ``model, graph, noise`` (the official
    ``load_model``'s triple); ``config`` is a :class:`RunConfig` that rebuilds them."""

    model: Any  # ScoreModel, in eval mode
    graph: Any
    noise: Any
    config: RunConfig
    vocab_size: int
    tokenizer_name: str  # "gpt2" | "bpe"
    format: str  # "official" | "sedd-ray"
    path: Path
    step: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # our exports: source and metrics

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.graph, self.noise))

    @cached_property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer``: the folder's ``tokenizer.json``, else GPT-2's."""
        from tokenizers import Tokenizer

        tok_path = self.path / TOKENIZER_FILE
        if tok_path.is_file():
            try:
                return Tokenizer.from_str(tok_path.read_text())
            except Exception as e:  # noqa: BLE001 - the tokenizers error types are not exported
                raise HubError(f"{tok_path}: unreadable tokenizer: {first_line(e)}") from None
        if self.tokenizer_name != "gpt2":
            raise HubError(f"{self.path} has no {TOKENIZER_FILE}")
        from sedd_ray.data import get_tokenizer

        return get_tokenizer("gpt2").backend_tokenizer


# --- where a folder comes from ------------------------------------------------------------


def is_hub_id(text: str) -> bool:
    """``text`` is shaped like a Hugging Face repo id (``owner/name``)."""
    return bool(_HUB_ID.match(text))


def is_pretrained_ref(ref: str | os.PathLike) -> bool:
    """True for a local folder holding ``config.json`` (and no checkpoint ``meta.json``)
    or, when no such local path exists, a string shaped like a Hub id (``owner/name``)."""
    p = Path(os.path.expanduser(os.fspath(ref)))
    if p.is_dir():
        return (p / CONFIG_FILE).is_file() and not (p / "meta.json").is_file()
    return not p.exists() and is_hub_id(os.fspath(ref))


def resolve_folder(ref: str | os.PathLike) -> Path:
    """The local folder of ``ref``: a folder as given, or a Hub id downloaded (or found in
    the ``huggingface_hub`` cache). Raises :class:`HubError` (offline, unknown repo)."""
    p = Path(os.path.expanduser(os.fspath(ref)))
    if p.is_dir():
        return p
    text = os.fspath(ref)
    if p.exists() or not is_hub_id(text):
        raise HubError(f"{text}: no such folder (a pretrained folder holds {CONFIG_FILE})")
    return _download(text)


def _download(repo_id: str) -> Path:
    """The snapshot folder of a Hub repo: its config, tokenizer and card, then
    ``model.safetensors``, or ``pytorch_model.bin`` only where there is no safetensors."""
    from huggingface_hub import constants, snapshot_download

    small = [CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", "README.md"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*small, WEIGHTS_FILE]))
        if not (folder / WEIGHTS_FILE).is_file():
            folder = Path(snapshot_download(repo_id, allow_patterns=[*small, PICKLE_WEIGHTS_FILE]))
        return folder
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, network: all one line
        if constants.HF_HUB_OFFLINE or type(e).__name__ in (
                "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise HubError(
                f"{repo_id}: not a local folder, and the Hugging Face Hub is unreachable "
                "(offline, not in the cache); on a machine with internet run `hf download "
                f"{repo_id} --local-dir DIR` and pass DIR") from None
        raise HubError(f"{repo_id}: cannot fetch it from the Hugging Face Hub: "
                       f"{first_line(e)}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0]


# --- config.json ----------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; :class:`HubError` if missing or not a JSON object."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise HubError(f"{folder} has no {CONFIG_FILE}: not a pretrained model folder")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HubError(f"{path}: not valid JSON: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise HubError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# Official config.json: the fields read (name -> type, default; None = required) per
# section, and the top-level sections that do not change the function (training only).
_OFFICIAL_FIELDS: dict[str, dict[str, tuple[type, Any]]] = {
    "model": {"hidden_size": (int, None), "cond_dim": (int, None), "n_blocks": (int, None),
              "n_heads": (int, None), "scale_by_sigma": (bool, None), "length": (int, 1024),
              "dropout": (float, 0.1), "name": (str, "official"), "type": (str, "ddit")},
    "graph": {"type": (str, None), "file": (str, ""), "report_all": (bool, False)},
    "noise": {"type": (str, None), "sigma_min": (float, 1e-4), "sigma_max": (float, 20.0)},
}
_OFFICIAL_IGNORED = ("ngpus", "training", "data", "sampling", "eval", "optim", "hydra")


def _official_section(cfg: Mapping[str, Any], section: str, where: Path) -> dict[str, Any]:
    spec = _OFFICIAL_FIELDS[section]
    given = cfg.get(section)
    if not isinstance(given, Mapping):
        raise HubError(f"{where}: official config needs a {section!r} section")
    for key in given:
        if key not in spec:
            raise HubError(f"{where}: unknown config field {section}.{key} (known: "
                           f"{', '.join(spec)})")
    out = {}
    for key, (typ, default) in spec.items():
        if key not in given and default is None:
            raise HubError(f"{where}: missing config field {section}.{key}")
        out[key] = coerce(given.get(key, default), typ, f"{where}: {section}.{key}", HubError)
    return out


def official_run_config(cfg: Mapping[str, Any], where: Path) -> RunConfig:
    """The :class:`RunConfig` of an official ``config.json`` (see the module docstring)."""
    for key in cfg:
        if key not in _OFFICIAL_FIELDS and key != "tokens" and key not in _OFFICIAL_IGNORED:
            raise HubError(f"{where}: unknown config field {key!r} (read: tokens, "
                           f"{', '.join(_OFFICIAL_FIELDS)}; ignored: {', '.join(_OFFICIAL_IGNORED)})")
    m, g, n = (_official_section(cfg, s, where) for s in ("model", "graph", "noise"))
    tokens = coerce(cfg.get("tokens"), int, f"{where}: tokens", HubError)
    if tokens != OFFICIAL_TOKENIZER[1]:
        raise HubError(f"{where}: tokens={tokens}, but the official SEDD models use the GPT-2 "
                       f"tokenizer ({OFFICIAL_TOKENIZER[1]} tokens)")
    if m["type"] != "ddit":
        raise HubError(f"{where}: model.type {m['type']!r} is not the DDiT transformer ('ddit')")
    if g["type"] not in ("absorb", "uniform"):
        raise HubError(f"{where}: graph.type {g['type']!r} must be absorb or uniform")
    if m["scale_by_sigma"] and g["type"] != "absorb":
        raise HubError(f"{where}: model.scale_by_sigma with graph.type {g['type']!r}: the "
                       "official model refuses it (absorb only)")
    noise_params = ({"sigma_min": n["sigma_min"], "sigma_max": n["sigma_max"]}
                    if n["type"] == "geometric" else {})
    if n["type"] not in ("geometric", "loglinear"):
        raise HubError(f"{where}: noise.type {n['type']!r} must be geometric or loglinear")
    model = ModelConfig(hidden_size=m["hidden_size"], n_layers=m["n_blocks"],
                        n_heads=m["n_heads"], cond_dim=m["cond_dim"], max_seq_len=m["length"],
                        dropout=m["dropout"], mlp_ratio=4, scale_by_sigma=m["scale_by_sigma"],
                        name=f"sedd-{m['name']}")
    # The official loglinear schedule ignores sigma_min/max: eps = 1e-3, our default.
    return _checked(RunConfig(
        model=model,
        diffusion=DiffusionConfig(graph=g["type"], noise=n["type"], noise_params=noise_params),
        data=DataConfig(corpus="wikitext2", tokenizer="gpt2", vocab_size=tokens,
                        seq_len=m["length"]),
        preset="official"), where)


def _checked(cfg: RunConfig, where: Path) -> RunConfig:
    """``cfg`` with its model, diffusion and data sections validated (what a folder sets)."""
    try:
        cfg.model.validate()
        cfg.diffusion.validate()
        cfg.data.validate()
    except ConfigError as e:
        raise HubError(f"{where}: {e}") from None
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise HubError(f"{where}: data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len "
                       f"{cfg.model.max_seq_len}")
    return cfg


_OURS_TOP = {"format", "format_version", "config", "vocab_size", "tokenizer", "source", "metrics"}
_OURS_SECTIONS = ("model", "diffusion", "data")


def export_run_config(cfg: Mapping[str, Any], where: Path) -> tuple[RunConfig, int]:
    """The :class:`RunConfig` and vocabulary size of one of our exports' ``config.json``."""
    unknown = sorted(set(cfg) - _OURS_TOP)
    if unknown:
        raise HubError(f"{where}: unknown config field {unknown[0]!r} (known: "
                       f"{', '.join(sorted(_OURS_TOP))})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise HubError(f"{where}: format_version {cfg.get('format_version')!r} is not "
                       f"{FORMAT_VERSION}; export it again with this sedd-ray")
    sections = cfg.get("config")
    if not isinstance(sections, Mapping) or set(sections) - set(_OURS_SECTIONS):
        raise HubError(f"{where}: 'config' must hold only {', '.join(_OURS_SECTIONS)}, got "
                       f"{sorted(sections) if isinstance(sections, Mapping) else sections!r}")
    try:
        run = RunConfig.from_dict(sections)
    except ConfigError as e:
        raise HubError(f"{where}: {e}") from None
    vocab = coerce(cfg.get("vocab_size"), int, f"{where}: vocab_size", HubError)
    return _checked(run, where), vocab


# --- weights --------------------------------------------------------------------------------


def official_key(ours: str) -> str:
    """The official SEDD name of one of our ScoreModel's state-dict keys (a bijection).

    ``embed.weight`` <-> ``vocab_embed.embedding``; ``sigma_map.{0,2}.*`` <->
    ``sigma_map.mlp.{0,2}.*``; ``blocks.i.qkv.weight`` <-> ``blocks.i.attn_qkv.weight``;
    ``output_layer.norm.weight`` <-> ``output_layer.norm_final.weight``; every other key
    (norms, attn_out, mlp, adaLN_modulation, output_layer.linear) is the same.
    """
    if ours == "embed.weight":
        return "vocab_embed.embedding"
    if ours.startswith("sigma_map."):
        return "sigma_map.mlp." + ours.removeprefix("sigma_map.")
    if ours.startswith("output_layer.norm."):
        return "output_layer.norm_final." + ours.removeprefix("output_layer.norm.")
    return re.sub(r"^(blocks\.\d+)\.qkv\.", r"\1.attn_qkv.", ours)


def read_weights(folder: Path, allow_pickle_bin: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (or an official ``pytorch_model.bin``), on CPU."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: one line
            raise HubError(f"{path}: not a readable safetensors file (truncated or "
                           f"corrupt?): {first_line(e)}") from None
    path = folder / PICKLE_WEIGHTS_FILE
    if not (allow_pickle_bin and path.is_file()):
        raise HubError(f"{folder} has no {WEIGHTS_FILE}")
    try:  # weights_only: a pickled callable is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError
        raise HubError(f"{path}: refused or unreadable (weights_only=True): "
                       f"{first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HubError(f"{path}: must hold a dict of tensors (a state dict)")
    return state


def match_weights(model: torch.nn.Module, given: Mapping[str, torch.Tensor],
                  name_of: Any, where: Path,
                  extra_checks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``given`` (file key -> tensor) as ``model``'s state dict, each file key used once.

    ``name_of(our_key) -> file key``; ``extra_checks`` (file key -> expected tensor) are
    file keys that must be present and close to the expected value but are not loaded.
    Refuses a missing key, an extra key or a wrong shape, naming it.
    """
    ours, extra_checks = model.state_dict(), extra_checks or {}
    wanted = {name_of(k): k for k in ours}
    if len(wanted) != len(ours) or set(wanted) & set(extra_checks):
        raise AssertionError("the key mapping is not one-to-one")  # a bug here, not bad input
    expected = [*wanted, *extra_checks]
    for key in expected:
        if key not in given:
            raise HubError(f"{where}: missing weight {key!r} ({len(given)} in the file, "
                           f"{len(expected)} expected)")
    for key in given:
        if key not in wanted and key not in extra_checks:
            raise HubError(f"{where}: unexpected weight {key!r} (not part of this model)")
    for key, want in [*((k, ours[v]) for k, v in wanted.items()), *extra_checks.items()]:
        if tuple(given[key].shape) != tuple(want.shape):
            raise HubError(f"{where}: weight {key!r} has shape {tuple(given[key].shape)}, "
                           f"expected {tuple(want.shape)} from {CONFIG_FILE}")
    for key, want in extra_checks.items():
        if not torch.allclose(given[key].float(), want.float(), rtol=1e-5, atol=0):
            raise HubError(f"{where}: {key} is not rotary with base {ROTARY_BASE:g} over "
                           "rotate-half pairs; this model is not the official layout")
    return {v: given[k] for k, v in wanted.items()}


def _rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    head = cfg.hidden_size // cfg.n_heads
    return 1.0 / ROTARY_BASE ** (torch.arange(0, head, 2, dtype=torch.float32) / head)


# --- loading ------------------------------------------------------------------------------


def pretrained_config(ref: str | os.PathLike) -> tuple[RunConfig, int, Path]:
    """``(config, vocab_size, local folder)`` of a pretrained folder or Hub id, reading
    only its ``config.json`` (a Hub id is downloaded whole)."""
    folder = resolve_folder(ref)
    cfg = read_config(folder)
    if cfg.get("format") == FORMAT:
        return (*export_run_config(cfg, folder / CONFIG_FILE), folder)
    run = official_run_config(cfg, folder / CONFIG_FILE)
    return run, run.data.vocab_size, folder


def load_pretrained(ref: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Load an official SEDD folder / Hub id or one of our exports (see the module docstring)."""
    folder = resolve_folder(ref)
    cfg = read_config(folder)
    if cfg.get("format") == FORMAT:
        return _load_export(folder, cfg, device)
    if "format" in cfg:
        raise HubError(f"{folder / CONFIG_FILE}: unknown format {cfg['format']!r} (expected "
                       f"{FORMAT!r} or an official SEDD config)")
    return _load_official(folder, cfg, device)


def load_official(ref: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Load an official SEDD checkpoint folder or Hub id (``louaaron/sedd-small``)."""
    folder = resolve_folder(ref)
    cfg = read_config(folder)
    if "format" in cfg:
        raise HubError(f"{folder}: a {cfg['format']!r} export, not an official SEDD folder; "
                       "use ScoreModel.from_pretrained")
    return _load_official(folder, cfg, device)


def _build(run: RunConfig, vocab: int, state: Mapping[str, torch.Tensor],
           device: str | torch.device) -> tuple[Any, Any, Any]:
    from sedd_ray.model import ScoreModel

    graph = run.diffusion.build_graph(vocab)
    model = ScoreModel(run.model, graph)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), graph, run.diffusion.build_noise()


def _load_official(folder: Path, cfg: Mapping[str, Any], device: str | torch.device) -> Pretrained:
    from sedd_ray.model import ScoreModel

    run = official_run_config(cfg, folder / CONFIG_FILE)
    vocab = run.data.vocab_size
    weights = read_weights(folder, allow_pickle_bin=True)
    with torch.device("meta"):  # shapes only: no memory, no init
        shapes = ScoreModel(run.model, run.diffusion.build_graph(vocab))
    state = match_weights(shapes, weights, official_key, folder,
                          {ROTARY_KEY: _rotary_inv_freq(run.model)})
    model, graph, noise = _build(run, vocab, state, device)
    return Pretrained(model, graph, noise, run, vocab, OFFICIAL_TOKENIZER[0], "official", folder)


def _load_export(folder: Path, cfg: Mapping[str, Any], device: str | torch.device) -> Pretrained:
    from sedd_ray.model import ScoreModel

    run, vocab = export_run_config(cfg, folder / CONFIG_FILE)
    weights = read_weights(folder, allow_pickle_bin=False)
    with torch.device("meta"):
        shapes = ScoreModel(run.model, run.diffusion.build_graph(vocab))
    state = match_weights(shapes, weights, lambda k: k, folder)
    model, graph, noise = _build(run, vocab, state, device)
    source = cfg.get("source") or {}
    info = {"source": source, "metrics": cfg.get("metrics") or {},
            "tokenizer": cfg.get("tokenizer") or {}}
    pre = Pretrained(model, graph, noise, run, vocab, run.data.tokenizer, FORMAT, folder,
                     int(source.get("step") or 0), info)
    if pre.tokenizer.get_vocab_size() != vocab:
        raise HubError(f"{folder}: tokenizer has {pre.tokenizer.get_vocab_size()} tokens but "
                       f"the model has vocab_size {vocab}")
    return pre


# --- fine-tuning from a pretrained folder ---------------------------------------------------

_MUST_MATCH = ("hidden_size", "n_layers", "n_heads", "cond_dim", "mlp_ratio",
               "time_conditioning", "scale_by_sigma")


def model_mismatch(pre: RunConfig, run: RunConfig) -> str | None:
    """Why weights of ``pre`` cannot start ``run`` (architecture or graph differ), or None."""
    for k in _MUST_MATCH:
        a, b = getattr(pre.model, k), getattr(run.model, k)
        if a != b:
            flag = "--" + k.replace("_", "-")
            return (f"its model has {k}={a} but this run's has {b}; pass {flag} {a}"
                    + (" (or --model small/medium for the official sizes)"
                       if k in ("hidden_size", "n_layers") else ""))
    if pre.diffusion.graph != run.diffusion.graph:
        return (f"it was trained on the {pre.diffusion.graph} graph but this run uses "
                f"{run.diffusion.graph}; pass --graph {pre.diffusion.graph}")
    return None


def init_weights(model: torch.nn.Module, ref: str | os.PathLike, run: RunConfig,
                 tokenizer: Any) -> Pretrained:
    """Copy the weights of the pretrained ``ref`` into ``model`` (a ScoreModel of ``run``);
    refuses, with one line, a model that differs (:func:`model_mismatch`) or another
    tokenizer (the same ids must mean the same tokens). ``tokenizer``: the run's
    ``tokenizers.Tokenizer``."""
    pre = load_pretrained(ref)
    why = model_mismatch(pre.config, run)
    if why is None and pre.tokenizer.get_vocab() != tokenizer.get_vocab():
        why = (f"its tokenizer ({pre.tokenizer_name}, {pre.vocab_size} tokens) is not this "
               f"run's ({run.data.tokenizer}, {tokenizer.get_vocab_size()} tokens); train with "
               f"the tokenizer it was trained with (--tokenizer {pre.tokenizer_name})")
    if why is not None:
        raise HubError(f"--init-from {ref}: {why}")
    model.load_state_dict(pre.model.state_dict())
    return pre
