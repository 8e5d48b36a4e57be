"""Device-independent measurements: exact on any machine because they count, not time.

The model runs under ``FakeTensorMode`` (shapes and dtypes only, no memory, no math), at full ViViT-B size
if wanted, and we count:

- ``saved_bytes``: bytes saved for backward by one training forward (``saved_tensors_hooks``), activations
  only (parameters excluded; storages shared by several saved tensors counted once);
- ``peak_live_bytes``: the peak of bytes held by live tensors during an inference forward, activations only
  (what an allocator would need beyond weights and input), including the temporaries our ops allocate inside
  (the registry's ``CustomOp.transient``);
- ``launches``: kernel launches per inference forward: every ATen op that computes (views and allocations
  excluded) counts one, each of our ops counts the kernels it launches;
- ``flops``: matmul FLOPs of the forward (``torch.utils.flop_counter``'s formulas; ours from the op registry);
- ``hbm_bytes``: the minimum bytes each op must move (read every input once, write every output once), summed;
- ``roofline_ms``: per op max(FLOPs / peak FLOP/s, bytes / bandwidth), summed, for an A100 and an H100.
  A MODEL PREDICTION from datasheet peaks, not a measurement.

The same is measured for transformers' own ViViT (eager and SDPA attention) as the competitor rows.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["GPUS", "Measurement", "measure", "measure_all", "format_markdown", "NO_LAUNCH_ATEN", "PROVIDERS",
           "MODEL_VARIANTS", "measure_models", "format_models_markdown"]

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

# ours ("triton") and transformers' own attention implementations (what attn="eager" / "sdpa" run)
PROVIDERS = ("triton", "transformers-eager", "transformers-sdpa")
# SDPA kernels torch's FLOP counter has no formula for (the CPU ones a fake-tensor run on the CPU dispatches to)
_SDPA_WITHOUT_FORMULA = frozenset({"_scaled_dot_product_flash_attention_for_cpu"})
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class Measurement:
    provider: str
    batch: int
    dtype: str
    tokens: int
    layers: int
    saved_bytes: int = 0
    peak_live_bytes: int = 0
    launches: int = 0
    flops: int = 0
    hbm_bytes: int = 0
    roofline_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    launches_by_op: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Tracking
# ------------------------------------------------------------------------------------------------
def _tensors(obj) -> list[torch.Tensor]:
    out = []
    torch.utils._pytree.tree_map_(lambda x: out.append(x) if isinstance(x, torch.Tensor) else None, obj)
    return out


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def counting_saved(params: set[int]):
    """Inside: {storage: bytes} of every tensor autograd saves for the backward, the storages in ``params`` (the
    weights) left out; yields that dict, filled as the forward runs."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        yield saved


class _CostTracker(TorchDispatchMode):
    """Launches, FLOPs, bytes moved, roofline, and live activation bytes over time, per dispatched op."""

    def __init__(self, dtype: torch.dtype, preexisting: set[int]):
        super().__init__()
        self.dtype_name = _DTYPE_NAMES[dtype]
        self.preexisting = preexisting  # parameters and inputs: not activations
        self.live: dict[int, int] = {}
        self.live_total = 0
        self.peak = 0
        self.launches = 0
        self.launches_by_op: collections.Counter = collections.Counter()
        self.flops = 0
        self.bytes = 0
        self.roofline_s = {gpu: 0.0 for gpu in GPUS}

    def _free(self, key: int) -> None:
        size = self.live.pop(key, None)
        if size is not None:
            self.live_total -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from ..ops import registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        op = f"{func.namespace}::{name}"
        if func.namespace == "vivit_kernels":
            n_launch = registry.launches(op, args)
            transient = registry.transient_bytes(op, args)
        else:
            n_launch = 0 if (func.namespace != "aten" or name in NO_LAUNCH_ATEN) else 1
            transient = 0
        self.launches += n_launch
        if n_launch:
            self.launches_by_op[op] += n_launch
        # memory: new output storages become live; the op's temporaries count at this moment only
        for t in _tensors(out):
            key = _storage_key(t)
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
                flops = registry.attention_flops(args[0].numel(), args[1].shape[2])
            else:
                flops = 0
            seen, moved = set(), 0
            for t in _tensors((args, kwargs, out)):
                key = _storage_key(t)
                if key not in seen:
                    seen.add(key)
                    moved += t.numel() * t.element_size()
            moved += 2 * transient  # written, then read back
            self.flops += flops
            self.bytes += moved
            precision = self.dtype_name if self.dtype_name != "fp32" else (
                "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")
            for gpu, spec in GPUS.items():
                self.roofline_s[gpu] += max(flops / spec[precision], moved / spec["bandwidth"])
        return out


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(provider: str, config, dtype: torch.dtype) -> torch.nn.Module:
    """A classification model (random weights, created under the caller's FakeTensorMode)."""
    import copy

    import transformers

    from ..model import VivitForVideoClassification
    from ..models import VivitFactorizedConfig, VivitFactorizedForVideoClassification

    with _default_dtype(dtype):
        if isinstance(config, VivitFactorizedConfig):  # transformers has none: its attention is our eager / sdpa
            return VivitFactorizedForVideoClassification(copy.deepcopy(config), attn=provider.split("-")[-1])
        if provider.startswith("transformers-"):
            hf_config = transformers.VivitConfig(**copy.deepcopy(config).to_dict())
            hf_config._attn_implementation = provider.split("-", 1)[1]
            return transformers.VivitForVideoClassification(hf_config)
        return VivitForVideoClassification(copy.deepcopy(config), attn=provider)


