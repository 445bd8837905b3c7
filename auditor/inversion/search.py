"""Trigger search by gradient (Neural Cleanse's per-class search, in PyTorch).

For a target class t, find a mask m in [0, 1] (S, S) and a pattern p in [0, 1] (3, S, S) such
that stamping them on clean images, x' = (1 - m) x + m p, makes the model predict t, with the
mask as small as possible. A backdoor's target needs a far smaller mask than any other class:
the trigger is a shortcut the model learned. The targets are searched together, one batch of
stamped images per target in each step, and each target's L1 weight follows Neural Cleanse's
schedule: raised while the stamp succeeds, lowered while it fails.

Pixels here are in [0, 1] at the model's input size, before its mean / std normalization
(`DifferentiableModel` applies it), so a mask and a pattern are pictures a person can look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from auditor.models import LoadedModel


@dataclass(frozen=True)
class SearchConfig:
    # A short search: `InversionConfig.rounds` of them are averaged, which on the tuning rows
    # separated targets better, at about half the cost, than one search of 300 steps of 12 images.
    steps: int = 80  # optimisation steps per target (each a forward + backward on `batch` images)
    batch: int = 6
    lr: float = 0.2
    # A stamp counts as a trigger for its target once it flips this share of a batch; the
    # smallest mask that did so is kept.
    goal: float = 0.9
    first_cost: float = 1.0  # the L1 weight once the goal is first reached (mask area in [0, 1])
    patience: int = 3  # steps of success (or failure) before the weight moves
    cost_up: float = 1.5
    cost_down: float = 1.5**1.5
    seed: int = 0


@dataclass(frozen=True)
class ClassTrigger:
    """The smallest stamp found for one target class.

    `mask`: float32 (S, S) in [0, 1]; `pattern`: float32 (3, S, S) in [0, 1]; `area`: the mask's
    mean (its L1 norm as a share of the image), 1.0 when no stamp ever reached the goal;
    `batch_success`: the share of the batch it flipped when it was kept.
    """

    target: int
    mask: np.ndarray
    pattern: np.ndarray
    area: float
    reached: bool
    batch_success: float


PredictFn = Callable[[np.ndarray], np.ndarray]
"""float32 (n, 3, S, S) pixels in [0, 1] -> int64 (n,) top-1 classes (the scan points it at its engine)."""


@dataclass
class PassCounter:
    """Images through the model: `backward` counts forward + backward passes, `forward` the rest."""

    forward: int = 0
    backward: int = 0


class DifferentiableModel:
    """The audited model's zero-shot logits as a function of [0, 1] pixels, in PyTorch.

    `class_weights`: float32 (C, D), rows L2-normalized (`auditor.scoring.embed_classes`).
    """

    def __init__(self, loaded: LoadedModel, class_weights: np.ndarray) -> None:
        import torch

        self.model = loaded.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        mean, std = normalization(loaded)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.weights = torch.from_numpy(np.ascontiguousarray(class_weights, dtype=np.float32))
        self.scale = float(loaded.logit_scale)
        self.size = int(loaded.arch.image_size)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 (n, 3, S, S) in [0, 1] -> float32 (n, C) logits (differentiable)."""
        import torch
        import torch.nn.functional as F

        # Channels-last input: oneDNN's convolutions run faster on it, forward and backward. On
        # the matrix's 64-px ModifiedResNet a search step (72 images, one core) took 0.58 s
        # against 0.80 s; a ViT's only convolution is its patch embedding, and it is unchanged.
        normalized = ((pixels - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        emb = self.model.encode_image(normalized)  # type: ignore[operator]
        return self.scale * F.normalize(emb, dim=-1) @ self.weights.T

    def predict(self, pixels: torch.Tensor, batch: int = 128) -> np.ndarray:
        """int64 (n,) top-1 classes of float32 (n, 3, S, S) pixels in [0, 1], without gradients."""
        import torch

        with torch.no_grad():
            parts = [self.logits(pixels[i : i + batch]).argmax(dim=1) for i in range(0, len(pixels), batch)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.int64)


def normalization(loaded: LoadedModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of the model's preprocess (its Normalize step)."""
    for step in getattr(loaded.preprocess, "transforms", ()):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(map(float, step.mean)), tuple(map(float, step.std))
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def stamp(pixels: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) images with a (1 or n, 1, S, S) mask and (1 or n, 3, S, S) pattern stamped on."""
    return (1 - mask) * pixels + mask * pattern


def stamp_image(image: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) with a recovered stamp, uint8 RGBA (S, S, 4) (alpha = mask), stretched
    over the whole image and blended in; the model sees a square image as the stamp was found."""
    from PIL import Image

    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray(rgba, "RGBA").resize((width, height), Image.Resampling.BILINEAR))
    mask = resized[..., 3:].astype(np.float32) / 255
    blended = (1 - mask) * image.astype(np.float32) + mask * resized[..., :3].astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def rgba_trigger(target: int, rgba: np.ndarray, size: int) -> ClassTrigger:
    """A recovered stamp, uint8 RGBA (S', S', 4) as the scan wrote it, as a ClassTrigger at the
    model's input size `size` (resized bilinearly when the sizes differ)."""
    from PIL import Image

    if rgba.shape[0] != size or rgba.shape[1] != size:
        rgba = np.asarray(Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.BILINEAR))
    values = rgba.astype(np.float32) / 255
    mask, pattern = values[..., 3], values[..., :3].transpose(2, 0, 1)
    return ClassTrigger(target, mask, np.ascontiguousarray(pattern), float(mask.mean()), True, 1.0)


def trigger_rgba(trigger: ClassTrigger) -> np.ndarray:
    """uint8 (S, S, 4): the pattern with the mask as alpha."""
    rgba = np.concatenate([trigger.pattern, trigger.mask[None]], axis=0).transpose(1, 2, 0)
    return (rgba * 255).round().astype(np.uint8)


def search_triggers(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    targets: Sequence[int],
    config: SearchConfig = SearchConfig(),
    deadline: float | None = None,
    counter: PassCounter | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[list[ClassTrigger], int]:
    """Search a stamp for each of `targets` on `pixels` (float32 (N, 3, S, S) in [0, 1]).

    Each target's batches are drawn from the images the model does not already predict as it
    (`predicted`: int64 (N,)), or, given several models' predictions (int64 (M, N)), from the
    images none of them predicts as it. Stops after `config.steps`, or at `deadline`
    (time.monotonic()).
    Returns the triggers, in the order of `targets`, and the steps taken.
    """
    import torch
    import torch.nn.functional as F

    counter = counter if counter is not None else PassCounter()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    count, size = len(targets), pixels.shape[-1]
    # Start from a faint mask (sigmoid(-3) ~ 0.05) and a mid-grey pattern, with a little noise
    # so that the targets do not all start from the same point.
    mask_logit = (torch.randn(count, 1, size, size) * 0.1 - 3.0).requires_grad_(True)
    pattern_logit = (torch.randn(count, 3, size, size) * 0.1).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))
    pools = batch_pools(predicted, targets)
    # A class that the model already predicts for every image has nothing to flip: it is not
    # searched (its batches are drawn from all images, and it reports no stamp).
    unsearchable = np.array([len(pool) == 0 for pool in pools])
    pools = [pool if len(pool) else np.arange(np.shape(predicted)[-1]) for pool in pools]
    cost = np.zeros(count)
    streak = np.zeros(count, np.int64)  # > 0: steps in a row at the goal; < 0: below it
    best_area = np.ones(count)
    best_success = np.zeros(count)
    best_mask = torch.sigmoid(mask_logit.detach()).clone()
    best_pattern = torch.sigmoid(pattern_logit.detach()).clone()
    labels = torch.tensor(np.repeat(np.asarray(targets, np.int64), config.batch))
    steps = 0
    while steps < config.steps:
        steps += 1
        chosen = [rng.choice(pool, size=config.batch, replace=len(pool) < config.batch) for pool in pools]
        batch = pixels[torch.from_numpy(np.concatenate(chosen))]  # (count * batch, 3, S, S)
        mask = torch.sigmoid(mask_logit)
        pattern = torch.sigmoid(pattern_logit)
        stamped = stamp(
            batch,
            mask.repeat_interleave(config.batch, dim=0),
            pattern.repeat_interleave(config.batch, dim=0),
        )
        logits = model.logits(stamped)
        loss_per_target = F.cross_entropy(logits, labels, reduction="none").view(count, config.batch).mean(1)
        area = mask.mean(dim=(1, 2, 3))
        loss = (loss_per_target + torch.from_numpy(cost).float() * area).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counter.backward += len(batch)
        success = (logits.argmax(1) == labels).float().view(count, config.batch).mean(1).numpy()
        areas = area.detach().numpy()
        better = (success >= config.goal) & (areas < best_area) & ~unsearchable
        for i in np.flatnonzero(better):
            best_area[i], best_success[i] = areas[i], success[i]
            best_mask[i], best_pattern[i] = mask[i].detach(), pattern[i].detach()
        _update_costs(cost, streak, success >= config.goal, config)
        if on_step is not None:
            on_step()
        if deadline is not None and time.monotonic() >= deadline:
            break
    triggers = [
        ClassTrigger(
            int(t),
            best_mask[i, 0].numpy().astype(np.float32),
            best_pattern[i].numpy().astype(np.float32),
            float(best_area[i]),
            bool(best_success[i] >= config.goal),
            float(best_success[i]),
        )
        for i, t in enumerate(targets)
    ]
    return triggers, steps


