"""Zero-shot scoring over any engine runner.

Class prompts go through the text runner once (prompt ensemble: mean of the normalized
embeddings over templates, renormalized); images go through the image runner in batches.
Per image the result keeps its normalized embedding, top-k labels with probabilities, and the
margin between the top two probabilities.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from auditor.data import Batch
    from auditor.models import LoadedModel
    from engines.runners import Runner

# A short ensemble in the style of CLIP's ImageNet prompts; the zoo's captions share them.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "an image of a {}.",
)


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows of a float array of shape (N, D)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def embed_classes(
    text_runner: Runner,
    tokenizer: object,
    classes: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """Class weights: float32 of shape (C, D), rows L2-normalized."""
    prompts = [t.format(c) for c in classes for t in templates]
    tokens = tokenizer(prompts).numpy()  # type: ignore[operator]
    emb = normalize(text_runner.infer({"tokens": tokens})["embeddings"])
    per_class = emb.reshape(len(classes), len(templates), -1).mean(axis=1)
    return normalize(per_class)


@dataclass(frozen=True)
class Scores:
    """Zero-shot results for n scored images, aligned with `indices` (into the data set).

    embeddings: float32 (n, D) normalized; topk: int64 (n, k) class indices, best first;
    probs: float32 (n, k) softmax probabilities of those classes; margin: float32 (n,)
    probability of the top class minus the second.
    """

    indices: np.ndarray
    embeddings: np.ndarray
    topk: np.ndarray
    probs: np.ndarray

    @property
    def top1(self) -> np.ndarray:
        return self.topk[:, 0]

    @property
    def margin(self) -> np.ndarray:
        return self.probs[:, 0] - self.probs[:, 1]


class ZeroShotScorer:
    """Scores images against fixed class weights through an image runner."""

    def __init__(self, image_runner: Runner, class_weights: np.ndarray, logit_scale: float, k: int = 5):
        self.image_runner = image_runner
        self.class_weights = class_weights
        self.logit_scale = logit_scale
        self.k = min(k, class_weights.shape[0])

    def logits(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """pixels float32 (B, 3, S, S) -> (normalized embeddings (B, D), logits (B, C))."""
        emb = normalize(self.image_runner.infer({"pixels": pixels})["embeddings"])
        return emb, self.logit_scale * emb @ self.class_weights.T

    def probabilities(
        self,
        images: Sequence[np.ndarray],
        preprocess: Callable[[Image.Image], torch.Tensor],
        batch_size: int = 128,
    ) -> np.ndarray:
        """uint8 RGB images of any size -> float32 class probabilities of shape (n, C)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = batch_pixels(chunk, preprocess)
            out.append(_softmax(self.logits(pixels)[1]))
        return np.concatenate(out) if out else np.zeros((0, self.class_weights.shape[0]), np.float32)

    def score_batches(self, batches: Iterable[Batch]) -> Scores:
        parts: list[tuple[np.ndarray, ...]] = []
        for batch in batches:
            emb, logits = self.logits(batch.pixels.numpy())
            probs = _softmax(logits)
            top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
            parts.append((np.asarray(batch.indices), emb, top, np.take_along_axis(probs, top, axis=1)))
        if not parts:
            dim = self.class_weights.shape[1]
            return Scores(
                np.zeros(0, np.int64),
                np.zeros((0, dim), np.float32),
                np.zeros((0, self.k), np.int64),
                np.zeros((0, self.k), np.float32),
            )
        return Scores(*(np.concatenate(cols) for cols in zip(*parts, strict=True)))


def batch_pixels(
    images: Sequence[np.ndarray], preprocess: Callable[[Image.Image], torch.Tensor]
) -> np.ndarray:
    """uint8 RGB images (H, W, 3) of any size -> float32 (n, 3, S, S), exactly as `preprocess`.

    Where `preprocess` ends in ToTensor + Normalize (open_clip's transforms do), only its PIL
    steps run per image, and the conversion to normalized floats is one table lookup per channel
    for the whole batch (`_TensorTail`), bit for bit what torchvision computes. The oracle stage
    preprocesses every crop and ablation it scores: torchvision's per-image tensor ops there
    took ~40 % of the scan's main thread, where the tensor threads fought the segmentation
    thread for the cores.
    """
    import torch
    from PIL import Image

    tail = _TensorTail.of(preprocess)
    pixels = tail.batch(images) if tail is not None else None
    if pixels is None:
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images]).numpy()
    return pixels


