"""Alias of ``vivit_kernels.tools.aot`` (the compile gate; the same module object)."""

import sys

from .tools import aot as _module

sys.modules[__name__] = _module
