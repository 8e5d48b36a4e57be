"""``vivit-kernels info``: versions, the device, which backends and kernels are available here and why not, the
extension's build, and the ``attn="auto"`` choices stored."""

from __future__ import annotations

import os
import platform
import warnings

import torch

__all__ = ["print_info"]


def _versions() -> list[tuple[str, str]]:
    from .._compat import installed_versions

    names = ("torch", "triton", "numpy", "safetensors", "transformers", "av")
    return [("python", platform.python_version()), *installed_versions(names).items()]


def print_info() -> None:
    from .. import __version__
    from ..auto.backends import backend_status
    from ..ops import _extension

    print("vivit_kernels", __version__)
    for name, version in _versions():
        print(f"  {name:<13} {version}")
    print(f"  {'torch CUDA':<13} {torch.version.cuda or 'none (CPU build)'}")
    print("device")
    gpu = torch.cuda.is_available()
    if gpu:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("  no CUDA device: the Triton kernels run only in the Triton interpreter (slow; a correctness check)")
    print("backends (attn=...)")
    for name, (ok, why) in backend_status().items():
        print(f"  {name:<8} {'available' if ok else 'unavailable'}: {why}")
    if not gpu:
        interp = os.environ.get("TRITON_INTERPRET", "unset")
        print("what the commands do here")
        print("  demo, classify  switch the Triton interpreter on themselves: attn='triton' runs, slowly, as a "
              "correctness run")
        print(
            f"  your own code   attn='triton' needs TRITON_INTERPRET=1 set before importing vivit_kernels "
            f"(now: {interp})"
        )
        print("  tune, auto      time torch's implementations only (the interpreter is no speed candidate)")
        print("  acceptance      --dry-run only: the GPU run's plumbing at tiny shapes in the interpreter")
    else:
        print("first on this GPU: `vivit-kernels acceptance` (correctness at ViViT-B shapes, per-op speed against "
              "cuBLAS / cuDNN / SDPA, the seed's tables; budgeted to 8 minutes)")
    print("C++/CUDA extension (video preprocessing, bias + gelu_fast)")
    for _, line in _extension.status().items():
        print(f"  {line}")
    _print_implementation_cache()


def _print_implementation_cache() -> None:
    from ..auto import cache

    path = cache.cache_path()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = cache.load_cache()
    state = (
        "missing"
        if not path.exists()
        else ("unreadable: " + str(caught[0].message) if caught else f"{len(entries)} entries")
    )
    print(f"attn='auto' choices: {path} ({state})")
    for entry in sorted(entries.values(), key=lambda e: (e["device"], e["op"], e["mode"], e["shapes"])):
        first = entry["shapes"].split(" ")[0] or "-"
        print(f"  {entry['op']:<14} {entry['mode']:<6} {first:<20} -> {entry['choice']:<14} ({entry['device']})")
