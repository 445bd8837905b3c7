"""Stage 3, confirmation: does the recovered trigger, put into clean images, make the target?

The transplant test is what makes a finding (DESIGN §4, stage 3.3): the prototype pasted into
clean images of other labels at the places it was seen (a patch), or the estimated overlay added
to them (a non-localized trigger). The share then predicted as the target is the
`transplant_success_rate`; per-class rates name the victim labels. `confirm_patch` and
`confirm_overlay` run it for one candidate target and return a `Finding` whatever the rate;
`auditor.scan.findings` decides against the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from auditor.scan.check import ImageCheck, denoise
from auditor.scan.context import ScanContext, ScoreFn, top1
from auditor.scan.suspects import CandidateCluster
from auditor.scan.trigger import Prototype, build_prototype, paste
from auditor.scan.victims import Victim, find_victims


@dataclass(frozen=True)
class Finding:
    """One target's confirmation: its trigger, transplant success, victims and the evidence line."""

    target: int
    kind: str  # "patch" | "non-localized"
    prototype: Prototype | None
    transplant_rate: float
    per_class_rates: dict[int, float] = field(default_factory=dict)
    victims: tuple[Victim, ...] = ()
    evidence: str = ""
    overlay: np.ndarray | None = None  # a non-localized trigger's estimate, float32 (H, W, 3)


@dataclass(frozen=True)
class CleanSet:
    """Checked images the oracle agreed with, of non-suspect classes: where triggers are transplanted."""

    checks: tuple[ImageCheck, ...]
    images: tuple[np.ndarray, ...]

    @property
    def labels(self) -> list[int]:
        return [c.pred for c in self.checks]


def confirm_patch(ctx: ScanContext, cluster: CandidateCluster, clean: CleanSet) -> Finding:
    """Prototype from a cluster of look-alike candidates, refined once on its victims, transplanted.

    Victims are sought among every image stage 0 predicted as the target, checked by the oracle
    or not: template matching with the prototype does not need the oracle.
    """
    target, flagged = cluster.target, cluster.checks
    prototype = build_prototype(
        [ctx.image(c.index) for c in flagged], [c.candidate.box for c in flagged if c.candidate]
    )
    predicted = sorted(i for i, pred in ctx.predictions.items() if pred == target)
    predicted_images = [ctx.image(i) for i in predicted]
    target_probs = ctx.score(predicted_images)[:, target]  # scored once for both rounds below
    victims = find_victims(predicted_images, predicted, prototype, target, ctx.score, target_probs)
    # The victims' boxes come from template matching and fit the trigger far better than the
    # oracle's segments did: rebuilding the prototype on them sharpens it.
    position = {index: i for i, index in enumerate(predicted)}
    located = [(predicted_images[position[v.index]], v.box) for v in victims if v.box is not None]
    if len(located) >= ctx.config.min_candidates:
        prototype = build_prototype([image for image, _ in located], [box for _, box in located if box])
        victims = find_victims(predicted_images, predicted, prototype, target, ctx.score, target_probs)
    rate, per_class = transplant_test(
        prototype, list(clean.images), clean.labels, target, ctx.score, ctx.config.seed
    )
    name = ctx.dataset.classes[target]
    evidence = (
        f"Pasting the recovered {prototype.pixels.shape[0]}-px trigger into {len(clean.checks)} clean images "
        f"of other labels turned {rate:.0%} of them into '{name}'."
    )
    return Finding(target, "patch", prototype, rate, per_class, tuple(victims), evidence)


def confirm_overlay(
    ctx: ScanContext, checks: dict[int, ImageCheck], target: int, clean: CleanSet
) -> Finding | None:
    """Disagreement concentrated on a label, no removable region: test an overlay trigger.

    The overlay is estimated from the disagreeing images (`overlay_pattern`) and confirmed like
    a patch: added to clean images of other labels, it must turn them into the target. None
    when fewer than `min_candidates` images disagree without a candidate.
    """
    members = [c for c in checks.values() if c.pred == target]
    disagreeing = [c for c in members if c.disagrees and c.candidate is None]
    if len(disagreeing) < ctx.config.min_candidates:
        return None
    pattern = overlay_pattern([ctx.image(c.index) for c in disagreeing])
    rate, per_class = overlay_transplant_test(pattern, list(clean.images), clean.labels, target, ctx.score)
    victims = tuple(Victim(c.index, None, c.oracle_label, 1.0) for c in disagreeing)
    name = ctx.dataset.classes[target]
    evidence = (
        f"{len(disagreeing)} of {len(members)} checked images predicted '{name}' show other objects and "
        f"no region's removal changes that; their shared overlay, added to {len(clean.checks)} clean "
        f"images of other labels, turned {rate:.0%} of them into '{name}': a non-localized trigger "
        "(blend or warp)."
    )
    return Finding(target, "non-localized", None, rate, per_class, victims, evidence, pattern)


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
    overlaid = [add_overlay(clean[i], pattern) for i in chosen]
    hits = top1(score(overlaid)) == target
    per_class: dict[int, list[bool]] = {}
    for i, hit in zip(chosen, hits, strict=True):
        per_class.setdefault(clean_labels[i], []).append(bool(hit))
    return float(hits.mean()), {c: float(np.mean(v)) for c, v in sorted(per_class.items())}


def add_overlay(image: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """uint8 RGB `image` plus a float32 overlay of the same shape, clipped to 0-255."""
    return np.clip(image.astype(np.float32) + np.nan_to_num(pattern), 0, 255).astype(np.uint8)
