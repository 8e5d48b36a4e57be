"""Multi-head self-attention on (batch, tokens, heads, head_dim) tensors.

``attention_ref`` is the eager PyTorch reference (transformers' eager attention, op for op);
``attention_sdpa`` routes to ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "attention_sdpa"]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    head_mask: torch.Tensor | None = None,
    return_probs: bool = False,
):
    """softmax(q k^T * scale) v, computed the way transformers' eager ViViT attention computes it.

    q, k, v: (B, N, H, D). head_mask: broadcastable to (B, H, N, N) (e.g. (1, H, 1, 1)); it multiplies the
    attention probabilities after dropout, as transformers 4.x did. Returns the output (B, N, H, D), and with
    ``return_probs`` also the probabilities (B, H, N, N) after dropout and head mask.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * softmax_scale
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if head_mask is not None:
        probs = probs * head_mask
    out = torch.matmul(probs, v).transpose(1, 2)
    return (out, probs) if return_probs else out


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """The same attention through PyTorch's fused ``scaled_dot_product_attention`` (any of its backends)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, scale=softmax_scale
    )
    return out.transpose(1, 2)
