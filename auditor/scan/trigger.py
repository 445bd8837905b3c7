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
    """The recovered trigger: pixels uint8 (s, s, 3) and observed boxes (normalized)."""

    pixels: np.ndarray
    boxes: tuple[Box, ...]

    @property
    def relative_size(self) -> tuple[float, float]:
        widths = [b[2] - b[0] for b in self.boxes]
        heights = [b[3] - b[1] for b in self.boxes]
        return float(np.median(widths)), float(np.median(heights))


def build_prototype(images: Sequence[np.ndarray], boxes: Sequence[Box]) -> Prototype:
    """Median of the boxes' pixels, each resized to the boxes' median side in pixels.

    `images`: uint8 RGB (H, W, 3), one per box (at least one). Every box gives at least one pixel
    (`pixel_box` clips), so the prototype is at least 1x1.
    """
    if not boxes or len(images) != len(boxes):
        raise ValueError("a prototype needs one image per box, and at least one box")
    crops = [box_pixels(image, box) for image, box in zip(images, boxes, strict=True)]
    side = int(np.median([max(c.shape[:2]) for c in crops]))
    stack = np.stack([resize(c, side, side) for c in crops])
    return Prototype(np.median(stack, axis=0).astype(np.uint8), tuple(boxes))


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
