"""Small test videos, encoded by the tests themselves with PyAV."""

from __future__ import annotations

import numpy as np


def frame_pattern(index: int, height: int, width: int) -> np.ndarray:
    """A frame whose content encodes its index (a bright bar at a position that moves with the index)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    x = (index * 7) % max(width - 8, 1)
    img[:, x : x + 8, 2] = 255
    return img


def write_video(path, n_frames: int = 40, height: int = 48, width: int = 64, fps: int = 25, codec: str = "mpeg4",
                gop: int = 10, faststart: bool = False) -> str:
    """An mp4 of ``frame_pattern`` frames; ``faststart`` puts the index (moov) before the frames, as web videos do."""
    import av

    with av.open(str(path), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def bar_position(frame: np.ndarray) -> int:
    """Column where a frame's blue bar starts (robust to compression noise)."""
    blue = frame[..., 2].astype(np.float32).mean(0)
    return int(np.argmax(np.convolve(blue, np.ones(8), mode="valid")))


def motion_frames(direction: str, n_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A bright square on a dark, noisy background moving ``up`` or ``down`` (one step per frame) from a random
    start: any one frame says nothing about the direction, two frames do. (n_frames, height, width, 3) uint8."""
    side = max(4, min(height, width) // 4)
    step = max(1, (height - side) // max(n_frames, 1))
    travel = step * (n_frames - 1)
    x0 = int(rng.integers(0, width - side + 1))
    y_start = int(rng.integers(0, max(height - side - travel, 0) + 1))
    frames = rng.integers(0, 40, size=(n_frames, height, width, 3)).astype(np.uint8)
    colour = rng.integers(180, 256, size=3).astype(np.uint8)
    for t in range(n_frames):
        y = y_start + t * step if direction == "down" else y_start + travel - t * step
        frames[t, y : y + side, x0 : x0 + side] = colour
    return frames


def write_frames(path, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4") -> str:
    """Encode (T, H, W, 3) uint8 frames as a video file."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def motion_dataset(root, per_class: int = 24, n_frames: int = 8, height: int = 40, width: int = 48,
                   seed: int = 0) -> str:
    """root/{up,down}/NNN.mp4: a dataset whose label needs time (the direction the square moves)."""
    from pathlib import Path

    rng = np.random.default_rng(seed)
    for label in ("down", "up"):
        folder = Path(root) / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_frames(folder / f"{i:03d}.mp4", motion_frames(label, n_frames, height, width, rng))
    return str(root)


def prediction_collection(root):
    """14 videos in class folders under ``root/videos``, plus a corrupt and an empty file, and a tiny checkpoint
    ``root/model`` with named labels and its own clip sampling (frame_sample_rate 1): what the prediction tests
    classify."""
    import json
    import os

    import torch

    import vivit_kernels as vk
    from vivit_kernels.processing import VideoProcessor

    motion_dataset(root / "videos", per_class=7)
    (root / "videos" / "up" / "corrupt.mp4").write_bytes(os.urandom(3000))
    (root / "videos" / "down" / "empty.mp4").write_bytes(b"")
    torch.manual_seed(0)
    config = vk.VivitConfig.from_preset("tiny", num_labels=6, id2label={i: f"action_{i}" for i in range(6)})
    vk.VivitForVideoClassification(config).save_pretrained(root / "model")
    # the checkpoint's own clip sampling (finetune saves it): every frame; predict and classify read it back
    processor = VideoProcessor.for_image_size(32, 32, frame_sample_rate=1)
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(processor.to_dict()))
    return root
