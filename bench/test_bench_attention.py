"""Attention: every implementation attn="auto" chooses between (ours, Triton FlashAttention-2, and PyTorch SDPA
restricted to each backend), the "auto" dispatcher, and eager attention, forward and forward+backward, in one run;
ms and TFLOP/s. GPU: ViViT-B shapes (B in {1, 8}, H=12, N=3137, D=64); CPU: tiny shapes.

    pytest bench/test_bench_attention.py --benchmark-enable --benchmark-json attention.json
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.auto.backends import auto_backend
from vivit_kernels.ops.registry import OPS

from bench_utils import DEVICE, DTYPES, ON_GPU, op_flops, run

SHAPES = [(1, 12, 3137, 64), (8, 12, 3137, 64)] if ON_GPU else [(1, 2, 65, 32)]
CANDIDATES = OPS["attention_qkv"].implementations
PROVIDERS = [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n for n in CANDIDATES] + ["auto", "eager"]


def _fn(provider: str):
    if provider == "auto":
        return auto_backend().attention_qkv
    if provider == "eager":
        return OPS["attention_qkv"].reference
    impl = CANDIDATES[provider]
    why = impl.available(DEVICE)
    if why:
        pytest.skip(f"{provider} on {DEVICE.type}: {why}")
    return impl.fn


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, provider, shape, dtype, mode):
    B, H, N, D = shape
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=DTYPES[dtype], requires_grad=mode != "fwd")
    fn = _fn(provider)
    if provider.startswith("sdpa-"):
        try:  # a backend may not support this dtype / GPU: skip, saying why
            fn(qkv.detach(), D**-0.5)
        except RuntimeError as e:
            pytest.skip(f"{provider} unavailable for {dtype}: {str(e).splitlines()[0][:120]}")
    grad = torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPES[dtype])

    def step():
        out = fn(qkv, D**-0.5)
        if mode == "fwd+bwd":
            out.backward(grad)
        return out

    flops = op_flops("attention_qkv", (qkv, D**-0.5), mode != "fwd")
    with torch.set_grad_enabled(mode != "fwd"):
        run(benchmark, step, flops=flops, provider=provider, dtype=dtype, mode=mode, op="attention_qkv")


SEPARATE = OPS["attention"].implementations


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES[:1], ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
@pytest.mark.parametrize(
    "provider", [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n for n in SEPARATE]
)
def test_attention_separate(benchmark, provider, shape, dtype, mode):
    """The same attention on separate q, k, v (B, N, H, D): the path a wrapped projection (e.g. LoRA) takes."""
    B, H, N, D = shape
    impl = SEPARATE[provider]
    why = impl.available(DEVICE)
    if why:
        pytest.skip(f"{provider} on {DEVICE.type}: {why}")
    q, k, v = (
        torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPES[dtype], requires_grad=mode != "fwd") for _ in range(3)
    )
    try:
        impl.fn(q.detach(), k.detach(), v.detach(), D**-0.5)
    except RuntimeError as e:
        pytest.skip(f"{provider} unavailable for {dtype}: {str(e).splitlines()[0][:120]}")

    def step():
        out = impl.fn(q, k, v, D**-0.5)
        if mode == "fwd+bwd":
            out.sum().backward()
        return out

    with torch.set_grad_enabled(mode != "fwd"):
        run(benchmark, step, flops=op_flops("attention", (q, k, v), mode != "fwd"), provider=provider, dtype=dtype,
            mode=mode, op="attention")
