// Entry points of kernels.h: path choice, per-call preparation of the activations (int8 quantization,
// transposed tiles for prefill), the split of rows over ATen's threads, and the portable ("generic")
// kernels that define each product in plain scalar C++ for any CPU.  The AVX2 kernels live in
// gemv_avx2.cpp (decode) and gemm_avx2.cpp (prefill); the tests hold every path to packed.py's reference.
#include "internal.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace losa {
namespace detail {

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

float value_at(const Packed& w, int64_t index) {
  switch (w.kind) {
    case kFloat32: return static_cast<const float*>(w.values)[index];
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(w.values)[index]);
    default: return static_cast<float>(static_cast<const int8_t*>(w.values)[index]);
  }
}

int64_t Tiles::width(int64_t tile) const {
  const int64_t tokens = std::min(kTileTokens, batch - tile * kTileTokens);
  int64_t width = 8;
  while (width < tokens) width *= 2;
  return width;
}

namespace {

// Calls fn(column, value index) for each kept weight of row r, in column order.
template <class Fn>
void for_each_kept(const Packed& w, int64_t r, Fn&& fn) {
  if (w.dense()) {
    for (int64_t c = 0; c < w.cols(); ++c) fn(c, r * w.cols() + c);
    return;
  }
  int64_t v = w.row_offsets[r];
  const uint8_t* bits = w.mask + r * w.mask_stride;
  for (int64_t k = 0; k < w.mask_stride; ++k)
    for (uint32_t byte = bits[k]; byte; byte &= byte - 1) fn(8 * k + __builtin_ctz(byte), v++);
}

}  // namespace

// Portable decode: one dot product per (input row, weight row); int8 in exact integers.
void gemv_generic(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t b = 0; b < a.batch; ++b) {
      if (w.kind == kInt8) {
        const int8_t* q = a.q + b * w.cols();
        const int8_t* values = static_cast<const int8_t*>(w.values);
        int64_t acc = 0;
        for_each_kept(w, r, [&](int64_t c, int64_t v) { acc += int32_t{values[v]} * q[c]; });
        y[b * w.rows + r] = static_cast<float>(acc) * a.q_scale[b] * w.scale[r];
      } else {
        const float* x = a.x + b * a.stride;
        float acc = 0.f;
        for_each_kept(w, r, [&](int64_t c, int64_t v) { acc += value_at(w, v) * x[c]; });
        y[b * w.rows + r] = acc;
      }
    }
  }
}

// Portable prefill: each kept weight is multiplied into every token of each tile (the AVX2 GEMM's
// order, in scalars); int8 sums are exact integers.
void gemm_generic(const Packed& w, const Tiles& t, float* y, int64_t begin, int64_t end) {
  const int64_t tiles = (t.batch + kTileTokens - 1) / kTileTokens;
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t width = t.width(i), first = i * kTileTokens;
      const float* xt = t.tile(i);
      double acc[kTileTokens] = {};  // exact for int8 (integers below 2^53); fp32 rounds once at the end
      for_each_kept(w, r, [&](int64_t c, int64_t v) {
        const double value = value_at(w, v);
        for (int64_t j = 0; j < width; ++j) acc[j] += value * xt[c * width + j];
      });
      for (int64_t j = 0; j < width && first + j < t.batch; ++j) {
        const float sum = static_cast<float>(acc[j]);
        y[(first + j) * w.rows + r] = w.kind == kInt8 ? sum * t.q_scale[first + j] * w.scale[r] : sum;
      }
    }
  }
}

}  // namespace detail

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

// Rows per thread task: about 64 KB of weights each, so small layers are not split into tiny tasks
// (waking a thread costs more than a 576-column row takes).
int64_t row_grain(const Packed& w) {
  const int64_t bytes_per_row = w.dense() ? w.cols() * (w.kind == kFloat32 ? 4 : w.kind == kBFloat16 ? 2 : 1)
                                          : w.mask_stride * 4;  // mask plus ~30% of values, roughly
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, bytes_per_row));
}

// The int8 activations of kernels.h: per row s = max|x| / 127 and q = clamp(round(x / s)), zero rows stay zero.
void quantize(const float* x, int64_t batch, int64_t stride, int64_t cols, int8_t* q, uint8_t* q_abs, float* s) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * stride;
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    s[b] = amax / 127.f;
    for (int64_t c = 0; c < cols; ++c) {
      const float level = amax > 0.f ? std::min(127.f, std::max(-127.f, std::nearbyint(row[c] / s[b]))) : 0.f;
      q[b * cols + c] = static_cast<int8_t>(level);
      q_abs[b * cols + c] = static_cast<uint8_t>(std::fabs(level));
    }
  }
}

}  // namespace

