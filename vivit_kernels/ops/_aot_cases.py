"""One ahead-of-time compile case (``AotCase``) and its constructor (``make_case``): what each op module's
``aot_cases()`` returns and ``vivit_kernels.aot`` compiles. Plain Python (no torch, no Triton), so the op modules
can build cases without importing the gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AotCase", "make_case"]


@dataclass(frozen=True)
class AotCase:
    """One kernel compilation: ``module.kernel`` with these argument types and constexpr values."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument name, triton type): "*fp16", "i32", "fp32", "constexpr"
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    label: str  # human description: dtype, head_dim, tile sizes
    divisible: tuple[str, ...] = ()  # arguments assumed 16-divisible (pointers, strides), as the JIT specialises
    archs: tuple[int, ...] = (80, 90)  # the architectures that launch it (the TMA kernels: sm_90 only)

    @property
    def name(self) -> str:
        return self.kernel.strip("_").removesuffix("_kernel")



def make_case(
    module: str,
    fn,
    kernel: str,
    types: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int,
    label: str,
    divisible: tuple[str, ...] = (),
    archs: tuple[int, ...] = (80, 90),
) -> AotCase:
    """Build a case from a kernel's argument names: ``types`` gives every runtime argument's type, and every
    other argument must be in ``constexprs``.

    The JIT specialises integer arguments: a value of 1 becomes a constant (pass it in ``constexprs``) and a
    multiple of 16 is marked 16-divisible, which decides vectorisation and software pipelining. Pointers and
    runtime strides are marked divisible (allocations are 16-byte aligned and ViViT's strides are multiples
    of 16); ``divisible`` names further integers that are multiples of 16 in ViViT's shapes (feature sizes,
    not token counts: 3137 is odd)."""
    signature = []
    for name in fn.arg_names:
        if name in constexprs:
            signature.append((name, "constexpr"))
        elif name in types:
            signature.append((name, types[name]))
        else:
            raise KeyError(f"{kernel}: no type or constexpr value for argument {name!r}")
    marked = tuple(
        n for n, t in signature
        if t.startswith("*") or (t != "constexpr" and (n.startswith("stride") or n in divisible))
    )
    return AotCase(module, kernel, tuple(signature), tuple(sorted(constexprs.items())), num_warps, num_stages,
                   label, marked, tuple(archs))
