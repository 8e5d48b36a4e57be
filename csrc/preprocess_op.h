// Host-side argument checking for preprocess_video, shared by the CPU and CUDA implementations.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "preprocess.h"

namespace vivit_kernels {

inline PreprocessParams make_preprocess_params(const at::Tensor& frames, at::IntArrayRef resize_hw,
                                               at::IntArrayRef crop_box, double scale, double offset,
                                               at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                               at::ScalarType dtype) {
  TORCH_CHECK(frames.scalar_type() == at::kByte, "preprocess_video: frames must be uint8, got ", frames.scalar_type());
  TORCH_CHECK(frames.dim() == 5, "preprocess_video: frames must be (batch, frames, height, width, 3), got shape ",
              frames.sizes());
  TORCH_CHECK(frames.size(4) == 3, "preprocess_video: frames must have 3 channels in the last dimension (RGB, "
              "channels-last as decoders give them), got shape ", frames.sizes());
  TORCH_CHECK(frames.size(0) > 0 && frames.size(1) > 0, "preprocess_video: the video is empty, shape ", frames.sizes());
  TORCH_CHECK(frames.size(2) > 0 && frames.size(3) > 0, "preprocess_video: frames have no pixels, shape ", frames.sizes());
  TORCH_CHECK(resize_hw.size() == 2 && resize_hw[0] > 0 && resize_hw[1] > 0,
              "preprocess_video: resize_hw must be two positive sizes, got ", resize_hw);
  TORCH_CHECK(crop_box.size() == 4, "preprocess_video: crop_box must be [top, left, height, width], got ", crop_box);
  TORCH_CHECK(crop_box[0] >= 0 && crop_box[1] >= 0 && crop_box[2] > 0 && crop_box[3] > 0 &&
                  crop_box[0] + crop_box[2] <= resize_hw[0] && crop_box[1] + crop_box[3] <= resize_hw[1],
              "preprocess_video: crop ", crop_box, " (top, left, height, width) does not fit in the ", resize_hw[0],
              "x", resize_hw[1], " resized frame");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "preprocess_video: mean and std need 3 values (one per channel)");
  for (double s : std) TORCH_CHECK(s != 0.0, "preprocess_video: std must not be 0");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kByte,
              "preprocess_video: dtype must be float32, float16, bfloat16 or uint8 (the resized values, not "
              "rescaled or normalised), got ", dtype);
  TORCH_CHECK(static_cast<double>(frames.size(2)) / resize_hw[0] <= kMaxShrink &&
                  static_cast<double>(frames.size(3)) / resize_hw[1] <= kMaxShrink,
              "preprocess_video: shrinking ", frames.size(2), "x", frames.size(3), " to ", resize_hw[0], "x",
              resize_hw[1], " exceeds the supported factor of ", kMaxShrink);
  PreprocessParams p;
  p.stride_b = frames.stride(0);
  p.stride_t = frames.stride(1);
  p.stride_h = frames.stride(2);
  p.stride_w = frames.stride(3);
  p.stride_c = frames.stride(4);
  p.batch = static_cast<int>(frames.size(0));
  p.frames = static_cast<int>(frames.size(1));
  p.in_h = static_cast<int>(frames.size(2));
  p.in_w = static_cast<int>(frames.size(3));
  p.resize_h = static_cast<int>(resize_hw[0]);
  p.resize_w = static_cast<int>(resize_hw[1]);
  p.crop_top = static_cast<int>(crop_box[0]);
  p.crop_left = static_cast<int>(crop_box[1]);
  p.out_h = static_cast<int>(crop_box[2]);
  p.out_w = static_cast<int>(crop_box[3]);
  p.scale = static_cast<float>(scale);
  p.offset = static_cast<float>(offset);
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = static_cast<float>(mean[c]);
    p.inv_std[c] = static_cast<float>(1.0 / std[c]);
  }
  return p;
}

inline at::Tensor empty_output(const at::Tensor& frames, const PreprocessParams& p, at::ScalarType dtype) {
  return at::empty({p.batch, p.frames, 3, p.out_h, p.out_w}, frames.options().dtype(dtype));
}

}  // namespace vivit_kernels
