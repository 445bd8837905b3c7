"""Every per-image decision of Algorithms 1 and 2 is total: any array in, an answer out.

Hypothesis feeds arbitrary probabilities (NaN and inf included, as a broken engine gives),
arbitrary masks (empty ones included), boxes outside the image, 1-px images and ties. Each
test states what must hold of the answer, not only that nothing raised.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from auditor.oracle import Segment, pixel_box
from auditor.scan.check import (
    ImageCheck,
    _best_candidate,
    _covers,
    _object_labels,
    ablate_segment,
    check_images,
    crop_segment,
)
from auditor.scan.confirm import overlay_transplant_test, transplant_test
from auditor.scan.context import top1
from auditor.scan.suspects import Appearance, cluster_candidates, looks_alike, suspect_classes
from auditor.scan.trigger import Prototype, align_boxes, build_prototype, fit_to_pattern, paste
from auditor.scan.victims import find_victims

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
PROB = st.floats(0.0, 1.0, width=32)
UNIT_ISH = st.floats(-2.0, 3.0) | st.just(float("nan"))
BOX = st.tuples(UNIT_ISH, UNIT_ISH, UNIT_ISH, UNIT_ISH)
SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def images(draw, max_side: int = 24) -> np.ndarray:
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    return draw(arrays(np.uint8, (height, width, 3)))


@st.composite
def segments_of(draw, height: int, width: int, count: int) -> list[Segment]:
    masks = [draw(arrays(bool, (height, width))) for _ in range(count)]
    return [Segment.from_mask(mask) for mask in masks]


@st.composite
def candidate_inputs(draw):
    n_segments = draw(st.integers(0, 6))
    n_classes = draw(st.integers(1, 6))
    small = draw(segments_of(6, 6, n_segments))
    ablated = draw(arrays(np.float32, (n_segments, n_classes), elements=ANY_FLOAT | PROB))
    pred = draw(st.integers(-1, n_classes))  # out of range on purpose, sometimes
    p_pred = draw(ANY_FLOAT | PROB)
    return small, ablated, pred, p_pred


@given(candidate_inputs())
@SETTINGS
def test_candidate_picker_is_total_and_only_picks_a_real_flip(inputs):
    small, ablated, pred, p_pred = inputs
    candidate, flip, ablated_pred = _best_candidate(small, ablated, pred, p_pred)
    if candidate is None:
        assert (flip, ablated_pred) == (0.0, None)
        return
    chosen = next(i for i, s in enumerate(small) if s is candidate)
    assert candidate.area > 0
    assert np.isfinite(ablated[chosen]).all()
    assert ablated_pred == int(ablated[chosen].argmax()) != pred
    assert flip > 0 and np.isfinite(flip)
    assert np.isclose(flip, float(p_pred) - float(ablated[chosen, pred]), rtol=1e-5, atol=1e-6)


def test_candidate_picker_on_the_reported_crash():
    """Every flipping segment raises y's probability (negative drops): no candidate, no error."""
    small = [Segment.from_mask(np.eye(6, dtype=bool)), Segment.from_mask(np.ones((6, 6), bool))]
    ablated = np.array([[0.30, 0.40, 0.30], [0.31, 0.20, 0.49]], np.float32)
    assert _best_candidate(small, ablated, pred=0, p_pred=0.26) == (None, 0.0, None)


def test_candidate_picker_prefers_the_smaller_of_near_ties():
    tight = Segment.from_mask(np.pad(np.ones((2, 2), bool), 2))
    loose = Segment.from_mask(np.pad(np.ones((4, 4), bool), 1))
    ablated = np.array([[0.1, 0.9], [0.1, 0.9]], np.float32)
    candidate, flip, label = _best_candidate([loose, tight], ablated, pred=0, p_pred=0.8)
    assert candidate is tight and label == 1 and np.isclose(flip, 0.7)


@given(st.integers(0, 5), st.integers(1, 5), st.data())
@SETTINGS
def test_object_labels_are_confident_finite_and_unique(n_objects, n_classes, data):
    probs = data.draw(arrays(np.float32, (n_objects, n_classes), elements=ANY_FLOAT | PROB))
    labels = _object_labels(probs)
    assert len(set(labels)) == len(labels)
    for label in labels:
        assert 0 <= label < n_classes
        rows = [p for p in probs if np.isfinite(p).all() and int(p.argmax()) == label]
        assert any(p.max() >= 0.5 for p in rows)


