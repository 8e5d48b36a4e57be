"""Measured provider choice (``attn="auto"``): per hot op, interchangeable implementations (ours in Triton,
cuBLAS / cuDNN / SDPA through torch), timed on the user's GPU, the fastest kept in memory and on disk.

Every candidate computes the same function with the same autograd contract: it is an autograd-complete callable
(forward and the backward that goes with what it saved), so forward and backward are chosen together; training
calls are timed forward + backward, inference calls forward only.

- ``CANDIDATES[op]``: name -> (function with the op's Backend signature, available(device) -> reason or None).
- ``choose(op, args, ...)``: the chosen name for this call's key: op, shapes and strides, dtypes, grad mode, device
  name and compute capability, torch / triton / vivit_kernels versions. First from memory, then from the cache
  file, else measured (CUDA events, warm-up, repetitions, median, inputs rotated so the L2 cache flatters no one)
  and written back. Never measured inside CUDA-graph capture or while torch.compile traces: then the cached choice
  or our kernel, with one log line.
- The cache file (``cache_path()``): JSON, written atomically under a file lock; a truncated, garbled or foreign
  file is ignored with a warning, never trusted.
- ``VIVIT_KERNELS_PROVIDERS="attention_qkv=sdpa-flash,linear=cublas"`` (or ``pins=`` to ``set_attn``) pins a
  provider per op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .ops import _triton
from .ops.activations import gelu_fast
from .ops.attention import flash_attention, flash_attention_qkv
from .ops.layer_norm import layer_norm
from .ops.linear import linear, mlp, qkv_projection
from .ops.patch_embed import patch_embed, patch_embed_ref

__all__ = ["CANDIDATES", "OPS", "choose", "cache_path", "load_cache", "pins_from_env", "timer", "Timing"]

logger = logging.getLogger("vivit_kernels")
CACHE_VERSION = 1
PINS_ENV = "VIVIT_KERNELS_PROVIDERS"
CACHE_ENV = "VIVIT_KERNELS_CACHE_DIR"


# ------------------------------------------------------------------------------------------------
# Candidates: the same function as our op, from cuBLAS / cuDNN / SDPA through torch
# ------------------------------------------------------------------------------------------------
def _tf32() -> bool:
    return _triton.default_allow_tf32()


def _flash_qkv(qkv, scale):
    return flash_attention_qkv(qkv, scale, allow_tf32=_tf32())


def _flash(q, k, v, scale):
    return flash_attention(q, k, v, scale, allow_tf32=_tf32())


def _sdpa(backend_name: str, fused: bool):
    """SDPA restricted to one backend, on (B, N, 3, H, D) qkv (fused) or q, k, v (B, N, H, D)."""

    def attention(*args):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        *tensors, scale = args
        q, k, v = (t.transpose(1, 2) for t in (tensors[0].unbind(2) if fused else tensors))
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2)

    attention.__name__ = f"sdpa_{backend_name.lower()}"
    return attention


def _qkv_cublas(x, wq, bq, wk, bk, wv, bv):
    """One cuBLAS GEMM with the bias epilogue on the three weights concatenated (a 3 x hidden^2 copy per call)."""
    bias = None if bq is None else torch.cat([bq, bk, bv])
    return F.linear(x, torch.cat([wq, wk, wv]), bias)


def _linear_cublas(x, w, b, activation=None, residual=None):
    """cuBLAS(Lt) through torch: addmm (bias epilogue), with cuBLASLt's tanh-GELU epilogue where it is gelu_fast
    (checked numerically per device type; elsewhere addmm then gelu_fast)."""
    x2 = x.reshape(-1, x.shape[-1])
    if activation == "gelu_fast":
        fused = b is not None and _lt_gelu_is_gelu_fast(x.device)
        y = torch._addmm_activation(b, x2, w.t(), use_gelu=True) if fused else gelu_fast(F.linear(x2, w, b))
    elif b is not None:
        y = torch.addmm(b, x2, w.t())
    else:
        y = x2 @ w.t()
    y = y.view(*x.shape[:-1], w.shape[0])
    if activation not in (None, "gelu_fast"):
        raise ValueError(f"linear: activation {activation!r}")
    return y if residual is None else y + residual


def _linear_cublas_ext(x, w, b, activation=None, residual=None):
    """cuBLAS GEMM, then the extension's bias + gelu_fast kernel (one pass) where there is an activation."""
    from .ops.gelu import bias_gelu_fast

    if activation != "gelu_fast" or b is None:
        return _linear_cublas(x, w, b, activation, residual)
    y = bias_gelu_fast(x @ w.t(), b)
    return y if residual is None else y + residual


