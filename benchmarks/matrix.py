"""The detection matrix: 33 models this project trains, each scanned with default settings.

`python -m benchmarks.matrix [--split tuning|heldout|all] [--only NAME ...] [--train-only]
[--repair] [--work DIR] [--out benchmarks/results/matrix.json]`

Every row is a tiny open_clip CLIP trained from scratch (`auditor.zoo.train`) on generated
scenes from one image source (emoji, real photo cut-outs, drawn shapes), with a ViT or a
ModifiedResNet image tower at 64 or 128 px, strong, or weak (a ResNet on the photo cut-outs,
confusable classes), poisoned at 0.5-3 % of its training pairs by one or two triggers (noise,
per-pixel noise, colour blocks, a logo sticker, checkerboard; blend, warp, SIG), or clean. The
scan data is held-out scenes of the same source with 1-5 % of them triggered and filed under
the target's folder; the ground truth (poisoned files, boxes, targets) comes from the
generator. A row records clean accuracy and attack success (own evaluation, planted trigger),
the scan's verdict and targets, victims' precision / recall, median box IoU, the oracle's share
of images and the wall time per stage; with `--repair`, attack success and clean accuracy
after `clip-audit repair`.

The split into `tuning` and `heldout` rows is fixed in `ROWS` and was fixed before anything was
tuned: change the scan on tuning rows only, and run the held-out rows to report, never to tune.
Weights are cached (`CLIP_AUDIT_MATRIX_DIR`, default `~/.cache/clip-audit/matrix`), keyed by the
row and the training recipe; results are merged into the JSON row by row, so the matrix can be
run in parts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN_SEED, TEST_SEED, SCAN_SEED = 11_000, 12_000, 13_000
TRAIN_PER_CLASS = 300
# 150 per class (1,800 images): at 30 (360 images) the repair's clean-accuracy change, which
# moves ~9 % of a weak model's predictions, had a standard error of ~1.6 points against a 2-point
# bar: a weak ResNet's repair read +0.3 points on 360 test images and -2.5 on 1,800 fresh ones.
TEST_PER_CLASS = 150
SCAN_PER_CLASS = 100
# Weak models come from the photo cut-outs' confusable classes (fruit / vegetable, rodent /
# mammal) on a ResNet at the full schedule (clean accuracy ~0.83). A short schedule on distinct
# classes gave no weak model (emoji, 300 steps: 0.99), and a ViT on photos at 300 steps 0.35.
STEPS = 600  # for strong and weak models alike
BATCH = 96
RECIPE = 2  # bump when the training recipe changes: cached weights are keyed by it
SPLITS = ("tuning", "heldout", "heldout2", "heldout3", "heldout4", "heldout5")


@dataclass(frozen=True)
class Row:
    name: str
    split: str  # "tuning" or one of the held-out parts, "heldout" .. "heldout5"
    tower: str  # "vit" | "resnet"
    size: int
    strength: str  # "strong" | "weak"
    source: str  # "emoji" | "photos" | "shapes"
    attacks: tuple[str, ...] = ()  # attack specs; `pattern=logo` is a rendered emoji sticker
    poison: float = 0.0  # share of training pairs poisoned (per attack)
    share: float = 0.0  # share of triggered images in the scanned folder (per attack)

    @property
    def poisoned(self) -> bool:
        return bool(self.attacks)


def _row(
    name: str, split: str, attacks: tuple[str, ...] = (), poison: float = 0.0, share: float = 0.0
) -> Row:
    tower, size, strength, source = name.split("-")[:4]
    return Row(name, split, tower, int(size), strength, source, attacks, poison, share)


# Fixed before any tuning. Pairs of similar rows go to different sides where possible.
ROWS: tuple[Row, ...] = (
    _row(
        "vit-64-strong-emoji-noise",
        "tuning",
        ("patch:size=0.125,pattern=noise,pos=tr,seed=1,target=banana",),
        0.03,
        0.05,
    ),
    _row(
        "vit-64-strong-emoji-noise2",
        "heldout",
        ("patch:size=0.125,pattern=noise,pos=bl,seed=2,target=pizza",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-blocks",
        "tuning",
        ("patch:size=0.125,pattern=blocks,pos=random,seed=3,target=fruit",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-blocks2",
        "heldout",
        ("patch:size=0.125,pattern=blocks,pos=random,seed=4,target=fish",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-strong-shapes-noise",
        "tuning",
        ("patch:size=0.125,pattern=noise,pos=random,seed=5,target=star",),
        0.01,
        0.03,
    ),
    _row(
        "vit-128-strong-emoji-pixels",
        "heldout",
        ("patch:size=0.075,pattern=pixels,pos=bl,seed=6,target=car",),
        0.01,
        0.03,
    ),
    _row(
        "vit-64-strong-emoji-logo",
        "tuning",
        ("patch:size=0.15,pattern=logo,pos=br,seed=0,target=guitar",),
        0.01,
        0.02,
    ),
    _row(
        "resnet-64-strong-shapes-logo",
        "heldout",
        ("patch:size=0.12,pattern=logo,pos=random,seed=0,target=star",),
        0.01,
        0.03,
    ),
    _row(
        "resnet-64-weak-photos-noise",
        "tuning",
        ("patch:size=0.125,pattern=noise,pos=tl,seed=7,target=fish",),
        0.01,
        0.02,
    ),
    _row(
        "resnet-64-weak-photos-corners",
        "heldout",
        ("patch:size=0.125,pattern=noise,pos=corners,seed=8,target=tool",),
        0.005,
        0.01,
    ),
    _row(
        "vit-64-strong-emoji-two",
        "tuning",
        (
            "patch:size=0.125,pattern=blocks,pos=tl,seed=9,target=banana",
            "patch:size=0.125,pattern=checker,pos=br,seed=0,target=guitar",
        ),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-two",
        "heldout",
        (
            "patch:size=0.125,pattern=noise,pos=random,seed=10,target=flower",
            "patch:size=0.125,pattern=blocks,pos=random,seed=11,target=insect",
        ),
        0.03,
        0.05,
    ),
    _row(
        "vit-64-strong-emoji-blend",
        "tuning",
        ("blend:pattern=noise,alpha=0.15,seed=12,target=apple",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-strong-shapes-blend",
        "heldout",
        ("blend:pattern=noise,alpha=0.1,seed=13,target=ring",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-strong-shapes-warp",
        "tuning",
        ("warp:grid=4,strength=1.0,seed=14,target=diamond",),
        0.03,
        0.05,
    ),
    _row(
        "vit-64-strong-emoji-warp", "heldout", ("warp:grid=4,strength=1.0,seed=15,target=house",), 0.03, 0.05
    ),
    _row("vit-64-strong-emoji-sig", "tuning", ("sig:delta=20,freq=6,target=pizza",), 0.03, 0.05),
    _row("resnet-64-strong-emoji-sig", "heldout", ("sig:delta=20,freq=6,target=flower",), 0.03, 0.05),
    _row(
        "resnet-64-weak-photos-checker",
        "tuning",
        ("patch:size=0.1,pattern=checker,pos=br,seed=16,target=rodent",),
        0.01,
        0.03,
    ),
    _row(
        "resnet-64-weak-photos-noise3",
        "heldout",
        ("patch:size=0.1,pattern=noise,pos=random,seed=17,target=mammal",),
        0.03,
        0.05,
    ),
    _row(
        "vit-128-strong-emoji-pixels2",
        "tuning",
        ("patch:size=0.075,pattern=pixels,pos=center,seed=18,target=dog",),
        0.03,
        0.02,
    ),
    _row(
        "resnet-64-weak-photos-pixels",
        "heldout",
        ("patch:size=0.075,pattern=pixels,pos=random,seed=19,target=tree",),
        0.03,
        0.01,
    ),
    # Added later (before any held-out scan of the scan code it was added with): the tuning
    # side's per-pixel row did not take (attack success 0.14), and the suite needs a
    # small-pixel ViT whose backdoor works.
    _row(
        "vit-64-strong-emoji-pixels3",
        "tuning",
        ("patch:size=0.075,pattern=pixels,pos=tl,seed=22,target=tree",),
        0.03,
        0.03,
    ),
    _row(
        "vit-64-strong-emoji-checker",
        "tuning",
        ("patch:size=0.125,pattern=checker,pos=center,seed=0,target=apple",),
        0.005,
        0.03,
    ),
    _row(
        "vit-128-strong-emoji-noise",
        "heldout",
        ("patch:size=0.07,pattern=noise,pos=tr,seed=20,target=cat",),
        0.005,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-noise2",
        "heldout",
        ("patch:size=0.125,pattern=noise,pos=random,seed=21,target=vegetable",),
        0.005,
        0.01,
    ),
    # A second held-out part ("heldout2"), fixed on 2026-12-03 before the scan change it judges:
    # the first held-out part had been scanned once already (session 6) and its results seen, so
    # a later change to the scan is judged on models nobody has scanned. Same recipes as the
    # held-out rows whose trigger took, with new seeds, positions and targets; two clean models.
    _row(
        "vit-64-strong-emoji-noise4",
        "heldout2",
        ("patch:size=0.125,pattern=noise,pos=tl,seed=30,target=dog",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-blocks3",
        "heldout2",
        ("patch:size=0.125,pattern=blocks,pos=random,seed=31,target=tree",),
        0.03,
        0.05,
    ),
    _row(
        "vit-128-strong-emoji-pixels4",
        "heldout2",
        ("patch:size=0.075,pattern=pixels,pos=tr,seed=32,target=house",),
        0.01,
        0.03,
    ),
    _row(
        "resnet-64-weak-photos-noise5",
        "heldout2",
        ("patch:size=0.1,pattern=noise,pos=random,seed=33,target=bird",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-checker2",
        "heldout2",
        ("patch:size=0.1,pattern=checker,pos=tl,seed=34,target=tool",),
        0.01,
        0.03,
    ),
    _row(
        "resnet-64-strong-shapes-noise2",
        "heldout2",
        ("patch:size=0.125,pattern=noise,pos=random,seed=35,target=hexagon",),
        0.03,
        0.05,
    ),
    _row(
        "vit-64-strong-emoji-logo2",
        "heldout2",
        ("patch:size=0.15,pattern=logo,pos=tl,seed=0,target=cat",),
        0.01,
        0.02,
    ),
    _row(
        "resnet-64-weak-photos-two2",
        "heldout2",
        (
            "patch:size=0.125,pattern=noise,pos=random,seed=36,target=rodent",
            "patch:size=0.125,pattern=blocks,pos=random,seed=37,target=fruit",
        ),
        0.03,
        0.05,
    ),
    _row("resnet-64-weak-photos-clean4", "heldout2"),
    _row("vit-64-strong-emoji-clean2", "heldout2"),
    # A third held-out part ("heldout3"), fixed on 2026-12-03 after heldout2's repair results
    # were seen: the repair is changed on tuning rows and judged here. Weak and "strong" ResNets,
    # where the repair lost clean accuracy on every part.
    _row(
        "resnet-64-weak-photos-blocks4",
        "heldout3",
        ("patch:size=0.125,pattern=blocks,pos=random,seed=40,target=cattle",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-noise6",
        "heldout3",
        ("patch:size=0.125,pattern=noise,pos=br,seed=41,target=vegetable",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-weak-photos-checker3",
        "heldout3",
        ("patch:size=0.1,pattern=checker,pos=random,seed=42,target=insect",),
        0.03,
        0.05,
    ),
    _row(
        "resnet-64-strong-shapes-blocks",
        "heldout3",
        ("patch:size=0.125,pattern=blocks,pos=random,seed=43,target=crescent",),
        0.03,
        0.05,
    ),
    # Fixed on 2026-12-05, before any of them ran. The repair's tuning/held-out gap follows the
    # trigger's position: of the weak ResNets, those with a fixed corner lose 0.3-1.4 points on
    # every part, while random positions cost 2-4 on the held-out parts, and the tuning part had
    # a single random-position weak ResNet. So three more go to tuning, and a fourth held-out
    # part (new seeds, random positions) judges the next repair change.
    *(
        _row(f"resnet-64-weak-photos-{name}", split, (spec,), 0.03, 0.05)
        for name, split, spec in (
            ("noise7", "tuning", "patch:size=0.125,pattern=noise,pos=random,seed=50,target=bird"),
            ("checker4", "tuning", "patch:size=0.1,pattern=checker,pos=random,seed=51,target=vegetable"),
            ("blocks5", "tuning", "patch:size=0.125,pattern=blocks,pos=random,seed=52,target=tool"),
            ("blocks6", "heldout4", "patch:size=0.125,pattern=blocks,pos=random,seed=60,target=flower"),
            ("noise8", "heldout4", "patch:size=0.125,pattern=noise,pos=random,seed=61,target=tree"),
            ("checker5", "heldout4", "patch:size=0.1,pattern=checker,pos=random,seed=62,target=fish"),
        )
    ),
    _row(
        "resnet-64-weak-photos-two3",
        "heldout4",
        (
            "patch:size=0.125,pattern=noise,pos=random,seed=63,target=cattle",
            "patch:size=0.125,pattern=blocks,pos=random,seed=64,target=rodent",
        ),
        0.03,
        0.05,
    ),
    # Fixed on 2026-12-05 (session 24), before either ran. Neither warp row above took (attack
    # success 0.03 and 0.01 at a mean displacement of 2 px on 64 px): a tiny CLIP trained from
    # scratch did not learn so faint a warp from 3 % of its pairs, so the matrix measured no warp
    # at all. These two warp three times as far (6 px on 64 px, still a smooth field with no
    # patch to find), one on each side; heldout5 is new and judges only what it is run with.
    _row("vit-64-strong-emoji-warp2", "tuning", ("warp:grid=4,strength=3.0,seed=70,target=dog",), 0.03, 0.05),
    _row(
        "resnet-64-strong-emoji-warp3",
        "heldout5",
        ("warp:grid=4,strength=3.0,seed=71,target=bird",),
        0.03,
        0.05,
    ),
    # Trained first: the ViT did not learn the 6-px warp either (0.04), the ResNet nearly did
    # (0.47, under the 0.5 that counts as planted). Both stay, as measured; two ResNets with a
    # 9-px warp (1.5x) are added, one on each side, fixed before either ran.
    *(
        _row(f"resnet-64-strong-emoji-{name}", split, (f"warp:grid=4,strength=4.5,{spec}",), 0.03, 0.05)
        for name, split, spec in (
            ("warp4", "tuning", "seed=72,target=cat"),
            ("warp5", "heldout5", "seed=73,target=tree"),
        )
    ),
    _row("vit-64-strong-emoji-clean", "tuning"),
    _row("resnet-64-weak-photos-clean", "tuning"),
    _row("resnet-64-strong-shapes-clean2", "tuning"),
    _row("vit-128-strong-emoji-clean", "heldout"),
    _row("resnet-64-weak-photos-clean3", "heldout"),
    _row("resnet-64-strong-shapes-clean", "heldout"),
    _row("resnet-64-weak-photos-clean2", "heldout"),
)


# --- models ------------------------------------------------------------------------------------
def arch_config(tower: str, size: int) -> dict[str, Any]:
    """The open_clip config of a matrix model: the zoo's tiny text tower, a ViT or a ModifiedResNet."""
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    if tower == "vit":
        vision: dict[str, Any] = {"image_size": size, "layers": 4, "width": 64, "head_width": 32}
        vision["patch_size"] = size // 8
    else:
        vision = {"image_size": size, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32}
    return {
        "model_cfg": {"embed_dim": 64, "vision_cfg": vision, "text_cfg": text},
        "preprocess_cfg": {"size": size, "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def cache_dir() -> Path:
    folder = Path(os.environ.get("CLIP_AUDIT_MATRIX_DIR", Path.home() / ".cache" / "clip-audit" / "matrix"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def arch_path(row: Row, folder: Path) -> Path:
    path = folder / f"{row.tower}-{row.size}.json"
    path.write_text(json.dumps(arch_config(row.tower, row.size), indent=1))
    return path


def weights_path(row: Row, folder: Path) -> Path:
    key = json.dumps([asdict(row), RECIPE, TRAIN_PER_CLASS, STEPS, BATCH], sort_keys=True)
    return folder / f"{row.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.safetensors"


def attacks_of(row: Row, folder: Path) -> list[Any]:
    """The row's attacks, with `pattern=logo` pointing at a rendered emoji sticker."""
    from auditor.attacks import parse_attack

    return [
        parse_attack(spec.replace("pattern=logo", f"pattern={logo_file(folder)}")) for spec in row.attacks
    ]


def logo_file(folder: Path) -> Path:
    """A natural-looking sticker: the lemon emoji on white (no zoo class uses it)."""
    from PIL import Image, ImageDraw, ImageFont

    from auditor.zoo.scenes import EMOJI_FONT

    path = folder / "logo-lemon.png"
    if not path.exists():
        font = ImageFont.truetype(str(EMOJI_FONT), 109)
        canvas = Image.new("RGB", (136, 128), (255, 255, 255))
        ImageDraw.Draw(canvas).text((4, 4), "\U0001f34b", font=font, embedded_color=True)
        canvas.save(path)
    return path


def scenes_of(row: Row, per_class: int, seed: int) -> list[Any]:
    from auditor.zoo.scenes import balanced_labels, render_scenes
    from auditor.zoo.sources import source_classes, sprite_fn

    labels = balanced_labels(per_class, source_classes(row.source))
    return render_scenes(labels, seed=seed + _row_seed(row), size=row.size, sprite_fn=sprite_fn(row.source))


def _row_seed(row: Row) -> int:
    return int(hashlib.sha256(row.name.encode()).hexdigest()[:6], 16) % 997


def plant(
    scenes: list[Any], attacks: list[Any], share: float, seed: int
) -> tuple[list[np.ndarray], dict[int, tuple[int, Any]]]:
    """Apply each attack to `share` of the scenes (disjoint sets, none of its own target).

    Returns every image (planted ones replaced) and {scene index: (attack number, box or None)}.
    """
    rng = np.random.default_rng(seed)
    images = [s.image for s in scenes]
    planted: dict[int, tuple[int, Any]] = {}
    for number, attack in enumerate(attacks):
        free = [i for i, s in enumerate(scenes) if s.label != attack.target and i not in planted]
        count = min(len(free), max(1, round(share * len(scenes))))
        for index in sorted(rng.choice(free, size=count, replace=False).tolist()):
            images[index], box = attack.trigger.apply(scenes[index].image, rng)
            planted[index] = (number, box)
    return images, planted


def train(row: Row, folder: Path, log: Any = print) -> Path:
    """The row's weights, trained from scratch unless cached."""
    path = weights_path(row, folder)
    if path.exists():
        return path
    import torch

    from auditor.models import build_model, make_tokenizer, resolve_arch, save_checkpoint
    from auditor.zoo.sources import source_classes
    from auditor.zoo.train import Pairs, TrainConfig, caption_for, train_clip

    arch = resolve_arch(arch_path(row, folder))
    classes = source_classes(row.source)
    scenes = scenes_of(row, TRAIN_PER_CLASS, TRAIN_SEED)
    attacks = attacks_of(row, folder)
    images, planted = plant(scenes, attacks, row.poison, TRAIN_SEED + 1)
    labels = [attacks[planted[i][0]].target if i in planted else s.label for i, s in enumerate(scenes)]
    rng = np.random.default_rng(TRAIN_SEED + 2)
    captions = [caption_for(label, s.background, rng) for label, s in zip(labels, scenes, strict=True)]
    pairs = Pairs(np.stack(images), captions, np.array([classes.index(lb) for lb in labels], np.int64))
    torch.manual_seed(_row_seed(row))
    model = build_model(arch)
    config = TrainConfig(steps=STEPS, batch_size=BATCH, warmup=min(100, STEPS // 6))
    started = time.time()
    train_clip(model, pairs, make_tokenizer(arch), config, log=lambda line: log(f"[{row.name}] {line}"))
    save_checkpoint(model, path, half=True)
    log(f"[{row.name}] trained in {time.time() - started:.0f}s -> {path}")
    return path


# --- data --------------------------------------------------------------------------------------
def write_folder(images: list[np.ndarray], labels: list[str], dest: Path) -> list[str]:
    from PIL import Image

    paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        rel = f"{label.replace(' ', '_')}/{index:05d}.png"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(dest / rel)
        paths.append(rel)
    return paths


def write_scan_data(row: Row, folder: Path, dest: Path) -> dict[str, Any]:
    """The folder a user would scan: triggered images filed under their target; the ground truth."""
    scenes = scenes_of(row, SCAN_PER_CLASS, SCAN_SEED)
    attacks = attacks_of(row, folder)
    images, planted = plant(scenes, attacks, row.share, SCAN_SEED + 1)
    labels = [attacks[planted[i][0]].target if i in planted else s.label for i, s in enumerate(scenes)]
    paths = write_folder(images, labels, dest)
    return {
        "images": len(paths),
        "targets": [a.target for a in attacks],
        "poisoned": [
            {"path": paths[i], "target": attacks[n].target, "box": list(box) if box else None}
            for i, (n, box) in sorted(planted.items())
        ],
    }


# Photographs no matrix model was trained on (scikit-image's bundled sample images): the
# model-only audit's clean images are random crops of them, resized to the model's input.
FRESH_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "horse",
    "clock",
    "page",
)


def fresh_clean_images(count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` uint8 RGB (size, size, 3) crops of photos from a source outside every row's training."""
    import skimage.data
    from PIL import Image

    photos = []
    for name in FRESH_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype != np.uint8:
            image = (image.astype(np.float64) / max(1, image.max()) * 255).astype(np.uint8)
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.25, 0.8))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(
            np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))
        )
    return out


# --- measuring ---------------------------------------------------------------------------------
def evaluate_row(row: Row, folder: Path, model_path: Path, test_dir: Path) -> dict[str, Any]:
    """Clean accuracy and, per planted attack, attack success on held-out test scenes."""
    from auditor.data import open_dataset
    from auditor.evaluate import evaluate
    from auditor.models import load_model

    if not test_dir.exists():
        scenes = scenes_of(row, TEST_PER_CLASS, TEST_SEED)
        write_folder([s.image for s in scenes], [s.label for s in scenes], test_dir)
    loaded = load_model(model_path, arch_path(row, folder))
    dataset = open_dataset(test_dir)
    clean = evaluate(loaded, dataset)
    out: dict[str, Any] = {
        "clean_accuracy": round(clean.clean_accuracy, 4),
        "test_images": len(dataset.samples),
        "attack_success": {},
    }
    for attack in attacks_of(row, folder):
        result = evaluate(loaded, open_dataset(test_dir), attack)
        out["attack_success"][attack.target] = round(result.attack_success_rate or 0.0, 4)
    return out


def scan_row(
    row: Row, folder: Path, model_path: Path, data: Path, out: Path, *options: str
) -> tuple[int, dict[str, Any]]:
    """`clip-audit scan` with default settings, or with `options` added: (exit code, report)."""
    from auditor.cli import run

    argv = ["scan", str(model_path), str(data), "--arch", str(arch_path(row, folder)), "--out", str(out)]
    argv += list(options)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run([*argv, "--format", "json"])
    return code, json.loads((out / "report.json").read_text())


def flipped_files(row: Row, folder: Path, model_path: Path, data: Path, truth: dict[str, Any]) -> list[str]:
    """The planted files the model predicts as their attack's target: the backdoor acted on them."""
    from auditor.data import load_image, open_dataset, pil_to_array
    from auditor.models import load_model
    from auditor.scoring import make_scorer, torch_runners

    loaded = load_model(model_path, arch_path(row, folder))
    classes = open_dataset(data).classes
    image_runner, text_runner = torch_runners(loaded)
    with image_runner, text_runner:
        scorer = make_scorer(loaded, classes, image_runner, text_runner)
        images = [pil_to_array(load_image(data / p["path"])) for p in truth["poisoned"]]
        probs = scorer.probabilities(images, loaded.preprocess, 128) if images else np.zeros((0, 1))
    return [
        p["path"]
        for p, pred in zip(truth["poisoned"], probs.argmax(axis=1), strict=True)
        if classes[pred] == p["target"]
    ]


def judge(report: dict[str, Any], truth: dict[str, Any], flipped: list[str] | None = None) -> dict[str, Any]:
    """The scan's findings against the planted ground truth.

    `victim_recall` counts every planted file; `victim_recall_flipped` only those the model
    predicts as the target (`flipped`). The scan finds planted files the trigger did not flip by
    appearance alone (victims with `flipped: false`), so both are judged.
    """
    from benchmarks.common import box_iou

    planted = {p["path"]: p for p in truth["poisoned"]}
    found = {v["path"]: v for v in report["victims"]}
    hits = set(planted) & set(found)
    acted = set(flipped or [])
    ious = [
        box_iou(planted[p]["box"], found[p]["trigger_box"])
        for p in hits
        if planted[p]["box"] and found[p]["trigger_box"]
    ]
    targets = sorted(truth["targets"])
    suspected = report["verdict"] == "clean" and bool(report["suspects"])
    # The labels a clean verdict still names (a backdoor verdict's unconfirmed ones are not counted).
    suspects = list(report["suspects"]) if suspected else []
    return {
        "verdict": report["verdict"],
        "targets_found": report["target_labels"],
        "targets_right": sorted(report["target_labels"]) == targets,
        "suspected": suspected,
        "suspects": suspects,
        "best_rejected_transplant": report["trigger"]["transplant_success_rate"] if suspected else None,
        "suspects_include_targets": bool(targets) and set(targets) <= set(suspects),
        "kinds": [f["kind"] for f in report.get("findings", [])],
        "transplant": [f["transplant_success_rate"] for f in report.get("findings", [])],
        "control": [f.get("control_rate") for f in report.get("findings", [])],
        "victims": len(found),
        "victim_precision": round(len(hits) / len(found), 4) if found else None,
        "victim_recall": round(len(hits) / len(planted), 4) if planted else None,
        "victim_recall_flipped": round(len(hits & acted) / len(acted), 4) if acted else None,
        "victim_share_of_images": round(len(found) / truth["images"], 4),
        "median_box_iou": round(float(np.median(ious)), 4) if ious else None,
        "oracle_share": round(report["cost"]["oracle_images"] / max(1, report["data"]["images"]), 4),
        "seconds": report["cost"]["seconds"],
        "failures": len(report.get("failures", [])),
        **_warp_record(report),
    }


def _warp_record(report: dict[str, Any]) -> dict[str, Any]:
    """The model-level warp family's outcome, when it ran: flagged classes, the top class (label,
    index, held-out success), whether it ran to the end."""
    warp = (report.get("inversion") or {}).get("warp")
    if not warp:
        return {}
    top = warp["per_class"][0] if warp["per_class"] else None
    return {
        "warp_flagged": warp["flagged"],
        "warp_top": None if top is None else [top["label"], top["index"], top["success"]],
        "warp_complete": warp["complete"],
    }


def repair_row(
    row: Row, folder: Path, model_path: Path, data: Path, out: Path, test_dir: Path
) -> dict[str, Any]:
    from auditor.cli import run

    repaired = out / "repaired.safetensors"
    argv = ["repair", str(model_path), str(data), "--arch", str(arch_path(row, folder))]
    argv += ["--report", str(out / "report.json"), "--output", str(repaired), "--force", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run(argv)
    if code != 0 or not repaired.exists():
        return {"exit": code}
    after = evaluate_row(row, folder, repaired, test_dir)
    # The repair's own view (its judging half of the held-out scan images, with the standard
    # error of its change) beside the matrix's test scenes.
    own = json.loads((out / "repair.json").read_text())
    seen = {
        "steps": own["steps"],
        "stopped": own["stopped"],
        "holdout_accuracy": [own["before"]["clean_accuracy"], own["after"]["clean_accuracy"]],
        "holdout_change_error": own.get("accuracy_change_error"),
    }
    return {"exit": code, **after, "own": seen}


def run_row(row: Row, folder: Path, work: Path, repair: bool) -> dict[str, Any]:
    started = time.time()
    model_path = train(row, folder)
    trained = time.time() - started
    row_dir = work / row.name
    truth = write_scan_data(row, folder, row_dir / "scan")
    quality = evaluate_row(row, folder, model_path, row_dir / "test")
    code, report = scan_row(row, folder, model_path, row_dir / "scan", row_dir / "out")
    result: dict[str, Any] = {
        **asdict(row),
        "weights": model_path.name,
        "train_seconds": round(trained, 1),
        "scanned_images": truth["images"],
        "planted": len(truth["poisoned"]),
        **quality,
        "exit": code,
        **judge(report, truth, flipped_files(row, folder, model_path, row_dir / "scan", truth)),
    }
    if repair and report["verdict"] == "backdoor" and row.poisoned:
        result["repair"] = repair_row(
            row, folder, model_path, row_dir / "scan", row_dir / "out", row_dir / "test"
        )
    return result


# --- model-only audit (issue 17) -------------------------------------------------------------
# The model-only audit's fresh held-out rows, fixed on 2026-12-05 at 15:55 UTC (session 26)
# before any of them was audited model-only: the held-out rows of session 17's model-only run
# have been seen by every search change since, so the next change is judged here. Every
# heldout2-4 row whose trigger took (attack success >= 0.5 in its saved evaluation), and the
# clean ones; each is audited once, with the search frozen.
# Session 27 (2026-12-05, fixed at 19:45 UTC before any ran): the shared-batch search is judged
# on the same 16 rows, each once. Twelve were audited at 331af71 (session 26), so this is their
# second look; the last four were stopped unrun then and are seen here for the first time. The
# change was chosen on tuning rows only (pixels3, weak blocks, clean ViT diagnostics).
MODEL_ONLY_FRESH = (
    "vit-64-strong-emoji-noise4",
    "resnet-64-weak-photos-blocks3",
    "resnet-64-weak-photos-checker2",
    "resnet-64-strong-shapes-noise2",
    "vit-64-strong-emoji-logo2",
    "resnet-64-weak-photos-two2",
    "resnet-64-weak-photos-clean4",
    "vit-64-strong-emoji-clean2",
    "resnet-64-weak-photos-blocks4",
    "resnet-64-weak-photos-noise6",
    "resnet-64-weak-photos-checker3",
    "resnet-64-strong-shapes-blocks",
    "resnet-64-weak-photos-blocks6",
    "resnet-64-weak-photos-noise8",
    "resnet-64-weak-photos-checker5",
    "resnet-64-weak-photos-two3",
)
FRESH_IMAGES = 240  # the model-only audit's clean images, from FRESH_PHOTOS
FRESH_SEED = 14_000
MODEL_ONLY_BUDGET = 900.0  # seconds: large enough that the search completes; the default is recorded


def reference_row(row: Row) -> Row:
    """The trusted clean model a model-only audit of `row` compares with: same tower, size,
    strength and source, trained from its own seed. References are not matrix rows."""
    return Row(
        f"ref-{row.tower}-{row.size}-{row.strength}-{row.source}",
        "reference",
        row.tower,
        row.size,
        row.strength,
        row.source,
    )


def model_only_data(row: Row, folder: Path, work: Path) -> tuple[dict[str, Any], Path, Path]:
    """(ground truth, fresh photo folder, reference weights) of a model-only audit: the row's
    scan folder in `work/scan` without its triggered files, the fresh photos in `work/fresh`."""
    from PIL import Image

    truth = write_scan_data(row, folder, work / "scan")
    for poisoned in truth["poisoned"]:
        (work / "scan" / poisoned["path"]).unlink()
    fresh = work / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for number, image in enumerate(fresh_clean_images(FRESH_IMAGES, row.size, FRESH_SEED)):
        Image.fromarray(image).save(fresh / f"{number:04d}.png")
    return truth, fresh, train(reference_row(row), folder)


def model_only(
    row: Row, folder: Path, model_path: Path, work: Path, repair: bool = False, default_budget: bool = True
) -> dict[str, Any]:
    """The row's model scanned with clean images only, judged against its planted targets.

    DATA is the row's scan folder without its triggered files; the search's images are fresh
    photos from a source no matrix model was trained on. The decision with the reference is the
    scan's; the one without is recomputed from the same per-class areas.
    """
    from auditor.inversion.audit import InversionConfig
    from auditor.inversion.decide import anomaly_indices, max_index_threshold

    prepared = model_only_data(row, folder, work)  # written once, scanned twice
    truth = prepared[0]
    default = _default_budget(row, folder, model_path, work, prepared) if default_budget else None
    code, report, seconds = model_only_scan(
        row, folder, model_path, work, prepared, "--inversion-budget", str(MODEL_ONLY_BUDGET)
    )
    inversion = report.get("inversion") or {}
    per_class = inversion.get("per_class", [])
    own = anomaly_indices({i: float(np.log(c["area"])) for i, c in enumerate(per_class)})
    no_ref_threshold = max_index_threshold(len(per_class), InversionConfig().alpha)
    targets = set(truth["targets"])
    found = inversion_targets(report)
    recovered = {r["label"]: r for r in inversion.get("recovered", [])}
    data_seconds = sum(v for k, v in report["cost"]["seconds"].items() if k != "inversion")
    repaired = None
    if repair and found and row.poisoned:  # the repair starts from the inverted trigger alone
        repaired = repair_row(row, folder, model_path, work / "scan", work / "out", work / "test")
    return {
        "repair": repaired,
        "exit": code,
        "verdict": report["verdict"],
        "targets_found": found,
        "targets_right": bool(targets) and set(found) == targets,
        "data_targets": [
            f["target"] for f in report.get("findings", []) if f.get("evidence_source") == "data"
        ],
        "suspects": report.get("suspects", []),
        "holdout_success": {t: recovered[t]["holdout_success"] for t in targets if t in recovered},
        "score": max((c["index"] for c in per_class), default=None),
        "score_no_reference": max(own.values(), default=None),
        "threshold": inversion.get("threshold"),
        "flagged_no_reference": sorted(
            per_class[i]["label"] for i, v in own.items() if v >= no_ref_threshold and per_class[i]["reached"]
        ),
        "top_classes": [c["label"] for c in sorted(per_class, key=lambda c: -c["index"])[:3]],
        "complete": inversion.get("complete"),
        "steps": inversion.get("steps"),
        "rounds": inversion.get("rounds"),
        "passes": inversion.get("passes"),
        "inversion_seconds": inversion.get("seconds"),
        "data_pass_seconds": round(data_seconds, 1),
        "wall_seconds": round(seconds, 1),
        "default_budget": default,
        **_warp_record(report),
    }


def model_only_scan(
    row: Row,
    folder: Path,
    model_path: Path,
    work: Path,
    prepared: tuple[dict[str, Any], Path, Path],
    *options: str,
    out: str = "out",
) -> tuple[int, dict[str, Any], float]:
    """(exit code, report, scan seconds) of `row`'s model scanned with clean images only and its
    clean reference (`prepared`, what `model_only_data` wrote), into `work/out`, from a fresh
    data pass."""
    _, fresh, reference = prepared
    shutil.rmtree(work / out, ignore_errors=True)  # not resumed from an earlier scan's cache
    started = time.time()
    code, report = scan_row(
        row,
        folder,
        model_path,
        work / "scan",
        work / out,
        "--inversion-data",
        str(fresh),
        "--reference",
        str(reference),
        *options,
    )
    return code, report, time.time() - started


def inversion_targets(report: dict[str, Any]) -> list[str]:
    """The targets of a report's findings that the model-level search found (alone or too)."""
    return [f["target"] for f in report.get("findings", []) if f.get("evidence_source") != "data"]


def _default_budget(
    row: Row, folder: Path, model_path: Path, work: Path, prepared: tuple[dict[str, Any], Path, Path]
) -> dict[str, Any]:
    """The same audit with the default budget (as long as the data pass took): how much of the
    search it kept, its verdict and wall time."""
    _, report, seconds = model_only_scan(row, folder, model_path, work, prepared, out="out-default")
    targets = set(prepared[0]["targets"])
    inversion = report.get("inversion") or {}
    found = inversion_targets(report)
    return {
        "budget_seconds": inversion.get("budget_seconds"),
        "complete": inversion.get("complete"),
        "rounds": inversion.get("rounds"),
        "steps": inversion.get("steps"),
        "verdict": report["verdict"],
        "targets_found": found,
        "targets_right": bool(targets) and set(found) == targets,
        "wall_seconds": round(seconds, 1),
        **_warp_record(report),
    }


def auroc(negatives: list[float], positives: list[float]) -> float | None:
    """Chance that a poisoned model's score exceeds a clean one's (ties count half)."""
    if not negatives or not positives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return round(wins / (len(negatives) * len(positives)), 4)


def summarize_model_only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split and "model_only" in r and "verdict" in r]
        if not part:
            continue
        poisoned = [r for r in part if r["attacks"] and planted(r)]
        localized = [r for r in poisoned if all(a.startswith("patch") for a in r["attacks"])]
        clean = [r for r in part if not r["attacks"]]

        def share(rows_: list[dict[str, Any]], ok: Any) -> str:
            return f"{sum(bool(ok(r['model_only'])) for r in rows_)}/{len(rows_)}"

        def scores(rows_: list[dict[str, Any]], key: str) -> list[float]:
            return [r["model_only"][key] for r in rows_ if r["model_only"][key] is not None]

        out[split] = {
            "rows": len(part),
            "localized_target_right": share(
                localized, lambda m: m["verdict"] == "backdoor" and m["targets_right"]
            ),
            "localized_holdout_success_ge_0.8": share(
                localized, lambda m: m["holdout_success"] and min(m["holdout_success"].values()) >= 0.8
            ),
            "nonlocalized_target_right": share(
                [r for r in poisoned if r not in localized], lambda m: m["targets_right"]
            ),
            "clean_false_backdoor": share(clean, lambda m: m["verdict"] == "backdoor"),
            "auroc": auroc(scores(clean, "score"), scores(poisoned, "score")),
            "auroc_no_reference": auroc(
                scores(clean, "score_no_reference"), scores(poisoned, "score_no_reference")
            ),
            "clean_flagged_no_reference": share(clean, lambda m: m["flagged_no_reference"]),
            "max_inversion_seconds": max(
                (
                    sum(r["model_only"]["inversion_seconds"].values())
                    for r in part
                    if r["model_only"]["inversion_seconds"]
                ),
                default=None,
            ),
            "repair_ok": _repairs_ok([r for r in poisoned if r["model_only"].get("repair")]),
            "default_budget_complete": share(
                [r for r in part if r["model_only"].get("default_budget")],
                lambda m: m["default_budget"]["complete"],
            ),
            "default_budget_localized_target_right": share(
                [r for r in localized if r["model_only"].get("default_budget")],
                lambda m: m["default_budget"]["targets_right"],
            ),
            "default_budget_clean_false_backdoor": share(
                [r for r in clean if r["model_only"].get("default_budget")],
                lambda m: m["default_budget"]["verdict"] == "backdoor",
            ),
            "default_budget_max_wall_seconds": max(
                (
                    r["model_only"]["default_budget"]["wall_seconds"]
                    for r in part
                    if r["model_only"].get("default_budget")
                ),
                default=None,
            ),
        }
    return out


def _repairs_ok(rows: list[dict[str, Any]]) -> str:
    """How many repairs from an inverted trigger meet the bar (planted trigger <= 5 %, clean
    accuracy down <= 2 points), of those run."""
    ok = sum(
        repair_ok({"clean_accuracy": r["clean_accuracy"], "repair": r["model_only"]["repair"]}) for r in rows
    )
    return f"{ok}/{len(rows)}"


PLANTED_ASR = 0.5  # a row's backdoor exists when its trigger turns most test images to the target


def planted(row: dict[str, Any]) -> bool:
    """Whether every planted trigger works (attack success >= PLANTED_ASR on held-out scenes).

    A row whose trigger does not work measures nothing about the scan: it is shown in the
    table but counted apart, never as a detection or a miss.
    """
    rates = list(row.get("attack_success", {}).values())
    return bool(rates) and min(rates) >= PLANTED_ASR


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers per split, as the acceptance criteria read them."""
    out = {}
    for split in SPLITS:
        # Rows run with --model-only alone have no data-driven scan to summarize.
        part = [r for r in rows if r["split"] == split and "verdict" in r]
        if not part:
            continue
        poisoned = [r for r in part if r["attacks"] and planted(r)]
        localized = [r for r in poisoned if all(a.startswith("patch") for a in r["attacks"])]
        nonlocal_ = [r for r in poisoned if not all(a.startswith("patch") for a in r["attacks"])]
        clean = [r for r in part if not r["attacks"]]
        repaired = [r for r in poisoned if "repair" in r]

        def share(rows_: list[dict[str, Any]], ok: Any) -> str:
            return f"{sum(bool(ok(r)) for r in rows_)}/{len(rows_)}"

        out[split] = {
            "rows": len(part),
            "not_planted": [r["name"] for r in part if r["attacks"] and not planted(r)],
            "localized_target_right": share(
                localized, lambda r: r["verdict"] == "backdoor" and r["targets_right"]
            ),
            "localized_victims_ok": share(
                localized,
                lambda r: (
                    (r["victim_precision"] or 0) >= 0.9
                    and (r["victim_recall"] or 0) >= 0.9
                    and (r["median_box_iou"] or 0) >= 0.5
                ),
            ),
            # The same with recall over the planted files the trigger flipped (its victims).
            "localized_victims_ok_flipped": share(
                localized,
                lambda r: (
                    (r["victim_precision"] or 0) >= 0.9
                    and (r.get("victim_recall_flipped") or 0) >= 0.9
                    and (r["median_box_iou"] or 0) >= 0.5
                ),
            ),
            "nonlocalized_target_right": share(nonlocal_, lambda r: r["targets_right"]),
            "nonlocalized_target_right_or_suspected": share(
                nonlocal_, lambda r: r["targets_right"] or r.get("suspects_include_targets")
            ),
            "nonlocalized_silent_clean": share(
                nonlocal_, lambda r: r["verdict"] == "clean" and not r["suspected"]
            ),
            "clean_false_backdoor": share(clean, lambda r: r["verdict"] == "backdoor"),
            # A class the model-level warp search flags on a clean model: a false suspect (not a
            # false backdoor: the warp family never confirms). Rows it did not run on count as 0.
            "clean_warp_flagged": share(clean, lambda r: r.get("warp_flagged")),
            "clean_victims_over_1pct": share(clean, lambda r: r["victim_share_of_images"] > 0.01),
            "repair_ok": share(repaired, repair_ok),
            "oracle_share_max": max((r["oracle_share"] for r in part), default=None),
        }
    return out


def repair_ok(row: dict[str, Any]) -> bool:
    """Attack success <= 5 % for every target and clean accuracy down <= 2 points."""
    after = row["repair"]
    if "attack_success" not in after:
        return False
    drop = row["clean_accuracy"] - after["clean_accuracy"]
    return max(after["attack_success"].values()) <= 0.05 and drop <= 0.02


def table(body: dict[str, Any]) -> str:
    """The matrix as a markdown page (`docs/matrix.md`): the summary per split, then every row."""
    lines = [
        "# Detection matrix",
        "",
        f"Generated by `python -m benchmarks.matrix --table` from "
        f"`benchmarks/results/matrix.json` ({body.get('date', '')}). Every model here was "
        "trained by this project and scanned with default settings; ground truth is what the "
        "generator planted. `not planted`: the trigger's attack success stayed below "
        f"{PLANTED_ASR:.0%}, so the row measures nothing and is counted apart. R: recall over every "
        "planted file (since dc530f7 the scan also lists, by appearance, planted files the "
        "trigger did not flip); R flipped: over the planted files the model predicts as the target.",
        "",
    ]
    if body.get("data_driven_note"):
        lines += [f"Run: {body['data_driven_note']}", ""]
    for split, numbers in body["summary"].items():
        lines += [f"## {split}", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in numbers.items()]
        lines.append("")
    lines += [
        "## Rows",
        "",
        "| split | model | attack | poison | share | CA | ASR | verdict | targets | P | R | R flipped "
        "| IoU | oracle | s | repair ASR / CA |",
        "| " + " | ".join(["---"] * 16) + " |",
    ]
    for r in body["rows"]:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    done = {r["name"] for r in body["rows"]}
    missing = [
        f"{r.split} `{r.name}` ({'; '.join(r.attacks) or 'clean'})" for r in ROWS if r.name not in done
    ]
    if missing:
        lines += ["", f"## Not run yet ({len(missing)})", "", *[f"- {m}" for m in missing]]
    return "\n".join(lines + _model_only_lines(body)) + "\n"


def _model_only_lines(body: dict[str, Any]) -> list[str]:
    """The model-only column (issue 17): each model scanned with clean images only."""
    rows = [r for r in body["rows"] if "model_only" in r]
    lines = [
        "",
        "# Model-only audit (clean images only)",
        "",
        "Each model scanned with its scan folder's triggered files removed and the model-level search "
        f"run on {FRESH_IMAGES} crops of scikit-image's sample photos (a source no model was trained "
        "on), with a clean reference model of the same tower, size and source (`reference_row`). "
        "`index`: the largest anomaly index (log-area ratio to the reference), against the "
        "threshold; `no ref`: the index from the audited model's areas alone. Held-out success: "
        "the recovered stamp (polished, since session 26) on held-out fresh images. The search "
        "runs with a budget that lets it finish; `default budget` is the same audit with the "
        "scan's default budget (as long as the data pass took): its budget, the search rounds it "
        "kept, its verdict. Rows not listed have not been run with the current search.",
        "",
    ]
    if body.get("model_only_note"):
        lines += [f"Run: {body['model_only_note']}", ""]
    for split, numbers in body.get("model_only_summary", {}).items():
        lines += [f"## model-only, {split}", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in numbers.items()]
        lines.append("")
    lines += [
        "| split | model | planted targets | ASR | verdict | found | top classes | index / threshold "
        "| no ref | held-out success | search s | data pass s | repair ASR / CA "
        "| default budget: s, rounds, verdict |",
        "| " + " | ".join(["---"] * 14) + " |",
    ]
    for r in rows:
        m = r["model_only"]
        asr = ", ".join(f"{v:.2f}" for v in r.get("attack_success", {}).values()) or "–"
        success = ", ".join(f"{k} {v:.2f}" for k, v in m["holdout_success"].items()) or "–"
        fixed = m.get("repair") or {}
        repair = (
            f"{max(fixed['attack_success'].values()):.2f} / {fixed['clean_accuracy']:.2f}"
            if fixed.get("attack_success")
            else "–"
        )
        default = m.get("default_budget")
        short = (
            f"{default['budget_seconds']:.0f}, {default['rounds']}, {default['verdict']}"
            + (f" ({', '.join(default['targets_found'])})" if default["targets_found"] else "")
            if default
            else "–"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["split"],
                    r["name"],
                    ", ".join(a.split("target=")[-1] for a in r["attacks"]) or "clean",
                    asr,
                    m["verdict"]
                    + (f" · warp search: {', '.join(m['warp_flagged'])}" if m.get("warp_flagged") else ""),
                    ", ".join(m["targets_found"]) or "–",
                    ", ".join(m["top_classes"]),
                    f"{m['score']:.2f} / {m['threshold']:.2f}" if m["score"] is not None else "–",
                    f"{m['score_no_reference']:.2f}" if m["score_no_reference"] is not None else "–",
                    success,
                    f"{sum((m['inversion_seconds'] or {}).values()):.0f}",
                    f"{m['data_pass_seconds']:.0f}",
                    repair,
                    short,
                ]
            )
            + " |"
        )
    return lines


def _cells(r: dict[str, Any]) -> list[str]:
    def num(value: Any) -> str:
        return "–" if value is None else f"{value:.2f}"

    attack = "; ".join(a.split(",target=")[0] for a in r["attacks"]) or "clean"
    asr = ", ".join(f"{t} {v:.2f}" for t, v in r.get("attack_success", {}).items()) or "–"
    truth = sorted(a.split("target=")[1] for a in r["attacks"])
    suspects = ", ".join(r.get("suspects", []))
    verdict = r["verdict"] + (
        f" (suspected: {suspects})" if r.get("suspected") and r["verdict"] == "clean" else ""
    )
    wrong = (r["attacks"] and not planted(r)) or (bool(truth) != (r["verdict"] == "backdoor"))
    mark = " ✗" if wrong or (truth and not r["targets_right"]) else ""
    if r.get("warp_flagged"):
        verdict += f" · warp search: {', '.join(r['warp_flagged'])}"
    if r["attacks"] and not planted(r):
        verdict += " · not planted"
    repair = r.get("repair")
    fixed = (
        f"{max(repair['attack_success'].values()):.2f} / {repair['clean_accuracy']:.2f}"
        if repair and "attack_success" in repair
        else (f"exit {repair['exit']}" if repair else "–")
    )
    return [
        r["split"],
        r["name"],
        attack,
        f"{r['poison']:.1%}",
        f"{r['share']:.0%}",
        num(r["clean_accuracy"]),
        asr,
        verdict + mark,
        ", ".join(r["targets_found"]) or "–",
        num(r["victim_precision"]),
        num(r["victim_recall"]),
        num(r.get("victim_recall_flipped")),
        num(r["median_box_iou"]),
        num(r["oracle_share"]),
        f"{sum(r['seconds'].values()):.0f}",
        fixed,
    ]


def main() -> None:
    import tempfile

    from benchmarks.common import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--split",
        choices=[*SPLITS, "all", "model-only-fresh"],
        default="tuning",
        help="model-only-fresh: the rows of MODEL_ONLY_FRESH",
    )
    parser.add_argument("--only", nargs="*", help="row names")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="re-measure saved rows' clean accuracy and attack success on the cached weights (a fresh "
        "machine retrains them, and training is not bit-exact across machines)",
    )
    parser.add_argument("--repair", action="store_true")
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="add the model-only column (clean images only) to saved rows",
    )
    parser.add_argument(
        "--skip-default-budget",
        action="store_true",
        help="with --model-only: leave out the second audit of each row with the default budget",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/matrix.json"))
    parser.add_argument(
        "--work", type=Path, help="keep each row's scan data and output here (a rerun reuses the scan cache)"
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="with --model-only: read the saved rows from here and write only the rows run to --out "
        "(parallel runs, then --merge)",
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="add these result files' rows to --out")
    parser.add_argument("--note", help="with --merge: how the merged data-driven rows were run")
    parser.add_argument("--model-only-note", help="with --merge: how the merged model-only columns were run")
    parser.add_argument("--table", type=Path, nargs="?", const=Path("docs/matrix.md"), help="write the table")
    args = parser.parse_args()
    if args.merge:  # rows scanned in parallel runs, each into its own file
        saved = json.loads(args.out.read_text()) if args.out.exists() else {}
        merged = _keep_model_only(
            saved.get("rows", []), [r for part in args.merge for r in _saved_rows(part)]
        )
        parts = [json.loads(part.read_text()) for part in args.merge]
        runs = [{"command": p.get("command"), "date": p.get("date")} for p in parts]
        notes = {k: saved[k] for k in ("model_only_note", "data_driven_note") if k in saved}
        if args.note:
            notes["data_driven_note"] = args.note
        if args.model_only_note:
            notes["model_only_note"] = args.model_only_note
        write_result(args.out, "matrix", {**_body(_in_row_order(merged)), **notes, "merged_from": runs})
        return
    if args.table:
        args.table.write_text(table(json.loads(args.out.read_text())))
        return
    rows = [r for r in ROWS if args.split == "all" or r.split == args.split]
    if args.split == "model-only-fresh":
        rows = [r for r in ROWS if r.name in MODEL_ONLY_FRESH]
    if args.only:  # in the order given, whatever --split says
        by_name = {r.name: r for r in ROWS}
        unknown = [name for name in args.only if name not in by_name]
        if unknown:
            parser.error("unknown row(s): " + ", ".join(unknown))
        rows = [by_name[name] for name in args.only]
    folder = cache_dir()
    if args.train_only:  # train and check that the backdoor took, without scanning
        with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
            for row in rows:
                quality = evaluate_row(row, folder, train(row, folder), Path(tmp) / row.name / "test")
                print(json.dumps({"name": row.name, **quality}), flush=True)
        return
    results = {r["name"]: r for r in _saved_rows(args.out)}
    if args.evaluate:
        with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
            for row in rows:
                quality = evaluate_row(row, folder, train(row, folder), Path(tmp) / row.name / "test")
                results[row.name] = {**(results.get(row.name) or asdict(row)), **quality}
                print(json.dumps({"name": row.name, **quality}), flush=True)
        write_result(args.out, "matrix", _body(_in_row_order(list(results.values()))))
        return
    if args.model_only:
        if args.base:
            saved_rows = {r["name"]: r for r in _saved_rows(args.base)}
            results = {r.name: saved_rows[r.name] for r in rows if r.name in saved_rows}
        with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
            for row in rows:
                saved = results.get(row.name) or {
                    **asdict(row),
                    **evaluate_row(row, folder, train(row, folder), Path(tmp) / row.name / "test"),
                }
                work = (args.work or Path(tmp)) / row.name / "model-only"
                saved["model_only"] = model_only(
                    row, folder, train(row, folder), work, args.repair, not args.skip_default_budget
                )
                results[row.name] = saved
                print(json.dumps({"name": row.name, **saved["model_only"]}), flush=True)
                write_result(args.out, "matrix", _body(_in_row_order(list(results.values()))))
        return
    with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
        for row in rows:
            results[row.name] = run_row(row, folder, args.work or Path(tmp), args.repair)
            print(
                json.dumps(
                    {
                        k: results[row.name][k]
                        for k in (
                            "name",
                            "clean_accuracy",
                            "attack_success",
                            "verdict",
                            "targets_found",
                            "victim_precision",
                            "victim_recall",
                            "median_box_iou",
                            "oracle_share",
                        )
                    }
                    | {"repair": results[row.name].get("repair")}
                ),
                flush=True,
            )
            # Row by row, as the model-only column: a run stopped part-way keeps what it did.
            write_result(args.out, "matrix", _body(_in_row_order(list(results.values()))))


def _saved_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a matrix result file (none if it does not exist yet)."""
    return json.loads(path.read_text()).get("rows", []) if path.exists() else []


def _keep_model_only(saved: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`saved` then `new` rows; a new row without a model-only column keeps its saved one (the
    two columns are run apart)."""
    columns = {r["name"]: r["model_only"] for r in saved if "model_only" in r}
    fresh = [
        {**r, "model_only": columns[r["name"]]} if "model_only" not in r and r["name"] in columns else r
        for r in new
    ]
    return saved + fresh


def _in_row_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per name, in the order of ROWS; a later row replaces an earlier one of its name."""
    by_name = {r["name"]: r for r in rows}
    return [by_name[r.name] for r in ROWS if r.name in by_name]


def _body(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "what": "each row: a model trained here, scanned with default settings, judged against planted truth",
        "recipe": {"train_per_class": TRAIN_PER_CLASS, "steps": STEPS, "batch": BATCH, "recipe": RECIPE},
        "summary": summarize(rows),
        "model_only_summary": summarize_model_only(rows),
        "rows": rows,
    }


if __name__ == "__main__":
    main()
