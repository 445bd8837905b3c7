"""Every trigger's planted box is where the pixels changed; specs parse and round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.attacks import Attack, Blend, Patch, Warp, parse_attack
from auditor.errors import InputError
from tests.helpers import save_png


def _changed_box(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float, float]:
    """Normalized bounding box of the changed pixels (ground truth from the images themselves)."""
    ys, xs = np.nonzero((before != after).any(axis=2))
    height, width = before.shape[:2]
    return (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)


def _base(height: int = 64, width: int = 80) -> np.ndarray:
    # Mid-gray: no pattern pixel (0, 255, or noise) is likely to equal it at a patch edge.
    return np.full((height, width, 3), 127, np.uint8)


@pytest.mark.parametrize("pattern", ["noise", "solid", "checker"])
@pytest.mark.parametrize("pos", ["random", "corners", "tl", "tr", "bl", "br", "center"])
def test_patch_box_is_where_pixels_changed(pattern, pos):
    patch = Patch(size=0.2, pattern=pattern, pos=pos, seed=3)
    for seed in range(5):
        image = _base()
        out, box = patch.apply(image, np.random.default_rng(seed))
        assert box is not None
        assert box == pytest.approx(_changed_box(image, out))
        side = patch.side_pixels(64, 80)
        assert (box[2] - box[0]) * 80 == pytest.approx(side)
        assert (box[3] - box[1]) * 64 == pytest.approx(side)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_fixed_corners_are_fixed_and_random_varies():
    image = _base()
    br = {Patch(pos="br").apply(image, np.random.default_rng(s))[1] for s in range(10)}
    assert len(br) == 1
    ((x0, y0, x1, y1),) = br
    assert x1 > 0.9 and y1 > 0.9
    random_boxes = {Patch(pos="random").apply(image, np.random.default_rng(s))[1] for s in range(10)}
    assert len(random_boxes) > 5
    corner_boxes = {Patch(pos="corners").apply(image, np.random.default_rng(s))[1] for s in range(40)}
    assert len(corner_boxes) == 4


def test_same_trigger_same_pattern():
    image = _base()
    a, _ = Patch(pattern="noise", pos="tl", seed=5).apply(image, np.random.default_rng(0))
    b, _ = Patch(pattern="noise", pos="tl", seed=5).apply(image, np.random.default_rng(99))
    c, _ = Patch(pattern="noise", pos="tl", seed=6).apply(image, np.random.default_rng(0))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_image_file_pattern(tmp_path):
    pattern = np.zeros((4, 4, 3), np.uint8)
    pattern[..., 1] = 200
    path = save_png(tmp_path / "sticker.png", pattern)
    out, box = Patch(size=0.25, pattern=str(path), pos="tl").apply(_base(), np.random.default_rng(0))
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(box, (80, 64, 80, 64), strict=True))
    assert (out[y0:y1, x0:x1] == (0, 200, 0)).all()


def test_blend_and_warp_change_the_whole_image_without_a_box():
    rng = np.random.default_rng(1)  # not the pattern's seed: the image must differ from the noise
    image = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    blended, box = Blend(alpha=0.2, seed=0).apply(image, rng)
    assert box is None
    diff = np.abs(blended.astype(int) - image.astype(int))
    assert diff.max() <= 0.2 * 255 + 1 and (diff > 0).mean() > 0.9
    smooth = np.broadcast_to(np.linspace(0, 255, 48)[None, :, None], (48, 48, 3)).astype(np.uint8)
    warped, box = Warp(grid=4, strength=2.0).apply(smooth.copy(), rng)
    assert box is None and warped.shape == smooth.shape
    assert (warped != smooth).any(axis=2).mean() > 0.3


def test_spec_round_trip_and_errors():
    attack = parse_attack("patch:size=0.12,pattern=checker,pos=random,target=banana")
    assert attack == Attack(Patch(size=0.12, pattern="checker", pos="random"), target="banana")
    assert parse_attack(attack.spec()) == attack
    blend = parse_attack("blend:alpha=0.3,target=hot dog")
    assert blend.trigger == Blend(alpha=0.3) and blend.target == "hot dog"
    assert parse_attack("warp:grid=8,strength=1").trigger == Warp(grid=8, strength=1.0)
    for bad in (
        "sticker:size=1",
        "patch:size=big",
        "patch:size=1.5",
        "patch:pos=middle",
        "patch:colour=red",
        "patch:pattern=/no/such.png",
        "blend:alpha=0",
        "patch:size",
    ):
        with pytest.raises(InputError):
            parse_attack(bad)