def _mlp_with(linear_fn):
    def mlp_fn(x, w1, b1, w2, b2, activation="gelu_fast", residual=None):
        return linear_fn(linear_fn(x, w1, b1, activation), w2, b2, None, residual)

    return mlp_fn


def _layer_norm_torch(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _triton_here(device: torch.device) -> Optional[str]:
    if not _triton.HAS_TRITON:
        return f"Triton failed to import ({_triton.TRITON_IMPORT_ERROR})"
    if device.type == "cuda" or _triton.INTERPRET:
        return None
    return "Triton kernels need a CUDA device (or the interpreter)"


def _sdpa_backend_here(name: str):
    def available(device: torch.device) -> Optional[str]:
        if name == "flash" or device.type == "cuda":  # the CPU has a flash kernel too; cuDNN / efficient are CUDA's
            return None  # (a backend that refuses these inputs loses the timing with an infinite time)
        return "needs a CUDA device"

    return available


def _ext_here(device: torch.device) -> Optional[str]:
    from .ops import _extension

    return None if _extension.has_kernel("bias_gelu_fast", device.type) else "the extension's bias_gelu_fast is not built for this device"


_lt_gelu: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _lt_gelu_is_gelu_fast_by_type(device_type: str) -> bool:
    if device_type not in _lt_gelu:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():  # real numbers, also when called under FakeTensorMode
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(shape, generator=g).to(device_type) for shape in ((64, 32), (48, 32), (48,)))
            got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
            _lt_gelu[device_type] = (got - gelu_fast(torch.addmm(b, x, w.t()))).abs().max().item() <= 1e-4
    return _lt_gelu[device_type]


def _lt_gelu_is_gelu_fast(device: torch.device) -> bool:
    """Whether torch's _addmm_activation(use_gelu=True) is the tanh form, i.e. gelu_fast: on CUDA it is (cuBLASLt's
    GELU epilogue); torch's CPU version is the exact erf GELU. Checked numerically once per device type."""
    return _lt_gelu_is_gelu_fast_by_type(device.type)


def _always(device: torch.device) -> Optional[str]:
    return None


Candidate = tuple[Callable, Callable[[torch.device], Optional[str]]]

# Per op, name -> (function, availability). The first available one is the default (ours: what "triton" runs).
CANDIDATES: dict[str, dict[str, Candidate]] = {
    "layer_norm": {"triton": (layer_norm, _triton_here), "torch": (_layer_norm_torch, _always)},
    "qkv": {"triton": (qkv_projection, _triton_here), "cublas": (_qkv_cublas, _always)},
    "linear": {
        "triton": (linear, _triton_here),
        "cublas": (_linear_cublas, _always),
        "cublas+ext": (_linear_cublas_ext, _ext_here),
    },
    "mlp": {
        "triton": (mlp, _triton_here),
        "cublas": (_mlp_with(_linear_cublas), _always),
        "cublas+ext": (_mlp_with(_linear_cublas_ext), _ext_here),
    },
    # on the fused (B, N, 3, H, D) projection output (the model's path) and on separate q, k, v (when a wrapped
    # projection runs its own forward)
    "attention_qkv": {
        "triton": (_flash_qkv, _triton_here),
        "sdpa-flash": (_sdpa("FLASH_ATTENTION", True), _sdpa_backend_here("flash")),
        "sdpa-cudnn": (_sdpa("CUDNN_ATTENTION", True), _sdpa_backend_here("cudnn")),
        "sdpa-efficient": (_sdpa("EFFICIENT_ATTENTION", True), _sdpa_backend_here("efficient")),
    },
    "attention": {
        "triton": (_flash, _triton_here),
        "sdpa-flash": (_sdpa("FLASH_ATTENTION", False), _sdpa_backend_here("flash")),
        "sdpa-cudnn": (_sdpa("CUDNN_ATTENTION", False), _sdpa_backend_here("cudnn")),
        "sdpa-efficient": (_sdpa("EFFICIENT_ATTENTION", False), _sdpa_backend_here("efficient")),
    },
    "patch_embed": {"triton": (patch_embed, _triton_here), "torch": (patch_embed_ref, _always)},
}
OPS = tuple(CANDIDATES)


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
    """Median milliseconds per candidate (inf: failed), and the choice."""

    medians: dict[str, float]
    choice: str


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


