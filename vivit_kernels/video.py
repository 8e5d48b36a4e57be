"""Decoding the frames a ViViT clip needs, and which frames: ``read_video`` / ``read_clips`` (seeking to the key
frame before the first needed frame, into one preallocated array), ``sample_frame_indices`` (the seed example's
random window) and the evaluation's evenly spread windows. What turns the frames into ``pixel_values`` is
``processing.VideoProcessor``.

Decoders (``decode=``, ``--decode``): ``pyav`` (the default, always there, and the fastest on the CPU as measured in
docs/video.md: it leaves the non-reference frames no clip wants undecoded), ``torchcodec`` (torchcodec on the CPU:
the same frames), ``cuda`` (torchcodec on the GPU's hardware decoders, NVDEC: frames come back on the GPU, with
NVDEC's own colour conversion, so they differ a little from PyAV's) and ``auto`` (``pyav``; see ``resolve_decoder``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .names import DECODERS

__all__ = ["read_video", "read_clips", "Clips", "sample_frame_indices", "window_frames", "open_video",
           "DEFAULT_FRAME_SAMPLE_RATE", "resolve_decoder"]


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
    return window_frames(start, end, clip_len)


def window_frames(start: int, end: int, num_frames: int) -> np.ndarray:
    """The ``num_frames`` frame indices a clip samples from the window [start, end): evenly spread, the last
    clipped to the window (every sampling here: the seed's random window, the evaluation's, timeline's)."""
    indices = np.linspace(start, end, num=num_frames)
    return np.clip(indices, start, max(end - 1, start)).astype(np.int64)


def _uniform_clips(clip_len: int, frame_sample_rate: int, seg_len: int, clips: int) -> list[np.ndarray]:
    """``clips`` windows spread evenly over the video (multi-view evaluation), each sampled like the seed."""
    converted_len = int(clip_len * frame_sample_rate)
    span = max(seg_len - converted_len, 0)
    out = []
    for i in range(clips):
        start = int(round(span * (i + 0.5) / clips)) if clips > 1 else span // 2
        end = min(start + converted_len, seg_len)
        out.append(window_frames(start, end, clip_len))
    return out


def resolve_decoder(decode: str = "auto") -> str:
    """The decoder ``decode`` names, checked to be usable here (a clear error where it is not). ``auto`` is
    ``pyav``, our fastest on the CPU; it stays so on a GPU machine until the acceptance run has measured NVDEC
    against the CPU workers there (``auto`` never takes a path slower than the one it replaces)."""
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    if decode in ("auto", "pyav"):
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError("decoding with PyAV needs it: pip install av (or vivit_kernels[video])") from None
        return "pyav"
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a RuntimeError when FFmpeg's libraries are missing
        raise ImportError(f"--decode {decode} needs torchcodec and FFmpeg's shared libraries (pip install "
                          f"torchcodec; apt-get install ffmpeg): {_why(e)}") from None
    if decode == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--decode cuda decodes on the GPU's hardware decoders, and there is no CUDA device here")
    return decode


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    frame_sample_rate: int = 1,
    clips: int = 1,
    seed: int | None = None,
    decode: str = "auto",
    threads: int = 0,
) -> np.ndarray:
    """Decode the frames a ViViT clip needs (PyAV by default; ``decode``: one of ``DECODERS``): uint8 RGB,
    (num_frames, H, W, 3), or with ``clips > 1`` (clips, num_frames, H, W, 3).

    One clip is sampled as in the seed example (a random window of num_frames * frame_sample_rate frames,
    ``seed`` for repeatability); several clips are spread evenly over the video (the usual multi-view
    evaluation, e.g. 4 temporal clips, then 3 spatial crops with ``VideoProcessor(spatial_crops=3)``).
    Decoding seeks to the key frame before the first needed frame instead of decoding from the start, when the
    stream has timestamps to seek by. ``threads``: FFmpeg's threads (0, the default here: FFmpeg chooses, for one
    clip's latency; ``read_clips`` explains when 1 is better).
    """
    frames = read_clips(path, num_frames, frame_sample_rate, clips,
                        None if clips > 1 else np.random.default_rng(seed), decode=decode, threads=threads).frames
    return frames[0] if clips == 1 else frames


