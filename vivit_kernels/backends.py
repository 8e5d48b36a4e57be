"""Backends: a table from a name to the functions a ViViT layer calls.

The model never branches on the backend name; it calls the functions of one :class:`Backend`, whose
signatures are the same for every entry:

- ``patch_embed(pixel_values (B,T,C,H,W), weight, bias, cls_token, pos_embed) -> (B, 1+N, hidden)``
- ``layer_norm(x, weight, bias, eps) -> x.shape``
- ``linear(x, weight, bias, activation=None, residual=None) -> act(x @ W^T + b) + residual``
- ``mlp(x, w1, b1, w2, b2, activation, residual=None) -> fc2(act(fc1(x))) + residual``
- ``attention(qkv, softmax_scale, dropout_p) -> (B, N, H, D)`` for the fused projection output qkv shaped
  (B, N, 3, H, D), i.e. q, k, v = qkv.unbind(2)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops import _triton
from .ops.attention import attention_ref, attention_sdpa, flash_attention_qkv
from .ops.layer_norm import layer_norm, layer_norm_ref
from .ops.linear import linear, linear_ref, mlp, mlp_ref
from .ops.patch_embed import patch_embed, patch_embed_ref

__all__ = ["Backend", "BACKEND_NAMES", "backend_status", "get_backend"]


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable
    linear: Callable
    mlp: Callable
    layer_norm: Callable
    patch_embed: Callable
    # False when ``attention`` cannot apply attention dropout itself (the layer then uses the eager path).
    attention_dropout: bool = True
    # Raises a clear error when the backend cannot run on these inputs here (None: anything goes).
    check_inputs: Optional[Callable[[torch.Tensor], None]] = None


def _eager_attention(qkv, softmax_scale, dropout_p):
    return attention_ref(*qkv.unbind(2), softmax_scale, dropout_p)


def _sdpa_attention(qkv, softmax_scale, dropout_p):
    return attention_sdpa(*qkv.unbind(2), softmax_scale, dropout_p)


def _flash_attention(qkv, softmax_scale, dropout_p):
    # float32 follows torch's matmul precision setting, like the GEMMs (IEEE products unless TF32 is allowed)
    return flash_attention_qkv(qkv, softmax_scale, allow_tf32=_triton.default_allow_tf32())


EAGER = Backend("eager", _eager_attention, linear_ref, mlp_ref, layer_norm_ref, patch_embed_ref)
SDPA = Backend("sdpa", _sdpa_attention, linear_ref, mlp_ref, layer_norm_ref, patch_embed_ref)
# Every hot op through our Triton kernels (no in-kernel attention dropout: the layer uses eager attention
# for those calls).
def _check_triton_inputs(pixel_values: torch.Tensor) -> None:
    _triton.check_launchable(pixel_values, what="attn='triton'")


TRITON = Backend("triton", _flash_attention, linear, mlp, layer_norm, patch_embed, attention_dropout=False,
                 check_inputs=_check_triton_inputs)

BACKEND_NAMES = ("eager", "sdpa", "triton")


def get_backend(name: str) -> Backend:
    if name == "eager":
        return EAGER
    if name == "sdpa":
        return SDPA
    if name == "triton":
        if not _triton.HAS_TRITON:
            warnings.warn(
                f"attn='triton' needs Triton, which failed to import ({_triton.TRITON_IMPORT_ERROR}); "
                "using attn='sdpa' instead",
                stacklevel=3,
            )
            return SDPA
        return TRITON
    raise ValueError(f"unknown attn {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend name: (usable here, why / what it runs)."""
    return {
        "eager": (True, "PyTorch ops, transformers' eager attention"),
        "sdpa": (True, "PyTorch ops, torch.nn.functional.scaled_dot_product_attention"),
        "triton": _triton_status(),
    }


def _triton_status() -> tuple[bool, str]:
    if not _triton.HAS_TRITON:
        return False, f"Triton failed to import: {_triton.TRITON_IMPORT_ERROR}"
    version = f"Triton {_triton.triton.__version__}: flash attention, GEMM + epilogues, MLP, LayerNorm, patch embedding"
    if torch.cuda.is_available():
        return True, f"{version}, on CUDA"
    if _triton.INTERPRET:
        return True, f"{version}, in the Triton interpreter (TRITON_INTERPRET=1; CPU, slow, for testing)"
    return False, f"{version}: need a CUDA device (or TRITON_INTERPRET=1 set before import, for testing)"
