r"""Effect sizes with confidence intervals: does level A beat level B, by how much, how sure?

:func:`compare` takes a study's trials table (one row per trial, as
:func:`sedd_ray.results.read_trials` returns it) and an axis (a column such as ``graph``),
and gives one :class:`Effect` per level against a reference level:

* ``diff`` = mean NLL bound of the level minus that of the reference, in nats/token.
  **Negative means the level is better** (a lower bound). ``ratio = exp(diff)`` is the
  ratio of perplexity bounds (level / reference); below 1 the level is better.
* a confidence interval that holds both the seed-to-seed spread of training and the
  noise of the evaluation, and the number of seeds behind it.

**Which rows.** Finished trials (status terminated or stopped_early) with a finite
``metric``. When the table has a ``phase`` column and any finished ``"replicate"`` rows,
only those are used: a tuned winner is the minimum over its level's tuning trials, so it
is biased low, while its replicates (the same config, fresh seeds) are not.

**Method** (``Effect.method`` says which one ran):

* *paired by seed* - when each level has one trial per training seed (column ``seed``)
  and the level and the reference share at least 2 seeds: the per-seed differences
  ``d_k = y(level, k) - y(reference, k)`` over the common seeds, and a Student t-interval
  over them (``n - 1`` degrees of freedom). Each ``d_k`` carries its own evaluation noise,
  so the spread of the ``d_k`` holds both sources. With ``blocks`` (per-block values of
  the final evaluation: ``DataFrame[trial_id, block, nll]``), ``d_k`` is the mean over
  the blocks both trials have of the block-wise differences ("paired by seed and block"):
  the same as the difference of the two trials' numbers when they share every block, and
  still a like-for-like difference when they do not.
* *Welch t-interval* - when the seeds do not pair (different seeds, or several trials
  per seed): the difference of the level means, Welch's standard error and degrees of
  freedom. With a single trial at one of the two levels, the pooled (equal-variance)
  t-interval instead, since that level has no spread of its own.
* *evaluation noise only* - one trial per level: the CI holds the evaluation's noise and
  no seed spread at all, so it is **never conclusive** (by design: one seed says nothing
  about the next one). With ``blocks``, the t-interval of the block-wise differences
  (paired by block); else a normal interval from the two trials' ``<metric>_stderr``.

**Several levels.** Every other level is compared with the reference (default: the first
level in ``order``; the verdict's wording does not depend on which one is the reference,
it always says who beats whom). With ``m >= 2`` comparisons each CI is a Bonferroni
interval at ``1 - (1 - confidence) / m``, so all ``m`` hold together with probability at
least ``confidence``; an effect is conclusive when its interval excludes 0.

**Refusals** (:class:`CompareError`, a ``ValueError`` with one line that says the fix):
rows of different ``data_identity`` (different corpus, split or tokenizer: their
nats/token do not compare), an axis with one level, a reference that is not a level.

Pure numpy/pandas (the Student t distribution is computed here): no torch, no Ray.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sedd_ray.results import FINISHED_STATUSES, ResultsError, same_data_identity

__all__ = [
    "CompareError",
    "Comparison",
    "Effect",
    "MAX_SUGGESTED_REPLICATES",
    "check_data_identity",
    "compare",
    "comparison_rows",
    "t_quantile",
    "t_two_sided_p",
]

MAX_SUGGESTED_REPLICATES = 20  # the cap of the replicate count a verdict suggests
EVAL_ONLY = "evaluation noise only, no seed spread; not conclusive by design"


class CompareError(ValueError):
    """A comparison that must not be made (different data, one level, ...); one line."""


# --- the Student t distribution (no scipy) -----------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's T with ``df`` degrees of freedom (``inf``: normal)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(df):
        return 2.0 * (1.0 - statistics.NormalDist().cdf(abs(t)))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's T with ``df`` > 0 degrees of freedom."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(q)
    tail = 2.0 * (1.0 - q)  # I_x(df/2, 1/2) = tail at x = df / (df + t^2); x rises as t falls
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _betainc(df / 2.0, 0.5, mid) < tail:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


# --- results -------------------------------------------------------------------------------


def _fmt(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}"


def _decimals(halfwidth: float) -> int:
    """Decimals for an effect and its CI: the last digit shown at most a fifth of the CI's
    half-width (2 to 6 decimals)."""
    if not math.isfinite(halfwidth) or halfwidth <= 0:
        return 2
    return int(min(6, max(2, math.ceil(math.log10(5.0 / halfwidth)))))


@dataclass(frozen=True)
class Effect:
    """The effect of ``level`` against ``reference`` (see the module docstring).

    ``diff``, ``low``, ``high``: NLL bound of ``level`` minus that of ``reference`` and its
    CI, in nats/token (negative: ``level`` is better). ``confidence`` is this interval's
    own level (after the Bonferroni correction, if any); ``p_value`` is two-sided and
    adjusted the same way. ``per_seed`` holds the paired differences ``d_k`` (empty
    unless paired by seed). ``suggest_replicates``: replicates per level that would likely
    make an inconclusive interval exclude 0 (None when conclusive).
    """

    level: str
    reference: str
    diff: float
    low: float
    high: float
    n_level: int
    n_reference: int
    method: str
    confidence: float
    p_value: float
    conclusive: bool
    per_seed: tuple[float, ...] = ()
    suggest_replicates: int | None = None

    @property
    def ratio(self) -> float:
        """Perplexity bound of ``level`` / that of ``reference`` (exp of ``diff``)."""
        return math.exp(self.diff)

    @property
    def ratio_low(self) -> float:
        return math.exp(self.low)

    @property
    def ratio_high(self) -> float:
        return math.exp(self.high)

    @property
    def eval_only(self) -> bool:
        return self.method.startswith("evaluation noise only")

    def seeds_text(self) -> str:
        n, m = self.n_level, self.n_reference
        each = f"{n} seed{'s' if n != 1 else ''} each" if n == m else f"{n} and {m} seeds"
        return f"{each}, {self.method.split(';')[0]}"

    def _ci_text(self, low: float, high: float) -> str:
        dec = _decimals((self.high - self.low) / 2)
        conf = f"{100 * self.confidence:.4g}% CI"
        if not math.isfinite(low):
            return f"{conf} unknown: no standard error recorded; {self.seeds_text()}"
        return f"{conf} {_fmt(low, dec)} to {_fmt(high, dec)}; {self.seeds_text()}"

    def phrase(self) -> str:
        """``absorb beats uniform by 0.62 nats/token (95% CI 0.55 to 0.69; ...)``: who
        beats whom, by how much, with the CI of that margin, whichever is the reference."""
        dec = _decimals((self.high - self.low) / 2)
        if self.diff < 0:
            winner, loser, by, lo, hi = self.level, self.reference, -self.diff, -self.high, -self.low
        else:
            winner, loser, by, lo, hi = self.reference, self.level, self.diff, self.low, self.high
        return f"{winner} beats {loser} by {_fmt(by, dec)} nats/token ({self._ci_text(lo, hi)})"

    def difference(self) -> str:
        """``absorb - uniform = -0.03 nats/token (95% CI -0.09 to 0.03; ...)``: neutral."""
        dec = _decimals((self.high - self.low) / 2)
        return (f"{self.level} - {self.reference} = {self.diff:+.{dec}f} nats/token "
                f"({self._ci_text(self.low, self.high)})")

    def verdict(self) -> str:
        """One line: the phrase and ``conclusive``, or ``inconclusive: ...`` and what to run."""
        if self.conclusive:
            return f"{self.phrase()} — conclusive"
        rerun = f"rerun with --replicates {self.suggest_replicates}"
        if self.eval_only:
            return f"{self.phrase()} — not conclusive by design; {rerun}"
        return f"inconclusive: the CI includes 0; {rerun}: {self.difference()}"


@dataclass(frozen=True)
class Comparison:
    """The effects of every level of ``axis`` against ``reference``, and how they were made.

    ``rows`` says which trials were used (``"replicate"`` rows or all ``"finished"``
    ones); ``missing`` lists levels that have finished trials but no finished replicate
    while others have (left out, and named by :meth:`lines`); ``adjustment`` names the
    multiple-comparison correction (``""`` for one comparison); ``per_level`` maps each
    level to the trial values used (nats/token)."""

    axis: str
    metric: str
    reference: str
    levels: tuple[str, ...]
    effects: tuple[Effect, ...]
    confidence: float
    rows: str
    adjustment: str = ""
    per_level: dict[str, tuple[float, ...]] = field(default_factory=dict)
    missing: tuple[str, ...] = ()  # levels with finished trials but no replicate yet

    def lines(self) -> list[str]:
        """One verdict line per effect (the adjustment noted on each when there is one),
        then one per level left out for want of a finished replicate."""
        note = f" [Bonferroni, {len(self.effects)} comparisons]" if self.adjustment else ""
        return [e.verdict() + note for e in self.effects] + [
            f"not compared: {lv} has no finished replicate trial yet" for lv in self.missing]

    def verdict(self) -> str:
        """The answer first: one line per level compared with the reference."""
        return "\n".join(self.lines())

    @property
    def conclusive(self) -> bool:
        return all(e.conclusive for e in self.effects)

    def table(self) -> pd.DataFrame:
        """One row per effect: level, reference, diff, CI, ratio and its CI, n, method."""
        return pd.DataFrame([{
            "level": e.level, "reference": e.reference, "diff": e.diff, "low": e.low,
            "high": e.high, "ratio": e.ratio, "ratio_low": e.ratio_low,
            "ratio_high": e.ratio_high, "n_level": e.n_level, "n_reference": e.n_reference,
            "p_value": e.p_value, "conclusive": e.conclusive, "method": e.method,
        } for e in self.effects])


# --- input checks and row selection --------------------------------------------------------


def check_data_identity(trials: pd.DataFrame) -> None:
    """Refuse rows measured on different data (corpus, split, tokenizer): their nats/token
    do not compare (:func:`sedd_ray.results.same_data_identity`, as a CompareError). Rows
    without a ``data_identity`` (older Parquet) are not checked."""
    try:
        same_data_identity(trials)
    except ResultsError as e:
        raise CompareError(f"refusing to compare: {e}") from None


def _finished(trials: pd.DataFrame, metric: str) -> np.ndarray:
    """Rows of finished trials (or of any status when there is no column) with a finite
    ``metric``."""
    ok = np.isfinite(pd.to_numeric(trials[metric], errors="coerce").to_numpy(dtype=float))
    if "status" in trials:
        ok = ok & trials["status"].isin(FINISHED_STATUSES).to_numpy(dtype=bool)
    return ok


def comparison_rows(trials: pd.DataFrame, metric: str = "val_nll_final") -> tuple[pd.DataFrame, str]:
    """The rows a comparison uses and which ones they are (``"replicate"`` or
    ``"finished"``): finished trials with a finite ``metric``, the replicate phase's
    only when there are any."""
    if metric not in trials:
        raise CompareError(f"the trials have no column {metric!r}; pass metric= one of "
                           f"{', '.join(c for c in trials.columns if 'nll' in c) or 'their columns'}")
    ok = _finished(trials, metric)
    if "phase" in trials:
        rep = ok & (trials["phase"] == "replicate").fillna(False).to_numpy(dtype=bool)
        if rep.any():
            return trials[rep], "replicate"
    return trials[ok], "finished"


def _level_series(rows: pd.DataFrame, axis: str) -> pd.Series:
    """Each row's level as text: the ``level`` column where the row ablates ``axis``
    (an ablation's level name), else the ``axis`` column."""
    mine = pd.Series(False, index=rows.index)
    if "level" in rows and "ablated_axis" in rows:
        mine = (rows["ablated_axis"] == axis).fillna(False).astype(bool) & rows["level"].notna()
    if axis not in rows and not mine.any():
        raise CompareError(f"no column {axis!r} in the trials; columns: {', '.join(rows.columns)}")
    base = rows[axis] if axis in rows else rows["level"]
    if not mine.any():  # a table without ``level``: the axis column alone
        return base.astype(str)
    return base.astype(str).where(~mine, rows["level"].astype(str))


def _default_order(levels: pd.Series) -> list[str]:
    """Numeric levels in numeric order; others in order of first appearance."""
    seen = list(dict.fromkeys(levels))
    try:
        return sorted(seen, key=float)
    except ValueError:
        return seen


def _order(levels: pd.Series, axis: str, order: Sequence[str] | None,
           reference: str | None, which: str) -> tuple[list[str], str]:
    present = set(levels)
    lv = [str(x) for x in order if str(x) in present] if order is not None else _default_order(levels)
    lv += [x for x in _default_order(levels) if x not in lv]
    if len(lv) < 2:
        have, rows = (lv[0] if lv else "none"), ("replicate " if which == "replicate" else "")
        raise CompareError(f"axis {axis!r} has {len(lv)} level{'' if len(lv) == 1 else 's'} with "
                           f"finished {rows}trials ({have}); a comparison needs at least 2 levels")
    ref = lv[0] if reference is None else str(reference)
    if ref not in lv:
        raise CompareError(f"reference {ref!r} is not a level of {axis!r}; levels: {', '.join(lv)}")
    return lv, ref


# --- intervals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Interval:
    """A difference, its standard error and degrees of freedom, and what made them.
    ``spread``: the s.d. of one seed's difference (for the replicate suggestion)."""

    diff: float
    se: float
    df: float
    method: str
    n_level: int
    n_reference: int
    spread: float = math.nan
    per_seed: tuple[float, ...] = ()


def _block_table(blocks: pd.DataFrame | None) -> dict[str, pd.Series]:
    """trial_id -> per-block NLL (index: block id), duplicates averaged."""
    if blocks is None or blocks.empty:
        return {}
    missing = {"trial_id", "block", "nll"} - set(blocks.columns)
    if missing:
        raise CompareError(f"blocks need the columns trial_id, block, nll; missing: "
                           f"{', '.join(sorted(missing))}")
    means = blocks.groupby(["trial_id", "block"])["nll"].mean()
    return {str(t): s.droplevel(0).astype(float) for t, s in means.groupby(level=0)}


def _block_diffs(a: str, r: str, table: dict[str, pd.Series]) -> np.ndarray | None:
    """Block-wise NLL differences of trial ``a`` minus trial ``r`` on their common blocks."""
    if a not in table or r not in table:
        return None
    common = table[a].index.intersection(table[r].index)
    if len(common) == 0:
        return None
    return (table[a].loc[common] - table[r].loc[common]).to_numpy(dtype=float)


def _seed_pairs(a: pd.DataFrame, r: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]] | None:
    """The (level row, reference row) of each common seed, when each level has one trial
    per seed and at least 2 seeds are common; else None (the seeds do not pair)."""
    if "seed" not in a or "seed" not in r:
        return None
    sa, sr = a["seed"], r["seed"]
    if sa.isna().any() or sr.isna().any() or sa.duplicated().any() or sr.duplicated().any():
        return None
    common = sorted(set(sa) & set(sr))
    if len(common) < 2:
        return None
    ia, ir = a.set_index("seed"), r.set_index("seed")
    return [(ia.loc[s], ir.loc[s]) for s in common]


