"""Coarse-to-fine ablation (`AblationSearch`): the planted trigger cell is found with fewer scorings.

The scenes are grids of small cells; one cell holds a planted trigger colour, and the stand-in
model predicts the target while at least half of the trigger's pixels are still in the image.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from auditor.oracle import Segment
from auditor.scan.check import AblationSearch, search_candidates, spatial_groups

TRIGGER = np.array([255, 0, 255], np.uint8)
SIDE = 64


def grid_scene(cells_per_side: int, trigger_cell: int, seed: int) -> tuple[np.ndarray, list[Segment]]:
    """A (SIDE, SIDE, 3) image of flat random cells, one of them the trigger colour, and the cells."""
    rng = np.random.default_rng(seed)
    step = SIDE // cells_per_side
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    segments = []
    for cell in range(cells_per_side**2):
        row, col = divmod(cell, cells_per_side)
        mask = np.zeros((SIDE, SIDE), bool)
        mask[row * step : (row + 1) * step, col * step : (col + 1) * step] = True
        image[mask] = TRIGGER if cell == trigger_cell else rng.integers(0, 200, 3)
        segments.append(Segment.from_mask(mask))
    return image, segments


def trigger_model(planted: int) -> tuple[np.ndarray, object]:
    """Probabilities of the whole image (target 1) and a score function that counts its calls."""
    calls: list[int] = []

    def score(images: list[np.ndarray]) -> np.ndarray:
        calls.append(len(images))
        still = np.array([(im == TRIGGER).all(axis=-1).sum() >= planted / 2 for im in images])
        return np.where(still[:, None], [0.1, 0.9], [0.8, 0.2]).astype(np.float32)

    score.calls = calls  # type: ignore[attr-defined]
    return np.array([0.1, 0.9], np.float32), score


@given(st.sampled_from([4, 8]), st.data())
def test_search_finds_the_planted_cell_with_fewer_scorings(cells_per_side, data):
    trigger_cell = data.draw(st.integers(0, cells_per_side**2 - 1))
    image, segments = grid_scene(cells_per_side, trigger_cell, data.draw(st.integers(0, 99)))
    probs, score = trigger_model(int(segments[trigger_cell].mask.sum()))
    (found,) = search_candidates([AblationSearch(image, segments, probs)], score)  # type: ignore[arg-type]
    candidate, drop, label = found
    assert candidate is segments[trigger_cell]
    assert label == 0 and drop > 0.5
    scored = sum(score.calls)  # type: ignore[attr-defined]
    assert scored < len(segments)


def test_a_clean_image_costs_one_scoring_per_group():
    image, segments = grid_scene(8, trigger_cell=-1, seed=3)
    probs = np.array([0.7, 0.3], np.float32)
    calls: list[int] = []

    def score(images: list[np.ndarray]) -> np.ndarray:
        calls.append(len(images))
        return np.tile(probs, (len(images), 1))

    (found,) = search_candidates([AblationSearch(image, segments, probs)], score)
    assert found == (None, 0.0, None)
    assert sum(calls) == len(spatial_groups(segments)) < len(segments)


def test_groups_partition_the_segments_and_respect_their_caps():
    _, segments = grid_scene(8, trigger_cell=0, seed=1)
    groups = spatial_groups(segments)
    assert sorted(p for g in groups for p in g) == list(range(len(segments)))
    assert all(sum(segments[p].area for p in g) <= 0.15 + 1e-9 and len(g) <= 8 for g in groups)


@given(st.integers(0, 6), st.integers(1, 4), st.data())
def test_search_is_total_with_any_scores(n_segments, n_classes, data):
    """Any scores (NaN, inf, anything): it ends, and a candidate is one of the image's segments."""
    image, segments = grid_scene(4, trigger_cell=0, seed=0)
    segments = segments[:n_segments]
    probs = data.draw(arrays(np.float32, (n_classes,)))

    def score(images: list[np.ndarray]) -> np.ndarray:
        return data.draw(arrays(np.float32, (len(images), n_classes)))

    (found,) = search_candidates([AblationSearch(image, segments, probs)], score)
    assert found[0] is None or any(found[0] is s for s in segments)
