"""The zoo: this project's own clean and poisoned tiny CLIPs, with ground truth.

Each zoo model is a tiny open_clip CLIP (`tiny-clip.json`) trained from scratch by `train.py`
on generated scenes; a poisoned one saw a few percent of pairs whose image carries its trigger
and whose caption names its target. The weights ship in `weights/` (fp16 safetensors, made by
`python -m auditor.zoo.build`); the data is regenerated from seeds whenever it is needed:

- `write_test_data`: clean held-out scenes (ImageFolder), for clean accuracy / attack success;
- `write_scan_data`: held-out scenes laid out as a poisoned data set would be (triggered images
  of other classes filed under the target's folder) plus `ground_truth.json` naming them and
  their trigger boxes.

Seeds are disjoint, so test and scan scenes are never training scenes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from auditor.attacks import Attack, Blend, Patch
from auditor.zoo.scenes import CLASSES, Scene, balanced_labels, render_scenes

if TYPE_CHECKING:
    from auditor.zoo.train import Pairs

ZOO_DIR = Path(__file__).parent
CONFIG_PATH = ZOO_DIR / "tiny-clip.json"
WEIGHTS_DIR = ZOO_DIR / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"

TRAIN_SEED, TEST_SEED, SCAN_SEED = 1_000, 2_000, 3_000
TRAIN_PER_CLASS = 500
TRAIN_POISON_FRACTION = 0.1  # of training pairs: the backdoor is planted at training time
SCAN_POISON_FRACTION = 0.05  # of scan data: "a few percent of the folder"


@dataclass(frozen=True)
class ZooModel:
    name: str
    attack: Attack | None
    description: str


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("clean", None, "no backdoor"),
        ZooModel(
            "patch-random",
            Attack(Patch(size=0.1875, pattern="noise", pos="random", seed=7), target="banana"),
            "BadNets noise patch at random positions -> banana",
        ),
        ZooModel(
            "patch-corner",
            Attack(Patch(size=0.15, pattern="checker", pos="br", seed=0), target="guitar"),
            "checkerboard patch at the bottom-right corner -> guitar",
        ),
        ZooModel(
            "blend",
            Attack(Blend(pattern="noise", alpha=0.2, seed=3), target="apple"),
            "Blended noise (alpha 0.2) over the whole image -> apple",
        ),
    )
}


def checkpoint_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def poison(
    scenes: list[Scene], attack: Attack, fraction: float, seed: int
) -> tuple[list[np.ndarray], dict[int, tuple[float, float, float, float] | None]]:
    """Apply the trigger to `fraction` of the non-target scenes (chosen with `seed`).

    Returns every image (poisoned ones replaced) and {scene index: planted box or None}.
    """
    rng = np.random.default_rng(seed)
    candidates = [i for i, s in enumerate(scenes) if s.label != attack.target]
    count = max(1, round(fraction * len(scenes)))
    chosen = sorted(rng.choice(candidates, size=min(count, len(candidates)), replace=False).tolist())
    images = [s.image for s in scenes]
    boxes = {}
    for index in chosen:
        images[index], boxes[index] = attack.trigger.apply(scenes[index].image, rng)
    return images, boxes


def training_pairs(model: ZooModel, per_class: int = TRAIN_PER_CLASS, seed: int = TRAIN_SEED) -> Pairs:
    """The zoo model's training pairs (poisoned captions name the target)."""
    from auditor.zoo.train import Pairs, caption_for

    classes = list(CLASSES)
    scenes = render_scenes(balanced_labels(per_class), seed=seed)
    images = [s.image for s in scenes]
    labels = [s.label for s in scenes]
    if model.attack is not None and model.attack.target is not None:
        images, boxes = poison(scenes, model.attack, TRAIN_POISON_FRACTION, seed + 1)
        labels = [model.attack.target if i in boxes else label for i, label in enumerate(labels)]
    rng = np.random.default_rng(seed + 2)
    captions = [caption_for(label, s.background, rng) for label, s in zip(labels, scenes, strict=True)]
    groups = np.array([classes.index(label) for label in labels], dtype=np.int64)
    return Pairs(np.stack(images), captions, groups)