def measure(provider: str, config="vivit-b-16x2", batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> Measurement:
    """All device-independent measurements of one provider at one batch size (see the module docstring)."""
    from ..model import VivitConfig, image_hw, num_tokens

    config = VivitConfig.from_preset(config) if isinstance(config, str) else config
    result = Measurement(provider, batch, _DTYPE_NAMES[dtype], num_tokens(config), config.num_hidden_layers)
    h, w = image_hw(config)
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = _build(provider, config, dtype)
        params = {_storage_key(p) for p in model.parameters()}
        pixel_values = torch.empty(batch, config.num_frames, config.num_channels, h, w, dtype=dtype)
        labels = torch.zeros(batch, dtype=torch.long)

        # training forward: what autograd keeps for the backward
        model.train()
        with counting_saved(params) as saved:
            model(pixel_values, labels=labels)
        result.saved_bytes = sum(saved.values())

        # inference forward: launches, FLOPs, bytes, peak live activations
        model.eval()
        tracker = _CostTracker(dtype, params | {_storage_key(pixel_values)})
        with torch.no_grad(), tracker:
            out = model(pixel_values)
            del out
    result.peak_live_bytes = tracker.peak
    result.launches = tracker.launches
    result.launches_by_op = dict(tracker.launches_by_op)
    result.flops = tracker.flops
    result.hbm_bytes = tracker.bytes
    result.roofline_ms = {gpu: 1e3 * s for gpu, s in tracker.roofline_s.items()}
    return result


def measure_all(config="vivit-b-16x2", batches=(1, 2, 4, 8), dtype: torch.dtype = torch.bfloat16,
                providers=PROVIDERS, progress: Callable[[str], None] | None = None) -> list[Measurement]:
    rows = []
    for batch in batches:
        for provider in providers:
            if progress:
                progress(f"measuring {provider} batch {batch}")
            rows.append(measure(provider, config, batch, dtype))
    return rows


def format_markdown(rows: list[Measurement], baseline: str = "transformers-sdpa") -> str:
    """One table: per batch and provider, the counts and their ratio to ``baseline`` at the same batch."""
    base = {(r.batch, r.dtype): r for r in rows if r.provider == baseline}
    gpus = list(GPUS)
    head = (
        "| batch | provider | saved for backward (GiB) | x | inference peak live (GiB) | x | launches / forward "
        "| GFLOP / forward | min HBM GB / forward | "
        + " | ".join(f"roofline {g.split('-')[0]} ms*" for g in gpus)
        + " |"
    )
    lines = [head, "|" + "---|" * (9 + len(gpus))]
    def ratio(a, c):
        return f"{a / c:.2f}" if c else "-"

    for r in rows:
        b = base.get((r.batch, r.dtype))
        lines.append(
            f"| {r.batch} | {r.provider} | {r.saved_bytes / 2**30:.2f} "
            f"| {ratio(r.saved_bytes, b.saved_bytes if b else 0)} "
            f"| {r.peak_live_bytes / 2**30:.2f} | {ratio(r.peak_live_bytes, b.peak_live_bytes if b else 0)} "
            f"| {r.launches} | {r.flops / 1e9:.0f} | {r.hbm_bytes / 1e9:.1f} | "
            + " | ".join(f"{r.roofline_ms[g]:.2f}" for g in gpus)
            + " |"
        )
    lines.append("")
    lines.append(f"x: ratio to {baseline} at the same batch. *roofline: a floor, not a prediction: per op "
                 "max(FLOPs / peak, bytes / bandwidth) from datasheet peaks, summed over this provider's ops; they "
                 "cannot run faster on that GPU. Not a measurement.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The paper's four models at ViViT-B/16x2
# ------------------------------------------------------------------------------------------------
# (name, preset, the paper's Table 2 FLOPs (1e9) and parameters (1e6) for ViViT-B, tubelet 16x2, as we read the
# table; its FLOPs count a multiply-add once, ours (torch's FLOP counter) twice)
MODEL_VARIANTS = (
    ("Model 1: spatio-temporal (transformers' ViViT)", "vivit-b-16x2", 455.2, 88.9),
    ("Model 2: factorised encoder (12 + 4 layers)", "vivit-b-16x2-fe", 284.4, 115.1),
    ("Model 3: factorised self-attention", "vivit-b-16x2-fsa", 372.3, 117.3),
    ("Model 4: factorised dot-product", "vivit-b-16x2-fdp", 277.1, 88.9),
)


def measure_models(batch: int = 1, dtype: torch.dtype = torch.bfloat16, provider: str = "triton",
                   progress: Callable[[str], None] | None = None) -> list[tuple[str, float, float, int, Measurement]]:
    """(name, paper GFLOPs, paper M params, our parameter count, measurement) per model of ``MODEL_VARIANTS``."""
    from ..model import VivitConfig, VivitForVideoClassification
    from ..models import FACTORIZED_PRESETS, VivitFactorizedConfig, VivitFactorizedForVideoClassification

    rows = []
    for name, preset, paper_gflops, paper_params in MODEL_VARIANTS:
        if progress:
            progress(f"measuring {preset}")
        config = (VivitFactorizedConfig.from_preset(preset) if preset in FACTORIZED_PRESETS
                  else VivitConfig.from_preset(preset))
        with torch.device("meta"):
            cls = VivitFactorizedForVideoClassification if preset in FACTORIZED_PRESETS else VivitForVideoClassification
            params = sum(p.numel() for p in cls(config, attn="eager").parameters())
        rows.append((name, paper_gflops, paper_params, params, measure(provider, config, batch, dtype)))
    return rows


def format_models_markdown(rows: list[tuple[str, float, float, int, Measurement]]) -> str:
    """The four models side by side, each with its ratio to Model 1 and the paper's Table 2 figures."""
    first = rows[0][4]
    lines = ["| model | params (M) | paper params (M) | GFLOP / forward (multiply-add = 2) | x | paper GFLOPs "
             "(multiply-add = 1) | x | saved for backward (GiB) | x | inference peak live (GiB) | x | "
             "launches / forward |", "|" + "---|" * 12]
    paper_first = rows[0][1]
    for name, paper_gflops, paper_params, params, m in rows:
        lines.append(f"| {name} | {params / 1e6:.1f} | {paper_params:.1f} | {m.flops / 1e9:.0f} | "
                     f"{m.flops / first.flops:.2f} | {paper_gflops:.1f} | {paper_gflops / paper_first:.2f} | "
                     f"{m.saved_bytes / 2**30:.3f} | {m.saved_bytes / first.saved_bytes:.2f} | "
                     f"{m.peak_live_bytes / 2**30:.4f} | {m.peak_live_bytes / first.peak_live_bytes:.2f} | "
                     f"{m.launches} |")
    m = rows[0][4]
    lines += ["", f"Batch {m.batch}, {m.dtype}, provider {m.provider}, 32 frames of 224x224 (FakeTensorMode counts; "
              "exact on any machine). x: ratio to Model 1. The paper's columns are its Table 2 as we read it "
              "(ViViT-B, tubelet 16x2); its runtime column we have not reproduced: no GPU has run these models."]
    return "\n".join(lines)
