"""Alias of ``vivit_kernels.auto.backends`` (the backend tables; the same module object)."""

import sys

from .auto import backends as _module

sys.modules[__name__] = _module