std::vector<std::string> available_paths() {
  std::vector<std::string> paths;
  if (cpu_has_avx2()) paths.push_back("avx2");
  paths.push_back("generic");
  return paths;
}

Path parse_path(const std::string& name) {
  if (name == "generic") return Path::kGeneric;
  TORCH_CHECK(name == "avx2" && cpu_has_avx2(), "unknown or unsupported path: ", name);
  return Path::kAvx2;
}

void matmul(const Packed& w, const float* x, int64_t batch, int64_t x_stride, float* y, Path path,
            int64_t gemm_from) {
  const int64_t cols = w.cols();
  std::vector<int8_t> q;
  std::vector<uint8_t> q_abs;
  std::vector<float> q_scale;
  if (w.kind == kInt8) {
    q.resize(batch * cols);
    q_abs.resize(batch * cols);
    q_scale.resize(batch);
    quantize(x, batch, x_stride, cols, q.data(), q_abs.data(), q_scale.data());
  }
  if (batch < gemm_from) {
    // decode: tiles of up to 4 input rows share one expansion of each weight chunk
    for (int64_t b0 = 0; b0 < batch; b0 += 4) {
      const int64_t n = std::min<int64_t>(4, batch - b0);
      const detail::Activations a{x + b0 * x_stride, n, x_stride, w.kind == kInt8 ? q.data() + b0 * cols : nullptr,
                                  w.kind == kInt8 ? q_abs.data() + b0 * cols : nullptr,
                                  w.kind == kInt8 ? q_scale.data() + b0 : nullptr};
      float* out = y + b0 * w.rows;
      at::parallel_for(0, w.rows, row_grain(w), [&](int64_t begin, int64_t end) {
        if (path == Path::kAvx2) detail::gemv_avx2(w, a, out, begin, end);
        else detail::gemv_generic(w, a, out, begin, end);
      });
    }
    return;
  }
  // prefill: the input rows transposed into tiles of kTileTokens tokens, then every weight row once
  const int64_t tiles = (batch + detail::kTileTokens - 1) / detail::kTileTokens;
  std::vector<float> data(tiles * detail::kTileTokens * cols, 0.f);
  const detail::Tiles t{data.data(), batch, cols, w.kind == kInt8 ? q_scale.data() : nullptr};
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < tiles; ++i) {
      float* tile = data.data() + i * detail::kTileTokens * cols;
      const int64_t width = t.width(i), first = i * detail::kTileTokens;
      for (int64_t j = 0; j < width && first + j < batch; ++j) {
        const int64_t b = first + j;
        for (int64_t c = begin; c < end; ++c)
          tile[c * width + j] = w.kind == kInt8 ? static_cast<float>(q[b * cols + c]) : x[b * x_stride + c];
      }
    }
  });
  at::parallel_for(0, w.rows, std::max<int64_t>(1, row_grain(w) / 4), [&](int64_t begin, int64_t end) {
    if (path == Path::kAvx2) detail::gemm_avx2(w, t, y, begin, end);
    else detail::gemm_generic(w, t, y, begin, end);
  });
}

void unpack(const Packed& w, float* out, Path path) {
  at::parallel_for(0, w.rows, row_grain(w), [&](int64_t begin, int64_t end) {
    if (path == Path::kAvx2 && detail::unpack_avx2(w, out, begin, end)) return;
    for (int64_t r = begin; r < end; ++r) {
      float* row = out + r * w.cols();
      std::fill(row, row + w.cols(), 0.f);
      const float factor = w.scale ? w.scale[r] : 1.f;
      if (w.dense()) {
        for (int64_t c = 0; c < w.cols(); ++c) row[c] = detail::value_at(w, r * w.cols() + c) * factor;
        continue;
      }
      int64_t v = w.row_offsets[r];
      for (int64_t k = 0; k < w.mask_stride; ++k)
        for (uint32_t byte = w.mask[r * w.mask_stride + k]; byte; byte &= byte - 1)
          row[8 * k + __builtin_ctz(byte)] = detail::value_at(w, v++) * factor;
    }
  });
}

}  // namespace losa
