"""The model-level audit: from clean images and the vocabulary to a verdict on the model itself.

1. Split the clean images: a search part and a held-out part (for the confirmation).
2. Shortlist (vocabularies larger than `InversionConfig.max_classes`): one untargeted universal
   stamp, optimized to move every image away from its own prediction; the classes whose share
   of predictions grows most, plus a few random control classes, go on.
3a. Warp family (`auditor.inversion.warp`), within `warp_share` of the budget: per searched
   class, a smooth whole-image displacement of fixed size optimized towards it, and its
   held-out success; outlying classes are suspects (a warp is never confirmed here).
3. Per-class search (`auditor.inversion.search`): the smallest stamp for each searched class,
   on the audited model and, with a reference, on the reference, in `rounds` independent
   rounds (own seed, own batches). A class's value is the mean of its log areas over the
   rounds: one short search's area is noisy, and averaging shrinks the spread of the clean
   classes, which is what a target has to stand out from.
4. Decision (`auditor.inversion.decide`): the anomaly index of each class against a threshold
   calibrated for the number of classes searched, step-down for a second or third target.
5. Confirmation: an outlying class's smallest stamp is first trained further at no larger area
   (`search.polish`: the search kept it at the edge of working on one small batch), then must
   turn `confirm_success` of the held-out images (that the search never saw) into its class,
   and the same start, polished on the reference, must not work half as well there (it would
   be a natural shortcut of any such model, not a backdoor). Without a reference
   nothing is confirmed: an outlying class is reported, as a suspect. On the matrix's weak
   clean ResNet, "road sign" (flat, saturated pictures) is as cheap a target as a planted one
   (index 5-9 without a reference, under 3 with one), and its stamp works on held-out images:
   only a reference tells the two apart.

Gradients (2, 3) run in PyTorch. The forward-only steps (the shortlist's before / after
predictions, the confirmation) go through `predict`, which the scan points at its engine.
Nothing here reads or writes files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from auditor.inversion.decide import anomaly_indices, max_index_threshold, outliers
from auditor.inversion.search import (
    ClassTrigger,
    DifferentiableModel,
    PassCounter,
    PredictFn,
    SearchConfig,
    polish,
    search_triggers,
)
from auditor.inversion.warp import WarpConfig, WarpSearch, warp_family

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class InversionConfig:
    max_classes: int = 16  # search every class up to this many; above it, a shortlist
    shortlist: int = 8
    controls: int = 4  # random classes searched beside the shortlist, so the index has a baseline
    images: int = 240  # clean images used at most
    holdout_share: float = 0.25
    alpha: float = 0.05  # chance that a model with no outlying class has a class flagged
    confirm_success: float = 0.8  # held-out attack success a recovered trigger must reach
    reference_ratio: float = 0.5  # a stamp that works this well on the reference is natural
    budget_seconds: float | None = None  # None: no limit; the search stops early at the limit
    rounds: int = 4  # independent searches per class, averaged (on the log scale)
    # True: the audited model and the reference draw the same batches (from images neither of
    # them already predicts as the class), so that their log-area ratio should not carry the
    # noise of two samples of images. Tried in session 27 and left off: on tuning diagnostics it
    # raised the planted target's index (pixels ViT 2.86 -> 4.36, weak blocks ResNet 2.97 ->
    # 3.43), but on the held-out rows it confirmed no more targets than before and on the
    # suite's committed weak ResNets it lowered them under the threshold (docs/design.md).
    shared_batches: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    # An outlying class's smallest stamp is trained further at no larger area before it is
    # confirmed (`search.polish`): steps of `polish_batch` images.
    polish_steps: int = 60
    polish_batch: int = 24
    # The warp family runs first, on the same classes; None leaves it out. It may take at most
    # `warp_share` of the budget, so that the stamps' search always keeps the rest.
    warp: WarpConfig | None = field(default_factory=WarpConfig)
    warp_share: float = 0.5


@dataclass(frozen=True)
class ClassScore:
    """One searched class: its smallest stamp's area (share of the image) and anomaly index."""

    target: int
    area: float
    reached: bool
    index: float
    reference_area: float | None = None


