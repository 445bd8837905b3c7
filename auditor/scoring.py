"""Zero-shot scoring over any engine runner.

Class prompts go through the text runner once (prompt ensemble: mean of the normalized
embeddings over templates, renormalized); images go through the image runner in batches.
Per image the result keeps its normalized embedding, top-k labels with probabilities, and the
margin between the top two probabilities.
"""

from __future__ import annotations

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
        import torch
        from PIL import Image

        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([preprocess(Image.fromarray(image)) for image in chunk]).numpy()
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


def make_scorer(
    loaded: LoadedModel, classes: Sequence[str], image_runner: Runner, text_runner: Runner
) -> ZeroShotScorer:
    """Embed the class prompts once and return a scorer over `image_runner` (runners active)."""
    weights = embed_classes(text_runner, loaded.tokenizer, classes)
    return ZeroShotScorer(image_runner, weights, loaded.logit_scale)