def batch_pools(predicted: np.ndarray, targets: Sequence[int]) -> list[np.ndarray]:
    """Per target, the indices of the images that no model predicts as it: `predicted` is int64
    (N,) for one model or (M, N) for several (possibly none left)."""
    predictions = np.atleast_2d(predicted)
    return [np.flatnonzero((predictions != t).all(axis=0)) for t in targets]


def polish(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    trigger: ClassTrigger,
    steps: int,
    batch: int,
    lr: float = 0.1,
    seed: int = 0,
    counter: PassCounter | None = None,
) -> ClassTrigger:
    """`trigger` optimized further for success at no more than its area (float32 pixels (N, 3,
    S, S) in [0, 1], `predicted` int64 (N,) as in `search_triggers`).

    The search keeps the smallest stamp that flipped one small batch: it sits at the edge of
    working, and flips fewer images that it never saw. Here its mask and pattern are trained on
    larger batches to turn images into the target, the mask rescaled after every step so that
    its area never grows; the stamp stays as small as the search found it.
    """
    import torch
    import torch.nn.functional as F

    pool = np.flatnonzero(predicted != trigger.target)
    if len(pool) == 0 or steps == 0:
        return trigger
    counter = counter if counter is not None else PassCounter()
    rng = np.random.default_rng(seed)
    mask_logit = _logit(trigger.mask)[None, None].requires_grad_(True)
    pattern_logit = _logit(trigger.pattern)[None].requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((batch,), trigger.target, dtype=torch.int64)

    def capped(logit: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(logit)
        return mask * torch.clamp(trigger.area / mask.mean().clamp(min=1e-8), max=1.0)

    for _ in range(steps):
        chosen = torch.from_numpy(rng.choice(pool, size=batch, replace=len(pool) < batch))
        logits = model.logits(stamp(pixels[chosen], capped(mask_logit), torch.sigmoid(pattern_logit)))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counter.backward += batch
    with torch.no_grad():
        mask = capped(mask_logit)[0, 0].numpy().astype(np.float32)
        pattern = torch.sigmoid(pattern_logit)[0].numpy().astype(np.float32)
    return replace(trigger, mask=mask, pattern=pattern, area=float(mask.mean()))


def _logit(values: np.ndarray) -> torch.Tensor:
    """The logits of float32 values in [0, 1], kept finite."""
    import torch

    return torch.logit(torch.from_numpy(values).clamp(1e-4, 1 - 1e-4))


def _update_costs(cost: np.ndarray, streak: np.ndarray, at_goal: np.ndarray, config: SearchConfig) -> None:
    """Neural Cleanse's schedule for each target's L1 weight, in place.

    The weight starts at 0 (find any stamp that works first), is set to `first_cost` when the goal
    is first reached, then is multiplied by `cost_up` after `patience` successful steps in a row
    and divided by `cost_down` after `patience` failed ones.
    """
    streak[:] = np.where(at_goal, np.maximum(streak, 0) + 1, np.minimum(streak, 0) - 1)
    for i in range(len(cost)):
        if cost[i] == 0:
            if at_goal[i]:
                cost[i] = config.first_cost
            continue
        if streak[i] >= config.patience:
            cost[i] *= config.cost_up
            streak[i] = 0
        elif streak[i] <= -config.patience:
            cost[i] /= config.cost_down
            streak[i] = 0