class Clips(NamedTuple):
    """What ``read_clips`` decoded: ``frames`` (clips, num_frames, H, W, 3) uint8 (a numpy array; a CUDA tensor
    when NVDEC decoded it); ``video_frames``, the number of frames the video has (fewer than
    ``num_frames * frame_sample_rate``: its clips repeat frames); ``duration_s`` (None when the stream has no frame
    rate)."""

    frames: np.ndarray
    video_frames: int
    duration_s: float | None


def read_clips(path: str | os.PathLike, num_frames: int, frame_sample_rate: int = 1, clips: int = 1,
               rng: np.random.Generator | None = None, decode: str = "auto", transform=None,
               threads: int = 1) -> Clips:
    """``read_video`` with the sampling chosen by the caller: one random window drawn from ``rng``, or, with
    ``rng=None``, ``clips`` windows spread evenly (one clip: the middle window, the evaluation view). The frames
    always have the clips axis; see ``Clips``. ``decode``: one of ``DECODERS``.

    ``transform(height, width)``: a function of the frame size returning what to do with each decoded frame (an
    (H, W, 3) uint8 array) instead of keeping it: ``frames`` then holds its results, (clips, num_frames, *result);
    for a tuple of k same-shaped results (views of the frame), (clips, num_frames, k, *view), each written in
    place (stored views-major, so the views-first batch needs no copy).
    The data path resizes and crops each frame as it is decoded this way, so a clip's full-resolution frames are
    never stored (docs/video.md). With ``cuda`` the transform gets the GPU's frames as (H, W, 3) tensors.

    ``threads``: FFmpeg's decoding threads on the CPU. 1 (the default) for decoding processes that run side by
    side, a core each (DataLoader workers), where FFmpeg's own threads could only compete with them; on this
    2-core machine it measured the same as FFmpeg's choice (PyAV's slice threading finds one slice per frame in
    libx264's output, so nothing to split), so it is a guard against oversubscription, not a speed-up here.
    0 lets FFmpeg choose, for one clip's latency on an otherwise idle machine."""
    decoder = resolve_decoder(decode)
    if num_frames < 1 or frame_sample_rate < 1 or clips < 1:
        raise ValueError("num_frames, frame_sample_rate and clips must be >= 1")
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path}")
    if decoder != "pyav":
        return _read_torchcodec(path, num_frames, frame_sample_rate, clips, rng, decoder == "cuda", transform, threads)
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
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
            wanted = _windows(num_frames, frame_sample_rate, clips, seg_len, rng)
            try:
                out = _decode(container, stream, wanted, path, transform)
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
    return Clips(out, seg_len, _duration(seg_len, fps))


def open_video(path: str):
    """A PyAV container of ``path`` that holds a video stream, or a ValueError saying why not (the caller closes
    it: ``with open_video(path) as container``)."""
    import av

    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises several error types for bad files
        raise ValueError(f"{path} is not a readable video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def _windows(num_frames: int, frame_sample_rate: int, clips: int, seg_len: int,
             rng: np.random.Generator | None) -> list[np.ndarray]:
    if rng is not None:
        return [sample_frame_indices(num_frames, frame_sample_rate, seg_len, rng)]
    return _uniform_clips(num_frames, frame_sample_rate, seg_len, clips)


