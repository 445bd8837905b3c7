"""Polishing a recovered stamp (`search.polish`), and following it through a repair
(`inversion.follow`): a tiny CNN trained here with a planted corner patch; the search's smallest
stamp for the planted target, its pattern wiped, trained further at no larger area must work on
held-out images again, while the same start polished on the clean twin (same data, no patch)
does not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from auditor.inversion.follow import FollowedStamp, StampFollower
from auditor.inversion.search import SearchConfig, polish, search_triggers, stamp
from tests.auditor.test_warp_family import SIZE, TARGET, TinyModel, fit, scenes, to_pixels

torch = pytest.importorskip("torch")

PATCH = 5  # pixels: the planted patch, in the bottom-right corner (2.4 % of a 32-px image)


def planted_patch(rng: np.random.Generator) -> np.ndarray:
    """uint8 (PATCH, PATCH, 3): a fixed random colour-noise patch."""
    return rng.integers(0, 256, (PATCH, PATCH, 3)).astype(np.uint8)


def train_patched(poison: float = 0.1, seed: int = 0) -> TinyModel:
    """The warp test's CNN on the same scenes, `poison` of them with the patch and labelled TARGET."""
    rng = np.random.default_rng(seed)
    images, labels = scenes(2400, rng)
    patch = planted_patch(np.random.default_rng(124))
    for i in np.flatnonzero(rng.random(len(images)) < poison):
        images[i, -PATCH:, -PATCH:] = patch
        labels[i] = TARGET
    return fit(images, labels, 1000, seed, rng)


def success(model: TinyModel, pixels: torch.Tensor, mask: np.ndarray, pattern: np.ndarray) -> float:
    """Share of `pixels` not already predicted TARGET that the stamp turns into TARGET."""
    keep = model.predict(pixels) != TARGET
    stamped = stamp(
        pixels[torch.from_numpy(keep)], torch.from_numpy(mask)[None, None], torch.from_numpy(pattern)[None]
    )
    return float(np.mean(model.predict(stamped) == TARGET))


@pytest.fixture(scope="module")
def patched() -> TinyModel:
    model = train_patched()
    images, _ = scenes(200, np.random.default_rng(5))
    stamped = images.copy()
    stamped[:, -PATCH:, -PATCH:] = planted_patch(np.random.default_rng(124))
    attack = np.mean(model.predict(to_pixels(stamped)) == TARGET)
    assert attack > 0.9, attack  # the planted backdoor took: otherwise nothing below means anything
    return model


@pytest.fixture(scope="module")
def clean() -> TinyModel:
    return train_patched(poison=0.0)


def test_polishing_makes_the_backdoor_stamp_work_at_no_larger_area_and_not_the_clean_twins(patched, clean):
    """The search's smallest stamp for the planted target, its pattern wiped to grey: polishing
    it on the poisoned model makes it work on held-out images again, at no larger area; the
    same start polished on the clean twin does not work."""
    images, _ = scenes(240, np.random.default_rng(99))  # clean images the models never saw
    pixels = to_pixels(images)
    search, holdout = pixels[:180], pixels[180:]
    predicted = patched.predict(search)
    (found,), _ = search_triggers(patched, search, predicted, [TARGET], SearchConfig(steps=80, batch=6))  # type: ignore[arg-type]
    assert found.reached and found.area < PATCH**2 / SIZE**2
    start = replace(found, pattern=np.full_like(found.pattern, 0.5))
    polished = polish(patched, search, predicted, start, steps=60, batch=24)  # type: ignore[arg-type]
    assert polished.area <= found.area * 1.001
    before = success(patched, holdout, start.mask, start.pattern)
    after = success(patched, holdout, polished.mask, polished.pattern)
    assert before < 0.5 and after >= 0.9, (before, after)
    natural = polish(clean, search, clean.predict(search), start, steps=60, batch=24)  # type: ignore[arg-type]
    assert success(clean, holdout, natural.mask, natural.pattern) < 0.5


def test_polishing_leaves_a_stamp_alone_when_nothing_is_left_to_flip(patched):
    images, _ = scenes(40, np.random.default_rng(7))
    pixels = to_pixels(images)
    everything_target = np.full(len(pixels), TARGET)
    (found,), _ = search_triggers(patched, pixels, patched.predict(pixels), [TARGET], SearchConfig(steps=5))  # type: ignore[arg-type]
    assert polish(patched, pixels, everything_target, found, steps=10, batch=8) is found  # type: ignore[arg-type]


def test_a_followed_stamp_finds_the_planted_backdoor_again_and_lets_a_clean_model_go(patched, clean):
    """A repair that has unlearned its stamp (here: the pattern wiped, so it no longer works) is
    not done while the planted patch still works: the follower, polishing the stamp again on the
    model, finds a stamp over the bar. On a model without the backdoor (the clean twin) it finds
    none. The bar is the scan's: what the same start reaches on a clean reference (another
    twin), over the confirmation's ratio of 0.5. The module's training flags survive."""
    images, _ = scenes(240, np.random.default_rng(99))
    pixels = to_pixels(images)
    search, holdout = pixels[:180], pixels[180:]
    (found,), _ = search_triggers(
        patched, search, patched.predict(search), [TARGET], SearchConfig(steps=80, batch=6)
    )  # type: ignore[arg-type]
    unlearned = replace(found, pattern=np.full_like(found.pattern, 0.5))
    assert success(patched, holdout, unlearned.mask, unlearned.pattern) < 0.5
    reference = train_patched(poison=0.0, seed=1)
    theirs = polish(reference, search, reference.predict(search), unlearned, steps=60, batch=24)  # type: ignore[arg-type]
    bar = success(reference, holdout, theirs.mask, theirs.pattern) / 0.5
    for model, backdoored in ((patched, True), (clean, False)):
        net = model.net.train()
        frozen = next(net.parameters()).requires_grad_(False)
        follower = StampFollower(
            net, lambda net=net: TinyModel(net), search, {TARGET: FollowedStamp(unlearned, bar)}
        )  # type: ignore[arg-type,misc]
        follower.refresh()
        assert (
            net.training
            and not frozen.requires_grad
            and all(p.requires_grad for p in list(net.parameters())[1:])
        )
        net.eval()
        followed = follower.stamps[TARGET].trigger
        assert followed is not None and followed.area <= unlearned.area * 1.001
        rate = success(model, holdout, followed.mask, followed.pattern)
        over = follower.over_bar({TARGET: rate})
        assert bool(over) == backdoored, (backdoored, rate, bar)
        frozen.requires_grad_(True)