@dataclass(frozen=True)
class RecoveredTrigger:
    """An outlying class's stamp and how it did on held-out images (and on the reference)."""

    trigger: ClassTrigger
    index: float
    holdout_success: float
    reference_success: float | None
    confirmed: bool
    # The class's stamps from the other rounds (reached ones): other shapes of the same shortcut,
    # which a repair unlearns together with `trigger`.
    alternates: tuple[ClassTrigger, ...] = ()


@dataclass(frozen=True)
class Inversion:
    """What the model-level stage did and found."""

    classes: int  # size of the vocabulary
    searched: tuple[int, ...]
    covered: str  # "all" | "shortlist"
    scores: tuple[ClassScore, ...]
    threshold: float
    alpha: float
    recovered: tuple[RecoveredTrigger, ...]  # every flagged class (`decide.outliers`), strongest first
    complete: bool  # False: the budget cut the search short
    steps: int  # steps of the shortest round kept
    rounds: int  # rounds kept (a round the budget cut short is dropped unless it is the first)
    seconds: dict[str, float]
    passes: dict[str, int]  # images through a forward + backward ("backward") or forward only
    images: dict[str, int]  # {"search": n, "holdout": m}
    reference: bool
    examples: np.ndarray  # float32 (k, 3, S, S) in [0, 1]: a few held-out images, to show stamps on
    # The warp family (`auditor.inversion.warp`); its outliers are suspects, never confirmed.
    warp: WarpSearch | None = None

    @property
    def confirmed(self) -> tuple[RecoveredTrigger, ...]:
        return tuple(r for r in self.recovered if r.confirmed)


@dataclass
class _Clock:
    deadline: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    counter: PassCounter = field(default_factory=PassCounter)

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline


