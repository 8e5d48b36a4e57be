"""Decoding the frames a ViViT clip needs, and which frames: ``read_video`` / ``read_clips`` (PyAV, seeking to the
key frame before the first needed frame), ``sample_frame_indices`` (the seed example's random window) and the
evaluation's evenly spread windows. What turns the frames into ``pixel_values`` is ``processing.VideoProcessor``.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np

__all__ = ["read_video", "read_clips", "Clips", "sample_frame_indices", "DEFAULT_FRAME_SAMPLE_RATE"]

# Every 2nd frame: ViViT-B/16x2's 32 frames span 64 (scenic's Kinetics sampling, and finetune's default). Commands read
# a checkpoint's own rate (its processor's ``frame_sample_rate``) before this.
DEFAULT_FRAME_SAMPLE_RATE = 2


def sample_frame_indices(clip_len: int, frame_sample_rate: int, seg_len: int, rng: np.random.Generator) -> np.ndarray:
    """The seed example's sampling: a random window of clip_len * frame_sample_rate frames, clip_len indices
    spread evenly over it. A video shorter than the window is spread over entirely (frames repeat)."""
    converted_len = int(clip_len * frame_sample_rate)
    if seg_len <= converted_len:
        start, end = 0, seg_len
    else:
        end = int(rng.integers(converted_len, seg_len))
        start = end - converted_len
    indices = np.linspace(start, end, num=clip_len)
    return np.clip(indices, start, max(end - 1, start)).astype(np.int64)


def _uniform_clips(clip_len: int, frame_sample_rate: int, seg_len: int, clips: int) -> list[np.ndarray]:
    """``clips`` windows spread evenly over the video (multi-view evaluation), each sampled like the seed."""
    converted_len = int(clip_len * frame_sample_rate)
    span = max(seg_len - converted_len, 0)
    out = []
    for i in range(clips):
        start = int(round(span * (i + 0.5) / clips)) if clips > 1 else span // 2
        end = min(start + converted_len, seg_len)
        indices = np.linspace(start, end, num=clip_len)
        out.append(np.clip(indices, start, max(end - 1, start)).astype(np.int64))
    return out


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    frame_sample_rate: int = 1,
    clips: int = 1,
    seed: int | None = None,
) -> np.ndarray:
    """Decode the frames a ViViT clip needs with PyAV: uint8 RGB, (num_frames, H, W, 3), or with
    ``clips > 1`` (clips, num_frames, H, W, 3).

    One clip is sampled as in the seed example (a random window of num_frames * frame_sample_rate frames,
    ``seed`` for repeatability); several clips are spread evenly over the video (the usual multi-view
    evaluation, e.g. 4 temporal clips, then 3 spatial crops with ``VideoProcessor(spatial_crops=3)``).
    Decoding seeks to the key frame before the first needed frame instead of decoding from the start, when the
    stream has timestamps to seek by.
    """
    frames = read_clips(path, num_frames, frame_sample_rate, clips,
                        None if clips > 1 else np.random.default_rng(seed)).frames
    return frames[0] if clips == 1 else frames


class Clips(NamedTuple):
    """What ``read_clips`` decoded: ``frames`` (clips, num_frames, H, W, 3) uint8; ``video_frames``, the number of
    frames the video has (fewer than ``num_frames * frame_sample_rate``: its clips repeat frames); ``duration_s``
    (None when the stream has no frame rate)."""

    frames: np.ndarray
    video_frames: int
    duration_s: float | None


def read_clips(path: str | os.PathLike, num_frames: int, frame_sample_rate: int = 1, clips: int = 1,
               rng: np.random.Generator | None = None) -> Clips:
    """``read_video`` with the sampling chosen by the caller: one random window drawn from ``rng``, or, with
    ``rng=None``, ``clips`` windows spread evenly (one clip: the middle window, the evaluation view). The frames
    always have the clips axis; see ``Clips``."""
    try:
        import av
    except ImportError:
        raise ImportError("read_video needs PyAV: pip install av (or vivit_kernels[video])") from None
    if num_frames < 1 or frame_sample_rate < 1 or clips < 1:
        raise ValueError("num_frames, frame_sample_rate and clips must be >= 1")
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path}")
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises several error types for bad files
        raise ValueError(f"{path} is not a readable video ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        seg_len = stream.frames or _count_frames(container, stream, path)
        if seg_len == 0:
            raise ValueError(f"{path} has no video frames")
        if seg_len == 1:
            warnings.warn(f"{path} holds a single frame (an image?): the clip repeats it {num_frames} times",
                          stacklevel=2)
        state = rng.bit_generator.state if rng is not None else None
        for attempt in range(2):
            if rng is not None:
                rng.bit_generator.state = state  # the retry over the frames that decode draws the same number
                wanted = [sample_frame_indices(num_frames, frame_sample_rate, seg_len, rng)]
            else:
                wanted = _uniform_clips(num_frames, frame_sample_rate, seg_len, clips)
            needed = sorted({int(i) for w in wanted for i in w})
            try:
                frames = _decode(container, stream, needed, path)
                break
            except _DecodingStopped as stop:
                container.seek(0)
                decodable = 0 if attempt else sum(1 for _ in _frames(container, stream, []))
                if decodable == 0:
                    raise ValueError(f"{path}: no frames could be decoded ({stop.error})") from None
                warnings.warn(
                    f"{path}: only the first {decodable} of {seg_len} frames decode ({stop.error}); the file "
                    f"looks truncated or damaged, so the clip is sampled from those {decodable}",
                    stacklevel=2,
                )
                seg_len = decodable
                container.seek(0)
    if 1 < seg_len < num_frames:  # the clip repeats frames: say so (what a model sees is not the clip it expects)
        warnings.warn(f"{path}: {seg_len} frames decode, fewer than the {num_frames} a clip needs; the clip spreads "
                      f"{num_frames} samples over those {seg_len}, so frames repeat", stacklevel=2)
    out = np.stack([np.stack([frames[int(i)] for i in w]) for w in wanted])
    return Clips(out, seg_len, seg_len / fps if fps else None)


class _DecodingStopped(Exception):
    """Decoding ended (a decoder error, or the end of a stream shorter than its header says) before any of the
    frames a clip needs."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


