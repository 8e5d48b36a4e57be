"""Loads vivit_kernels._C, the compiled C++/CUDA ops (csrc/), and says clearly when it is absent.

Without the extension every op that has one falls back to a PyTorch implementation of the same arithmetic,
with one warning naming the reason; nothing fails at import.
"""

from __future__ import annotations

import importlib
import warnings

import torch

_loaded: bool | None = None
_error: str = ""
_warned: set[str] = set()


def available() -> bool:
    """True when the extension is built and loaded (its ops registered under torch.ops.vivit_kernels)."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("vivit_kernels._C")
            _loaded = True
        except Exception as e:  # noqa: BLE001 - any load failure means "use the fallback"
            _loaded, _error = False, f"{type(e).__name__}: {e}"
    return _loaded


def error() -> str:
    available()
    return _error


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension implements ``vivit_kernels::<op>`` for this device type."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"vivit_kernels::{op}", device_type.upper())


def cuda_skipped_on_request() -> bool:
    """True when the loaded extension was built CPU-only because VIVIT_KERNELS_SKIP_CUDA_BUILD asked for it."""
    if not available():
        return False
    return bool(getattr(importlib.import_module("vivit_kernels._C"), "cuda_skipped_on_request", 0))


def status() -> dict[str, str]:
    if not available():
        return {"extension": f"not available ({error()}); PyTorch fallbacks in use"}
    devices = [d for d in ("cpu", "cuda") if has_kernel("preprocess_video", d)]
    note = " (built with VIVIT_KERNELS_SKIP_CUDA_BUILD=1)" if cuda_skipped_on_request() else ""
    return {"extension": f"vivit_kernels._C loaded, ops for {' and '.join(devices)}{note}"}


def warn_fallback(op: str, device_type: str) -> None:
    """One warning per (op, device type) that the PyTorch fallback runs instead of the extension."""
    key = f"{op}:{device_type}"
    if key in _warned:
        return
    _warned.add(key)
    if not available():
        why = f"the C++/CUDA extension vivit_kernels._C is not available ({error()})"
        hint = "rebuild with `pip install --no-build-isolation -e .`"
    else:
        why = f"vivit_kernels._C was built without {device_type.upper()} support"
        hint = "rebuild with nvcc available (CUDA_HOME) for the CUDA ops"
    warnings.warn(f"{op}: {why}; using the PyTorch fallback (same results, slower). To fix: {hint}.", stacklevel=3)
