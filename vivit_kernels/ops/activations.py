"""Activation functions by the names transformers uses in ``hidden_act`` / ``pooler_act``.

Each formula is written exactly as transformers writes it (same operation order), so the eager model
matches transformers to the last bit in fp32.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "get_activation", "gelu_fast"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation: 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_fast_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx gelu_fast(x) (the gelu_fast backward's reference)."""
    t = torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608 * (1.0 + 3.0 * 0.044715 * x * x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation (the tanh approximation, written with pow)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_fast": gelu_fast,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": _identity,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None
