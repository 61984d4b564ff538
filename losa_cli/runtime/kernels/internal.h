// What the kernel files share behind kernels.h: the prepared activations and the per-path row kernels.
#pragma once

#include "kernels.h"

namespace losa::detail {

// One call's input rows as the kernels read them.  For int8 weights each row is also quantized
// (kernels.h): q and q_abs [batch, cols] (|q|, the unsigned operand of the sign trick), q_scale [batch].
struct Activations {
  const float* x;
  int64_t batch;
  int64_t stride;
  const int8_t* q;
  const uint8_t* q_abs;
  const float* q_scale;
};

// Input rows transposed into tiles for the prefill GEMM: tile i holds tokens [kTileTokens * i, ...) as
// data[c * width + t] (width = the tile's tokens rounded up to 8, 16, 32 or 64, zero past the last
// token); int8 weights get the quantized rows as floats (exact integers).
constexpr int64_t kTileTokens = 64;
struct Tiles {
  const float* data;
  int64_t batch;
  int64_t cols;
  const float* q_scale;  // [batch] for int8 weights, else nullptr
  int64_t width(int64_t tile) const;
  const float* tile(int64_t index) const { return data + index * kTileTokens * cols; }
};

// y[b, r] for rows [begin, end) and batch <= 4 (decode); y rows are w.rows apart.
void gemv_generic(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end);
void gemv_avx2(const Packed& w, const Activations& a, float* y, int64_t begin, int64_t end);

// y[b, r] for rows [begin, end) and every tile (prefill).
void gemm_generic(const Packed& w, const Tiles& t, float* y, int64_t begin, int64_t end);
void gemm_avx2(const Packed& w, const Tiles& t, float* y, int64_t begin, int64_t end);

// The dense float32 rows [begin, end) of w; false where this path leaves the layout to the portable code.
bool unpack_avx2(const Packed& w, float* out, int64_t begin, int64_t end);

// Scalar helpers every path shares.
float bf16_to_float(uint16_t bits);
float value_at(const Packed& w, int64_t index);  // one stored value as float (int8 unscaled)

}  // namespace losa::detail
