"""Stage 1's verdict: which predicted classes go to confirmation.

Two kinds of evidence make a class suspect (DESIGN §4, stage 1):
1. *Consistent trigger candidates*: at least `min_candidates` of its checked images disagree
   with the oracle and carry a candidate (a small segment whose removal flips the prediction to
   an object the oracle saw, the objects labelled without it), and those candidates look
   alike. They are clustered by appearance (`cluster_candidates`); a cluster of
   `min_candidates` or more sends the class to confirmation whatever its
   disagreement rate, because a weak or confusable model disagrees a lot on benign labels and
   a trigger that rides into the object crops hides its own target.
2. *Disagreement* well above the other classes' (one-sided binomial test against their pooled
   rate, Bonferroni over classes): weak evidence alone, but the only kind a non-localized
   trigger (blend, warp) leaves.
Neither decides anything: the transplant test does (`auditor.scan.confirm`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from auditor.scan.check import ImageCheck
from auditor.scan.trigger import box_pixels, resize

SUSPECT_P_VALUE = 0.01
BASELINE_FLOOR = 0.02  # a class is never compared against a disagreement rate below 2 %
# Two candidates "look alike" when their pixels, brought to one small grid, correlate at least
# as strongly as a victim must match the prototype (`auditor.scan.victims.MATCH_THRESHOLD`:
# the same statistic, normalized cross-correlation), and their sizes are within a factor 2.
LOOK_ALIKE = 0.6
SIZE_RATIO = 2.0
_GRID = 8


def suspect_classes(checks: Sequence[ImageCheck], n_classes: int) -> dict[int, float]:
    """{class: p-value} for predicted classes whose disagreement stands out."""
    from scipy.stats import binomtest

    counts = np.zeros(n_classes, int)
    disagreements = np.zeros(n_classes, int)
    for check in checks:
        if not 0 <= check.pred < n_classes:
            continue
        counts[check.pred] += 1
        disagreements[check.pred] += check.disagrees
    suspects = {}
    for cls in np.flatnonzero(counts):
        others = counts.sum() - counts[cls]
        baseline = (disagreements.sum() - disagreements[cls]) / others if others else 0.0
        p_value = binomtest(
            int(disagreements[cls]), int(counts[cls]), max(baseline, BASELINE_FLOOR), "greater"
        ).pvalue
        if p_value < SUSPECT_P_VALUE / len(np.flatnonzero(counts)):
            suspects[int(cls)] = float(p_value)
    return suspects


@dataclass(frozen=True)
class CandidateCluster:
    """Checks of one predicted class whose trigger candidates look alike (largest flip first)."""

    target: int
    checks: tuple[ImageCheck, ...]


def candidate_clusters(
    checks: Sequence[ImageCheck], image: Callable[[int], np.ndarray], min_size: int
) -> list[CandidateCluster]:
    """Per predicted class, the clusters of look-alike candidates with at least `min_size` members.

    `image(index)` gives data image `index` (uint8 RGB). Largest clusters first.
    """
    by_class: dict[int, list[ImageCheck]] = {}
    for check in checks:
        if check.candidate is not None and check.disagrees:
            by_class.setdefault(check.pred, []).append(check)
    clusters = []
    for target, members in sorted(by_class.items()):
        if len(members) < min_size:
            continue
        members.sort(key=lambda c: (-c.flip, c.index))
        features = [_appearance(image(c.index), c) for c in members]
        for group in cluster_candidates(features):
            if len(group) >= min_size:
                clusters.append(CandidateCluster(target, tuple(members[i] for i in group)))
    return sorted(clusters, key=lambda c: (-len(c.checks), c.target))


def cluster_candidates(features: Sequence[tuple[np.ndarray, float]]) -> list[list[int]]:
    """Leader clustering of (appearance vector, relative size) pairs, in the order given.

    Each item joins the first cluster whose leader it looks like (`looks_alike`), else starts
    one. Deterministic; total for any input (a flat or non-finite vector looks like nothing but
    another flat one of the same colour).
    """
    leaders: list[int] = []
    groups: list[list[int]] = []
    for i, feature in enumerate(features):
        for leader, group in zip(leaders, groups, strict=True):
            if looks_alike(features[leader], feature):
                group.append(i)
                break
        else:
            leaders.append(i)
            groups.append([i])
    return groups


def looks_alike(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> bool:
    """Whether two candidates' appearance vectors correlate >= LOOK_ALIKE at sizes within SIZE_RATIO."""
    (va, sa), (vb, sb) = a, b
    if (
        not (np.isfinite(sa) and np.isfinite(sb))
        or min(sa, sb) <= 0
        or max(sa, sb) > SIZE_RATIO * min(sa, sb)
    ):
        return False
    # Appearance vectors are pixels in [0, 1]; anything else (a broken input) is clipped there.
    va = np.clip(np.nan_to_num(np.asarray(va, np.float64)), 0.0, 1.0)
    vb = np.clip(np.nan_to_num(np.asarray(vb, np.float64)), 0.0, 1.0)
    da, db = va - va.mean(), vb - vb.mean()
    na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
    if na < 1e-6 or nb < 1e-6:  # flat patches (a solid-colour trigger): compare colours instead
        return na < 1e-6 and nb < 1e-6 and float(np.abs(va.mean() - vb.mean())) < 0.1
    return float(da @ db) / (na * nb) >= LOOK_ALIKE


def _appearance(image: np.ndarray, check: ImageCheck) -> tuple[np.ndarray, float]:
    """The candidate's box pixels on an 8x8 grid (float, 0-1) and its relative size (box side)."""
    assert check.candidate is not None
    box = check.candidate.box
    pixels = resize(box_pixels(image, box), _GRID, _GRID).astype(np.float32) / 255.0
    side = float(np.sqrt(max(0.0, (box[2] - box[0]) * (box[3] - box[1]))))
    return pixels.reshape(-1), side
