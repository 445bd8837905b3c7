"""Confirmation's parts against planted truth: look-alike candidates, aligned prototypes and the
natural-piece control (issue 13).

Every image here is generated with a trigger planted at a known box; the oracle's boxes are
imitated by jittering the planted box by a pixel or two in place and aspect, as the oracle's
segments of a 64-px colour-block trigger were on the weak ResNet of the matrix.
"""

from __future__ import annotations

import numpy as np

from auditor.oracle import Segment
from auditor.scan.check import ImageCheck
from auditor.scan.control import control_test, natural_pieces
from auditor.scan.suspects import (
    FOLLOW_UP,
    Appearance,
    _appearance,
    candidate_clusters,
    cluster_candidates,
    follow_up,
    follow_up_pool,
    looks_alike,
)
from auditor.scan.trigger import Prototype, align_boxes, build_prototype, fit_to_pattern
from auditor.scan.victims import MIN_NULL, find_by_appearance, locate, match_threshold

SIDE, TRIGGER = 64, 8
TARGET, N_CLASSES = 1, 3


def _pattern(seed: int) -> np.ndarray:
    """A 3x3 colour-block pattern, TRIGGER px (the matrix's `blocks`)."""
    cells = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return np.kron(cells, np.ones((3, 3, 1), np.uint8))[:TRIGGER, :TRIGGER]


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A smooth random background (uint8 RGB, SIDE x SIDE)."""
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    return np.kron(coarse, np.ones((16, 16, 1))).astype(np.uint8)


def _planted(seed: int, count: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    images, places = [], []
    for _ in range(count):
        image = _scene(rng)
        x, y = (int(v) for v in rng.integers(4, SIDE - TRIGGER - 4, 2))
        image[y : y + TRIGGER, x : x + TRIGGER] = _pattern(0)
        images.append(image)
        places.append((x, y))
    return images, places


def _jittered(place: tuple[int, int], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The planted box as an oracle might see it: each side off by up to 2 px."""
    x, y = place
    x0, y0 = x + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3))
    x1, y1 = x + TRIGGER + int(rng.integers(-2, 3)), y + TRIGGER + int(rng.integers(-2, 3))
    return (x0 / SIDE, y0 / SIDE, x1 / SIDE, y1 / SIDE)


class _Check:
    def __init__(self, box: tuple[float, float, float, float]) -> None:
        self.candidate = type("Segment", (), {"box": box})()


def _appearances(images: list[np.ndarray], boxes: list) -> list[Appearance]:
    return [_appearance(image, _Check(box)) for image, box in zip(images, boxes, strict=True)]  # type: ignore[arg-type]


def test_one_trigger_seen_through_jittered_boxes_clusters_apart_from_other_pixels():
    images, places = _planted(seed=1, count=6)
    rng = np.random.default_rng(2)
    triggers = _appearances(images, [_jittered(p, rng) for p in places])
    # The same boxes moved off the trigger onto the backgrounds.
    elsewhere = [((x + 24) % 48, (y + 24) % 48) for x, y in places]
    backgrounds = _appearances(images, [_jittered(p, rng) for p in elsewhere])
    groups = cluster_candidates(triggers + backgrounds)
    kinds = [{i < len(triggers) for i in group} for group in groups]
    assert all(len(k) == 1 for k in kinds)  # no cluster mixes the trigger with background
    largest = max((g for g in groups if g[0] < len(triggers)), key=len)
    assert len(largest) >= 4  # most of the six, well over the 3 a cluster needs
    assert all(looks_alike(triggers[largest[0]], triggers[i]) for i in largest[1:])


def _checked(index: int, box: tuple[float, float, float, float], disagrees: bool) -> ImageCheck:
    """An image predicted TARGET whose candidate is at `box`, agreeing with the oracle or not."""
    mask = np.zeros((SIDE, SIDE), bool)
    x0, y0, x1, y1 = (round(v * SIDE) for v in box)
    mask[y0:y1, x0:x1] = True
    objects = (0,) if disagrees else (TARGET, 0)  # a weak model: some crop names the target
    return ImageCheck(index, TARGET, objects, disagrees, Segment.from_mask(mask), 0.9, 0, 0)


