"""Stage 1's verdict: which predicted classes go to confirmation.

Two kinds of evidence make a class suspect (DESIGN §4, stage 1):
1. *Consistent trigger candidates*: at least `min_candidates` of its checked images carry a
   candidate (a small segment whose removal flips the prediction to an object the oracle saw,
   the objects labelled without it), and those candidates look alike. Whether the image also
   disagrees with the oracle does not matter: on a weak model some object crop names almost any
   label, so a triggered image often "agrees" (a weak ResNet of the matrix: of 4 checked images
   its trigger flipped, 2 had the trigger as candidate and only 1 of them disagreed, and the
   target was never tested). Counting agreeing images once made parts of real objects cluster
   on a strong emoji ViT (transplant 52-56 %); the control (`auditor.scan.control`), added
   since, rejects exactly those: a finding must beat natural pieces of its own target.
   Candidates are clustered by appearance (`cluster_candidates`:
   one's pixels matched over the other's neighbourhood); a cluster of `min_candidates` or more
   sends the class to confirmation whatever its disagreement rate, because a weak or
   confusable model disagrees a lot on benign labels and a trigger that rides into the object
   crops hides its own target.
   Every class with a candidate gets a follow-up (`follow_up`), clustered or not: the
   images of the class that best match its strongest candidate are checked too.
2. *Disagreement* well above the other classes' (one-sided binomial test against their pooled
   rate, Bonferroni over classes): weak evidence alone, but the only kind a non-localized
   trigger (blend, warp) leaves.
Neither decides anything: the transplant test does (`auditor.scan.confirm`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from auditor.scan.check import ImageCheck
from auditor.scan.screen import round_robin
from auditor.scan.trigger import box_pixels, resize
from auditor.scoring import normalize

SUSPECT_P_VALUE = 0.01
BASELINE_FLOOR = 0.02  # a class is never compared against a disagreement rate below 2 %
# Two candidates "look alike" when one's pixels, slid over the other's neighbourhood, match it
# at least as strongly as a victim must match the prototype (`auditor.scan.victims.MATCH_THRESHOLD`:
# the same statistic, normalized cross-correlation), and their sizes are within a factor 2.
LOOK_ALIKE = 0.6
SIZE_RATIO = 2.0


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
        if check.candidate is not None:
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


@dataclass(frozen=True)
class Appearance:
    """A candidate's pixels and their neighbourhood, float32 in [0, 1] at the data image's own
    scale: `patch` (h, w, 3) is its box, `around` the box grown by its longer side each way (clipped
    to the image); `side` is the box's relative size, `shape` the image's (height, width)."""

    patch: np.ndarray
    around: np.ndarray
    side: float
    shape: tuple[int, int]


def cluster_candidates(features: Sequence[Appearance]) -> list[list[int]]:
    """Leader clustering of candidates' appearances, in the order given.

    Each item joins the first cluster whose leader it looks like (`looks_alike`), else starts
    one. Deterministic; total for any input (a flat patch looks like nothing but another flat
    one of the same colour).
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


def looks_alike(a: Appearance, b: Appearance) -> bool:
    """Whether two candidates look alike: sizes within SIZE_RATIO, and each one's patch found in
    the other's neighbourhood with a normalized cross-correlation >= LOOK_ALIKE. Both ways,
    because a plain patch (one edge between two colours) is found in any neighbourhood that has
    such an edge, while a trigger's pattern is found only where the trigger is.

    Matching pixels where they are, rather than comparing boxes brought to one grid, needs no
    alignment: at 64 px the oracle's boxes around one 8-px colour-block trigger differ by a
    pixel or two in place and aspect, and on one grid the same trigger correlated 0.1-0.4 with
    itself, against 0.95-1.0 slid over its neighbourhood (issue 13, weak ResNet).
    """
    sa, sb = a.side, b.side
    if not (np.isfinite(sa) and np.isfinite(sb)) or min(sa, sb) <= 0:
        return False
    if max(sa, sb) > SIZE_RATIO * min(sa, sb):
        return False
    return min(_found_in(a, b), _found_in(b, a)) >= LOOK_ALIKE


