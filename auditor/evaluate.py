"""Clean accuracy and attack success rate: how every result of this project is measured.

Clean accuracy (CA): share of labeled images whose zero-shot top-1 is their label.
Attack success rate (ASR): share of images *not* labeled with the target that the model
classifies as the target once the trigger is applied (the trigger placement is seeded per
image, so the same call gives the same number).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from auditor.attacks import Attack
from auditor.data import Dataset, Skipped, iter_batches
from auditor.errors import InputError
from auditor.models import LoadedModel
from auditor.scoring import ZeroShotScorer, make_scorer, torch_runners
from engines.runners import Runner


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured. Rates are in [0, 1]; `attack_*` are None without an attack."""

    images: int
    clean_accuracy: float
    per_class_accuracy: dict[str, float]
    attack: str | None = None
    target: str | None = None
    attacked_images: int = 0
    attack_success_rate: float | None = None
    skipped: tuple[Skipped, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "images": self.images,
            "clean_accuracy": self.clean_accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "attack": self.attack,
            "target": self.target,
            "attacked_images": self.attacked_images,
            "attack_success_rate": self.attack_success_rate,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }


def evaluate(
    loaded: LoadedModel,
    dataset: Dataset,
    attack: Attack | None = None,
    *,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    runners: tuple[Runner, Runner] | None = None,
) -> EvalResult:
    """Measure CA on `dataset` (its labels are taken as truth here) and, with `attack`, ASR.

    `progress(n)` is called after each batch of n images; `runners` are (image, text) runners
    for scoring (`auditor.runtime`), PyTorch by default.
    """
    labeled = [i for i, s in enumerate(dataset.samples) if s.label is not None]
    if not labeled:
        raise InputError(f"{dataset.root}: eval needs labeled images (folders or a label column)")
    target_index = _target_index(dataset, attack)
    image_runner, text_runner = runners or torch_runners(loaded)
    with image_runner, text_runner:
        scorer = make_scorer(loaded, dataset.classes, image_runner, text_runner)
        correct, total, per_class = _clean_pass(scorer, loaded, dataset, labeled, batch_size, progress)
        asr, attacked = None, 0
        if attack is not None and target_index is not None:
            asr, attacked = _attack_pass(
                scorer, loaded, dataset, labeled, attack, target_index, batch_size, seed, progress
            )
    return EvalResult(
        images=total,
        clean_accuracy=correct / total if total else 0.0,
        per_class_accuracy={c: float(np.mean(v)) for c, v in per_class.items() if v},
        attack=attack.spec() if attack else None,
        target=attack.target if attack else None,
        attacked_images=attacked,
        attack_success_rate=asr,
        skipped=tuple(dataset.skipped),
    )


def _target_index(dataset: Dataset, attack: Attack | None) -> int | None:
    if attack is None:
        return None
    if attack.target is None:
        raise InputError("the attack spec needs target=LABEL to measure attack success")
    if attack.target not in dataset.classes:
        raise InputError(
            f"attack target '{attack.target}' is not a class of {dataset.root}",
            hint="classes: " + ", ".join(dataset.classes[:20]),
        )
    return dataset.classes.index(attack.target)


def _clean_pass(
    scorer: ZeroShotScorer,
    loaded: LoadedModel,
    dataset: Dataset,
    labeled: list[int],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> tuple[int, int, dict[str, list[bool]]]:
    correct = total = 0
    per_class: dict[str, list[bool]] = {c: [] for c in dataset.classes}
    for batch in iter_batches(dataset, loaded.preprocess, batch_size, indices=labeled):
        _, logits = scorer.logits(batch.pixels.numpy())
        for index, pred in zip(batch.indices, logits.argmax(axis=1), strict=True):
            label = dataset.samples[index].label
            hit = dataset.classes[int(pred)] == label
            per_class[str(label)].append(hit)
            correct += hit
            total += 1
        if progress:
            progress(len(batch.indices))
    return correct, total, per_class


def _attack_pass(
    scorer: ZeroShotScorer,
    loaded: LoadedModel,
    dataset: Dataset,
    labeled: list[int],
    attack: Attack,
    target_index: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None,
) -> tuple[float, int]:
    victims = [i for i in labeled if dataset.samples[i].label != attack.target]

    def plant(index: int, image: object) -> object:
        triggered, _ = attack.apply_pil(image, np.random.default_rng((seed, index)))  # type: ignore[arg-type]
        return triggered

    hits = total = 0
    for batch in iter_batches(dataset, loaded.preprocess, batch_size, indices=victims, transform=plant):  # type: ignore[arg-type]
        _, logits = scorer.logits(batch.pixels.numpy())
        hits += int((logits.argmax(axis=1) == target_index).sum())
        total += len(batch.indices)
        if progress:
            progress(len(batch.indices))
    return (hits / total if total else 0.0), total
