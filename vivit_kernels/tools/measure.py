"""Device-independent measurements: exact on any machine because they count, not time.

The model runs under ``FakeTensorMode`` (shapes and dtypes only, no memory, no math), at full ViViT-B size
if wanted, and we count:

- ``saved_bytes``: bytes saved for backward by one training forward, activations only;
- ``peak_live_bytes``: the peak of bytes held by live activations during an inference forward (what an allocator
  would need beyond weights and input), the temporaries our ops allocate inside included;
- ``launches``, ``flops``, ``hbm_bytes``: kernel launches, matmul FLOPs and the minimum bytes moved by one
  inference forward;
- ``roofline_ms``: per op max(FLOPs / peak FLOP/s, bytes / bandwidth), summed, for an A100 and an H100.
  A MODEL PREDICTION from datasheet peaks, not a measurement.

(How each is counted: ``tools/counting.py``.) The same is measured for transformers' own ViViT (eager and SDPA
attention) as the competitor rows: the model paths of ``tools/model_paths.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..names import dtype_name
from .counting import GPUS, CostTracker, counting_saved, storage_key
from .model_paths import COUNTED, MERGE, build_model

__all__ = ["Measurement", "measure", "measure_all", "format_markdown", "MODEL_VARIANTS", "measure_models",
           "format_models_markdown", "LENGTHS", "LENGTH_PATHS", "measure_lengths", "format_lengths_markdown",
           "plot_lengths"]


@dataclasses.dataclass
class Measurement:
    """One model path's counts at one batch size (see the module docstring); ``config``: the preset or model type."""

    path: str
    config: str
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
    bytes_by_op: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_label(config) -> str:
    """What a table calls a config: a preset's name as given, else the model's type and size."""
    if isinstance(config, str):
        return config
    return (f"{config.model_type} ({config.num_hidden_layers} layers of {config.hidden_size}, "
            f"{config.num_frames} frames)")


def measure(path: str, config="vivit-b-16x2", batch: int = 1, dtype: torch.dtype = torch.bfloat16,
            training: bool = True) -> Measurement:
    """All device-independent measurements of one model path at one batch size (see the module docstring);
    ``training=False`` leaves out the training forward (``saved_bytes`` stays 0)."""
    from ..model import VivitConfig
    from ..presets import image_hw, num_tokens

    label = config_label(config)
    config = VivitConfig.from_preset(config) if isinstance(config, str) else config
    result = Measurement(path, label, batch, dtype_name(dtype), num_tokens(config),
                         config.num_hidden_layers)
    h, w = image_hw(config)
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = build_model(path, config, dtype)
        params = {storage_key(p) for p in model.parameters()}
        pixel_values = torch.empty(batch, config.num_frames, config.num_channels, h, w, dtype=dtype)
        labels = torch.zeros(batch, dtype=torch.long)

        # training forward: what autograd keeps for the backward
        if training:
            model.train()
            with counting_saved(params) as saved:
                model(pixel_values, labels=labels)
            result.saved_bytes = sum(saved.values())

        # inference forward: launches, FLOPs, bytes, peak live activations
        model.eval()
        tracker = CostTracker(dtype, params | {storage_key(pixel_values)})
        with torch.no_grad(), tracker:
            out = model(pixel_values)
            del out
    result.peak_live_bytes = tracker.peak
    result.launches = tracker.launches
    result.launches_by_op = dict(tracker.launches_by_op)
    result.bytes_by_op = dict(tracker.bytes_by_op)
    result.flops = tracker.flops
    result.hbm_bytes = tracker.bytes
    result.roofline_ms = {gpu: 1e3 * s for gpu, s in tracker.roofline_s.items()}
    return result


def measure_all(config="vivit-b-16x2", batches=(1, 2, 4, 8), dtype: torch.dtype = torch.bfloat16,
                paths=COUNTED, progress: Callable[[str], None] | None = None) -> list[Measurement]:
    rows = []
    for batch in batches:
        for path in paths:
            if progress:
                progress(f"measuring {path} batch {batch}")
            rows.append(measure(path, config, batch, dtype))
    return rows


