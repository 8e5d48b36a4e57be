"""The measured choice of an op's implementation (``attn="auto"``): per op call, the implementations registered in
``ops/registry.py`` (ours in Triton; cuBLAS / cuDNN / SDPA through torch), checked against the op's reference and
timed on the user's device, the fastest kept in memory and in the cache file (``auto/cache.py``). Nothing here knows
the model: the whole-model guard (``auto/guard.py``) reuses the same chain (:func:`resolve`) with its own measurement.

Every implementation computes the same function with the same autograd contract (forward and the backward that
goes with what it saved), so forward and backward are chosen together; training calls are timed forward +
backward, inference calls forward only.

- ``choose(op, args, pins)``: the chosen name for this call's key (``cache.make_key``). :func:`resolve` is the
  one chain: memory, then the cache file, else measured (when it may be now) and written back. Measuring first
  runs every candidate once on the call's own inputs and compares its output (and, for a training call, its input
  gradients) with the op's reference under the suite's tolerance rule (``vivit_kernels.testing``): one that
  disagrees is never timed nor chosen, and one log line names it. The others are timed (CUDA events, warm-up,
  repetitions, median, inputs rotated so the L2 cache flatters no one). Never measured inside CUDA-graph capture
  or while torch.compile traces: then the cached choice or our kernel, with one log line.
- ``VIVIT_KERNELS_IMPLEMENTATIONS="attention_qkv=sdpa-flash,linear=cublas"`` (or ``pins=`` to ``set_attn``) pins an
  implementation per op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from .._log import log_once, logger
from ..ops.registry import OPS
from .cache import (
    WHOLE_MODEL,
    cache_path,
    describe,
    entry,
    load_cache,
    make_key,
    store,
)

__all__ = ["choose", "resolve", "pins_from_env", "parse_pins", "timer", "current_timer", "Timing", "measure",
           "available", "verify", "forget", "recording", "is_recording", "remember", "runs", "cuda_event_timer",
           "PINS_ENV"]

PINS_ENV = "VIVIT_KERNELS_IMPLEMENTATIONS"
_OLD_PINS_ENV = "VIVIT_KERNELS_PROVIDERS"  # its name before 0.3.0: never read, a warning if set


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
            out.append(a.detach().clone().requires_grad_(training))
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


def current_timer() -> Callable:
    """The timing function in force (``cuda_event_timer`` unless a ``timer(...)`` block installed another)."""
    return _TIMER[-1]


# ------------------------------------------------------------------------------------------------
# Checking against the reference, measuring
# ------------------------------------------------------------------------------------------------
def _reference_outputs(op: str, args: tuple, training: bool, dtype: torch.dtype):
    from ..testing import run_with_grads

    ref = OPS[op].reference
    inputs = _clone_inputs(args, training)
    ref32 = run_with_grads(ref, inputs, torch.float32)
    low = None if dtype == torch.float32 else run_with_grads(ref, inputs, dtype)
    return inputs, ref32, low


def verify(op: str, name: str, args: tuple, training: bool, reference=None) -> str | None:
    """None when implementation ``name`` of ``op`` agrees with the op's reference on ``args`` (its output, and
    for a training call the input gradients) under the suite's tolerance rule; else what disagreed.
    ``reference``: the reference's outputs on these inputs, when already computed (``_reference_outputs``)."""
    from ..testing import fp32_atol, judge_outputs, run_with_grads

    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    inputs, ref32, low = reference or _reference_outputs(op, args, training, dtype)
    out, grads = run_with_grads(OPS[op].implementations[name].fn, inputs, dtype)
    checks = judge_outputs(out, grads, ref32, low, fp32_atol(), grad_names=[f"gradient of argument {i}"
                                                                          for i in range(len(grads))])
    bad = [c.message() for c in checks if not c.ok]
    return "; ".join(bad) if bad else None


def measure(op: str, args: tuple, training: bool, device: torch.device, names: list[str] | None = None) -> Timing:
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
            logger.warning("vivit_kernels: implementation %s of %s is not used at these shapes: %s", name, op, why)
            continue
        fn = OPS[op].implementations[name].fn
        try:
            medians[name] = float(current_timer()(fn, args, training, device))
        except Exception as e:  # noqa: BLE001
            logger.warning(
                "vivit_kernels: implementation %s of %s failed while timing: %s", name, op, str(e).splitlines()[0]
            )
            medians[name] = math.inf
    finite = {n: t for n, t in medians.items() if math.isfinite(t)}
    ours = OPS[op].ours
    if not finite and ours.name not in names and ours.available(device) is None:
        # every vendor path refused these inputs (torch's CPU flash attention takes no per-key bias with gradients):
        # ours, left out as no speed candidate where it runs interpreted, is correct, so it runs rather than fail
        log_once(f"ours:{op}", "vivit_kernels: no other implementation of %s runs these inputs on %s; using ours (%s)",
                 op, device.type, ours.runs(device))
        return Timing(medians, ours.name, rejected)
    if not finite:
        raise RuntimeError(f"no implementation of {op} ran and agreed with the reference on these inputs: "
                           f"{ {**medians, **rejected} }")
    order = list(OPS[op].implementations)
    choice = min(finite, key=lambda n: (finite[n], order.index(n)))
    return Timing(medians, choice, rejected)


