"""The op registry: per hot op of a ViViT layer, everything a reader, ``attn="auto"``, ``tune``, the compile gate,
the tests and the benchmarks need, in one entry.

    >>> from vivit_kernels.ops.registry import OPS
    >>> OPS["linear"].implementations      # ours first, then the vendor paths "auto" may choose
    >>> OPS["linear"].reference            # the eager PyTorch reference every implementation is checked against
    >>> OPS["linear"].module, OPS["linear"].tests, OPS["linear"].bench

An :class:`Op` names the module holding its Triton kernels, launcher, ``torch.library`` custom ops (with
``register_fake`` / ``register_autograd``) and functional API; its implementations, each an autograd-complete
callable with the op's call signature below and what it runs on a given device (for tables: "torch.addmm on
cpu", not a brand name); its reference; its cost (FLOPs and bytes of one forward call); the modules whose
``aot_cases()`` the compile gate compiles; its ``torch.library`` custom ops (whose FLOP formulas and launch
counts ``ops/_costs.py`` registers for the device-independent counts); its tests and its benchmark.

Call signatures (what a layer calls; the Backend table in ``backends.py`` is built from these entries):

- ``layer_norm(x, weight, bias, eps) -> x.shape``
- ``qkv(x, wq, bq, wk, bk, wv, bv) -> (..., 3 * out)``: the three projections in one GEMM (weights read in place)
- ``linear(x, weight, bias, activation=None, residual=None) -> act(x @ W^T + b) + residual``
- ``mlp(x, w1, b1, w2, b2, activation, residual=None) -> fc2(act(fc1(x))) + residual``
- ``attention(q, k, v, softmax_scale) -> (B, N, H, D)`` for q, k, v (B, N, H, D); or (B1, B2, N, H, D) throughout
- ``attention_qkv(qkv, softmax_scale) -> (B, N, H, D)`` for the fused (B, N, 3, H, D) projection output, or a
  (B1, B2, N, 3, H, D) view of one (the factorised models' attention over time: a second batch dim, in place)
- ``patch_embed(pixel_values (B,T,C,H,W), weight, bias, cls_token, pos_embed) -> (B, 1+N, hidden)``

Every float32 path follows torch's matmul precision setting (``allow_tf32=None`` everywhere: IEEE products unless
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` allow TF32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _triton
from .activations import gelu_fast
from .attention import attention_ref, flash_attention, flash_attention_qkv
from .layer_norm import layer_norm, layer_norm_ref
from .linear import linear, linear_ref, mlp, mlp_ref, qkv_projection, qkv_projection_ref
from .patch_embed import patch_embed, patch_embed_ref

__all__ = ["Implementation", "Op", "OPS", "aot_modules", "ours"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``fn`` (the op's call signature, forward and backward), ``available(device)``
    (None, or why it cannot run there) and ``runs(device)`` (what it runs there, in words)."""

    name: str
    fn: Callable
    available: Callable[[torch.device], Optional[str]]
    runs: Callable[[torch.device], str]


@dataclass(frozen=True)
class Op:
    name: str
    implementations: dict[str, Implementation]  # ours ("triton") first: the default, and what attn="triton" pins
    reference: Callable  # eager PyTorch, same signature; fp32 inputs give the ground truth
    cost: Callable[..., tuple[float, float]]  # (FLOPs, bytes moved) of one forward call on these arguments
    module: str  # kernels, launcher, custom ops, functional API and reference
    tests: tuple[str, ...]
    bench: str
    aot_modules: tuple[str, ...] = field(default=())  # modules whose aot_cases() the compile gate compiles
    custom_ops: tuple[str, ...] = field(default=())  # its torch.library ops (FLOP formulas, launches: ops/_costs.py)

    @property
    def ours(self) -> Implementation:
        return next(iter(self.implementations.values()))


# ------------------------------------------------------------------------------------------------
# Availability and what runs where
# ------------------------------------------------------------------------------------------------
def _triton_here(device: torch.device) -> Optional[str]:
    if not _triton.HAS_TRITON:
        return f"Triton failed to import ({_triton.TRITON_IMPORT_ERROR})"
    if device.type == "cuda" or _triton.INTERPRET:
        return None
    return "Triton kernels need a CUDA device (or the interpreter)"


def _anywhere(device: torch.device) -> Optional[str]:
    return None


def _cuda_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "needs a CUDA device"


def _ext_here(device: torch.device) -> Optional[str]:
    from . import _extension

    return None if _extension.has_kernel("bias_gelu_fast", device.type) else \
        "the extension's bias_gelu_fast is not built for this device"


def _ours_runs(what: str) -> Callable[[torch.device], str]:
    def runs(device: torch.device) -> str:
        where = "Triton interpreter on cpu" if device.type != "cuda" else "cuda"
        return f"vivit_kernels {what} ({where})"

    return runs


