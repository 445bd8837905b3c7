"""Where scene objects come from: colour emoji, real photo cut-outs, or drawn shapes.

Each source names its classes and gives, for a label and a random generator, an RGBA picture
cropped to its visible pixels (`SpriteFn`), which `scenes.render_scene` pastes on a texture:
- `emoji`: Debian's Noto Color Emoji (`fonts-noto-color-emoji`), one picture per class;
- `photos`: real photographs cut out with alpha masks, from Debian's `tuxpaint-stamps-default`
  (several different photos per class, cartoon drawings left out); some classes are close
  (fruit / vegetable, rodent / mammal), which is what a weak model confuses;
- `shapes`: geometric shapes drawn with Pillow in a random saturated colour.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from auditor.errors import EnvironmentProblem
from auditor.zoo.scenes import CLASSES, SpriteFn

STAMPS = Path("/usr/share/tuxpaint/stamps")
PHOTO_CLASSES: dict[str, str] = {
    "bird": "animals/birds",
    "cattle": "animals/mammals/bovines",
    "mammal": "animals/mammals",
    "rodent": "animals/mammals/rodents",
    "fish": "animals/fish",
    "insect": "animals/insects",
    "fruit": "food/fruit",
    "vegetable": "food/vegetables",
    "flower": "plants/flowers",
    "tree": "plants/trees",
    "tool": "household/tools",
    "road sign": "town/roadsigns",
}
SHAPE_CLASSES = (
    "circle",
    "ring",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
    "ellipse",
)


def source_classes(source: str) -> list[str]:
    if source == "emoji":
        return list(CLASSES)
    if source == "photos":
        return list(PHOTO_CLASSES)
    if source == "shapes":
        return list(SHAPE_CLASSES)
    raise ValueError(f"unknown image source '{source}'")


def sprite_fn(source: str) -> SpriteFn | None:
    """The source's picture function (None for emoji, `render_scene`'s default)."""
    if source == "emoji":
        return None
    if source == "photos":
        return photo_sprite
    if source == "shapes":
        return shape_sprite
    raise ValueError(f"unknown image source '{source}'")


@cache
def photo_files(label: str) -> tuple[Path, ...]:
    """The class's photo cut-outs (PNG with alpha), sorted; cartoon drawings are left out."""
    folder = STAMPS / PHOTO_CLASSES[label]
    if not folder.is_dir():
        raise EnvironmentProblem(
            f"the photo scenes read {STAMPS}, which is not installed",
            hint="apt-get install tuxpaint-stamps-default",
        )
    files = tuple(sorted(p for p in folder.glob("*.png") if "cartoon" not in p.parts))
    if not files:
        raise EnvironmentProblem(f"no photos for '{label}' in {folder}")
    return files


@cache
def _photo(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGBA")
    image.thumbnail((160, 160))
    bbox = image.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    return image.crop(bbox) if bbox else image


def photo_sprite(label: str, rng: np.random.Generator) -> Image.Image:
    files = photo_files(label)
    return _photo(files[int(rng.integers(len(files)))])


def shape_sprite(label: str, rng: np.random.Generator) -> Image.Image:
    """The shape `label` at 96 px in a random saturated colour, slightly rotated."""
    hue = rng.uniform(0, 1)
    rgb = tuple(int(255 * c) for c in _hsv(hue, 0.8, rng.uniform(0.6, 1.0)))
    canvas = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    _draw_shape(ImageDraw.Draw(canvas), label, (*rgb, 255))
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BICUBIC)
    bbox = canvas.getchannel("A").getbbox()
    return canvas.crop(bbox) if bbox else canvas


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, fill: tuple[int, ...]) -> None:
    c, r = 48, 40
    if label == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
    elif label == "ring":
        draw.ellipse((c - r, c - r, c + r, c + r), outline=fill, width=12)
    elif label == "square":
        draw.rectangle((c - 34, c - 34, c + 34, c + 34), fill=fill)
    elif label == "ellipse":
        draw.ellipse((c - r, c - 22, c + r, c + 22), fill=fill)
    elif label == "crescent":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
        draw.ellipse((c - r + 22, c - r - 6, c + r + 22, c + r - 6), fill=(0, 0, 0, 0))
    elif label == "cross":
        draw.rectangle((c - 12, c - r, c + 12, c + r), fill=fill)
        draw.rectangle((c - r, c - 12, c + r, c + 12), fill=fill)
    elif label == "heart":
        draw.ellipse((c - r, c - 30, c, c + 6), fill=fill)
        draw.ellipse((c, c - 30, c + r, c + 6), fill=fill)
        draw.polygon([(c - r + 2, c - 8), (c + r - 2, c - 8), (c, c + r)], fill=fill)
    else:
        draw.polygon(_polygon(label, c, r), fill=fill)


def _polygon(label: str, c: int, r: int) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, turn: float = -np.pi / 2) -> list[tuple[float, float]]:
        return [
            (c + radius * np.cos(turn + 2 * np.pi * k / n), c + radius * np.sin(turn + 2 * np.pi * k / n))
            for k in range(n)
        ]

    if label == "triangle":
        return ring(3, r)
    if label == "diamond":
        return ring(4, r)
    if label == "hexagon":
        return ring(6, r)
    if label == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if label == "arrow":
        return [
            (c - r, c - 10),
            (c + 6, c - 10),
            (c + 6, c - 26),
            (c + r, c),
            (c + 6, c + 26),
            (c + 6, c + 10),
            (c - r, c + 10),
        ]
    raise ValueError(f"unknown shape '{label}'")


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)
