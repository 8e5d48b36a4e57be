"""Linear layers and the transformer MLP with fused epilogues, forward and backward in Triton (the kernels are
the shared GEMM engine in ``ops/_gemm.py``).

- ``linear(x, W, b, activation, residual)``: the attention output projection (+ bias + residual) and other
  single linears. Backward: dX = dY @ W and dW = dY^T @ X (two GEMMs), db a column sum.
- ``qkv_projection(x, Wq, bq, Wk, bk, Wv, bv, adapters=())``: the three attention projections in one GEMM reading
  the three weights in place, plus PEFT LoRA adapters' low-rank updates (two small GEMMs each; their backward
  only the GEMMs the wanted gradients need).
- ``mlp(x, W1, b1, W2, b2, residual)``: FC1 (+ bias -> gelu_fast) and FC2 (+ bias + residual), two launches.
  Backward: dY @ W2 ends in the gelu_fast derivative (dH = (dY @ W2) * gelu_fast'(H)) and also recomputes
  gelu_fast(H) for dW2 = dY^T @ gelu_fast(H); then dX = dH @ W1 and dW1 = dH^T @ X. So the activation
  derivative costs no pass of its own and the FC1 output is not kept for the backward.

Saved for backward: linear keeps x (for dW) and W; the MLP keeps x, W1, W2 and the FC1 pre-activation H
(M x intermediate), from which both gelu_fast'(H) and gelu_fast(H) are recomputed. Residual additions keep
nothing (their gradient is the output gradient itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._gemm import (
    KERNEL_ACTIVATIONS,
    LoraOperands,
    _as_2d,
    _bias_grad,
    _linear_grads,
    _weight_grad,
    fused_lora,
    gemm,
    lora_grads,
    lora_input_products,
    lora_rank_pad,
)
from ._triton import SUPPORTED_DTYPES, check_launchable, resolve_tf32, saved_outputs_only, unit_last
from .activations import gelu_fast, gelu_fast_grad, get_activation
from .formulas import register_flop_formulas

__all__ = ["linear", "mlp", "qkv_projection", "linear_ref", "mlp_ref", "qkv_projection_ref", "gelu_fast_backward_ref",
           "lora_ref", "qkv_concat", "linear_addmm", "linear_matmul_ext", "mlp_with"]


# ------------------------------------------------------------------------------------------------
# linear: act(x @ W^T + b) + residual
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("vivit_kernels::linear_fwd", mutates_args=())
def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    save_pre: bool,
    allow_tf32: bool,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_scales: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(act(x @ W^T + b + s (x A^T) B^T) + residual, the pre-activation if save_pre else an empty tensor, the
    (M, 1, rank) s x A^T for B's gradient where there is an adapter else an empty tensor). At most one LoRA adapter
    (``fused_lora``), inside the GEMM: the product x A^T in its K loop, its product with B^T in the epilogue before
    the bias, the activation and the residual."""
    x2 = _as_2d(x)
    # outputs allocated in their final shape (not views of 2-D buffers: a module returning a view trips FSDP2)
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if save_pre else out.new_empty(0)
    saved = _lora_saved(x2, lora_a, 1) if lora_a else x.new_empty(0)
    gemm(x2, weight.t(), _as_2d(out), bias=bias, activation=None if activation == "none" else activation,
         residual=_as_2d(residual) if residual is not None else None, pre=_as_2d(pre) if save_pre else None,
         allow_tf32=allow_tf32,
         lora=LoraOperands(1, tuple(lora_a), tuple(lora_b), tuple(lora_scales), saved) if lora_a else None)
    return out, pre, saved


@linear_fwd.register_fake
def _(x, weight, bias, residual, activation, save_pre, allow_tf32, lora_a, lora_b, lora_scales):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x and weight disagree on in_features")
    shape = (*x.shape[:-1], weight.shape[0])
    saved = _lora_saved(x.new_empty((math.prod(x.shape[:-1]), 1)), lora_a, 1) if lora_a else x.new_empty(0)
    return x.new_empty(shape), (x.new_empty(shape) if save_pre else x.new_empty(0)), saved