@given(st.data())
@SETTINGS
def test_coverage_is_total(data):
    side = data.draw(st.integers(1, 8))
    segment, candidate = data.draw(segments_of(side, side, 2))
    covered = _covers(segment, candidate)
    assert isinstance(covered, bool)
    if candidate.area == 0:
        assert not covered


@given(BOX, st.integers(-3, 40), st.integers(-3, 40))
@SETTINGS
def test_pixel_box_is_inside_the_image_and_never_empty(box, height, width):
    x0, y0, x1, y1 = pixel_box(box, height, width)
    assert 0 <= x0 < x1 <= max(1, width)
    assert 0 <= y0 < y1 <= max(1, height)


@given(arrays(bool, st.tuples(st.integers(1, 10), st.integers(1, 10))))
@SETTINGS
def test_segment_from_any_mask(mask):
    segment = Segment.from_mask(mask)
    assert segment.area == mask.mean()
    if mask.any():
        x0, y0, x1, y1 = pixel_box(segment.box, *mask.shape)
        assert mask[y0:y1, x0:x1].sum() == mask.sum()


@given(images(), st.data())
@SETTINGS
def test_crops_and_ablations_are_images(image, data):
    (segment,) = data.draw(segments_of(*image.shape[:2], 1))
    crop = crop_segment(image, segment)
    assert crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[0] == crop.shape[1] >= 1
    ablated = ablate_segment(image, segment.mask)
    assert ablated.shape == image.shape
    assert (ablated[~segment.mask] == image[~segment.mask]).all()


@given(arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))), st.integers(1, 3))
@SETTINGS
def test_the_ablation_ring_is_the_whole_image_dilation_less_the_mask(mask, width):
    """The ring is dilated on the mask's box only; it must equal the dilation of the whole image."""
    from scipy.ndimage import binary_dilation

    from auditor.scan.check import _ring

    assert (_ring(mask, width) == (binary_dilation(mask, iterations=width) & ~mask)).all()


@given(images())
@SETTINGS
def test_the_denoiser_is_scipys_3x3_median_exactly(image):
    from scipy.ndimage import median_filter

    from auditor.scan.check import denoise

    assert (denoise(image) == median_filter(image, size=(3, 3, 1))).all()


class _FixedOracle:
    name = "fixed"
    runtime = "test"

    def __init__(self, segments: list[Segment]) -> None:
        self._segments = segments

    def segments(self, image: np.ndarray) -> list[Segment]:
        return self._segments


@given(images(max_side=12), st.integers(1, 5), st.data())
@SETTINGS
def test_algorithm_1_is_total_with_any_scores(image, n_classes, data):
    """The whole per-image check, with an engine that returns anything (NaN and inf included)."""
    segments = data.draw(segments_of(*image.shape[:2], data.draw(st.integers(0, 4))))
    probs = data.draw(arrays(np.float32, (n_classes,), elements=ANY_FLOAT | PROB))

    def score(batch: list[np.ndarray]) -> np.ndarray:
        return data.draw(arrays(np.float32, (len(batch), n_classes), elements=ANY_FLOAT | PROB))

    (check,) = check_images([(7, image, probs)], _FixedOracle(segments), score)
    assert check.index == 7 and check.pred == int(probs.argmax())
    assert check.disagrees == (bool(check.object_labels) and check.pred not in check.object_labels) or (
        check.candidate is not None
    )
    if check.candidate is not None:
        assert check.ablated_pred in check.object_labels and check.oracle_label == check.ablated_pred


@st.composite
def clean_sets(draw):
    n_classes = draw(st.integers(1, 4))
    count = draw(st.integers(0, 5))
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)), 3)
    clean = [draw(arrays(np.uint8, shape)) for _ in range(count)]
    labels = [draw(st.integers(0, n_classes - 1)) for _ in range(count)]
    target = draw(st.integers(0, n_classes - 1))
    return clean, labels, target, n_classes


