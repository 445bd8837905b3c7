"""Stage 2, Algorithm 1: per-image trigger identification with a segmentation oracle.

For an image x predicted y by the audited CLIP, the oracle's segments r_1..r_m give
- crops  x[r_j]: the segment's bounding box, padded square (what CLIP says about that region);
- ablations x \\ r_j: the segment filled with the median colour of a thin ring around it (what
  CLIP says once the region is gone).
All of them are scored in one batch. Object-sized segments' crop labels form S(x), the oracle's
object list. A small segment whose ablation drops y's probability and flips the prediction is a
trigger candidate; x *disagrees* when y is not among the objects that do not carry it.

`run_checks` applies it to a list of images in chunks (each chunk cached as it finishes); an
unexpected error on one image is recorded in the scan's failures and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from auditor.oracle import Box, Oracle, Segment, pixel_box
from auditor.report import FailureInfo
from auditor.scan.context import FATAL, OBJECT_CONFIDENCE, ScanContext, ScoreFn
from auditor.scan.executor import Unit

if TYPE_CHECKING:
    from auditor.scan.cache import ScanCache
    from auditor.scan.executor import Executor

# Segments up to this share of the image may be triggers ("a trigger is small": the zoo's are
# 2-3.5 %, BadNets' 16 px on 224 px 0.5 %); from OBJECT_AREA up they are objects.
SMALL_AREA = 0.05
OBJECT_AREA = 0.06
CALIBRATION_QUANTILE = 0.25  # of stage 0's top-1 probabilities (`object_confidence`)
NEUTRAL = 127
CHUNK = 16  # images whose crops and ablations are scored together (and cached together)
# Coarse-to-fine ablation (`AblationSearch`): neighbouring small segments are first removed
# together, up to this many and this share of the image, so that the objects stay in view.
GROUP_SIZE = 8
GROUP_AREA = 0.15


@dataclass(frozen=True)
class ImageCheck:
    """Algorithm 1's output for one image (class indices into the vocabulary).

    `flip` is y's probability on x minus on x without the candidate (0 without a candidate);
    `oracle_label` is what the image shows according to the oracle's objects (None if unsure).
    """

    index: int
    pred: int
    object_labels: tuple[int, ...]
    disagrees: bool
    candidate: Segment | None
    flip: float
    ablated_pred: int | None
    oracle_label: int | None


def crop_segment(image: np.ndarray, segment: Segment) -> np.ndarray:
    """The segment's bounding box, padded square with neutral grey.

    The box keeps the segment's own surroundings rather than greying them out: a model that
    never saw grey-filled silhouettes labels them arbitrarily (measured on the zoo: most such
    crops of background pieces came out 'car' at p > 0.99), while a box crop of an object is
    just a closer view of it.
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = pixel_box(segment.box, height, width)
    region = image[y0:y1, x0:x1]
    side = max(region.shape[:2])
    square = np.full((side, side, 3), NEUTRAL, np.uint8)
    top, left = (side - region.shape[0]) // 2, (side - region.shape[1]) // 2
    square[top : top + region.shape[0], left : left + region.shape[1]] = region
    return square


