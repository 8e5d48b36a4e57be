"""Every cost formula of the ops, in one place: matmul FLOPs, bytes moved, kernel launches and temporary bytes.

- a call of an op (the registry's ``Op.flops`` / ``Op.bytes``, over the op's call arguments): ``<op>_flops`` and
  ``<op>_bytes``; a training call adds the backward: ``Op.cost`` (backward FLOPs ``backward_ratio`` x the forward's,
  bytes ``BACKWARD_BYTES`` x);
- each ``torch.library`` op (``CUSTOM_OPS``, over the op's own arguments): its FLOPs (given to torch's FLOP counter
  by ``register_flop_formulas``, which each op module calls beside its op definitions, so ``FlopCounterMode`` counts
  our ops as it counts ATen's matmuls), the kernels one call launches and the temporary bytes it allocates inside
  (which a fake tensor run cannot see). ``launches`` and ``transient_bytes`` look them up (tools/counting.py).

A GEMM is 2 M N K; attention 4 B H N^2 D forward (QK^T and PV) and 2.5x that backward (the recomputed QK^T, dV,
dP, dQ, dK).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

from .token_sets import MODES, Split

__all__ = ["CustomOp", "CUSTOM_OPS", "BACKWARD_BYTES", "gemm_flops", "attention_flops", "launches", "transient_bytes",
           "register_flop_formulas"]

# a training call's backward moves this many times the forward's bytes: it reads the output gradient and what the
# forward saved, and writes the input gradients (for the elementwise ops whose time is their bytes)
BACKWARD_BYTES = 2.0


@dataclass(frozen=True)
class CustomOp:
    """What the device-free counts need of one ``torch.library`` op: its matmul FLOPs (a formula over the op's
    argument shapes, registered with ``torch.utils.flop_counter``; None: no matmul), the kernels one call launches
    (a number, or a function of the call's arguments) and the temporary bytes it allocates inside (which a fake
    tensor run cannot see: a fake implementation allocates only the outputs)."""

    flops: Callable[..., int] | None = None
    launches: int | Callable[[tuple], int] = 1
    transient: Callable[[tuple], int] | None = None



def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def attention_flops(q_numel: int, keys: int) -> int:
    """Forward FLOPs of softmax(q k^T) v for ``q_numel`` query elements (B H N D) over ``keys`` keys each."""
    return 4 * q_numel * keys


def _bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _rows(shape) -> int:
    return math.prod(shape[:-1])



def _flash_bwd_transient(args) -> int:
    do = args[0].shape  # the output gradient, (..., N, H, D)
    return math.prod(do[:-1]) * 4  # delta = rowsum(dO * O), fp32


def _mlp_fwd_transient(args) -> int:
    x, w1 = args[0], args[1]
    return _rows(x.shape) * w1.shape[0] * x.element_size()  # the FC1 output, read by FC2


def _mlp_bwd_transient(args) -> int:
    grad, pre, needs = args[0], args[4], args[6]  # dH and, for dW2, the recomputed gelu_fast(H)
    needs_dx, needs_dw1, needs_db1, needs_dw2, _ = needs
    dh = needs_dx or needs_dw1 or needs_db1 or needs_dw2
    return int(dh) * (1 + int(needs_dw2)) * _rows(grad.shape) * pre.shape[-1] * pre.element_size()


def _patch_gemm(x_shape, w_shape) -> int:
    B, T, _, H, W = x_shape
    D, C, t, p, q = w_shape
    return gemm_flops(B * (T // t) * (H // p) * (W // q), D, C * t * p * q)


_ATTENTION_OPS = {
    # backward: delta, dK / dV, dQ
    "vivit_kernels::flash_attn_fwd": CustomOp(flops=lambda q, *a, **k: attention_flops(math.prod(q), q[-3])),
    "vivit_kernels::flash_attn_bwd": CustomOp(
        flops=lambda do, q, *a, **k: 5 * attention_flops(math.prod(q), q[-3]) // 2,
        launches=3,
        transient=_flash_bwd_transient,
    ),
}
_ATTENTION_QKV_OPS = {  # qkv (B, N, 3, H, D) or (B1, B2, N, 3, H, D)
    "vivit_kernels::flash_attn_qkv_fwd": CustomOp(
        flops=lambda qkv, *a, **k: attention_flops(math.prod(qkv) // 3, qkv[-4])),
    "vivit_kernels::flash_attn_qkv_bwd": CustomOp(
        flops=lambda do, qkv, *a, **k: 5 * attention_flops(math.prod(qkv) // 3, qkv[-4]) // 2, launches=3,
        transient=_flash_bwd_transient),
}
# Backward entries count only what is computed: the Triton GEMMs of the gradients wanted (a frozen weight: no dW);
# where a weight gradient splits over K a summing kernel follows, and a bias gradient is one torch reduction.
def _linear_bwd_gemms(args) -> int:  # (grad, x, weight, x_shape, needs_dx, needs_dw, needs_db, allow_tf32, lora_a,
    # lora_b, lora_scales, lora_saved, lora_needs): dx (with the adapter's products, or those alone where dx is not
    # wanted and dA is), dW, the adapter's gradients
    lora_needs = args[12] if len(args) > 12 else []
    if not lora_needs:
        return int(args[4]) + int(args[5])
    shape = args[0].shape
    return int(args[4] or lora_needs[0]) + int(args[5]) + \
        _lora_grad_launches(_rows(shape), args[3][-1], shape[-1], lora_needs, args[0].element_size())


def _linear_fwd_flops(x, w, bias, residual, activation, save_pre, allow_tf32, lora_a=(), *args, **kwargs) -> int:
    m = _rows(x)
    return gemm_flops(m, w[0], w[1]) + (_lora_fwd_flops(m, w[0], w[1], 1, lora_a[0][0]) if lora_a else 0)


def _linear_bwd_flops(g, x, w, x_shape, needs_dx, needs_dw, needs_db, allow_tf32, lora_a=(), lora_b=(),
                      lora_scales=(), lora_saved=None, lora_needs=(), **kwargs) -> int:
    from ._gemm import LORA_BLOCK_N, lora_rank_pad

    m, n, k = _rows(g), g[-1], x_shape[-1]
    flops = (int(needs_dx) + int(needs_dw)) * gemm_flops(m, n, k)
    if lora_a:  # as the QKV op's (_qkv_bwd_flops), one adapter
        rp, (needs_a, needs_b) = lora_rank_pad(lora_a[0][0]), lora_needs
        if needs_dx or needs_a:
            flops += (-(-k // LORA_BLOCK_N) if needs_dx else 1) * gemm_flops(m, rp, n) + \
                int(needs_dx) * gemm_flops(m, k, rp)
        flops += int(needs_a) * gemm_flops(rp, k, m) + int(needs_b) * gemm_flops(n, rp, m)
    return flops


def _lora_grad_launches(m: int, k: int, n: int, lora_needs, element_size: int) -> int:
    """The adapters' gradient launch of a fused-LoRA backward, and its sum where the rows split (lora_grads)."""
    from ._gemm import lora_grad_plan

    n_a, n_b = sum(int(a) for a, _ in _pairs(lora_needs)), sum(int(b) for _, b in _pairs(lora_needs))
    return 0 if n_a + n_b == 0 else 1 + int(lora_grad_plan(m, k, n, n_a, n_b, element_size=element_size)[1] > 1)


