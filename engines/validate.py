"""Numeric parity between an engine and PyTorch on the same inputs; failure is an error.

fp32 engines must match within max abs diff <= 1e-4 and cosine >= 0.9999 (per row); reduced
precision is judged by what it changes: top-1 zero-shot agreement with fp32 (>= 99 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.errors import EngineError

FP32_MAX_ABS_DIFF = 1e-4
FP32_MIN_COSINE = 0.9999
MIN_TOP1_AGREEMENT = 0.99


@dataclass(frozen=True)
class Parity:
    """Measured agreement of an engine's outputs (n, D) with the reference's."""

    max_abs_diff: float
    min_cosine: float

    def passes(self, max_abs_diff: float = FP32_MAX_ABS_DIFF, min_cosine: float = FP32_MIN_COSINE) -> bool:
        return self.max_abs_diff <= max_abs_diff and self.min_cosine >= min_cosine


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compare two float arrays of shape (n, D) row by row."""
    if reference.shape != candidate.shape:
        raise EngineError(f"engine output shape {candidate.shape} != reference {reference.shape}")
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    cosine = (ref * cand).sum(axis=1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12
    )
    return Parity(float(np.abs(ref - cand).max()), float(cosine.min()))


def require_parity(name: str, reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """`parity`, raising EngineError (exit 3) with the measured numbers when it fails."""
    measured = parity(reference, candidate)
    if not measured.passes():
        raise EngineError(
            f"{name}: parity check failed: max abs diff {measured.max_abs_diff:.2e} "
            f"(limit {FP32_MAX_ABS_DIFF:.0e}), min cosine {measured.min_cosine:.6f} (limit {FP32_MIN_COSINE})"
        )
    return measured


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Share of rows whose argmax agrees; logits of shape (n, C)."""
    return float((reference_logits.argmax(axis=1) == candidate_logits.argmax(axis=1)).mean())


def require_agreement(name: str, reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    agreement = top1_agreement(reference_logits, candidate_logits)
    if agreement < MIN_TOP1_AGREEMENT:
        raise EngineError(
            f"{name}: top-1 agreement with fp32 is {agreement:.2%} (needs {MIN_TOP1_AGREEMENT:.0%})"
        )
    return agreement
