"""Alias of ``vivit_kernels.tools.aot_reference`` (the compile gate's reference rows; the same module object)."""

import sys

from .tools import aot_reference as _module

sys.modules[__name__] = _module