def _read_torchcodec(path: str, num_frames: int, frame_sample_rate: int, clips: int,
                     rng: np.random.Generator | None, cuda: bool, transform=None, threads: int = 1) -> Clips:
    """``read_clips`` with torchcodec: on the CPU (the same frames as PyAV's) or on NVDEC (``cuda``: frames on the
    GPU). A file it cannot decode whole goes to the PyAV path, which samples from the frames that do decode."""
    import torch
    from torchcodec.decoders import VideoDecoder

    state = rng.bit_generator.state if rng is not None else None
    try:
        decoder = VideoDecoder(path, dimension_order="NHWC", seek_mode="approximate",
                               device="cuda" if cuda else "cpu", num_ffmpeg_threads=threads)
        meta = decoder.metadata
        seg_len = int(meta.num_frames or 0)
        if seg_len == 0:
            raise ValueError("no frame count in the header")
        wanted = _windows(num_frames, frame_sample_rate, clips, seg_len, rng)
        needed = sorted({int(i) for w in wanted for i in w})
        batch = decoder.get_frames_at(needed).data  # (len(needed), H, W, 3) uint8
    except Exception as e:  # noqa: BLE001 - torchcodec raises RuntimeError / ValueError for damaged files
        if rng is not None:
            rng.bit_generator.state = state
        warnings.warn(f"{path}: torchcodec could not decode the clip ({_why(e)}); decoding it with PyAV instead",
                      stacklevel=3)
        return read_clips(path, num_frames, frame_sample_rate, clips, rng, decode="pyav", transform=transform,
                          threads=threads)
    if len(wanted) == 1 and needed == [int(i) for i in wanted[0]]:
        frames = batch.unsqueeze(0)  # every index once, in order: no gather
    else:
        where = {index: k for k, index in enumerate(needed)}
        frames = batch[torch.tensor([[where[int(i)] for i in w] for w in wanted], device=batch.device)]
    if 1 < seg_len < num_frames:
        warnings.warn(f"{path}: {seg_len} frames decode, fewer than the {num_frames} a clip needs; the clip spreads "
                      f"{num_frames} samples over those {seg_len}, so frames repeat", stacklevel=3)
    if transform is not None:
        each = transform(int(frames.shape[2]), int(frames.shape[3]))
        out = None
        for c, clip in enumerate(frames):
            for j, frame in enumerate(clip):
                value = each(frame if cuda else frame.numpy())
                out = _empty_like_stack(value, len(frames), len(clip)) if out is None else out
                _store(out, c, j, value)
        return Clips(out, seg_len, _duration(seg_len, meta.average_fps))
    return Clips(frames if cuda else frames.numpy(), seg_len, _duration(seg_len, meta.average_fps))