def _paired(a: pd.DataFrame, r: pd.DataFrame, pairs: list[tuple[pd.Series, pd.Series]],
            metric: str, table: dict[str, pd.Series]) -> _Interval:
    by_block = [_block_diffs(str(x["trial_id"]), str(y["trial_id"]), table)
                if "trial_id" in x else None for x, y in pairs]
    if table and all(b is not None for b in by_block):
        d = np.array([b.mean() for b in by_block])
        method = "paired by seed and block"
    else:
        d = np.array([float(x[metric]) - float(y[metric]) for x, y in pairs])
        method = "paired by seed"
    k = len(d)
    if k < max(len(a), len(r)):
        method += f"; {k} common seeds of {len(a)} and {len(r)} trials"
    sd = float(d.std(ddof=1))
    return _Interval(float(d.mean()), sd / math.sqrt(k), k - 1, method + "; t-interval over seeds",
                     k, k, spread=sd, per_seed=tuple(float(x) for x in d))


def _unpaired(ya: np.ndarray, yr: np.ndarray) -> _Interval:
    """Welch's t-interval; pooled variance when one level has a single trial."""
    na, nr = len(ya), len(yr)
    diff = float(ya.mean() - yr.mean())
    if na >= 2 and nr >= 2:
        va, vr = ya.var(ddof=1) / na, yr.var(ddof=1) / nr
        se = math.sqrt(va + vr)
        denom = va**2 / (na - 1) + vr**2 / (nr - 1)
        df = (va + vr) ** 2 / denom if denom > 0 else na + nr - 2
        spread = math.sqrt(ya.var(ddof=1) + yr.var(ddof=1))
        return _Interval(diff, se, df, "Welch t-interval, unpaired (the seeds do not pair)",
                         na, nr, spread=spread)
    pooled = (((ya - ya.mean()) ** 2).sum() + ((yr - yr.mean()) ** 2).sum()) / (na + nr - 2)
    se = math.sqrt(pooled * (1 / na + 1 / nr))
    return _Interval(diff, se, na + nr - 2, "pooled-variance t-interval, unpaired (one level "
                     "has a single trial, so both are assumed to spread alike)", na, nr,
                     spread=math.sqrt(2 * pooled))


