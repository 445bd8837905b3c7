"""Stage 0 and the first half of stage 1: score every image once, then choose what the oracle checks.

Stage 0 embeds every image of DATA once, in fixed batches of data indices (each batch cached as
it finishes; the embeddings go to a memory-mapped file, `EmbeddingFile`). Stage 1 picks a
stratified sample of up to `per_class` images per predicted class, drawn in turn from the
images whose folder label disagrees with the prediction and from clusters of the others'
embeddings: the oracle (the expensive part) never runs on every image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from auditor.data import Skipped, iter_batches
from auditor.scan.cache import ScanCache, scores_name
from auditor.scan.context import Progress, ScanContext, T
from auditor.scan.executor import Executor, Unit
from auditor.scoring import Scores

# Clusters of a predicted class's embeddings that its oracle sample is spread over.
SAMPLE_STRATA = 4


def score_all(
    ctx: ScanContext, cache: ScanCache | None, tick: Progress, executor: Executor | None = None
) -> Scores:
    """Every image scored once, in fixed batches of data indices (cached one by one).

    A batch is a fixed range of indices, whatever in it fails to decode, so that a resumed scan
    scores exactly the batches an uninterrupted one would (same numbers, to the last bit).
    With an `executor` (and a cache), the batches not cached yet are scored there first.
    """
    dataset, size = ctx.dataset, ctx.config.batch_size
    total = len(dataset.samples)
    starts = range(0, total, size)
    elsewhere = set()
    if executor is not None and cache is not None:
        missing = [start for start in starts if not cache.has(scores_name(start))]
        units = [Unit("scores", tuple(range(start, min(total, start + size)))) for start in missing]
        ctx.images_scored += executor.fill(units, cache, lambda n: tick("scoring", n, total))
        elsewhere = set(missing)
    columns = []
    embeddings = EmbeddingFile(cache.folder if cache else None, total)
    for start in starts:
        cached = cache.load_scores(start) if cache else None
        if cached is not None:
            part, skipped = cached
            dataset.skipped.extend(skipped)
        else:
            part, skipped = score_batch(ctx, start)
            if cache:
                cache.save_scores(start, part, skipped)
        embeddings.append(part.embeddings)
        columns.append((part.indices, part.topk, part.probs))
        if start not in elsewhere or cached is None:
            tick("scoring", min(size, total - start), total)
    if not columns:
        return ctx.scorer.score_batches([])
    indices, topk, probs = (np.concatenate(column) for column in zip(*columns, strict=True))
    return Scores(indices, embeddings.rows(), topk, probs)


class EmbeddingFile:
    """Stage 0's embeddings, float32 (n, D), written batch by batch into a memory-mapped `.npy`.

    The later stages read the embeddings of one predicted class at a time (the oracle's
    sample), so all of them need not sit in memory: at a million images and D = 512 they would
    be 2 GB. The file lives in the scan cache (`embeddings.npy`, rewritten by each scan; it is
    not a unit of resumable work) or, without a cache, in a temporary file unlinked at once
    (the mapping keeps it until the scan drops it).
    """

    NAME = "embeddings.npy"

    def __init__(self, folder: Path | None, capacity: int) -> None:
        self.folder, self.capacity, self.count = folder, capacity, 0
        self.array: np.ndarray | None = None

    def append(self, rows: np.ndarray) -> None:
        """`rows`: float32 (n, D); a batch whose images were all skipped may be empty of any shape."""
        if len(rows) == 0:
            return
        if self.array is None:
            self.array = self._open(rows.shape[1])
        self.array[self.count : self.count + len(rows)] = rows
        self.count += len(rows)

    def rows(self) -> np.ndarray:
        """The embeddings appended so far, in order (a read-only view of the file)."""
        if self.array is None:
            return np.zeros((0, 0), np.float32)
        if isinstance(self.array, np.memmap):
            self.array.flush()
        return self.array[: self.count]

    def _open(self, dim: int) -> np.ndarray:
        shape = (self.capacity, dim)
        if self.folder is not None:
            return np.lib.format.open_memmap(
                self.folder / self.NAME, mode="w+", dtype=np.float32, shape=shape
            )
        with tempfile.NamedTemporaryFile(prefix="clip-audit-embeddings-", suffix=".npy") as handle:
            return np.lib.format.open_memmap(handle.name, mode="w+", dtype=np.float32, shape=shape)


def score_batch(ctx: ScanContext, start: int) -> tuple[Scores, list[Skipped]]:
    """Stage 0 on the batch of data indices [start, start + batch_size): its scores and the
    files in it that could not be used."""
    dataset, size = ctx.dataset, ctx.config.batch_size
    known = len(dataset.skipped)
    indices = list(range(start, min(len(dataset.samples), start + size)))
    part = ctx.scorer.score_batches(iter_batches(dataset, ctx.loaded.preprocess, size, indices=indices))
    ctx.images_scored += len(part.indices)
    return part, dataset.skipped[known:]


class ByIndex(Mapping[int, np.ndarray]):
    """{data index: rows[i]} over stage 0's `indices` (int (n,), any order) and `rows` (n, ...),
    without a dict of N entries."""

    def __init__(self, indices: np.ndarray, rows: np.ndarray) -> None:
        self._indices, self._rows = indices, rows
        self._order = np.argsort(indices, kind="stable")
        self._sorted = indices[self._order]

    def row(self, index: int) -> int | None:
        """The position of data `index` in `indices`, or None if it was not scored."""
        at = int(np.searchsorted(self._sorted, index))
        return int(self._order[at]) if at < len(self._sorted) and self._sorted[at] == index else None

    def __getitem__(self, index: int) -> np.ndarray:
        return self._rows[self._position(index)]

    def _position(self, index: int) -> int:
        """`row(index)`, or KeyError for an index that was not scored."""
        row = self.row(index)
        if row is None:
            raise KeyError(index)
        return row

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int | np.integer) and self.row(int(index)) is not None

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class Probabilities(ByIndex):
    """{data index: probability vector, float32 (C,)}, built from stage 0's top-k on access.

    Only the top-k are known; the other classes share what remains equally. Nothing of size
    N x C is ever held: at a million images and 1,000 classes the full table would be 4 GB,
    while the later stages read the vectors of the few images the oracle checks.
    """

    def __init__(self, scores: Scores, n_classes: int) -> None:
        super().__init__(scores.indices, scores.probs)
        self._topk, self._n_classes = scores.topk, n_classes

    def __getitem__(self, index: int) -> np.ndarray:
        row = self._position(index)
        probs, top = self._rows[row], self._topk[row]
        rest = max(0.0, 1.0 - float(probs.sum())) / max(1, self._n_classes - len(top))
        vector = np.full(self._n_classes, rest, np.float32)
        vector[top] = probs
        return vector


def predictions(probs: Mapping[int, np.ndarray]) -> dict[int, int]:
    """{data index: the model's top-1 class}."""
    return {index: int(vector.argmax()) for index, vector in probs.items()}


def choose_sample(
    ctx: ScanContext, preds: dict[int, int], embeddings: Mapping[int, np.ndarray] | None = None
) -> list[int]:
    """Stage 1's first oracle pass: up to `per_class` images per predicted class.

    Each class's share is drawn in turn from its strata (`strata`): the images whose folder label
    disagrees with the prediction, and the clusters of the others' `embeddings` ({data index:
    float32 (D,)}).
    """
    rng = np.random.default_rng(ctx.config.seed)
    by_class: dict[int, list[int]] = {}
    for index, pred in preds.items():
        by_class.setdefault(pred, []).append(index)
    sample: list[int] = []
    for pred, members in sorted(by_class.items()):
        labels = [ctx.dataset.label_index(ctx.dataset.samples[i]) for i in members]
        mislabelled = [i for i, label in zip(members, labels, strict=True) if label not in (None, pred)]
        rest = [i for i, label in zip(members, labels, strict=True) if label in (None, pred)]
        vectors = np.stack([embeddings[i] for i in rest]) if embeddings and rest else None
        sample += round_robin([mislabelled, *strata(rest, vectors, rng)], ctx.config.per_class)
    return sorted(sample)


def strata(members: list[int], vectors: np.ndarray | None, rng: np.random.Generator) -> list[list[int]]:
    """`members` split by SAMPLE_STRATA k-means clusters of their `vectors` (float (n, D)), each
    cluster in random order. Without usable vectors, or with few members: one shuffled stratum.

    Why: the images a backdoor's trigger turns into a class form a tight sub-population of it in
    the model's embedding space (the observation behind Activation Clustering, Chen et al.
    2018). Drawn uniformly, a 1 % share of triggered images gives a 32-image sample about three
    of them; drawn in turn from the strata, a sub-population that forms its own cluster gets an
    equal turn with the other strata, whatever its size.
    """
    shuffled = [int(i) for i in rng.permutation(members)] if members else []
    if vectors is None or len(members) < 4 * SAMPLE_STRATA or not np.isfinite(vectors).all():
        return [shuffled]
    import warnings

    from scipy.cluster.vq import kmeans2

    with warnings.catch_warnings():  # an empty cluster is harmless here: its stratum is empty
        warnings.simplefilter("ignore")
        _, assignment = kmeans2(vectors.astype(np.float64), SAMPLE_STRATA, seed=rng, minit="++")
    cluster_of = dict(zip(members, assignment.tolist(), strict=True))
    return [[i for i in shuffled if cluster_of[i] == k] for k in range(SAMPLE_STRATA)]


def round_robin(groups: Sequence[Sequence[T]], take: int) -> list[T]:
    """Up to `take` items, one from each non-empty group in turn (groups keep their order)."""
    queues = [list(g) for g in groups if g]
    chosen: list[T] = []
    while queues and len(chosen) < take:
        for queue in queues:
            if queue and len(chosen) < take:
                chosen.append(queue.pop(0))
        queues = [q for q in queues if q]
    return chosen
