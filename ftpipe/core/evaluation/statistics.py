"""Paired bootstrap over rows: the interval of any statistic of the rows and of a mean difference; the score interval
of a share (a pairwise win rate); the chance of a count as high as one seen; and a seeded order of rows."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

CHUNK = 256  # resamples drawn at once (bounds memory on large evaluations)
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


def bootstrap_interval(size: int, statistic: Callable, samples: int, seed: int) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of `statistic` over `samples` resamples of `size` rows drawn with replacement,
    leaving out the resamples where it is undefined (NaN).

    `statistic` maps an index matrix (resamples × size) to one value per resample; resampling the same row indices
    in every column keeps the rows paired.
    """
    import numpy as np

    if size == 0:
        raise ValueError("a bootstrap needs at least one row")
    rng = np.random.default_rng(seed)
    values = np.concatenate([statistic(rng.integers(0, size, size=(min(CHUNK, samples - start), size)))
                             for start in range(0, samples, CHUNK)])
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap(base_scores, tuned_scores, samples: int, seed: int) -> tuple[float, float, float]:
    """(mean(tuned - base), 2.5th and 97.5th percentile of that mean over `samples` paired resamples of rows)."""
    import numpy as np

    values = np.asarray(tuned_scores, dtype=float) - np.asarray(base_scores, dtype=float)
    low, high = bootstrap_interval(values.size, lambda rows: values[rows].mean(axis=1), samples, seed)
    return float(values.mean()), low, high


def ratio_bootstrap(reference_scores, scores, samples: int, seed: int) -> tuple[float, float, float]:
    """(mean(scores) / mean(reference_scores), the 2.5th and 97.5th percentile of that ratio over `samples` paired
    resamples of rows, those where the reference scores 0 left out); NaN where the reference's mean is 0."""
    import numpy as np

    reference, ours = np.asarray(reference_scores, dtype=float), np.asarray(scores, dtype=float)

    def ratio(rows):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(reference[rows].mean(axis=1) > 0, ours[rows].mean(axis=1) / reference[rows].mean(axis=1),
                            np.nan)

    low, high = bootstrap_interval(reference.size, ratio, samples, seed)
    whole = ours.mean() / reference.mean() if reference.mean() > 0 else float("nan")
    return float(whole), low, high


def seeded_rank(row_id: str, seed: int) -> str:
    """A row's place in a pseudo-random order fixed by `seed` (sort by it: the same rows come first every time)."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def share_interval(successes: float, trials: int) -> tuple[float, float]:
    """The 95% Wilson score interval of the share `successes` / `trials`. Unlike a bootstrap's, it keeps its width
    where every trial went one way (12 of 12 reads 0.757 … 1, not 1 … 1) and holds its coverage on a few trials."""
    share, spread = successes / trials, Z_95 ** 2 / trials
    centre = (share + spread / 2) / (1 + spread)
    half = Z_95 / (1 + spread) * math.sqrt(share * (1 - share) / trials + spread / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_of_at_least(successes: int, trials: int, share: float) -> float:
    """The chance of `successes` or more in `trials` where each succeeds with probability `share` (binomial tail),
    summed until the terms, falling past the mean, no longer change it."""
    if share <= 0 or share >= 1:
        return float(successes <= 0 or share >= 1)
    log_share, log_rest = math.log(share), math.log1p(-share)
    total = 0.0
    for k in range(successes, trials + 1):
        term = math.exp(math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                        + k * log_share + (trials - k) * log_rest)
        total += term
        if k > trials * share and term < total * 1e-17:
            break
    return min(1.0, total)


OUTCOME_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def mean_share_interval(scores: list[float]) -> tuple[float, float, float]:
    """The mean of scores from 0 to 1 (a tie or no change scoring 0.5) with the score interval of that share, a 0.5
    counted as half a success and half a failure: where many score 0.5 it is a little wider than it need be."""
    total = sum(scores)
    return (total / len(scores), *share_interval(total, len(scores)))


def pairwise_summary(prefix: str, outcomes: list[str]) -> dict[str, Any]:
    """The new model's wins, ties and losses against a baseline (`win`/`tie`/`loss` per verdict) and its win rate, a
    tie counting half (0.5: no preference), with its 95% score interval; None without any verdict."""
    counts = {f"{prefix}_{name}": outcomes.count(outcome)
              for name, outcome in (("wins", "win"), ("ties", "tie"), ("losses", "loss"))}
    rate = mean_share_interval([OUTCOME_SCORES[outcome] for outcome in outcomes]) if outcomes else (None,) * 3
    return {**counts, **dict(zip((f"{prefix}_win_rate{end}" for end in ("", "_ci_low", "_ci_high")), rate))}
