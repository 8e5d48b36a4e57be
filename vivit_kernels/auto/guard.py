"""The whole-model guard of ``attn="auto"``: the model as a whole is never slower than transformers' own path.

Per-op choices (``auto/choose.py``) can each win their own timing and still lose as a model (a copy per call, a
launch more, a layout the next op dislikes). So for each input key (the clip's shape, dtype and strides, grad
mode, the model's size, the pins, device and versions) ``auto`` also times one whole forward (inference), or
forward + backward to the weights (training), on our modules with the per-op choices, against the same model on
transformers' own modules (sdpa attention), and keeps the path that wins; ties go to transformers'. The choice
is stored beside the per-op ones (op ``"model"``, choices ``"kernels"`` / ``"transformers"``) and reused.

The guard measures only where per-op tuning would: never while torch.compile traces, a CUDA graph is captured,
on fake or meta tensors, with head_mask / output_attentions (they take eager attention anyway), nor under
torch.distributed with more than one process (ranks could choose differently and run different numbers of
collectives): there the kernels path runs, with one log line. Timing runs under a forked RNG, and gradients are
taken with ``torch.autograd.grad`` (no ``.grad`` is touched), so a guarded forward leaves no trace in training.
"""

from __future__ import annotations

import functools
import math

import torch

from .._log import log_once, logger
from . import choose
from .cache import WHOLE_MODEL, WHOLE_MODEL_CHOICES, describe, make_key

__all__ = ["ModelPath", "guard_pre_hook", "decide", "key_of"]


class ModelPath:
    """Which path this model's forward takes under attn='auto': set per forward by :func:`guard_pre_hook`."""

    def __init__(self) -> None:
        self.transformers = False  # True: transformers' own modules for this forward
        self.deciding = False


def _model_summary(base: torch.nn.Module) -> str:
    c = base.config
    return (f"{type(base).__name__} L{c.num_hidden_layers} C{c.hidden_size} H{c.num_attention_heads} "
            f"FF{c.intermediate_size} {c.hidden_act} tubelet{list(c.tubelet_size)}")


def _pixel_values(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("pixel_values")
    return x if isinstance(x, torch.Tensor) else None


def _why_not_now(x: torch.Tensor, kwargs: dict) -> str | None:
    if x.device.type == "meta" or isinstance(x, torch._subclasses.FakeTensor) or choose.is_recording():
        return ""  # tracing shapes (tune's recording, meta init): nothing to say
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    if kwargs.get("head_mask") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return ""  # these forwards take eager attention or collect outputs: not the path being guarded
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return "torch.distributed runs several processes (each would have to choose the same)"
    return None


def _training(base: torch.nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in base.parameters()))


def guard_pre_hook(base: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on each transformers VivitModel under attn='auto': picks this forward's path."""
    backend = getattr(base, "_vivit_auto_backend", None)
    if backend is None or backend.path is None or backend.path.deciding or torch.compiler.is_compiling():
        return None  # while compiling: the path of the last eager forward (a constant of the graph)
    x = _pixel_values(args, kwargs)
    if x is None:
        return None
    backend.path.transformers = decide(base, backend, x, _training(base, x), args, kwargs) == "transformers"
    return None


def key_of(base, backend, x: torch.Tensor, training: bool) -> tuple[tuple, str]:
    """(described, cache key) of the whole-model choice for this input."""
    described = (describe(x), repr(_model_summary(base)), repr(sorted(backend.pins.items())), repr(backend.off),
                 repr(getattr(base.config, "token_merging", None)))
    return described, make_key(WHOLE_MODEL, described, training, str(x.device))


def decide(base, backend, x: torch.Tensor, training: bool, args: tuple = (), kwargs: dict | None = None) -> str:
    """The path ("kernels" or "transformers") for this input: the per-op chain (``choose.resolve``: remembered,
    cached, else measured and stored) with the whole model as the thing measured."""
    kwargs = kwargs or {}
    described, _ = key_of(base, backend, x, training)

    def measure_now() -> choose.Timing:
        timing = _measure(
            base, backend, x, training, args[1:], {k: v for k, v in kwargs.items() if k != "pixel_values"}
        )
        logger.info("vivit_kernels: attn='auto' whole model %s %s: %s -> %s", "x".join(map(str, x.shape)),
                    "train" if training else "infer",
                    ", ".join(f"{n} {t:.3f} ms" for n, t in timing.medians.items()), timing.choice)
        return timing

    def explain(why: str) -> None:
        log_once(f"guard:{why}", "vivit_kernels: attn='auto' cannot compare the whole model with transformers' path "
                                 "now (%s); running its per-op choices", why)

    return choose.resolve(WHOLE_MODEL, described, training, str(x.device), valid=WHOLE_MODEL_CHOICES,
                          fallback="kernels", why_not_now=lambda: _why_not_now(x, kwargs), measure_now=measure_now,
                          explain=explain)


def _measure(base, backend, x: torch.Tensor, training: bool, rest: tuple, kwargs: dict) -> choose.Timing:
    path = backend.path
    params = [p for p in base.parameters() if p.requires_grad] if training else []

    def step_on(transformers: bool):
        def step(pixel_values: torch.Tensor):
            path.transformers = transformers
            with torch.enable_grad() if training else torch.no_grad():
                out = base(pixel_values, *rest, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
                if training:
                    torch.autograd.grad(hidden.float().square().mean(), params, allow_unused=True)
            return hidden

        step.vivit_path = "transformers" if transformers else "kernels"
        return step

    steps = {"kernels": step_on(False), "transformers": step_on(True)}
    timer = choose.current_timer()
    if timer is choose.cuda_event_timer:  # a whole model per call: fewer repetitions, each round's median
        timer = functools.partial(timer, warmup=1, repeats=7)
    medians = {name: math.inf for name in steps}
    devices = [x.device] if x.device.type == "cuda" else []
    path.deciding = True
    try:
        with torch.random.fork_rng(devices=devices, device_type=x.device.type):
            # the kernels path first: its first run makes the per-op choices, then both are timed, twice, in turn
            for _ in range(2):
                for name, step in steps.items():
                    try:
                        medians[name] = min(medians[name], float(timer(step, (x.detach(),), False, x.device)))
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as e:  # noqa: BLE001 - a path that fails here loses, with the reason said
                        logger.warning("vivit_kernels: the %s path failed while the whole model was timed: %s", name,
                                       str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        path.deciding = False
        path.transformers = False
    k, t = medians["kernels"], medians["transformers"]
    choice = "kernels" if math.isfinite(k) and k < t else "transformers"
    return choose.Timing(medians, choice)
