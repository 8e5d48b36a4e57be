"""What happens when, along a whole video: every window of the video through a classification model.

    from vivit_kernels.timeline import timeline
    result = timeline("match.mp4", model="runs/mine", window="2s", stride="1s")
    for w in result["windows"]:
        print(w["start_s"], w["labels"][0], w["scores"][0])

(``vivit-kernels timeline VIDEO --model DIR --out timeline.json --plot timeline.png``.)

**Windows.** ``window`` and ``stride`` are frames of the video (an int, or a string like ``"64"``) or seconds
(``"2.5s"``, converted with the stream's frame rate). The defaults: the span the checkpoint's clip was trained on
(``num_frames`` x its frame sample rate: 64 frames for ViViT-B/16x2) and a stride of one window. Window k covers
frames [k x stride, k x stride + window); its clip is ``num_frames`` frames spread evenly over it (as ``read_clips``
samples a window). A tail shorter than a window is not scored; a video shorter than one window is scored as one
window over all its frames (frames repeat, as ``read_clips`` does).

**Streaming.** The video is decoded once, front to back, and each frame a window needs is resized and cropped
(the processor's evaluation views) as it is decoded; a frame is dropped as soon as no open window needs it, so
memory holds about one window of processed frames, whatever the video's length. Clips of several windows go
through the model in one batch (``batch_size``); the softmax is averaged over the processor's views.

**Output.** Per window: its frames, times, the top-k ``labels`` and ``scores``; ``series``: the probability of
the labels that ever reach the top (the ``plot_labels`` highest peaks) in every window, what ``plot_timeline``
draws; ``frames_held_max``: the most processed frames held at once (about one window's).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from . import __version__
from ._devices import synchronize
from .video import window_frames

__all__ = ["timeline", "plot_timeline", "parse_span"]


def parse_span(value: int | str | None, fps: float | None, what: str) -> int | None:
    """Frames from ``value``: an int or digits (frames), or seconds ending in "s" (needs the frame rate)."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if not fps:
                raise ValueError(f"{what} {text!r} is in seconds, but the video has no frame rate: give frames")
            frames = int(round(seconds * fps))
        else:
            frames = int(text)
    except ValueError as e:
        if "frame rate" in str(e):
            raise
        raise ValueError(f"{what} must be frames (64) or seconds (2.5s), got {value!r}") from None
    if frames < 1:
        raise ValueError(f"{what} must be at least one frame, got {value!r} ({frames} frames)")
    return frames


def _decoded_frames(path: str, errors: list) -> Iterator[np.ndarray]:
    """Every frame of the video, front to back, as (H, W, 3) uint8 (decoding stops at the first decoder error,
    kept in ``errors``)."""
    from .video import _frames, open_video

    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 0  # one video: FFmpeg's threads for its throughput
        for frame in _frames(container, stream, errors):
            yield frame.to_ndarray(format="rgb24")


def _stream_info(path: str) -> tuple[float | None, int | None]:
    """(frames per second or None, the frame count the header gives or None)."""
    from .video import open_video

    with open_video(path) as container:
        stream = container.streams.video[0]
        return float(stream.average_rate or stream.guessed_rate or 0) or None, (stream.frames or None)


