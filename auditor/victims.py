"""Algorithm 2: target labels, the trigger prototype, its confirmation, victims; the compact set.

Input: Algorithm 1's `ImageCheck`s. Output, per DESIGN §4 stage 3:
1. suspect classes: per predicted class, disagreement well above the other classes' (one-sided
   binomial test against their pooled rate, Bonferroni over classes);
2. a prototype: the trigger candidates' pixels, aligned on their boxes and merged by median;
3. the transplant test: the prototype pasted into clean images of other classes at the observed
   sizes and places; the share then predicted as the target confirms (or not) a backdoor;
4. victims: images predicted as the target whose trigger matches the prototype in appearance
   (template matching) and whose removal flips the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditor.oracle import pixel_box
from auditor.trigger import ImageCheck, ScoreFn, ablate_segment, denoise

SUSPECT_P_VALUE = 0.01
BASELINE_FLOOR = 0.02  # a class is never compared against a disagreement rate below 2 %
MATCH_THRESHOLD = 0.6  # normalized cross-correlation with the prototype
FLIP_THRESHOLD = 0.3  # drop of the target's probability once the matched region is removed


@dataclass(frozen=True)
class Prototype:
    """The recovered trigger: pixels uint8 (s, s, 3) and observed boxes (normalized)."""

    pixels: np.ndarray
    boxes: tuple[tuple[float, float, float, float], ...]

    @property
    def relative_size(self) -> tuple[float, float]:
        widths = [b[2] - b[0] for b in self.boxes]
        heights = [b[3] - b[1] for b in self.boxes]
        return float(np.median(widths)), float(np.median(heights))


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


def build_prototype(
    images: Sequence[np.ndarray], boxes: Sequence[tuple[float, float, float, float]]
) -> Prototype:
    """Median of the boxes' pixels, each resized to the boxes' median side in pixels.

    `images`: uint8 RGB (H, W, 3), one per box (at least one). Every box gives at least one pixel
    (`pixel_box` clips), so the prototype is at least 1x1.
    """
    if not boxes or len(images) != len(boxes):
        raise ValueError("a prototype needs one image per box, and at least one box")
    crops = [_box_pixels(image, box) for image, box in zip(images, boxes, strict=True)]
    side = int(np.median([max(c.shape[:2]) for c in crops]))
    stack = np.stack([_resize(c, side, side) for c in crops])
    return Prototype(np.median(stack, axis=0).astype(np.uint8), tuple(boxes))


def paste(image: np.ndarray, prototype: Prototype, box: tuple[float, float, float, float]) -> np.ndarray:
    """The prototype resized into `box` (normalized) of a copy of `image`."""
    height, width = image.shape[:2]
    left, top, right, bottom = np.clip(np.nan_to_num(np.asarray(box, np.float64)), 0.0, 1.0)
    # At least 2 px each way (a 1-px paste loses the pattern), never more than the image.
    w = min(width, max(2, int(round((right - left) * width))))
    h = min(height, max(2, int(round((bottom - top) * height))))
    x0 = max(0, min(int(round(left * width)), width - w))
    y0 = max(0, min(int(round(top * height)), height - h))
    out = image.copy()
    out[y0 : y0 + h, x0 : x0 + w] = _resize(prototype.pixels, h, w)
    return out


def transplant_test(
    prototype: Prototype,
    clean: Sequence[np.ndarray],
    clean_labels: Sequence[int],
    target: int,
    score: ScoreFn,
    seed: int = 0,
) -> tuple[float, dict[int, float]]:
    """Share of clean non-target images predicted `target` once the prototype is pasted in.

    Returns (overall rate, {class: rate}) — the per-class rates name the victim labels.
    """
    rng = np.random.default_rng(seed)
    chosen = [i for i, label in enumerate(clean_labels) if label != target]
    if not chosen or not prototype.boxes:
        return 0.0, {}
    pasted = [
        paste(clean[i], prototype, prototype.boxes[int(rng.integers(len(prototype.boxes)))]) for i in chosen
    ]
    hits = top1(score(pasted)) == target
    per_class: dict[int, list[bool]] = {}
    for i, hit in zip(chosen, hits, strict=True):
        per_class.setdefault(clean_labels[i], []).append(bool(hit))
    return float(hits.mean()), {c: float(np.mean(v)) for c, v in sorted(per_class.items())}


def overlay_pattern(images: Sequence[np.ndarray]) -> np.ndarray:
    """A non-localized trigger's estimate: the median residual x - denoise(x), float32 (H, W, 3).

    Image content differs from image to image while a blended overlay is the same everywhere,
    so the per-pixel median of the residuals keeps the overlay's fine structure.
    """
    height, width = images[0].shape[:2]
    residuals = [
        image.astype(np.float32) - denoise(image).astype(np.float32)
        for image in images
        if image.shape[:2] == (height, width)
    ]
    return np.median(np.stack(residuals), axis=0).astype(np.float32)


def overlay_transplant_test(
    pattern: np.ndarray, clean: Sequence[np.ndarray], clean_labels: Sequence[int], target: int, score: ScoreFn
) -> tuple[float, dict[int, float]]:
    """Like `transplant_test`, adding the overlay estimate to clean images of other labels."""
    chosen = [
        i for i, label in enumerate(clean_labels) if label != target and clean[i].shape == pattern.shape
    ]
    if not chosen:
        return 0.0, {}
    overlaid = [
        np.clip(clean[i].astype(np.float32) + np.nan_to_num(pattern), 0, 255).astype(np.uint8) for i in chosen
    ]
    hits = top1(score(overlaid)) == target
    per_class: dict[int, list[bool]] = {}
    for i, hit in zip(chosen, hits, strict=True):
        per_class.setdefault(clean_labels[i], []).append(bool(hit))
    return float(hits.mean()), {c: float(np.mean(v)) for c, v in sorted(per_class.items())}


@dataclass(frozen=True)
class Victim:
    """An image judged poisoned: index into the data, trigger box (normalized) and score."""

    index: int
    box: tuple[float, float, float, float] | None
    oracle_label: int | None
    score: float


def find_victims(
    images: Sequence[np.ndarray],
    checks: Sequence[ImageCheck],
    prototype: Prototype,
    target: int,
    score: ScoreFn,
    target_probs: np.ndarray,
) -> list[Victim]:
    """Images predicted `target` that carry the prototype (by appearance) and flip without it.

    `target_probs`: float32 (n,) the target's probability on each whole image, already scored.
    """
    located = [_locate(image, prototype) for image in images]
    ablated = score(
        [ablate_segment(image, box_mask(image, box)) for image, (box, _) in zip(images, located, strict=True)]
    )
    ablated_top1 = top1(ablated)
    victims = []
    for i, check in enumerate(checks):
        box, similarity = located[i]
        drop = float(target_probs[i] - ablated[i, target])  # NaN fails every test below
        flipped = ablated_top1[i] not in (target, -1)
        if check.pred == target and similarity >= MATCH_THRESHOLD and drop >= FLIP_THRESHOLD and flipped:
            label = int(ablated_top1[i])
            victims.append(Victim(check.index, box, label, round(float(similarity * drop), 4)))
    return victims


def _locate(image: np.ndarray, prototype: Prototype) -> tuple[tuple[float, float, float, float], float]:
    """Best match of the prototype (at its median observed size) in `image`: (box, NCC score)."""
    from skimage.feature import match_template

    height, width = image.shape[:2]
    rel_w, rel_h = (float(np.nan_to_num(v)) for v in prototype.relative_size)
    w = min(width, max(2, int(round(rel_w * width))))
    h = min(height, max(2, int(round(rel_h * height))))
    template = _resize(prototype.pixels, h, w).astype(np.float32)
    # A flat template or image has no defined correlation (NaN): it matches nothing.
    response = np.nan_to_num(
        match_template(image.astype(np.float32), template, pad_input=False)[..., 0], nan=-1.0, posinf=-1.0
    )
    y, x = np.unravel_index(int(response.argmax()), response.shape)
    return (x / width, y / height, (x + w) / width, (y + h) / height), float(response[y, x])


def top1(probs: np.ndarray) -> np.ndarray:
    """int64 (n,) argmax of each row of float (n, C); -1 for a row with a non-finite value."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        return np.full(len(probs), -1, np.int64)
    finite = np.isfinite(probs).all(axis=1)
    return np.where(finite, np.nan_to_num(probs).argmax(axis=1), -1).astype(np.int64)


def box_mask(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    height, width = image.shape[:2]
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = pixel_box(box, height, width)
    mask[y0:y1, x0:x1] = True
    return mask


def _box_pixels(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = pixel_box(box, *image.shape[:2])
    return image[y0:y1, x0:x1]


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST))
