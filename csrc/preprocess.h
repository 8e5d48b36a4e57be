// Per-element arithmetic of the fused video preprocessing, shared by the CUDA kernel (csrc/cuda) and the
// CPU implementation (preprocess_cpu.cpp): both builds run exactly these functions, so the CPU tests check
// the arithmetic the GPU runs. No torch headers here.
//
// Resizing reproduces Pillow's 8-bit bilinear resampling (what transformers' VivitImageProcessor calls):
// a bilinear (triangle) filter widened by the scale factor when shrinking (antialiasing), normalised
// weights converted to 22-bit fixed point, a horizontal pass rounded to uint8, then a vertical pass
// rounded to uint8. An output pixel is computed from its own source window, independently of the others.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace vivit_kernels {

// Fixed-point precision of the resampling weights (8 bits of pixel, 2 bits of headroom, in 32 bits).
constexpr int kPrecisionBits = 22;
// Largest filter window: a shrink factor of up to 15 (window = 2 * ceil(scale) + 1 taps).
constexpr int kMaxTaps = 31;
constexpr double kMaxShrink = 15.0;

// The window of source samples one output sample reads, and their fixed-point weights.
struct Taps {
  int first;
  int count;
  int32_t weight[kMaxTaps];
};

VK_HOST_DEVICE double triangle(double x) {
  x = x < 0.0 ? -x : x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Weights of output sample `out_index` when resizing `in_size` samples to `out_size` (bilinear; the filter
// is stretched by the shrink factor so every source sample contributes when shrinking).
VK_HOST_DEVICE void bilinear_taps(int in_size, int out_size, int out_index, Taps& taps) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double stretch = scale < 1.0 ? 1.0 : scale;
  const double support = stretch;  // the triangle filter's support is 1
  const double center = (out_index + 0.5) * scale;
  const double inv_stretch = 1.0 / stretch;
  int first = static_cast<int>(center - support + 0.5);
  if (first < 0) first = 0;
  int last = static_cast<int>(center + support + 0.5);
  if (last > in_size) last = in_size;
  int count = last - first;
  if (count > kMaxTaps) count = kMaxTaps;  // unreachable for shrink factors <= kMaxShrink
  double w[kMaxTaps];
  double total = 0.0;
  for (int i = 0; i < count; ++i) {
    w[i] = triangle((i + first - center + 0.5) * inv_stretch);
    total += w[i];
  }
  for (int i = 0; i < count; ++i) {
    const double k = total != 0.0 ? w[i] / total : w[i];
    const double fixed = k * static_cast<double>(1 << kPrecisionBits);
    taps.weight[i] = static_cast<int32_t>(k < 0.0 ? fixed - 0.5 : fixed + 0.5);
  }
  taps.first = first;
  taps.count = count;
}

// Round a fixed-point accumulator to uint8, clamping to [0, 255].
VK_HOST_DEVICE uint8_t round_to_u8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// The weighted sums of `taps.count` RGB samples, `stride` elements apart (the channels `channel_stride`
// apart), rounded to uint8: out[c] = round(sum_i weight[i] * samples[i * stride + c * channel_stride]).
// The horizontal pass calls it on a source row (from the window's first pixel), the vertical pass on a
// column of horizontal-pass results. Integer arithmetic: the result does not depend on summation order.
VK_HOST_DEVICE void weighted_sample_rgb(const uint8_t* samples, int64_t stride, int64_t channel_stride,
                                        const Taps& taps, uint8_t out[3]) {
  int32_t acc0 = 1 << (kPrecisionBits - 1), acc1 = acc0, acc2 = acc0;
  for (int i = 0; i < taps.count; ++i) {
    const uint8_t* s = samples + i * stride;
    const int32_t w = taps.weight[i];
    acc0 += static_cast<int32_t>(s[0]) * w;
    acc1 += static_cast<int32_t>(s[channel_stride]) * w;
    acc2 += static_cast<int32_t>(s[2 * channel_stride]) * w;
  }
  out[0] = round_to_u8(acc0);
  out[1] = round_to_u8(acc1);
  out[2] = round_to_u8(acc2);
}

// One output pixel computed on its own (the CUDA kernel's way): horizontal-pass samples of the rows in the
// vertical window, then the vertical pass over them. `frame` points at the frame's first pixel; strides are
// in elements. Same result as a full horizontal pass followed by a full vertical pass (the CPU
// implementation's way), because both call weighted_sample_rgb on the same values.
VK_HOST_DEVICE void resample_pixel_rgb(const uint8_t* frame, int64_t row_stride, int64_t pixel_stride,
                                       int64_t channel_stride, const Taps& ty, const Taps& tx, uint8_t out[3]) {
  uint8_t column[kMaxTaps][3];
  for (int j = 0; j < ty.count; ++j) {
    weighted_sample_rgb(frame + (ty.first + j) * row_stride + tx.first * pixel_stride, pixel_stride, channel_stride,
                        tx, column[j]);
  }
  weighted_sample_rgb(&column[0][0], 3, 1, ty, out);
}

// The value-space part: rescale (x * scale + offset), then normalise ((x - mean) / std), in float32.
VK_HOST_DEVICE float normalize_value(uint8_t v, float scale, float offset, float mean, float inv_std) {
  const float x = static_cast<float>(v) * scale + offset;
  return (x - mean) * inv_std;
}

}  // namespace vivit_kernels

namespace vivit_kernels {

// Everything one launch needs, in plain types (no torch), for the CPU loop and the CUDA kernel alike.
struct PreprocessParams {
  int64_t stride_b, stride_t, stride_h, stride_w, stride_c;  // input (B, T, H, W, C) strides, in elements
  int batch, frames, in_h, in_w;
  int resize_h, resize_w;                // frame size after resizing (before the crop)
  int crop_top, crop_left, out_h, out_w;  // the crop, in resized coordinates
  float scale, offset;                   // x * scale + offset
  float mean[3], inv_std[3];             // then (x - mean) / std, per channel
};

}  // namespace vivit_kernels
