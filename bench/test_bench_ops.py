"""Per-op benchmarks at ViViT-B shapes (B=8, N=3137, hidden 768, intermediate 3072; tiny shapes on the CPU): every
implementation attn="auto" chooses between (vivit_kernels.providers.CANDIDATES: ours in Triton, cuBLAS / cuDNN
through torch, the extension's bias + gelu_fast), the "auto" dispatcher itself, and torch's plain separate ops,
in one run; ms and TFLOP/s or GB/s (formulas below).

    pytest bench/test_bench_ops.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from bench_utils import DEVICE, DTYPES, ON_GPU, run
from vivit_kernels import providers
from vivit_kernels.backends import auto_backend
from vivit_kernels.ops import layer_norm_ref, mlp_ref, patch_embed_ref, qkv_projection_ref

B, N, C, FF = (8, 3137, 768, 3072) if ON_GPU else (1, 65, 64, 256)
T, HW, TUBE = (32, 224, (2, 16, 16)) if ON_GPU else (4, 32, (2, 16, 16))
ROUNDS = 20 if ON_GPU else 1
AUTO = auto_backend()


def _providers(op: str, reference) -> list:
    """pytest params: the registered candidates (ours marked triton), "auto", and torch's separate ops where they
    are not already a candidate."""
    out = [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n for n in providers.CANDIDATES[op]]
    return out + ["auto"] + (["torch-separate-ops"] if reference is not None else [])


def _fn(op: str, provider: str, reference):
    if provider == "auto":
        return getattr(AUTO, op)
    if provider == "torch-separate-ops":
        return reference
    fn, check = providers.CANDIDATES[op][provider]
    why = check(DEVICE)
    if why:
        pytest.skip(f"{op}/{provider} on {DEVICE.type}: {why}")
    return fn


def mlp_flops() -> float:
    return 2 * 2 * B * N * C * FF  # two GEMMs: 2 * M * N * K each


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("mlp", mlp_ref))
def test_mlp(benchmark, provider, dtype, mode):
    dt, grad = DTYPES[dtype], mode != "fwd"
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt, requires_grad=grad)
    w1 = (torch.randn(FF, C, device=DEVICE) * C**-0.5).to(dt).requires_grad_(grad)
    b1 = torch.zeros(FF, device=DEVICE, dtype=dt, requires_grad=grad)
    w2 = (torch.randn(C, FF, device=DEVICE) * FF**-0.5).to(dt).requires_grad_(grad)
    b2 = torch.zeros(C, device=DEVICE, dtype=dt, requires_grad=grad)
    r = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    fn = _fn("mlp", provider, mlp_ref)

    def step():
        out = fn(x, w1, b1, w2, b2, "gelu_fast", r)
        if grad:
            out.sum().backward()
        return out

    with torch.set_grad_enabled(grad):
        run(benchmark, step, flops=mlp_flops() * (3 if grad else 1), rounds=ROUNDS, provider=provider, dtype=dtype,
            mode=mode, op="mlp")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("layer_norm", None))
def test_layer_norm(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    w, b = torch.ones(C, device=DEVICE, dtype=dt), torch.zeros(C, device=DEVICE, dtype=dt)
    fn = _fn("layer_norm", provider, layer_norm_ref)
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, b, 1e-6), nbytes=nbytes, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="layer_norm")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("patch_embed", None))
def test_patch_embed(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    t, p, q = TUBE
    x = torch.randn(B, T, 3, HW, HW, device=DEVICE, dtype=dt)
    w = (torch.randn(C, 3, t, p, q, device=DEVICE) * 0.02).to(dt)
    bias, cls = torch.zeros(C, device=DEVICE, dtype=dt), torch.zeros(1, 1, C, device=DEVICE, dtype=dt)
    n = (T // t) * (HW // p) * (HW // q)
    pos = torch.zeros(1, n + 1, C, device=DEVICE, dtype=dt)
    fn = _fn("patch_embed", provider, patch_embed_ref)
    flops = 2 * B * n * C * 3 * t * p * q
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, bias, cls, pos), flops=flops, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="patch_embed")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("qkv", qkv_projection_ref))
def test_qkv_projection(benchmark, provider, dtype):
    """The three projections: one GEMM reading three weights (ours), one cuBLAS GEMM on the weights concatenated
    per call, or three separate GEMMs and a concatenation (torch's separate ops)."""
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    args = [x]
    for _ in range(3):
        args += [(torch.randn(C, C, device=DEVICE) * C**-0.5).to(dt), torch.zeros(C, device=DEVICE, dtype=dt)]
    fn = _fn("qkv", provider, qkv_projection_ref)
    with torch.no_grad():
        run(benchmark, lambda: fn(*args), flops=2 * B * N * C * 3 * C, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="qkv")
