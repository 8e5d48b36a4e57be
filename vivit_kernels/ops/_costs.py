"""Cost model of vivit_kernels' custom ops, for device-independent measurements (vivit_kernels.measure).

For each op: its matmul FLOPs (registered with ``torch.utils.flop_counter`` so ``FlopCounterMode`` counts it
like an ATen matmul), how many kernels one call launches, and the transient device memory it allocates
inside (which a fake-tensor run cannot see: a fake implementation allocates only the outputs). Each entry
follows the op's launcher; tests/test_measure.py checks the launch counts against real (interpreted) runs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

from . import attention, gelu, layer_norm, linear, patch_embed  # noqa: F401 - registers the ops the formulas name

__all__ = ["LAUNCHES", "TRANSIENT_BYTES", "launches", "transient_bytes"]


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def _elt(t: torch.Tensor) -> int:
    return t.element_size()


# -- FLOPs: 2 * M * N * K per matmul; attention 4 B H N^2 D forward, 2.5x that backward ------------------
@register_flop_formula(torch.ops.vivit_kernels.flash_attn_fwd)
def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:  # (B, N, H, D) or (B1, B2, N, H, D)
    return 4 * math.prod(q_shape) * q_shape[-3]


@register_flop_formula(torch.ops.vivit_kernels.flash_attn_bwd)
def _(do_shape, q_shape, *args, **kwargs) -> int:
    return 10 * math.prod(q_shape) * q_shape[-3]


@register_flop_formula(torch.ops.vivit_kernels.flash_attn_qkv_fwd)
def _(qkv_shape, *args, **kwargs) -> int:  # (B, N, 3, H, D) or (B1, B2, N, 3, H, D)
    return 4 * math.prod(qkv_shape) // 3 * qkv_shape[-4]


@register_flop_formula(torch.ops.vivit_kernels.flash_attn_qkv_bwd)
def _(do_shape, qkv_shape, *args, **kwargs) -> int:
    return 10 * math.prod(qkv_shape) // 3 * qkv_shape[-4]


@register_flop_formula(torch.ops.vivit_kernels.linear_fwd)
def _(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * _rows(x_shape) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.linear_bwd)
def _(grad_shape, x_shape, w_shape, has_bias, needs_dx, *args, **kwargs) -> int:
    return (2 if needs_dx else 1) * 2 * _rows(x_shape) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.qkv_fwd)
def _(x_shape, wq_shape, *args, **kwargs) -> int:
    return 3 * 2 * _rows(x_shape) * wq_shape[0] * wq_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.qkv_bwd)
def _(grad_shape, x_shape, wq_shape, wk_shape, wv_shape, has_bias, needs_dx, *args, **kwargs) -> int:
    return (2 if needs_dx else 1) * 3 * 2 * _rows(x_shape) * wq_shape[0] * wq_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.mlp_fwd)
def _(x_shape, w1_shape, b1_shape, w2_shape, *args, **kwargs) -> int:
    return 2 * 2 * _rows(x_shape) * w1_shape[0] * w1_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.mlp_bwd)
def _(grad_shape, x_shape, w1_shape, w2_shape, pre_shape, has_b1, has_b2, needs_dx, *args, **kwargs) -> int:
    return (4 if needs_dx else 3) * 2 * _rows(x_shape) * w1_shape[0] * w1_shape[1]


@register_flop_formula(torch.ops.vivit_kernels.patch_embed_fwd)
def _(x_shape, w_shape, *args, **kwargs) -> int:
    B, T, C, H, W = x_shape
    D, _, t, p, q = w_shape
    return 2 * B * (T // t) * (H // p) * (W // q) * D * C * t * p * q


@register_flop_formula(torch.ops.vivit_kernels.patch_embed_bwd)
def _(grad_shape, x_shape, w_shape, has_bias, needs_dx, *args, **kwargs) -> int:
    B, T, C, H, W = x_shape
    D, _, t, p, q = w_shape
    return (2 if needs_dx else 1) * 2 * B * (T // t) * (H // p) * (W // q) * D * C * t * p * q


# -- kernel launches per call ---------------------------------------------------------------------------
def _flag(index: int, yes: int, no: int) -> Callable:
    return lambda args: yes if args[index] else no


LAUNCHES: dict[str, Callable[[tuple], int] | int] = {
    "vivit_kernels::flash_attn_fwd": 1,
    "vivit_kernels::flash_attn_bwd": 3,  # delta, dK/dV, dQ
    "vivit_kernels::flash_attn_qkv_fwd": 1,
    "vivit_kernels::flash_attn_qkv_bwd": 3,
    "vivit_kernels::linear_fwd": 1,
    # backward entries count the Triton GEMMs (dW, and dX when needed); where a weight gradient splits over K a
    # summing kernel follows, and a bias gradient is one torch reduction
    "vivit_kernels::linear_bwd": _flag(4, 2, 1),  # dW and, when needed, dX
    "vivit_kernels::qkv_fwd": 1,
    "vivit_kernels::qkv_bwd": _flag(6, 4, 3),  # dWq, dWk, dWv (+ their db) and, when needed, dX
    "vivit_kernels::mlp_fwd": 2,  # FC1 + gelu, FC2 + residual
    "vivit_kernels::mlp_bwd": _flag(7, 4, 3),  # dH (+ gelu), dW2, dW1, and dX when needed
    "vivit_kernels::layer_norm_fwd": 1,
    # the kernel, the two partial-sum reductions, and two casts unless the weights are fp32
    "vivit_kernels::layer_norm_bwd": lambda args: 3 if args[2].dtype == torch.float32 else 5,
    "vivit_kernels::patch_embed_fwd": 1,
    # dW (+ a summing kernel where it splits over tubelets), db, the position sum, its [CLS] copy, and dX if needed
    "vivit_kernels::patch_embed_bwd": _flag(4, 5, 4),
    "vivit_kernels::preprocess_video": 1,
    "vivit_kernels::bias_gelu_fast": 1,
    "vivit_kernels::bias_gelu_fast_backward": 1,
}


def launches(op_name: str, args: tuple) -> int:
    entry = LAUNCHES[op_name]
    return entry(args) if callable(entry) else entry


# -- memory allocated and freed inside an op (beyond its outputs) -----------------------------------------
def _mlp_fwd_transient(args) -> int:
    x, w1 = args[0], args[1]
    return _rows(x.shape) * w1.shape[0] * _elt(x)  # the FC1 output, read by FC2


def _mlp_bwd_transient(args) -> int:
    x, w1 = args[1], args[2]
    return 2 * _rows(x.shape) * w1.shape[0] * _elt(x)  # dH and the recomputed gelu_fast(H)


def _flash_bwd_transient(args) -> int:
    do = args[0].shape  # the output gradient, (..., N, H, D)
    return math.prod(do[:-1]) * 4  # delta = rowsum(dO * O), fp32


TRANSIENT_BYTES: dict[str, Callable[[tuple], int]] = {
    "vivit_kernels::mlp_fwd": _mlp_fwd_transient,
    "vivit_kernels::mlp_bwd": _mlp_bwd_transient,
    "vivit_kernels::flash_attn_bwd": _flash_bwd_transient,
    "vivit_kernels::flash_attn_qkv_bwd": _flash_bwd_transient,
}


def transient_bytes(op_name: str, args: tuple) -> int:
    fn = TRANSIENT_BYTES.get(op_name)
    return fn(args) if fn else 0
