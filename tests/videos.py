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
