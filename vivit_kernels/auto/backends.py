"""Backends: a table from a name to the functions a ViViT layer calls when our kernels run behind its modules.

``attn`` names a backend: "eager" and "sdpa" are transformers' own attention implementations (the model's
modules run their own forward; no table); "triton" pins every op to ours (the first implementation of each
entry of ``ops/registry.py``); "auto" asks ``choose.choose`` which registered implementation to run for each
call's shapes on this device, and its whole-model guard (``guard.py``) which path the model takes. ``ops`` keeps
chosen ops on transformers' path (their function is None in the table). The model never branches on the name;
it calls the table's functions, by op name, with the registry's call signatures.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..names import ATTN
from ..ops import _triton
from ..ops.registry import OPS, backend_ops, ours
from . import choose
from .guard import ModelPath

__all__ = ["Backend", "backend_status", "get_backend", "auto_backend", "parse_ops", "without_trailing_defaults"]

OpSwitches = Mapping[str, bool] | Iterable[str] | None


@dataclass(frozen=True)
class Backend:
    """``fns``: per op of the registry a layer calls (``registry.backend_ops()``), the function to call, or None
    to keep that op on transformers' path. ``backend.linear`` is ``backend.fns["linear"]``."""

    name: str
    fns: dict[str, Callable | None]
    # Raises a clear error when the backend cannot run on these inputs here (None: anything goes).
    check_inputs: Callable[[torch.Tensor], None] | None = None
    # attn="auto": the pins, and the whole-model guard's path for the current forward (see guard.py)
    pins: dict = field(default_factory=dict)
    path: ModelPath | None = None

    def __getattr__(self, op: str) -> Callable | None:
        fns = self.__dict__.get("fns")
        if fns is not None and op in fns:
            return fns[op]
        raise AttributeError(f"backend {self.__dict__.get('name')!r} has no op {op!r}; ops: {', '.join(fns or ())}")

    @property
    def off(self) -> tuple[str, ...]:
        """The ops kept on transformers' path."""
        return tuple(op for op, fn in self.fns.items() if fn is None)


def parse_ops(ops: OpSwitches) -> frozenset[str]:
    """The ops that run on our kernels: all of them (None), the names given, or those a mapping sets True (those
    it leaves out stay on: ``{"layer_norm": False}`` keeps only LayerNorm on transformers' path)."""
    names = backend_ops()
    if ops is None:
        return frozenset(names)
    if isinstance(ops, str):
        raise TypeError(f"ops must be a collection of op names or a mapping op -> bool, got the string {ops!r}")
    chosen = dict.fromkeys(names, True) if isinstance(ops, Mapping) else dict.fromkeys(names, False)
    items = ops.items() if isinstance(ops, Mapping) else ((name, True) for name in ops)
    for name, on in items:
        if name not in chosen:
            raise ValueError(f"unknown op {name!r}; the ops a ViViT layer runs: {', '.join(names)}")
        chosen[name] = bool(on)
    return frozenset(name for name, on in chosen.items() if on)


def _check_triton_inputs(pixel_values: torch.Tensor) -> None:
    _triton.check_launchable(pixel_values, what="attn='triton'")


def triton_backend(ops: OpSwitches = None) -> Backend:
    on = parse_ops(ops)
    return Backend("triton", {op: ours(op) if op in on else None for op in backend_ops()},
                   check_inputs=_check_triton_inputs)


def auto_backend(pins: dict[str, str] | None = None, ops: OpSwitches = None) -> Backend:
    """A table whose every function asks ``choose.choose`` for this call's implementation, with ``pins`` (op ->
    implementation, over VIVIT_KERNELS_IMPLEMENTATIONS) fixed; a fresh whole-model path per table (one per model)."""
    pinned = {**choose.pins_from_env(), **choose.parse_pins(pins)}
    on = parse_ops(ops)

    def dispatch(op: str) -> Callable:
        implementations = OPS[op].implementations
        parameters = list(inspect.signature(OPS[op].reference).parameters.values())

        def call(*args, **extra):
            # chosen on the op's registry arguments, spelt one way (trailing defaults dropped: one cache key however
            # a caller writes them); ``extra`` (the QKV op's LoRA adapters) rides along, never timed or copied by a
            # measurement (their gradients are the adapters' own)
            args = without_trailing_defaults(parameters, args)
            return implementations[choose.choose(op, args, pinned)].fn(*args, **extra)

        call.__name__ = f"auto_{op}"
        return call

    fns: dict[str, Callable | None] = {op: dispatch(op) if op in on else None for op in backend_ops()}
    return Backend("auto", fns, pins=pinned, path=ModelPath())


def without_trailing_defaults(parameters: list[inspect.Parameter], args: tuple) -> tuple:
    """``args`` without the trailing ones that equal the defaults of ``parameters`` (the op's reference's, which
    every implementation shares: tests/test_choose.py checks it)."""
    n = len(args)
    while 0 < n <= len(parameters):
        default, value = parameters[n - 1].default, args[n - 1]
        if default is inspect.Parameter.empty or isinstance(value, torch.Tensor) or type(value) is not type(default) \
                or value != default:
            break
        n -= 1
    return args[:n]


def get_backend(attn: str | None, pins: dict[str, str] | None = None, ops: OpSwitches = None) -> Backend | None:
    """The table for ``attn`` ("triton", "auto"), or None for transformers' own attention ("eager", "sdpa", None).
    Without Triton, "triton" warns once and gives None (the model then uses "sdpa")."""
    if attn is not None and attn not in ATTN:
        raise ValueError(f"unknown attn {attn!r}; expected one of {', '.join(ATTN)}")
    if pins and attn != "auto":
        raise ValueError("pins choose implementations for attn='auto'")
    if ops is not None and attn not in ("triton", "auto"):
        raise ValueError(f"ops switches ops between our kernels and transformers' path: attn='triton' or 'auto', "
                         f"got attn={attn!r}")
    if attn == "auto":
        return auto_backend(pins, ops)
    if attn == "triton":
        if not _triton.HAS_TRITON:
            warnings.warn(f"attn='triton' needs Triton, which failed to import ({_triton.TRITON_IMPORT_ERROR}); using "
                          "attn='sdpa' instead", stacklevel=3)
            return None
        return triton_backend(ops)
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
    ops = ", ".join(OPS[op].ours.runs(torch.device("cuda")).removeprefix("vivit_kernels ").removesuffix(" (cuda)")
                    for op in backend_ops())
    version = f"Triton {_triton.triton.__version__}: {ops}"
    if torch.cuda.is_available():
        return True, f"{version}, on CUDA"
    if _triton.INTERPRET:
        return True, f"{version}, in the Triton interpreter (TRITON_INTERPRET=1; CPU, slow, for testing)"
    return False, f"{version}: need a CUDA device (or TRITON_INTERPRET=1 set before import, for testing)"
