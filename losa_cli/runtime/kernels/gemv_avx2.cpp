// AVX2 decode kernels (batch 1-4): bitmask rows expanded 32 columns (four mask bytes) at a time, and dense rows.
//
// Zen 3 loads at most two vectors per cycle, and at 70% zeros a bf16 row has ~5.8 bytes per 8-column
// chunk to stream, so every chunk must cost about one cycle: each expansion is one table load plus
// one shuffle, and the scalar side is kept off any serial chain.  A group's four mask bytes are
// spread once with pdep into 16-bit fields that are already table offsets (byte * 32 or * 16), and
// the value offsets of chunks 1-3 are popcounts of those fields, independent of one another.
// - fp32: each 128-bit lane is filled from its own 4-value window (lane 1 starts after lane 0's kept
//   values), then one vpshufb moves values to their columns and zeroes the rest (no vpermps + blend);
// - bf16: the chunk's 8 packed values are broadcast to both lanes and one vpshufb puts each value in
//   the high half of its fp32 column and zeroes everything else: expand, widen and mask in one op;
// - int8 (int8 activations): 32 weights per vpshufb, the control built from two 16-byte table rows
//   per lane (low byte's indices, high byte's indices shifted by the low byte's count); products by
//   the sign trick: vpmaddubsw(|q|, sign(w, q)) pairs are at most 2 * 127 * 127 = 32258, so the int16
//   sums cannot saturate, then vpmaddwd by ones widens them to int32.
#include "internal.h"

#include <immintrin.h>

#include <cstring>
#include <type_traits>

namespace losa::detail {
namespace {

// Shuffle controls, one row per mask byte m (built before the AVX2 target region, in plain code).
struct Tables {
  alignas(64) uint8_t f32[256][32];   // lane 0: columns 0-3 from its window, lane 1: columns 4-7 from its own
  alignas(64) uint8_t bf16[256][32];  // bytes 2 and 3 of column i's lane = packed value number (its rank)
  alignas(64) uint8_t low[256][16];   // int8: byte i = rank of column i (or 0x80: zero); bytes 8-15 = popcount
  alignas(64) uint8_t high[256][16];  // int8: bytes 8-15 = rank of column 8 + i; bytes 0-7 = 0
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0, lane_rank[2] = {0, 0};
      for (int i = 0; i < 8; ++i) {
        const bool kept = (m >> i) & 1;
        for (int byte = 0; byte < 4; ++byte) {
          f32[m][4 * i + byte] = kept ? static_cast<uint8_t>(4 * lane_rank[i / 4] + byte) : 0x80;
          bf16[m][4 * i + byte] = kept && byte >= 2 ? static_cast<uint8_t>(2 * rank + byte - 2) : 0x80;
        }
        low[m][i] = kept ? static_cast<uint8_t>(rank) : 0x80;
        high[m][8 + i] = kept ? static_cast<uint8_t>(rank) : 0x80;
        high[m][i] = 0;
        lane_rank[i / 4] += kept;
        rank += kept;
      }
      for (int i = 0; i < 8; ++i) low[m][8 + i] = static_cast<uint8_t>(rank);  // 0x80 + rank stays "zero"
    }
  }
};
const Tables kTables;

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace {

inline uint64_t popcount(uint64_t v) { return static_cast<uint64_t>(_mm_popcnt_u64(v)); }
inline uint64_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One 32-column group of a bitmask row: four mask bytes m, spread into 16-bit fields (byte << 5 for
// fp32/bf16 tables, << 4 for int8), and the value offsets of chunks 1-3 (chunk 0 starts at 0).
struct Group {
  uint64_t field[4];
  uint64_t offset[4];
  uint64_t count;  // kept values in the group
  Group(uint64_t m, int shift) {
    const uint64_t spread = _pdep_u64(m, 0xFFull * (0x0001000100010001ull << shift));
    for (int i = 0; i < 4; ++i) field[i] = (spread >> (16 * i)) & 0xFFFF;
    offset[0] = 0;
    offset[1] = popcount(field[0]);
    offset[2] = popcount(spread & 0xFFFFFFFFull);
    offset[3] = offset[2] + popcount(field[2]);
    count = popcount(m);
  }
};

inline __m256 expand_f32(const float* v, const Group& g, int i, uint64_t m) {
  const float* window = v + g.offset[i];
  const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(window));
  const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(window + popcount((m >> (8 * i)) & 0xF)));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
  const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(&kTables.f32[0][0] + g.field[i]));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, control));
}

inline __m256 expand_bf16(const uint16_t* v, const Group& g, int i, uint64_t) {
  const __m128i eight = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + g.offset[i]));
  const __m256i packed = _mm256_broadcastsi128_si256(eight);
  const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(&kTables.bf16[0][0] + g.field[i]));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, control));
}

inline __m256i lanes(const uint8_t* low, const uint8_t* high) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(low))),
                                 _mm_load_si128(reinterpret_cast<const __m128i*>(high)), 1);
}

