"""Stage 0 and the first half of stage 1: score every image once, then choose what the oracle checks.

Stage 0 embeds every image of DATA once, in fixed batches of data indices (each batch cached as
it finishes). Stage 1 picks a stratified sample of up to `per_class` images per predicted
class, plus every image whose claimed label disagrees with the prediction: the oracle (the
expensive part) never runs on every image.
"""

from __future__ import annotations

import numpy as np

from auditor.data import iter_batches
from auditor.scan.cache import ScanCache
from auditor.scan.context import Progress, ScanContext
from auditor.scoring import Scores


def score_all(ctx: ScanContext, cache: ScanCache | None, tick: Progress) -> Scores:
    """Every image scored once, in fixed batches of data indices (cached one by one).

    A batch is a fixed range of indices, whatever in it fails to decode, so that a resumed scan
    scores exactly the batches an uninterrupted one would (same numbers, to the last bit).
    """
    dataset, size = ctx.dataset, ctx.config.batch_size
    total = len(dataset.samples)
    parts = []
    for start in range(0, total, size):
        cached = cache.load_scores(start) if cache else None
        if cached is not None:
            part, skipped = cached
            dataset.skipped.extend(skipped)
        else:
            known = len(dataset.skipped)
            indices = list(range(start, min(total, start + size)))
            part = ctx.scorer.score_batches(
                iter_batches(dataset, ctx.loaded.preprocess, size, indices=indices)
            )
            ctx.images_scored += len(part.indices)
            if cache:
                cache.save_scores(start, part, dataset.skipped[known:])
        parts.append(part)
        tick("scoring", min(size, total - start), total)
    if not parts:
        return ctx.scorer.score_batches([])
    columns = [(p.indices, p.embeddings, p.topk, p.probs) for p in parts]
    return Scores(*(np.concatenate(column) for column in zip(*columns, strict=True)))


def full_probs(scores: Scores, n_classes: int) -> dict[int, np.ndarray]:
    """{data index: probability vector (C,)}; only the top-k are known, the rest share what remains."""
    out = {}
    for row, index in enumerate(scores.indices):
        vector = np.zeros(n_classes, np.float32)
        rest = max(0.0, 1.0 - float(scores.probs[row].sum())) / max(1, n_classes - scores.topk.shape[1])
        vector[:] = rest
        vector[scores.topk[row]] = scores.probs[row]
        out[int(index)] = vector
    return out


def predictions(probs: dict[int, np.ndarray]) -> dict[int, int]:
    """{data index: the model's top-1 class}."""
    return {index: int(vector.argmax()) for index, vector in probs.items()}


def choose_sample(ctx: ScanContext, preds: dict[int, int]) -> list[int]:
    """Stage 1's first oracle pass: up to `per_class` per predicted class, plus label disagreements."""
    rng = np.random.default_rng(ctx.config.seed)
    by_class: dict[int, list[int]] = {}
    for index, pred in preds.items():
        by_class.setdefault(pred, []).append(index)
    sample: set[int] = set()
    for members in by_class.values():
        take = min(len(members), ctx.config.per_class)
        sample.update(int(i) for i in rng.choice(members, size=take, replace=False))
    for index in preds:
        label = ctx.dataset.label_index(ctx.dataset.samples[index])
        if label is not None and label != preds[index]:
            sample.add(index)
    return sorted(sample)
