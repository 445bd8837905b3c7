"""A second trigger family for the model-level search: a smooth whole-image warp (WaNet).

A warp moves pixels instead of painting them, so no stamp (mask + pattern) imitates it; and it
covers the whole image, so every object crop carries it and the data pass's oracle finds no
region to remove (docs/design.md, "Warp rows"). Here, for each class c, one displacement field
of a fixed size is optimized to turn clean images into c:

- the field is a `grid` x `grid` grid of control vectors, upsampled bicubically to the image and
  rescaled so that its mean displacement is `strength` pixels per 32 pixels of side (the
  convention of `auditor.attacks.Warp`). Only its shape is searched, never its size;
- a class's value is the empirical logit of the field's success on held-out images (the share
  of those not already predicted as c that it turns into c);
- the outlier test is `decide.outliers`, the same calibrated step-down test as the stamps', its
  spread widened by each value's own binomial standard error (a class with 2 hits among classes
  with none must not look like an outlier). That only lowers an index, so the false-alarm rate
  stays at or under alpha.

Why a fixed size works: a model that learnt a warp trigger answers to warps as a family (on
the tuning warp ResNet, four random fields of the planted size moved 0.23 of clean images to
its target and under 0.02 to any other class), so a small optimized field reaches its target
far more often than any other class. Clean models have classes that warps reach easily too
(drawn shapes: 'arrow' and 'diamond', 0.4-0.6 at the default size), but no single one stands
out from the rest. Measured on tuning rows only: docs/design.md, "Warp family".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from auditor.inversion.decide import anomaly_indices, max_index_threshold, outliers

if TYPE_CHECKING:
    import torch

    from auditor.inversion.search import DifferentiableModel, PassCounter, PredictFn


@dataclass(frozen=True)
class WarpConfig:
    """Search settings, chosen on the tuning rows (docs/design.md, "Warp family"). The decision
    does not depend on them: its threshold is `decide`'s calibrated one."""

    grid: int = 4  # control vectors per side
    # Mean displacement, in pixels per 32 pixels of the image's side (6 px on 64): large enough
    # that a target's held-out success stands clear of the binomial noise of 60 images (at 1.5
    # the tuning warp ResNet's target reached 0.05-0.37, at 3.0 0.46-0.70 on one image sample).
    strength: float = 3.0
    steps: int = 15  # optimisation steps, every field together (one batch per field per step)
    batch: int = 4
    lr: float = 0.3
    # Independent starts per class, optimized together; each class keeps the field that turns
    # the most of `select` search images into it. One start's outcome depends on where it began:
    # on the sample of images a scan draws, the same target reached only 0.08-0.23 with one
    # start, and 0.47-0.85 with the best of three (index 3.8-5.9; clean models' largest 1.3-1.7).
    restarts: int = 3
    select: int = 32
    seed: int = 0


@dataclass(frozen=True)
class ClassWarp:
    """One class's field and how it did on held-out images.

    `field`: float32 (2, S, S), the (dy, dx) displacement in pixels; `hits` of `trials`: held-out
    images not predicted as the target before that the warp turned into it.
    """

    target: int
    field: np.ndarray
    hits: int
    trials: int
    index: float

    @property
    def success(self) -> float:
        return self.hits / self.trials if self.trials else 0.0


@dataclass(frozen=True)
class WarpSearch:
    """The warp family's result: every searched class, the threshold and the outliers."""

    strength: float
    per_class: tuple[ClassWarp, ...]
    threshold: float
    flagged: tuple[int, ...]  # outlying classes, strongest first (`decide.outliers`)
    complete: bool  # False: the budget stopped the optimisation before `steps`
    steps: int
    seconds: float


def displacement(theta: torch.Tensor, size: int, strength: float) -> torch.Tensor:
    """Control vectors float32 (k, 2, g, g) -> fields (k, 2, size, size) in pixels, each with a
    mean absolute displacement of `strength` pixels per 32 of `size`."""
    import torch.nn.functional as F

    field = F.interpolate(theta, size=(size, size), mode="bicubic", align_corners=True)
    mean = field.abs().mean(dim=(1, 2, 3), keepdim=True)
    return field / (mean + 1e-6) * (strength * size / 32.0)