def _why(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _duration(seg_len: int, fps) -> float | None:
    return seg_len / float(fps) if fps else None


def _empty_like_stack(first, clips: int, frames: int):
    """An uninitialised (clips, frames, *first.shape) array of ``first``'s kind and dtype (numpy or torch). For a
    tuple of k views of a frame, (clips, frames, k, *view shape), its memory ordered (clips, k, frames, ...): the
    views-first batch is then a free transpose (``processing.views_first``), not a copy of every view."""
    import torch

    if isinstance(first, tuple):
        part = first[0]
        shape = (clips, len(first), frames, *part.shape)
        if isinstance(part, torch.Tensor):
            return torch.empty(shape, dtype=part.dtype, device=part.device).transpose(1, 2)
        return np.empty(shape, np.asarray(part).dtype).swapaxes(1, 2)
    if isinstance(first, torch.Tensor):
        return torch.empty((clips, frames, *first.shape), dtype=first.dtype, device=first.device)
    first = np.asarray(first)
    return np.empty((clips, frames, *first.shape), first.dtype)


def _store(out, c: int, j: int, value) -> None:
    """A transform's result for clip c's frame j into ``out``, each view of a tuple into its place (no stacking)."""
    if isinstance(value, tuple):
        for v, part in enumerate(value):
            out[c, j, v] = part
    else:
        out[c, j] = value


class _DecodingStopped(Exception):
    """Decoding ended (a decoder error, or the end of a stream shorter than its header says) before any of the
    frames a clip needs."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


def _frames(container, stream, errors: list, wanted=None):
    """The stream's frames until the end or the first decoder error (appended to ``errors``). ``wanted``: a
    predicate on a packet's timestamp; the decoder skips the non-reference frames of packets it rejects (no
    other frame needs them, so every frame that is decoded comes out the same)."""
    import av

    codec = stream.codec_context
    iterator = container.decode(stream) if wanted is None else _skipping(container, stream, codec, wanted)
    try:
        while True:
            try:
                frame = next(iterator)
            except StopIteration:
                return
            except av.FFmpegError as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            yield frame
    finally:
        if wanted is not None:
            codec.skip_frame = "DEFAULT"


def _skipping(container, stream, codec, wanted):
    mode = None
    for packet in container.demux(stream):
        wanted_mode = "DEFAULT" if packet.pts is None or wanted(packet.pts) else "NONREF"
        if wanted_mode != mode:  # (set only when it changes: PyAV parses the name on every set)
            codec.skip_frame = mode = wanted_mode
        yield from packet.decode()  # the last, empty packet flushes the decoder


def _count_frames(container, stream, path: str) -> int:
    errors: list = []
    n = sum(1 for _ in _frames(container, stream, errors))
    if errors and n == 0:
        raise ValueError(f"{path}: no frames could be decoded ({errors[0]})")
    container.seek(0)
    return n


def _frame_numbering(stream, fps: float) -> Callable[[int | None], int | None]:
    """pts -> frame number at ``fps`` (None without a timestamp): round(seconds * fps), the seconds ``(pts - start)
    * time_base`` as a correctly rounded float from integers (what float(Fraction) gives, without a Fraction per
    frame: PyAV builds one per ``time_base`` read)."""
    time_base = stream.time_base
    if time_base is None or not fps:
        return lambda pts: None
    start, num, den = stream.start_time or 0, time_base.numerator, time_base.denominator

    def number(pts: int | None) -> int | None:
        return None if pts is None else int(round((pts - start) * num / den * fps))

    return number


def _decode(container, stream, wanted: list[np.ndarray], path: str, transform=None) -> np.ndarray:
    """The clips' frames, (clips, frames, H, W, 3) uint8, written into one array allocated at the first frame (each
    frame converted to RGB once, copied once per place that wants it), or ``transform``'s results of them. Seeks to
    the key frame before the first needed frame when timestamps allow; frames are numbered by timestamp (constant
    frame rate), or by count when a stream has none. Numbered by timestamp, a frame that no other frame references
    (a non-reference B frame) is not decoded at all unless the clip wants it: the same frames come out, for less
    work."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    places: dict[int, list[tuple[int, int]]] = {}
    for c, w in enumerate(wanted):
        for j, i in enumerate(w):
            places.setdefault(int(i), []).append((c, j))
    first, last = min(places), max(places)
    out: np.ndarray | None = None
    done: set[int] = set()

    each = None

    def put(index: int, frame) -> None:
        nonlocal out, each
        value = frame.to_ndarray(format="rgb24")
        if transform is not None:
            each = each or transform(value.shape[0], value.shape[1])
            value = each(value)
        if out is None:
            out = _empty_like_stack(value, len(wanted), len(wanted[0]))
        for c, j in places[index]:
            _store(out, c, j, value)
        done.add(index)

    use_pts = fps > 0 and stream.time_base is not None
    if use_pts and first > 0:
        target = int(first / fps / stream.time_base) + (stream.start_time or 0)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except Exception:  # noqa: BLE001 - unseekable: decode from the start
            container.seek(0)
    errors: list = []
    if use_pts:
        number = _frame_numbering(stream, fps)
        for frame in _frames(container, stream, errors, lambda pts: number(pts) in places):
            index = number(frame.pts)
            if index is None:  # a frame without a timestamp: number them all by count instead
                done.clear()
                break
            if index in places and index not in done:
                put(index, frame)
            if index >= last:
                break
    if len(done) < len(places) and not errors:
        # no timestamps, or timestamps that did not match frame numbers (variable frame rate): count from the start
        container.seek(0)
        for i, frame in enumerate(_frames(container, stream, errors)):
            if i in places and i not in done:
                put(i, frame)
            if i >= last:
                break
    missing = set(places) - done
    if missing:
        if not done:  # it stopped before the clip's first frame: the caller resamples over what decodes
            raise _DecodingStopped(errors[0] if errors else "the stream ends before its header says")
        why = f"decoding failed ({errors[0]})" if errors else "the stream is shorter than its header says"
        warnings.warn(f"{path}: {len(missing)} of the clip's frames are missing ({why}); they repeat the last frame "
                      "that decoded", stacklevel=3)
        c, j = places[max(done)][0]
        for i in missing:
            for c2, j2 in places[i]:
                out[c2, j2] = out[c, j]
    return out
