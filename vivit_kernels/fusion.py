"""What our kernels may compute around instead of calling: plain modules (exactly nn.Linear, nn.LayerNorm,
nn.Conv3d, transformers' ViViT modules, or our kernel subclasses of them) without hooks, in the inputs' dtype or
autocast's; and PEFT's LoRA ``Linear``, whose base GEMM stays on our kernels with its adapters' low-rank update
added to the output. Anything else runs its own forward (one log line says which and why)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state

from ._log import log_once

__all__ = ["has_hooks", "plain", "autocast_dtype", "autocast_to", "compute_weight", "linear_parts", "fusable_adapters",
           "add_lora_", "KERNEL_CLASSES", "collecting_attentions"]

# Our subclasses of each plain class, which count as that class (modules.py fills it in).
KERNEL_CLASSES: dict[type, tuple[type, ...]] = {}


# --------------------------------------------------------------------------------------------------
# What may be fused: plain modules without hooks
# --------------------------------------------------------------------------------------------------
def _is_capture_hook(hook) -> bool:
    """transformers' output-capturing hooks (hidden states, attentions) stay installed once used and do
    nothing unless outputs are being collected; they do not make a module 'hooked'."""
    return getattr(hook, "__name__", "") == "output_capturing_hook"


def has_hooks(module: nn.Module) -> bool:
    """Whether calling around ``module`` (instead of calling it) would skip hooks someone relies on."""
    if module._forward_pre_hooks or any(not _is_capture_hook(h) for h in module._forward_hooks.values()):
        return True
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)


def collecting_attentions() -> bool:
    """Whether transformers is collecting attention probabilities in this forward (output_attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout: be safe, treat as collecting
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _why_not_plain(module: nn.Module, kind: type, x: torch.Tensor) -> str | None:
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
    why = _why_not_plain(module, kind, x)
    if why is not None:
        where = re.sub(r"\.layers\.\d+\.", ".layers.*.", where)  # one line for that module of every layer
        log_once(f"{where}:{why}", f"vivit_kernels: {where} {why}: it runs its own forward; the rest of the layer "
                                    "stays on vivit_kernels' kernels")
    return why is None


# --------------------------------------------------------------------------------------------------
# PEFT's LoRA Linear: its base GEMM stays on our kernels, the low-rank update is added to the output
# --------------------------------------------------------------------------------------------------
def _lora_adapters(module: nn.Module, x: torch.Tensor) -> list | None:
    """For a PEFT LoRA ``Linear`` whose forward we can reproduce (plain nn.Linear base and adapters, no DoRA or other
    variant, no LoRA bias, not merged with adapters disabled, no hooks): the (A, B, dropout, scaling) of each active
    adapter (empty when merged or disabled: the base layer alone). None for anything else (it runs its own forward)."""
    if type(module).__name__ != "Linear" or not type(module).__module__.startswith("peft.tuners.lora"):
        return None
    if has_hooks(module) or _why_not_plain(module.base_layer, nn.Linear, x) is not None:
        return None
    if module.disable_adapters or module.merged:
        return None if module.disable_adapters and module.merged else []  # PEFT would unmerge first: its forward
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name) or \
                getattr(module, "lora_bias", {}).get(name):
            return None
        if any(type(m) is not nn.Linear or m.bias is not None or has_hooks(m) for m in (a, b)) or \
                type(drop) not in (nn.Dropout, nn.Identity):
            return None
        adapters.append((a.weight, b.weight, drop, module.scaling[name]))
    return adapters


def linear_parts(module: nn.Module, x: torch.Tensor, where: str) -> tuple[nn.Linear, list] | None:
    """(the plain nn.Linear whose GEMM our kernels run, the LoRA adapters to add to its output) for a plain
    nn.Linear (no adapters) or a PEFT LoRA Linear we reproduce; None (logged once) for anything else."""
    if _why_not_plain(module, nn.Linear, x) is None:
        return module, []
    adapters = _lora_adapters(module, x)
    if adapters is not None:
        return module.base_layer, adapters
    plain(module, nn.Linear, x, where)  # says why it runs its own forward
    return None


def _adapter_weight(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An adapter's weight in ``x``'s dtype (a differentiable cast): PEFT keeps adapters in float32 on a bf16 or
    fp16 base (``autocast_adapter_dtype``) and casts x up; our GEMMs run in x's dtype and cast the small weights."""
    return param if param.dtype == x.dtype else param.to(x.dtype)


def fusable_adapters(adapters: list, x: torch.Tensor) -> list:
    """(A, B, scaling, the adapter's own input or None) of each adapter, for an op that adds the updates itself:
    the weights as they are in ``x``'s dtype or float32 (the op casts float32 ones and writes their gradients in
    float32), else cast to ``x``'s dtype; the input ``dropout(x)`` where the adapter's dropout is active (training
    with lora_dropout > 0; one mask per adapter, as PEFT draws them), else None (x itself)."""
    fused = []
    for a, b, drop, scaling in adapters:
        if not (a.dtype == b.dtype and a.dtype in (x.dtype, torch.float32)):
            a, b = _adapter_weight(a, x), _adapter_weight(b, x)
        active = type(drop) is nn.Dropout and drop.training and drop.p > 0
        fused.append((a, b, scaling, drop(x) if active else None))
    return fused


def add_lora_(out: torch.Tensor, x: torch.Tensor, adapters: list) -> torch.Tensor:
    """``out += scaling * dropout(x) @ A^T @ B^T`` for each adapter, in place (two GEMMs each: the down
    projection, then the up projection accumulating into ``out``: PEFT's LoRA as written, scaling folded in)."""
    out2 = out.view(-1, out.shape[-1])  # a view: the update lands in ``out`` (an error, never a silent copy)
    for a, b, drop, scaling in adapters:
        down = F.linear(drop(x), _adapter_weight(a, x))
        out2.addmm_(down.reshape(-1, down.shape[-1]), _adapter_weight(b, x).t(), alpha=scaling)
    return out
