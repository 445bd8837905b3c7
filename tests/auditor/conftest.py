"""Fixtures shared by the tests that scan detection-matrix models with committed weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MATRIX_WEIGHTS = Path(__file__).parent.parent / "data" / "matrix"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A matrix cache holding only the committed weights (the benchmark writes arch files there)."""
    cache = tmp_path_factory.mktemp("matrix-cache")
    for weights in MATRIX_WEIGHTS.glob("*.safetensors"):
        shutil.copy(weights, cache / weights.name)
    return cache