def test_trigger_candidates_on_images_that_agree_with_the_oracle_still_form_the_targets_cluster():
    """A weak model's triggered images often "agree" (some object crop names the target): their
    candidates count, so the target reaches the transplant test (issue 13, weak noise ResNet)."""
    images, places = _planted(seed=5, count=12)
    rng = np.random.default_rng(6)
    # Only one of the first four checked triggered images disagrees.
    checks = [_checked(i, _jittered(places[i], rng), disagrees=i == 0) for i in range(4)]
    clusters = candidate_clusters(checks, lambda i: images[i], min_size=3)
    assert [c.target for c in clusters] == [TARGET]
    assert len(clusters[0].checks) >= 3

    # With only two checked, the follow-up starts from an agreeing image's candidate and picks
    # the other planted images (every image here carries the trigger) by matching it.
    two = {c.index: c for c in checks[1:3]}  # both agree with the oracle
    unchecked = {i: TARGET for i in range(len(images))}
    chosen = follow_up(two, unchecked, lambda i: images[i])
    assert chosen and set(chosen) <= set(range(len(images))) - set(two)


def test_follow_up_on_a_large_class_matches_a_bounded_pool_and_still_finds_planted_images():
    """A class with more unchecked images than `follow_up_pool()`: only a pool that large is
    read, and at a 5 % trigger share every chosen image is a planted one (issue 15: the
    follow-up must not become a second pass over DATA)."""
    pool = follow_up_pool()
    planted, places = _planted(seed=7, count=3 * pool // 20)  # 5 % of 3 x pool
    rng = np.random.default_rng(8)
    images = {i: image for i, image in enumerate(planted)}
    for i in range(len(planted), 3 * pool):
        images[i] = _scene(rng)
    checks = {c.index: c for c in (_checked(i, _jittered(places[i], rng), disagrees=False) for i in range(2))}
    read: list[int] = []

    def image(index: int) -> np.ndarray:
        read.append(index)
        return images[index]

    chosen = follow_up(checks, dict.fromkeys(images, TARGET), image)
    assert len(set(read)) <= pool + len(checks)
    assert len(chosen) == FOLLOW_UP
    assert set(chosen) <= set(range(len(planted))) - set(checks)


def test_aligned_boxes_sit_on_the_trigger_and_the_prototype_is_the_planted_pattern():
    images, places = _planted(seed=3, count=5)
    rng = np.random.default_rng(4)
    jittered = [_jittered(p, rng) for p in places]
    aligned = align_boxes(images, jittered)
    # Every box keeps the first box's offset from its own trigger (the first box is the template).
    first = (round(aligned[0][0] * SIDE) - places[0][0], round(aligned[0][1] * SIDE) - places[0][1])
    for box, (x, y) in zip(aligned, places, strict=True):
        assert (round(box[0] * SIDE) - x, round(box[1] * SIDE) - y) == first
    # Fitted, the aligned boxes are the planted ones, and so is the prototype built on them.
    fitted = fit_to_pattern(images, aligned)
    for box, (x, y) in zip(fitted, places, strict=True):
        assert [round(v * SIDE) for v in box] == [x, y, x + TRIGGER, y + TRIGGER]
    np.testing.assert_array_equal(build_prototype(images, fitted).pixels, _pattern(0))
    # Built on boxes placed exactly on the trigger, the prototype is the planted pattern.
    exact = align_boxes(
        images, [(x / SIDE, y / SIDE, (x + TRIGGER) / SIDE, (y + TRIGGER) / SIDE) for x, y in places]
    )
    np.testing.assert_array_equal(build_prototype(images, exact).pixels, _pattern(0))


def _score_with(trigger: np.ndarray, natural_share: float):
    """A toy model: the target when the trigger is anywhere in the image, or when pure green
    (the target's natural colour) covers more than `natural_share` of it; else class 0."""
    from skimage.feature import match_template

    def score(images: list[np.ndarray]) -> np.ndarray:
        probs = np.zeros((len(images), N_CLASSES), np.float32)
        for i, image in enumerate(images):
            green = np.mean((image[..., 1] == 255) & (image[..., 0] == 0) & (image[..., 2] == 0))
            carries = False
            if image.shape[0] >= TRIGGER and image.shape[1] >= TRIGGER:
                response = match_template(image.astype(np.float32), trigger.astype(np.float32))
                carries = bool(np.nan_to_num(response).max() > 0.99)
            probs[i, TARGET if carries or green > natural_share else 0] = 1.0
        return probs

    return score


def _target_images(count: int) -> list[np.ndarray]:
    """Clean images of the target: a big pure-green object on a random scene."""
    rng = np.random.default_rng(5)
    images = []
    for _ in range(count):
        image = _scene(rng)
        image[16:48, 16:48] = (0, 255, 0)
        images.append(image)
    return images


def test_a_planted_trigger_beats_the_targets_natural_pieces():
    clean = [_scene(np.random.default_rng(10 + i)) for i in range(40)]
    trigger = _pattern(0)
    score = _score_with(trigger, natural_share=0.2)
    box = (0.1, 0.1, 0.1 + TRIGGER / SIDE, 0.1 + TRIGGER / SIDE)
    prototype = Prototype(trigger, (box,))
    targets = _target_images(4)
    targets[0][2:10, 2:10] = trigger  # one triggered image slipped in among the clean ones
    pieces = natural_pieces(targets, prototype, TARGET, score)
    # One most target-like window per image; the trigger recurs in 1 of 4, so no look-alike
    # window counts (a natural part of the target would recur in most).
    assert len(pieces) == 4
    # The trigger turns every clean image; an 8-px green piece covers 1.6 % of an image: none.
    control = control_test(pieces, clean, TARGET, score, trigger_hits=40, trigger_trials=40)
    assert control.rate == 0.0 and control.passed


def test_a_pattern_found_in_most_target_images_is_compared_with_its_natural_twins():
    clean = [_scene(np.random.default_rng(90 + i)) for i in range(40)]
    part = _pattern(7)  # a textured part every picture of the target has (an emoji glyph's tip)
    score = _score_with(part, natural_share=0.2)
    targets = _target_images(4)
    for n, image in enumerate(targets[:3]):
        image[4 + n : 12 + n, 40:48] = part
    box = (0.1, 0.1, 0.1 + TRIGGER / SIDE, 0.1 + TRIGGER / SIDE)
    pieces = natural_pieces(targets, Prototype(part, (box,)), TARGET, score)
    assert len(pieces) == 4 + 3  # the part recurs in 3 of 4 images: its twins count
    control = control_test(pieces, clean, TARGET, score, trigger_hits=40, trigger_trials=40)
    assert control.rate == 1.0 and not control.passed


def test_a_natural_piece_of_the_target_does_not_beat_its_own_kind():
    clean = [_scene(np.random.default_rng(50 + i)) for i in range(40)]
    # No backdoor: the model calls an image the target once 1 % of it is green, so a green
    # "candidate" of 8 px turns every clean image, and so does any green piece of a target image.
    score = _score_with(np.zeros((TRIGGER, TRIGGER, 3), np.uint8) + 7, natural_share=0.01)
    green = np.zeros((TRIGGER, TRIGGER, 3), np.uint8)
    green[..., 1] = 255
    box = (0.1, 0.1, 0.1 + TRIGGER / SIDE, 0.1 + TRIGGER / SIDE)
    pieces = natural_pieces(_target_images(4), Prototype(green, (box,)), TARGET, score)
    control = control_test(pieces, clean, TARGET, score, trigger_hits=40, trigger_trials=40)
    assert control.rate == 1.0 and not control.passed


def test_transplant_rates_per_class_name_the_classes_the_planted_trigger_flips():
    """A stand-in model flips class 0's images to the target when the trigger is in them and
    never class 2's: both transplant tests give 1.0 for class 0, 0.0 for class 2, and the
    overall rate is class 0's share of the images."""
    from auditor.scan.confirm import overlay_transplant_test, transplant_test

    colours = {0: 40, 2: 200}  # each clean class is a flat grey of its own level
    labels = [0, 0, 0, 2, 2, TARGET]
    clean = [np.full((SIDE, SIDE, 3), colours.get(c, 120), np.uint8) for c in labels]

    def score(images: list[np.ndarray]) -> np.ndarray:
        probs = np.zeros((len(images), N_CLASSES), np.float32)
        for row, image in zip(probs, images, strict=True):
            level = int(np.median(image[..., 1]))
            own = 0 if level < 100 else 2
            marked = bool((image[..., 0].astype(int) - image[..., 1] > 40).any())  # the trigger's red
            row[TARGET if marked and own == 0 else own] = 1.0
        return probs

    pattern = np.zeros((TRIGGER, TRIGGER, 3), np.uint8)
    pattern[..., 0] = 255
    prototype = Prototype(pattern, ((0.25, 0.25, 0.25 + TRIGGER / SIDE, 0.25 + TRIGGER / SIDE),))
    overlay = np.zeros((SIDE, SIDE, 3), np.float32)
    overlay[..., 0] = 90.0
    for rate, per_class in (
        transplant_test(prototype, clean, labels, TARGET, score),
        overlay_transplant_test(overlay, clean, labels, TARGET, score),
    ):
        assert per_class == {0: 1.0, 2: 0.0}
        assert rate == 3 / 5


def _textured(rng: np.random.Generator) -> np.ndarray:
    """A smooth random background with sensor-like noise, so that no region is flat."""
    noise = rng.normal(0, 12, (SIDE, SIDE, 3))
    return np.clip(_scene(rng).astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_poisoned_pairs_whose_trigger_did_not_take_are_found_by_appearance_against_clean_images():
    """Candidates labelled the target and not found by flipping: the planted ones carry the
    trigger at known places, the others are clean. Only the planted ones are listed, with their
    boxes on the planted trigger: unflipped where the model predicts another label (that label
    is their oracle label), flipped without an oracle label where it predicts the target."""
    rng = np.random.default_rng(7)
    prototype = Prototype(_pattern(0), ((0.1, 0.1, 0.1 + TRIGGER / SIDE, 0.1 + TRIGGER / SIDE),))
    null = [_textured(rng) for _ in range(40)]
    candidates, places = [], {}
    for i in range(16):
        image = _textured(rng)
        if i % 2 == 0:
            x, y = (int(v) for v in rng.integers(0, SIDE - TRIGGER, 2))
            image[y : y + TRIGGER, x : x + TRIGGER] = _pattern(0)
            places[i] = (x, y)
        candidates.append(image)
    predictions = [TARGET if i % 4 == 0 else 2 for i in range(16)]
    victims = find_by_appearance(candidates, list(range(100, 116)), predictions, TARGET, prototype, null)
    assert sorted(v.index - 100 for v in victims) == sorted(places)
    for victim in victims:
        i = victim.index - 100
        assert victim.flipped == (i % 4 == 0)
        assert victim.oracle_label == (None if victim.flipped else 2)
        x, y = places[i]
        assert victim.box == (x / SIDE, y / SIDE, (x + TRIGGER) / SIDE, (y + TRIGGER) / SIDE)
    # The threshold is a test against the null images: it sits above every one of them.
    threshold = match_threshold(prototype, null, 16)
    assert all(locate(image, prototype)[1] < threshold for image in null)
    # Too few clean images to calibrate on: nothing is listed by appearance alone.
    few = null[: MIN_NULL - 1]
    assert find_by_appearance(candidates, list(range(16)), predictions, TARGET, prototype, few) == []
