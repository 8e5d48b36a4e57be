"""Alias of ``vivit_kernels.auto.tune`` (tuning ahead of time; the same module object)."""

import sys

from .auto import tune as _module

sys.modules[__name__] = _module
