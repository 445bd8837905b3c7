"""Segmentation oracles: image -> segments (binary masks with their boxes).

The oracle supervises the audited CLIP (DESIGN §4): CLIP's answer about the whole image is
compared with its answers about the objects the oracle finds, and a small segment whose
removal changes the answer is a trigger candidate. Oracles:

- `classic` (default, no weights): scikit-image's felzenszwalb at a few scales, merged;
- `sam`: segment-anything's automatic mask generator from `--oracle-checkpoint` ([sam] extra);
- `fastsam`: ultralytics FastSAM from a weight file (optional, absent -> exit 3), on ONNX Runtime
  after one export by ultralytics (`auditor.oracle.fastsam_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from auditor.errors import InputError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Segment:
    """One region of an image: mask bool (H, W); box normalized [x0, y0, x1, y1]; area in [0, 1]."""

    mask: np.ndarray
    box: Box
    area: float

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Segment:
        """The segment of a bool mask (H, W); an empty mask gives area 0 and the box (0, 0, 0, 0)."""
        ys, xs = np.nonzero(mask)
        height, width = mask.shape
        if xs.size == 0:
            return cls(mask, (0.0, 0.0, 0.0, 0.0), 0.0)
        box = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
        return cls(mask, box, float(mask.mean()))


def pixel_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """A normalized box in whole pixels (x0, y0, x1, y1), inside the image, at least 1 px each way.

    Total: coordinates outside [0, 1], reversed, NaN or infinite are clipped (NaN reads as 0),
    so that slicing an (height, width) image with the result never gives an empty region.
    """
    height, width = max(1, int(height)), max(1, int(width))
    left, top, right, bottom = (_unit(v) for v in box)
    x0 = min(width - 1, int(round(min(left, right) * width)))
    y0 = min(height - 1, int(round(min(top, bottom) * height)))
    x1 = min(width, max(x0 + 1, int(round(max(left, right) * width))))
    y1 = min(height, max(y0 + 1, int(round(max(top, bottom) * height))))
    return x0, y0, x1, y1


def _unit(value: float) -> float:
    """`value` clipped to [0, 1]; NaN reads as 0."""
    value = float(value)
    return 0.0 if value != value else min(1.0, max(0.0, value))


class Oracle(Protocol):
    """What every oracle implements: uint8 RGB (H, W, 3) -> segments, largest first."""

    name: str
    runtime: str  # what it runs on: "scikit-image", "torch", "onnx", "tensorrt"
    # Whether `segments` may run in several threads at once (the scan then segments ahead in
    # parallel); an oracle that leaves it out is called from one thread.
    thread_safe: bool

    def segments(self, image: np.ndarray) -> list[Segment]: ...


MIN_AREA = 0.004  # share of the image below which a segment is a speck
MAX_AREA = 0.85  # and above which it is the whole image


def tidy_segments(
    masks: list[np.ndarray], min_area: float = MIN_AREA, max_area: float = MAX_AREA, same_iou: float = 0.9
) -> list[Segment]:
    """Drop specks and near-whole-image masks, merge near-duplicates, sort largest first."""
    kept: list[Segment] = []
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        area = float(mask.mean())
        if not min_area <= area <= max_area:
            continue
        # Kept segments are no smaller, and IoU <= area / seg.area: only pairs where that bound
        # reaches same_iou are compared pixel by pixel.
        if any(area >= same_iou * seg.area - 1e-12 and _mask_iou(mask, seg.mask) >= same_iou for seg in kept):
            continue
        kept.append(Segment.from_mask(mask))
    return kept


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def make_oracle(
    kind: str,
    checkpoint: Path | None = None,
    points_per_side: int = 16,
    runtime: str = "torch",
    engine_dir: Path | None = None,
    probe_image: np.ndarray | None = None,
) -> Oracle:
    """The oracle named by `--oracle` (classic needs no checkpoint; sam and fastsam do).

    `points_per_side`: SAM's prompt grid (its cost grows with the square of it). `runtime`: the
    resolved `--engine` ("torch", "onnx", "tensorrt") that SAM's networks run on; `probe_image`
    (uint8 RGB, from DATA) is what its engines are checked on.
    """
    if kind == "classic":
        from auditor.oracle.classic import ClassicOracle

        return ClassicOracle()
    if checkpoint is None:
        raise InputError(f"--oracle {kind} needs --oracle-checkpoint (a weight file you provide)")
    if kind == "sam":
        from auditor.oracle.sam import SamOracle

        return SamOracle(checkpoint, points_per_side, runtime, engine_dir, probe_image)
    if kind == "fastsam":
        from auditor.oracle.fastsam import FastSamOracle

        return FastSamOracle(checkpoint, runtime, engine_dir, probe_image)
    raise InputError(f"unknown --oracle '{kind}'", hint="use classic, sam or fastsam")
