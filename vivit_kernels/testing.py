"""The tolerance rule every correctness check uses: the test suite's (tests/helpers.py) and the GPU acceptance
run's (vivit_kernels.acceptance), so both judge a kernel the same way.

- fp32: strict, ``max|out - ref| <= atol`` (scaled by the reference's magnitude when it is large): 1e-4 for IEEE
  products, 1e-2 where torch's matmul precision allows TF32 (``fp32_atol``);
- fp16 / bf16: flash-attention's rule, ``max|out - ref_fp32| <= 2 * max|torch_same_dtype - ref_fp32| + eps``,
  3x for gradients.

A failed check raises AssertionError saying where and by how much.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["assert_close", "max_abs_diff", "assert_within_rule", "check_against_reference", "compare_to_reference",
           "judge", "judge_outputs", "grad_eps", "fp32_atol", "run_with_grads", "Comparison"]


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
    c = judge(name, out, ref_fp32, torch_lowp, factor, eps)
    assert c.ok, (f"{name}: max abs error {c.error:.3g} vs fp32 reference exceeds {factor} x PyTorch's own "
                  f"same-dtype error {max_abs_diff(torch_lowp, ref_fp32):.3g} + {eps}")


@dataclasses.dataclass
class Comparison:
    """One checked tensor: its largest error against the fp32 reference and what the rule allows."""

    name: str
    error: float
    allowed: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.allowed

    def message(self) -> str:
        return f"{self.name}: max abs error {self.error:.3g} > allowed {self.allowed:.3g}" + (
            f" ({self.detail})" if self.detail else ""
        )


def run_with_grads(fn, inputs, dtype: torch.dtype, grad_seed: int = 1):
    """``fn(*inputs)`` with the floating-point inputs cast to ``dtype`` (leaves keep requires_grad), backward of a
    seeded random output gradient: (output, [input gradient or None])."""
    leaves = [
        t.detach().to(dtype).requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in inputs
    ]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
        out.backward(g)
    grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return out.detach(), grads


def judge(name: str, out: torch.Tensor, ref_fp32: torch.Tensor, torch_lowp: torch.Tensor | None = None,
          factor: float = 2.0, eps: float = 1e-5, fp32_atol: float = 1e-4) -> Comparison:
    """The rule for one tensor: without ``torch_lowp`` (fp32) max|out - ref| <= fp32_atol * max(1, max|ref|);
    with it, max|out - ref| <= factor * max|torch_lowp - ref| + eps."""
    if out.shape != ref_fp32.shape:
        return Comparison(name, math.inf, 0.0, f"shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}")
    a, e = out.detach().double(), ref_fp32.detach().double()
    diff = (a - e).abs()
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = (~torch.isfinite(a)).nonzero()[:3].tolist()
        return Comparison(name, math.inf, 0.0, f"non-finite values at {bad}")
    error = diff.max().item() if diff.numel() else 0.0
    if torch_lowp is None:
        allowed = fp32_atol * max(1.0, e.abs().max().item() if e.numel() else 0.0)
    else:
        allowed = factor * max_abs_diff(torch_lowp, ref_fp32) + eps
    detail = ""
    if error > allowed:
        idx = torch.unravel_index(diff.argmax(), diff.shape)
        detail = (f"{int((diff > allowed).sum())}/{diff.numel()} elements off; worst at {tuple(int(i) for i in idx)}: "
                  f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")
    return Comparison(name, error, allowed, detail)


def fp32_atol() -> float:
    """The fp32 tolerance under torch's current matmul precision: TF32 products (precision "high" / "medium") round
    to 10 mantissa bits, so 1e-2; IEEE ("highest", torch's default) 1e-4."""
    return 1e-2 if torch.get_float32_matmul_precision() != "highest" else 1e-4


def grad_eps(ref: torch.Tensor) -> float:
    """The rule's additive slack for a gradient (or any output of large magnitude): 1e-4 of its largest value, at
    least 1e-4."""
    return 1e-4 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)


def judge_outputs(out: torch.Tensor, grads, ref, low=None, fp32_atol: float = 1e-4, name: str = "",
                  grad_names=None) -> list[Comparison]:
    """The rule over one call: its output and every input gradient the reference has. ``ref``: (output, gradients)
    of the reference in fp32; ``low``: the same in the tested dtype (None when that is fp32). Outputs within 2x
    PyTorch's own same-dtype error (+ eps), gradients within 3x (+ 1e-4 of their magnitude); fp32 strict. A
    gradient the reference has and ``grads`` lacks (None) fails; ``grad_names`` name the gradients."""
    ref_out, ref_grads = ref
    low_out, low_grads = low if low is not None else (None, [None] * len(ref_grads))
    prefix = f"{name} " if name else ""
    results = [judge(f"{prefix}out", out, ref_out, low_out, 2.0, fp32_atol=fp32_atol)]
    names = grad_names or [f"grad[{i}]" for i in range(len(ref_grads))]
    for label, g, rg, lg in zip(names, grads, ref_grads, low_grads, strict=True):
        if rg is None:
            continue
        if g is None:
            results.append(Comparison(f"{prefix}{label}", math.inf, 0.0, "no gradient where the reference has one"))
            continue
        results.append(judge(f"{prefix}{label}", g, rg, lg, 3.0, eps=grad_eps(rg), fp32_atol=fp32_atol))
    return results


def compare_to_reference(ours, ref, inputs, dtype: torch.dtype, grad_seed: int = 1, fp32_atol: float = 1e-4,
                         name: str = "") -> list[Comparison]:
    """Run ``ours`` in ``dtype`` and ``ref`` in fp32 (and in ``dtype`` when that is not fp32) on the same inputs;
    judge the output and the gradient of every input that requires one (:func:`judge_outputs`)."""
    out, grads = run_with_grads(ours, inputs, dtype, grad_seed)
    ref32 = run_with_grads(ref, inputs, torch.float32, grad_seed)
    if out.dtype != dtype:
        return [Comparison(f"{name} out", math.inf, 0.0, f"output dtype {out.dtype}, expected {dtype}")]
    low = None if dtype == torch.float32 else run_with_grads(ref, inputs, dtype, grad_seed)
    return judge_outputs(out, grads, ref32, low, fp32_atol, name)


def check_against_reference(ours, ref, inputs, dtype, grad_seed: int = 1, fp32_atol: float = 1e-4, name: str = ""):
    """:func:`compare_to_reference`, raising AssertionError on the first tensor outside the rule."""
    for c in compare_to_reference(ours, ref, inputs, dtype, grad_seed, fp32_atol, name):
        assert c.ok, c.message()
