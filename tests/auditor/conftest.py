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


@pytest.fixture(scope="module")
def patch_random_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The patch-random zoo model's scan folder (240 images, planted trigger) and its ground truth."""
    from auditor.zoo.build import write_scan_data

    root = tmp_path_factory.mktemp("patch-random")
    truth = write_scan_data("patch-random", root / "data", per_class=20)
    return root / "data", truth