def _torch_runs(call: str, cuda_library: str) -> Callable[[torch.device], str]:
    def runs(device: torch.device) -> str:
        return f"{call} ({cuda_library})" if device.type == "cuda" else f"{call} on {device.type}"

    return runs


# ------------------------------------------------------------------------------------------------
# Vendor implementations: the same functions through torch (cuBLAS / cuBLASLt / cuDNN / SDPA on CUDA)
# ------------------------------------------------------------------------------------------------
def _sdpa(backend: str, fused: bool) -> Callable:
    """SDPA restricted to one backend, on (B, N, 3, H, D) qkv (fused) or q, k, v (B, N, H, D); a second batch
    dimension (B1, B2, ...) is folded into the first (a copy where the view does not fold)."""

    def attention(*args):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        *tensors, scale = args
        q, k, v = tensors[0].unbind(-3) if fused else tensors
        shape = q.shape
        q, k, v = (t.reshape(-1, *shape[-3:]).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(shape)

    attention.__name__ = f"sdpa_{backend.lower()}"
    return attention


def qkv_concat(x, wq, bq, wk, bk, wv, bv):
    """One GEMM with the bias epilogue on the three weights concatenated (a 3 x hidden^2 copy per call)."""
    bias = None if bq is None else torch.cat([bq, bk, bv])
    return F.linear(x, torch.cat([wq, wk, wv]), bias)


def linear_addmm(x, w, b, activation=None, residual=None):
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


def linear_matmul_ext(x, w, b, activation=None, residual=None):
    """torch's GEMM, then the extension's bias + gelu_fast kernel (one pass) where there is an activation."""
    from .gelu import bias_gelu_fast

    if activation != "gelu_fast" or b is None:
        return linear_addmm(x, w, b, activation, residual)
    y = bias_gelu_fast(x @ w.t(), b)
    return y if residual is None else y + residual


def _mlp_with(linear_fn: Callable) -> Callable:
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


def _linear_runs(device: torch.device) -> str:
    return ("torch.addmm / _addmm_activation (cuBLAS / cuBLASLt)" if device.type == "cuda"
            else f"torch.addmm on {device.type}")


def _attention_qkv_ref(qkv, softmax_scale):
    return attention_ref(*qkv.unbind(-3), softmax_scale)


# ------------------------------------------------------------------------------------------------
# Costs of one forward call (FLOPs, bytes read + written), for benchmarks and reports
# ------------------------------------------------------------------------------------------------
def _bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _layer_norm_cost(x, w, b, eps):
    return 8.0 * x.numel(), 2 * _bytes(x) + _bytes(w, b)


def _qkv_cost(x, wq, bq, wk, bk, wv, bv):
    m, k, n = _rows(x), x.shape[-1], wq.shape[0] + wk.shape[0] + wv.shape[0]
    return 2.0 * m * n * k, _bytes(x, wq, bq, wk, bk, wv, bv) + m * n * x.element_size()


def _linear_cost(x, w, b, activation=None, residual=None):
    m, k, n = _rows(x), x.shape[-1], w.shape[0]
    return 2.0 * m * n * k, _bytes(x, w, b, residual) + m * n * x.element_size()


def _mlp_cost(x, w1, b1, w2, b2, activation="gelu_fast", residual=None):
    m, c, ff = _rows(x), x.shape[-1], w1.shape[0]
    return 4.0 * m * c * ff, _bytes(x, w1, b1, w2, b2, residual) + m * c * x.element_size()


def _attention_cost(q, k, v, softmax_scale):  # (B, N, H, D) or (B1, B2, N, H, D)
    return 4.0 * q.numel() * k.shape[-3], 2 * _bytes(q) + _bytes(k, v)


def _attention_qkv_cost(qkv, softmax_scale):  # (B, N, 3, H, D) or (B1, B2, N, 3, H, D)
    return 4.0 * (qkv.numel() // 3) * qkv.shape[-4], _bytes(qkv) * 4 / 3


def _patch_embed_cost(pixel_values, weight, bias, cls_token, pos_embed):
    batch, tokens, hidden = pixel_values.shape[0], pos_embed.shape[1], weight.shape[0]
    k = weight[0].numel()
    return 2.0 * batch * (tokens - 1) * hidden * k, _bytes(pixel_values, weight, bias, pos_embed) + \
        batch * tokens * hidden * pixel_values.element_size()


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def _impls(*rows: tuple) -> dict[str, Implementation]:
    return {name: Implementation(name, fn, available, runs) for name, fn, available, runs in rows}


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


def _ops(*names: str) -> tuple[str, ...]:
    return tuple(f"vivit_kernels::{n}" for n in names)


_GEMM_AOT = ("vivit_kernels.ops._gemm",)  # the shared GEMM engine's kernels
OPS: dict[str, Op] = {
    "layer_norm": Op(
        "layer_norm",
        _impls(("triton", layer_norm, _triton_here, _ours_runs("LayerNorm kernel")),
               ("torch", layer_norm_ref, _anywhere, _torch_runs("F.layer_norm", "torch's CUDA kernel"))),
        layer_norm_ref, _layer_norm_cost, "vivit_kernels.ops.layer_norm",
        ("tests/test_layer_norm.py", "tests/test_cuda.py"),
        "bench/test_bench_ops.py::test_layer_norm", ("vivit_kernels.ops.layer_norm",), 
        custom_ops=_ops("layer_norm_fwd", "layer_norm_bwd")),
    "qkv": Op(
        "qkv",
        _impls(("triton", qkv_projection, _triton_here, _ours_runs("QKV GEMM (three weights read in place)")),
               ("cublas", qkv_concat, _anywhere, _torch_runs("F.linear on torch.cat(weights)", "cuBLAS"))),
        qkv_projection_ref, _qkv_cost, "vivit_kernels.ops.linear", ("tests/test_linear.py", "tests/test_cuda.py"),
        "bench/test_bench_ops.py::test_qkv_projection", _GEMM_AOT, 
        custom_ops=_ops("qkv_fwd", "qkv_bwd")),
    "linear": Op(
        "linear",
        _impls(("triton", linear, _triton_here, _ours_runs("GEMM with fused epilogue")),
               ("cublas", linear_addmm, _anywhere, _linear_runs),
               ("cublas+ext", linear_matmul_ext, _ext_here,
                _torch_runs("torch.matmul + extension bias_gelu_fast", "cuBLAS + csrc kernel"))),
        linear_ref, _linear_cost, "vivit_kernels.ops.linear", ("tests/test_linear.py", "tests/test_cuda.py"),
        "bench/test_bench_ops.py::test_linear", _GEMM_AOT, 
        custom_ops=_ops("linear_fwd", "linear_bwd")),
    "mlp": Op(
        "mlp",
        _impls(("triton", mlp, _triton_here, _ours_runs("two GEMMs (bias + gelu_fast, bias + residual)")),
               ("cublas", _mlp_with(linear_addmm), _anywhere,
                lambda d: "2 x " + _linear_runs(d)),
               ("cublas+ext", _mlp_with(linear_matmul_ext), _ext_here,
                _torch_runs("2 x torch.matmul + extension bias_gelu_fast", "cuBLAS + csrc kernel"))),
        mlp_ref, _mlp_cost, "vivit_kernels.ops.linear", ("tests/test_linear.py", "tests/test_cuda.py"),
        "bench/test_bench_ops.py::test_mlp", _GEMM_AOT,
        custom_ops=_ops("mlp_fwd", "mlp_bwd")),
    # on the fused (B, N, 3, H, D) projection output (the model's path) and on separate q, k, v (when a wrapped
    # projection runs its own forward)
    "attention_qkv": Op(
        "attention_qkv",
        _impls(("triton", flash_attention_qkv, _triton_here, _ours_runs("flash attention on the fused qkv")),
               *_sdpa_rows(True)),
        _attention_qkv_ref, _attention_qkv_cost, "vivit_kernels.ops.attention",
        ("tests/test_attention.py", "tests/test_cuda.py"), "bench/test_bench_attention.py::test_attention",
        ("vivit_kernels.ops.attention",), 
        custom_ops=_ops("flash_attn_qkv_fwd", "flash_attn_qkv_bwd")),
    "attention": Op(
        "attention",
        _impls(("triton", flash_attention, _triton_here, _ours_runs("flash attention")), *_sdpa_rows(False)),
        attention_ref, _attention_cost, "vivit_kernels.ops.attention",
        ("tests/test_attention.py", "tests/test_cuda.py"),
        "bench/test_bench_attention.py::test_attention_separate", ("vivit_kernels.ops.attention",), 
        custom_ops=_ops("flash_attn_fwd", "flash_attn_bwd")),
    "patch_embed": Op(
        "patch_embed",
        _impls(("triton", patch_embed, _triton_here, _ours_runs("implicit-GEMM tubelet Conv3d + [CLS] + positions")),
               ("torch", patch_embed_ref, _anywhere, _torch_runs("F.conv3d + cat + add", "cuDNN"))),
        patch_embed_ref, _patch_embed_cost, "vivit_kernels.ops.patch_embed",
        ("tests/test_patch_embed.py", "tests/test_cuda.py"), "bench/test_bench_ops.py::test_patch_embed",
        ("vivit_kernels.ops.patch_embed",), 
        custom_ops=_ops("patch_embed_fwd", "patch_embed_bwd")),
}


def ours(op: str) -> Callable:
    """Our implementation of ``op`` (what attn="triton" runs)."""
    return OPS[op].ours.fn


def aot_modules() -> tuple[str, ...]:
    """Every module whose aot_cases() lists shipped kernels, in registry order, each once."""
    return tuple(dict.fromkeys(m for op in OPS.values() for m in op.aot_modules))
