"""Shared test helpers: the test device, verbose comparisons and the flash-attention tolerance rule.

The same helpers and tolerances serve the CPU run (Triton interpreter) and a CUDA run (compiled kernels): tests
build inputs on the CPU from seeded generators and move them to the test device, so both runs see the same
numbers.
"""

from __future__ import annotations

import os

import torch

# Decided once, by the root conftest.py (CUDA when present, else the CPU with the Triton interpreter).
DEVICE = torch.device(os.environ.get("VIVIT_KERNELS_TEST_DEVICE", "cpu"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """allclose that says where and by how much it failed."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    diff = (a - e).abs()
    limit = atol + rtol * e.abs()
    if (diff > limit).any():
        idx = torch.unravel_index(diff.argmax(), diff.shape)
        n_bad = int((diff > limit).sum())
        raise AssertionError(
            f"{name}: {n_bad}/{diff.numel()} elements off; max abs diff {diff.max().item():.3g} at "
            f"{tuple(int(i) for i in idx)} (got {a[idx].item():.6g}, expected {e[idx].item():.6g}); "
            f"atol={atol} rtol={rtol}"
        )


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_within_rule(out, ref_fp32, torch_lowp, factor: float = 2.0, eps: float = 1e-5, name: str = "") -> None:
    """flash-attention's low-precision rule: |out - ref| <= factor * |torch_same_dtype - ref| + eps."""
    ours = max_abs_diff(out, ref_fp32)
    theirs = max_abs_diff(torch_lowp, ref_fp32)
    assert ours <= factor * theirs + eps, (
        f"{name}: max abs error {ours:.3g} vs fp32 reference exceeds {factor} x PyTorch's own "
        f"same-dtype error {theirs:.3g} + {eps}"
    )


def check_against_reference(ours, ref, inputs, dtype, grad_seed: int = 1, fp32_atol: float = 1e-4, name: str = ""):
    """Run ``ours`` in ``dtype`` and ``ref`` in fp32 (and in ``dtype``) on the same inputs; compare the
    output and the gradient of every input that requires one.

    fp32: max abs difference <= fp32_atol (scaled by the reference's magnitude when it is large).
    fp16 / bf16: the flash-attention rule, output error <= 2x PyTorch's own same-dtype error (+ eps),
    gradients <= 3x.
    """

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in inputs]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            out.backward(g)
        grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
        return out.detach(), grads

    out, grads = run(ours, dtype)
    ref_out, ref_grads = run(ref, torch.float32)
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}, expected {dtype}"
    if dtype == torch.float32:
        scale = max(1.0, ref_out.abs().max().item())
        assert_close(out, ref_out, fp32_atol * scale, name=f"{name} out")
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            if rg is not None:
                assert_close(g, rg, fp32_atol * max(1.0, rg.abs().max().item()), name=f"{name} grad[{i}]")
        return
    low_out, low_grads = run(ref, dtype)
    assert_within_rule(out, ref_out, low_out, 2.0, name=f"{name} out")
    for i, (g, rg, lg) in enumerate(zip(grads, ref_grads, low_grads)):
        if rg is not None:
            assert_within_rule(g, rg, lg, 3.0, eps=1e-4 * max(1.0, rg.abs().max().item()), name=f"{name} grad[{i}]")


def run_without_interpreter(code: str):
    """Run ``code`` in a fresh Python without TRITON_INTERPRET (as on a CPU machine outside the test suite)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
