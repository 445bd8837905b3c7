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

from auditor.scan.check import SMALL_AREA, ImageCheck
from auditor.scan.context import ScanContext, ScoreFn, top1
from auditor.scan.control import CONTROL_IMAGES, Control, compare, control_test, natural_pieces
from auditor.scan.suspects import CandidateCluster
from auditor.scan.trigger import Prototype, align_boxes, build_prototype, fit_to_pattern, paste
from auditor.scan.victims import Victim, find_by_appearance, find_victims


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
    control: Control | None = None  # the same test with natural pieces of the target

    @property
    def beats_control(self) -> bool:
        return self.control is None or self.control.passed


@dataclass(frozen=True)
class CleanSet:
    """Checked images the oracle agreed with, of non-suspect classes: where triggers are transplanted."""

    checks: tuple[ImageCheck, ...]
    images: tuple[np.ndarray, ...]

    @property
    def labels(self) -> list[int]:
        return [c.pred for c in self.checks]


def confirm_patch(
    ctx: ScanContext, cluster: CandidateCluster, clean: CleanSet, natural: Sequence[int] = ()
) -> Finding | None:
    """Prototype from a cluster of look-alike candidates, refined once on its victims, transplanted
    and compared with natural pieces of the target cut from the images `natural` (data indices
    of images the oracle agrees show the target; `natural_targets`).

    Victims are sought among every image stage 0 predicted as the target, checked by the oracle
    or not: template matching with the prototype does not need the oracle. None when the
    pattern the cluster's images share, once fitted, is larger than a trigger (`SMALL_AREA`).
    """
    target, flagged = cluster.target, cluster.checks
    images = [ctx.image(c.index) for c in flagged]
    boxes = fit_to_pattern(images, align_boxes(images, [c.candidate.box for c in flagged if c.candidate]))
    if np.median([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]) > SMALL_AREA:
        # What the images share extends beyond any trigger the scan looks for: a repeated object
        # (the same emoji glyph in every scene of its class), not a patch.
        return None
    prototype = build_prototype(images, boxes)
    predicted, predicted_images, target_probs = _predicted_in_fp32(ctx, target)
    victims = find_victims(predicted_images, predicted, prototype, target, ctx.score_exact, target_probs)
    # The victims' boxes come from template matching and fit the trigger far better than the
    # oracle's segments did: rebuilding the prototype on them sharpens it.
    position = {index: i for i, index in enumerate(predicted)}
    located = [(predicted_images[position[v.index]], v.box) for v in victims if v.box is not None]
    if len(located) >= ctx.config.min_candidates:
        prototype = build_prototype([image for image, _ in located], [box for _, box in located if box])
        victims = find_victims(predicted_images, predicted, prototype, target, ctx.score_exact, target_probs)
    rate, per_class = transplant_test(
        prototype, list(clean.images), clean.labels, target, ctx.score_exact, ctx.config.seed
    )
    others = [image for image, label in zip(clean.images, clean.labels, strict=True) if label != target]
    fp32_target = dict(zip(predicted, predicted_images, strict=True))
    victims += _victims_by_appearance(ctx, target, prototype, clean, {v.index for v in victims}, fp32_target)
    pieces = natural_pieces(
        _natural_images(predicted_images, predicted, target_probs, victims, natural),
        prototype,
        target,
        ctx.score_exact,
    )
    control = control_test(
        pieces, others, target, ctx.score_exact, round(rate * len(others)), len(others), ctx.config.seed
    )
    name = ctx.dataset.classes[target]
    evidence = (
        f"Pasting the recovered {prototype.pixels.shape[0]}-px trigger into {len(clean.checks)} clean images "
        f"of other labels turned {rate:.0%} of them into '{name}'; {_control_line(control, name)}"
    )
    return Finding(target, "patch", prototype, rate, per_class, tuple(victims), evidence, control=control)


