"""The whole-model paths the benchmarks, the acceptance run and the device-free counts compare, each by one name,
and the one function that builds a model for a name.

- ours, our kernels behind transformers' modules: "triton" (always our kernels) and "auto" (per op the fastest
  correct implementation, and the whole model never slower than transformers' path); a suffix adds PEFT LoRA of
  rank 8 on q and v ("+lora", as ``finetune --lora-rank 8`` trains) or token merging ("+merge", ``MERGE_SCHEDULE``);
- transformers' own model: "transformers-eager", "transformers-sdpa" (what our attn="eager" / "sdpa" run), and
  "transformers-sdpa-compiled" (``torch.compile`` of the latter).

A factorised config (Models 2-4, which transformers does not have) builds our factorised model with the attention
the name ends in ("transformers-sdpa": our model with attn="sdpa").
"""

from __future__ import annotations

from typing import Any

__all__ = ["PATHS", "COUNTED", "TIMED", "COMPILED", "LORA", "MERGE", "MERGE_SCHEDULE", "build_model"]

COMPILED = "transformers-sdpa-compiled"
PATHS = ("triton", "auto", "transformers-eager", "transformers-sdpa", COMPILED)
# the device-free counts (FakeTensorMode): auto measures on a device and torch.compile traces, so neither is counted
COUNTED = ("triton", "transformers-eager", "transformers-sdpa")
# the seed's tables in the acceptance run (its compiled rows come last, budget permitting)
TIMED = ("triton", "auto", "transformers-eager", "transformers-sdpa")
LORA = "+lora"
MERGE = "+merge"
MERGE_SCHEDULE = "fraction-10"  # half the FLOPs of ViViT-B/16x2 (docs/merging.md)


def build_model(path: str, config: Any, dtype=None, device=None, seed: int = 0):
    """A classification model of ``path`` (see the module docstring) for ``config`` (a preset's name or a config),
    its weights drawn from ``seed`` directly in ``dtype`` (torch's default dtype when None), on ``device``. Under
    ``FakeTensorMode`` or ``torch.device("meta")`` it builds fake or meta weights."""
    import contextlib
    import copy

    import torch

    from ..model import VivitConfig, VivitForVideoClassification
    from ..models import VivitFactorizedConfig, VivitFactorizedForVideoClassification

    base = path.removesuffix(LORA).removesuffix(MERGE)
    if base not in PATHS:
        raise ValueError(f"unknown model path {path!r}; paths: {', '.join(PATHS)}, ours with {LORA} or {MERGE}")
    if path.endswith(MERGE) and base not in ("triton", "auto"):
        raise ValueError(f"{path!r}: {MERGE} applies to our paths (triton, auto), not to {base}")
    if path.endswith(LORA) and base == COMPILED:
        raise ValueError(f"{path!r}: {LORA} applies to an uncompiled model")
    config = VivitConfig.from_preset(config) if isinstance(config, str) else copy.deepcopy(config)
    torch.manual_seed(seed)
    with _default_dtype(dtype) if dtype is not None else contextlib.nullcontext():
        if isinstance(config, VivitFactorizedConfig):
            model = VivitFactorizedForVideoClassification(config, attn=base.removesuffix("-compiled").split("-")[-1])
        elif base.startswith("transformers-"):
            import transformers

            hf_config = transformers.VivitConfig(**config.to_dict())
            hf_config._attn_implementation = base.removeprefix("transformers-").removesuffix("-compiled")
            model = transformers.VivitForVideoClassification(hf_config)
        else:
            model = VivitForVideoClassification(config, attn=base)
    if device is not None:
        model = model.to(device)
    if path.endswith(LORA):
        from ..training import add_lora

        model = add_lora(model, 8)
    if path.endswith(MERGE):
        model.set_token_merging(MERGE_SCHEDULE)
    return torch.compile(model) if base == COMPILED else model


class _default_dtype:
    """Parameters created in ``dtype`` (torch's default dtype for the block)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        import torch

        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.previous)
