"""Attention: ours (Triton FlashAttention-2) vs PyTorch SDPA (each backend) and eager, forward and
forward+backward, in ms and TFLOP/s. GPU: ViViT-B shapes (B in {1, 8}, H=12, N=3137, D=64); CPU: tiny shapes.

    pytest bench/test_bench_attention.py --benchmark-enable --benchmark-json attention.json
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench_utils import DEVICE, DTYPES, ON_GPU, attention_flops, params, run
from vivit_kernels.ops.attention import attention_ref, flash_attention

SHAPES = [(1, 12, 3137, 64), (8, 12, 3137, 64)] if ON_GPU else [(1, 2, 65, 32)]
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"] if ON_GPU else ["default"]


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        ctx = contextlib.nullcontext() if backend == "default" else sdpa_kernel(
            {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
        )
        with ctx:
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return fn


PROVIDERS = {"vivit_kernels": flash_attention, "eager": attention_ref, **{f"sdpa-{b}": _sdpa(b) for b in SDPA_BACKENDS}}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("provider", params(PROVIDERS, ours={"vivit_kernels"}))
def test_attention(benchmark, provider, shape, dtype, mode):
    B, H, N, D = shape
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=DTYPES[dtype], requires_grad=mode != "fwd")
    q, k, v = qkv.unbind(2)
    fn = PROVIDERS[provider]
    if provider.startswith("sdpa-") and ON_GPU:
        try:  # a backend may not support this dtype / GPU: skip, saying why
            fn(q, k, v)
        except RuntimeError as e:
            pytest.skip(f"{provider} unavailable for {dtype}: {str(e).splitlines()[0][:120]}")
    grad = torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPES[dtype])

    def step():
        out = fn(q, k, v)
        if mode == "fwd+bwd":
            out.backward(grad)
        return out

    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, step, flops=attention_flops(B, H, N, D, False), provider=provider, dtype=dtype, mode=mode)
    else:
        run(benchmark, step, flops=attention_flops(B, H, N, D, True), provider=provider, dtype=dtype, mode=mode)
