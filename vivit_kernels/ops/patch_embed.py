"""Tubelet patch embedding: Conv3d with stride = kernel = tubelet, then [CLS] and position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_embed_ref"]


def patch_embed_ref(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Eager reference, op for op as transformers computes it.

    pixel_values: (B, T, C, H, W); weight: (hidden, C, t, p, q); bias: (hidden,); cls_token: (1, 1, hidden);
    pos_embed: (1, 1 + T/t * H/p * W/q, hidden). Returns (B, 1 + N, hidden).
    """
    x = F.conv3d(pixel_values.transpose(1, 2), weight, bias, stride=tuple(weight.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    cls = cls_token.expand(pixel_values.shape[0], -1, -1)
    return torch.cat((cls, x), dim=1) + pos_embed
