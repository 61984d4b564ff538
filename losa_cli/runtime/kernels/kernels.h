// The kernels' C++ interface: what other native code (the lean decode step) calls, and what
// module.cpp binds to Python.  One packed weight is described by a plain view of its tensors
// (the format is packed.py's), so callers need no torch types in their hot loops.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace losa {

enum ValueKind : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };
enum class Path : int { kGeneric = 0, kAvx2 = 1 };

// A packed weight [rows, mask_stride * 8] (packed.py), in one of two layouts:
// - bitmask (mask != nullptr): per row a little-endian bitmask of the kept columns (rows padded to
//   64 columns), the kept values row after row (padded at the end so vector loads stay inside), the
//   start of each row's values in row_offsets [rows + 1];
// - dense (mask == nullptr, for layers without zeros such as the output head): values row-major
//   [rows, mask_stride * 8], zero past the true width; row_offsets is not read (may be nullptr).
// int8 values come with one float scale per row (W ~ values * scale); fp32 and bf16 have none.
// Brace-initialise in field order: {mask, mask_stride, values, kind, row_offsets, scale, rows}.
struct Packed {
  const uint8_t* mask;
  int64_t mask_stride;  // padded columns / 8 (also for dense weights, which have no mask)
  const void* values;
  ValueKind kind;
  const int64_t* row_offsets;
  const float* scale;  // [rows] for int8, else nullptr
  int64_t rows;

  int64_t cols() const { return mask_stride * 8; }
  bool dense() const { return mask == nullptr; }
};

// The paths this CPU runs, best first ("avx2", "generic").
std::vector<std::string> available_paths();
Path parse_path(const std::string& name);  // throws (TORCH_CHECK) on an unknown or unsupported path

// y [batch, rows] = x [batch, cols()] times the weight's transpose; x rows are x_stride floats apart
// and zero past the weight's true width.  Rows are split over ATen's threads.  Below gemm_from input
// rows each weight chunk is expanded once per 4 input rows (decode); from gemm_from rows on, each
// row's kept weights are multiplied into tiles of up to 64 input rows (prefill), same results up to
// fp32 summation order (int8: bit for bit).  kGemmFrom is where the GEMM starts to win on Zen 3
// (benchmarks/prefill_switch.py); callers keep the default.
// int8 weights multiply int8 activations: each x row is quantized on the call (s = max|x| / 127,
// q = clamp(round(x / s), -127, 127), q = 0 where x is all zero), summed exactly in int32, and
// y = float(sum) * s * scale[row]: packed.reference_matmul defines the same arithmetic.
constexpr int64_t kGemmFrom = 16;
void matmul(const Packed& w, const float* x, int64_t batch, int64_t x_stride, float* y, Path path,
            int64_t gemm_from = kGemmFrom);

// The dense float32 weight [rows, cols()] (int8 values times their row's scale).  Not on any hot
// path any more (prefill runs the GEMM); AVX2 for fp32/bf16 bitmask weights, portable otherwise.
void unpack(const Packed& w, float* out, Path path);

}  // namespace losa
