"""Stage 3, victim samples: images that carry a target's trigger.

A victim matches the prototype by appearance (template matching, normalized cross-correlation)
and stops being predicted as the target once the matched region is removed; the label it then
gets is its oracle label (what the image really shows).

A poisoned pair is labelled the target and carries the trigger. Where the trigger did not take
(the model still predicts what the image shows), or where blanking it does not undo the
prediction (a weak model), nothing flips: such an image is a victim by appearance alone,
matched more strongly than clean images of other labels are (`find_by_appearance`, a test
calibrated on those images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from auditor.scan.check import ablate_segment
from auditor.scan.context import ScoreFn, top1
from auditor.scan.trigger import Box, Prototype, box_mask, resize

MATCH_THRESHOLD = 0.6  # normalized cross-correlation with the prototype
FLIP_THRESHOLD = 0.3  # drop of the target's probability once the matched region is removed
# An unflipped victim has only its appearance to show. Its match must beat every clean image of
# another label, and a normal tail fitted to their matches at a family-wise error of
# FALSE_MATCH_RATE over all the candidates (Bonferroni), so that a scan expects fewer than that
# many false victims of this kind; with fewer than MIN_NULL clean images there is no test.
FALSE_MATCH_RATE = 0.05
MIN_NULL = 20


@dataclass(frozen=True)
class Victim:
    """An image judged poisoned: index into the data, trigger box (normalized) and score."""

    index: int
    box: Box | None
    oracle_label: int | None
    score: float
    flipped: bool = True  # False: labelled the target and carrying its trigger, not predicted as it


def find_victims(
    images: Sequence[np.ndarray],
    indices: Sequence[int],
    prototype: Prototype,
    target: int,
    score: ScoreFn,
    target_probs: np.ndarray,
) -> list[Victim]:
    """Of `images` (all predicted `target`; data `indices`), those that carry the prototype
    (by appearance) and are no longer predicted `target` once the matched region is removed.

    No oracle is needed: the prototype stands in for it (Algorithm 2).
    `target_probs`: float32 (n,) the target's probability on each whole image, already scored.
    """
    located = [locate(image, prototype) for image in images]
    ablated = score(
        [ablate_segment(image, box_mask(image, box)) for image, (box, _) in zip(images, located, strict=True)]
    )
    ablated_top1 = top1(ablated)
    victims = []
    for i, index in enumerate(indices):
        box, similarity = located[i]
        drop = float(target_probs[i] - ablated[i, target])
        drop = drop if np.isfinite(drop) else 0.0  # a broken engine's NaN / inf decides nothing
        flipped = ablated_top1[i] not in (target, -1)
        if similarity >= MATCH_THRESHOLD and drop >= FLIP_THRESHOLD and flipped:
            label = int(ablated_top1[i])
            victims.append(Victim(int(index), box, label, round(float(similarity * drop), 4)))
    return victims


def locate(image: np.ndarray, prototype: Prototype) -> tuple[Box, float]:
    """Best match of the prototype (at its median observed size) in `image`: (box, NCC score)."""
    from skimage.feature import match_template

    height, width = image.shape[:2]
    w, h = prototype.size_in(height, width)
    template = resize(prototype.pixels, h, w).astype(np.float32)
    # A flat template or image has no defined correlation (NaN): it matches nothing.
    response = np.nan_to_num(
        match_template(image.astype(np.float32), template, pad_input=False)[..., 0], nan=-1.0, posinf=-1.0
    )
    y, x = np.unravel_index(int(response.argmax()), response.shape)
    return (x / width, y / height, (x + w) / width, (y + h) / height), float(response[y, x])


def find_by_appearance(
    images: Sequence[np.ndarray],
    indices: Sequence[int],
    predictions: Sequence[int],
    target: int,
    prototype: Prototype,
    null_images: Sequence[np.ndarray],
) -> list[Victim]:
    """Of `images` (labelled the target in the data, not found by `find_victims`; data `indices`,
    their top-1 `predictions`), those whose best match with the prototype exceeds
    `match_threshold` on `null_images` (uint8 (H, W, 3) clean images of other labels).

    One predicted as another label is unflipped, and that label is its oracle label (the trigger
    did not change it); one predicted as the target has no known oracle label.
    """
    if not images:
        return []
    threshold = match_threshold(prototype, null_images, len(images))
    victims = []
    for image, index, label in zip(images, indices, predictions, strict=True):
        box, similarity = locate(image, prototype)
        if similarity > threshold:
            flipped = label == target
            oracle = None if flipped else int(label)
            victims.append(Victim(int(index), box, oracle, round(similarity, 4), flipped=flipped))
    return victims


def match_threshold(prototype: Prototype, null_images: Sequence[np.ndarray], candidates: int) -> float:
    """The similarity an image must exceed to carry the prototype by appearance alone: the
    largest of MATCH_THRESHOLD, the best match on any null image, and the null matches' mean +
    z * std with z the normal quantile of 1 - FALSE_MATCH_RATE / candidates. Infinite (nothing
    passes) with fewer than MIN_NULL null images."""
    if len(null_images) < MIN_NULL:
        return float("inf")
    null = np.array([locate(image, prototype)[1] for image in null_images], np.float64)
    z = NormalDist().inv_cdf(1.0 - FALSE_MATCH_RATE / max(1, candidates))
    return float(max(MATCH_THRESHOLD, null.max(), null.mean() + z * null.std()))
