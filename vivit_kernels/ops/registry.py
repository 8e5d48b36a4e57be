"""The op registry: the only list of vivit_kernels' ops. Per op, everything a reader, ``attn="auto"``, ``tune``,
the compile gate, the acceptance run, the device-free counts, the tests and the benchmarks need, in one entry.

    >>> from vivit_kernels.ops.registry import OPS
    >>> from vivit_kernels.ops.sample_inputs import Shape
    >>> op = OPS["linear"]
    >>> op.kernel_module, op.module        # its Triton kernels; its custom ops, functional API and reference
    >>> op.implementations                 # ours first, then the vendor paths "auto" may choose
    >>> op.reference                       # the eager PyTorch definition every implementation is checked against
    >>> args = op.sample_inputs(Shape.awkward(), torch.float32, "cpu", requires_grad=True)
    >>> op.cost(args, training=False)     # one call's matmul FLOPs and bytes moved (ops/formulas.py)
    >>> op.custom_ops                      # its torch.library ops: FLOP formulas, launches, temporaries
    >>> op.tests, op.bench, op.aot_modules

An implementation is an autograd-complete callable with the op's call signature below, plus what it needs
(``available(device)``: None, or why it cannot run there) and what it runs on a device, in words (for tables).
The registry is the table only: the ops' cost formulas are in ``ops/formulas.py``, their sample inputs in
``ops/sample_inputs.py``. Every op list elsewhere is read from ``OPS``, and the tests and benchmarks of the ops are
parametrised from it (tests/test_architecture.py checks both).

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
- token merging's step: ``token_merge(x (B, N, C), keys (B, N, H, D), size (B, N), source (B, N0), r, mode,
  per_slice=1, odd=0) -> (B, N - r, C)``, the merged tokens (the functional ``merge_tokens`` also gives the new
  sizes, source map and proportional attention's bias); ``vivit_kernels.merging`` calls it, not a layer's table

Every float32 path follows torch's matmul precision setting (``allow_tf32=None`` everywhere: IEEE products unless
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` allow TF32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _triton, formulas, sample_inputs
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
from .token_merge import merged_tokens, merged_tokens_ref

__all__ = ["Implementation", "Op", "OPS", "aot_modules", "ours", "backend_ops"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``fn`` (the op's call signature, forward and backward), ``available(device)``
    (None, or why it cannot run there) and ``runs(device)`` (what it runs there, in words)."""

    name: str
    fn: Callable
    available: Callable[[torch.device], str | None]
    runs: Callable[[torch.device], str]


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
    custom_ops: dict[str, formulas.CustomOp] = field(default_factory=dict)
    aot_modules: tuple[str, ...] = ()  # modules whose aot_cases() the compile gate compiles
    backward_ratio: float = 2.0  # backward FLOPs / forward FLOPs (dX and dW GEMMs; attention recomputes: 2.5)
    weights: tuple[int, ...] = ()  # the arguments that are a module's parameters (frozen ones cost no gradient)
    variants: tuple[str | None, ...] = (None,)  # sample_inputs' variants (e.g. linear's two epilogues)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)  # the dtypes its checks run in
    backend: bool = True  # a function of the model's Backend table (the layer calls it)

    @property
    def ours(self) -> Implementation:
        return next(iter(self.implementations.values()))

    @property
    def bench(self) -> str:
        """Its benchmark: the registry-driven one, selected by the op's name."""
        return f"bench/test_bench_ops.py::test_op -k {self.name}"

    def cost(self, args: tuple, training: bool = False) -> tuple[float, float]:
        """(matmul FLOPs, bytes moved) of one call on ``args``; a training call adds its backward
        (``backward_ratio`` x the FLOPs, ``formulas.BACKWARD_BYTES`` x the bytes)."""
        flops, nbytes = self.flops(*args), self.bytes(*args)
        if training:
            flops, nbytes = flops * (1 + self.backward_ratio), nbytes * (1 + formulas.BACKWARD_BYTES)
        return flops, nbytes


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
        tensors, rest = (args[:1], args[1:]) if fused else (args[:3], args[3:])
        scale, *bias = rest or (None,)  # the softmax scale defaults to head_dim ** -0.5, as the reference's
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


def _custom_ops(*names: str) -> dict[str, formulas.CustomOp]:
    return {f"vivit_kernels::{n}": formulas.CUSTOM_OPS[f"vivit_kernels::{n}"] for n in names}


