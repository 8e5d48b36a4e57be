"""Tuning a whole model ahead of time (``vivit-kernels tune``), and the tables of what ``attn="auto"`` chose.

``tune_model`` finds every distinct op call of one forward (and training step) of a configuration on fake
tensors, measures each on the device (``choose.measure``: checked against the op's reference, then timed),
stores the choices, and then runs the whole-model guard (``guard.py``) for each mode, so a model at those shapes
later measures nothing. ``cache.format_entries`` prints one row per candidate, naming what it ran there.
"""

from __future__ import annotations

import ast

import torch

from ..model import VivitForVideoClassification, resolve_config
from ..presets import image_hw
from . import choose
from .cache import describe, load_cache
from .guard import decide, key_of

__all__ = ["model_calls", "tune_model"]


def _materialize(described: tuple, device: torch.device, seed: int = 0) -> tuple:
    """Random arguments matching recorded descriptions (dtype, shape, strides) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    args = []
    for d in described:
        if isinstance(d, str):
            args.append(ast.literal_eval(d))
            continue
        dtype, shape, stride = getattr(torch, d[0]), d[1], d[2]
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
        base = (torch.randn(span, generator=g) * 0.1).to(device=device, dtype=dtype)
        args.append(base.as_strided(shape, stride))
    return tuple(args)


def model_calls(config, batch: int, dtype: torch.dtype, modes=("infer", "train")) -> list[tuple]:
    """The distinct op calls (op, described args, training) of one forward of the model at this batch and dtype,
    found on fake tensors (no memory, no math)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = resolve_config(config)
    calls: dict[tuple, None] = {}
    previous = torch.get_default_dtype()
    with FakeTensorMode(), choose.recording() as seen:
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
               progress: bool = True) -> list[dict]:
    """Measure every distinct op call of the model (see model_calls) on ``device`` and store the choices, then
    compare the whole model with transformers' path for each mode (the guard) and store that too.
    Returns the stored entries (``cache.format_entries`` prints them), the whole-model ones last."""
    calls = model_calls(config, batch, dtype, modes)
    entries: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(calls) + len(modes), desc="tuning", unit="call", disable=None)  # only on a terminal
    for op, described, training in calls:
        args = _materialize(described, device)
        timing = choose.measure(op, args, training, device)
        entries.append(choose.remember(op, tuple(describe(a) for a in args), training, str(device), timing))
        if bar is not None:
            bar.update(1)
    entries += _guard_entries(config, batch, dtype, device, modes, bar)
    if bar is not None:
        bar.close()
    return entries


def _guard_entries(config, batch, dtype, device, modes, bar) -> list[dict]:
    cfg = resolve_config(config)
    model = VivitForVideoClassification(cfg, attn="auto").to(device=device, dtype=dtype)
    base, backend = model.vivit, model.vivit._vivit_auto_backend
    x = torch.randn(batch, cfg.num_frames, cfg.num_channels, *image_hw(cfg), generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    entries = []
    for mode in modes:
        training = mode == "train"
        model.train(training)
        with torch.enable_grad() if training else torch.no_grad():
            decide(base, backend, x, training)
        entry = load_cache().get(key_of(base, backend, x, training)[1])
        if entry is not None:
            entries.append(entry)
        if bar is not None:
            bar.update(1)
    return entries