// 32 int8 weights of a bitmask group, expanded to their columns (zeros elsewhere).
inline __m256i expand_int8(const int8_t* v, const Group& g) {
  const uint8_t* low = &kTables.low[0][0];
  const uint8_t* high = &kTables.high[0][0];
  const __m256i packed = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + g.offset[2])), 1);
  const __m256i control = _mm256_add_epi8(lanes(low + g.field[0], low + g.field[2]),
                                          lanes(high + g.field[1], high + g.field[3]));
  return _mm256_shuffle_epi8(packed, control);
}

// y[b, r] += exact int32 dot of 32 int8 weights with 32 quantized activations of input row b.
inline __m256i dot_int8(__m256i w, __m256i q, __m256i q_abs, __m256i acc) {
  const __m256i pairs = _mm256_maddubs_epi16(q_abs, _mm256_sign_epi8(w, q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

inline __m256i load_i8(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i dot_int8(__m256i w, const int8_t* q, const uint8_t* q_abs, __m256i acc) {
  return dot_int8(w, load_i8(q), load_i8(q_abs), acc);
}

// kRows bitmask rows of one input row at once: each 32-column step loads the activations once for all of
// them, and the rows' independent expansions overlap (one row alone is bound by its loads and latencies).
// Rows per block of the batch-1 sparse int8 product: 2, 3 and 4 measured alike on Zen 3, about 10% faster
// than one row at a time (dense int8 rows, already at two thirds of the read rate, were slower in blocks).
constexpr int kRowBlock = 4;

template <int kRows>
void sparse_int8_row_block(const Packed& w, const Activations& a, float* y, int64_t r) {
  const uint8_t* bits[kRows];
  const int8_t* v[kRows];
  __m256i acc[kRows];
  for (int i = 0; i < kRows; ++i) {
    bits[i] = w.mask + (r + i) * w.mask_stride;
    v[i] = static_cast<const int8_t*>(w.values) + w.row_offsets[r + i];
    acc[i] = _mm256_setzero_si256();
  }
  for (int64_t k = 0; k < w.mask_stride; k += 4) {
    const __m256i q = load_i8(a.q + 8 * k);
    const __m256i q_abs = load_i8(a.q_abs + 8 * k);
    for (int i = 0; i < kRows; ++i) {
      const Group g(load_u32(bits[i] + k), 4);
      acc[i] = dot_int8(expand_int8(v[i], g), q, q_abs, acc[i]);
      v[i] += g.count;
    }
  }
  for (int i = 0; i < kRows; ++i)
    y[r + i] = static_cast<float>(horizontal_sum(acc[i])) * a.q_scale[0] * w.scale[r + i];
}

// fp32 and bf16 bitmask rows, B input rows; two accumulators per input row (four for batch 1).
template <ValueKind kind, int B>
void sparse_float_rows(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  using Value = typename std::conditional<kind == kFloat32, float, uint16_t>::type;
  constexpr int kAcc = B == 1 ? 4 : 2;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* bits = w.mask + r * w.mask_stride;
    const Value* v = static_cast<const Value*>(w.values) + w.row_offsets[r];
    __m256 acc[B][kAcc];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < kAcc; ++j) acc[b][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < w.mask_stride; k += 4) {
      const uint64_t m = load_u32(bits + k);
      const Group g(m, 5);
      __m256 e[4];
      for (int i = 0; i < 4; ++i) {
        if constexpr (kind == kFloat32) e[i] = expand_f32(v, g, i, m);
        else e[i] = expand_bf16(v, g, i, m);
      }
      for (int b = 0; b < B; ++b) {
        const float* x = a.x + b * a.stride + 8 * k;
        for (int i = 0; i < 4; ++i) {
          acc[b][i % kAcc] = _mm256_fmadd_ps(e[i], _mm256_loadu_ps(x + 8 * i), acc[b][i % kAcc]);
        }
      }
      v += g.count;
    }
    for (int b = 0; b < B; ++b) {
      __m256 total = acc[b][0];
      for (int j = 1; j < kAcc; ++j) total = _mm256_add_ps(total, acc[b][j]);
      y[b * w.rows + r] = horizontal_sum(total);
    }
  }
}

template <int B>
void sparse_int8_rows(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  const int64_t cols = w.cols();
  if constexpr (B == 1) {
    for (; begin + kRowBlock <= end; begin += kRowBlock) sparse_int8_row_block<kRowBlock>(w, a, y, begin);
  }
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* bits = w.mask + r * w.mask_stride;
    const int8_t* v = static_cast<const int8_t*>(w.values) + w.row_offsets[r];
    __m256i acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_si256();
    for (int64_t k = 0; k < w.mask_stride; k += 4) {
      const Group g(load_u32(bits + k), 4);
      const __m256i e = expand_int8(v, g);
      for (int b = 0; b < B; ++b) acc[b] = dot_int8(e, a.q + b * cols + 8 * k, a.q_abs + b * cols + 8 * k, acc[b]);
      v += g.count;
    }
    for (int b = 0; b < B; ++b) {
      y[b * w.rows + r] = static_cast<float>(horizontal_sum(acc[b])) * a.q_scale[b] * w.scale[r];
    }
  }
}

inline __m256 load_dense(const float* v) { return _mm256_loadu_ps(v); }
inline __m256 load_dense(const uint16_t* v) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Dense fp32 and bf16 rows (no mask): 32 columns per step, as many accumulators as the bitmask rows.
template <ValueKind kind, int B>
void dense_float_rows(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  using Value = typename std::conditional<kind == kFloat32, float, uint16_t>::type;
  constexpr int kAcc = B == 1 ? 4 : 2;
  const int64_t cols = w.cols();
  for (int64_t r = begin; r < end; ++r) {
    const Value* v = static_cast<const Value*>(w.values) + r * cols;
    __m256 acc[B][kAcc];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < kAcc; ++j) acc[b][j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < cols; c += 32) {
      __m256 e[4];
      for (int i = 0; i < 4; ++i) e[i] = load_dense(v + c + 8 * i);
      for (int b = 0; b < B; ++b) {
        const float* x = a.x + b * a.stride + c;
        for (int i = 0; i < 4; ++i) {
          acc[b][i % kAcc] = _mm256_fmadd_ps(e[i], _mm256_loadu_ps(x + 8 * i), acc[b][i % kAcc]);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      __m256 total = acc[b][0];
      for (int j = 1; j < kAcc; ++j) total = _mm256_add_ps(total, acc[b][j]);
      y[b * w.rows + r] = horizontal_sum(total);
    }
  }
}

template <int B>
void dense_int8_rows(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  const int64_t cols = w.cols();
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* v = static_cast<const int8_t*>(w.values) + r * cols;
    __m256i acc[B][2];
    for (int b = 0; b < B; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_si256();
    for (int64_t c = 0; c < cols; c += 64) {
      const __m256i e0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + c));
      const __m256i e1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + c + 32));
      for (int b = 0; b < B; ++b) {
        acc[b][0] = dot_int8(e0, a.q + b * cols + c, a.q_abs + b * cols + c, acc[b][0]);
        acc[b][1] = dot_int8(e1, a.q + b * cols + c + 32, a.q_abs + b * cols + c + 32, acc[b][1]);
      }
    }
    for (int b = 0; b < B; ++b)
      y[b * w.rows + r] =
          static_cast<float>(horizontal_sum(_mm256_add_epi32(acc[b][0], acc[b][1]))) * a.q_scale[b] * w.scale[r];
  }
}

