"""From decoded frames to ``pixel_values``: ``VideoProcessor``. (Decoding and clip sampling are in
``vivit_kernels.video``.)

One vocabulary for the pixels a model sees: a **view** (``View``) of a clip is its frames resized to ``resize_hw``,
cropped to ``box`` (top, left, height, width) and maybe flipped; ``eval_views(height, width)`` are the views the
processor evaluates a frame of that size with (the center crop, or three along the longer side). To **take** a
view is to compute it: ``take_view`` (rescaled and normalised, one fused op), ``take_view_uint8`` (resized and
cropped only: what decoding workers hand to the GPU, which ``normalize`` finishes there), ``take_views`` (several
views of one clip, a resize they share computed once), ``views_per_frame`` (a ``video.read_clips`` transform that
takes the views of each frame as it is decoded). ``views_first`` lays a clip array out as the model's batch.

``VideoProcessor`` takes transformers' ``VivitImageProcessor`` parameters and defaults and reproduces its
output (its resize is Pillow's bilinear resampling, which our op reproduces in fixed point), but runs as one
fused op (``vivit_kernels.ops.preprocess_video``) on the frames' device: the CUDA kernel for GPU tensors,
the C++ CPU implementation otherwise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ops.preprocess import preprocess_video
from .presets import image_hw

__all__ = ["VideoProcessor", "View", "PROCESSOR_PRESETS"]


@dataclass
class View:
    """One view of a frame: resized to ``resize_hw``, cropped to ``box`` (top, left, height, width), flipped
    horizontally or not."""

    resize_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False


# ------------------------------------------------------------------------------------------------
# Processor
# ------------------------------------------------------------------------------------------------
IMAGE_CONFIG = "preprocessor_config.json"  # transformers' IMAGE_PROCESSOR_NAME
VIDEO_CONFIG = "video_preprocessor_config.json"  # transformers' VIDEO_PROCESSOR_NAME
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
    evaluation) instead of the center one. ``frame_sample_rate``: the clip sampling the model was trained with
    (every n-th frame; ``finetune`` saves it), read back as the default of ``predict`` and ``classify``.
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: Any = "bilinear",
        do_center_crop: bool = True,
        crop_size: dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 127.5,
        offset: bool = True,
        do_normalize: bool = True,
        image_mean: Sequence[float] | float | None = None,
        image_std: Sequence[float] | float | None = None,
        spatial_crops: int = 1,
        frame_sample_rate: int | None = None,
        **unused: Any,
    ):
        if resample not in ("bilinear", 2, "BILINEAR") and getattr(resample, "name", None) != "BILINEAR":
            raise ValueError(f"VideoProcessor supports bilinear resampling only (Pillow's 2), got {resample!r}")
        if offset and not do_rescale:
            raise ValueError("offset needs do_rescale=True (offset shifts the rescaled values by -1)")
        if spatial_crops not in (1, 3):
            raise ValueError(f"spatial_crops must be 1 (center) or 3 (start, center, end), got {spatial_crops}")
        if frame_sample_rate is not None and int(frame_sample_rate) < 1:
            raise ValueError(f"frame_sample_rate must be >= 1, got {frame_sample_rate}")
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
        # the clip sampling the model was trained with (finetune saves it): every n-th frame
        self.frame_sample_rate = None if frame_sample_rate is None else int(frame_sample_rate)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VideoProcessor:
        if name not in PROCESSOR_PRESETS:
            raise ValueError(f"unknown processor preset {name!r}; available: {', '.join(PROCESSOR_PRESETS)}")
        return cls(**{**PROCESSOR_PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> VideoProcessor:
        """Read a checkpoint directory's ``preprocessor_config.json`` (transformers' ``VivitImageProcessor``), else
        its ``video_preprocessor_config.json`` (``VivitVideoProcessor``), or either file itself."""
        path = Path(path)
        if path.is_dir():
            files = [path / name for name in (IMAGE_CONFIG, VIDEO_CONFIG) if (path / name).is_file()]
            if not files:
                raise FileNotFoundError(f"no {IMAGE_CONFIG} or {VIDEO_CONFIG} in {path}")
            file = files[0]
        elif path.is_file():
            file = path
        else:
            raise FileNotFoundError(f"no {IMAGE_CONFIG} at {path}")
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
        if "video_processor_type" in config:  # VivitVideoProcessor: the offset is its rescale's own
            config.setdefault("offset", bool(config.get("do_rescale", True)))
        return cls(**{**config, **overrides})

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``preprocessor_config.json`` (``VivitImageProcessor``'s) and ``video_preprocessor_config.json``
        (``VivitVideoProcessor``'s, what transformers' pipeline and ``AutoVideoProcessor`` read without the
        image-processor deprecation warning), each whole or not at all. A processor that the video processor cannot
        express (rescaling without the offset) gets the image config only. Returns the files written."""
        from ._files import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = [directory / IMAGE_CONFIG]
        atomic_write_text(written[0], json.dumps(self.to_dict(), indent=2) + "\n")
        video = self.to_video_dict()
        if video is not None:
            written.append(directory / VIDEO_CONFIG)
            atomic_write_text(written[1], json.dumps(video, indent=2) + "\n")
        return written

    @classmethod
    def for_model(cls, config: Any, directory: str | os.PathLike | None = None) -> VideoProcessor:
        """A model's processor: ``directory``'s preprocessor_config.json where it has one, else transformers'
        defaults, scaled to the config's image size when that is not 224x224."""
        if directory is not None and any((Path(directory) / name).is_file() for name in (IMAGE_CONFIG, VIDEO_CONFIG)):
            return cls.from_pretrained(directory)
        height, width = image_hw(config)
        return cls() if (height, width) == (224, 224) else cls.for_image_size(height, width)

    @classmethod
    def for_image_size(cls, height: int, width: int, **overrides: Any) -> VideoProcessor:
        """Defaults scaled to a model trained at another resolution (shortest edge = 256/224 of the crop)."""
        short = round(min(height, width) * 256 / 224)
        return cls(size={"shortest_edge": short}, crop_size={"height": height, "width": width}, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": self.size, "resample": 2, "do_center_crop": self.do_center_crop,
            "crop_size": self.crop_size, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "offset": self.offset, "do_normalize": self.do_normalize, "image_mean": self.image_mean,
            "image_std": self.image_std, "image_processor_type": "VivitImageProcessor",
            **({"frame_sample_rate": self.frame_sample_rate} if self.frame_sample_rate is not None else {}),
        }

    def to_video_dict(self) -> dict[str, Any] | None:
        """transformers' ``VivitVideoProcessor`` config of this processor (None where it has no way to say it:
        ``VivitVideoProcessor`` always subtracts 1 after rescaling)."""
        if self.do_rescale and not self.offset:
            return None
        config = {key: value for key, value in self.to_dict().items() if key not in ("image_processor_type", "offset")}
        return {**config, "do_convert_rgb": True, "do_sample_frames": False, "default_to_square": False,
                "video_processor_type": "VivitVideoProcessor"}

    def sample_rate(self, requested: int | None = None) -> int:
        """The frame sample rate to decode clips with: ``requested`` when given, else this processor's (the
        checkpoint's own), else ``video.DEFAULT_FRAME_SAMPLE_RATE``."""
        from .video import DEFAULT_FRAME_SAMPLE_RATE

        return int(requested or self.frame_sample_rate or DEFAULT_FRAME_SAMPLE_RATE)

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
    def __call__(self, videos: Any, return_tensors: str | None = "pt", device: Any = None,
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
            outputs.append(self.take_views(clip, self.eval_views(height, width), dtype=dtype, stacked=True))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)

    def take_view(self, clip: torch.Tensor, resize_hw: Sequence[int], box: Sequence[int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One view with this processor's rescaling and normalisation: uint8 (B, T, H, W, 3) resized to
        ``resize_hw`` and cropped to ``box`` (top, left, height, width) -> (B, T, 3, height, width), one fused op
        on the clip's device. Training augmentation (``vivit_kernels.data``) picks its own size and box."""
        return preprocess_video(clip, resize_hw, box, *self._value_params(), dtype)

    def _value_params(self) -> tuple[float, float, list[float], list[float]]:
        """(scale, offset, mean, std) of the value-space part: ``(x * scale + offset - mean) / std``."""
        return (self.rescale_factor if self.do_rescale else 1.0, -1.0 if self.offset else 0.0,
                self.image_mean if self.do_normalize else [0.0, 0.0, 0.0],
                self.image_std if self.do_normalize else [1.0, 1.0, 1.0])

    def take_views(self, clip: torch.Tensor, views: Sequence[View], uint8: bool = False,
                   dtype: torch.dtype = torch.float32, stacked: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Every view of uint8 ``clip`` (B, T, H, W, 3): (B, T, 3, h, w) each, :meth:`take_view`'s values (or
        :meth:`take_view_uint8`'s with ``uint8``), flipped where a view says so; with ``stacked`` one tensor
        (B * views, T, 3, h, w), clip-major (the model's batch). Views that share a resize are resized
        once over the box that bounds them when that box is smaller than their crops together (three spatial
        crops of a 340x256 frame: 224x340 pixels instead of 3 x 224x224), then sliced: the same numbers, since a
        resized pixel depends only on where it lies in the resized frame, not on the crop it is computed for."""
        out: list[torch.Tensor | None] = [None] * len(views)
        for resize_hw, box, members in _shared_resizes(views):
            if uint8:
                y = self.take_view_uint8(clip, resize_hw, box)
            else:
                y = self.take_view(clip, resize_hw, box, dtype)
            for i in members:
                top, left, h, w = views[i].box
                top, left = top - box[0], left - box[1]
                part = y if len(members) == 1 else y[..., top : top + h, left : left + w]
                out[i] = part.flip(-1) if views[i].flip else part
        if stacked:
            return torch.stack(out, 1).flatten(0, 1) if len(out) > 1 else out[0]  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def eval_views(self, height: int, width: int) -> list[View]:
        """The evaluation views of a ``height`` x ``width`` frame: resized, then the crop(s) of ``spatial_crops``."""
        hw = self.resized_size(height, width)
        return [View(hw, box) for box in self.crop_boxes(*hw)]

    def views_per_frame(self, views: Callable[[int, int], list[View]] | None = None, uint8: bool = False,
                        dtype: torch.dtype = torch.float32, spent: list[float] | None = None):
        """A ``video.read_clips`` transform: every decoded frame becomes its views, a tuple of (3, h, w), as the
        frame is decoded (no full-resolution clip is kept). ``views(height, width)`` chooses them once per clip
        (default: :meth:`eval_views`); ``uint8``: resized and cropped only (:meth:`take_view_uint8`), else
        :meth:`take_view` in ``dtype``. The same numbers as processing the stacked clip. ``spent``: a
        one-element list the seconds spent processing are added to (what is left of ``read_clips``'s time is
        decoding)."""
        def per_clip(height: int, width: int):
            chosen = (views or self.eval_views)(height, width)

            def each(frame) -> tuple[torch.Tensor, ...]:
                start = time.perf_counter() if spent is not None else 0.0
                x = torch.as_tensor(frame)[None, None]  # (1, 1, H, W, 3), strided as the decoder wrote it
                # the views as a tuple: read_clips writes each into its place (no stacked copy per frame)
                result = tuple(y[0, 0] for y in self.take_views(x, chosen, uint8, dtype))
                if spent is not None:
                    spent[0] += time.perf_counter() - start
                return result

            return each

        return per_clip

    def process_file(self, path: str | os.PathLike, num_frames: int = 32, frame_sample_rate: int | None = None,
                     clips: int = 1, decode: str = "auto", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Decode and preprocess one video in one pass: ``{"pixel_values": (clips * crops, T, 3, h, w)}`` for
        ``clips`` evenly spread windows (1: the middle one) and this processor's crops, the frames resized and
        cropped as they are decoded (the fast CPU path, docs/video.md); also ``video_frames`` and ``duration_s``.
        The same pixels as ``read_clips`` followed by this processor."""
        from .video import read_clips

        got = read_clips(path, num_frames, self.sample_rate(frame_sample_rate), clips, decode=decode,
                         transform=self.views_per_frame(dtype=dtype))
        return {"pixel_values": views_first(got.frames), "video_frames": got.video_frames,
                "duration_s": got.duration_s}

    def take_view_uint8(self, clip: torch.Tensor, resize_hw: Sequence[int], box: Sequence[int]) -> torch.Tensor:
        """The first half of :meth:`take_view`: uint8 (B, T, H, W, 3) resized and cropped, still uint8,
        (B, T, 3, height, width), exactly the values the resize gives inside the fused op (Pillow's). What a data
        loader's workers hand to the GPU: 3 bytes a pixel of the crop, not of the source frame; :meth:`normalize`
        finishes it there."""
        return preprocess_video(clip, resize_hw, box, 1.0, 0.0, [0.0] * 3, [1.0] * 3, torch.uint8)

    def normalize(self, views: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The second half of :meth:`take_view` on :meth:`take_view_uint8`'s uint8 output, on its device: rescale,
        offset and normalise in float32 in the fused op's order, then ``dtype``."""
        scale, offset, mean, std = self._value_params()
        shape = (3, 1, 1)
        x = views.float() * torch.tensor(scale, dtype=torch.float32) + torch.tensor(offset, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=views.device).view(shape)
        inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float64).float().to(views.device).view(shape)
        return ((x - mean_t) * inv_std).to(dtype)


def _shared_resizes(views: Sequence[View]) -> list[tuple[tuple[int, int], tuple[int, int, int, int], list[int]]]:
    """(resize_hw, box to compute, indices of the views it serves): one entry per view, except that the views
    sharing a resize become one entry over their bounding box when that box has fewer pixels than their crops."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(tuple(view.resize_hw), []).append(i)
    work = []
    for resize_hw, members in groups.items():
        boxes = [views[i].box for i in members]
        top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bottom, right = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        if len(members) > 1 and (bottom - top) * (right - left) < sum(b[2] * b[3] for b in boxes):
            work.append((resize_hw, (top, left, bottom - top, right - left), members))
        else:
            work.extend((resize_hw, tuple(views[i].box), [i]) for i in members)
    return work


def views_first(frames: torch.Tensor) -> torch.Tensor:
    """``read_clips`` results of ``views_per_frame`` (clips, T, views, 3, h, w) -> (clips * views, T, 3, h, w),
    clip-major (the order ``preprocess`` gives); a view, not a copy, of what ``read_clips`` stored."""
    clips, frames_, views = frames.shape[:3]
    return frames.transpose(1, 2).reshape(clips * views, frames_, *frames.shape[3:])


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
