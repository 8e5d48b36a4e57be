"""The op registry: the only list of vivit_kernels' ops. Per op, everything a reader, ``attn="auto"``, ``tune``,
the compile gate, the acceptance run, the device-free counts, the tests and the benchmarks need, in one entry.

    >>> from vivit_kernels.ops.registry import OPS, Shape
    >>> op = OPS["linear"]
    >>> op.kernel_module, op.module        # its Triton kernels; its custom ops, functional API and reference
    >>> op.implementations                 # ours first, then the vendor paths "auto" may choose
    >>> op.reference                       # the eager PyTorch definition every implementation is checked against
    >>> args = op.sample_inputs(Shape.awkward(), torch.float32, "cpu", requires_grad=True)
    >>> op.flops(*args), op.bytes(*args)   # one forward call's matmul FLOPs and bytes moved
    >>> op.custom_ops                      # its torch.library ops: FLOP formulas, launches, temporaries
    >>> op.tests, op.bench, op.aot_modules

An implementation is an autograd-complete callable with the op's call signature below, plus what it needs
(``available(device)``: None, or why it cannot run there) and what it runs on a device, in words (for tables).
Every FLOP formula of the package is here (the call-level ``flops`` and the custom ops' formulas, which
``torch.utils.flop_counter`` is given at import), and every op list elsewhere is read from ``OPS``
(tests/test_architecture.py fails on one written anywhere else).

Call signatures (the model's ``Backend`` table, ``auto/backends.py``, holds the ops with ``backend=True``):

- ``layer_norm(x, weight, bias, eps) -> x.shape``
- ``qkv(x, wq, bq, wk, bk, wv, bv, adapters=()) -> (..., 3 * out)``: the three projections in one GEMM (weights
  read in place); ``adapters``: LoRA adapters (projection, A, B, scaling[, their input]) added inside the op (the
  model passes them by keyword; ``auto`` chooses on the other arguments)
- ``linear(x, weight, bias, activation=None, residual=None) -> act(x @ W^T + b) + residual``
- ``mlp(x, w1, b1, w2, b2, activation, residual=None) -> fc2(act(fc1(x))) + residual``
- ``attention(q, k, v, softmax_scale, bias=None) -> (B, N, H, D)`` for q, k, v (B, N, H, D); or (B1, B2, N, H, D)
  throughout; ``bias`` (B, N), one additive term per key (proportional attention of merged tokens)
- ``attention_qkv(qkv, softmax_scale, bias=None) -> (B, N, H, D)`` for the fused (B, N, 3, H, D) projection output,
  or a (B1, B2, N, 3, H, D) view of one (the factorised models' attention over time: a second batch dim, in place)
- ``patch_embed(pixel_values (B,T,C,H,W), weight, bias, cls_token, pos_embed) -> (B, 1+N, hidden)``
- the C++/CUDA extension's: ``bias_gelu_fast(x, bias)`` and ``preprocess_video(frames uint8 (B,T,H,W,3),
  resize_hw, crop_box, scale, offset, mean, std, dtype) -> (B, T, 3, crop_h, crop_w)``

Every float32 path follows torch's matmul precision setting (``allow_tf32=None`` everywhere: IEEE products unless
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` allow TF32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _triton
from .attention import attention_ref, flash_attention, flash_attention_qkv, sdpa_attention
from .gelu import bias_gelu_fast, bias_gelu_fast_ref, bias_gelu_fast_torch
from .layer_norm import layer_norm, layer_norm_ref, layer_norm_torch
from .linear import (
    linear,
    linear_addmm,
    linear_matmul_ext,
    linear_ref,
    mlp,
    mlp_ref,
    mlp_with,
    qkv_concat,
    qkv_projection,
    qkv_projection_ref,
)
from .patch_embed import patch_embed, patch_embed_conv3d, patch_embed_ref
from .preprocess import preprocess_video, preprocess_video_ref

__all__ = ["Implementation", "CustomOp", "Op", "OPS", "Shape", "aot_modules", "ours", "backend_ops", "launches",
           "transient_bytes", "gemm_flops", "attention_flops"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``fn`` (the op's call signature, forward and backward), ``available(device)``
    (None, or why it cannot run there) and ``runs(device)`` (what it runs there, in words)."""

    name: str
    fn: Callable
    available: Callable[[torch.device], str | None]
    runs: Callable[[torch.device], str]


