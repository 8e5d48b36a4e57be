"""Benchmarks (pytest-benchmark). On a GPU they measure; on a CPU-only machine they run once each on tiny
shapes (Triton in its interpreter) as part of the default test command, so they cannot rot. Timings taken on
a CPU are CPU timings and are labelled so."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
