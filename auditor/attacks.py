"""Trigger types, used both to plant backdoors (the zoo) and to measure attack success (`eval`).

Four kinds, as in the backdoor literature on CLIP:
- `Patch`: BadNets-style square patch (blocky noise, per-pixel noise, solid colour, saturated
  colour blocks, checkerboard, or an image file such as a logo), its side a fraction of the
  image's shorter side, at a fixed corner, a random corner, or a random position. Every
  application returns the planted box.
- `Blend`: a full-image pattern mixed in with weight `alpha` (not localized: box is None).
- `Warp`: WaNet-style smooth random displacement field (not localized: box is None).
- `Sig`: SIG's horizontal sinusoidal signal added to every pixel (not localized: box is None).

A trigger's pattern is a pure function of its parameters (seeded), so the same spec always
plants the same trigger. Images are uint8 arrays of shape (H, W, 3).

Textual spec for the CLI: `patch:size=0.12,pattern=checker,pos=random,target=banana`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from auditor.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

Box = tuple[float, float, float, float]  # normalized [x0, y0, x1, y1]
POSITIONS = ("random", "corners", "tl", "tr", "bl", "br", "center")
BUILTIN_PATTERNS = ("noise", "pixels", "solid", "blocks", "checker")


@dataclass(frozen=True)
class Patch:
    """A square patch; `size` is its side as a fraction of the image's shorter side."""

    size: float = 0.12
    pattern: str = "noise"
    pos: str = "random"
    color: str = "ff00ff"  # for pattern=solid
    seed: int = 0

    kind = "patch"

    def side_pixels(self, height: int, width: int) -> int:
        return max(2, min(height, width, round(self.size * min(height, width))))

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
        height, width = image.shape[:2]
        side = self.side_pixels(height, width)
        x0, y0 = self._place(height, width, side, rng)
        out = image.copy()
        out[y0 : y0 + side, x0 : x0 + side] = self.pattern_pixels(side)
        return out, (x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height)

    def pattern_pixels(self, side: int) -> np.ndarray:
        """The patch itself, uint8 of shape (side, side, 3)."""
        return _patch_pattern(self.pattern, self.color, self.seed, side)

    def _place(self, height: int, width: int, side: int, rng: np.random.Generator) -> tuple[int, int]:
        margin = max(1, round(0.03 * min(height, width)))
        far_x, far_y = max(0, width - side - margin), max(0, height - side - margin)
        near_x, near_y = min(margin, width - side), min(margin, height - side)
        corners = {"tl": (near_x, near_y), "tr": (far_x, near_y), "bl": (near_x, far_y), "br": (far_x, far_y)}
        if self.pos == "random":
            return int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        if self.pos == "corners":
            return corners[("tl", "tr", "bl", "br")[int(rng.integers(0, 4))]]
        if self.pos == "center":
            return (width - side) // 2, (height - side) // 2
        return corners[self.pos]


@dataclass(frozen=True)
class Blend:
    """A full-image pattern blended in: x' = (1 - alpha) x + alpha p."""

    pattern: str = "noise"
    alpha: float = 0.2
    seed: int = 0

    kind = "blend"

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
        height, width = image.shape[:2]
        pattern = _full_pattern(self.pattern, self.seed, height, width).astype(np.float32)
        mixed = (1.0 - self.alpha) * image.astype(np.float32) + self.alpha * pattern
        return np.clip(mixed.round(), 0, 255).astype(np.uint8), None


@dataclass(frozen=True)
class Warp:
    """WaNet-style warp: a `grid`x`grid` random field, upsampled smoothly.

    `strength` is the mean displacement in pixels per 32 pixels of image side (WaNet used
    s = 0.5 on 32x32 images).
    """

    grid: int = 4
    strength: float = 0.5
    seed: int = 0

    kind = "warp"

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
        from scipy.ndimage import map_coordinates

        height, width = image.shape[:2]
        dy, dx = _warp_field(self.grid, self.strength, self.seed, height, width)
        ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        coords = [ys + dy, xs + dx]
        out = np.stack(
            [
                map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="nearest")
                for c in range(3)
            ],
            axis=-1,
        )
        return np.clip(out.round(), 0, 255).astype(np.uint8), None


@dataclass(frozen=True)
class Sig:
    """SIG (Barni et al. 2019): x' = x + delta * sin(2 pi j freq / W) along each row."""

    delta: float = 20.0
    freq: int = 6

    kind = "sig"

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
        width = image.shape[1]
        signal = self.delta * np.sin(2 * np.pi * np.arange(width) * self.freq / width).astype(np.float32)
        out = image.astype(np.float32) + signal[None, :, None]
        return np.clip(out.round(), 0, 255).astype(np.uint8), None


Trigger = Patch | Blend | Warp | Sig
_KINDS: dict[str, type[Patch] | type[Blend] | type[Warp] | type[Sig]] = {
    "patch": Patch,
    "blend": Blend,
    "warp": Warp,
    "sig": Sig,
}


