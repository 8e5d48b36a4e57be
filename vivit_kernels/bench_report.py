"""Alias of ``vivit_kernels.tools.bench_report`` (the benchmark report; the same module object)."""

import sys

from .tools import bench_report as _module

sys.modules[__name__] = _module
