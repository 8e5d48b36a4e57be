"""Per-op benchmarks, every case read from the op registry (vivit_kernels/ops/registry.py): for each op, each variant
of its sample inputs and each registered implementation (ours in Triton or the extension, the vendor paths
attn="auto" chooses among), plus the "auto" dispatcher (for the ops a layer runs) and the op's eager reference, in
one run; inference and, where the op has gradients, training (forward + backward). Inputs are the registry's sample
inputs at ViViT-B shapes (batch 1 and 8) on a GPU, its tiny shapes on the CPU (where every case runs once, so the
suite cannot rot); ms, and TFLOP/s or GB/s from the registry's cost formulas (``Op.cost``).

    pytest bench/test_bench_ops.py --benchmark-enable                  # every op
    pytest bench/test_bench_ops.py --benchmark-enable -k attention_qkv  # one op
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.auto.backends import auto_backend
from vivit_kernels.names import dtype_name
from vivit_kernels.ops.registry import OPS
from vivit_kernels.ops.sample_inputs import Shape

from bench_utils import DEVICE, ON_GPU, run

SHAPES = [Shape.vivit_b(1), Shape.vivit_b(8)] if ON_GPU else [Shape.tiny()]
ROUNDS = 20 if ON_GPU else 1
AUTO = "auto"  # the attn="auto" dispatcher: the implementation it chooses for these inputs
REFERENCE = "reference"  # the op's eager PyTorch definition (torch's separate ops)


def _dtype(entry) -> torch.dtype:
    """The dtype an op is timed in: its low-precision one on a GPU (what users run), float32 on the CPU."""
    low = [d for d in entry.dtypes if d != torch.float32]
    return low[0] if ON_GPU and low else torch.float32


def _differentiable(entry) -> bool:
    args = entry.sample_inputs(Shape.awkward(1), torch.float32, "cpu", True, entry.variants[0])
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _cases():
    for op, entry in OPS.items():
        names = [*entry.implementations, *([AUTO] if entry.backend else []), REFERENCE]
        modes = ("fwd", "fwd+bwd") if _differentiable(entry) else ("fwd",)
        for variant in entry.variants:
            for name in names:
                marks = [pytest.mark.triton] if name == "triton" else []
                for shape in SHAPES:
                    for mode in modes:
                        yield pytest.param(op, variant, name, shape, mode, marks=marks, id="-".join(
                            [op, *([variant] if variant else []), name, f"B{shape.batch}", mode]))


def _fn(op: str, name: str):
    entry = OPS[op]
    if name == AUTO:
        return auto_backend().fns[op]
    if name == REFERENCE:
        return entry.reference
    impl = entry.implementations[name]
    why = impl.available(DEVICE)
    if why:
        pytest.skip(f"{op}/{name} on {DEVICE.type}: {why}")
    return impl.fn


@pytest.mark.parametrize("op, variant, name, shape, mode", list(_cases()))
def test_op(benchmark, op, variant, name, shape, mode):
    entry, training = OPS[op], mode == "fwd+bwd"
    dtype = _dtype(entry)
    fn = _fn(op, name)
    args = entry.sample_inputs(shape, dtype, DEVICE, training, variant)
    if name in entry.implementations and name != entry.ours.name:
        try:  # a vendor path may refuse these inputs (a dtype, a head size, this GPU): skipped, saying why
            with torch.no_grad():
                fn(*args)
        except RuntimeError as e:
            pytest.skip(f"{op}/{name} refuses these inputs: {str(e).splitlines()[0][:120]}")

    def step():
        out = fn(*args)
        if training:
            out.sum().backward()
        return out

    flops, nbytes = entry.cost(args, training)
    with torch.set_grad_enabled(training):
        run(benchmark, step, flops=flops or None, nbytes=None if flops else nbytes, rounds=ROUNDS, op=op,
            variant=variant, implementation=name, dtype=dtype_name(dtype), mode=mode, batch=shape.batch)
