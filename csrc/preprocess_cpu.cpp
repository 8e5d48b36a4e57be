// CPU implementation of preprocess_video, with the arithmetic of preprocess.h.
//
// Per frame (frames run in parallel): the horizontal pass for every source row the crop's vertical windows
// touch, over the crop's columns only, then the vertical pass. Each value is the same integer weighted sum as
// the CUDA kernel's per-pixel computation (the taps without their zero-weight ends; the strides of packed RGB
// known to the compiler), so both give identical bytes before normalisation, which does normalize_value's float
// operations over a whole row at once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define VIVIT_KERNELS_SSE41_PATH 1
#endif

#include "preprocess_op.h"

namespace vivit_kernels {
namespace {

// Taps with the zero weights at either end of the window dropped: the same sums (a zero weight adds nothing),
// fewer samples read (Pillow's window is one sample wider than its non-zero weights when the scale is whole).
Taps trimmed_taps(int in_size, int out_size, int out_index) {
  Taps taps;
  bilinear_taps(in_size, out_size, out_index, taps);
  while (taps.count > 1 && taps.weight[taps.count - 1] == 0) --taps.count;
  int lead = 0;
  while (lead < taps.count - 1 && taps.weight[lead] == 0) ++lead;
  if (lead > 0) {
    for (int i = lead; i < taps.count; ++i) taps.weight[i - lead] = taps.weight[i];
    taps.first += lead;
    taps.count -= lead;
  }
  return taps;
}

// One sample of weight 1: the weighted sum of a single uint8 value v is (v << 22) + 2^21, rounded back to v.
inline bool is_copy(const Taps& taps) { return taps.count == 1 && taps.weight[0] == (1 << kPrecisionBits); }

// weighted_sample_rgb for samples RGB-interleaved and `stride` apart, the strides known to the compiler.
template <int64_t kStride>
inline void weighted_sample_rgb_packed(const uint8_t* samples, const Taps& taps, uint8_t out[3]) {
  int32_t acc0 = 1 << (kPrecisionBits - 1), acc1 = acc0, acc2 = acc0;
  for (int i = 0; i < taps.count; ++i) {
    const uint8_t* s = samples + i * kStride;
    const int32_t w = taps.weight[i];
    acc0 += static_cast<int32_t>(s[0]) * w;
    acc1 += static_cast<int32_t>(s[1]) * w;
    acc2 += static_cast<int32_t>(s[2]) * w;
  }
  out[0] = round_to_u8(acc0);
  out[1] = round_to_u8(acc1);
  out[2] = round_to_u8(acc2);
}

// The horizontal pass of one packed-RGB row, one output pixel at a time.
void horizontal_row(const uint8_t* src, const Taps* cols, int out_w, uint8_t* dst) {
  for (int x = 0; x < out_w; ++x) weighted_sample_rgb_packed<3>(src + cols[x].first * 3, cols[x], dst + 3 * x);
}

#ifdef VIVIT_KERNELS_SSE41_PATH
// The same sums with the three channels of a pixel in one SSE register (R, G, B and the next pixel's R, whose
// lane is never stored): per tap one 4-byte load widened to int32, one multiply, one add; then the arithmetic
// shift and the saturating packs, which clamp to [0, 255] exactly as round_to_u8 does. Only for the first
// `vector_w` columns, whose windows end before the row's last pixel (so the 4-byte loads stay in the row); each
// 4-byte store's fourth byte is overwritten by the next pixel (the destination has 4 bytes of room at its end).
__attribute__((target("sse4.1"))) void horizontal_row_sse41(const uint8_t* src, const Taps* cols, int out_w,
                                                           int vector_w, uint8_t* dst) {
  const __m128i half = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  for (int x = 0; x < vector_w; ++x) {
    const Taps& t = cols[x];
    const uint8_t* s = src + t.first * 3;
    __m128i acc = half;
    for (int i = 0; i < t.count; ++i) {
      int32_t four;
      std::memcpy(&four, s + 3 * i, 4);
      const __m128i pixel = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
      acc = _mm_add_epi32(acc, _mm_mullo_epi32(pixel, _mm_set1_epi32(t.weight[i])));
    }
    const __m128i shifted = _mm_srai_epi32(acc, kPrecisionBits);
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(shifted, shifted), _mm_setzero_si128());
    const int32_t out = _mm_cvtsi128_si32(bytes);
    std::memcpy(dst + 3 * x, &out, 4);
  }
  horizontal_row(src, cols + vector_w, out_w - vector_w, dst + 3 * vector_w);
}

bool have_sse41() {
  static const bool have = __builtin_cpu_supports("sse4.1");
  return have;
}
#endif

// The vertical pass's sums over a whole row of horizontal-pass results (contiguous: the compiler vectorises it),
// built for AVX2 and for the baseline, the one the CPU supports chosen when the library loads (an int32 multiply
// of 8 lanes at a time where the baseline's SSE2 has none).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void vertical_sums(const uint8_t* window, int64_t h_row, const Taps& ty, int32_t* acc) {
  for (int64_t k = 0; k < h_row; ++k) acc[k] = 1 << (kPrecisionBits - 1);
  for (int i = 0; i < ty.count; ++i) {
    const uint8_t* row = window + i * h_row;
    const int32_t w = ty.weight[i];
    for (int64_t k = 0; k < h_row; ++k) acc[k] += static_cast<int32_t>(row[k]) * w;
  }
}

