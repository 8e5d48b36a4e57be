"""From video file to ``pixel_values``: ``read_video`` (PyAV) and ``VideoProcessor``.

``VideoProcessor`` takes transformers' ``VivitImageProcessor`` parameters and defaults and reproduces its
output (its resize is Pillow's bilinear resampling, which our op reproduces in fixed point), but runs as one
fused op (``vivit_kernels.ops.preprocess_video``) on the frames' device: the CUDA kernel for GPU tensors,
the C++ CPU implementation otherwise.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .ops.preprocess import preprocess_video

__all__ = ["VideoProcessor", "read_video", "read_clips", "Clips", "sample_frame_indices", "PROCESSOR_PRESETS"]


# ------------------------------------------------------------------------------------------------
# Processor
# ------------------------------------------------------------------------------------------------
PROCESSOR_PRESETS: dict[str, dict[str, Any]] = {
    # transformers' VivitImageProcessor defaults: rescale to [-1, 1] (x / 127.5 - 1), then normalise again
    # with mean = std = 0.5, which maps [-1, 1] to [-3, 1]. google/vivit-b-16x2-kinetics400 was converted
    # with these, so they are the default here too.
    "transformers": {},
    # the original ViViT input: [-1, 1], no second normalisation
    "vivit-original": {"do_normalize": False},
}


class VideoProcessor:
    """transformers' ``VivitImageProcessor`` parameters, as one fused op on the frames' device.

    Args mirror ``VivitImageProcessor``: do_resize, size ({"shortest_edge": 256} or {"height", "width"}),
    resample (bilinear only), do_center_crop, crop_size ({"height": 224, "width": 224}), do_rescale,
    rescale_factor (1/127.5), offset (subtract 1 after rescaling), do_normalize, image_mean / image_std
    (0.5 each). ``spatial_crops`` = 3 takes three crops along the longer side (the usual multi-view
    evaluation) instead of the center one.
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: Optional[dict[str, int]] = None,
        resample: Any = "bilinear",
        do_center_crop: bool = True,
        crop_size: Optional[dict[str, int]] = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 127.5,
        offset: bool = True,
        do_normalize: bool = True,
        image_mean: Optional[Sequence[float] | float] = None,
        image_std: Optional[Sequence[float] | float] = None,
        spatial_crops: int = 1,
        **unused: Any,
    ):
        if resample not in ("bilinear", 2, "BILINEAR") and getattr(resample, "name", None) != "BILINEAR":
            raise ValueError(f"VideoProcessor supports bilinear resampling only (Pillow's 2), got {resample!r}")
        if offset and not do_rescale:
            raise ValueError("offset needs do_rescale=True (offset shifts the rescaled values by -1)")
        if spatial_crops not in (1, 3):
            raise ValueError(f"spatial_crops must be 1 (center) or 3 (start, center, end), got {spatial_crops}")
        self.do_resize = do_resize
        self.size = dict(size or {"shortest_edge": 256})
        if not ("shortest_edge" in self.size or {"height", "width"} <= set(self.size)):
            raise ValueError(f"size must be {{'shortest_edge': s}} or {{'height': h, 'width': w}}, got {self.size}")
        self.do_center_crop = do_center_crop
        self.crop_size = dict(crop_size or {"height": 224, "width": 224})
        self.do_rescale = do_rescale
        self.rescale_factor = float(rescale_factor)
        self.offset = bool(offset)
        self.do_normalize = do_normalize
        self.image_mean = _three(image_mean if image_mean is not None else 0.5, "image_mean")
        self.image_std = _three(image_std if image_std is not None else 0.5, "image_std")
        self.spatial_crops = spatial_crops

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VideoProcessor":
        if name not in PROCESSOR_PRESETS:
            raise ValueError(f"unknown processor preset {name!r}; available: {', '.join(PROCESSOR_PRESETS)}")
        return cls(**{**PROCESSOR_PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "VideoProcessor":
        """Read ``preprocessor_config.json`` from a checkpoint directory (or that file itself)."""
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no preprocessor_config.json at {path}")
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
        return cls(**{**config, **overrides})

    @classmethod
    def for_model(cls, config: Any, directory: Optional[str | os.PathLike] = None) -> "VideoProcessor":
        """A model's processor: ``directory``'s preprocessor_config.json where it has one, else transformers'
        defaults, scaled to the config's image size when that is not 224x224."""
        if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
            return cls.from_pretrained(directory)
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls() if (height, width) == (224, 224) else cls.for_image_size(height, width)

    @classmethod
    def for_image_size(cls, height: int, width: int, **overrides: Any) -> "VideoProcessor":
        """Defaults scaled to a model trained at another resolution (shortest edge = 256/224 of the crop)."""
        short = round(min(height, width) * 256 / 224)
        return cls(size={"shortest_edge": short}, crop_size={"height": height, "width": width}, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": self.size, "resample": 2, "do_center_crop": self.do_center_crop,
            "crop_size": self.crop_size, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "offset": self.offset, "do_normalize": self.do_normalize, "image_mean": self.image_mean,
            "image_std": self.image_std, "image_processor_type": "VivitImageProcessor",
        }

    # -- geometry ----------------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, by transformers' rule (shortest edge; the long edge truncated)."""
        if not self.do_resize:
            return height, width
        if "shortest_edge" in self.size:
            size = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            return (new_long, size) if width <= height else (size, new_long)
        return self.size["height"], self.size["width"]

    def crop_boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) crops of the resized frame."""
        if not self.do_center_crop:
            return [(0, 0, height, width)]
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        if ch > height or cw > width:
            raise ValueError(
                f"frames of {height}x{width} (after resizing) are smaller than the {ch}x{cw} crop; resize them "
                "larger (size) or use a smaller crop_size"
            )
        top, left = (height - ch) // 2, (width - cw) // 2
        if self.spatial_crops == 1:
            return [(top, left, ch, cw)]
        if width >= height:
            return [(top, 0, ch, cw), (top, left, ch, cw), (top, width - cw, ch, cw)]
        return [(0, left, ch, cw), (top, left, ch, cw), (height - ch, left, ch, cw)]

    # -- processing --------------------------------------------------------------------------------
    def __call__(self, videos: Any, return_tensors: Optional[str] = "pt", device: Any = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (B, T, 3, crop_h, crop_w)}`` for one video or a batch; see :meth:`preprocess`."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (torch), got {return_tensors!r}")
        return {"pixel_values": self.preprocess(videos, device=device, dtype=dtype)}

    def preprocess(self, videos: Any, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """videos: uint8 frames (T, H, W, 3), a batch (B, T, H, W, 3) (torch or numpy), or a list of either
        (clips of different sizes are processed one by one and stacked), or a list of (H, W, 3) frames (one
        video). Processing runs on ``device`` (default: where the frames are). With ``spatial_crops=3``
        each clip gives three consecutive batch entries."""
        clips = _as_clips(videos)
        outputs = []
        for clip in clips:
            if device is not None:
                clip = clip.to(device, non_blocking=True)
            _, _, height, width, _ = clip.shape
            rh, rw = self.resized_size(height, width)
            views = [self.process_view(clip, (rh, rw), box, dtype) for box in self.crop_boxes(rh, rw)]
            outputs.append(torch.stack(views, 1).flatten(0, 1) if len(views) > 1 else views[0])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)

    def process_view(self, clip: torch.Tensor, resize_hw: Sequence[int], box: Sequence[int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One view with this processor's rescaling and normalisation: uint8 (B, T, H, W, 3) resized to
        ``resize_hw`` and cropped to ``box`` (top, left, height, width) -> (B, T, 3, height, width), one fused op
        on the clip's device. Training augmentation (``vivit_kernels.data``) picks its own size and box."""
        scale = self.rescale_factor if self.do_rescale else 1.0
        offset = -1.0 if self.offset else 0.0
        mean = self.image_mean if self.do_normalize else [0.0, 0.0, 0.0]
        std = self.image_std if self.do_normalize else [1.0, 1.0, 1.0]
        return preprocess_video(clip, resize_hw, box, scale, offset, mean, std, dtype)


def _three(value, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} needs one value or 3 (RGB), got {value!r}")
    return values


def _as_clips(videos: Any) -> list[torch.Tensor]:
    """Normalise the accepted inputs to a list of uint8 (B, T, H, W, 3) tensors."""
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("no video given (an empty list)")
        first = videos[0]
        if _ndim(first) == 3:  # a list of frames: one video
            return _as_clips(np.stack([np.asarray(f) for f in videos]))
        return [c for v in videos for c in _as_clips(v)]
    t = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"videos must be uint8 tensors / arrays or lists of them, got {type(videos).__name__}")
    if t.dim() == 4:
        t = t.unsqueeze(0)
    if t.dim() != 5 or t.shape[-1] != 3:
        raise ValueError(
            "videos must be (frames, height, width, 3) or (batch, frames, height, width, 3) RGB frames, "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.uint8:
        raise ValueError(f"videos must be uint8 frames (0..255) as decoders give them, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError("the video has no frames")
    return [t]


def _ndim(x: Any) -> int:
    return x.dim() if isinstance(x, torch.Tensor) else np.asarray(x).ndim


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------
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
    seed: Optional[int] = None,
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
    duration_s: Optional[float]


def read_clips(path: str | os.PathLike, num_frames: int, frame_sample_rate: int = 1, clips: int = 1,
               rng: Optional[np.random.Generator] = None) -> Clips:
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
                warnings.warn(f"{path}: only the first {decodable} of {seg_len} frames decode ({stop.error}); the file "
                              f"looks truncated or damaged, so the clip is sampled from those {decodable}", stacklevel=2)
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


def _frame_index(frame, stream, fps: float) -> Optional[int]:
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