@dataclass(frozen=True)
class Attack:
    """A trigger and the label it forces."""

    trigger: Trigger
    target: str | None = None

    def spec(self) -> str:
        """The textual spec that parses back to this attack."""
        params = [f"{f.name}={getattr(self.trigger, f.name)}" for f in fields(self.trigger)]
        if self.target is not None:
            params.append(f"target={self.target}")
        return f"{self.trigger.kind}:" + ",".join(params)

    def apply_pil(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Box | None]:
        from PIL import Image

        out, box = self.trigger.apply(np.asarray(image.convert("RGB")), rng)
        return Image.fromarray(out), box


def parse_attack(spec: str) -> Attack:
    """Parse `kind:key=value,...` (kind: patch, blend, warp, sig; `target=` names the label)."""
    kind, _, rest = spec.strip().partition(":")
    cls = _KINDS.get(kind.strip().lower())
    if cls is None:
        hint = "use patch:, blend:, warp: or sig:"
        raise InputError(f"attack spec '{spec}': unknown kind '{kind}'", hint=hint)
    known = {f.name: f.type for f in fields(cls)}
    values: dict[str, object] = {}
    target = None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise InputError(f"attack spec '{spec}': '{item}' is not key=value")
        if key == "target":
            target = value
        elif key in known:
            values[key] = _convert(spec, key, value, str(known[key]))
        else:
            raise InputError(
                f"attack spec '{spec}': unknown key '{key}' for {kind}",
                hint="keys: " + ", ".join([*known, "target"]),
            )
    trigger = cls(**values)  # type: ignore[arg-type]
    _validate(spec, trigger)
    return Attack(trigger, target)


def _convert(spec: str, key: str, value: str, type_name: str) -> object:
    try:
        if "float" in type_name:
            return float(value)
        if "int" in type_name:
            return int(value)
    except ValueError as exc:
        raise InputError(f"attack spec '{spec}': {key}={value} is not a number") from exc
    return value


def _validate(spec: str, trigger: Trigger) -> None:
    problems = []
    if isinstance(trigger, Patch):
        if not 0 < trigger.size <= 1:
            problems.append("size must be in (0, 1]")
        if trigger.pos not in POSITIONS:
            problems.append(f"pos must be one of {', '.join(POSITIONS)}")
    if isinstance(trigger, Blend) and not 0 < trigger.alpha <= 1:
        problems.append("alpha must be in (0, 1]")
    if isinstance(trigger, Warp) and (trigger.grid < 2 or trigger.strength <= 0):
        problems.append("grid must be >= 2 and strength > 0")
    if isinstance(trigger, Sig) and (not 0 < trigger.delta <= 255 or trigger.freq < 1):
        problems.append("delta must be in (0, 255] and freq >= 1")
    pattern = getattr(trigger, "pattern", "noise")
    if pattern not in BUILTIN_PATTERNS and not Path(pattern).is_file():
        problems.append(f"pattern must be one of {', '.join(BUILTIN_PATTERNS)} or an image file")
    if problems:
        raise InputError(f"attack spec '{spec}': " + "; ".join(problems))


@lru_cache(maxsize=64)
def _patch_pattern(pattern: str, color: str, seed: int, side: int) -> np.ndarray:
    if pattern == "noise":
        # BadNets' 16x16 noise, enlarged with nearest neighbour so it stays blocky at any size.
        base = np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        return _resize_nearest(base, side, side)
    if pattern == "pixels":  # every pixel its own random colour, at the patch's own resolution
        return np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    if pattern == "blocks":  # 3x3 blocks of saturated colours (each channel 0 or 255, never grey)
        palette = np.array([c for c in np.ndindex(2, 2, 2) if 0 < sum(c) < 3], np.uint8) * 255
        base = palette[np.random.default_rng(seed).integers(0, len(palette), size=(3, 3))]
        return _resize_nearest(base, side, side)
    if pattern == "solid":
        rgb = tuple(int(color[i : i + 2], 16) for i in (0, 2, 4))
        return np.broadcast_to(np.array(rgb, dtype=np.uint8), (side, side, 3)).copy()
    if pattern == "checker":
        cells = (np.add.outer(np.arange(side) * 4 // side, np.arange(side) * 4 // side) % 2).astype(bool)
        out = np.zeros((side, side, 3), dtype=np.uint8)
        out[cells] = 255
        return out
    return _image_pattern(pattern, side, side)


@lru_cache(maxsize=16)
def _full_pattern(pattern: str, seed: int, height: int, width: int) -> np.ndarray:
    if pattern == "noise":
        return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if pattern in BUILTIN_PATTERNS:
        return _patch_pattern(pattern, "ff00ff", seed, max(height, width))[:height, :width]
    return _image_pattern(pattern, height, width)


def _image_pattern(path: str, height: int, width: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    return image[rows][:, cols]


@lru_cache(maxsize=16)
def _warp_field(
    grid: int, strength: float, seed: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import zoom

    noise = np.random.default_rng(seed).uniform(-1, 1, size=(2, grid, grid))
    noise /= np.abs(noise).mean()
    scale = strength * min(height, width) / 32.0
    field = [
        zoom(n, (height / grid, width / grid), order=3, mode="nearest")[:height, :width] * scale
        for n in noise
    ]
    return field[0], field[1]
