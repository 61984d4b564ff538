// Bitmask-packed sparse weights times dense activations: y[b, r] = sum_c W[r, c] x[c, b].
//
// Format (see packed.py): per row, a little-endian bitmask of the kept columns (bit j of byte k is
// column 8k + j; rows padded to a multiple of 64 columns) and the kept values packed row by row
// (fp32, bf16 or int8 with one scale per row), the start of each row in `row_offsets`.  Batch-1
// decode reads (1 - s) * b + 1 bits per weight instead of b: that is where the speed comes from.
//
// Paths, chosen at run time: "avx2" (x86 with AVX2 + FMA; expands each 8-column chunk from its
// mask byte with a permutation table, as AVX2 has no expand instruction) and "generic" (portable
// scalar code, any CPU).  Both are checked against packed.py's PyTorch reference by the tests.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOSA_X86 1
#endif

namespace losa {
namespace {


constexpr int64_t kTile = 4;  // input vectors sharing one expansion of each weight chunk

inline float load_value(const void* values, int64_t i, ValueKind kind) {
  switch (kind) {
    case kFloat32: return static_cast<const float*>(values)[i];
    case kBFloat16: {
      uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16;
      float out;
      std::memcpy(&out, &bits, sizeof(out));
      return out;
    }
    default: return static_cast<float>(static_cast<const int8_t*>(values)[i]);
  }
}

// Portable path: walks the set bits of each mask byte.
void rows_generic(const float* x, int64_t batch, int64_t x_stride, const uint8_t* mask, int64_t mask_stride,
                  const void* values, ValueKind kind, const int64_t* row_offsets, const float* scale, float* y,
                  int64_t rows, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* bits = mask + r * mask_stride;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * x_stride;
      int64_t v = row_offsets[r];
      float acc = 0.f;
      for (int64_t k = 0; k < mask_stride; ++k) {
        uint32_t byte = bits[k];
        while (byte) {
          int j = __builtin_ctz(byte);
          acc += load_value(values, v++, kind) * xb[8 * k + j];
          byte &= byte - 1;
        }
      }
      y[b * rows + r] = scale ? acc * scale[r] : acc;
    }
  }
}

#ifdef LOSA_X86
// One 32-byte entry per mask byte m: lane i takes packed value index[m][i] (vpermps reads only the
// low 3 bits); lanes whose bit is clear carry the sign bit instead, which vblendvps turns into a
// zero.  One table load per chunk instead of two (an index table and a keep table).
struct ExpandTables {
  alignas(32) int32_t index[256][8];
  ExpandTables() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int i = 0; i < 8; ++i) {
        bool set = (m >> i) & 1;
        index[m][i] = set ? next : INT32_MIN;
        next += set;
      }
    }
  }
};
const ExpandTables kTables;

template <ValueKind kind>
__attribute__((target("avx2,fma"))) inline __m256 widen(const void* values, int64_t at) {
  if constexpr (kind == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + at);
  } else if constexpr (kind == kBFloat16) {
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  } else {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + at));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One 8-column chunk of a row, expanded: 8 packed values are loaded from `at` (the buffer is padded
// so this may read past the row), moved to the lanes of their set bits, the other lanes zeroed.
template <ValueKind kind>
__attribute__((target("avx2,fma"))) inline __m256 expand(const void* values, int64_t at, unsigned m) {
  __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.index[m]));
  __m256 moved = _mm256_permutevar8x32_ps(widen<kind>(values, at), index);
  return _mm256_blendv_ps(moved, _mm256_setzero_ps(), _mm256_castsi256_ps(index));
}

// The dense rows [begin, end) of the packed weight (scaled for int8), for products with many input
// rows (prefill), where a dense GEMM on the unpacked weight beats expanding each chunk per tile.
template <ValueKind kind>
__attribute__((target("avx2,fma"))) void unpack_avx2(const uint8_t* mask, int64_t mask_stride, const void* values,
                                                     const int64_t* row_offsets, const float* scale, float* out,
                                                     int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* bits = mask + r * mask_stride;
    float* row = out + r * mask_stride * 8;
    const __m256 factor = _mm256_set1_ps(scale ? scale[r] : 1.f);
    int64_t v = row_offsets[r];
    for (int64_t k = 0; k < mask_stride; ++k) {
      const unsigned m = bits[k];
      __m256 w = m ? expand<kind>(values, v, m) : _mm256_setzero_ps();
      _mm256_storeu_ps(row + 8 * k, scale ? _mm256_mul_ps(w, factor) : w);
      v += __builtin_popcount(m);
    }
  }
}

