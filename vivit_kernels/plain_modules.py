"""Which modules our kernels may compute around instead of calling: plain modules (exactly nn.Linear, nn.LayerNorm,
nn.Conv3d, transformers' ViViT modules, or our kernel subclasses of them) without hooks, in the inputs' dtype or
autocast's. Anything else runs its own forward (one log line says which and why). PEFT's LoRA ``Linear`` is read in
``peft_lora.py``."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.modules import module as _module_state

from ._log import log_once

__all__ = ["has_hooks", "observes", "plain", "why_not_plain", "autocast_dtype", "autocast_to", "compute_weight",
           "KERNEL_CLASSES", "collecting_attentions"]

# Our subclasses of each plain class, which count as that class (modules.py fills it in).
KERNEL_CLASSES: dict[type, tuple[type, ...]] = {}


# Modules whose hooks observe a forward without changing what it computes: torch's module trackers (FlopCounterMode
# and the memory tracker install their global hooks). A module computed around is then attributed to its parent.
_OBSERVERS = ("torch.utils.module_tracker", "torch.distributed._tools.mod_tracker")


def observes(hook) -> bool:
    """Whether ``hook`` only watches: transformers' output-capturing hooks (hidden states, attentions: they stay
    installed once used and do nothing unless outputs are being collected), or a method of one of torch's module
    trackers. Any other hook may change what a module computes, so the module runs its own forward."""
    if getattr(hook, "__name__", "") == "output_capturing_hook":
        return True
    owner = getattr(hook, "__self__", None)
    return owner is not None and type(owner).__module__ in _OBSERVERS


def has_hooks(module: nn.Module) -> bool:
    """Whether calling around ``module`` (instead of calling it) would skip hooks that may change its result: its
    own or global forward hooks, observers (``observes``) aside."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values(),
             *_module_state._global_forward_pre_hooks.values(), *_module_state._global_forward_hooks.values())
    return any(not observes(h) for h in hooks)


def collecting_attentions() -> bool:
    """Whether transformers is collecting attention probabilities in this forward (output_attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout: be safe, treat as collecting
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def why_not_plain(module: nn.Module, kind: type, x: torch.Tensor) -> str | None:
    """None when ``module`` is exactly ``kind`` (or our kernel subclass of it), has no hooks and matches x's
    dtype and device; otherwise why not."""
    if not (type(module) is kind or type(module) in KERNEL_CLASSES.get(kind, ())):
        return f"is a {type(module).__module__}.{type(module).__qualname__}, not a plain {kind.__name__}"
    if has_hooks(module):
        return "has forward hooks"
    weight = getattr(module, "weight", None)
    if weight is None or weight.device != x.device or (weight.dtype != x.dtype and not autocast_to(weight, x)):
        return f"holds {None if weight is None else weight.dtype} weights for {x.dtype} inputs (a dtype mix)"
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """autocast's dtype where it is on for this device type, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_to(param: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether autocast is on and ``x`` is in its dtype while the floating-point ``param`` is not: our ops then
    take the parameter cast to that dtype (``compute_weight``), as autocast casts weights for F.linear."""
    return param.is_floating_point() and x.dtype == autocast_dtype(x.device.type)


def compute_weight(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``param`` in ``x``'s dtype under autocast (a differentiable cast: gradients reach the fp32 parameter)."""
    if param is None or param.dtype == x.dtype or not autocast_to(param, x):
        return param
    return param.to(x.dtype)


def plain(module: nn.Module, kind: type, x: torch.Tensor, where: str) -> bool:
    """Whether ``module`` (at ``where`` in the model) may be computed around instead of called; logs once why not."""
    why = why_not_plain(module, kind, x)
    if why is not None:
        where = re.sub(r"\.layers\.\d+\.", ".layers.*.", where)  # one line for that module of every layer
        log_once(f"{where}:{why}", f"vivit_kernels: {where} {why}: it runs its own forward; the rest of the layer "
                                    "stays on vivit_kernels' kernels")
    return why is None