def available(op: str, device: torch.device) -> list[str]:
    """The candidates of ``op`` that can run on ``device`` here. Interpreted Triton kernels are not a speed
    candidate on the CPU unless a test installed its own timer."""
    return list(_available(op, device.type, current_timer() is cuda_event_timer))


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
# The chain: memory -> cache file -> measure (when it may be now) -> memory and cache file
# ------------------------------------------------------------------------------------------------
_memory: dict[str, str] = {}


def remember(op: str, described: tuple, training: bool, device: str, timing: Timing) -> dict:
    """Keep ``timing``'s choice in memory and in the cache file (a cache that cannot be written is said once);
    returns the entry."""
    key = make_key(op, described, training, device)
    _memory[key] = timing.choice
    item = entry(op, described, training, device, timing.medians, timing.choice, timing.rejected,
                 lambda name: runs(op, name, device))
    try:
        store(key, item)
    except OSError as e:
        log_once(f"store:{e}", "vivit_kernels: could not write the implementation cache %s (%s); choices stay in "
                 "memory", cache_path(), e)
    return item


def resolve(op: str, described: tuple, training: bool, device: str, *, valid: tuple[str, ...], fallback: str,
            why_not_now: Callable[[], str | None], measure_now: Callable[[], Timing],
            explain: Callable[[str], None]) -> str:
    """The one chain every ``auto`` choice takes (per op here, per whole model in ``guard.py``): the choice for
    this key from memory, else from the cache file (when still one of ``valid``), else, unless ``why_not_now()``
    says why not (``explain(why)`` is called with a non-empty reason; the choice is then ``fallback``),
    ``measure_now()``, kept in memory and in the file (only in memory when nothing could be checked)."""
    key = make_key(op, described, training, device)
    if key in _memory:
        return _memory[key]
    item = load_cache().get(key)
    if item is not None and item["choice"] in valid:
        _memory[key] = item["choice"]
        return item["choice"]
    why = why_not_now()
    if why is not None:
        if why:
            explain(why)
        return fallback
    timing = measure_now()
    if all(math.isnan(t) for t in timing.medians.values()):  # nothing could be checked: this process only
        _memory[key] = timing.choice
    else:
        remember(op, described, training, device, timing)
    return timing.choice


def forget() -> None:
    """Drop the in-memory choices (the cache file stays)."""
    _memory.clear()


# ------------------------------------------------------------------------------------------------
# Choosing per op call
# ------------------------------------------------------------------------------------------------
def pins_from_env() -> dict[str, str]:
    """``VIVIT_KERNELS_IMPLEMENTATIONS="op=name,op=name"`` as a dict, checked against the candidates. The variable's
    name before 0.3.0 is not read; set, it gets one warning saying so."""
    if _OLD_PINS_ENV in os.environ:
        log_once("old-pins-env", "vivit_kernels: %s is ignored: it was renamed %s in 0.3.0 (CHANGELOG.md)",
                 _OLD_PINS_ENV, PINS_ENV)
    return parse_pins(os.environ.get(PINS_ENV, ""))


def parse_pins(text: str | dict | None) -> dict[str, str]:
    if isinstance(text, dict):
        pins = dict(text)
    else:
        pins = {}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            op, sep, name = item.partition("=")
            if not sep:
                raise ValueError(f"{PINS_ENV}: {item!r} is not op=implementation")
            pins[op.strip()] = name.strip()
    for op, name in pins.items():
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} to pin; ops: {', '.join(OPS)}")
        if name not in OPS[op].implementations:
            raise ValueError(f"unknown implementation {name!r} of {op}; implementations: "
                             f"{', '.join(OPS[op].implementations)}")
    return pins


def _cannot_tune_now(device: torch.device, first_arg) -> str | None:
    """Why no measurement may run now ("" for a silent no: fake or meta tensors), or None."""
    if isinstance(first_arg, torch._subclasses.FakeTensor) or device.type == "meta":
        return ""
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


def is_recording() -> bool:
    return bool(_RECORDING)


def choose(op: str, args: tuple, pins: dict[str, str]) -> str:
    """The implementation for this call of ``op`` (see the module docstring)."""
    if op in pins:
        return pins[op]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    training = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    described = tuple(describe(a) for a in args)
    if torch.compiler.is_compiling():
        return _choice_while_compiling(op, described, training, str(device))
    names = available(op, device)
    if _RECORDING:
        _RECORDING[-1].append((op, described, training, str(device)))
        return names[0]

    def explain(why: str) -> None:
        log_once(f"{op}:{why}", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes and %s; "
                                 "using %s (run the model once outside it, or `vivit-kernels tune`)", op, why, names[0])

    return resolve(op, described, training, str(device), valid=tuple(names), fallback=names[0],
                   why_not_now=lambda: _cannot_tune_now(device, args[0]),
                   measure_now=lambda: measure(op, args, training, device, names), explain=explain)


@torch.compiler.assume_constant_result
def _choice_while_compiling(op: str, described: tuple, training: bool, device: str) -> str:
    """While torch.compile traces: the choice already made (memory, cache file) or our kernel; never a measurement
    (its result is a constant of the compiled graph)."""
    key = make_key(op, described, training, device)
    if key in _memory:
        return _memory[key]
    names = _available(op, torch.device(device).type, True)
    item = load_cache().get(key)
    if item is not None and item["choice"] in names:
        return item["choice"]
    log_once(f"{op}:compile", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes while "
                               "torch.compile traces; using %s (run the model once uncompiled first, or `vivit-kernels "
                               "tune`)", op, names[0])
    return names[0]