@torch.library.custom_op("vivit_kernels::linear_bwd", mutates_args=())
def linear_bwd(
    grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, x_shape: list[int], needs_dx: bool,
    needs_dw: bool, needs_db: bool, allow_tf32: bool, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
    lora_scales: list[float], lora_saved: torch.Tensor | None, lora_needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dx, dW, db, the adapter's [dA, dB]) of x @ W^T + b + s (x A^T) B^T from the gradient of that output, each
    empty where not needed (``x`` is given for dW and dA, ``weight`` for dx, ``lora_saved`` (the forward's s x A^T)
    for dB). The adapter: dx gets (s dY B) A inside its GEMM, which stores s dY B (or computes it alone where dx is
    not wanted); dA and dB in one launch (``lora_grads``)."""
    g2 = _as_2d(grad)
    if not lora_a:
        dx, dw, db = _linear_grads(g2, x, weight, needs_dx, needs_dw, needs_db, allow_tf32, x_shape)
        return dx, dw, db, []
    needs_a, needs_b = lora_needs
    lora = (tuple(lora_a), tuple(lora_b), tuple(lora_scales))
    d_u = _lora_saved(g2, lora_a, 1) if needs_a else None
    dx = g2.new_empty(0)
    if needs_dx:
        dx2 = torch.empty((g2.shape[0], weight.shape[1]), dtype=g2.dtype, device=g2.device)
        gemm(g2, weight, dx2, allow_tf32=allow_tf32, lora=LoraOperands(2, *lora, d_u))
        dx = dx2.view(x_shape)
    elif needs_a:
        lora_input_products(g2, LoraOperands(2, *lora, d_u, only=True), g2.shape[1])
    _, dw, db = _linear_grads(g2, x, None, False, needs_dw, needs_db, allow_tf32, x_shape)
    (d_a,), (d_b,) = lora_grads(_as_2d(x) if needs_a else None, g2, d_u, lora_saved if needs_b else None,
                                lora[0], lora[1], (needs_a,), (needs_b,))
    return dx, dw, db, [t if t is not None else g2.new_empty(0) for t in (d_a, d_b)]


@linear_bwd.register_fake
def _(grad, x, weight, x_shape, needs_dx, needs_dw, needs_db, allow_tf32, lora_a, lora_b, lora_scales, lora_saved,
      lora_needs):
    n, k = grad.shape[-1], x_shape[-1]
    lora = [t.new_empty(t.shape if need else (0,)) for t, need in zip((*lora_a, *lora_b), lora_needs, strict=True)] \
        if lora_a else []
    return (grad.new_empty(x_shape if needs_dx else (0,)), grad.new_empty((n, k) if needs_dw else (0,)),
            grad.new_empty(n if needs_db else 0), lora)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, residual, activation, save_pre, allow_tf32, lora_a, lora_b, lora_scales = inputs
    ctx.needs = ctx.needs_input_grad[:4]  # x, weight, bias, residual
    needs_dx, needs_dw = ctx.needs[0], ctx.needs[1]
    ctx.lora_needs = [t.requires_grad for t in (*lora_a, *lora_b)]
    ctx.lora_scales, ctx.n_lora = list(lora_scales), len(lora_a)
    needs_a, needs_b = ctx.lora_needs or (False, False)
    # Saved only for a gradient someone wants: x for dW or the adapter's dA, the weight for dx, with gelu_fast the
    # pre-activation (for its derivative, whichever gradient flows through it); the adapter (parameters: no copy)
    # and the forward's s x A^T for dB
    ctx.save_for_backward(x if needs_dw or needs_a else None, weight if needs_dx else None, output[1], *lora_a,
                          *lora_b, output[2] if needs_b else None)
    saved_outputs_only(ctx, output[1], output[2])
    ctx.x_shape = tuple(x.shape)
    ctx.activation, ctx.allow_tf32 = activation, allow_tf32


def _linear_backward(ctx, grad_out, grad_pre, grad_saved):
    n_lora = ctx.n_lora
    no_lora = ([None] * n_lora, [None] * n_lora, None) if n_lora else ([], [], [])
    if grad_out is None:
        return (None,) * 7 + no_lora
    x, weight, pre, *rest = ctx.saved_tensors
    lora_a, lora_b, lora_saved = list(rest[:n_lora]), list(rest[n_lora:2 * n_lora]), rest[-1]
    needs_dx, needs_dw, needs_db, needs_dres = ctx.needs
    grad = unit_last(grad_out)
    if ctx.activation == "gelu_fast" and (needs_dx or needs_dw or needs_db or any(ctx.lora_needs)):
        # A standalone linear has no neighbouring GEMM to fuse this into (the MLP op fuses it into the
        # epilogue of the next layer's backward GEMM): one elementwise pass.
        if pre.numel() == 0:
            raise RuntimeError("linear: backward through gelu_fast needs the forward run with save_pre=True")
        grad = gelu_fast_backward_ref(grad, pre)
    dx = dw = db = None
    d_lora = [None] * (2 * n_lora)
    if needs_dx or needs_dw or needs_db or any(ctx.lora_needs):
        dx, dw, db, d_lora = linear_bwd(grad, x, weight, list(ctx.x_shape), needs_dx, needs_dw, needs_db,
                                        ctx.allow_tf32, lora_a, lora_b, ctx.lora_scales,
                                        lora_saved if n_lora else None, ctx.lora_needs)
        d_lora = [g if need else None for g, need in zip(d_lora, ctx.lora_needs, strict=True)]
    lora_grads_ = (d_lora[:n_lora], d_lora[n_lora:], None) if n_lora else ([], [], [])
    return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
            grad_out if needs_dres else None, None, None, None, *lora_grads_)


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)
register_flop_formulas(linear_fwd, linear_bwd)


# ------------------------------------------------------------------------------------------------
# qkv: [x @ Wq^T + bq, x @ Wk^T + bk, x @ Wv^T + bv], one GEMM reading the three weights in place, plus any
# LoRA adapters' low-rank updates (PEFT's ``scaling * (x @ A^T) @ B^T``) accumulated into their third
# ------------------------------------------------------------------------------------------------
def _per_slot(groups: int, slots, a, b, scales) -> tuple[tuple, tuple, tuple]:
    """The adapters' (A, B, scale) by group of the GEMM (None / 0 where a group has none)."""
    per = [(None, None, 0.0)] * groups
    for slot, a_, b_, scale in zip(slots, a, b, scales, strict=True):
        per[slot] = (a_, b_, scale)
    return tuple(zip(*per, strict=True))


def _lora_saved(x2: torch.Tensor, lora_a, groups: int) -> torch.Tensor:
    """The (M, groups, padded rank) buffer of the adapters' rank-wide products one GEMM stores for the backward."""
    return torch.empty((x2.shape[0], groups, lora_rank_pad(lora_a[0].shape[0])), dtype=x2.dtype, device=x2.device)


@torch.library.custom_op("vivit_kernels::qkv_fwd", mutates_args=())
def qkv_fwd(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    bv: torch.Tensor | None,
    allow_tf32: bool,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_slots: list[int],
    lora_scales: list[float],
    lora_x: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """((..., 3 * out_features): the three projections side by side, i.e. (..., 3, heads, head_dim) viewed; the
    adapters' down projections x @ A^T (M, rank), kept for B's gradient; each adapter's A and B in x's dtype where
    they are float32 (else an empty tensor), kept for the backward). Adapter i adds ``lora_scales[i] * (x @
    lora_a[i]^T) @ lora_b[i]^T`` to third ``lora_slots[i]`` (0 q, 1 k, 2 v): two small GEMMs each, the second
    accumulating into the GEMM's output in place (and a cast of each float32 weight). ``lora_x[i]``: the adapter's
    own input where it is not x (x after the adapter's dropout), else an empty tensor."""
    x2 = _as_2d(x)
    n = wq.shape[0]
    out = torch.empty((*x.shape[:-1], 3 * n), dtype=x.dtype, device=x.device)
    out2 = _as_2d(out)
    if fused_lora(lora_a, lora_b, lora_slots, lora_x):  # the adapters inside the GEMM: one launch in all
        saved = _lora_saved(x2, lora_a, 3)
        gemm(x2, wq.t(), out2, bias=bq, allow_tf32=allow_tf32, groups="n", more_b=(wk.t(), wv.t()),
             more_bias=(bk, bv), lora=LoraOperands(1, *_per_slot(3, lora_slots, lora_a, lora_b, lora_scales), saved))
        return out, [saved], []
    gemm(x2, wq.t(), out2, bias=bq, allow_tf32=allow_tf32, groups="n", more_b=(wk.t(), wv.t()),
         more_bias=(bk, bv))
    downs, casts = [], []
    for a, b, slot, scale, own in zip(lora_a, lora_b, lora_slots, lora_scales, lora_x, strict=True):
        a_low, b_low = a.to(x.dtype), b.to(x.dtype)  # the weights themselves when already in x's dtype
        down = torch.mm(_as_2d(own) if own.numel() else x2, a_low.t())
        out2[:, slot * n:(slot + 1) * n].addmm_(down, b_low.t(), alpha=scale)
        downs.append(down)
        casts += [low if low is not w else x.new_empty(0) for low, w in ((a_low, a), (b_low, b))]  # (no alias)
    return out, downs, casts


@qkv_fwd.register_fake
def _(x, wq, bq, wk, bk, wv, bv, allow_tf32, lora_a, lora_b, lora_slots, lora_scales, lora_x):
    torch._check(x.shape[-1] == wq.shape[1], lambda: "x and wq disagree on in_features")
    rows = math.prod(x.shape[:-1])
    if fused_lora(lora_a, lora_b, lora_slots, lora_x):
        return x.new_empty((*x.shape[:-1], 3 * wq.shape[0])), [_lora_saved(x.new_empty((rows, 1)), lora_a, 3)], []
    casts = [x.new_empty(t.shape if t.dtype != x.dtype else (0,)) for pair in zip(lora_a, lora_b, strict=True)
             for t in pair]
    return (x.new_empty((*x.shape[:-1], 3 * wq.shape[0])), [x.new_empty((rows, a.shape[0])) for a in lora_a],
            casts)


_OUT_DTYPE_MM = [True]  # whether torch.mm / addmm take out_dtype on CUDA here (torch >= 2.8 with cuBLAS)


def _product_in(dtype: torch.dtype, mat1: torch.Tensor, mat2: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * mat1 @ mat2`` written in ``dtype`` (an adapter's float32 gradient from bf16 / fp16 operands): one
    cuBLAS GEMM with out_dtype on CUDA; a GEMM and a cast elsewhere (torch has no CPU kernel for out_dtype)."""
    if dtype != mat1.dtype and mat1.is_cuda and _OUT_DTYPE_MM[0]:
        try:  # (addmm's input at beta=0 is not read, so alpha costs no pass)
            return torch.addmm(mat1.new_empty((), dtype=dtype), mat1, mat2, beta=0, alpha=alpha, out_dtype=dtype)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):  # this torch refuses out_dtype here: not again
            _OUT_DTYPE_MM[0] = False
    out = torch.addmm(mat1.new_empty(()), mat1, mat2, beta=0, alpha=alpha) if alpha != 1.0 else torch.mm(mat1, mat2)
    return out if out.dtype == dtype else out.to(dtype)


@torch.library.custom_op("vivit_kernels::qkv_bwd", mutates_args=())
def qkv_bwd(
    grad: torch.Tensor, x: torch.Tensor | None, wq: torch.Tensor | None, wk: torch.Tensor | None,
    wv: torch.Tensor | None, x_shape: list[int], needs: list[bool], allow_tf32: bool,
    lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], lora_slots: list[int], lora_scales: list[float],
    downs: list[torch.Tensor], lora_needs: list[bool], lora_wide: list[bool], lora_x: list[torch.Tensor],
    lora_x_needs: list[bool], lora_fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(dx, dWq, dbq, dWk, dbk, dWv, dbv, the adapters' dA, their dB, the gradients of their own inputs), each empty
    where ``needs`` (x, wq, bq, wk, bk, wv, bv), ``lora_needs`` (A, B of each adapter in turn) or ``lora_x_needs``
    (each adapter's input: x itself, or its own ``lora_x``) says it is not wanted: dx = dq Wq + dk Wk + dv Wv in
    one GEMM (three K segments; the weights are given for it), then each weight gradient (x is given for them) and
    bias gradient that is wanted. Per adapter (its A and B in the gradient's dtype), with g its third of the
    gradient, s its scale and u its input: dU = s g B (wanted for u's gradient and dA), du = dU A (accumulated
    into dx when u is x), dA = dU^T u, dB = s g^T (u A^T): one small GEMM each, no other pass; dA and dB in float32
    where ``lora_wide`` says the adapter's weights are. ``lora_fused`` (the forward ran them inside its GEMM): the
    adapters' weights as they are, ``downs`` the forward's one (M, 3, rank) buffer; dU A is added inside the dx GEMM,
    which also stores dU, and every dA and dB comes from one grouped launch (``lora_grads``)."""
    if lora_fused:
        return _qkv_bwd_fused(grad, x, wq, wk, wv, x_shape, needs, allow_tf32, lora_a, lora_b, lora_slots,
                              lora_scales, downs[0], lora_needs)
    g2 = _as_2d(grad)
    n = g2.shape[1] // 3
    dx2 = None
    dx = g2.new_empty(0)  # every output its own tensor (outputs of a custom op may not alias)
    if needs[0]:
        dx2 = torch.empty((g2.shape[0], wq.shape[1]), dtype=g2.dtype, device=g2.device)
        gemm(g2, wq, dx2, allow_tf32=allow_tf32, groups="k", more_b=(wk, wv))
        dx = dx2.view(x_shape)
    grads = []
    for i in range(3):
        g = g2[:, i * n:(i + 1) * n]
        grads += [_weight_grad(g, _as_2d(x), allow_tf32) if needs[1 + 2 * i] else g2.new_empty(0),
                  _bias_grad(g, g2.dtype) if needs[2 + 2 * i] else g2.new_empty(0)]
    d_a, d_b, d_own = [], [], []
    unused = g2.new_empty(())  # addmm's input at beta=0: not read
    for i, (a, b, slot, scale, down, own) in enumerate(zip(lora_a, lora_b, lora_slots, lora_scales, downs, lora_x,
                                                          strict=True)):
        g, needs_a, needs_b = g2[:, slot * n:(slot + 1) * n], lora_needs[2 * i], lora_needs[2 * i + 1]
        needs_u, separate = lora_x_needs[i], own.numel() > 0
        wide = torch.float32 if lora_wide[i] else g2.dtype
        d_u = g2.new_empty(0)
        if needs_u or needs_a:
            d_down = torch.addmm(unused, g, b, beta=0, alpha=scale)
            if needs_u and separate:
                d_u = torch.mm(d_down, a).view(own.shape)
            elif needs_u:
                dx2.addmm_(d_down, a)
            d_a.append(_product_in(wide, d_down.t(), _as_2d(own if separate else x), 1.0) if needs_a
                       else g2.new_empty(0))
        else:
            d_a.append(g2.new_empty(0))
        d_b.append(_product_in(wide, g.t(), down, scale) if needs_b else g2.new_empty(0))
        d_own.append(d_u)
    return (dx, *grads, d_a, d_b, d_own)


def _qkv_bwd_fused(grad, x, wq, wk, wv, x_shape, needs, allow_tf32, lora_a, lora_b, lora_slots, lora_scales, saved,
                   lora_needs):
    g2 = _as_2d(grad)
    n = g2.shape[1] // 3
    a3, b3, s3 = _per_slot(3, lora_slots, lora_a, lora_b, lora_scales)
    needs_a = [False] * 3
    needs_b = [False] * 3
    for i, slot in enumerate(lora_slots):
        needs_a[slot], needs_b[slot] = lora_needs[2 * i], lora_needs[2 * i + 1]
    dx = g2.new_empty(0)  # every output its own tensor (outputs of a custom op may not alias)
    d_u = _lora_saved(g2, lora_a, 3) if any(needs_a) else None
    if needs[0]:  # dx = dY W + (s dY_g B_g) A_g, storing s dY_g B_g for dA
        dx2 = torch.empty((g2.shape[0], wq.shape[1]), dtype=g2.dtype, device=g2.device)
        gemm(g2, wq, dx2, allow_tf32=allow_tf32, groups="k", more_b=(wk, wv),
             lora=LoraOperands(2, a3, b3, s3, d_u))
        dx = dx2.view(x_shape)
    elif d_u is not None:  # dx not wanted (the first layer): the products alone
        lora_input_products(g2, LoraOperands(2, a3, b3, s3, d_u, only=True), n)
    grads = []
    for i in range(3):
        g = g2[:, i * n:(i + 1) * n]
        grads += [_weight_grad(g, _as_2d(x), allow_tf32) if needs[1 + 2 * i] else g2.new_empty(0),
                  _bias_grad(g, g2.dtype) if needs[2 + 2 * i] else g2.new_empty(0)]
    d_a, d_b = lora_grads(_as_2d(x) if any(needs_a) else None, g2, d_u, saved if any(needs_b) else None, a3, b3,
                          tuple(needs_a), tuple(needs_b))
    return (dx, *grads, [d_a[slot] if d_a[slot] is not None else g2.new_empty(0) for slot in lora_slots],
            [d_b[slot] if d_b[slot] is not None else g2.new_empty(0) for slot in lora_slots],
            [g2.new_empty(0) for _ in lora_slots])


@qkv_bwd.register_fake
def _(grad, x, wq, wk, wv, x_shape, needs, allow_tf32, lora_a, lora_b, lora_slots, lora_scales, downs, lora_needs,
      lora_wide, lora_x, lora_x_needs, lora_fused):
    n, k = grad.shape[-1] // 3, x_shape[-1]
    shapes = [x_shape] + [shape for _ in range(3) for shape in ((n, k), (n,))]
    base = [grad.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True)]
    if lora_fused:  # the adapters' gradients in their own dtype
        return (*base, [a.new_empty(a.shape if lora_needs[2 * i] else (0,)) for i, a in enumerate(lora_a)],
                [b.new_empty(b.shape if lora_needs[2 * i + 1] else (0,)) for i, b in enumerate(lora_b)],
                [grad.new_empty(0) for _ in lora_a])
    # (only what a gradient needs is given: B for dA, the down projection for dB; each tells the rank)
    dtypes = [torch.float32 if wide else grad.dtype for wide in lora_wide]
    d_a = [grad.new_empty((b.shape[-1], k) if lora_needs[2 * i] else (0,), dtype=dtypes[i])
           for i, b in enumerate(lora_b)]
    d_b = [grad.new_empty((n, d.shape[-1]) if lora_needs[2 * i + 1] else (0,), dtype=dtypes[i])
           for i, d in enumerate(downs)]
    d_own = [grad.new_empty(own.shape if own.numel() and need else (0,)) for own, need in
             zip(lora_x, lora_x_needs, strict=True)]
    return (*base, d_a, d_b, d_own)


def _qkv_setup(ctx, inputs, output):
    x, wq, bq, wk, bk, wv, bv, allow_tf32, lora_a, lora_b, lora_slots, lora_scales, lora_x = inputs
    _, downs, casts = output
    ctx.needs = list(ctx.needs_input_grad[:7])  # x, wq, bq, wk, bk, wv, bv
    needs_a, needs_b = [a.requires_grad for a in lora_a], [b.requires_grad for b in lora_b]  # (what needs_input_grad
    # says of them: here it is flat, one flag per tensor of a list, none for an empty list)
    ctx.lora_needs = [need for pair in zip(needs_a, needs_b, strict=True) for need in pair]
    ctx.lora_slots, ctx.lora_scales = list(lora_slots), list(lora_scales)
    ctx.lora_wide = [a.dtype != x.dtype for a in lora_a]
    # each adapter's input: x (then it needs a gradient when x does), or its own (x after its dropout)
    separate = [own.numel() > 0 for own in lora_x]
    ctx.lora_x_needs = [own.requires_grad if sep else ctx.needs[0] for own, sep in zip(lora_x, separate, strict=True)]
    saved_outputs_only(ctx, *downs, *casts)
    ctx.lora_fused = fused_lora(lora_a, lora_b, lora_slots, lora_x)
    ctx.n_lora = len(lora_a)
    ctx.x_shape, ctx.allow_tf32 = list(x.shape), allow_tf32
    ctx.lora_x_shapes = [None] * len(lora_a)
    if ctx.lora_fused:  # x for a weight gradient or dA; the weights for dx; every adapter (parameters: no copy);
        # the forward's products for dB
        needs_x = any(ctx.needs[1::2][:3]) or any(needs_a)
        ctx.save_for_backward(x if needs_x else None, *((wq, wk, wv) if ctx.needs[0] else (None, None, None)),
                              *lora_a, *lora_b, downs[0] if any(needs_b) else None)
        return
    # Saved only for a gradient someone wants (views, no copies): x for a weight gradient or an adapter's A, the
    # weights for dx; each adapter's A (in x's dtype) for dx, its B for dx and dA, its down projection for dB
    low_a = [c if c.numel() else a for a, c in zip(lora_a, casts[0::2], strict=True)]
    low_b = [c if c.numel() else b for b, c in zip(lora_b, casts[1::2], strict=True)]
    needs_x = any(ctx.needs[1::2][:3]) or any(na and not sep for na, sep in zip(needs_a, separate, strict=True))
    needs_dx, needs_u = ctx.needs[0], ctx.lora_x_needs
    ctx.n_lora = len(lora_a)
    ctx.save_for_backward(x if needs_x else None, *((wq, wk, wv) if needs_dx else (None, None, None)),
                          *(a if nu else None for a, nu in zip(low_a, needs_u, strict=True)),
                          *(b if nu or na else None for b, nu, na in zip(low_b, needs_u, needs_a, strict=True)),
                          *(d if nb else None for d, nb in zip(downs, needs_b, strict=True)),
                          *(own if sep and na else None for own, sep, na in zip(lora_x, separate, needs_a,
                                                                                 strict=True)))
    ctx.lora_x_shapes = [list(own.shape) if sep else None for own, sep in zip(lora_x, separate, strict=True)]


def _qkv_backward(ctx, grad, grad_downs, grad_casts):
    n_lora = ctx.n_lora
    # no gradient for the adapters' slots and scales: None, or an empty list for an empty list (the structure of
    # the inputs: torch.library reads an empty list as a list of tensors)
    constants = (None, None) if n_lora else ([], [])
    separate = [shape is not None for shape in ctx.lora_x_shapes]
    if grad is None or not (any(ctx.needs) or any(ctx.lora_needs) or any(ctx.lora_x_needs)):
        return (None,) * 8 + ([None] * n_lora, [None] * n_lora, *constants, [None] * n_lora if n_lora else [])
    x, wq, wk, wv, *rest = ctx.saved_tensors
    empty = grad.new_empty(0)  # stands for what is not kept (a custom op takes no None in a list)
    if ctx.lora_fused:
        lora_a, lora_b, saved = rest[:n_lora], rest[n_lora:2 * n_lora], rest[-1]
        *grads, d_a, d_b, _ = qkv_bwd(unit_last(grad), x, wq, wk, wv, ctx.x_shape, ctx.needs, ctx.allow_tf32,
                                      list(lora_a), list(lora_b), ctx.lora_slots, ctx.lora_scales,
                                      [saved if saved is not None else empty], ctx.lora_needs, ctx.lora_wide,
                                      [empty] * n_lora, ctx.lora_x_needs, True)
        return (*(g if need else None for g, need in zip(grads, ctx.needs, strict=True)), None,
                [g if need else None for g, need in zip(d_a, ctx.lora_needs[0::2], strict=True)],
                [g if need else None for g, need in zip(d_b, ctx.lora_needs[1::2], strict=True)], *constants,
                [None] * n_lora)
    lora_a, lora_b, downs, own = (rest[i * n_lora:(i + 1) * n_lora] for i in range(4))
    # an adapter's own input not kept (its dA not wanted): a stand-in with its shape and no storage, never read
    own = [t if t is not None else empty if shape is None else grad.new_empty((1,)).expand(shape)
           for t, shape in zip(own, ctx.lora_x_shapes, strict=True)]
    lora_a, lora_b, downs = ([empty if t is None else t for t in ts] for ts in (lora_a, lora_b, downs))
    *grads, d_a, d_b, d_own = qkv_bwd(unit_last(grad), x, wq, wk, wv, ctx.x_shape, ctx.needs, ctx.allow_tf32,
                                      lora_a, lora_b, ctx.lora_slots, ctx.lora_scales, downs, ctx.lora_needs,
                                      ctx.lora_wide, own, ctx.lora_x_needs, False)
    needs_a, needs_b = ctx.lora_needs[0::2], ctx.lora_needs[1::2]
    return (*(g if need else None for g, need in zip(grads, ctx.needs, strict=True)), None,
            [g if need else None for g, need in zip(d_a, needs_a, strict=True)],
            [g if need else None for g, need in zip(d_b, needs_b, strict=True)], *constants,
            [g if need and sep else None for g, need, sep in zip(d_own, ctx.lora_x_needs, separate, strict=True)]
            if n_lora else [])


qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)
register_flop_formulas(qkv_fwd, qkv_bwd)


# ------------------------------------------------------------------------------------------------
# mlp: fc2(gelu_fast(fc1(x))) + residual, the transformer MLP as one op
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("vivit_kernels::mlp_fwd", mutates_args=())
def mlp_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
    save_pre: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_fast(x @ W1^T + b1) @ W2^T + b2 + residual, the FC1 pre-activation if save_pre)."""
    x2 = _as_2d(x)
    M, F = x2.shape[0], w1.shape[0]
    hidden = torch.empty((M, F), dtype=x.dtype, device=x.device)
    pre = torch.empty((*x.shape[:-1], F), dtype=x.dtype, device=x.device) if save_pre else hidden.new_empty(0)
    gemm(x2, w1.t(), hidden, bias=b1, activation="gelu_fast", pre=_as_2d(pre) if save_pre else None,
         allow_tf32=allow_tf32)
    out = torch.empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype, device=x.device)
    gemm(hidden, w2.t(), _as_2d(out), bias=b2, residual=_as_2d(residual) if residual is not None else None,
         allow_tf32=allow_tf32)
    return out, pre


@mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, save_pre, allow_tf32):
    torch._check(x.shape[-1] == w1.shape[1] and w2.shape[1] == w1.shape[0], lambda: "mlp: shapes disagree")
    pre = x.new_empty((*x.shape[:-1], w1.shape[0])) if save_pre else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], w2.shape[0])), pre


@torch.library.custom_op("vivit_kernels::mlp_bwd", mutates_args=())
def mlp_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor | None,
    w1: torch.Tensor | None,
    w2: torch.Tensor,
    pre: torch.Tensor,
    x_shape: list[int],
    needs: list[bool],
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW1, db1, dW2, db2), each empty where ``needs`` (x, w1, b1, w2, b2) says it is not wanted. The first
    GEMM, dY @ W2, ends in the gelu_fast derivative: it writes the pre-activation gradient dH = (dY @ W2) *
    gelu_fast'(pre), and recomputes gelu_fast(pre) for dW2 only when dW2 is wanted. ``x`` is given for dW1, ``w1``
    for dx."""
    needs_dx, needs_dw1, needs_db1, needs_dw2, needs_db2 = needs
    g2, pre2 = _as_2d(grad_out), _as_2d(pre)
    dw2, db2, dx, dw1, db1 = (g2.new_empty(0) for _ in range(5))  # each its own tensor (outputs may not alias)
    if needs_db2:
        db2 = _bias_grad(g2, g2.dtype)
    if needs_dx or needs_dw1 or needs_db1 or needs_dw2:
        dh = torch.empty_like(pre2)
        act = torch.empty_like(pre2) if needs_dw2 else None
        gemm(g2, w2, dh, dgelu_of=pre2, pre=act, allow_tf32=allow_tf32)
        if needs_dw2:
            dw2 = _weight_grad(g2, act, allow_tf32)
            del act
        dx, dw1, db1 = _linear_grads(dh, x, w1, needs_dx, needs_dw1, needs_db1, allow_tf32, x_shape)
    return dx, dw1, db1, dw2, db2


@mlp_bwd.register_fake
def _(grad_out, x, w1, w2, pre, x_shape, needs, allow_tf32):
    hidden, out, k = pre.shape[-1], grad_out.shape[-1], x_shape[-1]
    shapes = (x_shape, (hidden, k), (hidden,), (out, hidden), (out,))
    return tuple(grad_out.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, save_pre, allow_tf32 = inputs
    ctx.needs = list(ctx.needs_input_grad[:5])  # x, w1, b1, w2, b2
    ctx.needs_residual = ctx.needs_input_grad[5]
    # Saved only for a gradient someone wants: x for dW1, W1 for dx; W2 and the FC1 pre-activation (M x
    # intermediate) for every gradient below FC2 (its derivative, and gelu_fast(pre) for dW2, are recomputed from
    # it in the backward, so the FC1 output is not kept)
    ctx.save_for_backward(x if ctx.needs[1] else None, w1 if ctx.needs[0] else None, w2, output[1])
    saved_outputs_only(ctx, output[1])
    ctx.x_shape, ctx.allow_tf32 = list(x.shape), allow_tf32


def _mlp_backward(ctx, grad_out, grad_pre):
    if grad_out is None:
        return (None,) * 8
    x, w1, w2, pre = ctx.saved_tensors
    grads = [None] * 5
    if any(ctx.needs):
        if pre.numel() == 0:
            raise RuntimeError("mlp: backward needs the forward run with save_pre=True")
        grads = mlp_bwd(unit_last(grad_out), x, w1, w2, pre, ctx.x_shape, ctx.needs, ctx.allow_tf32)
    return (*(g if need else None for g, need in zip(grads, ctx.needs, strict=True)),
            grad_out if ctx.needs_residual else None, None, None)


mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)
register_flop_formulas(mlp_fwd, mlp_bwd)


# ------------------------------------------------------------------------------------------------
# Functional API and references
# ------------------------------------------------------------------------------------------------
def _check(what, x, weights, biases, residual, out_features):
    if x.dim() < 1:
        raise ValueError(f"{what}: x must be (..., in_features), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} supports float16, bfloat16 and float32, got {x.dtype}")
    features = x.shape[-1]
    names = ("weight",) if len(weights) == 1 else ("w1", "w2")
    for name, w in zip(names, weights, strict=True):
        if w.dim() != 2 or w.shape[1] != features:
            raise ValueError(
                f"{what}: {name} must be (out_features, {features}) to take {features} input features, "
                f"got {tuple(w.shape)}"
            )
        features = w.shape[0]
    for t in (*weights, *biases, residual):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{what}: all tensors must be {x.dtype} like x, got a {t.dtype} one")
    for w, b in zip(weights, biases, strict=True):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{what}: bias must be ({w.shape[0]},), got {tuple(b.shape)}")
    out_shape = (*x.shape[:-1], out_features)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"{what}: residual must be {out_shape}, got {tuple(residual.shape)}")
    check_launchable(*(t for t in (x, *weights, *biases, residual) if t is not None), what=what)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def qkv_projection(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    bv: torch.Tensor | None,
    adapters: Sequence[tuple] = (),
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """``cat([x @ wq^T + bq, x @ wk^T + bk, x @ wv^T + bv], -1)`` in one Triton GEMM whose programs read the three
    nn.Linear weights where they are (no fused parameter, no concatenation). x: (..., in); w*: (out, in); b*:
    (out,) or all None. Returns (..., 3 * out): view it as (..., 3, heads, head_dim) for attention.

    ``adapters``: LoRA adapters as (projection 0 q / 1 k / 2 v, A (rank, in), B (out, rank), scaling), each adding
    ``scaling * (x @ A^T) @ B^T`` to its projection (PEFT's LoRA): two small GEMMs forward, the second
    accumulating into the output in place, and one GEMM per wanted gradient backward. A fifth item, the adapter's
    own input (x after the adapter's dropout, shaped as x), replaces x in its update. A and B in x's dtype or
    float32 (PEFT's on a bf16 model: cast for the forward, their gradients float32)."""
    for name, w in (("wk", wk), ("wv", wv)):
        if w.shape != wq.shape:
            raise ValueError(f"qkv_projection: {name} is {tuple(w.shape)}, wq is {tuple(wq.shape)}; they must match")
    if not ((bq is None) == (bk is None) == (bv is None)):
        raise ValueError("qkv_projection: give all three biases or none")
    _check("qkv_projection", x, (wq,), (bq,), None, wq.shape[0] if wq.dim() == 2 else -1)
    for t in (wk, bk, wv, bv):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"qkv_projection: all tensors must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}"
            )
    _check_adapters("qkv_projection", x, wq.shape[0], adapters)
    own = [adapter[4] if len(adapter) == 5 else x.new_empty(0) for adapter in adapters]
    slots, a, b, scales = (list(t) for t in zip(*(adapter[:4] for adapter in adapters), strict=True)) \
        if adapters else ([], [], [], [])
    return qkv_fwd(x, wq, bq, wk, bk, wv, bv, resolve_tf32(allow_tf32), a, b, slots, [float(c) for c in scales],
                   own)[0]


def _check_adapters(what: str, x: torch.Tensor, out_features: int, adapters) -> None:
    for i, adapter in enumerate(adapters):
        if len(adapter) not in (4, 5):
            raise ValueError(f"{what}: adapter {i} must be (projection, A, B, scaling) or (projection, A, B, scaling, "
                             f"its input), got {len(adapter)} items")
        slot, a, b = adapter[:3]
        if len(adapter) == 5 and (tuple(adapter[4].shape) != tuple(x.shape) or adapter[4].dtype != x.dtype or
                                  adapter[4].device != x.device):
            own = adapter[4]
            raise ValueError(f"{what}: adapter {i}'s input must be {tuple(x.shape)} {x.dtype} on {x.device} like x, "
                             f"got {tuple(own.shape)} {own.dtype} on {own.device}")
        if slot not in (0, 1, 2):
            raise ValueError(f"{what}: adapter {i}'s projection must be 0 (q), 1 (k) or 2 (v), got {slot!r}")
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != x.shape[-1] or tuple(b.shape) != (out_features, rank):
            raise ValueError(f"{what}: adapter {i} must have A (rank, {x.shape[-1]}) and B ({out_features}, rank), "
                             f"got A {tuple(a.shape)} and B {tuple(b.shape)}")
        if a.dtype != b.dtype or a.dtype not in (x.dtype, torch.float32) or a.device != x.device or \
                b.device != x.device:
            raise ValueError(f"{what}: adapter {i}'s A and B must both be {x.dtype} or float32 on {x.device}, got "
                             f"{a.dtype} and {b.dtype} on {a.device} and {b.device}")


def lora_ref(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """A LoRA adapter's update as PEFT computes it (no dropout): ``B(A(x)) * scaling``, in x's dtype."""
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scaling


def _with_adapters(outs: list[torch.Tensor], x: torch.Tensor, adapters) -> list[torch.Tensor]:
    for slot, a, b, scaling, *own in adapters:
        outs[slot] = outs[slot] + lora_ref(own[0] if own else x, a, b, scaling)
    return outs


def qkv_projection_ref(x, wq, bq, wk, bk, wv, bv, adapters=()) -> torch.Tensor:
    """Eager reference: the three nn.Linear projections (each plus its LoRA adapters' updates), concatenated along
    the last dimension."""
    outs = [F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)]
    return torch.cat(_with_adapters(outs, x, adapters), dim=-1)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
    adapters: Sequence[tuple] = (),
) -> torch.Tensor:
    """``act(x @ weight^T + bias) + residual`` in one Triton GEMM (forward and backward).

    x: (..., in_features); weight: (out_features, in_features) as in nn.Linear; bias: (out_features,);
    residual: (..., out_features). ``activation`` "gelu_fast" is fused into the epilogue; another name from
    transformers' activations runs as a torch op after the GEMM. A residual is fused when there is no
    activation (with one, it is a torch add). ``allow_tf32`` (float32 only) defaults to
    torch's matmul setting (``torch.get_float32_matmul_precision() != "highest"``).

    ``adapters``: LoRA adapters as (A (rank, in), B (out, rank), scaling), adding PEFT's ``scaling * (x @ A^T) @
    B^T`` before the activation and the residual. One adapter of rank <= 64 with A and B contiguous in one dtype
    (x's or float32) runs inside the GEMM (``fused_lora``: no launch of its own forward; backward its update of dx
    inside the dx GEMM and dA, dB in one launch); any other runs as two GEMMs of its own after the base GEMM.
    """
    _check("linear", x, (weight,), (bias,), residual, weight.shape[0] if weight.dim() == 2 else -1)
    for i, adapter in enumerate(adapters):
        if len(adapter) != 3:
            raise ValueError(f"linear: adapter {i} must be (A, B, scaling), got {len(adapter)} items")
    _check_adapters("linear", x, weight.shape[0], [(0, *adapter) for adapter in adapters])
    tf32 = resolve_tf32(allow_tf32)
    if adapters:
        a, b, scales = ([t[i] for t in adapters] for i in range(3))
        if len(adapters) > 1 or not fused_lora(a, b, [0], [x.new_empty(0)]):
            y = linear_fwd(x, weight, bias, None, "none", False, tf32, [], [], [])[0]
            y = y + sum(lora_ref(x, *adapter) for adapter in adapters)
            y = get_activation(activation)(y) if activation is not None else y
            return y + residual if residual is not None else y
        lora = (a, b, [float(c) for c in scales])
    else:
        lora = ([], [], [])
    if activation is None:
        return linear_fwd(x, weight, bias, residual, "none", False, tf32, *lora)[0]
    if activation in KERNEL_ACTIVATIONS:
        y = linear_fwd(x, weight, bias, None, activation, _needs_grad(x, weight, bias, *lora[0], *lora[1]), tf32,
                       *lora)[0]
    else:
        y = get_activation(activation)(linear_fwd(x, weight, bias, None, "none", False, tf32, *lora)[0])
    return y + residual if residual is not None else y


