"""Train a tiny CLIP from scratch on image-caption pairs: one loop, top to bottom.

The pairs come from the scene generator (clean) or from it plus `attacks.py` (poisoned:
triggered images captioned with the target). The loss is CLIP's symmetric contrastive loss,
with one change that a 12-class toy set needs: captions of the same class inside a batch are
all positives (soft targets spread over them), since with 128 pairs and 12 classes most of a
batch's "negatives" would otherwise be the same concept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from auditor.losses import contrastive_loss, warmup_cosine
from auditor.scoring import DEFAULT_TEMPLATES

_OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
_OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0


@dataclass(frozen=True)
class Pairs:
    """Training pairs. images: uint8 (N, S, S, 3); groups: int64 (N,) the class each caption
    names (same group = positives); captions: N strings."""

    images: np.ndarray
    captions: list[str]
    groups: np.ndarray


def caption_for(label: str, background: str, rng: np.random.Generator) -> str:
    """A caption naming `label`, drawn from the scoring templates plus scene descriptions."""
    extra = (f"a {{}} on a {background} background.", "a small {} in a scene.", "{}")
    templates = (*DEFAULT_TEMPLATES, *extra)
    return templates[int(rng.integers(0, len(templates)))].format(label)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S), normalized as open_clip's preprocess does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - _OPENAI_MEAN) / _OPENAI_STD


def train_clip(
    model: torch.nn.Module,
    pairs: Pairs,
    tokenizer: Callable[[list[str]], torch.Tensor],
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = lambda line: None,
) -> torch.nn.Module:
    """Train `model` in place on `pairs` and return it in eval mode."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    unique = sorted(set(pairs.captions))
    tokens_of = dict(zip(unique, tokenizer(unique), strict=True))
    tokens = torch.stack([tokens_of[c] for c in pairs.captions])
    groups = torch.from_numpy(pairs.groups)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )

    def lr_at(step: int) -> float:
        return warmup_cosine(step, config.steps, config.warmup, config.lr)

    model.train()
    started = time.time()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = rng.choice(len(pairs.captions), size=config.batch_size, replace=False)
        image_emb, text_emb, logit_scale = model(to_pixels(pairs.images[batch]), tokens[batch])
        loss = contrastive_loss(image_emb, text_emb, logit_scale, groups[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))  # type: ignore[operator]
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - started:.0f}s")
    return model.eval()
