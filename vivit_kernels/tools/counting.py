"""Counting what a forward or a training step costs, on fake tensors (exact on any machine, because it counts
rather than times): the one counting API that ``measure`` (a forward), ``costs`` (a training step, token merging)
and the tests use.

- ``CostTracker`` (a ``TorchDispatchMode``): per dispatched op, the kernels it launches (every ATen op that computes
  counts one, views and allocations none; each of our ops the kernels the op registry says it launches), its matmul
  FLOPs (``torch.utils.flop_counter``'s formulas; ours from the op registry), the bytes it must move (every input
  read once, every output written once) and the roofline floor on ``GPUS``; and the peak of bytes held by live
  activations, the temporaries our ops allocate inside included (the registry's ``CustomOp.transient``);
- ``counting_saved``: the bytes autograd saves for the backward (``saved_tensors_hooks``), weights left out,
  storages shared by several saved tensors counted once;
- ``storage_key``: what both key a tensor's memory by.
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..names import dtype_name

__all__ = ["GPUS", "NO_LAUNCH_ATEN", "CostTracker", "counting_saved", "storage_key"]

# Datasheet peaks (dense), for the roofline floor only.
GPUS: dict[str, dict[str, float]] = {
    "A100-SXM4-80GB": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "bandwidth": 2.039e12},
    "H100-SXM5-80GB": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "bandwidth": 3.35e12},
}

# ATen ops that only create views or allocate memory: no kernel launch.
NO_LAUNCH_ATEN = frozenset({
    "view", "_unsafe_view", "unbind", "select", "slice", "t", "transpose", "permute", "expand", "as_strided",
    "detach", "alias", "squeeze", "unsqueeze", "split", "split_with_sizes", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "reshape", "_reshape_alias", "lift_fresh", "unflatten",
    "flatten", "chunk", "narrow", "view_as", "expand_as", "_to_copy_meta",
})

# SDPA kernels torch's FLOP counter has no formula for (the CPU ones a fake-tensor run on the CPU dispatches to)
_SDPA_WITHOUT_FORMULA = frozenset({"_scaled_dot_product_flash_attention_for_cpu"})


def _tensors(obj) -> list[torch.Tensor]:
    out = []
    torch.utils._pytree.tree_map_(lambda x: out.append(x) if isinstance(x, torch.Tensor) else None, obj)
    return out


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def counting_saved(params: set[int]):
    """Inside: {storage: bytes} of every tensor autograd saves for the backward, the storages in ``params`` (the
    weights) left out; yields that dict, filled as the forward runs."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        yield saved


class CostTracker(TorchDispatchMode):
    """Launches, FLOPs, bytes moved, roofline, and live activation bytes over time, per dispatched op."""

    def __init__(self, dtype: torch.dtype, preexisting: set[int]):
        super().__init__()
        self.dtype_name = dtype_name(dtype)
        self.preexisting = preexisting  # parameters and inputs: not activations
        self.live: dict[int, int] = {}
        self.live_total = 0
        self.peak = 0
        self.launches = 0
        self.launches_by_op: collections.Counter = collections.Counter()
        self.bytes_by_op: collections.Counter = collections.Counter()
        self.flops = 0
        self.bytes = 0
        self.roofline_s = {gpu: 0.0 for gpu in GPUS}

    def _free(self, key: int) -> None:
        size = self.live.pop(key, None)
        if size is not None:
            self.live_total -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from ..ops import formulas

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        op = f"{func.namespace}::{name}"
        if func.namespace == "vivit_kernels":
            n_launch = formulas.launches(op, args)
            transient = formulas.transient_bytes(op, args)
        else:
            n_launch = 0 if (func.namespace != "aten" or name in NO_LAUNCH_ATEN) else 1
            transient = 0
        self.launches += n_launch
        if n_launch:
            self.launches_by_op[op] += n_launch
        # memory: new output storages become live; the op's temporaries count at this moment only
        for t in _tensors(out):
            key = storage_key(t)
            if key not in self.live and key not in self.preexisting:
                size = t.untyped_storage().nbytes()
                self.live[key] = size
                self.live_total += size
                weakref.finalize(t.untyped_storage(), self._free, key)
        self.peak = max(self.peak, self.live_total + transient)
        # work
        if n_launch:
            packet = func.overloadpacket
            if packet in flop_registry:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
            elif name in _SDPA_WITHOUT_FORMULA:  # (B, H, N, D) q and k: the registry's attention formula
                flops = formulas.attention_flops(args[0].numel(), args[1].shape[2])
            else:
                flops = 0
            seen, moved = set(), 0
            for t in _tensors((args, kwargs, out)):
                key = storage_key(t)
                if key not in seen:
                    seen.add(key)
                    moved += t.numel() * t.element_size()
            moved += 2 * transient  # written, then read back
            self.flops += flops
            self.bytes += moved
            self.bytes_by_op[op] += moved
            precision = self.dtype_name if self.dtype_name != "fp32" else (
                "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")
            for gpu, spec in GPUS.items():
                self.roofline_s[gpu] += max(flops / spec[precision], moved / spec["bandwidth"])
        return out