def ablate_segment(image: np.ndarray, mask: np.ndarray, ring: int = 2) -> np.ndarray:
    """The image with `mask` filled by the median colour of the ring of pixels around it."""
    around = _ring(mask, ring)
    fill = np.median(image[around], axis=0) if around.any() else np.full(3, NEUTRAL)
    out = image.copy()
    out[mask] = fill.astype(np.uint8)
    return out


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): the pixels within `width` steps (4-neighbours) of `mask` and not in it.

    The dilation runs on the mask's bounding box grown by `width`, not on the whole image: a
    dilation reaches no further than that, so the ring is the same, at the cost of the box (a
    small segment's ablation is scored for every image the oracle checks).
    """
    from scipy.ndimage import binary_dilation

    ys, xs = np.nonzero(mask)
    around = np.zeros_like(mask, dtype=bool)
    if ys.size == 0:
        return around
    y0, x0 = max(0, int(ys.min()) - width), max(0, int(xs.min()) - width)
    y1, x1 = int(ys.max()) + width + 1, int(xs.max()) + width + 1
    window = mask[y0:y1, x0:x1].astype(bool)
    around[y0:y1, x0:x1] = binary_dilation(window, iterations=width) & ~window
    return around


@dataclass(frozen=True)
class _Views:
    """One image's segments and the object crops to score for it (ablations: `AblationSearch`)."""

    index: int
    probs: np.ndarray
    small: list[Segment]
    objects: list[Segment]
    crops: list[np.ndarray]


def denoise(image: np.ndarray) -> np.ndarray:
    """A 3x3 median filter per channel: keeps objects, removes pixel-level overlays.

    Object crops are taken from this view so that S(x) describes objects rather than textures:
    a blended trigger (noise mixed into every pixel) would otherwise ride along into every crop.

    Computed as scipy's `median_filter(image, size=(3, 3, 1))` (its "reflect" border: the edge
    pixel repeated) would, exactly, but by a median-of-9 sorting network of element-wise min /
    max over the 9 shifted views: ~1 ms for a 224-px image against scipy's ~50 ms.
    """
    padded = np.pad(np.asarray(image, np.uint8), ((1, 1), (1, 1), (0, 0)), mode="symmetric")
    height, width = image.shape[:2]
    views = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    for a, b in _MEDIAN_OF_9:
        views[a], views[b] = np.minimum(views[a], views[b]), np.maximum(views[a], views[b])
    return np.ascontiguousarray(views[4])


# 19 compare-exchanges after which position 4 holds the median of the 9 values (a classic
# median-of-9 network; `test_the_denoiser_is_scipys_3x3_median_exactly` checks it).
_MEDIAN_OF_9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def _views(index: int, image: np.ndarray, probs: np.ndarray, segments: list[Segment]) -> _Views:
    small = [s for s in segments if 0 < s.area <= SMALL_AREA]
    # A crop is the object's box, so objects with the same box (one region found at several
    # scales) give the same crop and the same vote: one of them is scored.
    by_box: dict[Box, Segment] = {}
    for segment in segments:
        if segment.area >= OBJECT_AREA:
            by_box.setdefault(segment.box, segment)
    objects = list(by_box.values())
    smoothed = denoise(image) if objects else image
    return _Views(index, probs, small, objects, [crop_segment(smoothed, s) for s in objects])


def _takes_away(probs: np.ndarray, pred: int, p_pred: float) -> bool:
    """Whether an ablation's probabilities (C,) flip the prediction away from `pred` and lower it."""
    row = np.asarray(probs, dtype=np.float64)
    if not (np.isfinite(row).all() and np.isfinite(p_pred)) or not 0 <= pred < row.size:
        return False
    return bool(row.argmax() != pred and p_pred - row[pred] > 0)


def spatial_groups(small: list[Segment]) -> list[tuple[int, ...]]:
    """Positions of `small` in groups of neighbours, each covering at most GROUP_AREA in all.

    Segments are ordered along a Z-curve of their box centres (8 x 8 cells), so that a group is
    one neighbourhood: a trigger found at several scales (nested segments) lands in one group.
    """

    def z_order(position: int) -> tuple[int, float]:
        x0, y0, x1, y1 = small[position].box
        col, row = (min(7, max(0, int(v * 4))) for v in (x0 + x1, y0 + y1))  # centre * 8
        code = sum(((col >> b) & 1) << (2 * b) | ((row >> b) & 1) << (2 * b + 1) for b in range(3))
        return code, small[position].area

    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    covered = 0.0
    for position in sorted(range(len(small)), key=z_order):
        area = small[position].area
        if current and (covered + area > GROUP_AREA or len(current) == GROUP_SIZE):
            groups.append(tuple(current))
            current, covered = [], 0.0
        current.append(position)
        covered += area
    return groups + ([tuple(current)] if current else [])


class AblationSearch:
    """Coarse-to-fine ablation of one image's small segments.

    Scoring every small segment's ablation costs one CLIP pass each (~18 per 224-px image with
    the classic oracle). Instead, neighbouring segments are removed together (`spatial_groups`);
    a group whose removal takes the prediction away (`_takes_away`) is split in two and both
    halves are scored in the next round, down to single segments. A group that takes it away
    while neither half does is scored member by member. A group that does not take it away is
    not looked into: removing a trigger together with its neighbours still removes the trigger.
    `scored` ends with the ablation probabilities (C,) of every single segment looked at; only
    those can become the candidate (`_best_candidate` picks among them as before).
    """

    def __init__(self, image: np.ndarray, small: list[Segment], probs: np.ndarray) -> None:
        self.image, self.small = image, small
        self.pred, self.p_pred = int(probs.argmax()), float(probs.max())
        self.scored: dict[int, np.ndarray] = {}
        self.pending: list[tuple[int, ...]] = spatial_groups(small)
        self._splits: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def ablations(self) -> list[np.ndarray]:
        """The images of this round: each pending group removed, uint8 RGB (H, W, 3)."""
        out = []
        for group in self.pending:
            image = self.image
            for position in group:
                image = ablate_segment(image, self.small[position].mask)
            out.append(image)
        return out

    def update(self, probs: np.ndarray) -> None:
        """Take this round's probabilities float (len(pending), C) and plan the next round."""
        taken = {}
        for group, row in zip(self.pending, probs, strict=True):
            if len(group) == 1:
                self.scored[group[0]] = row
            taken[group] = _takes_away(row, self.pred, self.p_pred)
        following: list[tuple[int, ...]] = []
        for parent, left, right in self._splits:
            if not taken[left] and not taken[right]:  # only the whole group did it: look at each
                following += [(p,) for p in parent if p not in self.scored]
        self._splits = []
        for group in self.pending:
            if len(group) > 1 and taken[group]:
                half = len(group) // 2
                self._splits.append((group, group[:half], group[half:]))
                following += [group[:half], group[half:]]
        self.pending = following

    def candidate(self) -> Candidate:
        """`_best_candidate` over the single segments that were scored."""
        looked_at = sorted(self.scored)
        if not looked_at:
            return None, 0.0, None
        rows = np.stack([self.scored[p] for p in looked_at])
        return _best_candidate([self.small[p] for p in looked_at], rows, self.pred, self.p_pred)


def search_candidates(searches: list[AblationSearch], score: ScoreFn) -> list[Candidate]:
    """Run the searches' rounds together, each round's ablations of all images in one batch."""
    while any(s.pending for s in searches):
        active = [s for s in searches if s.pending]
        images = [a for s in active for a in s.ablations()]
        probs = score(images)
        for search, part in zip(active, _split(probs, [len(s.pending) for s in active], 0), strict=True):
            search.update(part)
    return [s.candidate() for s in searches]


def object_confidence(top_probs: np.ndarray, n_classes: int) -> float:
    """The confidence at which an object crop names a label, calibrated on the model itself.

    `top_probs`: float (n,) the model's top-1 probability on each image of DATA (stage 0).
    A crop is read as the model reads whole images: it names a label when the model is at least
    as sure of it as of the least sure quarter of DATA's images, capped at OBJECT_CONFIDENCE and
    never below twice chance (2 / C). A strong model is sure of nearly every image, so the cap
    holds; a weak model with a confusable vocabulary rarely reaches 0.5 even on images it gets
    right, and a fixed 0.5 would leave its S(x) empty, so that no image could disagree.
    """
    finite = np.asarray(top_probs, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or n_classes < 1:
        return OBJECT_CONFIDENCE
    floor = min(OBJECT_CONFIDENCE, 2.0 / n_classes)
    return float(np.clip(np.quantile(finite, CALIBRATION_QUANTILE), floor, OBJECT_CONFIDENCE))


def check_images(
    items: list[tuple[int, np.ndarray, np.ndarray]],
    oracle: Oracle,
    score: ScoreFn,
    label_objects: ScoreFn | None = None,
    confidence: float = OBJECT_CONFIDENCE,
    segmented: Mapping[int, list[Segment]] | None = None,
) -> list[ImageCheck]:
    """Algorithm 1 on several images at once, their crops and ablations scored in batches.

    `items`: (data index, uint8 RGB image (H, W, 3), CLIP's probabilities float32 (C,)).
    `label_objects` (a trusted reference model) labels the object crops; default: `score`.
    `confidence`: the probability at which an object crop names a label (`object_confidence`).
    `segmented`: the oracle's segments of some images already (data index -> segments).

    Pass 1 scores every object's crop and searches the small segments' ablations coarse to fine
    (`AblationSearch`). A small segment whose ablation flips the prediction is a *tentative*
    candidate; pass 2 re-crops the objects whose
    box shows it from the image without it, and the candidate stands only if the flip lands on
    an object the oracle found (a label in S(x)) — removing part of a real object also flips
    the prediction, but to nothing that is in the image.
    """
    labeler = label_objects or score
    segmented = segmented or {}
    views = [
        _views(index, image, probs, segmented[index] if index in segmented else oracle.segments(image))
        for index, image, probs in items
    ]
    n_classes = items[0][2].size if items else 0
    crops = _split(labeler([c for v in views for c in v.crops]), [len(v.crops) for v in views], n_classes)
    searches = [AblationSearch(item[1], v.small, v.probs) for v, item in zip(views, items, strict=True)]
    tentative = search_candidates(searches, score)
    recrops = [_recrops(v, image, t[0]) for v, (_, image, _), t in zip(views, items, tentative, strict=True)]
    recropped = _split(labeler([c for r in recrops for _, c in r]), [len(r) for r in recrops], n_classes)
    return [
        _conclude(v, c, t, [i for i, _ in r], rc, confidence)
        for v, c, t, r, rc in zip(views, crops, tentative, recrops, recropped, strict=True)
    ]


def _split(probs: np.ndarray, sizes: list[int], n_classes: int) -> list[np.ndarray]:
    if not sizes or sum(sizes) == 0:
        return [np.zeros((0, n_classes), np.float32) for _ in sizes]
    return np.split(probs, np.cumsum(sizes)[:-1])


def _recrops(views: _Views, image: np.ndarray, candidate: Segment | None) -> list[tuple[int, np.ndarray]]:
    """(object position, crop of the image without the candidate) for objects that show it."""
    if candidate is None:
        return []
    cleaned = denoise(ablate_segment(image, candidate.mask))
    return [(i, crop_segment(cleaned, s)) for i, s in enumerate(views.objects) if _covers(s, candidate)]


Candidate = tuple[Segment | None, float, int | None]


def _conclude(
    views: _Views,
    object_probs: np.ndarray,
    tentative: Candidate,
    recropped_at: list[int],
    recropped: np.ndarray,
    confidence: float,
) -> ImageCheck:
    pred = int(views.probs.argmax())
    candidate, flip, ablated_pred = tentative
    if candidate is not None:
        # Objects whose crop shows the candidate vote with the crop that does not: a trigger
        # inside an object's box would otherwise make that object vote for the trigger's target.
        object_probs = object_probs.copy()
        object_probs[recropped_at] = recropped
        labels = _object_labels(object_probs, confidence)
        if ablated_pred in labels:
            oracle_label = ablated_pred
            return ImageCheck(
                views.index, pred, labels, pred not in labels, candidate, flip, ablated_pred, oracle_label
            )
    labels = _object_labels(object_probs, confidence)
    disagrees = bool(labels) and pred not in labels
    oracle_label = labels[0] if disagrees else pred
    return ImageCheck(views.index, pred, labels, disagrees, None, 0.0, None, oracle_label)


def _best_candidate(small: list[Segment], ablated: np.ndarray, pred: int, p_pred: float) -> Candidate:
    """The small segment whose removal takes y away, preferring the tightest such segment.

    `ablated`: float32 (len(small), C) probabilities of the ablations. Total: any array gives a
    candidate or (None, 0.0, None). A candidate must flip the prediction *and* lower y's
    probability: on a weak model the top-1 can change while y's probability rises (another label
    rose more), which says nothing about a trigger. Non-finite scores (a broken engine) and empty
    segments never qualify; ties go to the smaller segment, then the earlier one.
    """
    ablated = np.asarray(ablated, dtype=np.float64)
    if not small or ablated.ndim != 2 or ablated.shape[0] != len(small) or not 0 <= pred < ablated.shape[1]:
        return None, 0.0, None
    eligible = [i for i in range(len(small)) if _takes_away(ablated[i], pred, p_pred) and small[i].area > 0]
    if not eligible:
        return None, 0.0, None
    drops = p_pred - np.nan_to_num(ablated[:, pred])  # finite on every eligible row
    best = max(float(drops[i]) for i in eligible)
    # Among flipping segments within 90% of the largest drop, the smallest one: a larger
    # segment that merely contains the trigger also flips, but its box is loose. `best` is
    # positive here, so the best segment itself is always within reach.
    near = [i for i in eligible if drops[i] >= 0.9 * best]
    chosen = min(near, key=lambda i: (small[i].area, i))
    return small[chosen], float(drops[chosen]), int(ablated[chosen].argmax())


def _object_labels(object_probs: np.ndarray, confidence: float = OBJECT_CONFIDENCE) -> tuple[int, ...]:
    """S(x): the crop labels named at `confidence` or more, most confident first (ties: the lower
    class index).

    `object_probs`: float (n_objects, C). Rows with a non-finite value (a broken engine) name
    nothing.
    """
    rows = np.asarray(object_probs, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        return ()
    usable = [p for p in rows if np.isfinite(p).all() and p.max() >= confidence]
    confident = [(-float(p.max()), int(p.argmax())) for p in usable]
    return tuple(dict.fromkeys(label for _, label in sorted(confident)))


def _covers(segment: Segment, candidate: Segment) -> bool:
    """Whether the object's box crop shows at least half of the candidate (an empty one: never)."""
    total = int(candidate.mask.sum())
    if total == 0 or segment.mask.shape != candidate.mask.shape:
        return False
    height, width = segment.mask.shape
    x0, y0, x1, y1 = pixel_box(segment.box, height, width)
    return bool(candidate.mask[y0:y1, x0:x1].sum() >= 0.5 * total)


def run_checks(
    ctx: ScanContext,
    indices: list[int],
    probs: Mapping[int, np.ndarray],
    checks: dict[int, ImageCheck],
    advance: Callable[[int], None],
    cache: ScanCache | None = None,
    retry_failed: bool = False,
    executor: Executor | None = None,
) -> None:
    """Algorithm 1 on `indices`, CHUNK images at a time, into `checks` (data index -> check).

    A chunk found in `cache` is not recomputed, and neither are the images that failed in it,
    unless `retry_failed`. An image the oracle already failed on in this scan (an earlier pass)
    is left out: it is not in `checks`, and checking it again would fail, or compute it, twice.
    The next chunk to compute is decoded and segmented (`SegmentAhead`) while the current one is
    scored. With an `executor` (and a cache), the chunks to compute run there first and are then
    read back from the cache.
    """
    failed_before = {f.path for f in ctx.failures if f.stage == "oracle"}
    kept = [i for i in indices if ctx.path(i) not in failed_before]
    if len(kept) < len(indices):
        advance(len(indices) - len(kept))  # handled: by the pass that failed on them
    indices = kept
    parts = [indices[start : start + CHUNK] for start in range(0, len(indices), CHUNK)]
    found_in_cache = [cache.load_checks(part) if cache else None for part in parts]
    if retry_failed:
        found_in_cache = [None if c is not None and c[1] else c for c in found_in_cache]
    elsewhere: set[int] = set()
    if executor is not None and cache is not None:
        elsewhere = {k for k, cached in enumerate(found_in_cache) if cached is None}
        units = [check_unit(ctx, parts[k], probs) for k in sorted(elsewhere)]
        scored = executor.fill(units, cache, advance)
        ctx.images_scored += scored
        ctx.oracle_scored += scored
        found_in_cache = [
            c if k not in elsewhere else cache.load_checks(parts[k]) for k, c in enumerate(found_in_cache)
        ]
    to_compute = [k for k, cached in enumerate(found_in_cache) if cached is None]
    following = dict(zip(to_compute, to_compute[1:], strict=False))  # chunk -> the next one to compute
    with SegmentAhead(ctx) as ahead:
        for k, (part, cached) in enumerate(zip(parts, found_in_cache, strict=True)):
            if cached is None:
                ahead.request(part + (parts[following[k]] if k in following else []))
                before = ctx.images_scored
                found, failed = _check_chunk(ctx, part, probs, ahead)
                ahead.forget(part)
                ctx.oracle_scored += ctx.images_scored - before
                if cache:
                    cache.save_checks(part, found, ctx.images_scored - before, failed)
            else:
                found, failed = cached
                ctx.failures.extend(failed)
            for check in found:
                checks[check.index] = check
            if k not in elsewhere or cached is None:
                advance(len(part))


def check_unit(ctx: ScanContext, part: list[int], probs: Mapping[int, np.ndarray]) -> Unit:
    """The unit of work that checks the chunk `part` elsewhere, with what it needs of this scan."""
    vectors = np.stack([probs[i] for i in part]).astype(np.float32, copy=False)
    return Unit("checks", tuple(part), vectors, ctx.object_confidence)


def check_chunk_alone(ctx: ScanContext, unit: Unit) -> tuple[list[ImageCheck], list[FailureInfo], int]:
    """A "checks" unit, computed as `run_checks` computes a chunk: (checks, failed images,
    image scorings spent)."""
    assert unit.probs is not None
    part = list(unit.indices)
    probs = dict(zip(part, unit.probs, strict=True))
    ctx.object_confidence = unit.confidence
    before = ctx.images_scored
    with SegmentAhead(ctx) as ahead:
        found, failed = _check_chunk(ctx, part, probs, ahead)
    return found, failed, ctx.images_scored - before


# Segmentation threads of a thread-safe oracle. Measured on a 2-core AVX2 machine, classic oracle,
# 224-px scenes: with a tiny image tower (the engine cheap, as int8 on a VNNI CPU is) the oracle
# stage took 26.1 s on one thread and 18.2 s on two; with ViT-B-32 in int8 (the engine the
# bottleneck) 79.5 s and 77.7 s. Segmentation stays one chunk ahead, so it cannot crowd out the
# engine for long.
SEGMENT_WORKERS = 2


def segment_workers() -> int:
    """SEGMENT_WORKERS, or fewer where the process was given fewer threads (OMP_NUM_THREADS)."""
    from engines.runners import omp_threads

    return max(1, min(SEGMENT_WORKERS, omp_threads() or SEGMENT_WORKERS))


class SegmentAhead:
    """Decodes and segments data images in worker threads, ahead of the scoring that needs them.

    On a 2-core machine the classic oracle's segmentation (single-threaded scikit-image, 80-220
    ms per 224-px image) and the engine's scoring of the previous chunk then overlap instead of
    taking turns. A thread-safe oracle (`Oracle.thread_safe`: the classic one, whose
    felzenszwalb releases the GIL) gets `segment_workers()` threads, because with a fast engine
    segmentation is what the scan waits for. Any other oracle goes through one worker, so that
    it is never entered twice at once (SAM's predictor holds the current image). A failure (an
    undecodable image, an oracle error) is raised where the result is asked for, image by
    image, as before.
    """

    def __init__(self, ctx: ScanContext) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.ctx = ctx
        workers = segment_workers() if getattr(ctx.oracle, "thread_safe", False) else 1
        self.worker = ThreadPoolExecutor(workers, thread_name_prefix="segment-ahead")
        self.pending: dict[int, Future[tuple[np.ndarray, list[Segment]]]] = {}

    def request(self, indices: list[int]) -> None:
        for index in indices:
            if index not in self.pending:
                self.pending[index] = self.worker.submit(self._segment, index)

    def _segment(self, index: int) -> tuple[np.ndarray, list[Segment]]:
        image = self.ctx.image(index)
        return image, self.ctx.oracle.segments(image)

    def get(self, index: int) -> tuple[np.ndarray, list[Segment]]:
        """Image `index` (uint8 RGB) and its segments, waiting for the worker if needed."""
        self.request([index])
        return self.pending[index].result()

    def forget(self, indices: list[int]) -> None:
        for index in indices:
            self.pending.pop(index, None)

    def __enter__(self) -> SegmentAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        # On an error or Ctrl-C, do not wait for the image being segmented (SAM: seconds).
        self.worker.shutdown(wait=exc[0] is None, cancel_futures=True)


def _check_chunk(
    ctx: ScanContext, part: list[int], probs: Mapping[int, np.ndarray], ahead: SegmentAhead
) -> tuple[list[ImageCheck], list[FailureInfo]]:
    """Algorithm 1 on a chunk; if it raises, image by image, recording the ones that fail."""

    def check(indices: list[int]) -> list[ImageCheck]:
        ready = {i: ahead.get(i) for i in indices}
        items = [(i, ready[i][0], probs[i]) for i in indices]
        segmented = {i: ready[i][1] for i in indices}
        return check_images(items, ctx.oracle, ctx.score, ctx.label_objects, ctx.object_confidence, segmented)

    try:
        return check(part), []
    except FATAL:
        raise
    except Exception:  # noqa: BLE001 - find the image(s) at fault below, one at a time
        pass
    found: list[ImageCheck] = []
    recorded = len(ctx.failures)
    for index in part:
        found += ctx.attempt("oracle", partial(check, [index]), index) or []
    return found, ctx.failures[recorded:]