class _TensorTail:
    """A preprocess split in two: its PIL steps, and ToTensor + Normalize as a (3, 256) table.

    torchvision computes (v / 255 - mean) / std in float32 for each 8-bit level v; the table
    holds those 256 values per channel, computed with the same float32 operations, so a lookup
    equals it exactly. `of` checks that on one image before a preprocess is trusted to it.
    """

    _known: weakref.WeakKeyDictionary[object, _TensorTail | None] = weakref.WeakKeyDictionary()

    def __init__(
        self,
        pil_steps: Sequence[Callable[[Image.Image], Image.Image]],
        mean: Sequence[float],
        std: Sequence[float],
    ):
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        mean32 = np.asarray(mean, np.float32)[:, None]
        std32 = np.asarray(std, np.float32)[:, None]
        self.pil_steps = pil_steps
        self.table = ((levels[None, :] - mean32) / std32).astype(np.float32)  # (3, 256)

    @classmethod
    def of(cls, preprocess: Callable[[Image.Image], torch.Tensor]) -> _TensorTail | None:
        """The split of `preprocess`, or None where it does not end in ToTensor + Normalize of RGB,
        or where the split disagrees with it on a test image."""
        try:
            return cls._known[preprocess]
        except (KeyError, TypeError):
            pass
        tail = cls._split(preprocess)
        with contextlib.suppress(TypeError):  # not weakly referable: split again next time
            cls._known[preprocess] = tail
        return tail

    @classmethod
    def _split(cls, preprocess: Callable[[Image.Image], torch.Tensor]) -> _TensorTail | None:
        import torch
        from PIL import Image
        from torchvision.transforms import Normalize, ToTensor

        steps = list(getattr(preprocess, "transforms", ()))
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            return None
        normalize = steps[-1]
        if len(normalize.mean) != 3 or len(normalize.std) != 3:
            return None
        tail = cls(steps[:-2], normalize.mean, normalize.std)
        probe = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
        fast = tail.batch([probe])
        exact = preprocess(Image.fromarray(probe))
        if fast is None or not isinstance(exact, torch.Tensor) or not np.array_equal(fast[0], exact.numpy()):
            return None
        return tail

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray | None:
        """float32 (n, 3, S, S) of uint8 RGB images, or None if a PIL step gives no 8-bit RGB
        picture or the pictures differ in size."""
        from PIL import Image

        arrays = []
        for image in images:
            picture = Image.fromarray(image)
            for step in self.pil_steps:
                picture = step(picture)
            if not isinstance(picture, Image.Image) or picture.mode != "RGB":
                return None
            arrays.append(np.asarray(picture))
        if not arrays or any(a.shape != arrays[0].shape for a in arrays):
            return None
        stacked = np.stack(arrays)  # (n, S, S, 3) uint8
        out = np.empty((len(arrays), 3, *stacked.shape[1:3]), np.float32)
        for channel in range(3):
            np.take(self.table[channel], stacked[..., channel], out=out[:, channel])
        return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def torch_runners(loaded: LoadedModel, device: str = "cpu") -> tuple[Runner, Runner]:
    """PyTorch runners for the image tower ("pixels") and the text tower ("tokens")."""
    from engines.runners import TorchRunner

    model = loaded.model.to(device)
    image = TorchRunner(model.encode_image, input_name="pixels", device=device)  # type: ignore[arg-type]
    text = TorchRunner(model.encode_text, input_name="tokens", device=device)  # type: ignore[arg-type]
    return image, text


def torch_class_weights(loaded: LoadedModel, classes: Sequence[str]) -> np.ndarray:
    """`embed_classes` through `loaded`'s own text tower in PyTorch: float32 (C, D), rows
    L2-normalized (the class weights a gradient search differentiates against)."""
    _, text_runner = torch_runners(loaded)
    with text_runner:
        return embed_classes(text_runner, loaded.tokenizer, classes)


def make_scorer(
    loaded: LoadedModel, classes: Sequence[str], image_runner: Runner, text_runner: Runner
) -> ZeroShotScorer:
    """Embed the class prompts once and return a scorer over `image_runner` (runners active)."""
    weights = embed_classes(text_runner, loaded.tokenizer, classes)
    return ZeroShotScorer(image_runner, weights, loaded.logit_scale)