@dataclass(frozen=True)
class CustomOp:
    """What the device-free counts need of one ``torch.library`` op: its matmul FLOPs (a formula over the op's
    argument shapes, registered with ``torch.utils.flop_counter``; None: no matmul), the kernels one call launches
    (a number, or a function of the call's arguments) and the temporary bytes it allocates inside (which a fake
    tensor run cannot see: a fake implementation allocates only the outputs)."""

    flops: Callable[..., int] | None = None
    launches: int | Callable[[tuple], int] = 1
    transient: Callable[[tuple], int] | None = None


@dataclass(frozen=True)
class Shape:
    """The sizes an op's sample inputs are made at: a ViViT layer's (tokens, hidden, heads x head_dim, MLP width)
    and the clip's (frames of image x image, tubelet)."""

    batch: int
    tokens: int
    hidden: int
    heads: int
    head_dim: int
    inter: int
    frames: int
    image: int
    tubelet: tuple[int, int, int] = (2, 16, 16)

    @classmethod
    def vivit_b(cls, batch: int = 1) -> Shape:
        """ViViT-B/16x2: 3137 tokens of 768, 12 heads of 64, MLP 3072, 32 frames of 224x224."""
        return cls(batch, 3137, 768, 12, 64, 3072, 32, 224)

    @classmethod
    def tiny(cls, batch: int = 1) -> Shape:
        """The acceptance dry run's sizes (67 tokens: not a tile multiple)."""
        return cls(batch, 67, 64, 2, 32, 96, 4, 32)

    @classmethod
    def awkward(cls, batch: int = 2) -> Shape:
        """The unit tests' small awkward sizes (17 tokens, head_dim 16)."""
        return cls(batch, 17, 32, 2, 16, 64, 4, 32)


@dataclass(frozen=True, kw_only=True)
class Op:
    """One op: where it lives, how it is computed, what it costs, how it is checked."""

    name: str
    kernel_module: str  # the file of its kernels (Triton, or csrc/ for the extension's ops)
    module: str  # its custom ops, launcher, functional API and reference
    implementations: dict[str, Implementation]  # ours first: the default, and what attn="triton" pins
    reference: Callable  # eager PyTorch, same signature; fp32 inputs give the ground truth
    flops: Callable[..., float]  # matmul FLOPs of one forward call on these arguments
    bytes: Callable[..., float]  # bytes one forward call must move (inputs read once, outputs written once)
    sample_inputs: Callable[..., tuple]  # (shape, dtype, device, requires_grad, variant) -> seeded arguments
    tests: tuple[str, ...]
    bench: str
    custom_ops: dict[str, CustomOp] = field(default_factory=dict)
    aot_modules: tuple[str, ...] = ()  # modules whose aot_cases() the compile gate compiles
    backward_ratio: float = 2.0  # backward FLOPs / forward FLOPs (dX and dW GEMMs; attention recomputes: 2.5)
    weights: tuple[int, ...] = ()  # the arguments that are a module's parameters (frozen ones cost no gradient)
    variants: tuple[str | None, ...] = (None,)  # sample_inputs' variants (e.g. linear's two epilogues)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)  # the dtypes its checks run in
    backend: bool = True  # a function of the model's Backend table (the layer calls it)

    @property
    def ours(self) -> Implementation:
        return next(iter(self.implementations.values()))


# ------------------------------------------------------------------------------------------------
# Availability and what runs where
# ------------------------------------------------------------------------------------------------
def _triton_here(device: torch.device) -> str | None:
    if not _triton.HAS_TRITON:
        return f"Triton failed to import ({_triton.TRITON_IMPORT_ERROR})"
    if device.type == "cuda" or _triton.INTERPRET:
        return None
    return "Triton kernels need a CUDA device (or the interpreter)"


def _anywhere(device: torch.device) -> str | None:
    return None


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def _ext(op: str) -> Callable[[torch.device], str | None]:
    def here(device: torch.device) -> str | None:
        from . import _extension

        return (
            None if _extension.has_kernel(op, device.type) else f"the extension's {op} is not built for {device.type}"
        )

    return here


def _ours_runs(what: str) -> Callable[[torch.device], str]:
    def runs(device: torch.device) -> str:
        where = "Triton interpreter on cpu" if device.type != "cuda" else "cuda"
        return f"vivit_kernels {what} ({where})"

    return runs


