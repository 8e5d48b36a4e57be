"""Gradients only where asked: every op of the registry that holds a module's weights, with each combination of
frozen weights (each one alone, and all of them), gives the reference's gradients for what trains and None for
what is frozen, launches fewer kernels (no weight-gradient GEMM for a frozen weight), and saves less for the
backward where a saved tensor served only a weight gradient."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _triton
from vivit_kernels.ops.registry import OPS, backend_ops
from vivit_kernels.ops.sample_inputs import Shape
from vivit_kernels.testing import run_with_grads
from vivit_kernels.tools.counting import counting_saved

from helpers import DEVICE, check_against_reference

pytestmark = pytest.mark.triton


def _cases():
    for op in backend_ops():
        weights = OPS[op].weights
        if weights:
            frozen_sets = {(i,) for i in (weights[0], weights[-1])} | {tuple(weights)}
            for variant in OPS[op].variants:
                for frozen in sorted(frozen_sets):
                    yield pytest.param(op, variant, frozen, id="-".join(
                        [op, *([variant] if variant else []), f"frozen{'-'.join(map(str, frozen))}"]))


def _inputs(op: str, variant, frozen: tuple[int, ...]) -> tuple:
    args = OPS[op].sample_inputs(Shape.awkward(), torch.float32, DEVICE, True, variant)
    return tuple(a.detach().requires_grad_(i not in frozen) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))


def _saved_bytes(op: str, args: tuple) -> int:
    """Bytes the op's forward saves for the backward, every saved tensor counted (weights too: freezing a weight
    changes what is saved, not the weight itself)."""
    with counting_saved(params=set()) as saved:
        OPS[op].ours.fn(*args)
    return sum(saved.values())


def _backward_launches(op: str, args: tuple) -> int:
    """Triton kernels the backward launches."""
    out = OPS[op].ours.fn(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, out.dtype)
    before = sum(_triton.LAUNCHES.values())
    out.backward(grad)
    return sum(_triton.LAUNCHES.values()) - before


@pytest.mark.parametrize("op, variant, frozen", list(_cases()))
def test_frozen_weights_get_no_gradient_and_cost_nothing(op, variant, frozen):
    entry = OPS[op]
    args = _inputs(op, variant, frozen)
    check_against_reference(entry.ours.fn, entry.reference, args, torch.float32, name=f"{op} frozen {frozen}")
    _, grads = run_with_grads(entry.ours.fn, args, torch.float32)
    for i, g in enumerate(grads):
        if isinstance(args[i], torch.Tensor) and args[i].is_floating_point():
            assert (g is None) == (i in frozen), (i, frozen)
    full = _inputs(op, variant, ())
    if set(frozen) == set(entry.weights) and entry.kernel_module != "vivit_kernels.ops.layer_norm":
        # a frozen layer launches no weight-gradient kernel (LayerNorm's weight sums share the dx kernel, which
        # skips them: the frozen variant, WEIGHT_GRADS=False, is in the compile gate)
        assert _backward_launches(op, args) < _backward_launches(op, full)
        if entry.kernel_module.endswith("_gemm"):  # the GEMMs kept their input only for the weight gradients
            assert _saved_bytes(op, args) < _saved_bytes(op, full)
