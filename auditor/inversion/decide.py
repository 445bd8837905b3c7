"""Which searched class is an outlier: a robust anomaly index and a threshold calibrated for it.

Per class c the search gives the area of the smallest stamp that turns clean images into c.
On the log scale, a backdoor's target lies far below the others. The index of class c is the
studentized deleted residual, computed leave-one-out so that c does not hide itself:

    index(c) = (mean(others) - log area(c)) / (sd(others) * sqrt(1 + 1 / (n - 1)))

Neural Cleanse's median / MAD score was tried first (on the tuning rows): with ten or twenty
classes the MAD is so noisy that its calibrated threshold (7.2 for 12 classes at alpha 0.01)
missed a target at 9.9 of the ratio's spread; the standard deviation uses every class and keeps
the same false-alarm rate with a threshold near 3.3.

With a trusted reference model, the per-class value is the log ratio of the audited model's
area to the reference's: classes that are easy for any model (a flat, saturated road sign)
cancel out, and only what the audited model learned on its own stands out.

A model with two backdoors has two low classes, and each inflates the spread the other is
measured against. `outliers` therefore tests step-down: the most outlying class against the
threshold for n classes; if it passes, it is set aside and the next is tested among the n - 1
left, and so on. The first test is the single-outlier test, so a model with no outlying class
is flagged no more often than before.

The threshold is not a number picked on our models. Under the null hypothesis that the n
per-class values are exchangeable draws from one normal distribution, the largest of the n
indices exceeds `max_index_threshold(n, alpha)` with probability alpha (5 % by default: one
clean model in twenty has a class flagged, which the confirmation then has to reject). It is
computed by simulation for the exact n.

A per-class value measured with a known sampling error (the warp family's held-out success,
`auditor.inversion.warp`) passes it as `noise`: the index's spread becomes
sqrt(spread^2 + noise(c)^2). That can only lower an index, so the threshold stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import numpy as np

NULL_DRAWS = 20_000


def anomaly_indices(
    values: Mapping[int, float], noise: Mapping[int, float] | None = None
) -> dict[int, float]:
    """{class: leave-one-out robust index} of per-class log values (lower = more anomalous);
    `noise`: {class: standard error of its value}, added to the spread it is measured against."""
    keys = list(values)
    logs = np.array([values[k] for k in keys], np.float64)
    if len(logs) < 3:
        return {k: 0.0 for k in keys}
    errors = None if noise is None else np.array([noise[k] for k in keys], np.float64)[None, :]
    return {k: float(v) for k, v in zip(keys, _indices(logs[None, :], errors)[0], strict=True)}


def _indices(logs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """float64 (draws, n) values -> (draws, n) leave-one-out indices, vectorized over draws."""
    n = logs.shape[1]
    others = np.stack([np.delete(logs, i, axis=1) for i in range(n)], axis=1)  # (draws, n, n-1)
    spread = others.std(axis=2, ddof=1) * np.sqrt(1 + 1 / (n - 1))
    if noise is not None:
        spread = np.sqrt(spread**2 + noise**2)
    return (others.mean(axis=2) - logs) / np.maximum(spread, 1e-12)


@cache
def max_index_threshold(n: int, alpha: float = 0.05, seed: int = 0) -> float:
    """The (1 - alpha) quantile of the largest index among n normal draws (Monte Carlo)."""
    if n < 3:
        return float("inf")
    draws = np.random.default_rng(seed).standard_normal((NULL_DRAWS, n))
    return float(np.quantile(_indices(draws).max(axis=1), 1 - alpha))


def outliers(
    values: Mapping[int, float],
    alpha: float = 0.05,
    most: int = 3,
    noise: Mapping[int, float] | None = None,
) -> dict[int, float]:
    """{class: index} of the outlying classes, step-down, strongest first (at most `most`).

    Each is the most outlying of the classes left, with an index at or over the threshold for
    their number; the test stops at the first that is not. `noise` as in `anomaly_indices`.
    """
    left, found = dict(values), dict[int, float]()
    while len(left) >= 3 and len(found) < most:
        indices = anomaly_indices(left, noise)
        top = max(indices, key=lambda k: indices[k])
        if indices[top] < max_index_threshold(len(left), alpha):
            break
        found[top] = indices[top]
        del left[top]
    return found
