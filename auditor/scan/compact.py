"""Stage 4, the compact fine-tuning set: a few percent of DATA that teaches the trigger away.

For the confirmed targets only (DESIGN §4, stage 4): victims with the trigger removed, captioned
with what the oracle saw; clean images of other labels with a recovered trigger pasted in and
their own captions (unlearning pairs); clean images of the targets; a replay of other classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from auditor.scan.check import ImageCheck, ablate_segment
from auditor.scan.confirm import Finding, add_overlay
from auditor.scan.context import ScanContext
from auditor.scan.findings import Findings, all_victims
from auditor.scan.screen import round_robin
from auditor.scan.trigger import box_mask, paste


@dataclass(frozen=True)
class CompactPair:
    """One fine-tuning pair: uint8 RGB image (H, W, 3), its caption, and the data file it came from."""

    name: str
    image: np.ndarray
    caption: str
    source: str


def compact_set(
    ctx: ScanContext, checks: dict[int, ImageCheck], findings: Findings
) -> tuple[CompactPair, ...]:
    """The compact fine-tuning set, at most `compact_fraction` of the scored images.

    The budget is split: a quarter unlearning pairs (the trigger pasted into clean images of
    other labels, their true caption kept), a quarter victims with the trigger removed (captioned
    with what the oracle saw), a sixth clean images of the target (the label a repair most easily
    over-corrects), and the rest a replay spread evenly over the other labels. With several
    targets, the unlearning pairs take their triggers in turn.
    """
    if not findings.confirmed:
        return ()
    targets = {f.target for f in findings.confirmed}
    classes = ctx.dataset.classes
    budget = max(8, int(ctx.config.compact_fraction * len(ctx.dataset.samples)))
    rng = np.random.default_rng(ctx.config.seed + 4)
    # Each confirmed trigger as a function that plants it: a patch at a box it was seen at, or
    # a non-localized overlay added to the whole image.
    planters = [_planter(f, rng) for f in findings.confirmed]
    pairs: list[CompactPair] = []
    every_victim = all_victims(findings)
    victims = sorted((v for v in every_victim if v.oracle_label is not None), key=lambda v: -v.score)
    for victim in victims[: budget // 4]:
        image = ctx.image(victim.index)
        if victim.box is not None:
            image = ablate_segment(image, box_mask(image, victim.box))
        label = classes[victim.oracle_label]  # type: ignore[index]
        pairs.append(
            CompactPair(f"victim-{victim.index:06d}.png", image, caption(label), ctx.path(victim.index))
        )
    # Clean pairs are images the oracle agrees with and that carry nothing: a triggered image of
    # a weak model often "agrees" (some crop names the target), and replayed under the target's
    # caption it would teach the backdoor again.
    flagged = {v.index for v in every_victim}
    agreeing = [
        c
        for c in checks.values()
        if not c.disagrees and c.pred in c.object_labels and c.candidate is None and c.index not in flagged
    ]
    others = [c for c in agreeing if c.pred not in targets]
    # Reordered so that labels alternate: any prefix covers the labels as evenly as it can.
    shuffled = [others[i] for i in rng.permutation(len(others))]
    others = round_robin(
        [[c for c in shuffled if c.pred == label] for label in sorted({c.pred for c in shuffled})],
        len(shuffled),
    )
    usable = [planter for planter in planters if planter is not None]
    if usable:
        for n, check in enumerate(others[: budget // 4]):
            image = usable[n % len(usable)](ctx.image(check.index))
            name, text = f"unlearn-{check.index:06d}.png", caption(classes[check.pred])
            pairs.append(CompactPair(name, image, text, ctx.path(check.index)))
        others = others[budget // 4 :]
    own = [c for c in agreeing if c.pred in targets][: max(2, budget // 6)]
    replay = others[: max(0, budget - len(pairs) - len(own))]
    for check in own + replay:
        name, text = f"clean-{check.index:06d}.png", caption(classes[check.pred])
        pairs.append(CompactPair(name, ctx.image(check.index), text, ctx.path(check.index)))
    return tuple(pairs)


def caption(label: str) -> str:
    """The caption a compact pair of `label` gets."""
    return f"a photo of a {label}."


def _planter(finding: Finding, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray] | None:
    """uint8 RGB image -> the same image carrying the finding's trigger (None: nothing to plant)."""
    prototype, overlay = finding.prototype, finding.overlay
    if prototype is not None:
        return lambda image: paste(image, prototype, prototype.boxes[int(rng.integers(len(prototype.boxes)))])
    if overlay is not None:
        return lambda image: add_overlay(image, overlay) if image.shape == overlay.shape else image
    return None