def apply_warp(pixels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) images resampled at (y + dy, x + dx), field (n or 1, 2, S, S); differentiable.

    Bilinear, with the border pixel repeated outside the image, as `auditor.attacks.Warp` does.
    """
    import torch
    import torch.nn.functional as F

    n, size = pixels.shape[0], pixels.shape[-1]
    axis = torch.arange(size, dtype=pixels.dtype)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    scale = 2.0 / max(size - 1, 1)
    grid = torch.stack([(xs + field[:, 1]) * scale - 1, (ys + field[:, 0]) * scale - 1], dim=-1)
    return F.grid_sample(
        pixels, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True
    )


def search_warps(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    targets: Sequence[int],
    config: WarpConfig,
    deadline: float | None = None,
    counter: PassCounter | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[np.ndarray, int]:
    """One field per target on `pixels` (float32 (N, 3, S, S) in [0, 1]), optimized together.

    Each target's batches come from the images not already predicted as it (`predicted`, int64
    (N,)). Returns (fields float32 (len(targets), 2, S, S), steps taken): `config.steps`, fewer
    when `deadline` (time.monotonic()) came first.
    """
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    starts = max(1, config.restarts)
    count, size = len(targets) * starts, pixels.shape[-1]
    theta = torch.randn(count, 2, config.grid, config.grid).requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    pools = [np.flatnonzero(predicted != t) for t in targets]
    pools = [pool if len(pool) else np.arange(len(predicted)) for pool in pools]
    pools = [pool for pool in pools for _ in range(starts)]  # field k is target k // starts
    labels = torch.tensor(np.repeat(np.repeat(np.asarray(targets, np.int64), starts), config.batch))
    steps = 0
    while steps < config.steps and not (deadline is not None and time.monotonic() >= deadline):
        steps += 1
        chosen = [rng.choice(pool, size=config.batch, replace=len(pool) < config.batch) for pool in pools]
        batch = pixels[torch.from_numpy(np.concatenate(chosen))]
        fields = displacement(theta, size, config.strength).repeat_interleave(config.batch, dim=0)
        loss = F.cross_entropy(model.logits(apply_warp(batch, fields)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if counter is not None:
            counter.backward += len(batch)
        if on_step is not None:
            on_step()
    with torch.no_grad():
        fields = displacement(theta, size, config.strength)
    if starts > 1:
        fields = _best_starts(model, pixels, pools[::starts], targets, fields, config, rng, counter)
    return fields.numpy().astype(np.float32), steps


def _best_starts(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    pools: Sequence[np.ndarray],
    targets: Sequence[int],
    fields: torch.Tensor,
    config: WarpConfig,
    rng: np.random.Generator,
    counter: PassCounter | None,
) -> torch.Tensor:
    """Per target, the start whose field turns the most of `config.select` search images (of its
    pool, the same for every start) into it: (len(targets), 2, S, S)."""
    import torch

    starts, best = config.restarts, []
    for k, (pool, target) in enumerate(zip(pools, targets, strict=True)):
        chosen = pixels[torch.from_numpy(rng.choice(pool, size=min(config.select, len(pool)), replace=False))]
        hits = []
        for field in fields[k * starts : (k + 1) * starts]:
            with torch.no_grad():
                hits.append(int((model.logits(apply_warp(chosen, field[None])).argmax(1) == target).sum()))
            if counter is not None:
                counter.forward += len(chosen)
        best.append(fields[k * starts + int(np.argmax(hits))])
    return torch.stack(best)


def warp_success(
    field: np.ndarray, holdout: torch.Tensor, before: np.ndarray, target: int, predict: PredictFn
) -> tuple[int, int]:
    """(hits, trials): of the held-out images not predicted `target` before (`before`, int64 (n,)),
    how many the warp `field` (float32 (2, S, S)) turns into it."""
    import torch

    keep = before != target
    if not keep.any():
        return 0, 0
    with torch.no_grad():
        warped = apply_warp(holdout[torch.from_numpy(keep)], torch.from_numpy(field)[None])
    return int(np.sum(predict(warped.numpy()) == target)), int(keep.sum())


def empirical_logit(hits: int, trials: int) -> tuple[float, float]:
    """(log((h + 1/2) / (n - h + 1/2)), its standard error): finite at 0 and n hits."""
    a, b = hits + 0.5, trials - hits + 0.5
    return float(np.log(a / b)), float(np.sqrt(1 / a + 1 / b))


def warp_family(
    model: DifferentiableModel,
    search_pixels: torch.Tensor,
    search_predicted: np.ndarray,
    holdout: torch.Tensor,
    predict: PredictFn,
    targets: Sequence[int],
    config: WarpConfig = WarpConfig(),
    alpha: float = 0.05,
    deadline: float | None = None,
    counter: PassCounter | None = None,
    on_step: Callable[[], None] | None = None,
) -> WarpSearch:
    """Search a field per target, measure each on `holdout`, and test for outlying classes."""
    started = time.monotonic()
    fields, steps = search_warps(
        model, search_pixels, search_predicted, targets, config, deadline, counter, on_step
    )
    before = predict(holdout.numpy())
    measured = [warp_success(f, holdout, before, t, predict) for f, t in zip(fields, targets, strict=True)]
    if counter is not None:
        counter.forward += len(holdout) + sum(trials for _, trials in measured)
    logits = {t: empirical_logit(h, n) for t, (h, n) in zip(targets, measured, strict=True)}
    # decide's indices rank low values as anomalous (a stamp's small area): negate the logits.
    values = {t: -value for t, (value, _) in logits.items()}
    noise = {t: se for t, (_, se) in logits.items()}
    indices = anomaly_indices(values, noise)
    per_class = tuple(
        ClassWarp(t, fields[i], h, n, round(indices[t], 4))
        for i, (t, (h, n)) in enumerate(zip(targets, measured, strict=True))
    )
    return WarpSearch(
        strength=config.strength,
        per_class=per_class,
        threshold=round(max_index_threshold(len(targets), alpha), 4),
        flagged=tuple(outliers(values, alpha, noise=noise)),
        complete=steps >= config.steps,
        steps=steps,
        seconds=round(time.monotonic() - started, 2),
    )
