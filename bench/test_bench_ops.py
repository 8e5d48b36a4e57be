"""Per-op benchmarks at ViViT-B shapes (B=8, N=3137, hidden 768, intermediate 3072; tiny shapes on the CPU): every
implementation attn="auto" chooses between (the op's entry in vivit_kernels.ops.registry: ours in Triton, cuBLAS /
cuDNN through torch, the extension's bias + gelu_fast), the "auto" dispatcher itself, and torch's plain separate
ops, in one run; ms and TFLOP/s or GB/s (the entry's cost).

    pytest bench/test_bench_ops.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.auto.backends import auto_backend
from vivit_kernels.ops.registry import OPS

from bench_utils import DEVICE, DTYPES, ON_GPU, op_bytes, op_flops, run

B, N, C, FF = (8, 3137, 768, 3072) if ON_GPU else (1, 65, 64, 256)
T, HW, TUBE = (32, 224, (2, 16, 16)) if ON_GPU else (4, 32, (2, 16, 16))
ROUNDS = 20 if ON_GPU else 1
AUTO = auto_backend()


def _providers(op: str, reference: bool) -> list:
    """pytest params: the registered candidates (ours marked triton), "auto" (for the ops the model's backend runs),
    and torch's separate ops (the reference) where they are not already a candidate."""
    out = [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n for n in OPS[op].implementations]
    return out + (["auto"] if OPS[op].backend else []) + (["torch-separate-ops"] if reference else [])


def _fn(op: str, provider: str):
    if provider == "auto":
        return getattr(AUTO, op)
    if provider == "torch-separate-ops":
        return OPS[op].reference
    impl = OPS[op].implementations[provider]
    why = impl.available(DEVICE)
    if why:
        pytest.skip(f"{op}/{provider} on {DEVICE.type}: {why}")
    return impl.fn


def _step(fn, args: tuple, grad: bool):
    """One timed call: ``fn(*args)``, and its backward when timing training."""
    def step():
        out = fn(*args)
        if grad:
            out.sum().backward()
        return out

    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("mlp", True))
def test_mlp(benchmark, provider, dtype, mode):
    dt, grad = DTYPES[dtype], mode != "fwd"
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt, requires_grad=grad)
    w1 = (torch.randn(FF, C, device=DEVICE) * C**-0.5).to(dt).requires_grad_(grad)
    b1 = torch.zeros(FF, device=DEVICE, dtype=dt, requires_grad=grad)
    w2 = (torch.randn(C, FF, device=DEVICE) * FF**-0.5).to(dt).requires_grad_(grad)
    b2 = torch.zeros(C, device=DEVICE, dtype=dt, requires_grad=grad)
    r = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    fn = _fn("mlp", provider)
    args = (x, w1, b1, w2, b2, "gelu_fast", r)
    with torch.set_grad_enabled(grad):
        run(benchmark, _step(fn, args, grad), flops=op_flops("mlp", args, grad), rounds=ROUNDS, provider=provider,
            dtype=dtype, mode=mode, op="mlp")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("layer_norm", False))
def test_layer_norm(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    w, b = torch.ones(C, device=DEVICE, dtype=dt), torch.zeros(C, device=DEVICE, dtype=dt)
    fn = _fn("layer_norm", provider)
    nbytes = op_bytes("layer_norm", (x, w, b, 1e-6))
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, b, 1e-6), nbytes=nbytes, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="layer_norm")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("patch_embed", False))
def test_patch_embed(benchmark, provider, dtype):
    dt = DTYPES[dtype]
    t, p, q = TUBE
    x = torch.randn(B, T, 3, HW, HW, device=DEVICE, dtype=dt)
    w = (torch.randn(C, 3, t, p, q, device=DEVICE) * 0.02).to(dt)
    bias, cls = torch.zeros(C, device=DEVICE, dtype=dt), torch.zeros(1, 1, C, device=DEVICE, dtype=dt)
    n = (T // t) * (HW // p) * (HW // q)
    pos = torch.zeros(1, n + 1, C, device=DEVICE, dtype=dt)
    fn = _fn("patch_embed", provider)
    flops = op_flops("patch_embed", (x, w, bias, cls, pos))
    with torch.no_grad():
        run(benchmark, lambda: fn(x, w, bias, cls, pos), flops=flops, rounds=ROUNDS, provider=provider, dtype=dtype,
            op="patch_embed")


@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("qkv", True))
def test_qkv_projection(benchmark, provider, dtype):
    """The three projections: one GEMM reading three weights (ours), one cuBLAS GEMM on the weights concatenated
    per call, or three separate GEMMs and a concatenation (torch's separate ops)."""
    dt = DTYPES[dtype]
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt)
    args = [x]
    for _ in range(3):
        args += [(torch.randn(C, C, device=DEVICE) * C**-0.5).to(dt), torch.zeros(C, device=DEVICE, dtype=dt)]
    fn = _fn("qkv", provider)
    with torch.no_grad():
        run(benchmark, lambda: fn(*args), flops=op_flops("qkv", args), rounds=ROUNDS, provider=provider, dtype=dtype,
            op="qkv")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("epilogue", ["bias+residual", "bias+gelu_fast"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("linear", True))
def test_linear(benchmark, provider, dtype, epilogue, mode):
    """One projection with its epilogue: the attention output projection (bias + residual, C -> C) or fc1
    (bias + gelu_fast, C -> FF)."""
    dt, grad = DTYPES[dtype], mode != "fwd"
    out_features, activation = (C, None) if epilogue == "bias+residual" else (FF, "gelu_fast")
    x = torch.randn(B, N, C, device=DEVICE, dtype=dt, requires_grad=grad)
    w = (torch.randn(out_features, C, device=DEVICE) * C**-0.5).to(dt).requires_grad_(grad)
    b = torch.zeros(out_features, device=DEVICE, dtype=dt, requires_grad=grad)
    r = torch.randn(B, N, C, device=DEVICE, dtype=dt) if activation is None else None
    fn = _fn("linear", provider)
    args = (x, w, b, activation, r)
    with torch.set_grad_enabled(grad):
        run(benchmark, _step(fn, args, grad), flops=op_flops("linear", args, grad), rounds=ROUNDS, provider=provider,
            dtype=dtype, mode=mode, op="linear")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("provider", _providers("bias_gelu_fast", True))
def test_bias_gelu_fast(benchmark, provider, dtype, mode):
    """The extension's bias + gelu_fast (one elementwise pass each way) against torch's tanh GELU and the separate
    ops, on the MLP's hidden activations."""
    dt, grad = DTYPES[dtype], mode != "fwd"
    x = torch.randn(B, N, FF, device=DEVICE, dtype=dt, requires_grad=grad)
    b = torch.zeros(FF, device=DEVICE, dtype=dt, requires_grad=grad)
    fn = _fn("bias_gelu_fast", provider)
    with torch.set_grad_enabled(grad):
        run(benchmark, _step(fn, (x, b), grad), nbytes=op_bytes("bias_gelu_fast", (x, b)) * (3 if grad else 1),
            rounds=ROUNDS, provider=provider, dtype=dtype, mode=mode, op="bias_gelu_fast")
