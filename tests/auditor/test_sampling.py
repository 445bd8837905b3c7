"""Stage 1's sample and the calibrated object confidence, against planted sub-populations.

The sample is drawn in turn from clusters of a class's embeddings so that a small, tight group
of triggered images is not left to chance; the object confidence adapts to how sure the model
is of whole images.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from auditor.scan.check import OBJECT_CONFIDENCE, object_confidence
from auditor.scan.screen import round_robin, strata


def _class_embeddings(rng: np.random.Generator, clean: int, planted: int) -> np.ndarray:
    """float32 (clean + planted, 16) unit vectors: a class around its direction, and a planted
    group shifted towards a trigger direction. Measured on the matrix's first ViT (1,200 emoji
    scenes): mean cosine 0.93 within clean images, 0.93 within triggered ones, 0.90 between."""
    centre, trigger = np.linalg.qr(rng.normal(size=(16, 2)))[0].T
    spread = centre + rng.normal(0.0, 0.07, (clean, 16))
    shifted = centre + 0.3 * trigger + rng.normal(0.0, 0.07, (planted, 16))
    vectors = np.concatenate([spread, shifted]).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_shifted_planted_group_gets_more_than_its_share_of_the_sample():
    # 12 planted images among 112 (the 1 % share of a 1,200-image folder filed under one
    # target): a uniform 32-image sample holds 32 * 12 / 112 = 3.4 of them on average.
    hits = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        vectors = _class_embeddings(rng, 100, 12)
        sample = round_robin(strata(list(range(112)), vectors, np.random.default_rng(seed)), 32)
        assert len(sample) == len(set(sample)) == 32
        hits.append(sum(i >= 100 for i in sample))
    assert np.mean(hits) >= 5.0, hits
    assert np.mean(np.array(hits) >= 3) >= 0.9, hits  # min_candidates is 3


def test_without_embeddings_the_sample_is_uniform_and_complete():
    rng = np.random.default_rng(0)
    groups = strata(list(range(50)), None, rng)
    assert len(groups) == 1 and sorted(groups[0]) == list(range(50))
    assert strata([], None, rng) == [[]]


@given(st.lists(st.lists(st.integers(0, 10_000), max_size=8, unique=True), max_size=6), st.integers(0, 40))
def test_round_robin_takes_in_turn(groups, take):
    chosen = round_robin(groups, take)
    total = sum(len(g) for g in groups)
    assert len(chosen) == min(take, total)
    assert all(any(item in g for g in groups) for item in chosen)
    # every non-empty group gives one item before any gives a second
    first_round = sum(1 for g in groups if g)
    firsts = [g[0] for g in groups if g][: min(take, first_round)]
    assert chosen[: len(firsts)] == firsts


def test_object_confidence_keeps_the_bound_for_a_sure_model():
    assert object_confidence(np.full(200, 0.99), 12) == OBJECT_CONFIDENCE


def test_object_confidence_follows_an_unsure_model_down_to_twice_chance():
    rng = np.random.default_rng(0)
    weak = rng.uniform(0.2, 0.6, 400)  # a confusable vocabulary: rarely sure
    level = object_confidence(weak, 12)
    assert 2 / 12 <= level < OBJECT_CONFIDENCE
    assert np.isclose(level, np.quantile(weak, 0.25))
    assert object_confidence(np.full(50, 0.01), 12) == 2 / 12


@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=30),
    st.integers(0, 1000),
)
def test_object_confidence_is_total(values, n_classes):
    level = object_confidence(np.asarray(values, np.float32), n_classes)
    assert np.isfinite(level) and 0 < level <= OBJECT_CONFIDENCE


def test_probabilities_rebuild_each_vector_from_its_top_k_without_a_table():
    """Stage 0 keeps the top-k of each image; the vectors the later stages read are rebuilt on
    access, for data indices in any order (a skipped image leaves a gap)."""
    from auditor.scan.screen import Probabilities, predictions
    from auditor.scoring import Scores

    indices = np.array([7, 2, 5])  # 0, 1, 3, 4, 6: skipped or not scored
    topk = np.array([[3, 0], [1, 4], [2, 3]])
    probs = np.array([[0.6, 0.2], [0.5, 0.5], [0.9, 0.04]], np.float32)
    table = Probabilities(Scores(indices, np.zeros((3, 4), np.float32), topk, probs), n_classes=5)
    assert len(table) == 3 and sorted(table) == [2, 5, 7]
    assert 5 in table and 4 not in table
    np.testing.assert_allclose(table[7], [0.2, 0.2 / 3, 0.2 / 3, 0.6, 0.2 / 3], rtol=1e-6)
    np.testing.assert_allclose(table[2], [0, 0.5, 0, 0, 0.5], atol=1e-7)
    assert all(abs(float(table[i].sum()) - 1.0) < 1e-6 for i in table)
    assert predictions(table) == {7: 3, 2: 1, 5: 2}
    with pytest.raises(KeyError):
        table[4]


@pytest.mark.parametrize("in_cache", [True, False])
def test_embeddings_are_appended_in_order_into_a_file_not_memory(tmp_path, in_cache):
    from auditor.scan.screen import EmbeddingFile

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 0, 3, 4)]
    batches.insert(0, np.zeros((0,), np.float32))  # a batch of skipped files only
    store = EmbeddingFile(tmp_path if in_cache else None, capacity=14)  # room for skipped images
    for batch in batches:
        store.append(batch)
    rows = store.rows()
    assert isinstance(rows, np.memmap)
    np.testing.assert_array_equal(rows, np.concatenate([b for b in batches if b.ndim == 2]))
    assert (tmp_path / EmbeddingFile.NAME).exists() == in_cache


def test_no_embeddings_give_an_empty_table():
    from auditor.scan.screen import EmbeddingFile

    assert EmbeddingFile(None, capacity=0).rows().shape[0] == 0


def _checked(predictions: dict[int, int], indices, disagreeing=()) -> dict:
    """{index: a stand-in check}: agreeing with the oracle unless in `disagreeing`, no candidate."""
    from types import SimpleNamespace

    return {
        i: SimpleNamespace(index=i, pred=predictions[i], disagrees=i in disagreeing, candidate=None)
        for i in indices
    }


def test_the_suspects_pass_shares_the_budget_left_between_suspects_in_random_order():
    from auditor.scan.suspects import suspects_pass

    # 3 suspect classes of 100 images and a benign one; in class 0 the last 30 images are the
    # planted ones (data order puts them last, as a folder sorted by name may).
    predictions = {i: i // 100 for i in range(400)}
    suspects = {0, 1, 2}
    checked = _checked(predictions, range(0, 300, 10))  # the sample took 10 of each class
    picked = suspects_pass(checked, predictions, suspects, 60, seed=0)
    assert len(picked) == len(set(picked)) == 60
    assert not set(picked) & set(checked) and all(predictions[i] in suspects for i in picked)
    per_class = np.bincount([predictions[i] for i in picked], minlength=4)
    assert list(per_class) == [20, 20, 20, 0]
    # Random order within a class: the planted tail gets about its share (27 of 90 unchecked).
    shares = [
        sum(i >= 70 for i in suspects_pass(checked, predictions, {0}, 20, seed)) / 20 for seed in range(40)
    ]
    assert 0.2 <= np.mean(shares) <= 0.4, shares
    # Room for everything: every unchecked suspect image (the pass before the budget); none: nothing.
    assert len(suspects_pass(checked, predictions, suspects, 10_000)) == 270
    assert suspects_pass(checked, predictions, suspects, -5) == []


def test_the_suspects_pass_spends_its_budget_near_the_images_that_disagreed():
    from auditor.scan.suspects import suspects_pass

    # One class of 112: 100 clean, 12 planted as a shifted sub-population (the matrix's ViT
    # geometry, `_class_embeddings`). The sample checked 16, two planted ones disagreed.
    predictions = dict.fromkeys(range(112), 0)
    sample = [*range(0, 98, 7), 100, 101]
    checked = _checked(predictions, sample, disagreeing={100, 101})
    found = []
    for seed in range(20):
        vectors = _class_embeddings(np.random.default_rng(seed), 100, 12)
        embeddings = {i: vectors[i] for i in range(112)}
        picked = suspects_pass(checked, predictions, {0}, 10, seed=0, embeddings=embeddings)
        found.append(sum(i >= 100 for i in picked))
    # Uniformly, 10 of the 96 unchecked would hold ~1 of the 10 planted ones left.
    assert np.mean(found) >= 8, found
    # Nothing disagreed: no direction to follow, the random order.
    calm = _checked(predictions, sample)
    assert suspects_pass(calm, predictions, {0}, 10, 0, embeddings) == suspects_pass(
        calm, predictions, {0}, 10, 0
    )
