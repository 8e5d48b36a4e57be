"""What differs between the oldest and the newest versions we support, in one place.

Supported: torch >= 2.11 with the Triton it brings (>= 3.6), transformers >= 5.17, < 6 (pyproject.toml). The
oldest are what common GPU images ship; scripts/check_versions.sh oldest proves them on a machine without a GPU. Code
elsewhere asks this module instead of comparing versions itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

__all__ = [
    "version_tuple",
    "installed_versions",
    "triton_version",
    "CompileRecord",
    "recording_compilations",
    "fix_interpreter_scalars",
    "ActivationCheckpointingNames",
    "training_checkpointing_argument",
]


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "3.6.0", "2.11.0+cu130", "5.17.0.dev0" or "3.8.0rc1"
    (each part's leading digits; parsing stops at the first part without any)."""
    import re

    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def installed_versions(names) -> dict[str, str]:
    """Each package's ``__version__``, or "not installed (Error)" (never raises): what info and the acceptance
    report print."""
    import importlib

    out = {}
    for name in names:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - report, never fail
            out[name] = f"not installed ({type(e).__name__})"
    return out


def triton_version() -> tuple[int, ...] | None:
    """Triton's version, or None without Triton."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - no Triton is a supported state
        return None
    return version_tuple(triton.__version__)


@dataclasses.dataclass
class CompileRecord:
    """Triton compilations seen while :func:`recording_compilations` was active: those compiled, those found in
    Triton's cache, and the compiler's own time (seconds). ``supported`` is False when this Triton has no
    compilation listener (then nothing is counted)."""

    supported: bool = True
    compiled: int = 0
    cache_hits: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def recording_compilations() -> Iterator[CompileRecord]:
    """Count Triton's kernel compilations and their time through ``triton.knobs.compilation.listener`` (Triton
    3.6 and 3.8 both have it; a Triton without it yields an unsupported, empty record). A listener already set
    by the user is called too."""
    record = CompileRecord()
    try:
        from triton import knobs

        knobs.compilation  # noqa: B018 - the attribute this needs
    except Exception:  # noqa: BLE001
        record.supported = False
        yield record
        return
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit, **kwargs):
        if cache_hit:
            record.cache_hits += 1
        else:
            record.compiled += 1
            micros = getattr(times, "ir_initialization", 0) + sum(d for _, d in getattr(times, "lowering_stages", ()))
            record.seconds += (micros + getattr(times, "store_results", 0)) / 1e6
        if previous is not None:
            previous(
                src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit, **kwargs
            )

    knobs.compilation.listener = listener
    try:
        yield record
    finally:
        knobs.compilation.listener = previous


def fix_interpreter_scalars() -> bool:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array of shape (1,))``, which newer
    numpy refuses ("only 0-dimensional arrays can be converted to Python scalars"; numpy 2.4.6 here, 2.1.3
    still accepts it): every ``range()`` over a runtime integer argument then fails inside the kernel. Triton
    3.8's interpreter squeezes the array first; with an older Triton, make its interpreter do the same (only
    under TRITON_INTERPRET=1; compiled kernels never run this code). Returns whether it patched anything.

    Reproduction without vivit_kernels (Triton 3.6.0, numpy 2.4.6, TRITON_INTERPRET=1): a kernel with
    ``for k in range(0, K, 32): ...`` on an int argument ``K`` raises InterpreterError(TypeError(...)).
    """
    version = triton_version()
    if version is None or version >= (3, 8):
        return False
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - nothing to fix without an interpreter
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "vivit_kernels_fixed", False):
        return False

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.vivit_kernels_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


class ActivationCheckpointingNames:
    """transformers 5.17 names activation checkpointing ``gradient_checkpointing_enable`` / ``_disable`` /
    ``is_gradient_checkpointing``; later 5.x releases call it ``activation_checkpointing_*`` and keep the old names
    as deprecated aliases. Mixed into our model classes (before transformers' class), so the new names work on
    every supported version and call transformers' own implementation."""

    def activation_checkpointing_enable(self, *args, **kwargs):
        parent = super()
        enable = getattr(parent, "activation_checkpointing_enable", None) or parent.gradient_checkpointing_enable
        return enable(*args, **kwargs)

    def activation_checkpointing_disable(self):
        parent = super()
        disable = getattr(parent, "activation_checkpointing_disable", None) or parent.gradient_checkpointing_disable
        return disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules())


def training_checkpointing_argument() -> str:
    """The TrainingArguments field that turns activation checkpointing on: ``activation_checkpointing`` where
    transformers has it, ``gradient_checkpointing`` (transformers 5.17) otherwise."""
    import dataclasses as dc

    import transformers

    names = {f.name for f in dc.fields(transformers.TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
