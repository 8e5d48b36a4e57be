"""``vivit-kernels demo``: a synthetic clip through every backend, with the agreement with eager and the time per
batch. Without a checkpoint, a small model with random weights (said so). Without a GPU the Triton backend is one
interpreted run: a correctness run, labelled, not timed."""

from __future__ import annotations

import time

import torch

from .._devices import device_name, synchronize

__all__ = ["synthetic_clip", "run_demo"]


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A deterministic uint8 clip (T, H, W, 3): a bright square moving over a colour gradient, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    clip = torch.empty(frames, height, width, 3)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        frame = torch.stack([ys, xs, (ys + xs) / 2], dim=-1).clone()
        y0 = (t * height // max(frames, 1)) % max(height - side, 1)
        x0 = (t * width // max(frames, 1)) % max(width - side, 1)
        frame[y0 : y0 + side, x0 : x0 + side] = 255.0
        clip[t] = frame + 8 * torch.randn(height, width, 3, generator=g)
    return clip.clamp(0, 255).to(torch.uint8)


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu"


def run_demo(model_dir: str | None, preset: str, device: torch.device, dtype: torch.dtype, batch: int = 1,
             repeats: int = 3, seed: int = 0, merge=None) -> dict[str, tuple[torch.Tensor, float]]:
    """Print the demo (model, input, one row per backend); returns backend -> (logits, ms per batch). ``merge``
    (a token-merging schedule, ``monkey_patch.set_token_merging``): every backend again with merging, rows "NAME+merge",
    their difference to the unmerged eager logits being merging's approximation."""
    from ..auto.backends import backend_status
    from ..model import VivitForVideoClassification
    from ..names import ATTN
    from ..presets import image_hw, num_tokens
    from ..processing import VideoProcessor

    if model_dir:
        model = VivitForVideoClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        print(f"model: {model_dir} ({type(model).__name__})")
    else:
        torch.manual_seed(seed)
        model = VivitForVideoClassification(preset).to(device=device, dtype=dtype).eval()
        print(f"model: preset {preset!r} with RANDOM weights (seed {seed}); its labels mean nothing. "
              "Pass --model DIR for a real checkpoint.")
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    height, width = image_hw(cfg)
    print(f"  {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"{num_tokens(cfg)} tokens, {n_params / 1e6:.2f} M parameters, {dtype}, {device}")
    processor = VideoProcessor.for_model(cfg, model_dir)
    clip = synthetic_clip(cfg.num_frames, height * 3 // 2, width * 2, seed=seed)  # resized and cropped
    pixel_values = processor(clip[None].repeat(batch, 1, 1, 1, 1), device=device, dtype=dtype)["pixel_values"]
    print(f"input: synthetic {tuple(clip.shape[1:3])} clip -> VideoProcessor -> pixel_values "
          f"{tuple(pixel_values.shape)} (batch, frames, channels, H, W)")

    status = backend_status()
    results = {}
    for schedule in [None] + ([merge] if merge not in (None, "off") else []):
        model.set_token_merging(schedule)
        for name in ATTN:
            ok, why = status[name]
            if not ok:
                if schedule is None:
                    print(f"  {name:<7} skipped: {why}")
                continue
            model.set_attn(name)
            runs = 1 if _interpreted(name, device) else repeats  # the interpreter is slow and not timed
            with torch.no_grad():
                logits = model(pixel_values).logits  # warm-up (compiles kernels on first use)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(runs):
                    logits = model(pixel_values).logits
                synchronize(device)
            key = name if schedule is None else f"{name}+merge"
            results[key] = (logits.float(), (time.perf_counter() - start) * 1e3 / runs)
    model.set_token_merging(None)

    reference = results.get("eager", next(iter(results.values())))[0]
    width_of = max(8, *(len(n) for n in results))
    print(f"\n{'backend':<{width_of}} {'ms/batch':>10} {'max |logits - eager|':>22}  top-1 label")
    for name, (logits, ms) in results.items():
        top = logits[0].argmax().item()
        diff = (logits - reference).abs().max().item()
        note = (" (Triton interpreter on CPU: a correctness run, not a speed figure)"
                if _interpreted(name.removesuffix("+merge"), device) else "")
        print(f"{name:<{width_of}} {ms:>10.2f} {diff:>22.3g}  {cfg.id2label.get(top, top)}{note}")
    if merge not in (None, "off"):
        print(f"+merge: token merging {merge!r} (docs/merging.md); its difference to unmerged eager is merging's "
              "approximation, not an error of the kernels")
    timed = sorted(n for n in results if not _interpreted(n.removesuffix("+merge"), device))
    print(
        f"\ntimings are wall-clock on {device_name(device)}, after one warm-up: the mean of {repeats} "
        f"{'run' if repeats == 1 else 'runs'} for {', '.join(timed)}"
        + (
            "; the interpreted Triton run once, as a correctness check"
            if "triton" in results and "triton" not in timed
            else ""
        )
    )
    return results
