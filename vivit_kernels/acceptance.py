"""Alias of ``vivit_kernels.tools.acceptance`` (the GPU acceptance run; the same module object)."""

import sys

from .tools import acceptance as _module

sys.modules[__name__] = _module
