"""Measured provider choice (``attn="auto"``): per hot op, the implementations registered in
``ops/registry.py`` (ours in Triton; cuBLAS / cuDNN / SDPA through torch), checked against the op's reference and
timed on the user's device, the fastest kept in memory and on disk. Nothing here knows the model: whole-model
tuning and the whole-model guard live in ``tune.py``.

Every implementation computes the same function with the same autograd contract (forward and the backward that
goes with what it saved), so forward and backward are chosen together; training calls are timed forward +
backward, inference calls forward only.

- ``choose(op, args, pins)``: the chosen name for this call's key: op, shapes and strides, dtypes, grad mode,
  device name and compute capability, torch / triton / vivit_kernels versions. First from memory, then from the
  cache file, else measured and written back. Measuring first runs every candidate once on the call's own
  inputs and compares its output (and, for a training call, its input gradients) with the op's reference under
  the suite's tolerance rule (``vivit_kernels.testing``): one that disagrees is never timed nor chosen, and one
  log line names it. The others are timed (CUDA events, warm-up, repetitions, median, inputs rotated so the L2
  cache flatters no one). Never measured inside CUDA-graph capture or while torch.compile traces: then the
  cached choice or our kernel, with one log line.
- The cache file (``cache_path()``): JSON, written atomically under a file lock; a truncated, garbled or foreign
  file is ignored with a warning, never trusted. Each entry records the op, shapes, mode, device, every
  candidate's median and what it runs there, and the candidates rejected by the reference check.
- ``VIVIT_KERNELS_PROVIDERS="attention_qkv=sdpa-flash,linear=cublas"`` (or ``pins=`` to ``set_attn``) pins a
  provider per op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ._log import log_once, logger
from .ops import _triton
from .ops.registry import OPS

__all__ = ["choose", "cache_path", "load_cache", "pins_from_env", "parse_pins", "timer", "Timing", "measure",
           "available", "verify", "forget", "recording", "entry_rows", "format_entries", "remember", "WHOLE_MODEL"]

CACHE_VERSION = 2
PINS_ENV = "VIVIT_KERNELS_PROVIDERS"
CACHE_ENV = "VIVIT_KERNELS_CACHE_DIR"
# The cache also holds tune.py's whole-model guard: op "model", choices "kernels" / "transformers".
WHOLE_MODEL = "model"
WHOLE_MODEL_CHOICES = ("kernels", "transformers")


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _versions() -> str:
    from . import __version__

    triton_version = _triton.triton.__version__ if _triton.HAS_TRITON else "none"
    return f"torch={torch.__version__} triton={triton_version} vivit_kernels={__version__}"


@torch.compiler.assume_constant_result
def _device_id(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm_{props.major}{props.minor}"
    return device + (" (Triton interpreter)" if _triton.INTERPRET else "")


def _describe(value):
    """What the key records of an argument: dtype, shape and strides of a tensor, else its value."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype).replace("torch.", ""), tuple(value.shape), tuple(value.stride()))
    return repr(value)


def _format(described) -> str:
    return ",".join(d if isinstance(d, str) else f"{d[0]}{list(d[1])}/{list(d[2])}" for d in described)


def make_key(op: str, described: tuple, training: bool, device: str) -> str:
    """op, every argument's dtype, shape and strides (or value), grad mode, device and versions."""
    return f"{op}({_format(described)}) {'train' if training else 'infer'} | {_device_id(device)} | {_versions()}"


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    """Median milliseconds per candidate (inf: failed), the choice, and the candidates the reference check
    rejected (name -> why; never timed)."""

    medians: dict[str, float]
    choice: str
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)


