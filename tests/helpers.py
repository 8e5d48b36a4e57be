"""Shared test helpers: the test device, verbose comparisons and the flash-attention tolerance rule.

The same helpers and tolerances serve the CPU run (Triton interpreter) and a CUDA run (compiled kernels): tests
build inputs on the CPU from seeded generators and move them to the test device, so both runs see the same
numbers. The comparisons and the tolerance rule live in vivit_kernels.testing, which the GPU acceptance run
(`vivit-kernels acceptance`) uses too.
"""

from __future__ import annotations

import os

import torch

from vivit_kernels.testing import assert_close, assert_within_rule, check_against_reference, max_abs_diff  # noqa: F401

# Decided once, by the root conftest.py (CUDA when present, else the CPU with the Triton interpreter).
DEVICE = torch.device(os.environ.get("VIVIT_KERNELS_TEST_DEVICE", "cpu"))


def run_without_interpreter(code: str):
    """Run ``code`` in a fresh Python without TRITON_INTERPRET (as on a CPU machine outside the test suite)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