def _found_in(a: Appearance, b: Appearance) -> float:
    """The best normalized cross-correlation of `a.patch` over `b.around`, with `b` brought to
    `a`'s image scale. A flat patch (a solid colour) has no correlation: 1 where `b`'s patch is
    flat too and of the same colour, else 0."""
    from skimage.feature import match_template

    patch = np.clip(np.nan_to_num(a.patch), 0.0, 1.0)
    around = np.clip(np.nan_to_num(b.around), 0.0, 1.0)
    if b.shape != a.shape and min(b.shape) > 0:  # another image size: compare at a's scale
        scale = a.shape[0] / b.shape[0], a.shape[1] / b.shape[1]
        height, width = (max(1, round(n * f)) for n, f in zip(around.shape[:2], scale, strict=True))
        around = resize((around * 255).astype(np.uint8), height, width).astype(np.float32) / 255
    if patch.size == 0 or around.size == 0:
        return 0.0
    if float(patch.std()) < 1e-6:
        other = np.clip(np.nan_to_num(b.patch), 0.0, 1.0)
        flat = other.size > 0 and float(other.std()) < 1e-6
        return float(flat and abs(float(patch.mean()) - float(other.mean())) < 0.1)
    # A patch larger than the neighbourhood (clipped at an image border) is cut to fit.
    patch = patch[: around.shape[0], : around.shape[1]]
    response = match_template(around, patch)
    return float(np.nan_to_num(response, nan=-1.0, posinf=-1.0, neginf=-1.0).max(initial=-1.0))


def _appearance(image: np.ndarray, check: ImageCheck) -> Appearance:
    """The candidate's box and its neighbourhood (the box grown by its longer side each way)."""
    assert check.candidate is not None
    x0, y0, x1, y1 = check.candidate.box
    width, height = x1 - x0, y1 - y0
    grow = max(width, height)  # a box cut short on one axis still gets room to slide along it
    around = (x0 - grow, y0 - grow, x1 + grow, y1 + grow)
    pixels = image.astype(np.float32) / 255.0
    side = float(np.sqrt(max(0.0, width * height)))
    shape = (int(image.shape[0]), int(image.shape[1]))
    return Appearance(box_pixels(pixels, check.candidate.box), box_pixels(pixels, around), side, shape)


FOLLOW_UP = 8  # images per class checked after the sample, chosen by matching a candidate
# Matching every unchecked image of a class costs a decode and a template match per image: at
# web scale, a second pass over DATA as long as stage 0. A class's matches are sought in a
# seeded random pool instead, as large as needed that a trigger on FOLLOW_UP_SHARE of the
# class's images leaves fewer than FOLLOW_UP of them in the pool with probability
# <= FOLLOW_UP_MISS (binomial; 975 images). A triggered image's share of its target's
# predictions is far higher in practice: every triggered image is predicted as the target.
FOLLOW_UP_SHARE = 0.02
FOLLOW_UP_MISS = 1e-3


@cache
def follow_up_pool() -> int:
    """Images per class that `follow_up` matches at most (see FOLLOW_UP_SHARE)."""
    from scipy.stats import binom

    size = FOLLOW_UP
    while binom.cdf(FOLLOW_UP - 1, size, FOLLOW_UP_SHARE) > FOLLOW_UP_MISS:
        size += 1
    return size


def follow_up(
    checks: dict[int, ImageCheck],
    predictions: dict[int, int],
    image: Callable[[int], np.ndarray],
    seed: int = 0,
) -> list[int]:
    """Unchecked images worth the oracle next: per class with a candidate, the FOLLOW_UP
    images predicted as that class that best match its strongest candidate (normalized
    cross-correlation >= the victims' MATCH_THRESHOLD).

    Also for a class that already has a cluster: a small cluster is a poor
    prototype, and once agreeing images' candidates count, a class may hold a cluster of
    natural parts beside the trigger's few (the committed weak blocks ResNet: two clusters of
    3, the trigger's rejected, the target missed, until its follow-up added 8 triggered images).

    Why: a uniform 32-image sample of a class holds only a few of its triggered images (5 of a
    weak ResNet's 53 in the matrix), so the look-alikes a cluster needs may simply not be in
    it. A trigger is the same pattern in every image it was planted in, so matching the one
    candidate seen finds the others without the oracle; the oracle then checks them, and the
    decision stays with the clustering and the transplant test. A benign candidate's matches
    are checked and found benign. `predictions`: data index -> top-1 class (stage 0). A class
    with more than `follow_up_pool()` unchecked images is matched on a random pool of that many
    (`seed`), so the cost is bounded by classes, not images.
    """
    from auditor.scan.trigger import build_prototype
    from auditor.scan.victims import MATCH_THRESHOLD, locate

    strongest: dict[int, ImageCheck] = {}
    for check in checks.values():
        if check.candidate is not None:
            best = strongest.get(check.pred)
            if best is None or (-check.flip, check.index) < (-best.flip, best.index):
                strongest[check.pred] = check
    by_class: dict[int, list[int]] = {cls: [] for cls in strongest}
    for index, cls in predictions.items():
        if cls in by_class and index not in checks:
            by_class[cls].append(index)
    chosen: list[int] = []
    for cls, lead in sorted(strongest.items()):
        assert lead.candidate is not None
        prototype = build_prototype([image(lead.index)], [lead.candidate.box])
        unchecked = sorted(by_class[cls])
        if len(unchecked) > follow_up_pool():
            rng = np.random.default_rng([seed, cls])
            unchecked = sorted(rng.choice(unchecked, follow_up_pool(), replace=False).tolist())
        scored = [(locate(image(i), prototype)[1], i) for i in unchecked]
        matches = sorted((s for s in scored if s[0] >= MATCH_THRESHOLD), key=lambda s: (-s[0], s[1]))
        chosen += [i for _, i in matches[:FOLLOW_UP]]
    return sorted(chosen)