linear.fuses_lora = True  # modules pass PEFT's adapters to this op (a vendor linear gets them added after it)


def mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu_fast",
    residual: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """``fc2(act(fc1(x))) + residual``: two Triton GEMMs forward (FC1 + bias -> gelu_fast, FC2 + bias +
    residual); with gelu_fast the activation derivative is fused into the backward GEMMs. Another activation
    runs as two ``linear`` calls around a torch activation."""
    _check("mlp", x, (w1, w2), (b1, b2), residual, w2.shape[0] if w2.dim() == 2 else -1)
    tf32 = resolve_tf32(allow_tf32)
    if activation != "gelu_fast":
        return linear(linear(x, w1, b1, activation, allow_tf32=tf32), w2, b2, residual=residual, allow_tf32=tf32)
    save_pre = _needs_grad(x, w1, b1, w2, b2, residual)
    return mlp_fwd(x, w1, b1, w2, b2, residual, save_pre, tf32)[0]


def gelu_fast_backward_ref(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad * gelu_fast'(pre), in fp32, cast back."""
    return (grad.float() * gelu_fast_grad(pre.float())).to(grad.dtype)


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


def mlp_ref(x, w1, b1, w2, b2, activation: str = "gelu_fast", residual=None) -> torch.Tensor:
    """Eager reference of the MLP: transformers' fc1 -> activation -> fc2, then ``+ residual``."""
    return linear_ref(linear_ref(x, w1, b1, activation), w2, b2, residual=residual)


# ------------------------------------------------------------------------------------------------
# Vendor alternatives (cuBLAS / cuBLASLt through torch, the extension's bias + gelu_fast): the registry's other
# implementations of qkv / linear / mlp, which attn="auto" times against ours
# ------------------------------------------------------------------------------------------------
def qkv_concat(x, wq, bq, wk, bk, wv, bv, adapters=()):
    """One GEMM with the bias epilogue on the three weights concatenated (a 3 x hidden^2 copy per call); LoRA
    adapters' updates added as torch ops."""
    bias = None if bq is None else torch.cat([bq, bk, bv])
    out = F.linear(x, torch.cat([wq, wk, wv]), bias)
    return torch.cat(_with_adapters(list(out.chunk(3, -1)), x, adapters), dim=-1) if adapters else out


def linear_addmm(x, w, b=None, activation=None, residual=None):
    """torch.addmm (the bias in cuBLAS's epilogue on CUDA), with cuBLASLt's tanh-GELU epilogue where it is
    gelu_fast (checked numerically per device type; elsewhere addmm then gelu_fast)."""
    if activation not in (None, "gelu_fast"):
        raise ValueError(f"linear: activation {activation!r}")
    x2 = x.reshape(-1, x.shape[-1])
    if activation == "gelu_fast":
        fused = b is not None and _lt_gelu_is_gelu_fast(x.device.type)
        y = torch._addmm_activation(b, x2, w.t(), use_gelu=True) if fused else gelu_fast(F.linear(x2, w, b))
    elif b is not None:
        y = torch.addmm(b, x2, w.t())
    else:
        y = x2 @ w.t()
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if residual is None else y + residual


def linear_matmul_ext(x, w, b=None, activation=None, residual=None):
    """torch's GEMM, then the extension's bias + gelu_fast kernel (one pass) where there is an activation."""
    from .gelu import bias_gelu_fast

    if activation != "gelu_fast" or b is None:
        return linear_addmm(x, w, b, activation, residual)
    y = bias_gelu_fast(x @ w.t(), b)
    return y if residual is None else y + residual


def mlp_with(linear_fn):
    """The MLP as two calls of ``linear_fn`` (a vendor linear): fc1 + gelu_fast, then fc2 + residual."""
    def mlp_fn(x, w1, b1, w2, b2, activation="gelu_fast", residual=None):
        return linear_fn(linear_fn(x, w1, b1, activation), w2, b2, None, residual)

    mlp_fn.__name__ = f"mlp_{linear_fn.__name__}"
    return mlp_fn


_lt_gelu: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _lt_gelu_is_gelu_fast(device_type: str) -> bool:
    """Whether torch's _addmm_activation(use_gelu=True) is the tanh form, i.e. gelu_fast: on CUDA it is (cuBLASLt's
    GELU epilogue); torch's CPU version is the exact erf GELU. Checked numerically once per device type."""
    if device_type not in _lt_gelu:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():  # real numbers, also when called under FakeTensorMode
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(shape, generator=g).to(device_type) for shape in ((64, 32), (48, 32), (48,)))
            got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
            _lt_gelu[device_type] = (got - gelu_fast(torch.addmm(b, x, w.t()))).abs().max().item() <= 1e-4
    return _lt_gelu[device_type]