// Batch 1 (decode): four independent accumulators, so consecutive chunks do not wait on one
// another's FMA latency.
template <ValueKind kind>
__attribute__((target("avx2,fma"))) float row_dot_avx2(const float* x, const uint8_t* bits, int64_t chunks,
                                                       const void* values, int64_t v) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= chunks; k += 4) {  // rows are padded to 64 columns: chunks is a multiple of 8
    const unsigned m0 = bits[k], m1 = bits[k + 1], m2 = bits[k + 2], m3 = bits[k + 3];
    const int64_t v1 = v + __builtin_popcount(m0), v2 = v1 + __builtin_popcount(m1), v3 = v2 + __builtin_popcount(m2);
    acc0 = _mm256_fmadd_ps(expand<kind>(values, v, m0), _mm256_loadu_ps(x + 8 * k), acc0);
    acc1 = _mm256_fmadd_ps(expand<kind>(values, v1, m1), _mm256_loadu_ps(x + 8 * k + 8), acc1);
    acc2 = _mm256_fmadd_ps(expand<kind>(values, v2, m2), _mm256_loadu_ps(x + 8 * k + 16), acc2);
    acc3 = _mm256_fmadd_ps(expand<kind>(values, v3, m3), _mm256_loadu_ps(x + 8 * k + 24), acc3);
    v = v3 + __builtin_popcount(m3);
  }
  for (; k < chunks; ++k) {
    acc0 = _mm256_fmadd_ps(expand<kind>(values, v, bits[k]), _mm256_loadu_ps(x + 8 * k), acc0);
    v += __builtin_popcount(bits[k]);
  }
  return horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

// AVX2 path.  Batch 1 goes through row_dot_avx2; larger batches share one expansion of each chunk
// among up to kTile input vectors, so the weights are read once per tile.
template <ValueKind kind>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, int64_t batch, int64_t x_stride, const uint8_t* mask,
                                                   int64_t mask_stride, const void* values,
                                                   const int64_t* row_offsets, const float* scale, float* y,
                                                   int64_t rows, int64_t begin, int64_t end) {
  if (batch == 1) {
    for (int64_t r = begin; r < end; ++r) {
      float total = row_dot_avx2<kind>(x, mask + r * mask_stride, mask_stride, values, row_offsets[r]);
      y[r] = scale ? total * scale[r] : total;
    }
    return;
  }
  for (int64_t b0 = 0; b0 < batch; b0 += kTile) {
    const int64_t tile = std::min(kTile, batch - b0);
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* bits = mask + r * mask_stride;
      int64_t v = row_offsets[r];
      __m256 acc[kTile] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < mask_stride; ++k) {
        const unsigned m = bits[k];
        if (m == 0) continue;
        __m256 w = expand<kind>(values, v, m);
        for (int64_t j = 0; j < tile; ++j)
          acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (b0 + j) * x_stride + 8 * k), acc[j]);
        v += __builtin_popcount(m);
      }
      for (int64_t j = 0; j < tile; ++j) {
        float total = horizontal_sum(acc[j]);
        y[(b0 + j) * rows + r] = scale ? total * scale[r] : total;
      }
    }
  }
}
#endif

void unpack_generic(const uint8_t* mask, int64_t mask_stride, const void* values, ValueKind kind,
                    const int64_t* row_offsets, const float* scale, float* out, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* row = out + r * mask_stride * 8;
    std::memset(row, 0, sizeof(float) * mask_stride * 8);
    int64_t v = row_offsets[r];
    for (int64_t k = 0; k < mask_stride; ++k) {
      for (uint32_t byte = mask[r * mask_stride + k]; byte; byte &= byte - 1) {
        float w = load_value(values, v++, kind);
        row[8 * k + __builtin_ctz(byte)] = scale ? w * scale[r] : w;
      }
    }
  }
}


bool cpu_has_avx2() {
#ifdef LOSA_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Rows per thread task: about 32K weights (4 KB of mask) each, so small layers are not split into tiny tasks.
int64_t row_grain(int64_t mask_stride) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, mask_stride)); }

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

void unpack(const Packed& w, float* out, Path path) {
  at::parallel_for(0, w.rows, row_grain(w.mask_stride), [&](int64_t begin, int64_t end) {
#ifdef LOSA_X86
    if (path == Path::kAvx2) {
      if (w.kind == kFloat32) unpack_avx2<kFloat32>(w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, out, begin, end);
      else if (w.kind == kBFloat16) unpack_avx2<kBFloat16>(w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, out, begin, end);
      else unpack_avx2<kInt8>(w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, out, begin, end);
      return;
    }
#endif
    unpack_generic(w.mask, w.mask_stride, w.values, w.kind, w.row_offsets, w.scale, out, begin, end);
  });
}

void matmul(const Packed& w, const float* x, int64_t batch, int64_t x_stride, float* y, Path path) {
  at::parallel_for(0, w.rows, row_grain(w.mask_stride), [&](int64_t begin, int64_t end) {
#ifdef LOSA_X86
    if (path == Path::kAvx2) {
      if (w.kind == kFloat32) rows_avx2<kFloat32>(x, batch, x_stride, w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, y, w.rows, begin, end);
      else if (w.kind == kBFloat16) rows_avx2<kBFloat16>(x, batch, x_stride, w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, y, w.rows, begin, end);
      else rows_avx2<kInt8>(x, batch, x_stride, w.mask, w.mask_stride, w.values, w.row_offsets, w.scale, y, w.rows, begin, end);
      return;
    }
#endif
    rows_generic(x, batch, x_stride, w.mask, w.mask_stride, w.values, w.kind, w.row_offsets, w.scale, y, w.rows, begin, end);
  });
}

}  // namespace losa
