"""Shared test helpers: verbose comparisons and the flash-attention tolerance rule."""

from __future__ import annotations

import torch


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
