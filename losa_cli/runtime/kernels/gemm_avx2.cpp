// AVX2 prefill kernel: each weight row's kept values are walked once per tile of up to 64 input rows
// and multiplied into that tile's tokens (y[t, r] += w[r, c] * x[t, c] for the tile's t), with the
// tile transposed (kernels.cpp) so one kept weight meets its column's tokens in 8 contiguous vectors.
// The work is the kept weights times the tokens: 70% zeros means 70% fewer multiply-adds than a dense
// GEMM, at one load per FMA (the transposed tile stays in L1/L2).  int8 products of int8 activations
// are exact in fp32 and so are their sums while below 2^24, so fp32 partial sums are moved into int32
// every 1024 columns: the result is the exact integer sum of packed.reference_matmul.
#include "internal.h"

#include <immintrin.h>

#include <cstring>

namespace losa::detail {

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace {

constexpr int64_t kExactColumns = 1024;  // 1024 * 127 * 127 < 2^24: fp32 sums of int8 products stay exact

template <ValueKind kind>
inline __m256 broadcast(const void* values, int64_t v) {
  if constexpr (kind == kFloat32) {
    return _mm256_broadcast_ss(static_cast<const float*>(values) + v);
  } else if constexpr (kind == kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(values)[v]) << 16;
    return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(bits)));
  } else {
    return _mm256_set1_ps(static_cast<float>(static_cast<const int8_t*>(values)[v]));
  }
}

// acc[i] += w * tile[c, 8i .. 8i + 7] for i < NT.
template <int NT>
inline void axpy(__m256 w, const float* column, __m256* acc) {
  for (int i = 0; i < NT; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(column + 8 * i), acc[i]);
}

constexpr int64_t kBlockRows = 16;  // rows sharing each 64-column slice of a tile while it sits in L1

// Rows [r0, r0 + n) times one tile of NT * 8 tokens; writes y[first + t, r] for the tile's real tokens.
// The tile is walked in 64-column slices (one mask word; 64 * 64 tokens * 4 bytes = 16 KB, L1-sized),
// each slice serving all n rows; the rows' partial sums wait in `partial` between slices.
template <ValueKind kind, int NT>
void block_tile(const Packed& w, const Tiles& t, int64_t index, int64_t r0, int64_t n, float* y) {
  const int64_t width = 8 * NT, first = index * kTileTokens, words = w.mask_stride / 8;
  const float* xt = t.tile(index);
  alignas(32) float partial[kBlockRows][8 * NT];
  alignas(32) int32_t exact[kBlockRows][8 * NT];
  int64_t cursor[kBlockRows];
  for (int64_t j = 0; j < n; ++j) {
    cursor[j] = w.dense() ? (r0 + j) * w.cols() : w.row_offsets[r0 + j];
    for (int i = 0; i < NT; ++i) {
      _mm256_store_ps(partial[j] + 8 * i, _mm256_setzero_ps());
      _mm256_store_si256(reinterpret_cast<__m256i*>(exact[j] + 8 * i), _mm256_setzero_si256());
    }
  }
  for (int64_t word = 0; word < words; ++word) {
    const float* slice = xt + 64 * word * width;
    for (int64_t j = 0; j < n; ++j) {
      uint64_t m = ~0ull;
      if (!w.dense()) std::memcpy(&m, w.mask + (r0 + j) * w.mask_stride + 8 * word, sizeof(m));
      if (m == 0) continue;
      __m256 acc[NT];
      for (int i = 0; i < NT; ++i) acc[i] = _mm256_load_ps(partial[j] + 8 * i);
      int64_t v = cursor[j];
      for (; m; m = _blsr_u64(m)) axpy<NT>(broadcast<kind>(w.values, v++), slice + _tzcnt_u64(m) * width, acc);
      cursor[j] = v;
      for (int i = 0; i < NT; ++i) _mm256_store_ps(partial[j] + 8 * i, acc[i]);
    }
    if (kind == kInt8 && ((word + 1) % (kExactColumns / 64) == 0 || word + 1 == words)) {
      for (int64_t j = 0; j < n; ++j) {
        for (int i = 0; i < NT; ++i) {
          __m256i* total = reinterpret_cast<__m256i*>(exact[j] + 8 * i);
          *total = _mm256_add_epi32(*total, _mm256_cvtps_epi32(_mm256_load_ps(partial[j] + 8 * i)));
          _mm256_store_ps(partial[j] + 8 * i, _mm256_setzero_ps());
        }
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = r0 + j;
    for (int64_t k = 0; k < width && first + k < t.batch; ++k) {
      y[(first + k) * w.rows + r] =
          kind == kInt8 ? static_cast<float>(exact[j][k]) * t.q_scale[first + k] * w.scale[r] : partial[j][k];
    }
  }
}

template <ValueKind kind>
void rows(const Packed& w, const Tiles& t, float* y, int64_t begin, int64_t end) {
  const int64_t tiles = (t.batch + kTileTokens - 1) / kTileTokens;
  for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
    const int64_t n = end - r0 < kBlockRows ? end - r0 : kBlockRows;
    for (int64_t i = 0; i < tiles; ++i) {
      switch (t.width(i)) {
        case 8: block_tile<kind, 1>(w, t, i, r0, n, y); break;
        case 16: block_tile<kind, 2>(w, t, i, r0, n, y); break;
        case 32: block_tile<kind, 4>(w, t, i, r0, n, y); break;
        default: block_tile<kind, 8>(w, t, i, r0, n, y); break;
      }
    }
  }
}

}  // namespace

void gemm_avx2(const Packed& w, const Tiles& t, float* y, int64_t begin, int64_t end) {
  if (w.kind == kFloat32) rows<kFloat32>(w, t, y, begin, end);
  else if (w.kind == kBFloat16) rows<kBFloat16>(w, t, y, begin, end);
  else rows<kInt8>(w, t, y, begin, end);
}
#pragma GCC pop_options

}  // namespace losa::detail
