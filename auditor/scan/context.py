"""What the scan's stages share: settings, data, the scorer, decoded images, costs and failures.

Every stage takes a `ScanContext`. Scoring goes through `ScanContext.score` (bulk work, in the
engine's precision) or `ScanContext.score_exact` (the steps that decide the report, in fp32),
which count the images they score (`cost.images_scored`); `ScanContext.fail` records work that could not be
finished, so that one bad image or one failed target never ends the scan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from auditor.data import Dataset, pil_to_array
from auditor.errors import EnvironmentProblem
from auditor.models import LoadedModel
from auditor.oracle import Oracle
from auditor.report import FailureInfo
from auditor.scoring import ZeroShotScorer
from engines.errors import EngineError

ScoreFn = Callable[[list[np.ndarray]], np.ndarray]
"""uint8 RGB images (any size) -> float32 class probabilities of shape (n, C)."""

Progress = Callable[[str, int, int | None], None]
"""progress(stage description, images done in this call, stage total or None)."""

FATAL = (EnvironmentProblem, EngineError, MemoryError)
"""Errors that would fail every image alike: they stop the scan instead of being recorded."""

T = TypeVar("T")

# An object crop names a label only when CLIP (or the reference) is this sure about it; the
# scan lowers it for a model that is rarely this sure of whole images
# (`auditor.scan.check.object_confidence`).
OBJECT_CONFIDENCE = 0.5


@dataclass(frozen=True)
class ScanConfig:
    per_class: int = 32
    transplant_threshold: float = 0.5
    min_candidates: int = 3
    seed: int = 0
    batch_size: int = 64
    compact_fraction: float = 0.08  # the compact set's cap, as a share of the data
    # The share of the data's images Algorithm 1 checks at most: a cost bound (the detection
    # matrix's, issue 13), not a fitted threshold. The sample and the follow-up are checked
    # whatever it says; the suspects' pass gets what is left (`auditor.scan.suspects.suspects_pass`).
    oracle_budget: float = 0.4


def top1(probs: np.ndarray) -> np.ndarray:
    """int64 (n,) argmax of each row of float (n, C); -1 for a row with a non-finite value."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        return np.full(len(probs), -1, np.int64)
    finite = np.isfinite(probs).all(axis=1)
    return np.where(finite, np.nan_to_num(probs).argmax(axis=1), -1).astype(np.int64)


class ScanContext:
    """The data, the audited model's scorer, the oracle, decoded-image access, costs and failures."""

    def __init__(
        self,
        loaded: LoadedModel,
        dataset: Dataset,
        scorer: ZeroShotScorer,
        oracle: Oracle,
        config: ScanConfig,
    ) -> None:
        self.loaded, self.dataset, self.scorer, self.oracle, self.config = (
            loaded,
            dataset,
            scorer,
            oracle,
            config,
        )
        self.images_scored = 0
        self.oracle_scored = 0  # the part of images_scored spent in Algorithm 1
        self.label_objects: ScoreFn | None = None  # a trusted reference model's scorer, if given
        self.predictions: dict[int, int] = {}  # data index -> top-1 class, set by stage 0
        self.object_confidence = OBJECT_CONFIDENCE  # calibrated after stage 0
        self.failures: list[FailureInfo] = []
        self.exact_scorer: ZeroShotScorer | None = None  # fp32, when `scorer` is int8 / fp16

    def image(self, index: int) -> np.ndarray:
        """Data image `index` as uint8 RGB (H, W, 3)."""
        return pil_to_array(self.dataset.load(self.dataset.samples[index]))

    def path(self, index: int) -> str:
        return self.dataset.samples[index].path

    def score(self, images: list[np.ndarray]) -> np.ndarray:
        """float32 (n, C) zero-shot probabilities of the audited model."""
        return self._score_with(self.scorer, images)

    def score_exact(self, images: list[np.ndarray]) -> np.ndarray:
        """float32 (n, C) probabilities in fp32, for the steps that decide the report.

        The same as `score` unless bulk scoring runs in reduced precision (`exact_scorer`).
        """
        return self._score_with(self.exact_scorer or self.scorer, images)

    def _score_with(self, scorer: ZeroShotScorer, images: list[np.ndarray]) -> np.ndarray:
        self.images_scored += len(images)
        return scorer.probabilities(images, self.loaded.preprocess, self.config.batch_size * 2)

    def attempt(self, stage: str, work: Callable[[], T], index: int | None = None) -> T | None:
        """`work()`, or None with the error recorded as a failure of `stage` (FATAL errors propagate)."""
        try:
            return work()
        except FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - one image's or one step's failure must not end the scan
            self.fail(stage, exc, index)
            return None

    def fail(self, stage: str, exc: Exception, index: int | None = None) -> FailureInfo:
        """Record that `stage` could not finish (for image `index`, or for a step over many)."""
        message = (str(exc).splitlines() or [""])[0][:300]
        failure = FailureInfo(None if index is None else self.path(index), stage, type(exc).__name__, message)
        self.failures.append(failure)
        return failure
