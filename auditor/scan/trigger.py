"""The recovered trigger: a prototype built from candidate pixels, and pasting it into images.

Used by confirmation (the transplant test), victim matching, the compact set and repair.
Boxes are normalized `[x0, y0, x1, y1]`; pixel maths goes through `oracle.pixel_box`, which
clips any box into the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditor.oracle import pixel_box

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Prototype:
    """The recovered trigger: pixels uint8 (h, w, 3) and observed boxes (normalized)."""

    pixels: np.ndarray
    boxes: tuple[Box, ...]

    @property
    def relative_size(self) -> tuple[float, float]:
        widths = [b[2] - b[0] for b in self.boxes]
        heights = [b[3] - b[1] for b in self.boxes]
        return float(np.median(widths)), float(np.median(heights))

    def size_in(self, height: int, width: int) -> tuple[int, int]:
        """(w, h) in pixels of the median observed box in a `height` x `width` image: at least
        2 px a side, never more than the image."""
        rel_w, rel_h = (float(np.nan_to_num(v)) for v in self.relative_size)
        w = min(width, max(2, int(round(rel_w * width))))
        return w, min(height, max(2, int(round(rel_h * height))))


def build_prototype(images: Sequence[np.ndarray], boxes: Sequence[Box]) -> Prototype:
    """Median of the boxes' pixels, each resized to the boxes' median height and width in pixels.

    `images`: uint8 RGB (H, W, 3), one per box (at least one). Every box gives at least one pixel
    (`pixel_box` clips), so the prototype is at least 1x1.
    """
    if not boxes or len(images) != len(boxes):
        raise ValueError("a prototype needs one image per box, and at least one box")
    crops = [box_pixels(image, box) for image, box in zip(images, boxes, strict=True)]
    height = int(np.median([c.shape[0] for c in crops]))
    width = int(np.median([c.shape[1] for c in crops]))
    stack = np.stack([resize(c, height, width) for c in crops])
    return Prototype(np.median(stack, axis=0).astype(np.uint8), tuple(boxes))


# Pixels of one pattern seen in several images agree to within a few levels (resampling, lossy
# saving); the scenery around it varies by tens. A pixel of an aligned stack of crops whose
# spread exceeds this (median absolute deviation, levels of 255) is not the pattern's.
PATTERN_SPREAD = 12.0
TRIM_MIN_CROPS = 3  # the spread of fewer crops says little


def fit_to_pattern(images: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[Box]:
    """Aligned boxes (one pixel size, `align_boxes`) grown by half their size each way, then cut
    back to the part their images agree on.

    The oracle's segment around a trigger may hold a pixel or two of scenery, or only part of
    the trigger, and the first box fixes the size for all: unfitted, the prototype is larger or
    smaller than the trigger and victims' boxes overlap the planted one by less. A pixel is
    consistent when its spread across the crops is at most PATTERN_SPREAD; the fitted box spans
    the rows and columns dense in consistent pixels (`_dense_span`), at least 2 px a side.
    Growth stops at any of the images' borders, so the boxes keep one size. Boxes of unequal
    pixel sizes, or fewer than TRIM_MIN_CROPS, are returned as they are.
    """
    corners = [pixel_box(box, *image.shape[:2]) for image, box in zip(images, boxes, strict=True)]
    sizes = {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in corners}
    if len(boxes) < TRIM_MIN_CROPS or len(sizes) != 1:
        return list(boxes)
    ((w, h),) = sizes
    # Room to grow on each side, in every image: (left, top, right, bottom).
    room = np.array(
        [
            (x0, y0, image.shape[1] - x1, image.shape[0] - y1)
            for image, (x0, y0, x1, y1) in zip(images, corners, strict=True)
        ]
    ).min(axis=0)
    left, top, right, bottom = (int(v) for v in np.minimum(room, (w // 2, h // 2, w // 2, h // 2)))
    grown = [(x0 - left, y0 - top, x1 + right, y1 + bottom) for x0, y0, x1, y1 in corners]
    stack = np.stack([image[y0:y1, x0:x1] for image, (x0, y0, x1, y1) in zip(images, grown, strict=True)])
    consistent = _spread(stack.astype(np.float32)) <= PATTERN_SPREAD  # bool (h, w)
    y0, y1 = _dense_span(consistent.sum(axis=1))
    x0, x1 = _dense_span(consistent.sum(axis=0))
    fitted = []
    for image, (gx, gy, _, _) in zip(images, grown, strict=True):
        height, width = image.shape[:2]
        fitted.append(((gx + x0) / width, (gy + y0) / height, (gx + x1) / width, (gy + y1) / height))
    return fitted


def _dense_span(counts: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the lines holding at least half as many consistent pixels as the
    densest line (the pattern's rows or columns), at least 2 lines wide."""
    dense = np.flatnonzero(counts >= max(1, counts.max()) / 2)
    if counts.max() == 0 or dense.size == 0:
        return 0, len(counts)
    first, last = int(dense[0]), int(dense[-1]) + 1
    if last - first < 2:
        first, last = max(0, min(first, len(counts) - 2)), max(0, min(first, len(counts) - 2)) + 2
    return first, last


