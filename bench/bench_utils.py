"""Shared helpers for the benchmarks: the device, synchronisation, and a runner that times through pytest-benchmark
and stores derived figures (TFLOP/s, GB/s, from the op registry's cost formulas) in ``extra_info``."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# The test device, decided once by the root conftest.py (CUDA when present, else the CPU).
DEVICE = torch.device(os.environ.get("VIVIT_KERNELS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"


def params(names, ours) -> list:
    """pytest parameters for ``names`` (model paths, implementations); those in ``ours`` run Triton kernels (marked
    ``triton``)."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.triton) if n in ours else n for n in names]


def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype for a short name ("bf16")."""
    from vivit_kernels.names import DTYPES

    return getattr(torch, DTYPES[name])


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def device_label() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    import os
    import platform

    return f"CPU {platform.machine()} x{os.cpu_count()} (CPU timing, not a GPU figure)"


def _runs(info: dict) -> str:
    """What a row ran on this device, in words: the op registry's description of an op's implementation, else the
    row's own name (a model path, "auto", the op's reference)."""
    from vivit_kernels.ops.registry import OPS

    op, name = info.get("op"), info.get("implementation")
    impls = OPS[op].implementations if op in OPS else {}
    if name in impls:
        return impls[name].runs(DEVICE)
    return {"auto": "attn='auto' dispatch (the chosen implementation)",
            "reference": "the op's eager reference (torch's separate ops)"}.get(name, str(name or info.get("path")))


def run(benchmark, fn: Callable[[], object], flops: float | None = None, nbytes: float | None = None,
        rounds: int = 10, warmup: int = 2, **info) -> None:
    """Time ``fn`` (synchronised inside the timed call) and attach derived throughput to extra_info (from the
    median; the inter-quartile range says how stable it was).

    One untimed call first (compilation, autotuning, attn="auto"'s measurements) also tells whether ``fn`` runs
    Triton kernels in the interpreter: such a row is a correctness run, timed once and labelled so. On the CPU
    every other row gets at least one warm-up and 5 rounds, so that its median means something."""
    from vivit_kernels.ops import _triton

    def timed():
        result = fn()
        sync()
        return result

    before = sum(_triton.LAUNCHES.values())
    timed()
    interpreted = _triton.INTERPRET and sum(_triton.LAUNCHES.values()) > before
    if interpreted:
        rounds, warmup = 1, 0
    elif not ON_GPU:
        rounds, warmup = max(rounds, 5), max(warmup, 1)
    benchmark.extra_info.update(info, device=device_label(), interpreted=interpreted, runs=_runs(info))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and getattr(stats, "stats", None) else None
    if median and not interpreted:
        benchmark.extra_info["ms"] = median * 1e3
        if flops:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        if nbytes:
            benchmark.extra_info["gbps"] = nbytes / median / 1e9