def _attention_qkv_ref(qkv, softmax_scale, bias=None):
    return attention_ref(*qkv.unbind(-3), softmax_scale, bias)



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
            flops=formulas.layer_norm_flops,
            bytes=formulas.layer_norm_bytes,
            sample_inputs=sample_inputs.layer_norm_inputs,
            custom_ops=_custom_ops("layer_norm_fwd", "layer_norm_bwd"),
            tests=("tests/test_layer_norm.py", *_KERNEL_TESTS),
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
            flops=formulas.qkv_flops,
            bytes=formulas.qkv_bytes,
            sample_inputs=sample_inputs.qkv_inputs,
            custom_ops=_custom_ops("qkv_fwd", "qkv_bwd"),
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
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
            flops=formulas.linear_flops,
            bytes=formulas.linear_bytes,
            sample_inputs=sample_inputs.linear_inputs,
            variants=("o_proj+residual", "fc1+gelu_fast"),
            custom_ops=_custom_ops("linear_fwd", "linear_bwd"),
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
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
            flops=formulas.mlp_flops,
            bytes=formulas.mlp_bytes,
            sample_inputs=sample_inputs.mlp_inputs,
            custom_ops=_custom_ops("mlp_fwd", "mlp_bwd"),
            tests=("tests/test_linear.py", *_KERNEL_TESTS),
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
            flops=formulas.attention_qkv_flops,
            bytes=formulas.attention_qkv_bytes,
            variants=(None, "proportional"),
            sample_inputs=sample_inputs.attention_qkv_inputs,
            custom_ops=_custom_ops("flash_attn_qkv_fwd", "flash_attn_qkv_bwd"),
            backward_ratio=2.5,
            tests=("tests/test_attention.py", *_KERNEL_TESTS),
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
            flops=formulas.attention_call_flops,
            bytes=formulas.attention_bytes,
            variants=(None, "proportional"),
            sample_inputs=sample_inputs.attention_inputs,
            custom_ops=_custom_ops("flash_attn_fwd", "flash_attn_bwd"),
            backward_ratio=2.5,
            tests=("tests/test_attention.py", *_KERNEL_TESTS),
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
            flops=formulas.patch_embed_flops,
            bytes=formulas.patch_embed_bytes,
            sample_inputs=sample_inputs.patch_embed_inputs,
            custom_ops=_custom_ops("patch_embed_fwd", "patch_embed_bwd"),
            tests=("tests/test_patch_embed.py", *_KERNEL_TESTS),
            aot_modules=("vivit_kernels.ops.patch_embed",),
        ),
        Op(
            name="token_merge",
            kernel_module="vivit_kernels.ops.token_merge",
            module="vivit_kernels.ops.token_merge",
            implementations=_impls(
                ("triton", merged_tokens, _triton_here,
                 _ours_runs("matching, ranking and merge kernels (4 launches, no similarity matrix)")),
            ),
            reference=merged_tokens_ref,
            flops=formulas.token_merge_flops,
            bytes=formulas.token_merge_bytes,
            sample_inputs=sample_inputs.token_merge_inputs,
            variants=("temporal", "grouped", "alternate"),
            custom_ops=_custom_ops("token_merge_fwd", "token_merge_bwd"),
            backward_ratio=0.0,  # the backward gathers: no matmul
            backend=False,
            tests=("tests/test_token_merge.py", "tests/test_merging.py", *_KERNEL_TESTS),
            aot_modules=("vivit_kernels.ops.token_merge",),
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
            flops=formulas.bias_gelu_fast_flops,
            bytes=formulas.bias_gelu_fast_bytes,
            sample_inputs=sample_inputs.bias_gelu_fast_inputs,
            backend=False,
            custom_ops=_custom_ops("bias_gelu_fast", "bias_gelu_fast_backward"),
            tests=("tests/test_gelu_ext.py", "tests/test_extension.py"),
        ),
        Op(
            name="preprocess_video",
            kernel_module="csrc/cuda/preprocess.cu",
            module="vivit_kernels.ops.preprocess",
            implementations=_impls(
                ("extension", preprocess_video, _ext("preprocess_video"), _ext_runs("resize + crop + normalise"))
            ),
            reference=preprocess_video_ref,
            flops=formulas.preprocess_video_flops,
            bytes=formulas.preprocess_video_bytes,
            sample_inputs=sample_inputs.preprocess_video_inputs,
            backend=False,
            dtypes=(torch.float32,),
            custom_ops=_custom_ops("preprocess_video"),
            tests=("tests/test_preprocess.py", "tests/test_extension.py"),
        ),
    )
}


def ours(op: str) -> Callable:
    """Our implementation of ``op`` (what attn="triton" runs)."""
    return OPS[op].ours.fn


def backend_ops() -> tuple[str, ...]:
    """The ops a ViViT layer calls (the Backend table's functions), in registry order."""
    return tuple(name for name, op in OPS.items() if op.backend)


def aot_modules() -> tuple[str, ...]:
    """Every module whose aot_cases() lists shipped kernels, in registry order, each once."""
    return tuple(dict.fromkeys(m for op in OPS.values() for m in op.aot_modules))
