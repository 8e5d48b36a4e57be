"""Use vivit_kernels' Triton flash attention inside transformers' own models.

    import vivit_kernels.integrations as vki
    vki.register_transformers_attention()              # registers "vivit_kernels"
    hf_model.set_attn_implementation("vivit_kernels")

Only the attention changes; the rest of the transformers model runs as before. Calls with an attention mask
or attention dropout use transformers' SDPA attention instead, with one warning.
"""

from __future__ import annotations

import warnings

import torch

from .ops.attention import flash_attention

__all__ = ["register_transformers_attention", "transformers_attention_forward"]

_warned = False


def transformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v (B, H, N, D) -> ((B, N, H, D), no weights)."""
    global _warned
    if attention_mask is not None or dropout > 0.0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if not _warned:
            _warned = True
            warnings.warn(
                "vivit_kernels attention has no attention mask or dropout; using transformers' SDPA for those calls",
                stacklevel=2,
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling)
    return out, None


def register_transformers_attention(name: str = "vivit_kernels") -> str:
    """Register the Triton attention with transformers' ``AttentionInterface`` under ``name``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, transformers_attention_forward)
    return name