def measure(op: str, args: tuple, training: bool, device: torch.device, names: Optional[list[str]] = None) -> Timing:
    """Time every available candidate of ``op`` on ``args`` and return the medians and the fastest (ties go to
    the earlier candidate in CANDIDATES, ours first)."""
    medians = {}
    for name in names or available(op, device):
        fn = CANDIDATES[op][name][0]
        try:
            medians[name] = float(_TIMER[-1](fn, args, training, device))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here loses, with the reason logged
            logger.warning("vivit_kernels: provider %s for %s failed while timing: %s", name, op, str(e).splitlines()[0])
            medians[name] = math.inf
    finite = {n: t for n, t in medians.items() if math.isfinite(t)}
    if not finite:
        raise RuntimeError(f"no provider of {op} ran on these inputs: {medians}")
    order = list(CANDIDATES[op])
    choice = min(finite, key=lambda n: (finite[n], order.index(n)))
    return Timing(medians, choice)


def available(op: str, device: torch.device) -> list[str]:
    """The candidates of ``op`` that can run on ``device`` here. Interpreted Triton kernels are not a speed
    candidate on the CPU unless a test installed its own timer."""
    return list(_available(op, device.type, _TIMER[-1] is cuda_event_timer))


@torch.compiler.assume_constant_result
def _available(op: str, device_type: str, real_timer: bool) -> tuple:
    device = torch.device(device_type)
    names = []
    for name, (_, check) in CANDIDATES[op].items():
        if check(device) is not None:
            continue
        if name == "triton" and device_type == "cpu" and real_timer:
            continue
        names.append(name)
    return tuple(names)


# ------------------------------------------------------------------------------------------------
# The cache file
# ------------------------------------------------------------------------------------------------
def cache_path() -> Path:
    """$VIVIT_KERNELS_CACHE_DIR/providers.json, else $XDG_CACHE_HOME (or ~/.cache)/vivit_kernels/providers.json."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vivit_kernels")
    return Path(root) / "providers.json"


def load_cache(path: Optional[Path] = None) -> dict[str, dict]:
    """The entries of the cache file: key -> {"choice": name, "medians_ms": {...}}. A missing file is empty; a
    truncated, garbled or foreign one is ignored with a warning (never trusted)."""
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
            op = key.split("(", 1)[0]
            if not (isinstance(entry, dict) and op in CANDIDATES and entry.get("choice") in CANDIDATES[op]):
                raise ValueError(f"bad entry {key!r}")
            entries[key] = entry
        return entries
    except (ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"vivit_kernels: ignoring the provider cache {path}: {e}", stacklevel=2)
        return {}


def _store(key: str, timing: Timing, path: Optional[Path] = None) -> None:
    """Add one entry: read, merge and replace the file atomically, under a lock (concurrent tuners keep both)."""
    from filelock import FileLock

    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        entries = load_cache(path)
        entries[key] = {"choice": timing.choice,
                        "medians_ms": {n: (t if math.isfinite(t) else None) for n, t in timing.medians.items()}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": "vivit_kernels-providers", "version": CACHE_VERSION, "entries": entries}, f,
                          indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


# ------------------------------------------------------------------------------------------------
# Choosing
# ------------------------------------------------------------------------------------------------
_memory: dict[str, str] = {}
_logged: set[str] = set()


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
        if op not in CANDIDATES:
            raise ValueError(f"unknown op {op!r} to pin; ops: {', '.join(OPS)}")
        if name not in CANDIDATES[op]:
            raise ValueError(f"unknown provider {name!r} for {op}; providers: {', '.join(CANDIDATES[op])}")
    return pins


def _cannot_tune_now(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def _log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message, *args)


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
            _log_once(f"{op}:{why}", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes and %s; "
                                     "using %s (run the model once outside it, or `vivit-kernels tune`)", op, why, names[0])
        return names[0]
    timing = measure(op, args, training, device, names)
    _memory[key] = timing.choice
    try:
        _store(key, timing)
    except OSError as e:
        _log_once(f"store:{e}", "vivit_kernels: could not write the provider cache %s (%s); choices stay in memory",
                  cache_path(), e)
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
    _log_once(f"{op}:compile", "vivit_kernels: attn='auto' has no measured choice for %s at these shapes while "
                               "torch.compile traces; using %s (run the model once uncompiled first, or `vivit-kernels "
                               "tune`)", op, names[0])
    return names[0]


def forget() -> None:
    """Drop the in-memory choices (the cache file stays)."""
    _memory.clear()


# ------------------------------------------------------------------------------------------------
# Tuning a whole model ahead of time (`vivit-kernels tune`)
# ------------------------------------------------------------------------------------------------
def _materialize(described: tuple, device: torch.device, seed: int = 0) -> tuple:
    """Random arguments matching recorded descriptions (dtype, shape, strides) on ``device``."""
    import ast

    g = torch.Generator().manual_seed(seed)
    args = []
    for d in described:
        if isinstance(d, str):
            args.append(ast.literal_eval(d))
            continue
        dtype, shape, stride = getattr(torch, d[0]), d[1], d[2]
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        base = (torch.randn(span, generator=g) * 0.1).to(device=device, dtype=dtype)
        args.append(base.as_strided(shape, stride))
    return tuple(args)


def model_calls(config, batch: int, dtype: torch.dtype, modes=("infer", "train")) -> list[tuple]:
    """The distinct op calls (op, described args, training) of one forward of the model at this batch and dtype,
    found on fake tensors (no memory, no math)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import VivitConfig, VivitForVideoClassification, image_hw

    cfg = VivitConfig.from_preset(config) if isinstance(config, str) else config
    calls: dict[tuple, None] = {}
    previous = torch.get_default_dtype()
    with FakeTensorMode(), recording() as seen:
        torch.set_default_dtype(dtype)
        try:
            model = VivitForVideoClassification(cfg, attn="auto")
        finally:
            torch.set_default_dtype(previous)
        x = torch.empty(batch, cfg.num_frames, cfg.num_channels, *image_hw(cfg), dtype=dtype)
        if "infer" in modes:
            with torch.no_grad():
                model.eval()(x)
        if "train" in modes:
            model.train()(x)
    for op, described, training, _ in seen:
        calls[(op, described, training)] = None
    return list(calls)


