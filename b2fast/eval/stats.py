"""Is an after − before difference more than noise? Paired bootstrap over prompts.

Both columns of an evaluation sample the same prompts with the same seeds, so each prompt gives
one paired difference: its mean after minus its mean before. The prompts are the random unit
(a different pick of prompts would give another table), so the interval resamples prompts with
replacement and takes the percentiles of the resampled mean differences. The generator seed is
fixed, so a table is reproducible to the last digit.

Across training seeds (a few runs per method) the unit is the seed and the interval is Student's t
(``mean_ci``, ``paired_difference``): the learning-curve tables of benchmarks/toy_compare.py.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

# 2,000 resamples: the Monte-Carlo error of a 2.5% percentile is then about
# sqrt(.025·.975/2000) ≈ 0.35 percentile points, well below the third decimal the table prints
# for the interval widths these tables have (Efron & Tibshirani recommend >= 1,000 for CIs).
RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
_CHUNK = 1 << 22  # resampled indices held at once (32 MiB of int64), whatever the prompt count


@dataclass(frozen=True)
class PairedDifference:
    diff: float      # mean over prompts of (after − before)
    ci_low: float    # percentile bootstrap interval of that mean, NaN with fewer than 2 prompts
    ci_high: float
    n: int           # prompts with a finite mean in both columns

    @property
    def within_noise(self) -> bool | None:
        """True when the interval contains 0; None when there is no interval."""
        if math.isnan(self.ci_low):
            return None
        return self.ci_low <= 0 <= self.ci_high


def paired_bootstrap_ci(before, after, resamples: int = RESAMPLES, level: float = LEVEL,
                        seed: int = SEED) -> PairedDifference:
    """Mean per-prompt difference ``after − before`` and its percentile bootstrap interval:
    ``resamples`` times, draw n prompts with replacement (``numpy.random.default_rng(seed)
    .integers(0, n, (resamples, n))``, row by row) and average their differences; the interval
    is the (1 − level)/2 and (1 + level)/2 quantiles (numpy's default linear interpolation).
    Prompts whose mean is not finite in either column are left out. With few prompts (< ~10) the
    percentile interval is too narrow; with one there is none (NaN)."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    if n == 1:
        return PairedDifference(float(d[0]), math.nan, math.nan, 1)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // n)
    means = np.concatenate([d[rng.integers(0, n, (min(rows, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, rows)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(d.mean()), float(low), float(high), n)


def compare_rows(before: list, after: list) -> list[dict]:
    """One record per (prompt set, split, metric) of two columns of EvalRows (same plan):
    {prompt_set, split, metric, n_prompts, before, after, diff, ci_low, ci_high, within_noise}.
    The metrics are the rows' reward cells (each reward's score, and success rate where it means
    one); a metric without per-prompt means (rows stored by older versions) gets NaN bounds."""
    records = []
    for b, a in zip(before, after):
        assert (b.prompt_set, b.split) == (a.prompt_set, a.split), "columns of different plans"
        for (metric, value_b), (_, value_a) in zip(b.reward_cells(), a.reward_cells()):
            per_b, per_a = b.per_prompt.get(metric), a.per_prompt.get(metric)
            if per_b is not None and per_a is not None and len(per_b) == len(per_a):
                result = paired_bootstrap_ci(per_b, per_a)
            else:
                result = PairedDifference(value_a - value_b, math.nan, math.nan, b.n_prompts)
            records.append({"prompt_set": b.prompt_set, "split": b.split, "metric": metric,
                            "n_prompts": result.n, "before": value_b, "after": value_a, "diff": result.diff,
                            "ci_low": result.ci_low, "ci_high": result.ci_high,
                            "within_noise": result.within_noise})
    return records


def _signed(x: float) -> str:
    return "    nan" if math.isnan(x) else f"{x:+.3f}"


def format_differences(records: list[dict], before: str = "before", after: str = "after") -> str:
    """The text table of :func:`compare_rows`, with what its marks mean written under it."""
    head = (f"{'prompt set':<16} {'split':<6} {'metric':<18} {'prompts':>7} {before:>7} {after:>7} "
            f"{'diff':>7}  {'95% CI':<17} sig")
    lines = [f"{after} - {before}, paired by prompt (same prompts and seeds in both):", head, "-" * len(head)]
    for r in records:
        sig = {None: "n/a", True: "noise", False: "yes"}[r["within_noise"]]
        ci = f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]"
        lines.append(f"{r['prompt_set']:<16} {r['split']:<6} {r['metric']:<18} {r['n_prompts']:>7} "
                     f"{r['before']:>7.3f} {r['after']:>7.3f} {_signed(r['diff']):>7}  {ci:<17} {sig}")
    lines.append(f"diff: mean over prompts of the per-prompt difference; 95% CI: percentile bootstrap "
                 f"over prompts ({RESAMPLES:,} resamples, seed {SEED});")
    lines.append("sig: yes = the CI excludes 0; noise = it contains 0 (within the prompt-to-prompt "
                 "spread); n/a = no per-prompt means or fewer than 2 prompts.")
    return "\n".join(lines)


# -- over seeds: 95% Student-t intervals -------------------------------------------------------
# Training seeds are few (2 to 5), so their interval is the t-interval, mean ± t(0.975, n−1)·sd/√n;
# a percentile bootstrap over so few units would be far too narrow.
# t(0.975, df) for df = 1..30; beyond, the Cornish–Fisher expansion (error < 1e-5 there).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, low, high) of the finite values: the 95% t-interval over them (NaN bounds with fewer
    than 2 values; all NaN with none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, math.nan
    mean = statistics.mean(v)
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = t975(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def paired_difference(a: dict, b: dict) -> PairedDifference:
    """a − b paired by seed (the keys both have): mean difference and its 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    mean, low, high = mean_ci([a[s] - b[s] for s in seeds])
    return PairedDifference(mean, low, high, len(seeds))