def timeline(video: str | os.PathLike, model: Any, window: int | str | None = None, stride: int | str | None = None,
             top_k: int = 5, batch_size: int = 8, plot_labels: int = 5, progress: bool = False,
             **options: Any) -> dict[str, Any]:
    """Score every window of ``video`` (see the module docstring). ``model``: a checkpoint directory or a model;
    ``options`` as ``predict.load_predictor``'s (device, dtype, attn, merge, frame_sample_rate)."""
    from .predict import load_predictor

    path = str(video)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file {path}" + (" (it is a directory)" if os.path.isdir(path) else ""))
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}")
    fps, header_frames = _stream_info(path)
    predictor = load_predictor(model, workers=0, top_k=top_k, batch_size=batch_size, **options)
    net, processor = predictor.model, predictor.processor
    config = net.config
    num_frames = config.num_frames
    span = parse_span(window, fps, "window") or num_frames * processor.sample_rate(predictor.frame_sample_rate)
    step = parse_span(stride, fps, "stride") or span
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    names = config.id2label

    start_time = time.perf_counter()
    per_frame = None
    kept: dict[int, tuple[torch.Tensor, ...]] = {}  # processed frames some open window still needs
    next_window = 0  # the first window not yet complete
    pending: list[tuple[int, int, torch.Tensor]] = []  # (start, end, views-first clip) waiting for a batch
    windows: list[dict[str, Any]] = []
    probabilities: list[np.ndarray] = []
    errors: list = []
    seen = held = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=header_frames, unit="frame", desc="timeline", dynamic_ncols=True)

    def needed(i: int) -> bool:
        if next_window == 0 and i < span:  # the first window: every frame, for a video shorter than it
            return True
        first = max(next_window, math.ceil((i - span + 1) / step))
        return any(i in window_frames(k * step, k * step + span, num_frames) for k in range(first, i // step + 1))

    def clip_of(indices: np.ndarray) -> torch.Tensor:
        views = [torch.stack([kept[int(i)][v] for i in indices]) for v in range(len(kept[int(indices[0])]))]
        return torch.stack(views)  # (views, num_frames, 3, h, w)

    def run_batch() -> None:
        clips = torch.cat([c for _, _, c in pending]).to(device, dtype)
        with torch.no_grad():
            probs = net(clips).logits.float().softmax(-1)
        per_window = probs.view(len(pending), -1, probs.shape[-1]).mean(1).cpu()
        for (start, end, _), p in zip(pending, per_window, strict=True):
            top = p.topk(min(top_k, p.numel()))
            windows.append({"start_frame": start, "end_frame": end,
                            "start_s": None if not fps else round(start / fps, 3),
                            "end_s": None if not fps else round(end / fps, 3),
                            "labels": [names.get(i, str(i)) for i in top.indices.tolist()],
                            "scores": [round(s, 6) for s in top.values.tolist()]})
            probabilities.append(p.numpy())
        pending.clear()

    net.eval()
    try:
        for i, frame in enumerate(_decoded_frames(path, errors)):
            seen = i + 1
            if bar is not None:
                bar.update(1)
            if not needed(i):
                continue
            per_frame = per_frame or processor.views_per_frame(dtype=torch.float32)(*frame.shape[:2])
            kept[i] = per_frame(frame)
            held = max(held, len(kept))
            while True:  # the windows this frame completes
                indices = window_frames(next_window * step, next_window * step + span, num_frames)
                if int(indices[-1]) > i:
                    break
                pending.append((next_window * step, next_window * step + span, clip_of(indices)))
                next_window += 1
                for old in [j for j in kept if j < next_window * step]:
                    del kept[old]
                if len(pending) == batch_size:
                    run_batch()
        if seen == 0:
            raise ValueError(f"{path}: no frames could be decoded" + (f" ({errors[0]})" if errors else ""))
        if next_window == 0:  # shorter than one window: one window over every frame
            indices = window_frames(0, seen, num_frames)
            pending.append((0, seen, clip_of(indices)))
        if pending:
            run_batch()
        synchronize(device)
    finally:
        if bar is not None:
            bar.close()
    table = np.stack(probabilities)  # (windows, labels)
    leaders = np.argsort(-table.max(0), kind="stable")[:plot_labels]
    result = {"path": path, "fps": fps, "frames": seen, "window_frames": span, "stride_frames": step,
              "num_frames": num_frames, "frames_held_max": held, "windows": windows,
              "series": {names.get(int(c), str(int(c))): [round(float(v), 6) for v in table[:, c]] for c in leaders},
              "model": predictor.name, "merge": getattr(config, "token_merging", None),
              "seconds": round(time.perf_counter() - start_time, 3), "vivit_kernels": __version__}
    if errors:
        result["error"] = f"decoding stopped after {seen} frames: {errors[0]}"
    return result


def plot_timeline(result: dict[str, Any], path: str | os.PathLike) -> None:
    """The probability of each label in ``result["series"]`` against time (each window at its middle; frames
    where the video has no frame rate), as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fps = result["fps"]
    middles = [(w["start_frame"] + w["end_frame"]) / 2 for w in result["windows"]]
    x = [m / fps for m in middles] if fps else middles
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, scores in result["series"].items():
        ax.plot(x, scores, marker="o", markersize=3, label=label)
    ax.set_xlabel("time (s)" if fps else "frame")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(f"{os.path.basename(result['path'])}: windows of {result['window_frames']} frames every "
                 f"{result['stride_frames']}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