def _clone_inputs(args: tuple, training: bool) -> tuple:
    """A fresh copy of the floating-point tensor arguments (leaves that require grad when training)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            c = a.detach().clone()
            out.append(c.requires_grad_(training))
        else:
            out.append(a)
    return tuple(out)


def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 32 * 2**20


def cuda_event_timer(fn: Callable, args: tuple, training: bool, device: torch.device, warmup: int = 3,
                     repeats: int = 15) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs (CUDA events on a GPU, wall clock on the CPU), after
    ``warmup`` runs, cycling through enough input copies that their total exceeds the L2 cache."""
    nbytes = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    copies = max(1, min(8, math.ceil(2 * _l2_bytes(device) / max(nbytes, 1))))
    sets = [_clone_inputs(args, training) for _ in range(copies)]

    def step(i: int):
        inputs = sets[i % copies]
        out = fn(*inputs)
        if training:
            out.backward(torch.ones_like(out))
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    t.grad = None

    for i in range(warmup):
        step(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time

        for i in range(repeats):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# The timing function: (fn, args, training, device) -> median ms. Tests install a fake one with `timer(...)`.
_TIMER: list[Callable] = [cuda_event_timer]


@contextlib.contextmanager
def timer(fn: Callable):
    """Within this block candidates are timed by ``fn(candidate_fn, args, training, device) -> ms``."""
    _TIMER.append(fn)
    try:
        yield
    finally:
        _TIMER.remove(fn)


def _reference_outputs(op: str, args: tuple, training: bool, dtype: torch.dtype):
    from .testing import run_with_grads

    ref = OPS[op].reference
    inputs = _clone_inputs(args, training)
    ref32 = run_with_grads(ref, inputs, torch.float32)
    low = None if dtype == torch.float32 else run_with_grads(ref, inputs, dtype)
    return inputs, ref32, low


def verify(op: str, name: str, args: tuple, training: bool, reference=None) -> Optional[str]:
    """None when implementation ``name`` of ``op`` agrees with the op's reference on ``args`` (its output, and
    for a training call the input gradients) under the suite's tolerance rule; else what disagreed.
    ``reference``: the reference's outputs on these inputs, when already computed (``_reference_outputs``)."""
    from .testing import judge, run_with_grads

    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    inputs, (ref_out, ref_grads), low = reference or _reference_outputs(op, args, training, dtype)
    low_out, low_grads = low if low is not None else (None, [None] * len(ref_grads))
    out, grads = run_with_grads(OPS[op].implementations[name].fn, inputs, dtype)
    # float32 with TF32 allowed: both sides round products to TF32; IEEE otherwise (strict)
    fp32_atol = 1e-2 if _triton.default_allow_tf32() else 1e-4
    checks = [judge("output", out, ref_out, low_out, 2.0, fp32_atol=fp32_atol)]
    for i, (g, rg, lg) in enumerate(zip(grads, ref_grads, low_grads)):
        if rg is not None:
            checks.append(judge(f"gradient of argument {i}", g, rg, lg, 3.0, eps=1e-4 * max(1.0, rg.abs().max().item()),
                                fp32_atol=fp32_atol))
    bad = [c.message() for c in checks if not c.ok]
    return "; ".join(bad) if bad else None


def measure(op: str, args: tuple, training: bool, device: torch.device, names: Optional[list[str]] = None) -> Timing:
    """Check every available candidate of ``op`` against the reference on ``args`` (see :func:`verify`), time those
    that agree, and return the medians and the fastest (ties go to the earlier candidate in the registry, ours
    first). A candidate that fails to run or disagrees is logged and never chosen."""
    names = list(names or available(op, device))
    medians: dict[str, float] = {}
    rejected: dict[str, str] = {}
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    try:
        with torch.enable_grad() if training else torch.no_grad():
            reference = _reference_outputs(op, args, training, dtype)
    except torch.OutOfMemoryError:
        # no ground truth at this size: only the first candidate (ours where it runs), untimed
        log_once(f"{op}:verify-oom", "vivit_kernels: the %s reference does not fit in memory at these shapes, so no "
                                     "other implementation can be checked against it; using %s", op, names[0])
        return Timing({names[0]: math.nan}, names[0], {n: "not checked (reference out of memory)" for n in names[1:]})
    for name in names:
        try:
            with torch.enable_grad() if training else torch.no_grad():
                why = verify(op, name, args, training, reference)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here loses, with the reason logged
            why = f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if why is not None:
            rejected[name] = why
            logger.warning("vivit_kernels: provider %s for %s is not used at these shapes: %s", name, op, why)
            continue
        fn = OPS[op].implementations[name].fn
        try:
            medians[name] = float(_TIMER[-1](fn, args, training, device))
        except Exception as e:  # noqa: BLE001
            logger.warning("vivit_kernels: provider %s for %s failed while timing: %s", name, op, str(e).splitlines()[0])
            medians[name] = math.inf
    finite = {n: t for n, t in medians.items() if math.isfinite(t)}
    if not finite:
        raise RuntimeError(f"no provider of {op} ran and agreed with the reference on these inputs: "
                           f"{ {**medians, **rejected} }")
    order = list(OPS[op].implementations)
    choice = min(finite, key=lambda n: (finite[n], order.index(n)))
    return Timing(medians, choice, rejected)


def available(op: str, device: torch.device) -> list[str]:
    """The candidates of ``op`` that can run on ``device`` here. Interpreted Triton kernels are not a speed
    candidate on the CPU unless a test installed its own timer."""
    return list(_available(op, device.type, _TIMER[-1] is cuda_event_timer))


@torch.compiler.assume_constant_result
def _available(op: str, device_type: str, real_timer: bool) -> tuple:
    device = torch.device(device_type)
    names = []
    for name, impl in OPS[op].implementations.items():
        if impl.available(device) is not None:
            continue
        if name == "triton" and device_type == "cpu" and real_timer:
            continue
        names.append(name)
    return tuple(names)


def runs(op: str, name: str, device) -> str:
    """What implementation ``name`` of ``op`` runs on ``device``, in words (for tables)."""
    if op == WHOLE_MODEL:
        return {"kernels": "vivit_kernels' modules, each op as chosen",
                "transformers": "transformers' own modules (sdpa attention)"}[name]
    return OPS[op].implementations[name].runs(torch.device(device))


# ------------------------------------------------------------------------------------------------
# The cache file
# ------------------------------------------------------------------------------------------------
def cache_path() -> Path:
    """$VIVIT_KERNELS_CACHE_DIR/providers.json, else $XDG_CACHE_HOME (or ~/.cache)/vivit_kernels/providers.json."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vivit_kernels")
    return Path(root) / "providers.json"


def _choices(op: str) -> tuple[str, ...]:
    return WHOLE_MODEL_CHOICES if op == WHOLE_MODEL else tuple(OPS[op].implementations) if op in OPS else ()


def load_cache(path: Optional[Path] = None) -> dict[str, dict]:
    """The entries of the cache file: key -> {"op", "shapes", "mode", "device", "choice", "medians_ms", "runs",
    "rejected"}. A missing file is empty; a truncated, garbled or foreign one is ignored with a warning (never
    trusted)."""
    path = path or cache_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"vivit_kernels: cannot read the provider cache {path} ({e}); ignoring it", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and data.get("format") == "vivit_kernels-providers"
                and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict)):
            raise ValueError("not a vivit_kernels provider cache of this version")
        entries = {}
        for key, entry in data["entries"].items():
            if not (isinstance(entry, dict) and entry.get("choice") in _choices(entry.get("op"))
                    and key.startswith(f"{entry['op']}(") and isinstance(entry.get("medians_ms"), dict)):
                raise ValueError(f"bad entry {key!r}")
            entries[key] = entry
        return entries
    except (ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"vivit_kernels: ignoring the provider cache {path}: {e}", stacklevel=2)
        return {}


def _shapes(described: tuple) -> str:
    return " ".join("x".join(map(str, d[1])) for d in described if not isinstance(d, str))


def _store(key: str, timing: Timing, op: str, described: tuple, training: bool, device: str,
           path: Optional[Path] = None) -> None:
    """Add one entry: read, merge and replace the file atomically, under a lock (concurrent tuners keep both)."""
    from filelock import FileLock

    from ._files import atomic_write_text

    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        entries = load_cache(path)
        entries[key] = _entry(op, described, training, device, timing)
        atomic_write_text(path, json.dumps({"format": "vivit_kernels-providers", "version": CACHE_VERSION,
                                            "entries": entries}, indent=1, sort_keys=True))


def remember(op: str, described: tuple, training: bool, device: str, timing: Timing) -> dict:
    """Keep ``timing``'s choice in memory and in the cache file (a cache that cannot be written is said once);
    returns the entry."""
    key = make_key(op, described, training, device)
    _memory[key] = timing.choice
    try:
        _store(key, timing, op, described, training, device)
    except OSError as e:
        log_once(f"store:{e}", "vivit_kernels: could not write the provider cache %s (%s); choices stay in memory",
                 cache_path(), e)
    return _entry(op, described, training, device, timing)


def _entry(op: str, described: tuple, training: bool, device: str, timing: Timing) -> dict:
    return {"op": op, "shapes": _shapes(described), "mode": "train" if training else "infer",
            "device": _device_id(device), "choice": timing.choice,
            "medians_ms": {n: (t if math.isfinite(t) else None) for n, t in timing.medians.items()},
            "runs": {n: runs(op, n, device) for n in (*timing.medians, *timing.rejected)},
            "rejected": dict(timing.rejected)}


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


def entry_rows(device) -> list[dict]:
    """The cache file's entries for ``device`` under this software's versions, sorted (for tables and reports)."""
    suffix = f" | {_device_id(str(device))} | {_versions()}"
    return [dict(entry, key=key) for key, entry in sorted(load_cache().items()) if key.endswith(suffix)]


# ------------------------------------------------------------------------------------------------
# Choosing
# ------------------------------------------------------------------------------------------------
_memory: dict[str, str] = {}


def pins_from_env() -> dict[str, str]:
    """``VIVIT_KERNELS_PROVIDERS="op=name,op=name"`` as a dict, checked against the candidates."""
    return parse_pins(os.environ.get(PINS_ENV, ""))


def parse_pins(text: str | dict | None) -> dict[str, str]:
    if isinstance(text, dict):
        pins = dict(text)
    else:
        pins = {}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            op, sep, name = item.partition("=")
            if not sep:
                raise ValueError(f"{PINS_ENV}: {item!r} is not op=provider")
            pins[op.strip()] = name.strip()
    for op, name in pins.items():
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} to pin; ops: {', '.join(OPS)}")
        if name not in OPS[op].implementations:
            raise ValueError(f"unknown provider {name!r} for {op}; providers: {', '.join(OPS[op].implementations)}")
    return pins


def _cannot_tune_now(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


# While `recording()` is active, choose() notes every call (op, argument descriptions, training) and tunes nothing.
_RECORDING: list[list] = []


@contextlib.contextmanager
def recording():
    """Collect the op calls of a forward (e.g. under FakeTensorMode) as (op, described args, training), without
    tuning: what `vivit-kernels tune` then measures."""
    calls: list = []
    _RECORDING.append(calls)
    try:
        yield calls
    finally:
        _RECORDING.remove(calls)


def choose(op: str, args: tuple, pins: dict[str, str]) -> str:
    """The provider for this call of ``op`` (see the module docstring)."""
    if op in pins:
        return pins[op]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    training = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    described = tuple(_describe(a) for a in args)
    if torch.compiler.is_compiling():
        return _choice_while_compiling(op, described, training, str(device))
    key = make_key(op, described, training, str(device))
    if _RECORDING:
        _RECORDING[-1].append((op, described, training, str(device)))
        return available(op, device)[0]
    if key in _memory:
        return _memory[key]
    entry = load_cache().get(key)
    if entry is not None and entry["choice"] in available(op, device):
        _memory[key] = entry["choice"]
        return entry["choice"]
    names = available(op, device)
    why = _cannot_tune_now(device)
    if why is not None or isinstance(args[0], torch._subclasses.FakeTensor) or device.type == "meta":
        if why:
            log_once(f"{op}:{why}", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes and %s; "
                                     "using %s (run the model once outside it, or `vivit-kernels tune`)", op, why, names[0])
        return names[0]
    timing = measure(op, args, training, device, names)
    if all(math.isnan(t) for t in timing.medians.values()):  # nothing could be checked: this process only
        _memory[key] = timing.choice
    else:
        remember(op, described, training, str(device), timing)
    return timing.choice


@torch.compiler.assume_constant_result
def _choice_while_compiling(op: str, described: tuple, training: bool, device: str) -> str:
    """While torch.compile traces: the choice already made (memory, cache file) or our kernel; never a measurement
    (its result is a constant of the compiled graph)."""
    key = make_key(op, described, training, device)
    if key in _memory:
        return _memory[key]
    names = _available(op, torch.device(device).type, True)
    entry = load_cache().get(key)
    if entry is not None and entry["choice"] in names:
        return entry["choice"]
    log_once(f"{op}:compile", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes while "
                               "torch.compile traces; using %s (run the model once uncompiled first, or `vivit-kernels "
                               "tune`)", op, names[0])
    return names[0]


def forget() -> None:
    """Drop the in-memory choices (the cache file stays)."""
    _memory.clear()
