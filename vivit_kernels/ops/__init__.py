"""Functional API of vivit_kernels' ops, each with its eager PyTorch reference beside it."""

from .activations import gelu_fast, get_activation
from .attention import attention_ref, attention_sdpa
from .layer_norm import layer_norm_ref
from .linear import linear_ref
from .patch_embed import patch_embed_ref

__all__ = [
    "attention_ref",
    "attention_sdpa",
    "gelu_fast",
    "get_activation",
    "layer_norm_ref",
    "linear_ref",
    "patch_embed_ref",
]