template <int B>
void rows_for_batch(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  if (w.dense()) {
    if (w.kind == kFloat32) dense_float_rows<kFloat32, B>(w, a, y, begin, end);
    else if (w.kind == kBFloat16) dense_float_rows<kBFloat16, B>(w, a, y, begin, end);
    else dense_int8_rows<B>(w, a, y, begin, end);
  } else {
    if (w.kind == kFloat32) sparse_float_rows<kFloat32, B>(w, a, y, begin, end);
    else if (w.kind == kBFloat16) sparse_float_rows<kBFloat16, B>(w, a, y, begin, end);
    else sparse_int8_rows<B>(w, a, y, begin, end);
  }
}

// Dense float32 rows [begin, end) of an fp32 or bf16 bitmask weight: each 32-column group expanded
// as the decode product expands it, then stored.
template <ValueKind kind>
void unpack_rows(const Packed& w, float* out, int64_t begin, int64_t end) {
  using Value = typename std::conditional<kind == kFloat32, float, uint16_t>::type;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* bits = w.mask + r * w.mask_stride;
    const Value* v = static_cast<const Value*>(w.values) + w.row_offsets[r];
    float* row = out + r * w.cols();
    for (int64_t k = 0; k < w.mask_stride; k += 4) {
      const uint64_t m = load_u32(bits + k);
      const Group g(m, 5);
      for (int i = 0; i < 4; ++i) {
        if constexpr (kind == kFloat32) _mm256_storeu_ps(row + 8 * (k + i), expand_f32(v, g, i, m));
        else _mm256_storeu_ps(row + 8 * (k + i), expand_bf16(v, g, i, m));
      }
      v += g.count;
    }
  }
}

}  // namespace

bool unpack_avx2(const Packed& w, float* out, int64_t begin, int64_t end) {
  if (w.dense() || w.kind == kInt8) return false;
  if (w.kind == kFloat32) unpack_rows<kFloat32>(w, out, begin, end);
  else unpack_rows<kBFloat16>(w, out, begin, end);
  return true;
}

void gemv_avx2(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end) {
  switch (a.batch) {
    case 1: rows_for_batch<1>(w, a, y, begin, end); break;
    case 2: rows_for_batch<2>(w, a, y, begin, end); break;
    case 3: rows_for_batch<3>(w, a, y, begin, end); break;
    default: rows_for_batch<4>(w, a, y, begin, end); break;
  }
}
#pragma GCC pop_options

}  // namespace losa::detail
