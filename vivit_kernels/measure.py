"""Alias of ``vivit_kernels.tools.measure`` (device-free counts; the same module object)."""

import sys

from .tools import measure as _module

sys.modules[__name__] = _module