def _ext_runs(what: str) -> Callable[[torch.device], str]:
    return lambda device: f"vivit_kernels extension {what} ({'CUDA kernel' if device.type == 'cuda' else 'C++ on cpu'})"


def _torch_runs(call: str, cuda_library: str) -> Callable[[torch.device], str]:
    def runs(device: torch.device) -> str:
        return f"{call} ({cuda_library})" if device.type == "cuda" else f"{call} on {device.type}"

    return runs


def _impls(*rows: tuple) -> dict[str, Implementation]:
    return {name: Implementation(name, fn, available, runs) for name, fn, available, runs in rows}


def _sdpa(backend: str, fused: bool) -> Callable:
    """The attention op's signature on torch's SDPA restricted to ``backend``: (B, N, 3, H, D) qkv (fused) or q, k,
    v (B, N, H, D), a second batch dimension folded."""

    def attention(*args):
        tensors, (scale, *bias) = (args[:1], args[1:]) if fused else (args[:3], args[3:])
        q, k, v = tensors[0].unbind(-3) if fused else tensors
        return sdpa_attention(q, k, v, scale, *bias, backend=backend)

    attention.__name__ = f"sdpa_{backend.lower()}"
    return attention


def _sdpa_rows(fused: bool) -> list[tuple]:
    # the CPU has a flash kernel too; cuDNN / efficient are CUDA's. A backend that refuses these inputs loses the
    # timing with an infinite time.
    return [
        ("sdpa-flash", _sdpa("FLASH_ATTENTION", fused), _anywhere,
         _torch_runs("SDPA FLASH_ATTENTION", "FlashAttention-2 in torch")),
        ("sdpa-cudnn", _sdpa("CUDNN_ATTENTION", fused), _cuda_only, _torch_runs("SDPA CUDNN_ATTENTION", "cuDNN")),
        ("sdpa-efficient", _sdpa("EFFICIENT_ATTENTION", fused), _cuda_only,
         _torch_runs("SDPA EFFICIENT_ATTENTION", "memory-efficient kernel")),
    ]


def _linear_runs(device: torch.device) -> str:
    return ("torch.addmm / _addmm_activation (cuBLAS / cuBLASLt)" if device.type == "cuda"
            else f"torch.addmm on {device.type}")


def _attention_qkv_ref(qkv, softmax_scale, bias=None):
    return attention_ref(*qkv.unbind(-3), softmax_scale, bias)


# ------------------------------------------------------------------------------------------------
# Costs: every FLOP formula of the package. A GEMM is 2 M N K; attention 4 B H N^2 D forward (QK^T and PV) and
# 2.5x that backward (the recomputed QK^T, dV, dP, dQ, dK)
# ------------------------------------------------------------------------------------------------
def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def attention_flops(q_numel: int, keys: int) -> int:
    """Forward FLOPs of softmax(q k^T) v for ``q_numel`` query elements (B H N D) over ``keys`` keys each."""
    return 4 * q_numel * keys


def _bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _rows(shape) -> int:
    return math.prod(shape[:-1])


# ------------------------------------------------------------------------------------------------
# Sample inputs: seeded, at a Shape, in a dtype, on a device; leaves that require grad where asked
# ------------------------------------------------------------------------------------------------
def _maker(dtype: torch.dtype, device, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad and grad)

    return randn


def _layer_norm_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return r(s.batch, s.tokens, s.hidden, scale=2.0, shift=0.5), r(s.hidden, scale=0.1, shift=1.0), \
        r(s.hidden, scale=0.1), 1e-6


def _qkv_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    c = s.heads * s.head_dim
    weights = [t for _ in range(3) for t in (r(c, s.hidden, scale=s.hidden**-0.5), r(c, scale=0.1))]
    return (r(s.batch, s.tokens, s.hidden), *weights)


def _linear_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    """"o_proj+residual" (hidden -> hidden, bias, residual) or "fc1+gelu_fast" (hidden -> inter, bias, gelu_fast)."""
    r = _maker(dtype, device, requires_grad)
    x = r(s.batch, s.tokens, s.hidden)
    if variant == "fc1+gelu_fast":
        return x, r(s.inter, s.hidden, scale=s.hidden**-0.5), r(s.inter, scale=0.1), "gelu_fast", None
    return x, r(s.hidden, s.hidden, scale=s.hidden**-0.5), r(s.hidden, scale=0.1), None, \
        r(s.batch, s.tokens, s.hidden)


