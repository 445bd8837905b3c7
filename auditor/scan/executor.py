"""Where the bulk of a scan runs: stage 0's batches and Algorithm 1's chunks, as units of work.

A scan's expensive work comes in fixed units, the same ones its cache keeps (`auditor.scan.cache`):
one stage 0 batch of data indices, or one chunk of images that Algorithm 1 checks together. By
default the scan computes them in its own process. An `Executor` computes a list of them
elsewhere (`auditor.scan.ray_executor`: actors of a Ray cluster) and stores each result in the
scan cache as it arrives; the scan then reads them back exactly as it reads a resumed scan's
cache. A unit's result depends only on the unit and the model, data and settings, never on
where or in which order it ran: that is what keeps the report the same whatever the executor.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from auditor.scan.cache import ScanCache


@dataclass(frozen=True)
class Unit:
    """One unit of a scan's bulk work.

    `kind`: "scores" (stage 0 on the batch `indices`, consecutive data indices) or "checks"
    (Algorithm 1 on the chunk `indices`, with their stage 0 probabilities `probs`, float32
    (n, C), and the scan's calibrated object `confidence`).
    """

    kind: str
    indices: tuple[int, ...]
    probs: np.ndarray | None = None
    confidence: float = 0.0

    @property
    def name(self) -> str:
        """The scan cache's file for this unit's result."""
        from auditor.scan.cache import checks_name, scores_name

        return scores_name(self.indices[0]) if self.kind == "scores" else checks_name(self.indices)

    def to_bytes(self) -> bytes:
        """The unit as a numpy archive (how it travels to a worker: data, never code)."""
        from auditor.scan.cache import archive_bytes

        probs = self.probs if self.probs is not None else np.zeros((0, 0), np.float32)
        return archive_bytes(
            kind=np.array(self.kind),
            indices=np.asarray(self.indices, np.int64),
            probs=probs,
            confidence=np.array(self.confidence, np.float64),
        )

    @classmethod
    def from_bytes(cls, content: bytes) -> Unit:
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            probs = archive["probs"]
            return cls(
                str(archive["kind"]),
                tuple(int(i) for i in archive["indices"]),
                probs if probs.size else None,
                float(archive["confidence"]),
            )


class Executor(Protocol):
    def fill(self, units: Sequence[Unit], cache: ScanCache, advance: Callable[[int], None]) -> int:
        """Compute `units` and put each result into `cache` as it arrives (`ScanCache.put`),
        calling `advance(images in the unit)` for each. Returns the image scorings spent."""
        ...