// A row's vertical-pass sums rounded to uint8 (round_to_u8: the arithmetic shift, then the clamp) and normalised
// in float32 exactly as normalize_value does (the same operations in the same order; no contraction), with the
// channel constants of each interleaved position in `mean` and `inv_std`: contiguous, so it vectorises.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void normalize_sums(const int32_t* acc, int64_t n, float scale, float offset, const float* mean, const float* inv_std,
                    float* values) {
  for (int64_t k = 0; k < n; ++k) {
    int32_t v = acc[k] >> kPrecisionBits;
    v = v < 0 ? 0 : (v > 255 ? 255 : v);
    const float x = static_cast<float>(v) * scale + offset;
    values[k] = (x - mean[k]) * inv_std[k];
  }
}

template <typename out_t>
void preprocess_frames(const uint8_t* in, out_t* out, const PreprocessParams& p) {
  std::vector<Taps> rows(p.out_h), cols(p.out_w);
  for (int y = 0; y < p.out_h; ++y) rows[y] = trimmed_taps(p.in_h, p.resize_h, y + p.crop_top);
  for (int x = 0; x < p.out_w; ++x) cols[x] = trimmed_taps(p.in_w, p.resize_w, x + p.crop_left);
  const int first_row = rows.front().first;
  const int last_row = rows.back().first + rows.back().count;  // windows move forward with y
  const int n_rows = last_row - first_row;
  const int64_t plane = static_cast<int64_t>(p.out_h) * p.out_w;
  const bool packed = p.stride_w == 3 && p.stride_c == 1;  // (H, W, 3) rows, as decoders give them
  // every column one source column, in order (the width is not resized): the horizontal pass is a copy
  bool columns_copied = true;
  for (int x = 0; x < p.out_w; ++x) {
    columns_copied = columns_copied && is_copy(cols[x]) && cols[x].first == cols[0].first + x;
  }
  // the columns whose windows end before the row's last pixel (windows move forward with x): a 4-byte load
  // at any of their taps stays inside the row
  int vector_w = 0;
  while (vector_w < p.out_w && cols[vector_w].first + cols[vector_w].count < p.in_w) ++vector_w;
  // each interleaved position's channel constants, for normalize_sums
  const int64_t row_values = 3 * static_cast<int64_t>(p.out_w);
  std::vector<float> mean_row(static_cast<size_t>(row_values)), inv_std_row(static_cast<size_t>(row_values));
  for (int64_t k = 0; k < row_values; ++k) {
    mean_row[k] = p.mean[k % 3];
    inv_std_row[k] = p.inv_std[k % 3];
  }

  at::parallel_for(0, static_cast<int64_t>(p.batch) * p.frames, 1, [&](int64_t begin, int64_t end) {
    // horizontal-pass results of the rows in use, RGB interleaved: [row][column][channel]
    const int64_t h_row = 3 * static_cast<int64_t>(p.out_w);
    std::vector<uint8_t> h(static_cast<size_t>(n_rows) * h_row + 4);  // + the last 4-byte store's spare byte
    std::vector<int32_t> acc_row(static_cast<size_t>(h_row));
    std::vector<float> values_row(static_cast<size_t>(h_row));
    int32_t* acc = acc_row.data();
    float* values = values_row.data();
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.frames, t = bt % p.frames;
      const uint8_t* frame = in + b * p.stride_b + t * p.stride_t;
      for (int r = 0; r < n_rows; ++r) {
        const uint8_t* src = frame + static_cast<int64_t>(first_row + r) * p.stride_h;
        uint8_t* dst = &h[r * h_row];
        if (packed && columns_copied) {  // no horizontal resize: the crop's columns, as they are
          std::memcpy(dst, src + static_cast<int64_t>(cols[0].first) * 3, static_cast<size_t>(h_row));
        } else if (packed) {
#ifdef VIVIT_KERNELS_SSE41_PATH
          if (have_sse41()) {
            horizontal_row_sse41(src, cols.data(), p.out_w, vector_w, dst);
            continue;
          }
#endif
          horizontal_row(src, cols.data(), p.out_w, dst);
        } else {
          for (int x = 0; x < p.out_w; ++x) {
            weighted_sample_rgb(src + cols[x].first * p.stride_w, p.stride_w, p.stride_c, cols[x], dst + 3 * x);
          }
        }
      }
      // vertical pass, a row at a time: the taps' rows of horizontal-pass results weighted and summed over the
      // whole row at once (contiguous, so the compiler vectorises it), then rounded, normalised and split into
      // the three channel planes
      out_t* dst_frame = out + bt * 3 * plane;
      for (int y = 0; y < p.out_h; ++y) {
        const Taps& ty = rows[y];
        const uint8_t* window = &h[(ty.first - first_row) * h_row];
        out_t* d0 = dst_frame + static_cast<int64_t>(y) * p.out_w;
        out_t* d1 = d0 + plane;
        out_t* d2 = d1 + plane;
        if constexpr (std::is_same_v<out_t, uint8_t>) {  // the resized values themselves, split into planes
          if (is_copy(ty)) {
            for (int x = 0; x < p.out_w; ++x) {
              d0[x] = window[3 * x];
              d1[x] = window[3 * x + 1];
              d2[x] = window[3 * x + 2];
            }
          } else {
            vertical_sums(window, h_row, ty, acc);
            for (int x = 0; x < p.out_w; ++x) {
              d0[x] = round_to_u8(acc[3 * x]);
              d1[x] = round_to_u8(acc[3 * x + 1]);
              d2[x] = round_to_u8(acc[3 * x + 2]);
            }
          }
          continue;
        }
        if (is_copy(ty)) {  // no vertical resize for this row: its horizontal-pass values, as they are
          for (int64_t k = 0; k < h_row; ++k) acc[k] = (static_cast<int32_t>(window[k]) << kPrecisionBits);
        } else {
          vertical_sums(window, h_row, ty, acc);
        }
        normalize_sums(acc, h_row, p.scale, p.offset, mean_row.data(), inv_std_row.data(), values);
        for (int x = 0; x < p.out_w; ++x) {
          d0[x] = static_cast<out_t>(values[3 * x]);
          d1[x] = static_cast<out_t>(values[3 * x + 1]);
          d2[x] = static_cast<out_t>(values[3 * x + 2]);
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
    case at::kByte: preprocess_frames<uint8_t>(in, out.data_ptr<uint8_t>(), p); break;
    default: preprocess_frames<c10::BFloat16>(in, out.data_ptr<c10::BFloat16>(), p); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vivit_kernels, CPU, m) { m.impl("preprocess_video", &preprocess_video_cpu); }

}  // namespace vivit_kernels