def suspects_pass(
    checks: dict[int, ImageCheck],
    predictions: dict[int, int],
    suspects: set[int],
    room: int,
    seed: int = 0,
    embeddings: Mapping[int, np.ndarray] | None = None,
) -> list[int]:
    """Up to `room` unchecked images predicted as a `suspects` class, the classes taking turns;
    sorted data indices.

    Within a class, the images furthest along the direction from its checked images that agree
    with the oracle to those that disagree without a candidate (stage 0 `embeddings`, {data
    index: float32 (D,)}) come first; without both kinds or embeddings, a random order (`seed`).

    Why a bound: a class suspect by disagreement alone is checked further only for the overlay
    test, whose estimate is a mean over the images that disagree, and its victims list. Checked
    whole, the benign suspects of a weak model took the oracle to 47 % of the matrix's images;
    `room` is what the oracle budget (`ScanConfig.oracle_budget`) leaves after the sample and
    the follow-up. Why this order: the images a trigger turns into a class form a tight
    sub-population of it in the model's embedding space (as in `auditor.scan.screen.strata`),
    so the budget goes to the images likeliest to carry the overlay; the estimate is still a
    mean over the disagreeing images only.
    """
    rng = np.random.default_rng((seed, 3))
    unchecked: dict[int, list[int]] = {}
    for index, pred in sorted(predictions.items()):
        if pred in suspects and index not in checks:
            unchecked.setdefault(pred, []).append(index)
    turns = []
    for cls in sorted(unchecked):
        shuffled = [int(i) for i in rng.permutation(unchecked[cls])]
        mine = [c for c in checks.values() if c.pred == cls]
        towards = [c.index for c in mine if c.disagrees and c.candidate is None]
        away = [c.index for c in mine if not c.disagrees]
        turns.append(
            _furthest_along(shuffled, towards, away, embeddings) if embeddings is not None else shuffled
        )
    return sorted(round_robin(turns, max(0, room)))


def _furthest_along(
    members: list[int], towards: list[int], away: list[int], embeddings: Mapping[int, np.ndarray]
) -> list[int]:
    """`members` by how far their unit embedding lies along the direction from the mean of the
    `away` images to the mean of the `towards` images, furthest first (a stable sort: members
    without an embedding go last, ties keep their order).

    A direction between two means, not the nearest single image: one image's embedding is as
    much its content as its trigger, a mean of a few keeps the shift they share.
    """
    ahead, behind = _mean_unit(towards, embeddings), _mean_unit(away, embeddings)
    if ahead is None or behind is None:
        return members
    placed = [i for i in members if i in embeddings]
    if not placed:
        return members
    units = normalize(np.stack([embeddings[i] for i in placed]))
    along = dict(zip(placed, (units @ (ahead - behind)).tolist(), strict=True))
    return sorted(members, key=lambda i: -along.get(i, -np.inf))


def _mean_unit(indices: list[int], embeddings: Mapping[int, np.ndarray]) -> np.ndarray | None:
    """The mean of the unit embeddings of `indices` that have one, float32 (D,); None if none has."""
    vectors = [embeddings[i] for i in indices if i in embeddings]
    return normalize(np.stack(vectors)).mean(axis=0) if vectors else None
