"""Per-op microbenchmarks at ViViT-B shapes (B=8, N=3137, hidden 768, intermediate 3072; tiny shapes on the
CPU), ours against the torch equivalents, in ms and TFLOP/s or GB/s. FLOP and byte formulas are below.

- MLP: ours (2 fused GEMMs) vs cuBLAS + separate bias-gelu + cuBLAS + add, and vs cuBLAS + our CUDA
  bias_gelu_fast (the extension's alternative epilogue)
- LayerNorm: ours vs F.layer_norm (GB/s: read x, write y)
- patch embedding: ours (implicit GEMM + epilogue) vs Conv3d + flatten + cat + add
- QKV projection: ours vs F.linear
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench_utils import DEVICE, DTYPES, ON_GPU, params, run
from vivit_kernels.ops import bias_gelu_fast, layer_norm, layer_norm_ref, linear, mlp, mlp_ref, patch_embed, patch_embed_ref

B, N, C, FF = (8, 3137, 768, 3072) if ON_GPU else (1, 65, 64, 256)
T, HW, TUBE = (32, 224, (2, 16, 16)) if ON_GPU else (4, 32, (2, 16, 16))
ROUNDS = 20 if ON_GPU else 1


def mlp_flops() -> float:
    return 2 * 2 * B * N * C * FF  # two GEMMs: 2 * M * N * K each


def _cublas_separate_gelu(x, w1, b1, w2, b2, r):
    return F.linear(F.gelu(F.linear(x, w1) + b1, approximate="tanh"), w2, b2) + r


def _cublas_ext_gelu(x, w1, b1, w2, b2, r):
    return F.linear(bias_gelu_fast(F.linear(x, w1), b1), w2, b2) + r


MLP_PROVIDERS = {
    "vivit_kernels (fused)": lambda x, w1, b1, w2, b2, r: mlp(x, w1, b1, w2, b2, residual=r),
    "torch (cuBLAS + separate ops)": lambda x, w1, b1, w2, b2, r: mlp_ref(x, w1, b1, w2, b2, residual=r),
    "cuBLAS + bias+gelu (torch, tanh)": _cublas_separate_gelu,
    "cuBLAS + bias_gelu_fast (our CUDA op)": _cublas_ext_gelu,
}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", params(MLP_PROVIDERS, ours={"vivit_kernels (fused)"}))
def test_mlp(benchmark, provider, dtype, mode):
    dt = DTYPES[dtype]
    grad = mode != "fwd"
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt, requires_grad=grad)
    w1 = (torch.randn(FF, C, device=DEVICE) * C**-0.5).to(dt).requires_grad_(grad)
    b1 = torch.zeros(FF, device=DEVICE, dtype=dt, requires_grad=grad)
    w2 = (torch.randn(C, FF, device=DEVICE) * FF**-0.5).to(dt).requires_grad_(grad)
    b2 = torch.zeros(C, device=DEVICE, dtype=dt, requires_grad=grad)
    r = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    fn = MLP_PROVIDERS[provider]

    def step():
        out = fn(x, w1, b1, w2, b2, r)
        if grad:
            out.sum().backward()
        return out

    with torch.set_grad_enabled(grad):
        run(benchmark, step, flops=mlp_flops() * (3 if grad else 1), rounds=ROUNDS, provider=provider, dtype=dtype,
            mode=mode, op="mlp")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", params(["vivit_kernels", "torch"], ours={"vivit_kernels"}))
def test_layer_norm(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    w, b = torch.ones(C, device=DEVICE, dtype=dt), torch.zeros(C, device=DEVICE, dtype=dt)
    fn = layer_norm if provider == "vivit_kernels" else layer_norm_ref
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, b, 1e-6), nbytes=nbytes, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="layer_norm")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", params(["vivit_kernels", "torch"], ours={"vivit_kernels"}))
def test_patch_embed(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    t, p, q = TUBE
    x = torch.randn(B, T, 3, HW, HW, device=DEVICE, dtype=dt)
    w = (torch.randn(C, 3, t, p, q, device=DEVICE) * 0.02).to(dt)
    bias, cls = torch.zeros(C, device=DEVICE, dtype=dt), torch.zeros(1, 1, C, device=DEVICE, dtype=dt)
    n = (T // t) * (HW // p) * (HW // q)
    pos = torch.zeros(1, n + 1, C, device=DEVICE, dtype=dt)
    fn = patch_embed if provider == "vivit_kernels" else patch_embed_ref
    flops = 2 * B * n * C * 3 * t * p * q
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, bias, cls, pos), flops=flops, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="patch_embed")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", params(["vivit_kernels", "torch"], ours={"vivit_kernels"}))
def test_qkv_projection(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    w, b = (torch.randn(3 * C, C, device=DEVICE) * C**-0.5).to(dt), torch.zeros(3 * C, device=DEVICE, dtype=dt)
    fn = linear if provider == "vivit_kernels" else F.linear
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, b), flops=2 * B * N * C * 3 * C, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="qkv")