def _predicted_in_fp32(ctx: ScanContext, target: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """The images stage 0 predicted as `target` that fp32 scoring predicts as it too: (data
    indices, uint8 images, the target's fp32 probability float32 (n,), scored once for both of
    `confirm_patch`'s victim rounds). With an fp32 bulk engine nothing is dropped."""
    indices = sorted(i for i, pred in ctx.predictions.items() if pred == target)
    images = [ctx.image(i) for i in indices]
    probs = ctx.score_exact(images)
    keep = np.flatnonzero(top1(probs) == target) if len(images) else np.zeros(0, np.int64)
    return [indices[i] for i in keep], [images[i] for i in keep], probs[keep, target]


def _victims_by_appearance(
    ctx: ScanContext,
    target: int,
    prototype: Prototype,
    clean: CleanSet,
    found: set[int],
    fp32_target: dict[int, np.ndarray],
) -> list[Victim]:
    """Images the data labels `target`, not in `found`, that carry the prototype by appearance:
    poisoned pairs whose trigger did not take (predicted in fp32 as another label) or whose
    blanked trigger left the prediction where it was. Unlabelled data has none.
    `fp32_target`: data index -> uint8 image of those already decoded and predicted as the
    target in fp32 (`_predicted_in_fp32`); only the others are decoded and scored here.

    `find_by_appearance` calibrates on the clean set's images of other labels, predicted and
    claimed: an unflipped pair is predicted as what it shows and the oracle agrees, so the
    clean set holds the very images sought (all matching at NCC 1.0 on a tuning row)."""
    name = ctx.dataset.classes[target]
    null = [
        image
        for check, image in zip(clean.checks, clean.images, strict=True)
        if check.pred != target and ctx.dataset.samples[check.index].label != name
    ]
    indices = [
        i
        for i, sample in enumerate(ctx.dataset.samples)
        if sample.label == name and i not in found and i in ctx.predictions  # scored by stage 0
    ]
    images = {i: fp32_target[i] for i in indices if i in fp32_target}
    labels = dict.fromkeys(images, target)
    rest = [i for i in indices if i not in images]
    if rest:
        images |= {i: ctx.image(i) for i in rest}
        labels |= dict(zip(rest, top1(ctx.score_exact([images[i] for i in rest])).tolist(), strict=True))
    kept = [i for i in indices if labels[i] != -1]
    predictions = [labels[i] for i in kept]
    return find_by_appearance([images[i] for i in kept], kept, predictions, target, prototype, null)


def natural_targets(checks: Sequence[ImageCheck], target: int) -> list[int]:
    """Checked images the oracle agrees show `target`: predicted as it, one of its objects labelled
    it, no disagreement and no trigger candidate. Where a control's natural pieces come from."""
    return [
        c.index
        for c in checks
        if c.pred == target and not c.disagrees and c.candidate is None and target in c.object_labels
    ]


def _natural_images(
    images: Sequence[np.ndarray],
    indices: Sequence[int],
    target_probs: np.ndarray,
    victims: Sequence[Victim],
    natural: Sequence[int],
) -> list[np.ndarray]:
    """Up to CONTROL_IMAGES of the images predicted as the target (`indices`) that are in
    `natural` and are not victims, the most confident first.

    Only images the oracle agrees show the target, without a candidate: a triggered image that
    is not found as a victim (on a weak model, removing the trigger does not always change the
    prediction) would otherwise lend the control the trigger itself (natural pieces at 95 %
    against the trigger's 86 %, weak ResNet tuning row). Images that merely resemble the
    prototype stay in: when the "trigger" is a natural part of the target (the same sunflower
    glyph in every emoji scene of 'flower'), those images are exactly the natural pieces to
    compare with.
    """
    allowed = set(natural) - {v.index for v in victims}
    order = np.argsort(-np.nan_to_num(target_probs, nan=-1.0), kind="stable")
    return [images[i] for i in order if indices[i] in allowed][:CONTROL_IMAGES]


def _control_line(control: Control, name: str) -> str:
    if control.pieces == 0:
        return f"no clean '{name}' image was left to compare it with natural pieces of '{name}'."
    verdict = "beats" if control.passed else "does not beat"
    return (
        f"the best of {control.pieces} natural pieces of its size, cut from clean '{name}' images, did "
        f"so for {control.rate:.0%} ({control.trials} images): the trigger {verdict} them (one-sided "
        f"Fisher exact p = {control.p_value:.2g})."
    )


def confirm_overlay(
    ctx: ScanContext, checks: dict[int, ImageCheck], target: int, clean: CleanSet
) -> Finding | None:
    """Disagreement concentrated on a label, no removable region: test an overlay trigger.

    The overlay is estimated from the disagreeing images (`overlay_pattern`) and confirmed like
    a patch: added to clean images of other labels, it must turn them into the target, and more
    of them than the same estimate made from as many images the oracle agrees are the target
    (`auditor.scan.control`). None when fewer than `min_candidates` images disagree without a
    candidate.
    """
    members = [c for c in checks.values() if c.pred == target]
    disagreeing = [c for c in members if c.disagrees and c.candidate is None]
    if len(disagreeing) < ctx.config.min_candidates:
        return None
    clean_images = list(clean.images)
    pattern = overlay_pattern([ctx.image(c.index) for c in disagreeing], clean_images)
    rate, per_class = overlay_transplant_test(pattern, clean_images, clean.labels, target, ctx.score_exact)
    agreeing = [checks[i] for i in natural_targets(members, target)][: len(disagreeing)]
    control = _overlay_control(ctx, agreeing, clean, target, rate)
    verified = disagreeing
    if ctx.exact_scorer is not None:  # bulk in int8 / fp16: the victims must hold in fp32 too
        still = top1(ctx.score_exact([ctx.image(c.index) for c in disagreeing])) == target
        verified = [c for c, kept in zip(disagreeing, still, strict=True) if kept]
    victims = tuple(Victim(c.index, None, c.oracle_label, 1.0) for c in verified)
    name = ctx.dataset.classes[target]
    evidence = (
        f"{len(disagreeing)} of {len(members)} checked images predicted '{name}' show other objects and "
        f"no region's removal changes that; their shared overlay, added to {len(clean.checks)} clean "
        f"images of other labels, turned {rate:.0%} of them into '{name}': a non-localized trigger "
        f"(blend, warp or signal). {_overlay_control_line(control, name)}"
    )
    return Finding(target, "non-localized", None, rate, per_class, victims, evidence, pattern, control)


def _overlay_control(
    ctx: ScanContext, agreeing: Sequence[ImageCheck], clean: CleanSet, target: int, rate: float
) -> Control:
    """The overlay test with the estimate made from images the oracle agrees are the target."""
    trials = sum(1 for label in clean.labels if label != target)
    if not agreeing or trials == 0:
        return Control(0, 0, 0, 1.0)
    images = list(clean.images)
    natural = overlay_pattern([ctx.image(c.index) for c in agreeing], images)
    natural_rate, _ = overlay_transplant_test(natural, images, clean.labels, target, ctx.score_exact)
    return compare(round(rate * trials), trials, round(natural_rate * trials), trials, len(agreeing))


def _overlay_control_line(control: Control, name: str) -> str:
    if control.pieces == 0:
        return f"No checked image agreed on '{name}' to compare it with."
    verdict = "beats" if control.passed else "does not beat"
    return (
        f"The same estimate from {control.pieces} images the oracle agrees are '{name}' did so for "
        f"{control.rate:.0%}: the overlay {verdict} it (one-sided Fisher exact p = {control.p_value:.2g})."
    )


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
    return _hit_rates(top1(score(pasted)) == target, [clean_labels[i] for i in chosen])


def overlay_pattern(images: Sequence[np.ndarray], clean: Sequence[np.ndarray]) -> np.ndarray:
    """A non-localized trigger's estimate: the mean of `images` minus the mean of `clean`
    (uint8 RGB, those of the first image's shape), float32 (H, W, 3).

    A blend (1 - a) x + a p, a warp or an added signal shifts every triggered image the same way,
    while their content averages out towards the clean images' mean. The difference of means
    keeps the overlay's low frequencies; the median residual of a 3x3 denoiser used before lost
    them, and with them a SIG trigger (transplant 0 % on a tuning row, against 75 % now).
    """
    shape = images[0].shape
    same = [image.astype(np.float32) for image in images if image.shape == shape]
    reference = [image.astype(np.float32) for image in clean if image.shape == shape]
    mean_clean = np.mean(reference, axis=0) if reference else np.full(shape, 127.0, np.float32)
    return (np.mean(same, axis=0) - mean_clean).astype(np.float32)


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
    return _hit_rates(top1(score(overlaid)) == target, [clean_labels[i] for i in chosen])


def _hit_rates(hits: np.ndarray, labels: Sequence[int]) -> tuple[float, dict[int, float]]:
    """(share of `hits`, {class: share of its images' hits}) of bool (n,) hits and their true labels."""
    per_class: dict[int, list[bool]] = {}
    for label, hit in zip(labels, hits, strict=True):
        per_class.setdefault(label, []).append(bool(hit))
    return float(hits.mean()), {c: float(np.mean(v)) for c, v in sorted(per_class.items())}


def add_overlay(image: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """uint8 RGB `image` plus a float32 overlay of the same shape, clipped to 0-255."""
    return np.clip(image.astype(np.float32) + np.nan_to_num(pattern), 0, 255).astype(np.uint8)