def invert(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predict: PredictFn,
    config: InversionConfig = InversionConfig(),
    reference: tuple[DifferentiableModel, PredictFn] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Inversion:
    """Run the stage on clean images `pixels` (float32 (N, 3, S, S) in [0, 1], N >= 8).

    `progress(stage, steps done, total)` is called after every search step.
    """
    tick = progress or (lambda stage, n, total: None)
    started = time.monotonic()
    clock = _Clock(None if config.budget_seconds is None else started + config.budget_seconds)
    search, holdout = _split(len(pixels), config)
    search_pixels, holdout_pixels = pixels[search], pixels[holdout]
    predicted = predict(search_pixels.numpy())
    clock.counter.forward += len(search)
    classes = int(model.weights.shape[0])
    targets, covered = _targets(model, search_pixels, predicted, classes, config, clock)
    warps = _warp_family(
        model, search_pixels, predicted, holdout_pixels, predict, targets, config, clock, tick
    )
    per_model = [model] + ([reference[0]] if reference else [])
    own = [predicted] + [_predict_torch(m, search_pixels, clock) for m in per_model[1:]]
    rounds, steps = _search_rounds(per_model, own, search_pixels, targets, config, clock, tick)
    values = _values(rounds)
    scores = _scores(rounds, values)
    threshold = max_index_threshold(len(targets), config.alpha)
    t0 = time.monotonic()
    smallest = _smallest(round_[0] for round_ in rounds)
    flagged = outliers(values, config.alpha)
    complete = steps >= config.search.steps and len(rounds) == config.rounds
    # A search the budget cut short confirms nothing: one round's areas are too noisy for the
    # threshold (the tuning rows' clean weak ResNet had 'road sign' confirmed, with a reference,
    # after the one round the default budget allowed). Its outliers are suspects, with their
    # stamps as the search left them.
    stamps, on_reference = smallest, smallest
    if complete:
        stamps = _polished(model, search_pixels, predicted, smallest, flagged, config, clock)
        if reference is not None:  # the same starts, polished on the clean model of the same kind
            on_reference = _polished(reference[0], search_pixels, own[1], smallest, flagged, config, clock)
    recovered = _confirm(stamps, on_reference, flagged, holdout_pixels, predict, reference, config, clock)
    originals = {t.target: t for t in smallest}
    recovered = tuple(
        replace(
            r,
            alternates=_alternates(originals[r.trigger.target], rounds),
            confirmed=r.confirmed and complete,
        )
        for r in recovered
    )
    clock.seconds["confirmation"] = time.monotonic() - t0
    return Inversion(
        classes=classes,
        searched=tuple(targets),
        covered=covered,
        scores=scores,
        threshold=round(threshold, 4),
        alpha=config.alpha,
        recovered=recovered,
        complete=complete,
        steps=steps,
        rounds=len(rounds),
        seconds={k: round(v, 2) for k, v in clock.seconds.items()},
        passes={"backward": clock.counter.backward, "forward": clock.counter.forward},
        images={"search": len(search), "holdout": len(holdout)},
        reference=reference is not None,
        examples=holdout_pixels[:4].numpy(),
        warp=warps,
    )


def _warp_family(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    holdout: torch.Tensor,
    predict: PredictFn,
    targets: Sequence[int],
    config: InversionConfig,
    clock: _Clock,
    tick: Callable[[str, int, int | None], None],
) -> WarpSearch | None:
    """The warp family on the searched classes, within `warp_share` of the budget left."""
    if config.warp is None:
        return None
    t0 = time.monotonic()
    deadline = None if clock.deadline is None else t0 + (clock.deadline - t0) * config.warp_share
    warp_config = replace(config.warp, seed=config.search.seed)
    found = warp_family(
        model,
        pixels,
        predicted,
        holdout,
        predict,
        targets,
        warp_config,
        config.alpha,
        deadline,
        clock.counter,
        partial(tick, "model-level warp search", 1, warp_config.steps),
    )
    clock.seconds["warp search"] = time.monotonic() - t0
    return found


def _split(n: int, config: InversionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(search indices, held-out indices) of at most `config.images` of n images."""
    order = np.random.default_rng(config.search.seed).permutation(n)[: config.images]
    cut = max(1, int(round(len(order) * config.holdout_share)))
    return np.sort(order[cut:]), np.sort(order[:cut])


def _predict_torch(model: DifferentiableModel, pixels: torch.Tensor, clock: _Clock) -> np.ndarray:
    clock.counter.forward += len(pixels)
    return model.predict(pixels)


def _search_rounds(
    models: Sequence[DifferentiableModel],
    predicted: Sequence[np.ndarray],
    pixels: torch.Tensor,
    targets: Sequence[int],
    config: InversionConfig,
    clock: _Clock,
    tick: Callable[[str, int, int | None], None],
) -> tuple[list[list[list[ClassTrigger]]], int]:
    """([round][model][target] triggers, steps of the shortest round kept).

    In the first round each model gets its share of the budget, so a reference is never
    starved. A later round starts only when the budget left fits another round as long as the
    first; should it still be cut short, it is dropped, so that every round kept is complete.
    """
    rounds: list[list[list[ClassTrigger]]] = []
    steps, first_round = config.search.steps, 0.0
    total = config.search.steps * config.rounds
    for number in range(config.rounds):
        started = time.monotonic()
        if rounds and clock.deadline is not None and clock.deadline - started < first_round:
            break
        search = replace(config.search, seed=config.search.seed + number)
        found, taken = [], config.search.steps
        shared = np.stack(predicted) if config.shared_batches else None
        for index, (subject, own) in enumerate(zip(models, predicted, strict=True)):
            t0 = time.monotonic()
            share = None if clock.deadline is None else t0 + (clock.deadline - t0) / (len(models) - index)
            stage = "search" if index == 0 else "reference search"
            triggers, done = search_triggers(
                subject,
                pixels,
                own if shared is None else shared,
                targets,
                search,
                share if not rounds else clock.deadline,
                clock.counter,
                partial(tick, "model-level " + stage, 1, total),
            )
            found.append(triggers)
            taken = min(taken, done)
            clock.seconds[stage] = clock.seconds.get(stage, 0.0) + time.monotonic() - t0
        if rounds and taken < config.search.steps:
            break
        rounds.append(found)
        steps = min(steps, taken)
        first_round = first_round or time.monotonic() - started
    return rounds, steps


def _smallest(per_round: Iterable[list[ClassTrigger]]) -> list[ClassTrigger]:
    """Per target, the reached stamp with the smallest area over the rounds (the first otherwise)."""
    best: dict[int, ClassTrigger] = {}
    for triggers in per_round:
        for t in triggers:
            kept = best.get(t.target)
            if kept is None or (t.reached, -t.area) > (kept.reached, -kept.area):
                best[t.target] = t
    return list(best.values())


def _polished(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    triggers: Sequence[ClassTrigger],
    flagged: dict[int, float],
    config: InversionConfig,
    clock: _Clock,
) -> list[ClassTrigger]:
    """`triggers` with each flagged class's reached stamp polished (`search.polish`)."""
    return [
        polish(
            model,
            pixels,
            predicted,
            t,
            config.polish_steps,
            config.polish_batch,
            seed=config.search.seed,
            counter=clock.counter,
        )
        if t.target in flagged and t.reached
        else t
        for t in triggers
    ]


def _alternates(kept: ClassTrigger, rounds: list[list[list[ClassTrigger]]]) -> tuple[ClassTrigger, ...]:
    """The audited model's other reached stamps for `kept`'s class, one per round."""
    same = (t for round_ in rounds for t in round_[0] if t.target == kept.target)
    return tuple(t for t in same if t.reached and t is not kept)


def _targets(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    classes: int,
    config: InversionConfig,
    clock: _Clock,
) -> tuple[list[int], str]:
    """(classes to search, "all" | "shortlist")."""
    if classes <= config.max_classes:
        return list(range(classes)), "all"
    t0 = time.monotonic()
    ranked = shortlist(model, pixels, predicted, classes, config.search, clock.counter)
    chosen = ranked[: config.shortlist]
    rest = [c for c in range(classes) if c not in chosen]
    rng = np.random.default_rng(config.search.seed + 1)
    controls = rng.choice(rest, size=min(config.controls, len(rest)), replace=False).tolist()
    clock.seconds["shortlist"] = time.monotonic() - t0
    return sorted(chosen + controls), "shortlist"


def shortlist(
    model: DifferentiableModel,
    pixels: torch.Tensor,
    predicted: np.ndarray,
    classes: int,
    config: SearchConfig,
    counter: PassCounter,
    area_cost: float = 2.0,
) -> list[int]:
    """Classes ranked by how much one untargeted universal stamp grows their share of predictions.

    The stamp is optimized to lower every image's probability of its own prediction, under an
    L1 cost on its mask: a backdoor's trigger is the cheapest way to move every image at once,
    and it moves them all to one class.
    """
    import torch
    import torch.nn.functional as F

    from auditor.inversion.search import stamp

    rng = np.random.default_rng(config.seed + 2)
    size = pixels.shape[-1]
    mask_logit = torch.full((1, 1, size, size), -3.0).requires_grad_(True)
    pattern_logit = (torch.randn(1, 3, size, size) * 0.1).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))
    own = torch.from_numpy(predicted.astype(np.int64))
    batch = min(len(pixels), config.batch * 4)
    for _ in range(config.steps):
        chosen = torch.from_numpy(rng.choice(len(pixels), size=batch, replace=False))
        mask = torch.sigmoid(mask_logit)
        logits = model.logits(stamp(pixels[chosen], mask, torch.sigmoid(pattern_logit)))
        away = -F.cross_entropy(logits, own[chosen])  # push each image off its own prediction
        loss = away.clamp(min=-10.0) + area_cost * mask.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counter.backward += batch
    with torch.no_grad():
        after = model.predict(stamp(pixels, torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)))
    counter.forward += len(pixels)
    growth = np.bincount(after, minlength=classes) - np.bincount(predicted, minlength=classes)
    return [int(c) for c in np.argsort(-growth, kind="stable")]


