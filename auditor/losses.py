"""Losses and schedule of CLIP training and repair: contrastive, CleanCLIP's in-modal term, LR.

Both take L2-normalized embeddings, float32 of shape (B, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IN_MODAL_TEMPERATURE = 0.1  # SimCLR-style temperature of the in-modal term


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss where pairs of the same group (int64 (B,)) are all positives.

    With few concepts per batch (12 zoo classes, a compact set of a handful of labels) most
    "negatives" would otherwise be the same concept; soft targets spread over them instead.
    """
    logits = logit_scale * image_emb @ text_emb.T
    positives = (groups[:, None] == groups[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def in_modal_loss(view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
    """NT-Xent between two views of the same B items (row i of each is the positive pair).

    CleanCLIP adds this per modality so that each embedding is learnt from its own content and
    not only from its association with a caption, which weakens spurious trigger associations.
    """
    both = torch.cat([view_a, view_b])
    logits = both @ both.T / IN_MODAL_TEMPERATURE
    logits.fill_diagonal_(float("-inf"))
    n = view_a.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(logits.device)
    return F.cross_entropy(logits, partner)


def warmup_cosine(step: int, steps: int, warmup: int, peak: float) -> float:
    """Learning rate at `step`: linear warm-up to `peak`, then cosine decay to zero at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
