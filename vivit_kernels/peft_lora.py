"""PEFT's LoRA ``Linear`` read as adapters our ops add themselves: its base GEMM stays on our kernels and each active
adapter's low-rank update is added inside the op (the QKV op) or to its output. A LoRA layer we cannot reproduce
exactly (DoRA, a LoRA bias, another variant, hooks, merged with adapters disabled) runs its own forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .plain_modules import has_hooks, plain, why_not_plain

__all__ = ["linear_parts", "fusable_adapters", "dropout_active", "add_lora_"]


def _lora_adapters(module: nn.Module, x: torch.Tensor) -> list | None:
    """For a PEFT LoRA ``Linear`` whose forward we can reproduce (plain nn.Linear base and adapters, no DoRA or other
    variant, no LoRA bias, not merged with adapters disabled, no hooks): the (A, B, dropout, scaling) of each active
    adapter (empty when merged or disabled: the base layer alone). None for anything else (it runs its own forward)."""
    if type(module).__name__ != "Linear" or not type(module).__module__.startswith("peft.tuners.lora"):
        return None
    if has_hooks(module) or why_not_plain(module.base_layer, nn.Linear, x) is not None:
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
    if why_not_plain(module, nn.Linear, x) is None:
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


def dropout_active(drop: nn.Module) -> bool:
    """Whether an adapter's dropout changes its input here (training with lora_dropout > 0)."""
    return type(drop) is nn.Dropout and drop.training and drop.p > 0


def fusable_adapters(adapters: list, x: torch.Tensor) -> list:
    """(A, B, scaling, the adapter's own input or None) of each adapter, for an op that adds the updates itself:
    the weights as they are in ``x``'s dtype or float32 (the op casts float32 ones and writes their gradients in
    float32), else cast to ``x``'s dtype; the input ``dropout(x)`` where the adapter's dropout is active (training
    with lora_dropout > 0; one mask per adapter, as PEFT draws them), else None (x itself)."""
    fused = []
    for a, b, drop, scaling in adapters:
        if not (a.dtype == b.dtype and a.dtype in (x.dtype, torch.float32)):
            a, b = _adapter_weight(a, x), _adapter_weight(b, x)
        fused.append((a, b, scaling, drop(x) if dropout_active(drop) else None))
    return fused


def add_lora_(out: torch.Tensor, x: torch.Tensor, adapters: list) -> torch.Tensor:
    """``out += scaling * dropout(x) @ A^T @ B^T`` for each adapter, in place (two GEMMs each: the down
    projection, then the up projection accumulating into ``out``: PEFT's LoRA as written, scaling folded in)."""
    out2 = out.view(-1, out.shape[-1])  # a view: the update lands in ``out`` (an error, never a silent copy)
    for a, b, drop, scaling in adapters:
        down = F.linear(drop(x), _adapter_weight(a, x))
        out2.addmm_(down.reshape(-1, down.shape[-1]), _adapter_weight(b, x).t(), alpha=scaling)
    return out
