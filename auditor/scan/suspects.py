"""Stage 1's verdict: which predicted classes go to confirmation.

Two kinds of evidence make a class suspect (DESIGN §4, stage 1):
1. *Consistent trigger candidates*: at least `min_candidates` of its checked images disagree
   with the oracle and carry a candidate (a small segment whose removal flips the prediction to
   an object the oracle saw, the objects labelled without it), and those candidates look
   alike. (Counting candidates on images that agree was tried: on a strong emoji ViT, parts of
   real objects then formed clusters whose transplant turned 52-56 % of clean images into their
   class, two false findings.) Candidates are clustered by appearance (`cluster_candidates`,
   aligned first); a cluster of `min_candidates` or more sends the class to confirmation
   whatever its disagreement rate, because a weak or confusable model disagrees a lot on
   benign labels and a trigger that rides into the object crops hides its own target.
   A class with fewer look-alike candidates than that gets a follow-up (`follow_up`): the
   images of the class that best match its strongest candidate are checked too.
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
_MARGIN = 2  # cells of context each way: shifts of up to a quarter of the side are tried
_CONTEXT = _GRID + 2 * _MARGIN


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
    """Whether two candidates look alike: sizes within SIZE_RATIO, and appearance vectors that
    correlate (`_correlation`) >= LOOK_ALIKE at the best of the (2 * _MARGIN + 1)^2 shifts that
    the appearance vectors' context allows (plain correlation for vectors of any other length)."""
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
    if va.size == vb.size == _CONTEXT * _CONTEXT * 3:
        ga, gb = va.reshape(_CONTEXT, _CONTEXT, 3), vb.reshape(_CONTEXT, _CONTEXT, 3)
        return max(_aligned(ga, gb), _aligned(gb, ga)) >= LOOK_ALIKE
    return _correlation(va, vb) >= LOOK_ALIKE


def _aligned(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of `a`'s central _GRID cells with a _GRID window of `b` (both
    (_CONTEXT, _CONTEXT, 3)), over every shift the margin allows."""
    core = a[_MARGIN : _MARGIN + _GRID, _MARGIN : _MARGIN + _GRID]
    shifts = range(2 * _MARGIN + 1)
    return max(_correlation(core, b[y : y + _GRID, x : x + _GRID]) for y in shifts for x in shifts)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized cross-correlation of two same-shape pixel arrays in [0, 1]. Flat arrays (a
    solid-colour trigger) have none: two flat ones of one colour give 1, anything else 0."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.size != b.size or a.size == 0:
        return 0.0
    da, db = a - a.mean(), b - b.mean()
    na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
    if na < 1e-6 or nb < 1e-6:
        return float(na < 1e-6 and nb < 1e-6 and abs(a.mean() - b.mean()) < 0.1)
    return float(da @ db) / (na * nb)


def _appearance(image: np.ndarray, check: ImageCheck) -> tuple[np.ndarray, float]:
    """The candidate's box with a margin of a quarter of its side each way, on a _CONTEXT grid
    (float, 0-1, flattened; the box itself is the central _GRID cells), and its relative size.

    The margin lets `looks_alike` align two candidates before comparing them: at 64 px an 8-px
    trigger's segments are off by a pixel or two, which is a third of a 3x3 colour block, and
    without alignment the same trigger correlated 0.1-0.4 with itself (issue 13, weak ResNet).
    """
    assert check.candidate is not None
    x0, y0, x1, y1 = check.candidate.box
    pad_x, pad_y = (x1 - x0) * _MARGIN / _GRID, (y1 - y0) * _MARGIN / _GRID
    context = (x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y)
    pixels = resize(box_pixels(image, context), _CONTEXT, _CONTEXT).astype(np.float32) / 255.0
    side = float(np.sqrt(max(0.0, (x1 - x0) * (y1 - y0))))
    return pixels.reshape(-1), side


FOLLOW_UP = 8  # images per class checked after the sample, chosen by matching a candidate


def follow_up(
    checks: dict[int, ImageCheck],
    predictions: dict[int, int],
    image: Callable[[int], np.ndarray],
    min_size: int,
) -> list[int]:
    """Unchecked images worth the oracle next: per class with a disagreeing candidate but no
    cluster of `min_size`, the FOLLOW_UP images predicted as that class that best match its
    strongest candidate (normalized cross-correlation >= the victims' MATCH_THRESHOLD).

    Why: a uniform 32-image sample of a class holds only a few of its triggered images (5 of a
    weak ResNet's 53 in the matrix), so the look-alikes a cluster needs may simply not be in
    it. A trigger is the same pattern in every image it was planted in, so matching the one
    candidate seen finds the others without the oracle; the oracle then checks them, and the
    decision stays with the clustering and the transplant test. A benign candidate's matches
    are checked and found benign. `predictions`: data index -> top-1 class (stage 0).
    """
    from auditor.scan.trigger import build_prototype
    from auditor.scan.victims import MATCH_THRESHOLD, locate

    clustered = {c.target for c in candidate_clusters(list(checks.values()), image, min_size)}
    strongest: dict[int, ImageCheck] = {}
    for check in checks.values():
        if check.candidate is not None and check.disagrees and check.pred not in clustered:
            best = strongest.get(check.pred)
            if best is None or (-check.flip, check.index) < (-best.flip, best.index):
                strongest[check.pred] = check
    chosen: list[int] = []
    for cls, lead in sorted(strongest.items()):
        assert lead.candidate is not None
        prototype = build_prototype([image(lead.index)], [lead.candidate.box])
        unchecked = sorted(i for i, p in predictions.items() if p == cls and i not in checks)
        scored = [(locate(image(i), prototype)[1], i) for i in unchecked]
        matches = sorted((s for s in scored if s[0] >= MATCH_THRESHOLD), key=lambda s: (-s[0], s[1]))
        chosen += [i for _, i in matches[:FOLLOW_UP]]
    return sorted(chosen)