def _eval_only(a: pd.Series, r: pd.Series, metric: str, table: dict[str, pd.Series]) -> _Interval:
    """One trial per level: the evaluation's noise only."""
    d = None
    if "trial_id" in a and "trial_id" in r:
        d = _block_diffs(str(a["trial_id"]), str(r["trial_id"]), table)
    if d is not None and len(d) >= 2:
        return _Interval(float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1,
                         f"{EVAL_ONLY}; paired by block over {len(d)} blocks", 1, 1)
    col = f"{metric}_stderr"
    se_a = float(a[col]) if col in a and pd.notna(a[col]) else math.nan
    se_r = float(r[col]) if col in r and pd.notna(r[col]) else math.nan
    return _Interval(float(a[metric]) - float(r[metric]), math.hypot(se_a, se_r), math.inf,
                     f"{EVAL_ONLY}; normal interval from the trials' {col}", 1, 1)


def _interval(a: pd.DataFrame, r: pd.DataFrame, metric: str,
              table: dict[str, pd.Series]) -> _Interval:
    if len(a) == 1 and len(r) == 1:
        return _eval_only(a.iloc[0], r.iloc[0], metric, table)
    pairs = _seed_pairs(a, r)
    if pairs is not None:
        return _paired(a, r, pairs, metric, table)
    return _unpaired(a[metric].to_numpy(dtype=float), r[metric].to_numpy(dtype=float))


