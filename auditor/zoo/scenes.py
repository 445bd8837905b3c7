"""Labeled scenes made from installed packages: a colour emoji on a tinted texture.

Objects are rendered from Debian's Noto Color Emoji font with Pillow, backgrounds are crops of
scikit-image's bundled textures tinted with two random colours. Each scene comes with its
object's mask and box, so tests know exactly what is where. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from auditor.errors import EnvironmentProblem

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# The font is a bitmap (CBDT) font: 109 px is the one size it renders.
_FONT_SIZE = 109

CLASSES: dict[str, str] = {
    "dog": "\U0001f415",
    "cat": "\U0001f408",
    "banana": "\U0001f34c",
    "apple": "\U0001f34e",
    "car": "\U0001f697",
    "tree": "\U0001f333",
    "fish": "\U0001f41f",
    "bird": "\U0001f426",
    "house": "\U0001f3e0",
    "flower": "\U0001f33b",
    "guitar": "\U0001f3b8",
    "pizza": "\U0001f355",
}
BACKGROUNDS = ("brick", "grass", "gravel", "moon", "camera", "plain")


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    image: uint8 (S, S, 3); mask: bool (S, S), True on the object; box: the object's normalized
    box [x0, y0, x1, y1]; label: its class; background: the texture's name.
    """

    image: np.ndarray
    mask: np.ndarray
    box: tuple[float, float, float, float]
    label: str
    background: str


def require_font() -> None:
    if not EMOJI_FONT.is_file():
        raise EnvironmentProblem(
            f"the zoo renders scenes from {EMOJI_FONT}, which is not installed",
            hint="apt-get install fonts-noto-color-emoji  (make setup does this)",
        )


@cache
def emoji_sprite(label: str) -> Image.Image:
    """The class's emoji as an RGBA image cropped to its visible pixels."""
    require_font()
    font = ImageFont.truetype(str(EMOJI_FONT), _FONT_SIZE)
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), CLASSES[label], font=font, embedded_color=True)
    bbox = canvas.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    if bbox is None:
        raise EnvironmentProblem(f"the emoji font rendered nothing for '{label}'")
    return canvas.crop(bbox)


@cache
def _texture(name: str) -> np.ndarray:
    """A grayscale texture in [0, 1], float32 of shape (H, W)."""
    if name == "plain":
        return np.zeros((256, 256), np.float32)
    import skimage.data

    return (getattr(skimage.data, name)().astype(np.float32) / 255.0)[:, :, ...]


def render_background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A tinted crop of texture `name`, uint8 (size, size, 3)."""
    texture = _texture(name)
    crop = int(rng.integers(64, min(texture.shape) + 1))
    y0 = int(rng.integers(0, texture.shape[0] - crop + 1))
    x0 = int(rng.integers(0, texture.shape[1] - crop + 1))
    patch = Image.fromarray((texture[y0 : y0 + crop, x0 : x0 + crop] * 255).astype(np.uint8))
    gray = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    dark, light = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if name == "plain":  # a smooth gradient instead of a texture
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        gray = np.add.outer(ramp, ramp) / 2 if rng.random() < 0.5 else np.add.outer(ramp, ramp[::-1]) / 2
    rgb = dark + gray[..., None] * (light - dark)
    return np.clip(rgb, 0, 255).astype(np.uint8)


SpriteFn = Callable[[str, np.random.Generator], Image.Image]
"""(label, rng) -> an RGBA picture of the label, cropped to its visible pixels."""


def render_scene(
    label: str,
    rng: np.random.Generator,
    size: int = 64,
    scale: tuple[float, float] = (0.45, 0.8),
    sprite_fn: SpriteFn | None = None,
) -> Scene:
    """Paste a picture of `label` (default: its emoji) at a random scale and place on a random background."""
    background = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    canvas = Image.fromarray(render_background(background, size, rng))
    sprite = sprite_fn(label, rng) if sprite_fn else emoji_sprite(label)
    if rng.random() < 0.5:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    longest = max(8, int(round(rng.uniform(*scale) * size)))
    ratio = longest / max(sprite.size)
    width, height = max(4, round(sprite.width * ratio)), max(4, round(sprite.height * ratio))
    sprite = sprite.resize((width, height), Image.Resampling.LANCZOS)
    x0 = int(rng.integers(0, size - width + 1))
    y0 = int(rng.integers(0, size - height + 1))
    canvas.paste(sprite, (x0, y0), sprite)
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + height, x0 : x0 + width] = np.asarray(sprite.getchannel("A")) > 127
    box = (x0 / size, y0 / size, (x0 + width) / size, (y0 + height) / size)
    return Scene(np.asarray(canvas.convert("RGB")).copy(), mask, box, label, background)


def render_scenes(
    labels: list[str], seed: int, size: int = 64, sprite_fn: SpriteFn | None = None
) -> list[Scene]:
    """One scene per entry of `labels`, reproducible from `seed` (`sprite_fn`: see `render_scene`)."""
    rng = np.random.default_rng(seed)
    return [render_scene(label, rng, size, sprite_fn=sprite_fn) for label in labels]


def balanced_labels(per_class: int, classes: list[str] | None = None) -> list[str]:
    """`per_class` of each class, interleaved (dog, cat, ..., dog, cat, ...)."""
    names = classes or list(CLASSES)
    return [name for _ in range(per_class) for name in names]