def _spread(stack: np.ndarray) -> np.ndarray:
    """float (h, w): per pixel, the median absolute deviation across a (n, h, w, 3) stack,
    averaged over the colour channels."""
    return np.median(np.abs(stack - np.median(stack, axis=0)), axis=0).mean(axis=-1)


def align_boxes(images: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[Box]:
    """The boxes moved onto one another: each image's box goes to where the first box's pixels
    match best (normalized cross-correlation) within one box size of it, at the first box's size.

    The oracle's segments around one trigger differ by a pixel or two in place and aspect; a
    median over misaligned crops blurs a fine pattern (a 3x3 colour-block trigger of 8 px at 64
    px lost its transplant success that way). A box whose image holds no match (a flat
    template or image) stays where it was. `images`: uint8 RGB (H, W, 3), one per box.
    """
    from skimage.feature import match_template

    if not boxes:
        return []
    template = box_pixels(images[0], boxes[0]).astype(np.float32)
    th, tw = template.shape[:2]
    aligned = [boxes[0]]
    for image, box in zip(images[1:], boxes[1:], strict=True):
        height, width = image.shape[:2]
        x0, y0, x1, y1 = pixel_box(box, height, width)
        left, top = max(0, x0 - tw), max(0, y0 - th)
        region = image[top : min(height, y1 + th), left : min(width, x1 + tw)].astype(np.float32)
        if region.shape[0] < th or region.shape[1] < tw or float(template.std()) < 1e-6:
            aligned.append(box)
            continue
        response = np.nan_to_num(match_template(region, template)[..., 0], nan=-1.0, posinf=-1.0)
        y, x = np.unravel_index(int(response.argmax()), response.shape)
        x, y = left + x, top + y
        aligned.append((x / width, y / height, (x + tw) / width, (y + th) / height))
    return aligned


def paste(image: np.ndarray, prototype: Prototype, box: Box) -> np.ndarray:
    """The prototype resized into `box` (normalized) of a copy of `image`."""
    height, width = image.shape[:2]
    left, top, right, bottom = np.clip(np.nan_to_num(np.asarray(box, np.float64)), 0.0, 1.0)
    # At least 2 px each way (a 1-px paste loses the pattern), never more than the image.
    w = min(width, max(2, int(round((right - left) * width))))
    h = min(height, max(2, int(round((bottom - top) * height))))
    x0 = max(0, min(int(round(left * width)), width - w))
    y0 = max(0, min(int(round(top * height)), height - h))
    out = image.copy()
    out[y0 : y0 + h, x0 : x0 + w] = resize(prototype.pixels, h, w)
    return out


def box_mask(image: np.ndarray, box: Box) -> np.ndarray:
    """bool (H, W): the box's pixels of `image`."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = pixel_box(box, height, width)
    mask[y0:y1, x0:x1] = True
    return mask


def box_pixels(image: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = pixel_box(box, *image.shape[:2])
    return image[y0:y1, x0:x1]


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST))
