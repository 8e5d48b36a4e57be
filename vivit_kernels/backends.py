"""Backends: a table from a name to the functions a ViViT layer calls when our kernels run behind its modules.

``attn`` names a backend: "eager" and "sdpa" are transformers' own attention implementations (the model's
modules run their own forward; no table); "triton" pins every op to ours (the first implementation of each
entry of ``ops/registry.py``); "auto" asks ``providers.choose`` which registered implementation to run for each
call's shapes on this device, and its whole-model guard (``guard.py``) which path the model takes.
The model never branches on the name; it calls the functions of one :class:`Backend`, with the registry's
call signatures (see ``ops/registry.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import providers
from .guard import ModelPath
from .ops import _triton
from .ops.registry import OPS, ours

__all__ = ["ATTN_CHOICES", "Backend", "backend_status", "get_backend"]

ATTN_CHOICES = ("eager", "sdpa", "triton", "auto")


@dataclass(frozen=True)
class Backend:
    name: str
    layer_norm: Callable
    qkv: Callable
    linear: Callable
    mlp: Callable
    attention: Callable
    attention_qkv: Callable
    patch_embed: Callable
    # Raises a clear error when the backend cannot run on these inputs here (None: anything goes).
    check_inputs: Optional[Callable[[torch.Tensor], None]] = None
    # attn="auto": the pins, and the whole-model guard's path for the current forward (see guard.py)
    pins: dict = field(default_factory=dict)
    path: Optional[ModelPath] = None


def _check_triton_inputs(pixel_values: torch.Tensor) -> None:
    _triton.check_launchable(pixel_values, what="attn='triton'")


TRITON = Backend("triton", **{op: ours(op) for op in OPS}, check_inputs=_check_triton_inputs)


def auto_backend(pins: Optional[dict[str, str]] = None) -> Backend:
    """A table whose every function asks ``providers.choose`` for this call's provider, with ``pins`` (op ->
    provider, over VIVIT_KERNELS_PROVIDERS) fixed; a fresh whole-model path per table (one per model)."""
    pinned = {**providers.pins_from_env(), **providers.parse_pins(pins)}

    def dispatch(op: str) -> Callable:
        implementations = OPS[op].implementations

        def call(*args):
            return implementations[providers.choose(op, args, pinned)].fn(*args)

        call.__name__ = f"auto_{op}"
        return call

    fns = {op: dispatch(op) for op in OPS}

    def linear_call(x, w, b, activation=None, residual=None):  # one key whatever the defaults given
        return fns["linear"](x, w, b, activation, residual)

    def mlp_call(x, w1, b1, w2, b2, activation="gelu_fast", residual=None):
        return fns["mlp"](x, w1, b1, w2, b2, activation, residual)

    return Backend("auto", **{**fns, "linear": linear_call, "mlp": mlp_call}, pins=pinned, path=ModelPath())


def get_backend(attn: Optional[str], pins: Optional[dict[str, str]] = None) -> Optional[Backend]:
    """The table for ``attn`` ("triton", "auto"), or None for transformers' own attention ("eager", "sdpa", None).
    Without Triton, "triton" warns once and gives None (the model then uses "sdpa")."""
    if attn is not None and attn not in ATTN_CHOICES:
        raise ValueError(f"unknown attn {attn!r}; expected one of {', '.join(ATTN_CHOICES)}")
    if pins and attn != "auto":
        raise ValueError("pins choose providers for attn='auto'")
    if attn == "auto":
        return auto_backend(pins)
    if attn == "triton":
        if not _triton.HAS_TRITON:
            warnings.warn(f"attn='triton' needs Triton, which failed to import ({_triton.TRITON_IMPORT_ERROR}); using "
                          "attn='sdpa' instead", stacklevel=3)
            return None
        return TRITON
    return None


def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend name: (usable here, why / what it runs)."""
    return {
        "eager": (True, "transformers' modules, eager attention"),
        "sdpa": (True, "transformers' modules, torch.nn.functional.scaled_dot_product_attention"),
        "triton": _triton_status(),
        "auto": (True, "per op and shape, the fastest of ours / cuBLAS / cuDNN / SDPA that agrees with the op's "
                       "reference, measured on this device; then the whole model against transformers' sdpa path, "
                       "the faster kept (on the CPU: torch's implementations, the interpreter is no speed candidate)"),
    }


def _triton_status() -> tuple[bool, str]:
    if not _triton.HAS_TRITON:
        return False, f"Triton failed to import: {_triton.TRITON_IMPORT_ERROR}"
    version = (f"Triton {_triton.triton.__version__}: flash attention, QKV / projection / MLP GEMMs with fused "
               "epilogues, LayerNorm, patch embedding")
    if torch.cuda.is_available():
        return True, f"{version}, on CUDA"
    if _triton.INTERPRET:
        return True, f"{version}, in the Triton interpreter (TRITON_INTERPRET=1; CPU, slow, for testing)"
    return False, f"{version}: need a CUDA device (or TRITON_INTERPRET=1 set before import, for testing)"