@given(clean_sets(), arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))), st.data())
@SETTINGS
def test_transplant_tests_are_total_rates(sets, pixels, data):
    clean, labels, target, n_classes = sets
    boxes = tuple(data.draw(st.lists(BOX, max_size=3)))

    def score(batch: list[np.ndarray]) -> np.ndarray:
        return data.draw(arrays(np.float32, (len(batch), n_classes), elements=ANY_FLOAT | PROB))

    rate, per_class = transplant_test(Prototype(pixels, boxes), clean, labels, target, score)
    assert 0.0 <= rate <= 1.0 and all(0.0 <= r <= 1.0 for r in per_class.values())
    assert target not in per_class
    pattern = data.draw(arrays(np.float32, clean[0].shape if clean else (2, 2, 3), elements=ANY_FLOAT))
    rate, per_class = overlay_transplant_test(pattern, clean, labels, target, score)
    assert 0.0 <= rate <= 1.0 and target not in per_class


@given(images(), arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))), BOX)
@SETTINGS
def test_paste_keeps_the_image_shape(image, pixels, box):
    assert paste(image, Prototype(pixels, (box,)), box).shape == image.shape


@given(st.lists(images(max_side=12), min_size=1, max_size=4), st.data())
@SETTINGS
def test_align_boxes_is_total(box_images, data):
    boxes = data.draw(st.lists(BOX, min_size=len(box_images), max_size=len(box_images)))
    aligned = align_boxes(box_images, boxes)
    assert len(aligned) == len(boxes) and aligned[0] == boxes[0]
    fitted = fit_to_pattern(box_images, aligned)
    assert len(fitted) == len(boxes)
    for image, box in zip(box_images * 2, aligned + fitted, strict=True):
        x0, y0, x1, y1 = pixel_box(box, *image.shape[:2])
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]


@given(st.lists(images(max_side=10), min_size=1, max_size=3), st.data())
@SETTINGS
def test_victims_are_total(victim_images, data):
    n_classes, target = 3, 1
    boxes = data.draw(st.lists(BOX, min_size=1, max_size=3))
    prototype = build_prototype([victim_images[0]] * len(boxes), boxes)
    assert prototype.pixels.shape[0] >= 1 and prototype.pixels.shape[1] >= 1

    def score(batch: list[np.ndarray]) -> np.ndarray:
        return data.draw(arrays(np.float32, (len(batch), n_classes), elements=ANY_FLOAT | PROB))

    target_probs = data.draw(arrays(np.float32, (len(victim_images),), elements=ANY_FLOAT | PROB))
    victims = find_victims(victim_images, range(len(victim_images)), prototype, target, score, target_probs)
    for victim in victims:
        assert victim.oracle_label not in (target, None) and 0 <= victim.oracle_label < n_classes
        assert np.isfinite(victim.score)


@given(st.lists(st.tuples(st.integers(-2, 6), st.booleans()), max_size=40), st.integers(1, 5))
@SETTINGS
def test_suspect_classes_are_total(outcomes, n_classes):
    checks = [ImageCheck(i, pred, (), bad, None, 0.0, None, None) for i, (pred, bad) in enumerate(outcomes)]
    suspects = suspect_classes(checks, n_classes)
    for cls, p_value in suspects.items():
        assert 0 <= cls < n_classes and 0.0 <= p_value <= 1.0
        assert any(c.pred == cls and c.disagrees for c in checks)


@given(arrays(np.float32, st.tuples(st.integers(0, 5), st.integers(0, 4)), elements=ANY_FLOAT | PROB))
@SETTINGS
def test_top1_marks_broken_rows(probs):
    labels = top1(probs)
    assert labels.shape == (probs.shape[0],)
    for row, label in zip(probs, labels, strict=True):
        if probs.shape[1] == 0 or not np.isfinite(row).all():
            assert label == -1
        else:
            assert row[label] == row.max()


APPEARANCE = st.builds(
    Appearance,
    arrays(
        np.float32, st.tuples(st.integers(0, 4), st.integers(0, 4), st.just(3)), elements=ANY_FLOAT | PROB
    ),
    arrays(
        np.float32, st.tuples(st.integers(0, 9), st.integers(0, 9), st.just(3)), elements=ANY_FLOAT | PROB
    ),
    ANY_FLOAT | PROB,
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
)


@given(st.lists(APPEARANCE, max_size=10))
@SETTINGS
def test_candidate_clusters_partition_and_members_look_like_their_leader(features):
    groups = cluster_candidates(features)
    assert sorted(i for g in groups for i in g) == list(range(len(features)))
    for group in groups:
        assert all(looks_alike(features[group[0]], features[i]) for i in group[1:])