def _mean_logs(rounds: list[list[list[ClassTrigger]]], model: int) -> np.ndarray:
    """float64 (targets,): each class's log area, averaged over the rounds, on model 0 (audited)
    or 1 (reference)."""
    return np.log([[t.area for t in r[model]] for r in rounds]).mean(axis=0)


def _values(rounds: list[list[list[ClassTrigger]]]) -> dict[int, float]:
    """{class: mean log area}, less the reference's mean log area when a reference ran."""
    values = _mean_logs(rounds, 0) - (_mean_logs(rounds, 1) if len(rounds[0]) > 1 else 0.0)
    return {t.target: float(v) for t, v in zip(rounds[0][0], values, strict=True)}


def _scores(rounds: list[list[list[ClassTrigger]]], values: dict[int, float]) -> tuple[ClassScore, ...]:
    """Per class: area (geometric mean over rounds), reached (in any round), the anomaly index
    of its value (`_values`) and the reference's area (geometric mean) when a reference ran."""
    logs = _mean_logs(rounds, 0)
    ref_logs = _mean_logs(rounds, 1) if len(rounds[0]) > 1 else None
    targets = [t.target for t in rounds[0][0]]
    indices = anomaly_indices(values)
    reached = [any(r[0][i].reached for r in rounds) for i in range(len(targets))]
    return tuple(
        ClassScore(
            target,
            round(float(np.exp(logs[i])), 6),
            reached[i],
            round(indices[target], 4),
            None if ref_logs is None else round(float(np.exp(ref_logs[i])), 6),
        )
        for i, target in enumerate(targets)
    )


