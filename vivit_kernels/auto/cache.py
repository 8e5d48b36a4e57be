"""``attn="auto"``'s cache file and its keys: what was chosen, per op call (and per whole-model input), on which
device, under which versions.

- A key (``make_key``) names the op, every argument's dtype, shape and strides (or value), the grad mode, the
  device (name and compute capability) and the torch / triton / vivit_kernels versions.
- The file (``cache_path()``): JSON, written atomically under a file lock (concurrent tuners keep each other's
  entries); a truncated, garbled or foreign file is ignored with a warning, never trusted. Each entry records the
  op, shapes, mode, device, the choice, every candidate's median, what it runs there and the candidates rejected
  by the reference check.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..ops import _triton
from ..ops.registry import OPS

__all__ = ["CACHE_ENV", "CACHE_VERSION", "WHOLE_MODEL", "WHOLE_MODEL_CHOICES", "cache_path", "load_cache", "store",
           "entry", "entry_rows", "format_entries", "describe", "make_key", "device_id", "versions"]

CACHE_VERSION = 2
CACHE_ENV = "VIVIT_KERNELS_CACHE_DIR"
FORMAT = "vivit_kernels-implementations"
# The whole-model guard's choices sit beside the ops': op "model", choices "kernels" / "transformers".
WHOLE_MODEL = "model"
WHOLE_MODEL_CHOICES = ("kernels", "transformers")


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def versions() -> str:
    from .. import __version__

    triton_version = _triton.triton.__version__ if _triton.HAS_TRITON else "none"
    return f"torch={torch.__version__} triton={triton_version} vivit_kernels={__version__}"


@torch.compiler.assume_constant_result
def device_id(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm_{props.major}{props.minor}"
    return device + (" (Triton interpreter)" if _triton.INTERPRET else "")


def describe(value):
    """What the key records of an argument: dtype, shape and strides of a tensor, else its value."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype).replace("torch.", ""), tuple(value.shape), tuple(value.stride()))
    return repr(value)


def _format(described) -> str:
    return ",".join(d if isinstance(d, str) else f"{d[0]}{list(d[1])}/{list(d[2])}" for d in described)


def make_key(op: str, described: tuple, training: bool, device: str) -> str:
    """op, every argument's dtype, shape and strides (or value), grad mode, device and versions."""
    return f"{op}({_format(described)}) {'train' if training else 'infer'} | {device_id(device)} | {versions()}"


def _shapes(described: tuple) -> str:
    return " ".join("x".join(map(str, d[1])) for d in described if not isinstance(d, str))


# ------------------------------------------------------------------------------------------------
# The file
# ------------------------------------------------------------------------------------------------
def cache_path() -> Path:
    """$VIVIT_KERNELS_CACHE_DIR/implementations.json, else $XDG_CACHE_HOME (or ~/.cache)/vivit_kernels/
    implementations.json."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vivit_kernels")
    return Path(root) / "implementations.json"


def _choices(op: str) -> tuple[str, ...]:
    return WHOLE_MODEL_CHOICES if op == WHOLE_MODEL else tuple(OPS[op].implementations) if op in OPS else ()


def load_cache(path: Path | None = None) -> dict[str, dict]:
    """The entries of the cache file: key -> {"op", "shapes", "mode", "device", "choice", "medians_ms", "runs",
    "rejected"}. A missing file is empty; a truncated, garbled or foreign one is ignored with a warning (never
    trusted)."""
    path = path or cache_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"vivit_kernels: cannot read the implementation cache {path} ({e}); ignoring it", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == CACHE_VERSION
                and isinstance(data.get("entries"), dict)):
            raise ValueError("not a vivit_kernels implementation cache of this version")
        entries = {}
        for key, item in data["entries"].items():
            if not (isinstance(item, dict) and item.get("choice") in _choices(item.get("op"))
                    and key.startswith(f"{item['op']}(") and isinstance(item.get("medians_ms"), dict)):
                raise ValueError(f"bad entry {key!r}")
            entries[key] = item
        return entries
    except (ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"vivit_kernels: ignoring the implementation cache {path}: {e}", stacklevel=2)
        return {}


def entry(op: str, described: tuple, training: bool, device: str, medians: dict[str, float], choice: str,
          rejected: dict[str, str], runs: Callable[[str], str]) -> dict:
    """One cache entry; ``runs(name)`` says what candidate ``name`` runs on this device."""
    return {"op": op, "shapes": _shapes(described), "mode": "train" if training else "infer",
            "device": device_id(device), "choice": choice,
            "medians_ms": {n: (t if math.isfinite(t) else None) for n, t in medians.items()},
            "runs": {n: runs(n) for n in (*medians, *rejected)}, "rejected": dict(rejected)}


def store(key: str, item: dict, path: Path | None = None) -> None:
    """Add one entry: read, merge and replace the file atomically, under a lock (concurrent tuners keep both)."""
    from filelock import FileLock

    from .._files import atomic_write_text

    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        entries = load_cache(path)
        entries[key] = item
        atomic_write_text(path, json.dumps({"format": FORMAT, "version": CACHE_VERSION, "entries": entries},
                                           indent=1, sort_keys=True))


def entry_rows(device) -> list[dict]:
    """The cache file's entries for ``device`` under this software's versions, sorted (for tables and reports)."""
    suffix = f" | {device_id(str(device))} | {versions()}"
    return [dict(item, key=key) for key, item in sorted(load_cache().items()) if key.endswith(suffix)]


def format_entries(entries: list[dict]) -> str:
    """A markdown table of cache entries, one row per candidate of each call: op, shapes, mode, candidate, what
    it ran on that device, its median time (or why it was not timed), and which was chosen."""
    lines = ["| op | shapes | mode | candidate | what ran | median ms | chosen |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        rejected = e.get("rejected", {})
        for name in (*e["medians_ms"], *rejected):
            t = e["medians_ms"].get(name)
            cell = (f"rejected: {rejected[name]}" if name in rejected
                    else "failed" if t is None or not math.isfinite(t) else f"{t:.3f}")
            lines.append(f"| {e['op']} | {e['shapes']} | {e['mode']} | {name} | {e.get('runs', {}).get(name, '-')} | "
                         f"{cell} | {'**yes**' if name == e['choice'] else ''} |")
    return "\n".join(lines)