def _qkv_bwd_gemms(args) -> int:  # (grad, x, wq, wk, wv, x_shape, needs (x, wq, bq, wk, bk, wv, bv), allow_tf32,
    needs = args[6]                 #  lora_a, lora_b, slots, scales, downs, lora_needs (A, B of each adapter),
    # lora_wide, lora_x, lora_x_needs (each adapter's input), lora_fused): an adapter's float32 gradients are
    # written by the GEMM (out_dtype) on CUDA, no cast. Fused: dx (with the adapters' products) or, where dx is not
    # wanted and a dA is, the products alone; the weight gradients; the adapters' gradients
    if args[17]:
        any_a = any(a for a, _ in _pairs(args[13]))
        return int(needs[0] or any_a) + sum(int(n) for n in needs[1::2][:3]) + \
            _lora_grad_launches(_rows(args[0].shape), args[5][-1], args[0].shape[-1] // 3, args[13],
                                args[0].element_size())
    adapters = zip(_pairs(args[13]), args[16], strict=True)
    return int(needs[0]) + sum(int(n) for n in needs[1::2][:3]) + \
        sum(int(nu or na) + int(nu) + int(na) + int(nb) for (na, nb), nu in adapters)


def _pairs(flags) -> list[tuple[bool, bool]]:
    return list(zip(flags[0::2], flags[1::2], strict=True))


def _fused_shapes(lora_a, slots, lora_x) -> bool:
    """ops._gemm.fused_lora as far as shapes tell it (a FLOP formula sees shapes; PEFT's adapters are contiguous
    and of one dtype, the rest of that check)."""
    from . import _gemm

    return bool(_gemm.FUSE_LORA and lora_a) and not any(math.prod(own) for own in lora_x) and \
        len(set(slots)) == len(slots) and len({a[0] for a in lora_a}) == 1 and lora_a[0][0] <= _gemm.LORA_MAX_RANK


