"""Fused video preprocessing: uint8 frames (B, T, H, W, 3) -> (B, T, 3, crop_h, crop_w) in one pass.

Resize (bilinear, antialiased when shrinking, with Pillow's fixed-point arithmetic), crop, ``x * scale +
offset``, ``(x - mean) / std``. ``preprocess_video`` runs the C++ op ``torch.ops.vivit_kernels.
preprocess_video`` (CPU or CUDA, csrc/) and falls back, with one warning, to ``preprocess_video_ref``: the
same arithmetic written with dense PyTorch matrix products (exact integer arithmetic in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _extension

__all__ = ["preprocess_video", "preprocess_video_ref", "bilinear_weights", "PRECISION_BITS"]

PRECISION_BITS = 22
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def bilinear_weights(in_size: int, out_size: int, out_indices: Sequence[int]) -> torch.Tensor:
    """(len(out_indices), in_size) int64 fixed-point weights of Pillow's bilinear resampling: the triangle
    filter stretched by the shrink factor, normalised, times 2^22 and rounded (csrc/preprocess.h)."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    weights = torch.zeros(len(out_indices), in_size, dtype=torch.int64)
    for row, i in enumerate(out_indices):
        center = (i + 0.5) * scale
        first = max(int(center - stretch + 0.5), 0)
        last = min(int(center + stretch + 0.5), in_size)
        w = [max(0.0, 1.0 - abs((x + first - center + 0.5) / stretch)) for x in range(last - first)]
        total = sum(w)
        for x, wx in enumerate(w):
            k = wx / total if total != 0.0 else wx
            weights[row, first + x] = int(k * (1 << PRECISION_BITS) + 0.5)
    return weights


def _fixed_point_pass(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Resample the last dim of integer-valued ``values`` with fixed-point ``weights`` and round to uint8
    values, exactly (all numbers are integers below 2^53, so float64 is exact)."""
    acc = values.double() @ weights.double().t() + float(1 << (PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << PRECISION_BITS)).clamp_(0, 255)


def preprocess_video_ref(
    frames: torch.Tensor,
    resize_hw: Sequence[int],
    crop_box: Sequence[int],
    scale: float,
    offset: float,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference / fallback: (B, T, H, W, 3) uint8 -> (B, T, 3, crop_h, crop_w) in ``dtype`` (uint8: the
    resized values, not rescaled or normalised)."""
    _, _, H, W, _ = frames.shape
    top, left, out_h, out_w = crop_box
    wy = bilinear_weights(H, resize_hw[0], range(top, top + out_h)).to(frames.device)
    wx = bilinear_weights(W, resize_hw[1], range(left, left + out_w)).to(frames.device)
    x = frames.permute(0, 1, 4, 2, 3)  # (B, T, 3, H, W)
    horizontal = _fixed_point_pass(x, wx)  # (B, T, 3, H, out_w)
    v = _fixed_point_pass(horizontal.transpose(-1, -2), wy).transpose(-1, -2)  # (B, T, 3, out_h, out_w)
    if dtype == torch.uint8:
        return v.to(torch.uint8)
    out = v.float() * torch.tensor(scale, dtype=torch.float32) + torch.tensor(offset, dtype=torch.float32)
    shape = (1, 1, 3, 1, 1)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=frames.device).view(shape)
    inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float64).float().to(frames.device).view(shape)
    return ((out - mean_t) * inv_std).to(dtype)


def _check(frames, resize_hw, crop_box, mean, std, dtype) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"preprocess_video: frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"preprocess_video: frames must be uint8 (decoded video), got {frames.dtype}")
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(
            f"preprocess_video: frames must be (batch, frames, height, width, 3) RGB, got shape {tuple(frames.shape)}"
        )
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise ValueError(f"preprocess_video: the video is empty (shape {tuple(frames.shape)})")
    if frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError(f"preprocess_video: frames have no pixels (shape {tuple(frames.shape)})")
    top, left, h, w = crop_box
    if min(resize_hw) < 1 or top < 0 or left < 0 or h < 1 or w < 1 or top + h > resize_hw[0] or left + w > resize_hw[1]:
        raise ValueError(
            f"preprocess_video: crop {h}x{w} at ({top}, {left}) does not fit in the {resize_hw[0]}x{resize_hw[1]} "
            "resized frame"
        )
    if frames.shape[2] / resize_hw[0] > 15 or frames.shape[3] / resize_hw[1] > 15:
        raise ValueError(f"preprocess_video: shrinking {tuple(frames.shape[2:4])} to {tuple(resize_hw)} exceeds 15x")
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError("preprocess_video: mean and std need 3 values each, std non-zero")
    if dtype not in _DTYPES:
        raise ValueError(f"preprocess_video: dtype must be float32, float16, bfloat16 or uint8, got {dtype}")


def preprocess_video(
    frames: torch.Tensor,
    resize_hw: Sequence[int],
    crop_box: Sequence[int],
    scale: float = 1 / 127.5,
    offset: float = -1.0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Resize to ``resize_hw`` (height, width), take ``crop_box`` (top, left, height, width), rescale and
    normalise, in one pass on the frames' device. frames: uint8 (B, T, H, W, 3), any strides. ``dtype=torch.uint8``
    gives the resized and cropped values themselves (``scale``, ``offset``, ``mean`` and ``std`` unused): what a
    data loader's workers hand to the GPU."""
    resize_hw, crop_box = [int(v) for v in resize_hw], [int(v) for v in crop_box]
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    _check(frames, resize_hw, crop_box, mean, std, dtype)
    if _extension.has_kernel("preprocess_video", frames.device.type):
        return torch.ops.vivit_kernels.preprocess_video(
            frames, resize_hw, crop_box, float(scale), float(offset), mean, std, dtype
        )
    _extension.warn_fallback("preprocess_video", frames.device.type)
    return preprocess_video_ref(frames, resize_hw, crop_box, scale, offset, mean, std, dtype)


if _extension.available():

    @torch.library.register_fake("vivit_kernels::preprocess_video")
    def _(frames, resize_hw, crop_box, scale, offset, mean, std, dtype):
        return frames.new_empty((frames.shape[0], frames.shape[1], 3, crop_box[2], crop_box[3]), dtype=dtype)
