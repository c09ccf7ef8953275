"""Analyse a study from its Parquet: a Markdown report that states the answer first.

    python experiments/analyze.py results/graph-ablation          # a study directory
    python experiments/analyze.py --storage results --study noise-ablation-absorb
    python experiments/analyze.py --storage results               # the only study there

Prints the verdict line(s), then writes ``report.md`` and its PNG plots into the study
directory (``--out`` elsewhere):

* first, the verdict of each ablated axis, from :func:`sedd_ray.compare.compare` on the
  replicate trials (all finished trials when the study has no replicate phase), e.g.
  ``absorb beats uniform by 0.62 nats/token (95% CI 0.55 to 0.69; 3 seeds each, paired by
  seed and block) — conclusive`` or ``inconclusive: the CI includes 0; rerun with
  --replicates 6: ...``; a search study states its best config instead;
* an effect table and plot per axis: each level's difference from the reference in
  nats/token with its CI, and the ratio of perplexity bounds;
* a table per ablated axis: mean, standard error and n of each trial's
  ``val_ppl_bound`` per level, and the best trial and config per level (a search study
  gets a table per categorical parameter that varied), with a bar chart;
* learning curves (bound vs training tokens), one panel per level, colour = config (a
  replicate shares the colour of the tuning trial it copies), line style = phase;
* Optuna parameter importances (``optuna.importance.get_param_importances``) over the
  tuning trials, on an Optuna study rebuilt from the Parquet rows;
* for a model-size axis, the bound against parameters and training compute on log-log
  axes with a power-law fit; for synthetic sources (``true_nll``), the bound against the
  true entropy per level;
* a few samples of the best trial, read from the trainer's ``samples.jsonl``;
* with an autoregressive reference (the study ``<study>-ar`` beside it, which
  ``ablate_graph.py --ar-reference`` runs, or ``--ar-reference STUDY``): its exact NLL with
  a CI, drawn as a reference line on the bar chart, and each level's diffusion-to-AR gap
  paired by seed and block, among the verdict lines and in a plot of its own.

Trials of different ``data_identity`` (corpus, split, tokenizer) are refused: one
``error:`` line, exit code 2, nothing written. Older Parquet without ``val_nll_final``,
``phase`` or per-block values is compared on ``val_nll``, all finished trials, by seed.

It reads Parquet only, through :mod:`sedd_ray.results`, and imports neither torch nor
Ray, so it runs anywhere the results are, while a study is still running too.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make `sedd_ray` and `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_ray import results  # noqa: E402
from sedd_ray.compare import (  # noqa: E402
    EVAL_ONLY,
    CompareError,
    Comparison,
    check_data_identity,
    compare,
    comparison_rows,
    t_quantile,
)
from sedd_ray.io import local_path  # noqa: E402
from sedd_ray.layout import StudyLayout, TrainerFiles, ar_reference_study  # noqa: E402
from sedd_ray.optuna_store import optuna_study, write_optuna_plots  # noqa: E402,F401 (Optuna's tools)
from sedd_ray.results import (  # noqa: E402
    FINISHED_STATUSES,
    ResultsError,
    config_columns,
    read_history,
    read_trials,
    resolve_study,
)

REPORT = "report.md"
METRIC = "val_nll"  # what Optuna minimised and best trials are ranked by (nats/token)
# What levels are compared by: the final, high-precision evaluation of each trial; older
# Parquet without it falls back to METRIC (see Study.metric).
FINAL = "val_nll_final"
BOUND = "val_ppl_bound"  # exp(best val_nll): the perplexity upper bound the tables show
# Architecture columns that a model size name sets (not tuned on their own).
ARCH_COLUMNS = ("hidden_size", "n_layers", "n_heads", "cond_dim", "max_seq_len")
NOT_PARAMS = {"seed", "progress", "cache_dir", "device", "wandb", "wandb_project", "preset",
              "compile", "precision"}
MIN_TRIALS_FOR_IMPORTANCE = 3
# Parameters that only act under a condition (as in the studies' search spaces): a trial
# where it fails carries the default, which is not a choice, so it is left out there.
CONDITIONAL = {"sigma_min": ("noise", "geometric"), "sigma_max": ("noise", "geometric")}


# --- loading -------------------------------------------------------------------------------

@dataclass
class Study:
    """The Parquet of one study, plus what the report derives from it."""

    storage: str
    name: str
    trials: pd.DataFrame
    history: pd.DataFrame
    blocks: pd.DataFrame | None = None  # per-block final evaluation (trial_id, block, nll)
    finished: pd.DataFrame = field(init=False)
    params: list[str] = field(init=False)  # config columns that varied (the tuned ones)
    axes: list[str] = field(init=False)  # ablated axis, or the varying categoricals
    metric: str = field(init=False)  # FINAL when the trials have it, else METRIC

    def __post_init__(self) -> None:
        t = self.trials
        ok = t["status"].isin(FINISHED_STATUSES) & np.isfinite(
            pd.to_numeric(t[METRIC], errors="coerce").astype(float))
        self.finished = t[ok].copy()
        self.params = varying_params(self.finished)
        final = pd.to_numeric(self.finished.get(FINAL, pd.Series(dtype=float)), errors="coerce")
        self.metric = FINAL if np.isfinite(final.to_numpy(dtype=float)).any() else METRIC
        axis = _first(t["ablated_axis"].dropna()) if "ablated_axis" in t else None
        if axis:
            self.axes = [axis]
        else:
            self.axes = [p for p in self.params if _is_categorical(self.finished[p])]

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.storage, self.name)

    @property
    def local_dir(self) -> Path | None:
        return local_path(self.layout.dir)


def load_study(storage: str | os.PathLike, study: str | None = None) -> Study:
    """Read a study's trials and history (raises ResultsError when there is none)."""
    storage = os.fspath(storage)
    name = resolve_study(storage, study)
    trials = read_trials(storage, name)
    if "trial_id" in trials:
        trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return Study(storage, name, trials, read_history(storage, name), read_study_blocks(storage, name))


def read_study_blocks(storage: str, name: str) -> pd.DataFrame | None:
    """The per-block values of the trials' final evaluations (``results.read_blocks``), or
    None when this results module or the study has none (older code or Parquet)."""
    read_blocks = getattr(results, "read_blocks", None)
    if read_blocks is None:
        return None
    try:
        blocks = read_blocks(storage, name)
    except (ResultsError, FileNotFoundError):
        return None
    return blocks if blocks is not None and len(blocks) else None


