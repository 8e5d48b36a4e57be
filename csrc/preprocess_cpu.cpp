// CPU implementation of preprocess_video, with the arithmetic of preprocess.h.
//
// Per frame (frames run in parallel): the horizontal pass for every source row the crop's vertical windows
// touch, over the crop's columns only, then the vertical pass. Each value comes from the same
// weighted_sample_rgb calls as the CUDA kernel's per-pixel computation, so both give identical bytes
// before normalisation.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "preprocess_op.h"

namespace vivit_kernels {
namespace {

template <typename out_t>
void preprocess_frames(const uint8_t* in, out_t* out, const PreprocessParams& p) {
  std::vector<Taps> rows(p.out_h), cols(p.out_w);
  for (int y = 0; y < p.out_h; ++y) bilinear_taps(p.in_h, p.resize_h, y + p.crop_top, rows[y]);
  for (int x = 0; x < p.out_w; ++x) bilinear_taps(p.in_w, p.resize_w, x + p.crop_left, cols[x]);
  const int first_row = rows.front().first;
  const int last_row = rows.back().first + rows.back().count;  // windows move forward with y
  const int n_rows = last_row - first_row;
  const int64_t plane = static_cast<int64_t>(p.out_h) * p.out_w;

  at::parallel_for(0, static_cast<int64_t>(p.batch) * p.frames, 1, [&](int64_t begin, int64_t end) {
    // horizontal-pass results of the rows in use, RGB interleaved: [row][column][channel]
    const int64_t h_row = 3 * static_cast<int64_t>(p.out_w);
    std::vector<uint8_t> h(static_cast<size_t>(n_rows) * h_row);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.frames, t = bt % p.frames;
      const uint8_t* frame = in + b * p.stride_b + t * p.stride_t;
      for (int r = 0; r < n_rows; ++r) {
        const uint8_t* src = frame + static_cast<int64_t>(first_row + r) * p.stride_h;
        uint8_t* dst = &h[r * h_row];
        for (int x = 0; x < p.out_w; ++x) {
          weighted_sample_rgb(src + cols[x].first * p.stride_w, p.stride_w, p.stride_c, cols[x], dst + 3 * x);
        }
      }
      out_t* dst_frame = out + bt * 3 * plane;
      for (int y = 0; y < p.out_h; ++y) {
        const uint8_t* window = &h[(rows[y].first - first_row) * h_row];
        const int64_t row_offset = static_cast<int64_t>(y) * p.out_w;
        for (int x = 0; x < p.out_w; ++x) {
          uint8_t rgb[3];
          weighted_sample_rgb(window + 3 * x, h_row, 1, rows[y], rgb);
          for (int c = 0; c < 3; ++c) {
            dst_frame[c * plane + row_offset + x] =
                static_cast<out_t>(normalize_value(rgb[c], p.scale, p.offset, p.mean[c], p.inv_std[c]));
          }
        }
      }
    }
  });
}

at::Tensor preprocess_video_cpu(const at::Tensor& frames, at::IntArrayRef resize_hw, at::IntArrayRef crop_box,
                                double scale, double offset, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                at::ScalarType dtype) {
  TORCH_CHECK(frames.device().is_cpu(), "preprocess_video_cpu: frames must be on the CPU");
  const PreprocessParams p = make_preprocess_params(frames, resize_hw, crop_box, scale, offset, mean, std, dtype);
  at::Tensor out = empty_output(frames, p, dtype);
  const uint8_t* in = frames.data_ptr<uint8_t>();
  switch (dtype) {
    case at::kFloat: preprocess_frames<float>(in, out.data_ptr<float>(), p); break;
    case at::kHalf: preprocess_frames<c10::Half>(in, out.data_ptr<c10::Half>(), p); break;
    default: preprocess_frames<c10::BFloat16>(in, out.data_ptr<c10::BFloat16>(), p); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vivit_kernels, CPU, m) { m.impl("preprocess_video", &preprocess_video_cpu); }

}  // namespace vivit_kernels
