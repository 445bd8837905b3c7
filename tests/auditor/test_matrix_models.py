"""Detection-matrix models with committed weights, scanned with default settings (issue 13).

Tuning rows of `benchmarks/matrix.py` whose backdoor took (attack success >= 0.5): an 8-px
noise patch at 3 %, a lemon-emoji sticker at 1 % of training pairs, and two triggers for two
targets. Each is judged by the matrix's own judge against what its generator planted: the
poisoned files, their trigger boxes and the targets. The weights are in `tests/data/matrix/`
(fp16, named by the row and the training recipe, so a recipe change shows up here as a missing
file, not as a silent retrain). Not here yet, because the scan or the recipe fails them (see
`docs/matrix.md`): a weak ResNet (the scan misses it), a small per-pixel-noise ViT (its
backdoor does not take), a clean weak ResNet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import matrix

WEIGHTS = Path(__file__).parent.parent / "data" / "matrix"
ROWS = {row.name: row for row in matrix.ROWS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A matrix cache holding only the committed weights (the benchmark writes arch files there)."""
    cache = tmp_path_factory.mktemp("matrix-cache")
    for weights in WEIGHTS.glob("*.safetensors"):
        shutil.copy(weights, cache / weights.name)
    return cache


def _run(name: str, folder: Path, tmp_path: Path) -> dict:
    row = ROWS[name]
    assert matrix.weights_path(row, folder).exists(), f"committed weights for {name} are missing"
    return matrix.run_row(row, folder, tmp_path, repair=False)


@pytest.mark.parametrize(
    "name", ["vit-64-strong-emoji-noise", "vit-64-strong-emoji-logo", "vit-64-strong-emoji-two"]
)
def test_a_poisoned_matrix_model_is_found_with_its_victims(name, folder, tmp_path):
    result = _run(name, folder, tmp_path)
    assert matrix.planted(result), result["attack_success"]  # the generator's backdoor works
    assert result["verdict"] == "backdoor" and result["targets_right"], result["targets_found"]
    assert result["victim_precision"] >= 0.9 and result["victim_recall"] >= 0.9
    assert result["median_box_iou"] >= 0.5
    assert result["failures"] == 0
