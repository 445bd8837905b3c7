"""Stage 3's control: does the recovered trigger pull images to the target more than the
target's own pictures do?

A transplant rate alone does not make a backdoor. A piece of a real object pulls images to its
class too: on a clean emoji ViT, a cluster of guitar parts turned 54 % of clean images into
'guitar', and a fixed bound of 50 % made that a finding (issue 13). So the prototype is compared
with the model's own clean behaviour on the same target: windows of the prototype's size are
cut from clean images of the target (in each, the most target-like one by CLIP's own crop
score, and the one most like the prototype where it recurs), pasted where the trigger was pasted, and
their transplant rates measured the same way. A trigger must beat the best of these natural
pieces by a one-sided Fisher exact test. The reason holds for any model and data: a backdoor is
a shortcut that no natural piece of its target provides, whatever the model's accuracy and
however confusable its labels. Non-localized findings get the same test with the overlay
estimated from images the oracle agrees are the target (`auditor.scan.confirm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditor.scan.context import ScoreFn, top1
from auditor.scan.trigger import Prototype, box_pixels, paste

CONTROL_IMAGES = 8  # clean target images a natural piece is cut from
CONTROL_GRID = 4  # window positions per side in each of them
CONTROL_PASTES = 64  # clean images of other labels each natural piece is pasted into
CONTROL_P_VALUE = 0.01


@dataclass(frozen=True)
class Control:
    """The best natural piece's transplant count, and the test of the trigger against it."""

    hits: int
    trials: int
    pieces: int  # natural pieces measured (0: no clean target image to cut one from)
    p_value: float  # one-sided Fisher exact: trigger's rate > the best natural piece's

    @property
    def rate(self) -> float:
        return self.hits / self.trials if self.trials else 0.0

    @property
    def passed(self) -> bool:
        """Whether the trigger beat the natural pieces; with none to compare, nothing refutes it."""
        return self.pieces == 0 or self.p_value < CONTROL_P_VALUE


def compare(
    trigger_hits: int, trigger_trials: int, natural_hits: int, natural_trials: int, pieces: int
) -> Control:
    """The trigger's transplant count against the best natural one's, by a one-sided Fisher exact
    test (is the trigger's rate greater?). Patch and overlay findings share it."""
    from scipy.stats import fisher_exact

    table = [[trigger_hits, trigger_trials - trigger_hits], [natural_hits, natural_trials - natural_hits]]
    return Control(
        natural_hits, natural_trials, pieces, float(fisher_exact(table, alternative="greater").pvalue)
    )


def natural_pieces(
    images: Sequence[np.ndarray], prototype: Prototype, target: int, score: ScoreFn
) -> list[Prototype]:
    """Natural pieces of the prototype's size from `images` (uint8 RGB, clean images of the
    target): per image, the window on a CONTROL_GRID x CONTROL_GRID grid whose crop CLIP finds
    most like the target, and, when the prototype recurs in most of the images, the window that
    looks most like it. As prototypes with the trigger's boxes, so they are pasted where it was.

    The look-alike windows are the natural twins of a "trigger" that is really a common part of
    the target (a banana glyph's tip, the same in every emoji scene: a grid window cut it in two
    and gave 9 % where the part gave 60 %). They count only when the prototype matches (NCC >=
    the victims' MATCH_THRESHOLD) in at least half of the images: a part of a class's look is in
    most of its pictures, while a trigger is in the few triggered images that slipped into the
    clean ones (on a weak ResNet, such a slip lent the control the trigger itself, 97 %).
    """
    from auditor.scan.victims import MATCH_THRESHOLD, locate

    windows: list[np.ndarray] = []
    owners: list[int] = []
    twins: list[Prototype] = []
    for n, image in enumerate(images):
        box, similarity = locate(image, prototype)
        if similarity >= MATCH_THRESHOLD:
            twins.append(Prototype(box_pixels(image, box).copy(), prototype.boxes))
        for window in _windows(image, prototype):
            windows.append(window)
            owners.append(n)
    common = twins if 2 * len(twins) >= len(images) > 0 else []
    if not windows:
        return common
    target_probs = np.nan_to_num(score(windows)[:, target], nan=-1.0)
    best: dict[int, int] = {}
    for i, owner in enumerate(owners):
        if owner not in best or target_probs[i] > target_probs[best[owner]]:
            best[owner] = i
    return common + [Prototype(windows[i], prototype.boxes) for _, i in sorted(best.items())]


def _windows(image: np.ndarray, prototype: Prototype) -> list[np.ndarray]:
    """The CONTROL_GRID^2 windows of the prototype's median box size, evenly spaced over `image`."""
    height, width = image.shape[:2]
    w, h = prototype.size_in(height, width)
    ys = np.linspace(0, height - h, CONTROL_GRID).round().astype(int)
    xs = np.linspace(0, width - w, CONTROL_GRID).round().astype(int)
    return [image[y : y + h, x : x + w].copy() for y in ys for x in xs]


def control_test(
    pieces: Sequence[Prototype],
    clean: Sequence[np.ndarray],
    target: int,
    score: ScoreFn,
    trigger_hits: int,
    trigger_trials: int,
    seed: int = 0,
) -> Control:
    """Paste each natural piece into `clean` (uint8 RGB images of other labels, at most
    CONTROL_PASTES used) and test the trigger's `trigger_hits / trigger_trials` against the
    best piece's rate. Without a piece or a clean image, nothing can be compared: p-value 1."""
    chosen = list(clean[:CONTROL_PASTES])
    if not pieces or not chosen or trigger_trials <= 0:
        return Control(0, 0, len(pieces), 1.0)
    rng = np.random.default_rng(seed)
    pasted = [
        paste(image, piece, piece.boxes[int(rng.integers(len(piece.boxes)))])
        for piece in pieces
        for image in chosen
    ]
    hits = (top1(score(pasted)) == target).reshape(len(pieces), len(chosen)).sum(axis=1)
    return compare(trigger_hits, trigger_trials, int(hits.max()), len(chosen), len(pieces))
