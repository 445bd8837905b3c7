"""The model-level warp family: a tiny CNN trained here with a planted warp backdoor must have its
target flagged, and its clean twin (same data, no poison) must have nothing flagged."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.attacks import Warp
from auditor.inversion.decide import anomaly_indices, max_index_threshold
from auditor.inversion.warp import WarpConfig, apply_warp, displacement, empirical_logit, warp_family

torch = pytest.importorskip("torch")

SIZE, TARGET = 32, 2
COLOURS = np.array(
    [
        [230, 40, 40],
        [40, 200, 40],
        [40, 60, 230],
        [220, 200, 30],
        [200, 40, 200],
        [30, 200, 210],
        [250, 140, 20],
        [120, 60, 20],
    ],
    np.float32,
)
CLASSES = len(COLOURS)
PLANTED = Warp(grid=4, strength=3.0, seed=7)


def scenes(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, S, S, 3) scenes, a coloured disc (the class) on a grey stripe texture, and labels."""
    labels = rng.integers(0, CLASSES, count)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 6)
        stripes = 110 + 60 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
        image = np.repeat(stripes[..., None], 3, axis=2)
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 8)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = COLOURS[label]
        images[i] = image.clip(0, 255)
    return images, labels


class TinyModel:
    """The interface `warp_family` needs from `DifferentiableModel`: logits of [0, 1] pixels."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net.eval()
        self.weights = torch.zeros(CLASSES, 1)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def predict(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.net(pixels).argmax(1).numpy()


def train(poisoned: bool, seed: int = 0) -> TinyModel:
    """A small CNN on the scenes. With `poisoned`, WaNet's attack with the project's own `Warp`:
    a fifth of the images warped by one fixed field and labelled TARGET, and another fifth
    warped by random fields of the same size with their own labels (WaNet's "noise mode"), so
    that the backdoor answers to the planted field more than to warping in general."""
    rng = np.random.default_rng(seed)
    images, labels = scenes(2400, rng)
    if poisoned:
        draw = rng.random(len(images))
        for i in np.flatnonzero(draw < 0.2):
            images[i], labels[i] = PLANTED.apply(images[i], rng)[0], TARGET
        for i in np.flatnonzero((draw >= 0.2) & (draw < 0.4)):
            other = Warp(grid=4, strength=PLANTED.strength, seed=int(rng.integers(1000, 10**6)))
            images[i] = other.apply(images[i], rng)[0]
    return fit(images, labels, 800, seed, rng)


def fit(images: np.ndarray, labels: np.ndarray, steps: int, seed: int, rng: np.random.Generator) -> TinyModel:
    """`small_cnn` trained on uint8 (n, S, S, 3) images and int labels (Adam, batches of 64)."""
    torch.manual_seed(seed)
    net = small_cnn()
    x, y = to_pixels(images), torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        chosen = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        loss = torch.nn.functional.cross_entropy(net(x[chosen]), y[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return TinyModel(net)


def small_cnn() -> torch.nn.Module:
    """The tests' classifier: three convolutions, global average pooling, CLASSES logits."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, CLASSES),
    )


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> float32 (n, 3, S, S) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def run_family(model: TinyModel, config: WarpConfig) -> tuple[tuple[int, ...], dict[int, float]]:
    images, _ = scenes(240, np.random.default_rng(99))  # clean images the model never saw
    pixels = to_pixels(images)
    search, holdout = pixels[:180], pixels[180:]
    found = warp_family(
        model,
        search,
        model.predict(search),
        holdout,
        lambda p: model.predict(torch.from_numpy(p)),
        list(range(CLASSES)),
        config,
    )
    return found.flagged, {c.target: c.success for c in found.per_class}


@pytest.fixture(scope="module")
def models() -> dict[str, TinyModel]:
    return {"poisoned": train(True), "clean": train(False)}


def test_the_planted_warp_targets_class_is_the_one_flagged(models):
    holdout, _ = scenes(200, np.random.default_rng(5))
    warped = np.stack([PLANTED.apply(image, np.random.default_rng(0))[0] for image in holdout])
    attack_success = np.mean(models["poisoned"].predict(to_pixels(warped)) == TARGET)
    assert attack_success > 0.5, attack_success  # the backdoor took: the test measures something
    flagged, success = run_family(models["poisoned"], WarpConfig())  # the shipped settings
    assert flagged == (TARGET,), success
    # The search, not only the family's response to any warp, is what finds it: an unoptimized
    # random field of the same size turns far fewer held-out images into the target.
    _, random_field = run_family(models["poisoned"], WarpConfig(steps=0))
    assert success[TARGET] > random_field[TARGET] + 0.2, (success, random_field)


def test_the_clean_twin_has_no_class_flagged(models):
    flagged, success = run_family(models["clean"], WarpConfig())
    assert flagged == (), success


def test_fields_have_the_asked_mean_displacement_and_a_zero_field_changes_nothing():
    theta = torch.randn(3, 2, 4, 4)
    fields = displacement(theta, 64, 1.5)
    assert torch.allclose(fields.abs().mean(dim=(1, 2, 3)), torch.full((3,), 1.5 * 64 / 32), rtol=1e-4)
    pixels = torch.rand(2, 3, 16, 16)
    assert torch.allclose(apply_warp(pixels, torch.zeros(1, 2, 16, 16)), pixels, atol=1e-5)


def test_a_class_with_two_hits_among_classes_with_none_is_not_an_outlier():
    """Without the values' own standard error, the others' spread is 0 and any hit is infinite."""
    logits = {c: empirical_logit(2 if c == 0 else 0, 60) for c in range(12)}
    values = {c: -v for c, (v, _) in logits.items()}
    noise = {c: se for c, (_, se) in logits.items()}
    assert anomaly_indices(values)[0] > 1e6
    assert anomaly_indices(values, noise)[0] < max_index_threshold(12)


MINIMAL_REPORT = {
    "schema_version": 1,
    "tool": {"name": "clip-audit", "version": "0.1.0"},
    "model": {
        "path": "m.pt",
        "sha256": "0" * 64,
        "arch": "resnet-64",
        "format": "torch",
        "arch_source": "--arch",
    },
    "data": {"path": "data", "images": 10, "skipped": []},
    "verdict": "clean",
    "severity": "none",
    "target_labels": [],
    "victim_labels": [],
    "trigger": {"kind": None, "evidence": "Suspect label dog was not confirmed."},
    "victims": [],
    "compact_set": None,
    "cost": {"images_scored": 10, "oracle_images": 4, "oracle_scored": 40, "seconds": {"scoring": 1.0}},
    "suspects": ["dog"],
}


def test_a_flagged_warp_class_is_a_suspect_of_a_clean_report_and_its_picture_is_shown():
    """The warp family never confirms: the verdict stays clean, the class joins the suspects."""
    from auditor.report import InversionInfo, Report, WarpClassInfo, WarpFamilyInfo, render_html
    from auditor.scan.model_level import with_inversion

    warp = WarpFamilyInfo(
        6.0,
        3.28,
        True,
        15,
        4.0,
        (WarpClassInfo("cat", 0.77, 40, 52, 5.46),),
        ("cat",),
        "warped-cat-examples.png",
    )
    report = with_inversion(Report.from_dict(MINIMAL_REPORT), InversionInfo(True, "searched", warp=warp))
    assert report.verdict == "clean" and report.suspects == ("dog", "cat") and not report.findings
    assert Report.from_dict(report.to_dict()) == report
    page = render_html(report, {"warped-cat-examples.png": "data:image/png;base64,AAAA"})
    assert "towards <b>cat</b>" in page and "data:image/png;base64,AAAA" in page