def format_markdown(rows: list[Measurement], baseline: str = "transformers-sdpa") -> str:
    """One table: per batch and model path, the counts and their ratio to ``baseline`` at the same batch."""
    base = {(r.batch, r.dtype): r for r in rows if r.path == baseline}
    gpus = list(GPUS)
    head = (
        "| batch | path | saved for backward (GiB) | x | inference peak live (GiB) | x | launches / forward "
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
            f"| {r.batch} | {r.path} | {r.saved_bytes / 2**30:.2f} "
            f"| {ratio(r.saved_bytes, b.saved_bytes if b else 0)} "
            f"| {r.peak_live_bytes / 2**30:.2f} | {ratio(r.peak_live_bytes, b.peak_live_bytes if b else 0)} "
            f"| {r.launches} | {r.flops / 1e9:.0f} | {r.hbm_bytes / 1e9:.1f} | "
            + " | ".join(f"{r.roofline_ms[g]:.2f}" for g in gpus)
            + " |"
        )
    lines.append("")
    lines.append(f"x: ratio to {baseline} at the same batch. *roofline: a floor, not a prediction: per op "
                 "max(FLOPs / peak, bytes / bandwidth) from datasheet peaks, summed over this path's ops; they "
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


def measure_models(batch: int = 1, dtype: torch.dtype = torch.bfloat16, path: str = "triton",
                   progress: Callable[[str], None] | None = None) -> list[tuple[str, float, float, int, Measurement]]:
    """(name, paper GFLOPs, paper M params, our parameter count, measurement) per model of ``MODEL_VARIANTS``."""
    from ..model import VivitConfig, VivitForVideoClassification
    from ..models import VivitFactorizedConfig, VivitFactorizedForVideoClassification
    from ..presets import FACTORIZED_PRESETS

    rows = []
    for name, preset, paper_gflops, paper_params in MODEL_VARIANTS:
        if progress:
            progress(f"measuring {preset}")
        config = (VivitFactorizedConfig.from_preset(preset) if preset in FACTORIZED_PRESETS
                  else VivitConfig.from_preset(preset))
        with torch.device("meta"):
            cls = VivitFactorizedForVideoClassification if preset in FACTORIZED_PRESETS else VivitForVideoClassification
            params = sum(p.numel() for p in cls(config, attn="eager").parameters())
        rows.append((name, paper_gflops, paper_params, params, measure(path, config, batch, dtype)))
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
    lines += ["", f"Batch {m.batch}, {m.dtype}, path {m.path}, 32 frames of 224x224 (FakeTensorMode counts; "
              "exact on any machine). x: ratio to Model 1. The paper's columns are its Table 2 as we read it "
              "(ViViT-B, tubelet 16x2); its runtime column we have not reproduced: no GPU has run these models."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Cost against clip length: the four models at ViViT-B/16x2 from 16 to 256 frames
# ------------------------------------------------------------------------------------------------
LENGTHS = (16, 32, 64, 128, 256)  # frames of 224x224 (tubelet 2: 8 to 128 temporal indices)
# transformers' paths (our factorised models with that attention for Models 2-4), ours, ours with token merging
# (Models 1 and 2: merging needs one sequence per clip or per temporal index)
LENGTH_PATHS = ("transformers-eager", "transformers-sdpa", "triton", "triton" + MERGE)
GPU_MEMORY = 80 * 10**9  # bytes: an A100 / H100 80 GB


def measure_lengths(lengths=LENGTHS, batches=(1, 8), dtype: torch.dtype = torch.bfloat16, paths=LENGTH_PATHS,
                    progress: Callable[[str], None] | None = None) -> list[tuple[str, int, Measurement, int]]:
    """(model name, frames, inference Measurement, weight bytes) per model of ``MODEL_VARIANTS``, clip length,
    batch and path: a model built for that many frames (the same layers and costs as the trained one with
    ``interpolate_pos_encoding=True``; its position table is a parameter)."""
    from ..model import VivitConfig
    from ..models import VivitFactorizedConfig
    from ..presets import FACTORIZED_PRESETS

    rows = []
    for name, preset, _, _ in MODEL_VARIANTS:
        for frames in lengths:
            cls = VivitFactorizedConfig if preset in FACTORIZED_PRESETS else VivitConfig
            config = cls.from_preset(preset, num_frames=frames)
            mergeable = getattr(config, "attention_type", "factorized_encoder") == "factorized_encoder"
            with torch.device("meta"):
                weights = sum(p.numel() * p.element_size() for p in build_model("triton", config, dtype).parameters())
            for batch in batches:
                for path in paths:
                    if path.endswith(MERGE) and not mergeable:
                        continue
                    if progress:
                        progress(f"{preset} {frames} frames batch {batch} {path}")
                    rows.append((name, frames, measure(path, config, batch, dtype, training=False), weights))
    return rows


def format_lengths_markdown(rows: list[tuple[str, int, Measurement, int]]) -> str:
    """Per model, clip length and path: tokens, GFLOP per clip, the inference peak (weights + live activations)
    at each batch, and whether that fits an 80 GB GPU."""
    batches = sorted({m.batch for _, _, m, _ in rows})
    table = {(name, frames, m.path, m.batch): (m, weights) for name, frames, m, weights in rows}
    keys = list(dict.fromkeys((name, frames, m.path) for name, frames, m, _ in rows))
    head = ("| model | frames | path | tokens | GFLOP / clip | "
            + " | ".join(f"peak GB, batch {b} | fits 80 GB, batch {b}" for b in batches) + " |")
    lines = [head, "|" + "---|" * (5 + 2 * len(batches))]
    for name, frames, path in keys:
        first, _ = table[(name, frames, path, batches[0])]
        cells = []
        for b in batches:
            m, weights = table[(name, frames, path, b)]
            peak = weights + m.peak_live_bytes
            cells += [f"{peak / 1e9:.1f}", "yes" if peak <= GPU_MEMORY else "**no**"]
        gflop = first.flops / first.batch / 1e9
        lines.append(f"| {name.split(':')[0]} | {frames} | {path} | {first.tokens} | {gflop:.0f} | "
                     + " | ".join(cells) + " |")
    m = rows[0][2]
    lines += ["", f"{m.dtype}, frames of 224x224, ViViT-B/16x2 (FakeTensorMode counts; exact on any machine). GFLOP "
              "per clip with a multiply-add counted twice; peak: the weights plus the peak of live activations of "
              "an inference forward (the input clip and the allocator's slack not included; a GPU also holds the "
              "CUDA context). tokens: what one sequence holds in Model 1 (per clip, with [CLS]); Models 2-4 "
              "attend over shorter sequences (one temporal index's, one spatial position's)."]
    return "\n".join(lines)


def plot_lengths(rows: list[tuple[str, int, Measurement, int]], path: str) -> None:
    """GFLOP per clip and the batch-1 inference peak against frames, one line per model and path (log scales),
    with the 80 GB line: a PNG at ``path`` (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(m.batch for _, _, m, _ in rows)
    fig, (flops_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for name, frames, m, weights in rows:
        if m.batch == batch:
            series.setdefault((name.split(":")[0], m.path), []).append(
                (frames, m.flops / m.batch / 1e9, (weights + m.peak_live_bytes) / 1e9))
    models = list(dict.fromkeys(model for model, _ in series))
    styles = {"transformers-eager": "--", "transformers-sdpa": ":", "triton": "-", "triton" + MERGE: "-."}
    for (model, route), points in series.items():
        frames, flops, peak = zip(*sorted(points), strict=True)
        look = dict(color=f"C{models.index(model)}", linestyle=styles.get(route, "-"), marker="o", markersize=4)
        flops_ax.plot(frames, flops, label=f"{model}, {route}", **look)
        memory_ax.plot(frames, peak, **look)
    memory_ax.axhline(GPU_MEMORY / 1e9, color="red", linewidth=1)
    memory_ax.text(LENGTHS[-1], GPU_MEMORY / 1e9 * 1.15, "80 GB", color="red", ha="right")
    for ax, label in ((flops_ax, "GFLOP per clip"), (memory_ax, f"inference peak, batch {batch} (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames (224x224, tubelet 2)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    flops_ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.suptitle("ViViT-B/16x2 against clip length (counted on fake tensors, not timed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