def _suggest(iv: _Interval, q: float) -> int:
    """Replicates per level whose expected CI half-width is below ``|diff|``: at least
    double today's (3 at least), at most :data:`MAX_SUGGESTED_REPLICATES` unless double
    today's is more."""
    n_now = min(iv.n_level, iv.n_reference)
    floor = max(3, 2 * n_now)
    if not (math.isfinite(iv.spread) and iv.spread > 0 and iv.diff != 0):
        return max(floor, MAX_SUGGESTED_REPLICATES) if iv.spread > 0 else floor
    paired = iv.method.startswith("paired")
    for n in range(floor, MAX_SUGGESTED_REPLICATES + 1):
        df = n - 1 if paired else 2 * n - 2
        if t_quantile(q, df) * iv.spread / math.sqrt(n) < abs(iv.diff):
            return n
    return max(floor, MAX_SUGGESTED_REPLICATES)


def _effect(level: str, reference: str, iv: _Interval, confidence: float) -> Effect:
    """The CI at ``confidence`` (already corrected for multiplicity) of one interval."""
    q = 1.0 - (1.0 - confidence) / 2.0
    if iv.se > 0 and math.isfinite(iv.se):
        half = t_quantile(q, iv.df) * iv.se
        p = t_two_sided_p(iv.diff / iv.se, iv.df)
    else:
        half = 0.0 if iv.se == 0 else math.nan
        p = (0.0 if iv.diff != 0 else 1.0) if iv.se == 0 else math.nan
    low, high = iv.diff - half, iv.diff + half
    eval_only = iv.method.startswith("evaluation noise only")
    conclusive = (not eval_only) and (low > 0 or high < 0)
    return Effect(level=level, reference=reference, diff=iv.diff, low=low, high=high,
                  n_level=iv.n_level, n_reference=iv.n_reference, method=iv.method,
                  confidence=confidence, p_value=p, conclusive=conclusive,
                  per_seed=iv.per_seed, suggest_replicates=None if conclusive else _suggest(iv, q))


