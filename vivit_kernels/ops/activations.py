"""Activations by the names transformers uses in ``hidden_act`` (its own ``ACT2FN``), and the one our kernels
fuse, ``gelu_fast`` (transformers' FastGELUActivation, written exactly as transformers writes it), with its
derivative (the reference of the fused backward)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.activations import ACT2FN

__all__ = ["ACTIVATIONS", "get_activation", "gelu_fast"]


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation: 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_fast_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx gelu_fast(x) (the gelu_fast backward's reference)."""
    t = torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608 * (1.0 + 3.0 * 0.044715 * x * x)


# transformers' own table of activations (hidden_act names -> modules), not a copy of it
ACTIVATIONS = ACT2FN


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation ``name`` (``hidden_act``), a clear error for an unknown one."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]
