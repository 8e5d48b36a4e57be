"""Linear layers with fused epilogues: ``act(x @ W^T + b) + residual``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import get_activation

__all__ = ["linear_ref"]


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: ``F.linear``, then the activation named as in transformers, then ``+ residual``."""
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = get_activation(activation)(y)
    if residual is not None:
        y = y + residual
    return y
