"""Alias of ``vivit_kernels.auto.choose`` (the per-op choice of attn="auto"; the same module object)."""

import sys

from .auto import choose as _module

sys.modules[__name__] = _module