def _lora_fwd_flops(m: int, n: int, k: int, groups: int, rank: int) -> int:
    """What the forward's fused adapters compute: each group's programs (one with no adapter too: its loads masked,
    the products still run) repeat x A^T per column block of LORA_BLOCK_N, and take its product with B^T, at the
    padded rank."""
    from ._gemm import LORA_BLOCK_N, lora_rank_pad

    rp = lora_rank_pad(rank)
    return groups * (-(-n // LORA_BLOCK_N) * gemm_flops(m, rp, k) + gemm_flops(m, n, rp))


def _qkv_fwd_launches(args) -> int:  # the GEMM; unfused, per adapter two GEMMs and a cast of each float32 weight
    from ._gemm import fused_lora

    x, lora_a, lora_b = args[0], args[8], args[9]
    if fused_lora(lora_a, lora_b, args[10], args[12]):
        return 1
    return 1 + 2 * len(lora_a) + sum(int(t.dtype != x.dtype) for t in (*lora_a, *lora_b))


def _qkv_fwd_flops(x, wq, bq, wk, bk, wv, bv, allow_tf32, lora_a, lora_b, slots, scales, lora_x, *args,
                   **kwargs) -> int:
    m = _rows(x)  # the base GEMM; per adapter, x @ A^T and its product with B^T
    if _fused_shapes(lora_a, slots, lora_x):
        return 3 * gemm_flops(m, wq[0], wq[1]) + _lora_fwd_flops(m, wq[0], wq[1], 3, lora_a[0][0])
    return 3 * gemm_flops(m, wq[0], wq[1]) + sum(gemm_flops(m, a[0], a[1]) + gemm_flops(m, b[0], b[1])
                                                 for a, b in zip(lora_a, lora_b, strict=True))


def _qkv_bwd_flops(g, x, wq, wk, wv, x_shape, needs, allow_tf32, lora_a, lora_b, slots, scales, downs, lora_needs,
                   lora_wide, lora_x, lora_x_needs, lora_fused=False, **kwargs) -> int:
    m, n, k = _rows(g), g[-1] // 3, x_shape[-1]
    flops = (3 * int(needs[0]) + sum(int(w) for w in needs[1::2][:3])) * gemm_flops(m, n, k)
    if lora_fused:  # per adapter, in the dx GEMM: dY_g B_g per column block and its product with A; or that
        # product alone once; then one grouped launch: dA = (s dY_g B_g)^T x, dB = dY_g^T (s x A^T)
        from ._gemm import LORA_BLOCK_N, lora_rank_pad

        rp = lora_rank_pad(lora_b[0][-1])
        blocks = -(-k // LORA_BLOCK_N) if needs[0] else 1
        any_a = any(a for a, _ in _pairs(lora_needs))
        if needs[0] or any_a:
            flops += len(lora_b) * (blocks * gemm_flops(m, rp, n) + int(needs[0]) * gemm_flops(m, k, rp))
        return flops + sum(int(a) * gemm_flops(rp, k, m) + int(b) * gemm_flops(n, rp, m)
                           for a, b in _pairs(lora_needs))
    # per adapter dU = s g B, du = dU A, dA = dU^T u, dB = s g^T (u A^T); the rank read from what each is given:
    # B (for dU), the down projection (for dB)
    for b, down, (na, nb), nu in zip(lora_b, downs, _pairs(lora_needs), lora_x_needs, strict=True):
        if nu or na:
            flops += gemm_flops(m, b[-1], n) + (int(nu) + int(na)) * gemm_flops(m, k, b[-1])
        flops += int(nb) * gemm_flops(m, n, down[-1])
    return flops


def _mlp_bwd_gemms(args) -> int:  # (grad, x, w1, w2, pre, x_shape, needs (x, w1, b1, w2, b2), allow_tf32)
    needs_dx, needs_dw1, needs_db1, needs_dw2, _ = args[6]
    dh = needs_dx or needs_dw1 or needs_db1 or needs_dw2  # dY @ W2 with the gelu_fast derivative
    return int(dh) + int(needs_dw2) + int(needs_dx) + int(needs_dw1)


_LINEAR_OPS = {
    "vivit_kernels::linear_fwd": CustomOp(flops=_linear_fwd_flops),  # one launch, an adapter inside it
    "vivit_kernels::linear_bwd": CustomOp(flops=_linear_bwd_flops, launches=_linear_bwd_gemms),
}
_QKV_OPS = {
    "vivit_kernels::qkv_fwd": CustomOp(flops=_qkv_fwd_flops, launches=_qkv_fwd_launches),
    "vivit_kernels::qkv_bwd": CustomOp(  # dX (three K segments, one GEMM), each wanted dWq, dWk, dWv, adapters'
        flops=_qkv_bwd_flops, launches=_qkv_bwd_gemms),
}
_MLP_OPS = {
    "vivit_kernels::mlp_fwd": CustomOp(flops=lambda x, w1, *a, **k: 2 * gemm_flops(_rows(x), w1[0], w1[1]),
                                       launches=2, transient=_mlp_fwd_transient),  # FC1 + gelu, FC2 + residual
    "vivit_kernels::mlp_bwd": CustomOp(  # dH (+ gelu), dW2, dW1, dX: those wanted
        flops=lambda g, x, w1, w2, pre, x_shape, *a, **k: _mlp_bwd_gemms((g, x, w1, w2, pre, x_shape, *a)) *
        gemm_flops(_rows(g), pre[-1], x_shape[-1]),
        launches=_mlp_bwd_gemms, transient=_mlp_bwd_transient),
}
_LAYER_NORM_OPS = {
    "vivit_kernels::layer_norm_fwd": CustomOp(),
    # the kernel, the two partial-sum reductions, and two casts unless the weights are fp32
    "vivit_kernels::layer_norm_bwd": CustomOp(launches=lambda args: _layer_norm_bwd_launches(*args[2:])),
}
def _patch_bwd_launches(dx, dw, db, dcls, dpos) -> int:
    """dW (+ a summing kernel where it splits over tubelets), db, the position sum, its [CLS] copy, dx: those
    wanted."""
    return int(dx) + int(dw) + int(db) + int(dpos or dcls) + int(dcls)


def _layer_norm_bwd_launches(weight, mean, rstd, needs_dx, needs_dw, needs_db) -> int:
    """The kernel (dx and / or the partial sums), one reduction per weight gradient, and its cast unless fp32."""
    grads = int(needs_dw) + int(needs_db)
    return int(needs_dx or grads > 0) + grads * (1 if weight.dtype == torch.float32 else 2)


_PATCH_EMBED_OPS = {
    "vivit_kernels::patch_embed_fwd": CustomOp(flops=lambda x, w, *a, **k: _patch_gemm(x, w)),
    # dW (+ a summing kernel where it splits over tubelets), db, the position sum, its [CLS] copy, and dX if needed
    "vivit_kernels::patch_embed_bwd": CustomOp(  # (grad, x, w, needs (x, w, b, cls, pos), allow_tf32)
        flops=lambda g, x, w, needs, *a, **k: (int(needs[0]) + int(needs[1])) * _patch_gemm(x, w),
        launches=lambda args: _patch_bwd_launches(*args[3])),
}
def _token_merge_flops(x, keys, size, source, r, mode, per_slice, odd, *args, **kwargs) -> int:
    """The matching's cosine similarities: every A token against every B token, over the head dim."""
    na, nb = Split(MODES[mode], per_slice, odd).sizes(x[1])
    return gemm_flops(x[0] * na, nb, keys[-1])


def _token_merge_transient(args) -> int:  # each A token's score, best B token and rank; the r merged, ordered
    x, r, mode, per_slice, odd = args[0], *args[4:8]
    na, _ = Split(MODES[mode], per_slice, odd).sizes(x.shape[1])
    return x.shape[0] * (12 * na + 8 * r)


_TOKEN_MERGE_OPS = {
    # match, rank, order (skipped when nothing merges), merge
    "vivit_kernels::token_merge_fwd": CustomOp(flops=_token_merge_flops, launches=lambda args: 3 + int(args[4] > 0),
                                               transient=_token_merge_transient),
    "vivit_kernels::token_merge_bwd": CustomOp(),  # each input row reads its output row: one launch
}
CUSTOM_OPS: dict[str, CustomOp] = {**_ATTENTION_OPS, **_ATTENTION_QKV_OPS, **_LINEAR_OPS, **_QKV_OPS, **_MLP_OPS,
                                   **_LAYER_NORM_OPS, **_PATCH_EMBED_OPS, **_TOKEN_MERGE_OPS,
                                   # the extension's ops (csrc/): elementwise, one kernel each
                                   "vivit_kernels::bias_gelu_fast": CustomOp(),
                                   "vivit_kernels::bias_gelu_fast_backward": CustomOp(),
                                   "vivit_kernels::preprocess_video": CustomOp()}


def register_flop_formulas(*ops) -> None:
    """Give torch's FLOP counter the formula of each of ``ops`` (``torch.library`` custom ops, or their names) that
    has one: called by each op module right after it defines its ops."""
    for op in ops:
        name = op if isinstance(op, str) else op._qualname
        spec = CUSTOM_OPS[name]
        if spec.flops is not None:
            register_flop_formula(getattr(torch.ops.vivit_kernels, name.split("::")[1]))(spec.flops)


def launches(op_name: str, args: tuple) -> int:
    """Kernels one call of custom op ``op_name`` ("vivit_kernels::linear_fwd") launches with these arguments."""
    n = _spec(op_name).launches
    return n(args) if callable(n) else n


def transient_bytes(op_name: str, args: tuple) -> int:
    """Bytes custom op ``op_name`` allocates and frees inside one call (beyond its outputs)."""
    fn = _spec(op_name).transient
    return fn(args) if fn else 0


def _spec(name: str) -> CustomOp:
    if name not in CUSTOM_OPS:
        raise KeyError(f"{name} is no custom op of vivit_kernels (ops/formulas.py CUSTOM_OPS)")
    return CUSTOM_OPS[name]


# ------------------------------------------------------------------------------------------------
# One call of each op, over its call arguments (the registry's Op.flops / Op.bytes)
# ------------------------------------------------------------------------------------------------
def layer_norm_flops(x, w, b, eps) -> float:
    return 0.0


def layer_norm_bytes(x, w, b, eps) -> float:
    return 2 * _bytes(x) + _bytes(w, b)


def qkv_flops(x, wq, bq, wk, bk, wv, bv) -> float:
    return 3 * gemm_flops(_rows(x.shape), wq.shape[0], x.shape[-1])


def qkv_bytes(x, *w) -> float:
    return _bytes(x, *w) + 3 * _rows(x.shape) * w[0].shape[0] * x.element_size()


def linear_flops(x, w, b=None, activation=None, residual=None) -> float:
    return gemm_flops(_rows(x.shape), w.shape[0], x.shape[-1])


def linear_bytes(x, w, b=None, activation=None, residual=None) -> float:
    return _bytes(x, w, b, residual) + _rows(x.shape) * w.shape[0] * x.element_size()


def mlp_flops(x, w1, *args, **kwargs) -> float:
    return 2 * gemm_flops(_rows(x.shape), w1.shape[0], x.shape[-1])


def mlp_bytes(x, w1, b1, w2, b2, activation="gelu_fast", residual=None) -> float:
    return _bytes(x, w1, b1, w2, b2, residual) + _rows(x.shape) * w2.shape[0] * x.element_size()


def attention_qkv_flops(qkv, scale=None, bias=None) -> float:
    return attention_flops(qkv.numel() // 3, qkv.shape[-4])


def attention_qkv_bytes(qkv, scale=None, bias=None) -> float:
    return _bytes(qkv, bias) + _bytes(qkv) / 3


def attention_call_flops(q, k, v, scale=None, bias=None) -> float:
    return attention_flops(q.numel(), k.shape[-3])


def attention_bytes(q, k, v, scale=None, bias=None) -> float:
    return 2 * _bytes(q) + _bytes(k, v, bias)


def patch_embed_flops(x, w, *args) -> float:
    return _patch_gemm(x.shape, w.shape)


def patch_embed_bytes(x, w, b, cls, pos) -> float:
    return _bytes(x, w, b, pos) + x.shape[0] * pos.shape[1] * w.shape[0] * x.element_size()


def bias_gelu_fast_flops(x, b) -> float:
    return 0.0


def bias_gelu_fast_bytes(x, b) -> float:
    return 2 * _bytes(x) + _bytes(b)


def preprocess_video_flops(*args) -> float:
    return 0.0


def preprocess_video_bytes(frames, resize_hw, crop_box, *rest) -> float:
    dtype = rest[-1]
    out = frames.shape[0] * frames.shape[1] * 3 * crop_box[2] * crop_box[3] * torch.empty(0, dtype=dtype).element_size()
    return _bytes(frames) + out


def token_merge_flops(x, keys, size, source, r, mode, per_slice=1, odd=0) -> float:
    na, nb = Split(mode, per_slice, odd).sizes(x.shape[1])
    return gemm_flops(x.shape[0] * na, nb, keys.shape[-1])


def token_merge_bytes(x, keys, size, source, r, mode, per_slice=1, odd=0) -> float:
    """The tokens and keys read once, the merged tokens written once, the sizes and source map read and written."""
    batch, n, channels = x.shape
    merged = batch * (n - r) * (channels * x.element_size() + 8)  # the tokens, their sizes and log(sizes)
    return _bytes(x, keys, size) + merged + 2 * _bytes(source)