def compare(trials: pd.DataFrame, axis: str, *, blocks: pd.DataFrame | None = None,
            reference: str | None = None, metric: str = "val_nll_final",
            confidence: float = 0.95, order: Sequence[str] | None = None) -> Comparison:
    """Each level of ``axis`` against ``reference`` (see the module docstring).

    ``trials``: one row per trial with ``axis`` (or ``level``/``ablated_axis``), ``metric``
    (nats/token), and where available ``status``, ``phase``, ``seed``, ``trial_id``,
    ``<metric>_stderr`` and ``data_identity``. ``blocks``: DataFrame[trial_id, block, nll]
    (``sedd_ray.results.read_blocks``), optional. ``order``: the levels' order (default:
    numeric levels sorted, others in order of appearance); ``reference`` defaults to the
    first. Raises :class:`CompareError` on a comparison that must not be made.
    """
    if not 0.0 < confidence < 1.0:
        raise CompareError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    rows, which = comparison_rows(trials, metric)
    check_data_identity(rows)
    levels = _level_series(rows, axis)
    order_, ref = _order(levels, axis, order, reference, which)
    others = [lv for lv in order_ if lv != ref]
    m = len(others)
    each = 1.0 - (1.0 - confidence) / m  # Bonferroni
    table = _block_table(blocks)
    ref_rows = rows[levels == ref]
    effects = tuple(_effect(lv, ref, _interval(rows[levels == lv], ref_rows, metric, table), each)
                    for lv in others)
    adjustment = (f"Bonferroni over {m} comparisons: each CI at {100 * each:.4g}%, "
                  f"{100 * confidence:.4g}% together" if m > 1 else "")
    per_level = {lv: tuple(rows.loc[levels == lv, metric].astype(float)) for lv in order_}
    finished = _level_series(trials[_finished(trials, metric)], axis)
    missing = tuple(lv for lv in dict.fromkeys(finished) if lv not in per_level)
    return Comparison(axis=axis, metric=metric, reference=ref, levels=tuple(order_),
                      effects=effects, confidence=confidence, rows=which,
                      adjustment=adjustment, per_level=per_level, missing=missing)