def _mlp_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return (r(s.batch, s.tokens, s.hidden), r(s.inter, s.hidden, scale=s.hidden**-0.5), r(s.inter, scale=0.1),
            r(s.hidden, s.inter, scale=s.inter**-0.5), r(s.hidden, scale=0.1), "gelu_fast",
            r(s.batch, s.tokens, s.hidden))


def _key_bias(s: Shape, device) -> tuple:
    """"proportional": log of the tokens each key stands for (1 to 4), token merging's bias; else nothing."""
    sizes = torch.randint(1, 5, (s.batch, s.tokens), generator=torch.Generator().manual_seed(3))
    return (sizes.float().log().to(device),)


def _attention_qkv_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    bias = _key_bias(s, device) if variant == "proportional" else ()
    return r(s.batch, s.tokens, 3, s.heads, s.head_dim), s.head_dim**-0.5, *bias


def _attention_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    bias = _key_bias(s, device) if variant == "proportional" else ()
    return (*(r(s.batch, s.tokens, s.heads, s.head_dim) for _ in range(3)), s.head_dim**-0.5, *bias)


def _patch_embed_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    t, p, q = s.tubelet
    patches = (s.frames // t) * (s.image // p) * (s.image // q)
    return (r(s.batch, s.frames, 3, s.image, s.image), r(s.hidden, 3, t, p, q, scale=(3 * t * p * q) ** -0.5),
            r(s.hidden, scale=0.1), r(1, 1, s.hidden), r(1, 1 + patches, s.hidden))


def _bias_gelu_fast_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return r(s.batch, s.tokens, s.inter), r(s.inter, scale=0.1)


def _preprocess_video_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    """uint8 frames 3/2 the model's image size (shortest edge resized to 256/224 of it, center crop)."""
    g = torch.Generator().manual_seed(0)
    height, width = s.image * 3 // 2, s.image * 2
    frames = torch.randint(0, 256, (s.batch, s.frames, height, width, 3), generator=g, dtype=torch.uint8)
    short = round(s.image * 256 / 224)
    resized = (short, int(short * width / height))
    box = [(resized[0] - s.image) // 2, (resized[1] - s.image) // 2, s.image, s.image]
    return frames.to(device), list(resized), box, 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3, dtype


def _preprocess_cost(frames, resize_hw, crop_box, *rest):
    dtype = rest[-1]
    out = frames.shape[0] * frames.shape[1] * 3 * crop_box[2] * crop_box[3] * torch.empty(0, dtype=dtype).element_size()
    return _bytes(frames) + out


# ------------------------------------------------------------------------------------------------
# The custom ops' FLOP formulas (over argument shapes) and launch counts
# ------------------------------------------------------------------------------------------------
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
def _linear_bwd_gemms(args) -> int:  # (grad, x, weight, x_shape, needs_dx, needs_dw, needs_db, allow_tf32)
    return int(args[4]) + int(args[5])


def _qkv_bwd_gemms(args) -> int:  # (grad, x, wq, wk, wv, x_shape, needs (x, wq, bq, wk, bk, wv, bv), allow_tf32,
    needs = args[6]                 #  lora_a, lora_b, slots, scales, downs, lora_needs (A, B of each adapter),
    # lora_wide, lora_x, lora_x_needs (each adapter's input)): an adapter's float32 gradients are written by the
    # GEMM (out_dtype) on CUDA, no cast
    adapters = zip(_pairs(args[13]), args[16], strict=True)
    return int(needs[0]) + sum(int(n) for n in needs[1::2][:3]) + \
        sum(int(nu or na) + int(nu) + int(na) + int(nb) for (na, nb), nu in adapters)


def _pairs(flags) -> list[tuple[bool, bool]]:
    return list(zip(flags[0::2], flags[1::2], strict=True))


def _qkv_fwd_launches(args) -> int:  # the GEMM; per adapter two GEMMs and a cast of each float32 weight
    x, lora_a, lora_b = args[0], args[8], args[9]
    return 1 + 2 * len(lora_a) + sum(int(t.dtype != x.dtype) for t in (*lora_a, *lora_b))


def _qkv_fwd_flops(x, wq, bq, wk, bk, wv, bv, allow_tf32, lora_a, lora_b, *args, **kwargs) -> int:
    m = _rows(x)  # the base GEMM; per adapter, x @ A^T and its product with B^T
    return 3 * gemm_flops(m, wq[0], wq[1]) + sum(gemm_flops(m, a[0], a[1]) + gemm_flops(m, b[0], b[1])
                                                 for a, b in zip(lora_a, lora_b, strict=True))


def _qkv_bwd_flops(g, x, wq, wk, wv, x_shape, needs, allow_tf32, lora_a, lora_b, slots, scales, downs, lora_needs,
                   lora_wide, lora_x, lora_x_needs, **kwargs) -> int:
    m, n, k = _rows(g), g[-1] // 3, x_shape[-1]
    flops = (3 * int(needs[0]) + sum(int(w) for w in needs[1::2][:3])) * gemm_flops(m, n, k)
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
    "vivit_kernels::linear_fwd": CustomOp(flops=lambda x, w, *a, **k: gemm_flops(_rows(x), w[0], w[1])),
    "vivit_kernels::linear_bwd": CustomOp(
        flops=lambda g, x, w, x_shape, *a, **k: _linear_bwd_gemms((g, x, w, x_shape, *a)) *
        gemm_flops(_rows(g), g[-1], x_shape[-1]),
        launches=_linear_bwd_gemms),
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


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
_GEMM = "vivit_kernels.ops._gemm"  # the shared GEMM engine's kernels (qkv, linear, mlp)
_KERNEL_TESTS = ("tests/test_cuda.py",)
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            name="layer_norm",
            weights=(1, 2),
            kernel_module="vivit_kernels.ops.layer_norm",
            module="vivit_kernels.ops.layer_norm",
            implementations=_impls(
                ("triton", layer_norm, _triton_here, _ours_runs("LayerNorm kernel")),
                ("torch", layer_norm_torch, _anywhere, _torch_runs("F.layer_norm", "torch's CUDA kernel")),
            ),
            reference=layer_norm_ref,
            flops=lambda x, w, b, eps: 0.0,
            bytes=lambda x, w, b, eps: 2 * _bytes(x) + _bytes(w, b),
            sample_inputs=_layer_norm_inputs,
            custom_ops=_LAYER_NORM_OPS,
            tests=("tests/test_layer_norm.py", *_KERNEL_TESTS),
            bench="bench/test_bench_ops.py::test_layer_norm",
            aot_modules=("vivit_kernels.ops.layer_norm",),
        ),
        Op(
            name="qkv",
            weights=(1, 2, 3, 4, 5, 6),
            kernel_module=_GEMM,
            module="vivit_kernels.ops.linear",
            implementations=_impls(
                ("triton", qkv_projection, _triton_here, _ours_runs("QKV GEMM (three weights read in place)")),
                ("cublas", qkv_concat, _anywhere, _torch_runs("F.linear on torch.cat(weights)", "cuBLAS")),
            ),
            reference=qkv_projection_ref,
            flops=lambda x, wq, bq, wk, bk, wv, bv: 3 * gemm_flops(_rows(x.shape), wq.shape[0], x.shape[-1]),
            bytes=lambda x, *w: _bytes(x, *w) + 3 * _rows(x.shape) * w[0].shape[0] * x.element_size(),
            sample_inputs=_qkv_inputs,
            custom_ops=_QKV_OPS,
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
            bench="bench/test_bench_ops.py::test_qkv_projection",
            aot_modules=(_GEMM,),
        ),
        Op(
            name="linear",
            weights=(1, 2),
            kernel_module=_GEMM,
            module="vivit_kernels.ops.linear",
            implementations=_impls(
                ("triton", linear, _triton_here, _ours_runs("GEMM with fused epilogue")),
                ("cublas", linear_addmm, _anywhere, _linear_runs),
                (
                    "cublas+ext",
                    linear_matmul_ext,
                    _ext("bias_gelu_fast"),
                    _torch_runs("torch.matmul + extension bias_gelu_fast", "cuBLAS + csrc kernel"),
                ),
            ),
            reference=linear_ref,
            flops=lambda x, w, b=None, activation=None, residual=None: gemm_flops(
                _rows(x.shape), w.shape[0], x.shape[-1]
            ),
            bytes=lambda x, w, b=None, activation=None, residual=None: (
                _bytes(x, w, b, residual) + _rows(x.shape) * w.shape[0] * x.element_size()
            ),
            sample_inputs=_linear_inputs,
            variants=("o_proj+residual", "fc1+gelu_fast"),
            custom_ops=_LINEAR_OPS,
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
            bench="bench/test_bench_ops.py::test_linear",
            aot_modules=(_GEMM,),
        ),
        Op(
            name="mlp",
            weights=(1, 2, 3, 4),
            kernel_module=_GEMM,
            module="vivit_kernels.ops.linear",
            implementations=_impls(
                ("triton", mlp, _triton_here, _ours_runs("two GEMMs (bias + gelu_fast, bias + residual)")),
                ("cublas", mlp_with(linear_addmm), _anywhere, lambda d: "2 x " + _linear_runs(d)),
                (
                    "cublas+ext",
                    mlp_with(linear_matmul_ext),
                    _ext("bias_gelu_fast"),
                    _torch_runs("2 x torch.matmul + extension bias_gelu_fast", "cuBLAS + csrc kernel"),
                ),
            ),
            reference=mlp_ref,
            flops=lambda x, w1, *a, **k: 2 * gemm_flops(_rows(x.shape), w1.shape[0], x.shape[-1]),
            bytes=lambda x, w1, b1, w2, b2, activation="gelu_fast", residual=None: (
                _bytes(x, w1, b1, w2, b2, residual) + _rows(x.shape) * w2.shape[0] * x.element_size()
            ),
            sample_inputs=_mlp_inputs,
            custom_ops=_MLP_OPS,
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
            bench="bench/test_bench_ops.py::test_mlp",
            aot_modules=(_GEMM,),
        ),
        # on the fused (B, N, 3, H, D) projection output (the model's path) and on separate q, k, v (when a wrapped
        # projection runs its own forward)
        Op(
            name="attention_qkv",
            kernel_module="vivit_kernels.ops.attention",
            module="vivit_kernels.ops.attention",
            implementations=_impls(
                ("triton", flash_attention_qkv, _triton_here, _ours_runs("flash attention on the fused qkv")),
                *_sdpa_rows(True),
            ),
            reference=_attention_qkv_ref,
            flops=lambda qkv, scale=None, bias=None: attention_flops(qkv.numel() // 3, qkv.shape[-4]),
            bytes=lambda qkv, scale=None, bias=None: _bytes(qkv, bias) + _bytes(qkv) / 3,
            variants=(None, "proportional"),
            sample_inputs=_attention_qkv_inputs,
            custom_ops=_ATTENTION_QKV_OPS,
            backward_ratio=2.5,
            tests=("tests/test_attention.py", *_KERNEL_TESTS),
            bench="bench/test_bench_attention.py::test_attention",
            aot_modules=("vivit_kernels.ops.attention",),
        ),
        Op(
            name="attention",
            kernel_module="vivit_kernels.ops.attention",
            module="vivit_kernels.ops.attention",
            implementations=_impls(
                ("triton", flash_attention, _triton_here, _ours_runs("flash attention")), *_sdpa_rows(False)
            ),
            reference=attention_ref,
            flops=lambda q, k, v, scale=None, bias=None: attention_flops(q.numel(), k.shape[-3]),
            bytes=lambda q, k, v, scale=None, bias=None: 2 * _bytes(q) + _bytes(k, v, bias),
            variants=(None, "proportional"),
            sample_inputs=_attention_inputs,
            custom_ops=_ATTENTION_OPS,
            backward_ratio=2.5,
            tests=("tests/test_attention.py", *_KERNEL_TESTS),
            bench="bench/test_bench_attention.py::test_attention_separate",
            aot_modules=("vivit_kernels.ops.attention",),
        ),
        Op(
            name="patch_embed",
            weights=(1, 2, 3, 4),
            kernel_module="vivit_kernels.ops.patch_embed",
            module="vivit_kernels.ops.patch_embed",
            implementations=_impls(
                ("triton", patch_embed, _triton_here, _ours_runs("implicit-GEMM tubelet Conv3d + [CLS] + positions")),
                ("torch", patch_embed_conv3d, _anywhere, _torch_runs("F.conv3d + cat + add", "cuDNN")),
            ),
            reference=patch_embed_ref,
            flops=lambda x, w, *a: _patch_gemm(x.shape, w.shape),
            bytes=lambda x, w, b, cls, pos: (
                _bytes(x, w, b, pos) + x.shape[0] * pos.shape[1] * w.shape[0] * x.element_size()
            ),
            sample_inputs=_patch_embed_inputs,
            custom_ops=_PATCH_EMBED_OPS,
            tests=("tests/test_patch_embed.py", *_KERNEL_TESTS),
            bench="bench/test_bench_ops.py::test_patch_embed",
            aot_modules=("vivit_kernels.ops.patch_embed",),
        ),
        # the C++/CUDA extension's ops (csrc/: device math in __host__ __device__ functions shared with the CPU build)
        Op(
            name="bias_gelu_fast",
            weights=(1,),
            kernel_module="csrc/cuda/gelu.cu",
            module="vivit_kernels.ops.gelu",
            implementations=_impls(
                ("extension", bias_gelu_fast, _ext("bias_gelu_fast"), _ext_runs("bias + gelu_fast")),
                (
                    "torch",
                    bias_gelu_fast_torch,
                    _anywhere,
                    _torch_runs("F.gelu(x + bias, approximate='tanh')", "torch"),
                ),
            ),
            reference=bias_gelu_fast_ref,
            flops=lambda x, b: 0.0,
            bytes=lambda x, b: 2 * _bytes(x) + _bytes(b),
            sample_inputs=_bias_gelu_fast_inputs,
            backend=False,
            custom_ops={
                "vivit_kernels::bias_gelu_fast": CustomOp(),
                "vivit_kernels::bias_gelu_fast_backward": CustomOp(),
            },
            tests=("tests/test_gelu_ext.py", "tests/test_extension.py"),
            bench="bench/test_bench_ops.py::test_bias_gelu_fast",
        ),
        Op(
            name="preprocess_video",
            kernel_module="csrc/cuda/preprocess.cu",
            module="vivit_kernels.ops.preprocess",
            implementations=_impls(
                ("extension", preprocess_video, _ext("preprocess_video"), _ext_runs("resize + crop + normalise"))
            ),
            reference=preprocess_video_ref,
            flops=lambda *a: 0.0,
            bytes=_preprocess_cost,
            sample_inputs=_preprocess_video_inputs,
            backend=False,
            dtypes=(torch.float32,),
            custom_ops={"vivit_kernels::preprocess_video": CustomOp()},
            tests=("tests/test_preprocess.py", "tests/test_extension.py"),
            bench="bench/test_bench_preprocess.py::test_ours_cpu",
        ),
    )
}