def tune_model(config, batch: int, dtype: torch.dtype, device: torch.device, modes=("infer", "train"),
               progress: bool = True) -> list[tuple[str, str, bool, Timing]]:
    """Measure every distinct op call of the model (see model_calls) on ``device`` and store the choices.
    Returns (op, shapes, training, timing) rows."""
    calls = model_calls(config, batch, dtype, modes)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(calls), desc="tuning", unit="op", disable=None)  # disable=None: only on a terminal
    for op, described, training in calls:
        args = _materialize(described, device)
        timing = measure(op, args, training, device)
        key = make_key(op, tuple(_describe(a) for a in args), training, str(device))
        _memory[key] = timing.choice
        _store(key, timing)
        shapes = " ".join("x".join(map(str, d[1])) for d in described if not isinstance(d, str))
        rows.append((op, shapes, training, timing))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def format_tuning(rows: list[tuple[str, str, bool, Timing]]) -> str:
    """A markdown table: op, argument shapes, mode, each candidate's median time, the choice."""
    names = []
    for *_, timing in rows:
        names += [n for n in timing.medians if n not in names]
    head = "| op | shapes | mode | " + " | ".join(f"{n} ms" for n in names) + " | choice |"
    lines = [head, "|" + "---|" * (4 + len(names))]
    for op, shapes, training, timing in rows:
        cells = []
        for n in names:
            t = timing.medians.get(n)
            cells.append("-" if t is None else ("failed" if not math.isfinite(t) else f"{t:.3f}"))
        lines.append(f"| {op} | {shapes} | {'train' if training else 'infer'} | " + " | ".join(cells) + f" | {timing.choice} |")
    return "\n".join(lines)


def cached_rows(device: torch.device) -> list[tuple[str, str, bool, Timing]]:
    """The cache file's choices for ``device`` (this software's versions) as format_tuning rows."""
    import re

    suffix = f" | {_device_id(str(device))} | {_versions()}"
    rows = []
    for key, entry in sorted(load_cache().items()):
        if not key.endswith(suffix):
            continue
        call = key[: -len(suffix)]
        op, mode = call.split("(", 1)[0], call.rsplit(" ", 1)[-1]
        shapes = " ".join("x".join(s.split(", ")) for s in re.findall(r"\[([\d, ]*)\]/", call))
        medians = {n: (math.inf if t is None else t) for n, t in entry.get("medians_ms", {}).items()}
        rows.append((op, shapes, mode == "train", Timing(medians, entry["choice"])))
    return rows
