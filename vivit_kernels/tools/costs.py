"""What the ways of running a model cost, beside ``measure``'s plain forward: a training step by what trains
(every weight, LoRA, a linear probe) and a forward with token merging, counted on fake tensors (exact on any
machine), and their wall-clock on this machine (timings, labelled so)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..names import dtype_name
from .counting import CostTracker, counting_saved, storage_key
from .measure import Measurement, config_label, measure
from .model_paths import build_model

__all__ = ["TRAINING_MODES", "TrainingMeasurement", "measure_training", "format_training_markdown",
           "measure_lora_budget", "format_lora_budget_markdown",
           "time_training_steps", "MERGE_SWEEP", "measure_merging", "format_merging_markdown", "time_merging"]


TRAINING_MODES = ("full", "lora", "probe")  # every weight; LoRA rank 8 on q and v; the classifier alone


@dataclasses.dataclass
class TrainingMeasurement:
    """One training step (forward + backward of the loss): matmul FLOPs, kernel launches, and the activations
    saved for the backward, by what trains (``TRAINING_MODES``)."""

    mode: str
    path: str
    config: str
    batch: int
    dtype: str
    layers: int
    autocast: bool = False  # float32 weights under autocast to ``dtype`` (what ``finetune`` trains with)
    lora_rank: int = 0  # the adapters' rank in mode "lora"
    flops: int = 0
    launches: int = 0
    saved_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_training(mode: str, path: str = "triton", config="vivit-b-16x2", batch: int = 8,
                     dtype: torch.dtype = torch.bfloat16, lora_rank: int = 8,
                     autocast: bool = False) -> TrainingMeasurement:
    """A training step of ``mode`` ("full": every weight; "lora": PEFT LoRA of ``lora_rank`` on q and v and the
    classifier, as ``finetune --lora-rank``; "probe": the classifier alone, as ``finetune --freeze-backbone``;
    "frozen": no weight, the gradient of the input: the full step less every weight-gradient launch)
    counted on fake tensors: FLOPs and launches of forward + backward, bytes saved for the backward. The weights
    are ``dtype``, or with ``autocast`` float32 under autocast to ``dtype`` (mixed precision, what ``finetune``
    runs: every weight is cast per step, and PEFT's adapters are float32 either way)."""
    from ..model import VivitConfig
    from ..presets import image_hw
    from ..training import add_lora, freeze_all_but_head

    if mode not in (*TRAINING_MODES, "frozen"):
        raise ValueError(f"mode must be one of {', '.join(TRAINING_MODES)} or frozen, got {mode!r}")
    label = config_label(config)
    config = VivitConfig.from_preset(config) if isinstance(config, str) else config
    result = TrainingMeasurement(mode, path, label, batch, dtype_name(dtype), config.num_hidden_layers, autocast,
                                 lora_rank if mode == "lora" else 0)
    h, w = image_hw(config)
    with torch.device("meta"):  # PEFT cannot wrap fake parameters (it moves adapters with swap_tensors)
        model = build_model(path, config, torch.float32 if autocast else dtype)
        if mode == "lora":
            model = add_lora(model, lora_rank)
        elif mode == "probe":
            freeze_all_but_head(model)
        elif mode == "frozen":
            model.requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the meta parameters become fake ones
        model = model.to_empty(device="cpu")
        params = {storage_key(p) for p in model.parameters()}
        pixel_values = torch.empty(batch, config.num_frames, config.num_channels, h, w,
                                   dtype=torch.float32 if autocast else dtype, requires_grad=mode == "frozen")
        labels = torch.zeros(batch, dtype=torch.long)
        model.train()
        tracker = CostTracker(dtype, params | {storage_key(pixel_values)})
        with tracker:
            with counting_saved(params) as saved, torch.autocast("cpu", dtype=dtype, enabled=autocast):
                loss = model(pixel_values=pixel_values, labels=labels).loss
            loss.backward()
    result.flops, result.launches, result.saved_bytes = tracker.flops, tracker.launches, sum(saved.values())
    return result


def time_training_steps(preset: str = "small", batch: int = 4, rounds: int = 7, attn: str = "sdpa",
                        device: str = "cpu") -> dict[str, float]:
    """Wall-clock milliseconds of a training step (forward, backward, AdamW) per mode of ``TRAINING_MODES``: the
    median of ``rounds`` rounds that take one step of each mode in turn (interleaved, after one warm-up each). A
    timing of this machine, not a count."""
    import statistics
    import time

    from .._devices import synchronize
    from ..model import VivitForVideoClassification
    from ..presets import image_hw
    from ..training import add_lora, freeze_all_but_head

    runs = {}
    for mode in TRAINING_MODES:
        torch.manual_seed(0)
        model = VivitForVideoClassification(preset, attn=attn).to(device)
        model = add_lora(model, 8) if mode == "lora" else model
        if mode == "probe":
            freeze_all_but_head(model)
        runs[mode] = (model.train(), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    config = runs["full"][0].config
    x = torch.randn(batch, config.num_frames, 3, *image_hw(config), device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step(model, opt) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(pixel_values=x, labels=labels).loss.backward()
        opt.step()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for run in runs.values():
        step(*run)
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(rounds):
        for mode, run in runs.items():
            times[mode].append(step(*run))
    return {mode: statistics.median(t) for mode, t in times.items()}


MERGE_SWEEP = (None, 16, 64, "fraction-10", "fraction-20", "fraction-30")  # no merging, then lighter to heavier


def measure_merging(specs=MERGE_SWEEP, config="vivit-b-16x2", batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                    path: str = "triton") -> list[tuple[object, Measurement]]:
    """(schedule, measurement) of Model 1 (or the Model 2 config given) with token merging at each schedule
    (``vivit_kernels.merging``), counted on fake tensors like ``measure``."""
    from ..model import VivitConfig

    rows = []
    for spec in specs:
        cfg = VivitConfig.from_preset(config) if isinstance(config, str) else copy.deepcopy(config)
        cfg.token_merging = spec
        m = measure(path, cfg, batch, dtype)
        m.config = config_label(config)
        rows.append((spec, m))
    return rows


MERGE_OP = "vivit_kernels::token_merge_fwd"  # the merge step on our kernels (ops/token_merge.py)


def format_merging_markdown(rows: list[tuple[object, Measurement]]) -> str:
    """Per schedule: GFLOP and its ratio to no merging, the forward's launches, and the merge steps' own launches and
    bytes (per merging layer: every input read once and every output written once, the step's temporaries too)."""
    from ..merging import merge_schedule

    base = rows[0][1]
    lines = ["| schedule | tokens merged per layer | tokens after the last layer | GFLOP / clip | x unmerged | "
             "launches / forward | launches / merge step | MB / merge step |", "|---|---|---|---|---|---|---|---|"]
    for spec, m in rows:
        per_layer = merge_schedule(spec, m.layers, m.tokens) if spec else [0] * m.layers
        steps = sum(1 for r in per_layer if r)
        step_launches = f"{m.launches_by_op.get(MERGE_OP, 0) / steps:.0f}" if steps else "-"
        step_mb = f"{m.bytes_by_op.get(MERGE_OP, 0) / steps / 1e6:.1f}" if steps else "-"
        lines.append(f"| {spec if spec is not None else 'none'} | {', '.join(map(str, per_layer))} | "
                     f"{m.tokens - sum(per_layer)} | {m.flops / 1e9:.0f} | {m.flops / base.flops:.2f} | {m.launches} "
                     f"| {step_launches} | {step_mb} |")
    lines += ["", f"{base.config} ({base.tokens} tokens), batch {base.batch}, {base.dtype}, path {base.path}, one "
              "forward counted on fake tensors (FakeTensorMode): exact on any machine, no GPU ran it. MB / merge step: "
              "the mean over the merging layers of what the step reads and writes."]
    return "\n".join(lines)


def time_merging(specs=(None, "fraction-10", "fraction-20"), preset: str = "small", batch: int = 2, rounds: int = 7,
                 attn: str = "sdpa", device: str = "cpu") -> dict[object, float]:
    """Wall-clock milliseconds of an inference forward per merge schedule: the median of ``rounds`` rounds that run
    every schedule in turn (interleaved, after one warm-up each). A timing of this machine, not a count."""
    import statistics
    import time

    from .._devices import synchronize
    from ..model import VivitForVideoClassification
    from ..presets import image_hw

    torch.manual_seed(0)
    model = VivitForVideoClassification(preset, attn=attn).to(device).eval()  # a preset name or a config
    x = torch.randn(batch, model.config.num_frames, 3, *image_hw(model.config), device=device)
    times: dict[object, list[float]] = {spec: [] for spec in specs}

    def forward(spec) -> float:
        model.set_token_merging(spec)
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for spec in specs:
        forward(spec)
    for _ in range(rounds):
        for spec in specs:
            times[spec].append(forward(spec))
    model.set_token_merging(None)
    return {spec: statistics.median(t) for spec, t in times.items()}


def measure_lora_budget(config="vivit-b-16x2", batch: int = 8, dtype: torch.dtype = torch.bfloat16,
                        autocast: bool = False) -> dict[str, TrainingMeasurement]:
    """Issue 36's budget, counted: the full step, the step with every weight frozen (the gradient flowing to the
    input: the full step less its weight-gradient launches), the LoRA step (rank 8 on q and v) with the adapters
    inside our GEMMs, and with the adapters as GEMMs of their own (``ops._gemm.FUSE_LORA`` off: what they compute,
    with nothing repeated)."""
    from ..ops import _gemm

    out = {mode: measure_training(mode, "triton", config, batch, dtype, autocast=autocast)
           for mode in ("full", "frozen", "lora")}
    fused = _gemm.FUSE_LORA
    _gemm.FUSE_LORA = False
    try:
        out["lora, adapters as own GEMMs"] = measure_training("lora", "triton", config, batch, dtype, autocast=autocast)
    finally:
        _gemm.FUSE_LORA = fused
    return out


def format_lora_budget_markdown(budgets: list[dict[str, TrainingMeasurement]]) -> str:
    """measure_lora_budget's counts, one row per step and precision."""
    lines = ["| weights | step | launches | per layer | over frozen, per layer | GFLOP | x adapters as own GEMMs |",
             "|" + "---|" * 7]
    for b in budgets:
        frozen, own = b["frozen"], b["lora, adapters as own GEMMs"]
        for name, r in b.items():
            weights = f"fp32, {r.dtype} autocast" if r.autocast else r.dtype
            step = {"full": "every weight", "frozen": "no weight (gradient to the input)",
                    "lora": f"LoRA r={r.lora_rank} on q, v, inside our GEMMs"}.get(name, f"LoRA r={r.lora_rank} on q, "
                                                                                    "v, adapters as own GEMMs")
            lines.append(f"| {weights} | {step} | {r.launches} | {r.launches / r.layers:.1f} | "
                         f"{(r.launches - frozen.launches) / r.layers:+.2f} | {r.flops / 1e9:.0f} | "
                         f"{f'{r.flops / own.flops:.3f}' if r.mode == 'lora' else '-'} |")
    return "\n".join(lines)


def format_training_markdown(rows: list[TrainingMeasurement]) -> str:
    """Per model path, weights' precision and mode: GFLOP, launches (per layer: the step's total over the layers),
    GiB saved for the backward, each with its ratio to the same path's full fine-tuning at that precision."""
    full = {(r.path, r.autocast): r for r in rows if r.mode == "full"}
    lines = ["| path | weights | trains | GFLOP / step | x full | launches / step | per layer | x full "
             "| GiB saved for backward | x full |", "|" + "---|" * 10]
    what = {"full": "every weight", "lora": "LoRA r={} on q, v + classifier", "probe": "the classifier (probe)"}

    def ratio(r: TrainingMeasurement, field: str) -> str:
        f = full.get((r.path, r.autocast))
        return f"{getattr(r, field) / getattr(f, field):.3f}" if f else "n/a"

    for r in rows:
        weights = f"fp32, {r.dtype} autocast" if r.autocast else r.dtype
        lines.append(f"| {r.path} | {weights} | {what[r.mode].format(r.lora_rank)} | {r.flops / 1e9:.0f} "
                     f"| {ratio(r, 'flops')} | {r.launches} | {r.launches / r.layers:.1f} | {ratio(r, 'launches')} | "
                     f"{r.saved_bytes / 2**30:.2f} | {ratio(r, 'saved_bytes')} |")
    r = rows[0]
    dtypes = sorted({r.dtype for r in rows})
    lines += ["", f"{r.config}, batch {r.batch}, one training step (forward + backward of the loss), counted on fake "
              "tensors (FakeTensorMode): exact on any machine, no GPU ran it. Weights in "
              f"{' / '.join(dtypes)}, or in fp32 under autocast to that dtype (mixed precision: what `finetune` trains "
              "with; every weight is cast once per step). PEFT keeps LoRA adapters in fp32 either way. Launches per "
              f"layer: the step's total divided by the {r.layers} layers (the embedding and the head included)."]
    return "\n".join(lines)
