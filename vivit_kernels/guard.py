"""Alias of ``vivit_kernels.auto.guard`` (the whole-model guard; the same module object)."""

import sys

from .auto import guard as _module

sys.modules[__name__] = _module