def _frames(container, stream, errors: list):
    """The stream's frames until the end or the first decoder error (appended to ``errors``)."""
    import av

    iterator = container.decode(stream)
    while True:
        try:
            frame = next(iterator)
        except StopIteration:
            return
        except av.FFmpegError as e:
            errors.append(f"{type(e).__name__}: {e}")
            return
        yield frame


def _count_frames(container, stream, path: str) -> int:
    errors: list = []
    n = sum(1 for _ in _frames(container, stream, errors))
    if errors and n == 0:
        raise ValueError(f"{path}: no frames could be decoded ({errors[0]})")
    container.seek(0)
    return n


def _frame_index(frame, stream, fps: float) -> int | None:
    if frame.pts is None or stream.time_base is None or not fps:
        return None
    start = stream.start_time or 0
    return int(round(float((frame.pts - start) * stream.time_base) * fps))


def _decode(container, stream, needed: list[int], path: str) -> dict[int, np.ndarray]:
    """Frames at the ``needed`` indices, seeking to the key frame before the first one when timestamps
    allow; frames are numbered by timestamp (constant frame rate), or by count when a stream has none."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    first, last = needed[0], needed[-1]
    want = set(needed)
    frames: dict[int, np.ndarray] = {}
    use_pts = fps > 0 and stream.time_base is not None
    if use_pts and first > 0:
        target = int(first / fps / stream.time_base) + (stream.start_time or 0)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except Exception:  # noqa: BLE001 - unseekable: decode from the start
            container.seek(0)
    errors: list = []
    count = -1
    for frame in _frames(container, stream, errors):
        count += 1
        index = _frame_index(frame, stream, fps) if use_pts else count
        if index is None:
            use_pts, index = False, count
        if index in want and index not in frames:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    missing = want - set(frames)
    if missing and use_pts and not errors:
        # timestamps did not match frame numbers (variable frame rate): count from the start
        container.seek(0)
        for i, frame in enumerate(_frames(container, stream, errors)):
            if i in want:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        missing = want - set(frames)
    if missing:
        if not frames:  # it stopped before the clip's first frame: the caller resamples over what decodes
            raise _DecodingStopped(errors[0] if errors else "the stream ends before its header says")
        why = f"decoding failed ({errors[0]})" if errors else "the stream is shorter than its header says"
        warnings.warn(f"{path}: {len(missing)} of the clip's frames are missing ({why}); they repeat the last frame "
                      "that decoded", stacklevel=3)
        last_frame = frames[max(frames)]
        for i in missing:
            frames[i] = last_frame
    return frames