# every custom op's FLOP formula, given to torch's FLOP counter (FlopCounterMode counts our ops like ATen matmuls)
for _op in OPS.values():
    for _name, _spec in _op.custom_ops.items():
        _packet = getattr(torch.ops.vivit_kernels, _name.split("::")[1], None) if _spec.flops else None
        if _packet is not None:
            register_flop_formula(_packet)(_spec.flops)


def ours(op: str) -> Callable:
    """Our implementation of ``op`` (what attn="triton" runs)."""
    return OPS[op].ours.fn


def backend_ops() -> tuple[str, ...]:
    """The ops a ViViT layer calls (the Backend table's functions), in registry order."""
    return tuple(name for name, op in OPS.items() if op.backend)


def aot_modules() -> tuple[str, ...]:
    """Every module whose aot_cases() lists shipped kernels, in registry order, each once."""
    return tuple(dict.fromkeys(m for op in OPS.values() for m in op.aot_modules))


def _custom_op(name: str) -> CustomOp:
    for op in OPS.values():
        if name in op.custom_ops:
            return op.custom_ops[name]
    raise KeyError(f"{name} is no custom op of any registry entry")


def launches(op_name: str, args: tuple) -> int:
    """Kernels one call of custom op ``op_name`` ("vivit_kernels::linear_fwd") launches with these arguments."""
    n = _custom_op(op_name).launches
    return n(args) if callable(n) else n


def transient_bytes(op_name: str, args: tuple) -> int:
    """Bytes custom op ``op_name`` allocates and frees inside one call (beyond its outputs)."""
    fn = _custom_op(op_name).transient
    return fn(args) if fn else 0
