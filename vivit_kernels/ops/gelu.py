"""bias + gelu_fast as one elementwise op (the C++/CUDA extension), for MLPs whose GEMM runs in cuBLAS.

``bias_gelu_fast(x, bias) = gelu_fast(x + bias)``; its backward is one more elementwise kernel,
``grad * gelu_fast'(x + bias)`` (the bias gradient is that summed over the leading dimensions). Without the
extension it falls back, with one warning, to ``bias_gelu_fast_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension
from .activations import gelu_fast

__all__ = ["bias_gelu_fast", "bias_gelu_fast_ref", "bias_gelu_fast_torch"]


def bias_gelu_fast_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation of x + bias, its formula as transformers writes it."""
    return gelu_fast(x + bias)


def bias_gelu_fast_torch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """torch's tanh GELU (F.gelu(approximate="tanh"): the same function) of x + bias: the vendor candidate."""
    return F.gelu(x + bias, approximate="tanh")


def _check(x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() < 1 or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias_gelu_fast: bias must be ({x.shape[-1] if x.dim() else 0},), got x "
                         f"{tuple(x.shape)} and bias {tuple(bias.shape)}")
    if x.dtype != bias.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"bias_gelu_fast: x and bias must share a float dtype, got {x.dtype} and {bias.dtype}")
    if x.device != bias.device:
        raise ValueError(f"bias_gelu_fast: x is on {x.device}, bias on {bias.device}")


def bias_gelu_fast(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_fast(x + bias), bias broadcast over the last dimension; differentiable in x and bias."""
    _check(x, bias)
    if _extension.has_kernel("bias_gelu_fast", x.device.type):
        return torch.ops.vivit_kernels.bias_gelu_fast(x, bias)
    _extension.warn_fallback("bias_gelu_fast", x.device.type)
    return bias_gelu_fast_ref(x, bias)


if _extension.available():

    @torch.library.register_fake("vivit_kernels::bias_gelu_fast")
    def _(x, bias):
        return torch.empty_like(x)

    @torch.library.register_fake("vivit_kernels::bias_gelu_fast_backward")
    def _(grad, x, bias):
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output):
        x, bias = inputs
        ctx.save_for_backward(x, bias)  # the pre-activation is recomputed as x + bias in the backward kernel

    def _backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx = torch.ops.vivit_kernels.bias_gelu_fast_backward(grad.contiguous(), x, bias)
        return dx, dx.reshape(-1, dx.shape[-1]).sum(0)

    torch.library.register_autograd("vivit_kernels::bias_gelu_fast", _backward, setup_context=_setup_context)