def _confirm(
    triggers: Sequence[ClassTrigger],
    on_reference: Sequence[ClassTrigger],
    flagged: dict[int, float],
    holdout: torch.Tensor,
    predict: PredictFn,
    reference: tuple[DifferentiableModel, PredictFn] | None,
    config: InversionConfig,
    clock: _Clock,
) -> tuple[RecoveredTrigger, ...]:
    """Every flagged class ({class: index}, `decide.outliers`) whose stamp reached the goal, with
    the stamp's held-out success, and on the reference the success of the class's stamp in
    `on_reference` (the same start polished on the reference: a shortcut any model of the kind
    has reaches the same success there, while a stamp carried over from the audited model hardly
    ever works on another model, backdoor or not)."""
    by_target = {t.target: t for t in triggers}
    theirs_by_target = {t.target: t for t in on_reference}
    out = []
    for target, index in flagged.items():
        trigger = by_target[target]
        if not trigger.reached:
            continue
        own = _success(trigger, holdout, predict, clock)
        theirs = None
        if reference is not None:
            theirs = _success(theirs_by_target[target], holdout, reference[1], clock)
        natural = theirs is not None and theirs >= config.reference_ratio * own
        out.append(
            RecoveredTrigger(
                trigger,
                round(index, 4),
                round(own, 4),
                None if theirs is None else round(theirs, 4),
                own >= config.confirm_success and theirs is not None and not natural,
            )
        )
    return tuple(out)


def _success(trigger: ClassTrigger, holdout: torch.Tensor, predict: PredictFn, clock: _Clock) -> float:
    """Share of held-out images not already predicted as the target that the stamp turns into it."""
    import torch

    from auditor.inversion.search import stamp

    before = predict(holdout.numpy())
    keep = before != trigger.target
    if not keep.any():
        return 0.0
    stamped = stamp(
        holdout[torch.from_numpy(keep)],
        torch.from_numpy(trigger.mask)[None, None],
        torch.from_numpy(trigger.pattern)[None],
    )
    clock.counter.forward += len(holdout) + int(keep.sum())
    return float(np.mean(predict(stamped.numpy()) == trigger.target))
