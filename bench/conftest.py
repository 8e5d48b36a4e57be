"""Benchmarks (pytest-benchmark). On a GPU they measure; on a CPU-only machine they run once each on tiny
shapes (Triton in its interpreter) as part of the default test command, so they cannot rot. Timings taken on
a CPU are CPU timings and are labelled so. The device is decided by the repository's root conftest.py."""