def split_study_dir(path: str | os.PathLike) -> tuple[str, str]:
    """``results/graph-ablation`` -> ``("results", "graph-ablation")`` (URIs too)."""
    text = os.fspath(path).rstrip("/")
    local = local_path(text)
    if local is None:
        storage, _, name = text.rpartition("/")
        return storage, name
    p = local.resolve()
    return str(p.parent), p.name


def _first(values: pd.Series) -> Any:
    return values.iloc[0] if len(values) else None


def _is_categorical(col: pd.Series) -> bool:
    return col.dtype == object or pd.api.types.is_bool_dtype(col) or pd.api.types.is_string_dtype(col)


def varying_params(finished: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between finished trials (seed and run plumbing
    aside; architecture fields aside when the model size name varies)."""
    cols = [c for c in config_columns().values() if c in finished and c not in NOT_PARAMS]
    out = []
    for c in cols:
        if finished.loc[applies_mask(c, finished), c].dropna().astype(str).nunique() > 1:
            out.append(c)
    if "model" in out:
        out = [c for c in out if c not in ARCH_COLUMNS]
    return out


# --- numbers -------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, missing values as a dash."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if abs(int(x)) >= 10_000 else str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if x == 0 or not 1e-3 <= abs(x) < 1e6:
            return f"{x:.{digits}g}"
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
        return f"{round(x, decimals):.{decimals}f}"  # 220, 0.00133: no exponent
    return str(x)


def applies(param: str, row: pd.Series) -> bool:
    """Whether ``param`` acts in this trial (see :data:`CONDITIONAL`)."""
    cond = CONDITIONAL.get(param)
    return cond is None or cond[0] not in row or row[cond[0]] == cond[1]


def applies_mask(param: str, df: pd.DataFrame) -> np.ndarray:
    """Rows of ``df`` where ``param`` acts (a bool array; empty for an empty frame)."""
    return np.array([applies(param, r) for _, r in df.iterrows()], dtype=bool)


def config_text(row: pd.Series, params: Sequence[str], skip: Sequence[str] = ()) -> str:
    parts = [f"{p}={fmt(row[p], 3)}" for p in params if p not in skip and p in row
             and not _missing(row[p]) and applies(p, row)]
    if "seed" in row and not _missing(row["seed"]):
        parts.append(f"seed={fmt(row['seed'])}")
    return ", ".join(parts) or "–"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def levels_of(study: Study, axis: str) -> pd.Series:
    """Each trial's level on ``axis`` (as text): the ``level`` column of an ablation."""
    t = study.trials
    if axis == _first(t["ablated_axis"].dropna()) and t["level"].notna().any():
        return t["level"].fillna(t[axis].astype(str) if axis in t else "?").astype(str)
    return t[axis].astype(str)


def level_order(study: Study, axis: str) -> list[str]:
    levels = levels_of(study, axis)
    order = sorted(dict.fromkeys(levels))
    if axis == "model" and "n_params" in study.trials:  # sizes by parameter count
        size = study.trials.groupby(levels)["n_params"].median()
        order.sort(key=lambda lv: (math.isnan(size.get(lv, math.nan)), size.get(lv, 0)))
    return order


@dataclass
class LevelRow:
    level: str
    n: int
    trials: int
    mean: float
    stderr: float
    best: float
    mean_nll: float
    best_trial: str | None
    best_config: str
    n_params: float = math.nan
    true_nll: float = math.nan


def level_table(study: Study, axis: str) -> list[LevelRow]:
    """One row per level: mean, standard error and n of the trials' best bound."""
    levels = levels_of(study, axis)
    rows = []
    for lv in level_order(study, axis):
        all_rows = study.trials[levels == lv]
        fin = study.finished[levels.loc[study.finished.index] == lv]
        bound = fin[BOUND].astype(float)
        n = len(fin)
        best = fin.loc[fin[METRIC].astype(float).idxmin()] if n else None
        rows.append(LevelRow(
            level=lv, n=n, trials=len(all_rows),
            mean=float(bound.mean()) if n else math.nan,
            stderr=float(bound.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            best=float(bound.min()) if n else math.nan,
            mean_nll=float(fin[METRIC].astype(float).mean()) if n else math.nan,
            best_trial=None if best is None else str(best["trial_id"]),
            best_config="–" if best is None else config_text(best, study.params, skip=[axis]),
            n_params=float(fin["n_params"].median()) if n and "n_params" in fin else math.nan,
            true_nll=float(fin["true_nll"].astype(float).mean())
            if n and "true_nll" in fin and fin["true_nll"].notna().any() else math.nan,
        ))
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def level_markdown(rows: Sequence[LevelRow], axis: str) -> str:
    sizes = [r.n_params for r in rows if math.isfinite(r.n_params)]
    has_params = len(set(sizes)) > 1 and (axis == "model" or max(sizes) > 1.5 * min(sizes))
    has_truth = any(math.isfinite(r.true_nll) for r in rows)
    header = [axis, "n", f"{BOUND} mean", "s.e.", "best", "val_nll mean (nats/token)"]
    header += ["params"] if has_params else []
    header += ["true ppl", "gap (nats)"] if has_truth else []
    header += ["best trial", "best config"]
    body = []
    for r in rows:
        n = f"{r.n}" if r.n == r.trials else f"{r.n} of {r.trials}"
        cells = [r.level, n, fmt(r.mean), fmt(r.stderr, 2), fmt(r.best), fmt(r.mean_nll)]
        cells += [fmt(int(r.n_params)) if math.isfinite(r.n_params) else "–"] if has_params else []
        if has_truth:
            cells += [fmt(math.exp(r.true_nll)) if math.isfinite(r.true_nll) else "–",
                      fmt(r.mean_nll - r.true_nll, 3)]
        cells += [f"`{r.best_trial}`" if r.best_trial else "–", r.best_config]
        body.append(cells)
    return markdown_table(header, body)


# --- plots ---------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless; no display needed
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(ax, which: str = "y") -> None:
    """Log-scale ticks as plain numbers (150, 200) instead of 1.5x10^2, with enough minor
    ticks labelled that a range within a decade or two still has numbers on it."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    ratio = hi / max(lo, 1e-300)
    keep = set(range(2, 10)) if ratio < 10 else {2, 3, 5} if ratio < 100 else set()

    def minor(v: float, _: Any) -> str:
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:.3g}" if mantissa in keep else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _colors(levels: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {lv: cmap(i % 10) for i, lv in enumerate(levels)}


def plot_bars(study: Study, axis: str, rows: Sequence[LevelRow], path: Path,
              ar: ARReference | None = None) -> Path:
    """Mean best bound per level with standard-error bars, every trial as a dot; with
    ``ar``, the AR reference's perplexity as a line with its 95% CI as a band."""
    plt = _plt()
    levels = [r.level for r in rows]
    colors = _colors(levels)
    lv_of = levels_of(study, axis)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.8))
    x = np.arange(len(rows))
    means = [r.mean if math.isfinite(r.mean) else 0.0 for r in rows]
    errs = [r.stderr if math.isfinite(r.stderr) else 0.0 for r in rows]
    ax.bar(x, means, yerr=errs, capsize=6, color=[colors[lv] for lv in levels], alpha=0.6,
           edgecolor="black", linewidth=0.6)
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        vals = study.finished.loc[lv_of.loc[study.finished.index] == r.level, BOUND].astype(float)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, color="black", s=14, zorder=3)
        top = (r.mean if math.isfinite(r.mean) else 0) + errs[i]
        ax.annotate(f"n={r.n}", (i, top), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    finite = [v for v in study.finished[BOUND].astype(float) if math.isfinite(v)]
    if ar is not None and math.isfinite(ar.mean):
        ax.axhline(math.exp(ar.mean), color="black", ls="--", lw=1.2,
                   label=f"AR reference: exp(mean exact NLL) {math.exp(ar.mean):.4g} (n={ar.n}"
                         + (", band: 95% CI)" if math.isfinite(ar.low) else ")"))
        if math.isfinite(ar.low):
            ax.axhspan(math.exp(ar.low), math.exp(ar.high), color="black", alpha=0.12, lw=0)
        finite += [math.exp(ar.low if math.isfinite(ar.low) else ar.mean)]
        ax.legend(fontsize=7, loc="upper left")
    if finite:  # zoom on the values: a bar from zero hides the differences
        lo, hi = min(finite), max(m + e for m, e in zip(means, errs))
        pad = 0.15 * max(hi - lo, 0.02 * hi)
        ax.set_ylim(max(0.0, lo - 2 * pad), hi + 2 * pad)
    ax.set_xticks(x, levels)
    ax.set_xlabel(axis)
    ax.set_ylabel("best val perplexity bound")
    ax.set_title(f"{study.name}: mean ± s.e. over trials", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curve_families(study: Study, axis: str | None) -> pd.DataFrame:
    """One row per trial: its level, phase and config family (a replicate belongs to the
    tuning trial it copies, so both share a colour) with the family's nuisance settings."""
    t = study.trials
    level = levels_of(study, axis) if axis else pd.Series("all", index=t.index)
    phased = "phase" in t and t["phase"].notna().any()  # rows before phases: tuning
    phase = t["phase"].fillna("tune") if phased else pd.Series(None, index=t.index, dtype=object)
    copies = t["replicate_of"] if "replicate_of" in t else pd.Series(None, index=t.index)
    family = copies.where(copies.notna(), t["trial_id"]).astype(str)
    rows = t.set_index("trial_id", drop=False)
    nuisance = [p for p in study.params if p != axis]

    def label(fam: str) -> str:  # the config, not the seed: replicates have their own
        src = rows.loc[fam] if fam in rows.index else None
        parts = [f"{p}={fmt(src[p], 3)}" for p in nuisance if src is not None
                 and not _missing(src[p]) and applies(p, src)]
        return f"{fam}: {', '.join(parts)}" if parts else fam

    out = pd.DataFrame({"trial_id": t["trial_id"].astype(str), "level": level.astype(str),
                        "phase": phase, "family": family, "label": family.map(label)})
    # colours number the families of each level in order of appearance
    out["colour"] = [list(dict.fromkeys(out.loc[out["level"] == lv, "family"])).index(f)
                     for lv, f in zip(out["level"], out["family"])]
    return out.set_index("trial_id")


def plot_curves(study: Study, axis: str | None, path: Path) -> Path | None:
    """Validation bound vs training tokens, one panel per level and one line per trial:
    colour = config (a replicate shares its tuned trial's colour), line style = phase
    (tuning dashed, replicate solid)."""
    h = study.history
    if h.empty or not h["val_nll"].notna().any():
        return None
    plt = _plt()
    fam = curve_families(study, axis)
    order = level_order(study, axis) if axis else ["all"]
    fig, axes = plt.subplots(1, len(order), sharey=True, squeeze=False,
                             figsize=(max(6.4, 0.6 + 3.6 * len(order)), 4.2))
    cmap, labelled = plt.get_cmap("tab10"), set()
    for trial_id, g in h[h["val_nll"].notna()].groupby("trial_id", sort=True):
        if trial_id not in fam.index:  # history of a trial with no row yet
            continue
        info = fam.loc[trial_id]
        ax = axes[0][order.index(info["level"])] if info["level"] in order else axes[0][-1]
        tune = info["phase"] == "tune"
        g = g.sort_values("step")
        x = g["tokens"].astype(float) if g["tokens"].notna().all() else g["step"].astype(float)
        ax.plot(x, np.exp(g["val_nll"].astype(float).clip(upper=700)), "--" if tune else "-",
                marker="o", ms=2.0, lw=1.0 if tune else 1.6, alpha=0.75 if tune else 0.95,
                color=cmap(info["colour"] % 10),
                label=None if info["family"] in labelled else info["label"])
        labelled.add(info["family"])
    _curve_axes(study, axes[0], order, axis, fam)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve_axes(study: Study, axes: Sequence[Any], order: Sequence[str], axis: str | None,
                fam: pd.DataFrame) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    h = study.history
    for ax, lv in zip(axes, order):
        ax.set_yscale("log")
        ax.set_title(f"{axis}={lv}" if axis else study.name, fontsize=9)
        ax.set_xlabel("training tokens" if h["tokens"].notna().any() else "step")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        if fam["phase"].notna().any():
            handles += [Line2D([], [], color="black", ls="--", lw=1.0, label="tune"),
                        Line2D([], [], color="black", ls="-", lw=1.6, label="replicate")]
        if handles:
            ax.legend(handles=handles, fontsize=6, loc="upper right")
    _plain_log_ticks(axes[0], "y")
    axes[0].set_ylabel("val perplexity bound")
    axes[0].figure.suptitle(f"{study.name}: learning curves (colour: config, "
                            "line: phase)" if fam["phase"].notna().any() else
                            f"{study.name}: learning curves (one line per trial; colour: config)",
                            fontsize=9)


def _si(v: float) -> str:
    """1500 -> 1.5k, 2000000 -> 2M (axis labels)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def plot_bound_vs_entropy(study: Study, axis: str, rows: Sequence[LevelRow], path: Path) -> Path:
    """Synthetic sources: each trial's bound (nats/token) next to its source's true entropy."""
    plt = _plt()
    lv_of = levels_of(study, axis)
    colors = _colors([r.level for r in rows])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.8))
    for i, r in enumerate(rows):
        fin = study.finished[lv_of.loc[study.finished.index] == r.level]
        ax.scatter(np.full(len(fin), i), fin[METRIC].astype(float), color=colors[r.level],
                   s=18, zorder=3, edgecolor="black", linewidth=0.4)
        if math.isfinite(r.true_nll):
            ax.hlines(r.true_nll, i - 0.3, i + 0.3, color="black", lw=2,
                      label="true entropy (floor)" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r.level for r in rows])
    ax.set_xlabel(axis)
    ax.set_ylabel("val NLL bound per trial (nats/token)")
    ax.set_title(f"{study.name}: bound vs true entropy", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- scaling (model-size axis) -------------------------------------------------------------

@dataclass
class Fit:
    """``val_nll ≈ a * x**b`` fitted by least squares in log-log space."""

    a: float
    b: float
    points: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.power(x, self.b)

    def text(self, var: str) -> str:
        return f"val_nll ≈ {self.a:.3g} · {var}^{self.b:+.3f} ({self.points} points)"


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if len(np.unique(x[ok])) < 2:
        return None
    b, log_a = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return Fit(float(math.exp(log_a)), float(b), int(ok.sum()))


def scaling_points(study: Study, axis: str) -> pd.DataFrame:
    """The best finished trial of each level with N (non-embedding params when recorded),
    tokens and compute C = 6 N D FLOPs."""
    fin = study.finished.copy()
    if fin.empty:
        return fin
    lv_of = levels_of(study, axis)
    fin["level_"] = lv_of.loc[fin.index]
    n = fin.get("n_params_non_embedding")
    fin["N"] = (n if n is not None and n.notna().all() else fin["n_params"]).astype(float)
    fin["D"] = fin["tokens_seen"].astype(float)
    fin["C"] = 6.0 * fin["N"] * fin["D"]
    best = fin.loc[fin.groupby("level_")[METRIC].idxmin()]
    order = level_order(study, axis)
    return best.set_index("level_").loc[[lv for lv in order if lv in set(best["level_"])]]


def plot_scaling(study: Study, axis: str, best: pd.DataFrame, path: Path
                 ) -> tuple[Path, Fit | None, Fit | None]:
    plt = _plt()
    fin = study.finished
    n = fin.get("n_params_non_embedding")
    all_n = (n if n is not None and n.notna().all() else fin["n_params"]).astype(float)
    all_c = 6.0 * all_n * fin["tokens_seen"].astype(float)
    fits = []
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, x_all, col, label in ((axes[0], all_n, "N", "non-embedding parameters N"),
                                  (axes[1], all_c, "C", "training compute C = 6·N·D (FLOPs)")):
        ax.scatter(x_all, fin[METRIC].astype(float), color="gray", alpha=0.4, s=14,
                   label="every trial")
        ax.scatter(best[col], best[METRIC].astype(float), color="tab:blue", s=30, zorder=3,
                   label=f"best per {axis}")
        for lv, row in best.iterrows():
            ax.annotate(str(lv), (row[col], row[METRIC]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        fit = fit_power_law(best[col], best[METRIC])
        fits.append(fit)
        if fit is not None:
            xs = np.geomspace(float(best[col].min()), float(best[col].max()), 50)
            ax.plot(xs, fit(xs), "--", color="tab:red", label=f"fit: exponent {fit.b:+.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax, "y")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap within a decade
        ax.set_xlabel(label)
        ax.set_ylabel("val NLL bound (nats/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.name}: bound vs size and compute", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, fits[0], fits[1]


# --- the answer: effects of each axis with confidence intervals ----------------------------

@dataclass
class AxisVerdict:
    """The verdict lines of one axis and the comparison behind them (None: no verdict)."""

    axis: str
    lines: list[str]
    comparison: Comparison | None = None


def axis_verdict(s: Study, axis: str) -> AxisVerdict:
    """:func:`sedd_ray.compare.compare` on one ablated axis. A model-size axis is ordered by
    size (the smallest is the reference); other axes keep the study's level order."""
    order = level_order(s, axis) if axis == "model" else None
    try:
        c = compare(s.trials, axis, blocks=s.blocks, metric=s.metric, order=order)
    except CompareError as e:
        return AxisVerdict(axis, [f"no verdict on `{axis}`: {e}"])
    return AxisVerdict(axis, c.lines(), c)


def t_halfwidth(y: np.ndarray) -> float:
    """Half the width of the 95% Student t-interval of the mean of ``y`` (n >= 2)."""
    return t_quantile(0.975, len(y) - 1) * float(np.std(y, ddof=1)) / math.sqrt(len(y))


def search_verdict(s: Study) -> AxisVerdict:
    """A search study compares no levels: its answer is the best config and how sure."""
    rows, which = comparison_rows(s.trials, s.metric)
    if rows.empty:
        return AxisVerdict("search", ["no verdict: no finished trial yet"])
    y = rows[s.metric].astype(float)
    if which == "replicate" and len(y) > 1:
        half = t_halfwidth(y.to_numpy())
        src = ", ".join(f"`{t}`" for t in rows["replicate_of"].dropna().astype(str).unique())
        return AxisVerdict("search", [
            f"best config (replicates of {src or 'the best trial'}): {s.metric} "
            f"{y.mean():.3f} nats/token (95% CI {y.mean() - half:.3f} to {y.mean() + half:.3f}; "
            f"{len(y)} seeds)"])
    best = rows.loc[y.idxmin()]
    se = best.get(f"{s.metric}_stderr")
    se_text = f" ± {se:.3f} evaluation s.e." if se is not None and not _missing(se) else ""
    return AxisVerdict("search", [
        f"search study: best trial `{best['trial_id']}` {s.metric} {float(best[s.metric]):.3f} "
        f"nats/token{se_text}, the minimum over {len(y)} trials (biased low; replicate it "
        "with --replicates 3 to know how sure)"])


def study_verdicts(s: Study) -> list[AxisVerdict]:
    """One verdict per axis studied; refuses trials of different data (CompareError)."""
    check_data_identity(s.finished)
    if s.trials["ablated_axis"].notna().any():
        return [axis_verdict(s, axis) for axis in s.axes]
    return [search_verdict(s)]


def read_verdicts(report: str | os.PathLike) -> list[str]:
    """The verdict lines a report starts with (every line before its title)."""
    lines = []
    for line in Path(report).read_text().splitlines():
        if line.startswith("# "):
            break
        if line.strip():
            lines.append(line)
    return lines


def effect_markdown(c: Comparison) -> str:
    rows = []
    for e in c.effects:
        dec = 4 if max(abs(e.low), abs(e.high)) < 0.01 else 3
        ci = (f"{e.low:+.{dec}f} to {e.high:+.{dec}f}" if math.isfinite(e.low) else "–")
        ratio_ci = (f"{e.ratio_low:.4g} to {e.ratio_high:.4g}" if math.isfinite(e.low) else "–")
        rows.append([e.level, f"{e.diff:+.{dec}f}", ci, f"{e.ratio:.4g}", ratio_ci,
                     f"{e.n_level} / {e.n_reference}", fmt(e.p_value, 2),
                     "yes" if e.conclusive else "no", e.method])
    conf = f"{100 * c.effects[0].confidence:.4g}% CI"
    return markdown_table(
        [c.axis, f"− {c.reference} (nats/token)", conf, "ppl bound ratio", f"ratio {conf}",
         "seeds (level / ref.)", "p" + (" (Bonferroni)" if c.adjustment else ""),
         "conclusive", "method"], rows)


def effect_note(s: Study, c: Comparison) -> str:
    rows = ("the replicate trials (the best tuned config of each level, re-run with fresh "
            "seeds)" if c.rows == "replicate" else "every finished trial (no replicate phase)")
    note = (f"Difference = `{c.metric}` of the level minus that of the reference "
            f"`{c.reference}`, in nats/token (negative: a lower bound, better); ratio = "
            f"exp(difference), the level's perplexity bound over the reference's. Over {rows}. "
            "Intervals from `sedd_ray.compare` (method per row): a t-interval over the "
            "per-seed differences when the seeds pair, Welch's otherwise; they hold seed-to-seed "
            f"spread and evaluation noise. One seed per level: {EVAL_ONLY}.")
    if c.adjustment:
        note += f" {c.adjustment}."
    if s.blocks is None:
        note += " No per-block values recorded: seeds pair, blocks do not."
    return note


def _log_positive(r: np.ndarray) -> np.ndarray:
    """log for the ratio axis's inverse; matplotlib probes it with values <= 0 too."""
    return np.log(np.clip(np.asarray(r, dtype=float), 1e-300, None))


def plot_effects(c: Comparison, path: Path, title: str) -> Path:
    """Each level's difference from the reference with its CI (nats/token, perplexity
    bound ratio on the top axis), one dot per seed's difference, a zero line."""
    plt = _plt()
    from matplotlib.lines import Line2D

    colors = {"conclusive": "tab:green", "inconclusive": "tab:gray",
              "evaluation noise only": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7.2, 2.2 + 0.6 * len(c.effects)))
    ys = np.arange(len(c.effects))[::-1].astype(float)
    xs: list[float] = [0.0]
    for y, e in zip(ys, c.effects):
        kind = ("evaluation noise only" if e.eval_only else
                "conclusive" if e.conclusive else "inconclusive")
        err = [[e.diff - e.low], [e.high - e.diff]] if math.isfinite(e.low) else None
        ax.errorbar([e.diff], [y], xerr=err, fmt="o", ms=7, lw=2.2, capsize=6,
                    color=colors[kind], zorder=2)
        if e.per_seed:
            ax.scatter(e.per_seed, y + np.linspace(-0.08, 0.08, len(e.per_seed)), s=14,
                       color="black", alpha=0.7, zorder=3)
        ax.annotate(f"ppl ×{e.ratio:.3g}" + (f" [{e.ratio_low:.3g}, {e.ratio_high:.3g}]"
                                             if math.isfinite(e.low) else "")
                    + f", n={e.n_level}/{e.n_reference}", (e.diff, y), xytext=(0, 13),
                    textcoords="offset points", ha="center", fontsize=8)
        xs += [v for v in (e.diff, e.low, e.high, *e.per_seed) if math.isfinite(v)]
    lo, hi = min(xs), max(xs)
    pad = 0.12 * (hi - lo or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(ys.min() - 0.6, ys.max() + 0.7)
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(ys, [e.level for e in c.effects])
    ax.set_xlabel(f"{c.metric}: level − {c.reference} (nats/token; < 0 = better)")
    top = ax.secondary_xaxis("top", functions=(np.exp, _log_positive))
    top.set_xlabel(f"perplexity bound ratio (level / {c.reference})", fontsize=8)
    used = dict.fromkeys("evaluation noise only" if e.eval_only else "conclusive"
                         if e.conclusive else "inconclusive" for e in c.effects)
    handles = [Line2D([], [], color=colors[k], marker="o", lw=2, label=k) for k in used]
    if any(e.per_seed for e in c.effects):
        handles.append(Line2D([], [], color="black", marker="o", ms=4, lw=0, label="one seed"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- Optuna importances --------------------------------------------------------------------

def _distribution(values: pd.Series):
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    v = values.dropna()
    if _is_categorical(v):
        return CategoricalDistribution(sorted({_py(x) for x in v}, key=str))
    lo, hi = float(v.min()), float(v.max())
    log = lo > 0 and hi / lo >= 10
    if pd.api.types.is_integer_dtype(v) or all(float(x).is_integer() for x in v):
        return IntDistribution(int(lo), int(hi), log=log and lo >= 1)
    return FloatDistribution(lo, hi, log=log)


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def rebuild_optuna_study(study: Study):
    """An in-memory Optuna study with one COMPLETE trial per finished row (value:
    ``val_nll``); distributions are inferred from the values the trials took."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fin = study.finished
    dists = {p: _distribution(fin.loc[applies_mask(p, fin), p]) for p in study.params}
    ostudy = optuna.create_study(study_name=study.name, direction="minimize")
    for _, row in fin.iterrows():
        params, used = {}, {}
        for p, d in dists.items():
            if _missing(row[p]) or not applies(p, row):
                continue
            v = _py(row[p])
            if isinstance(d, IntDistribution):
                v = int(v)
            elif not isinstance(d, CategoricalDistribution):
                v = float(v)
            params[p], used[p] = v, d
        ostudy.add_trial(create_trial(params=params, distributions=used, value=float(row[METRIC]),
                                      user_attrs={"trial_id": str(row["trial_id"])}))
    return ostudy


def confounded(study: Study) -> list[list[str]]:
    """Groups of parameters that split the finished trials identically (e.g. an ablation
    whose levels drew the same lr and noise for their k-th trial): no evaluator can tell
    their effects apart."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for p in study.params:
        values = [str(v) if applies(p, r) else "<n/a>"
                  for v, (_, r) in zip(study.finished[p], study.finished.iterrows())]
        codes = tuple(pd.factorize(pd.Series(values))[0])
        groups.setdefault(codes, []).append(p)
    return [g for g in groups.values() if len(g) > 1]


def tuning_trials(study: Study) -> tuple[Study, str]:
    """The study seen through its tuning trials (``phase == "tune"``) when it records
    phases, and a word for the notes: replicates re-run one chosen config per level with
    fresh seeds, so they say nothing about which parameters matter."""
    fin = study.finished
    if "phase" not in fin or not fin["phase"].notna().any():
        return study, ""
    view = copy.copy(study)
    view.finished = fin[fin["phase"].fillna("tune") == "tune"]  # rows before phases: tuning
    view.params = varying_params(view.finished)
    return view, " tuning"


def param_importances(study: Study) -> tuple[dict[str, float] | None, str]:
    """Optuna's importances of the varying parameters for ``val_nll`` over the tuning
    trials, and a note saying how they were computed (or why they were not)."""
    study, which = tuning_trials(study)
    n = len(study.finished)
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Too few finished trials for parameter importances ({n}; need at least "
                      f"{MIN_TRIALS_FOR_IMPORTANCE}). Run more trials per level."
                      + (" Only tuning trials count (replicates re-run one config)."
                         if which else ""))
    if not study.params:
        return None, "No parameter varied between finished trials: nothing to rank."
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    # PED-ANOVA (Optuna's default evaluator): which params the top trials are concentrated
    # in. Its default top 10% would hold under 2 trials in a small study: take at least 2.
    q = min(0.5, max(0.1, 2.0 / n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            imp = optuna.importance.get_param_importances(
                rebuild_optuna_study(study),
                evaluator=PedAnovaImportanceEvaluator(target_quantile=q),
            )
        except (ValueError, RuntimeError) as e:
            return None, f"Optuna could not compute importances: {e}"
    note = (f"`optuna.importance.get_param_importances` with `PedAnovaImportanceEvaluator"
            f"(target_quantile={q:.2g})` over {n} finished{which} trials rebuilt from Parquet "
            f"(objective `{METRIC}`, minimised); distributions inferred from the values.")
    tied = confounded(study)
    if tied:
        note += (" These varied together in every trial, so their importances cannot be "
                 "told apart: " + "; ".join(", ".join(f"`{p}`" for p in g) for g in tied) + ".")
    msgs = sorted({str(w.message).splitlines()[0] for w in caught})
    if msgs:
        note += " Optuna warned: " + " ".join(msgs)
    if n < 10:
        note += f" With {n} trials these are rough."
    return dict(imp), note


def plot_importances(imp: dict[str, float], path: Path, title: str) -> Path:
    plt = _plt()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(5.6, 1.4 + 0.35 * len(names)))
    ax.barh(names, [imp[k] for k in names], color="tab:green")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- samples -------------------------------------------------------------------------------

def trial_samples(study: Study, trial_id: str, limit: int = 3) -> list[str]:
    """The last samples the trainer wrote for a trial (samples.jsonl, else final.json)."""
    files = study.layout.trial(trial_id).trainer_files()
    if files is None:
        return []
    rows: list[dict[str, Any]] = []
    path = files.samples
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    if rows:
        last = max(int(r.get("step", 0)) for r in rows)
        return [str(r["text"]) for r in rows if int(r.get("step", 0)) == last][:limit]
    final = files.final
    if final.is_file():
        try:
            return [str(s) for s in json.loads(final.read_text()).get("samples", [])][:limit]
        except json.JSONDecodeError:
            return []
    return []


# --- the report ----------------------------------------------------------------------------

def _status_line(trials: pd.DataFrame) -> str:
    counts = trials["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return str(path)


# --- the autoregressive reference ----------------------------------------------------------

AR_LEVEL = "AR"  # the reference's level in the diffusion-to-AR comparison
MODEL_TYPE = "model_type"  # that comparison's axis: the ablated level, or AR_LEVEL


@dataclass
class ARReference:
    """An ablation's autoregressive reference: its study, its exact NLL (mean and CI over
    its replicate seeds), and each level's gap to it (``comparison``, reference AR)."""

    study: Study
    lines: list[str]
    comparison: Comparison | None = None
    mean: float = math.nan  # nats/token
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    rows: str = ""  # which trials of each study the gaps use


def load_ar_reference(s: Study, name: str | None = None) -> Study | None:
    """The study holding ``s``'s AR reference (default ``<study>-ar`` beside it), or None
    when there is none (a given ``name`` that does not exist raises ResultsError)."""
    if name is None and (name := ar_reference_study(s.name)) not in _studies_in(s.storage):
        return None
    return load_study(s.storage, name)


def _studies_in(storage: str) -> set[str]:
    try:
        return set(results.list_studies(storage))
    except (ResultsError, FileNotFoundError, OSError):
        return set()


def _tagged(frame: pd.DataFrame | None, tag: str) -> pd.DataFrame | None:
    """Trial ids prefixed with ``tag`` (two studies' Tune ids must not collide)."""
    if frame is None:
        return None
    return frame.assign(trial_id=tag + frame["trial_id"].astype(str))


def _kind_column(trials: pd.DataFrame) -> str | None:
    return next((c for c in trials.columns if c in ("kind", "model_kind")), None)


def _ar_headline(ref: Study, y: np.ndarray, replicated: bool) -> tuple[str, float, float]:
    """The AR reference's value: a t-interval over its replicate seeds, or (no
    replicates yet) the mean of its tuning trials, said to be one."""
    mean = float(np.mean(y))
    half = t_halfwidth(y) if replicated and len(y) > 1 else math.nan
    what = f"`{ref.name}`: the same backbone, causal, exact NLL"
    if not replicated:
        return (f"AR reference ({what}; not replicated yet): {mean:.3f} nats/token, the mean of "
                f"{len(y)} tuning trial{'s' * (len(y) != 1)} of different settings (no CI; run "
                "its replicate phase)", mean, half)
    ci = f"95% CI {mean - half:.3f} to {mean + half:.3f}; " if math.isfinite(half) else ""
    return (f"AR reference ({what}): {mean:.3f} nats/token ({ci}{len(y)} "
            f"seed{'s' * (len(y) != 1)})", mean, half)


def ar_reference(s: Study, ref: Study, axis: str) -> ARReference:
    """The AR reference's value and each level of ``axis`` against it. Each study's rows
    are picked on their own (:func:`sedd_ray.compare.comparison_rows`: its replicates
    where it has some), so the headline and the gaps use the same AR trials; pairs are by
    seed and block where seeds and blocks are shared, Welch's interval otherwise."""
    kind = _kind_column(ref.finished)
    kinds = sorted(set(ref.finished[kind].astype(str))) if kind else []
    if kinds and kinds != ["ar"]:
        return ARReference(ref, [f"AR reference `{ref.name}` not shown: its trials are "
                                 f"model.kind {', '.join(kinds)}, not ar"])
    try:  # nats/token of different data do not compare: no value, no line, one reason
        check_data_identity(pd.concat([s.finished, ref.finished]))
    except CompareError as e:
        return ARReference(ref, [f"AR reference `{ref.name}` not shown: {e}"])
    ar_rows, ar_which = comparison_rows(ref.trials, s.metric)
    if ar_rows.empty:
        return ARReference(ref, [f"AR reference `{ref.name}`: no finished trial yet"])
    y = ar_rows[s.metric].astype(float).to_numpy()
    head, mean, half = _ar_headline(ref, y, ar_which == "replicate")
    out = ARReference(ref, [head], None, mean, mean - half, mean + half, len(y))
    rows, which = comparison_rows(s.trials, s.metric)
    levels = levels_of(s, axis)
    combined = pd.concat([rows.assign(**{MODEL_TYPE: levels.loc[rows.index]}),
                          _tagged(ar_rows, "ar/").assign(**{MODEL_TYPE: AR_LEVEL})],
                         ignore_index=True).drop(columns=["level", "ablated_axis", "phase"],
                                                 errors="ignore")
    blocks = [b for b in (s.blocks, _tagged(ref.blocks, "ar/")) if b is not None]
    try:
        c = compare(combined, MODEL_TYPE, blocks=pd.concat(blocks) if blocks else None,
                    metric=s.metric, reference=AR_LEVEL, order=[AR_LEVEL, *level_order(s, axis)])
    except CompareError as e:
        out.lines.append(f"no diffusion-to-AR gap: {e}")
        return out
    note = f" [Bonferroni, {len(c.effects)} comparisons]" if c.adjustment else ""
    word = {"replicate": "replicate", "finished": "tuning"}  # comparison_rows' row sets
    out.rows = ("the replicate trials of both studies" if which == ar_which == "replicate" else
                f"the ablation's {word[which]} trials and the AR reference's {word[ar_which]} "
                "trials")
    if which != ar_which:
        note += f" ({out.rows})"
    out.lines += [f"diffusion-to-AR gap (an upper bound, as the diffusion number is): "
                  f"{e.difference()}{note}" for e in c.effects]
    left = [lv for lv in dict.fromkeys(levels.loc[s.finished.index]) if lv not in c.levels]
    out.lines += [f"no diffusion-to-AR gap for {lv}: it has no finished replicate trial yet"
                  for lv in left]
    out.comparison = c
    return out


def ar_section(s: Study, ar: ARReference, out: Path) -> list[str]:
    """The reference's table of gaps, how they were computed, and the gap plot."""
    md = ["## Autoregressive reference", "", *[f"- {line}" for line in ar.lines], ""]
    c = ar.comparison
    if c is None:
        return md
    p = plot_effects(c, out / "ar_gap.png", f"{s.name}: each level against the AR reference "
                     f"`{ar.study.name}`")
    return md + [effect_markdown(c), "",
                 f"Gap = `{c.metric}` of the level minus the AR reference's exact NLL on the same "
                 "data (one data identity, checked; per-block pairs where both studies recorded "
                 "the same validation blocks), in nats/token; positive: the AR model is better. "
                 "The diffusion number is an upper bound on its NLL, so the gap is an upper bound "
                 f"on the true one. Over {ar.rows}. `ablate_graph.py --ar-reference` gives the AR "
                 "model one level's tuning budget and the levels' replicate seeds. The bar chart "
                 "draws the reference as a line with its 95% CI.", "",
                 f"![diffusion-to-AR gap]({_rel(p, out)})", ""]


def write_report(storage: str | os.PathLike, study: str | None = None,
                 out_dir: str | os.PathLike | None = None,
                 ar_reference_name: str | None = None) -> Path:
    """Analyse a study and write ``report.md`` (and PNGs) into ``out_dir`` (default: the
    study directory, or ``reports/<study>`` for remote storage). Returns the report path.
    The report's first lines are its verdicts (:func:`read_verdicts` reads them back).
    Raises CompareError, writing nothing, for trials of different data identities."""
    s = load_study(storage, study)
    verdicts = study_verdicts(s)  # refuses before anything is written
    ref = load_ar_reference(s, ar_reference_name)
    ar = ar_reference(s, ref, s.axes[0]) if ref is not None and s.axes else None
    out = Path(out_dir) if out_dir else (s.local_dir or Path("reports") / s.name)
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = []
    for v in verdicts:
        md += [line for text in v.lines for line in (text, "")]
    md += [line for text in (ar.lines if ar else []) for line in (text, "")]
    md += header_section(s)
    md += effects_section(s, verdicts, out)
    md += ar_section(s, ar, out) if ar else []
    md += axes_sections(s, out, ar)
    curve_axis = s.axes[0] if s.axes else None
    curves = plot_curves(s, curve_axis, out / "learning_curves.png")
    md += ["## Learning curves", ""]
    md += ([f"![learning curves]({_rel(curves, out)})", ""] if curves
           else ["No evaluation in the history yet.", ""])
    md += ["## Parameter importances", ""]
    imp, note = param_importances(s)
    if imp:
        md += [markdown_table(["parameter", "importance"], [[f"`{k}`", f"{v:.3f}"] for k, v in imp.items()]), ""]
        p = plot_importances(imp, out / "importances.png", f"{s.name}: importance for {METRIC}")
        md += [f"![importances]({_rel(p, out)})", ""]
    md += [note, ""]
    md += samples_section(s)
    errors = s.trials[s.trials["status"] == "error"]
    if len(errors):
        md += ["## Failed trials", "", markdown_table(
            ["trial", "level", "error"],
            [[f"`{r.trial_id}`", r.get("level") or "–", str(r.get("error") or "")[:300]]
             for _, r in errors.iterrows()]), ""]
    path = out / REPORT
    path.write_text("\n".join(md))
    return path


def header_section(s: Study) -> list[str]:
    hours = s.trials["device_hours"].astype(float).sum() if "device_hours" in s.trials else 0.0
    phases = ""
    if "phase" in s.finished and s.finished["phase"].notna().any():
        counts = s.finished["phase"].fillna("?").value_counts()
        order = sorted(counts.index, key=lambda p: (p != "tune", p != "replicate", p))
        phases = " (" + ", ".join(f"{counts[p]} {p}" for p in order) + ")"
    if s.metric == FINAL:
        meaning = (f"`{METRIC}` of a finished trial is its final evaluation (`{FINAL}`: the final "
                   "EMA weights on the study's common validation blocks and time draws, with its "
                   f"standard error); `{BOUND}` = exp(`{METRIC}`)")
    else:
        meaning = f"`{BOUND}` = exp(best validation `{METRIC}`)"
    return [
        f"# Study `{s.name}`", "",
        f"- trials: {len(s.trials)} ({_status_line(s.trials)}); finished with a bound: "
        f"{len(s.finished)}{phases}",
        f"- ablated axis: `{s.axes[0]}`" if s.trials["ablated_axis"].notna().any()
        else "- search study (no ablated axis)",
        "- other parameters that varied: "
        + (", ".join(f"`{p}`" for p in s.params if p not in s.axes) or "none"),
        f"- device hours: {hours:.3g}",
        f"- source: `{s.layout.trials_file}` and `{s.layout.relative(s.layout.history_dir)}/`, read "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"{meaning}, an upper bound on the validation perplexity from the diffusion ELBO (lower "
        "is better)." + ("" if s.metric == FINAL else " Each trial contributes its best "
                         "evaluation (older results: no final evaluation recorded).")
        + " In the level tables, mean and standard error (sample s.d. / √n) are over the n "
        "finished trials of a level, every phase together.",
        "",
    ]


def effects_section(s: Study, verdicts: Sequence[AxisVerdict], out: Path) -> list[str]:
    """Per compared axis: the effect table, how it was computed, and the effect plot."""
    md: list[str] = []
    for v in verdicts:
        c = v.comparison
        if c is None:
            continue
        conf = f"{100 * c.effects[0].confidence:.4g}% CI" + (", Bonferroni" if c.adjustment else "")
        p = plot_effects(c, out / f"{v.axis}_effects.png",
                         f"{s.name}: effect of {v.axis} against {c.reference} ({conf})")
        md += [f"## Effect of `{v.axis}` against `{c.reference}`", "", effect_markdown(c), "",
               effect_note(s, c), "", f"![{v.axis}: effects]({_rel(p, out)})", ""]
    return md


def axes_sections(s: Study, out: Path, ar: ARReference | None = None) -> list[str]:
    """Per axis: the level table, the bar chart, and the axis-specific plots."""
    md: list[str] = ["No trials recorded yet.", ""] if s.trials.empty else []
    for axis in s.axes:
        rows = level_table(s, axis)
        md += [f"## `{axis}`", "", level_markdown(rows, axis), ""]
        if s.finished.empty:
            continue
        bars = plot_bars(s, axis, rows, out / f"{axis}_bars.png",
                         ar if ar is not None and axis == s.axes[0] else None)
        md += [f"![{axis}: bound per level]({_rel(bars, out)})", ""]
        if s.finished.get("true_nll") is not None and s.finished["true_nll"].notna().any():
            p = plot_bound_vs_entropy(s, axis, rows, out / f"{axis}_bound_vs_entropy.png")
            md += ["Bound vs the exact entropy of the synthetic source (the floor no model "
                   "beats):", "", f"![bound vs entropy]({_rel(p, out)})", ""]
        if axis == "model":
            md += scaling_section(s, axis, out)
    if not s.axes and not s.finished.empty:
        top = s.finished.sort_values(METRIC).head(10)
        md += ["## Best trials", "", markdown_table(
            ["trial", BOUND, "config"],
            [[f"`{r.trial_id}`", fmt(r[BOUND]), config_text(r, s.params)] for _, r in top.iterrows()]
        ), ""]
    return md


def scaling_section(s: Study, axis: str, out: Path) -> list[str]:
    best = scaling_points(s, axis)
    if len(best) < 2:
        return ["Scaling fit needs finished trials at two sizes or more.", ""]
    path, fit_n, fit_c = plot_scaling(s, axis, best, out / "scaling.png")
    rows = [[str(lv), fmt(int(r["N"])), fmt(int(r["n_params"])) if not _missing(r["n_params"]) else "–",
             fmt(int(r["D"])), f"{r['C']:.3g}", fmt(r[METRIC]), fmt(r[BOUND])]
            for lv, r in best.iterrows()]
    md = ["### Bound vs parameters and compute", "",
          markdown_table([axis, "N (non-embedding)", "params (total)", "tokens D",
                          "compute 6·N·D (FLOPs)", "val_nll", BOUND], rows), "",
          f"![scaling]({_rel(path, out)})", "",
          "Best trial per size. Compute is the usual estimate C ≈ 6·N·D (forward and backward "
          "passes; attention and evaluation cost ignored), with N the non-embedding parameters "
          "and D the training tokens. Power laws fitted by least squares on log-log axes:", ""]
    md += [f"- {fit.text(v)}" for fit, v in ((fit_n, "N"), (fit_c, "C")) if fit is not None]
    return md + [""]


def samples_section(s: Study) -> list[str]:
    if s.finished.empty:
        return ["## Samples", "", "No finished trial yet.", ""]
    best = s.finished.loc[s.finished[METRIC].astype(float).idxmin()]
    trial_id = str(best["trial_id"])
    head = (f"## Samples from the best trial `{trial_id}` ({BOUND} {fmt(best[BOUND])}"
            + (f", level {best['level']}" if not _missing(best.get("level")) else "") + ")")
    texts = trial_samples(s, trial_id)
    md = [head, ""]
    if not texts:
        where = TrainerFiles(s.layout.relative(s.layout.trial("<trial>").trainer_dir)).samples
        return md + [f"No samples found (the trainer writes them to `{where}` on local "
                     "storage).", ""]
    md += ["Written by the trainer at the end of training (analytic sampler). More with "
           f"`python -m sedd_ray.sample --storage {s.storage} --study {s.name} --trial {trial_id}`.",
           ""]
    for i, t in enumerate(texts):
        md += [f"Sample {i}:", "", "```text", t.replace("```", "ʼʼʼ")[:600], "```", ""]
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/analyze.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("study_dir", nargs="?", help="a study directory, e.g. results/graph-ablation")
    p.add_argument("--storage", default=None, help="results folder or URI (with --study)")
    p.add_argument("--study", default=None, help="study name (optional if only one)")
    p.add_argument("--out", default=None, help="report folder (default: the study directory)")
    p.add_argument("--ar-reference", default=None, metavar="STUDY",
                   help="the study holding the AR reference (default: <study>-ar if present)")
    args = p.parse_args(argv)
    if args.study_dir and (args.storage or args.study):
        p.error("give a study directory or --storage/--study, not both")
    if args.study_dir:
        storage, study = split_study_dir(args.study_dir)
    else:
        storage, study = args.storage or "results", args.study
    try:
        path = write_report(storage, study, args.out, args.ar_reference)
    except (ResultsError, CompareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(read_verdicts(path)))  # the answer first
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
