"""Paired bootstrap over rows: the interval of any statistic of the rows, of a mean difference and of a pairwise win
rate; and a seeded order of rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

CHUNK = 256  # resamples drawn at once (bounds memory on large evaluations)


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

    return mean_bootstrap(np.asarray(tuned_scores, dtype=float) - np.asarray(base_scores, dtype=float), samples, seed)


def mean_bootstrap(values, samples: int, seed: int) -> tuple[float, float, float]:
    """(mean(values), 2.5th and 97.5th percentile of the mean over `samples` resamples of the values)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
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


OUTCOME_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def pairwise_summary(prefix: str, outcomes: list[str], samples: int, seed: int) -> dict[str, Any]:
    """The new model's wins, ties and losses against a baseline (`win`/`tie`/`loss` per verdict) and its win rate,
    a tie counting half (0.5: no preference), with a 95% bootstrap interval over the verdicts; None without any."""
    import numpy as np

    counts = {f"{prefix}_{name}": outcomes.count(outcome)
              for name, outcome in (("wins", "win"), ("ties", "tie"), ("losses", "loss"))}
    if not outcomes:
        return {**counts, **dict.fromkeys(f"{prefix}_win_rate{end}" for end in ("", "_ci_low", "_ci_high"))}
    scores = np.array([OUTCOME_SCORES[outcome] for outcome in outcomes])
    low, high = bootstrap_interval(scores.size, lambda rows: scores[rows].mean(axis=1), samples, seed)
    return {**counts, f"{prefix}_win_rate": float(scores.mean()), f"{prefix}_win_rate_ci_low": low,
            f"{prefix}_win_rate_ci_high": high}
