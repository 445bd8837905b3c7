"""Inverted stamps kept up to date while a repair changes the model.

A repair from `inversion` evidence unlearns the stamp the model-level search recovered. That
stamp is the audited model's cheapest shortcut to the target, one shape of the backdoor among
many: once it is unlearned, the planted trigger can still work (matrix, session 17: the weak
blocks ResNet's planted trigger went from 0.89 only to 0.53). So whenever the repair's check
finds the stamp gone, the stamp is polished again on the model as it now is, at no larger area
(`search.polish`). Where a shortcut that small still leads to the target, the polish finds it:
the repair is not done, and it unlearns the new stamp too.

"Gone" cannot mean "the re-polished stamp turns no image": a small stamp polished against any
model turns some images into any class (an adversarial patch). The bar is the scan's own
confirmation rule read the other way. The scan polished the same start on the clean
`--reference` and called a class natural when the reference reached `reference_ratio` of the
audited model's success; the repair is done when the repaired model, re-polished, reaches no
more than the reference's success over that ratio, so that the scan would no longer confirm it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from auditor.inversion.search import ClassTrigger, DifferentiableModel, normalization, polish

if TYPE_CHECKING:
    import torch

    from auditor.models import LoadedModel


@dataclass
class FollowedStamp:
    """One target's stamp as the repair follows it.

    `start`: the recovered stamp; `trigger`: the latest polish of it; `bar`: the highest held-out
    success a polished stamp may have for the target to count as gone.
    """

    start: ClassTrigger
    bar: float
    trigger: ClassTrigger | None = None


class StampFollower:
    """Re-polishes each followed stamp on a model that is being trained, as it is at the call.

    `module`: the trained network; `differentiable()`: its logits as a function of [0, 1] pixels
    (a `DifferentiableModel`, which freezes `module` and puts it in eval mode: both are restored
    after every refresh). `pixels`: float32 (N, 3, S, S) in [0, 1], clean images to polish on.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        differentiable: Callable[[], DifferentiableModel],
        pixels: torch.Tensor,
        stamps: dict[int, FollowedStamp],
        steps: int = 60,
        batch: int = 24,
        seed: int = 0,
    ) -> None:
        self.module, self.differentiable, self.pixels = module, differentiable, pixels
        self.stamps, self.steps, self.batch, self.seed = stamps, steps, batch, seed
        self.polishes = 0
        self.last_step = -(10**9)  # the repair step of the last refresh (none yet)

    def refresh(self) -> None:
        """Polish every followed stamp again on the model as it now is (its weights untouched)."""
        with _probing(self.module):
            model = self.differentiable()
            predicted = model.predict(self.pixels)
            for followed in self.stamps.values():
                # Always from the recovered stamp, with as many steps as the reference had: the
                # bar was measured so, and a chain of polishes would optimize a stamp many times
                # longer than the reference's, which no repaired model could come under.
                self.polishes += 1
                followed.trigger = polish(
                    model,
                    self.pixels,
                    predicted,
                    followed.start,
                    self.steps,
                    self.batch,
                    seed=self.seed + self.polishes,
                )

    def over_bar(self, success: dict[int, float]) -> list[ClassTrigger]:
        """The latest polish of each followed stamp whose held-out `success` ({target: rate}) is
        over its bar (the repair unlearns them too)."""
        return [
            followed.trigger
            for target, followed in self.stamps.items()
            if followed.trigger is not None and success.get(target, 0.0) > followed.bar
        ]


def plain_pixels(loaded: LoadedModel, pixels: np.ndarray) -> np.ndarray:
    """The model's normalized input pixels (float32 (n, 3, S, S)) back in [0, 1]."""
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in normalization(loaded))
    return np.clip(pixels * std + mean, 0, 1).astype(np.float32)


def stamped_pixels(loaded: LoadedModel, pixels: np.ndarray, trigger: ClassTrigger) -> np.ndarray:
    """The model's input pixels (float32 (n, 3, S, S), normalized) with `trigger` stamped on, as
    the search stamps: on the [0, 1] image at the model's input size."""
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in normalization(loaded))
    stamped = (1 - trigger.mask) * plain_pixels(loaded, pixels) + trigger.mask * trigger.pattern
    return ((stamped - mean) / std).astype(np.float32)


@contextlib.contextmanager
def _probing(model: torch.nn.Module) -> Iterator[None]:
    """Let `DifferentiableModel` freeze and switch `model` to eval for a while, then restore which
    parameters train and the train / eval mode (a repair is in the middle of training it)."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)
            param.grad = None
        model.train(training)