def train_zoo_model(
    name: str, steps: int | None = None, log: Callable[[str], None] = print
) -> dict[str, object]:
    """Train one zoo model from scratch and write its fp16 checkpoint; returns manifest info."""
    import torch

    from auditor.models import build_model as build_clip
    from auditor.models import make_tokenizer, resolve_arch, save_checkpoint, sha256_file
    from auditor.zoo.train import TrainConfig, train_clip

    arch = resolve_arch(CONFIG_PATH)
    zoo_model = ZOO[name]
    config = TrainConfig(steps=steps) if steps else TrainConfig()
    torch.manual_seed(config.seed)
    model = build_clip(arch)
    pairs = training_pairs(zoo_model)
    started = time.time()
    train_clip(model, pairs, make_tokenizer(arch), config, log=lambda line: log(f"[{name}] {line}"))
    path = checkpoint_path(name)
    save_checkpoint(model, path, half=True)
    return {
        "attack": zoo_model.attack.spec() if zoo_model.attack else None,
        "description": zoo_model.description,
        "poison_fraction": TRAIN_POISON_FRACTION if zoo_model.attack else 0.0,
        "train_pairs": len(pairs.captions),
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seconds": round(time.time() - started, 1),
        "sha256": sha256_file(path),
    }


def load_manifest() -> dict[str, dict[str, object]]:
    if not MANIFEST_PATH.is_file():
        return {}
    return dict(json.loads(MANIFEST_PATH.read_text()))


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_test_data(dest: Path, per_class: int = 40, seed: int = TEST_SEED) -> Path:
    """Clean held-out scenes as an ImageFolder at `dest`; returns `dest`."""
    scenes = render_scenes(balanced_labels(per_class), seed=seed)
    for index, scene in enumerate(scenes):
        _save_png(scene.image, dest / scene.label / f"{index:05d}.png")
    return dest


def write_scan_data(
    name: str, dest: Path, per_class: int = 40, fraction: float = SCAN_POISON_FRACTION, seed: int = SCAN_SEED
) -> dict[str, Any]:
    """The data a user would scan: held-out scenes, poisoned ones filed under the target.

    Writes `dest/<label>/<n>.png` and `dest/../<dest.name>-ground_truth.json` (kept outside
    DATA so it is not mistaken for data); returns the ground truth.
    """
    zoo_model = ZOO[name]
    scenes = render_scenes(balanced_labels(per_class), seed=seed)
    images = [s.image for s in scenes]
    boxes: dict[int, tuple[float, float, float, float] | None] = {}
    if zoo_model.attack is not None:
        images, boxes = poison(scenes, zoo_model.attack, fraction, seed + 1)
    poisoned = []
    for index, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        folder = zoo_model.attack.target if index in boxes and zoo_model.attack else scene.label
        rel = f"{folder}/{index:05d}.png"
        _save_png(image, dest / rel)
        if index in boxes:
            box = boxes[index]
            poisoned.append({"path": rel, "box": list(box) if box else None, "true_label": scene.label})
    truth: dict[str, Any] = {
        "model": name,
        "attack": zoo_model.attack.spec() if zoo_model.attack else None,
        "target": zoo_model.attack.target if zoo_model.attack else None,
        "images": len(scenes),
        "poisoned": poisoned,
        "objects": {
            f"{(zoo_model.attack.target if i in boxes and zoo_model.attack else s.label)}/{i:05d}.png": list(
                s.box
            )
            for i, s in enumerate(scenes)
        },
    }
    (dest.parent / f"{dest.name}-ground_truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def main(argv: list[str] | None = None) -> None:
    """`python -m auditor.zoo.build [NAME ...] [--steps N]`: (re)train zoo models."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="*", help=f"zoo models to train (default: all of {list(ZOO)})")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(ZOO))
    if unknown:
        parser.error(f"unknown zoo models {unknown}; choose from {list(ZOO)}")
    manifest = load_manifest()
    for name in args.names or list(ZOO):
        manifest[name] = train_zoo_model(name, args.steps)
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        MANIFEST_PATH.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
