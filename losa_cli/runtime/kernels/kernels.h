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

// A bitmask-packed weight [rows, mask_stride * 8] (packed.py): per row a little-endian bitmask of
// the kept columns, the kept values row after row (padded at the end so vector loads stay inside),
// the start of each row's values, and for int8 one scale per row.
struct Packed {
  const uint8_t* mask;
  int64_t mask_stride;  // bytes of mask per row = padded columns / 8
  const void* values;
  ValueKind kind;
  const int64_t* row_offsets;  // [rows + 1]
  const float* scale;          // [rows] for int8, else nullptr
  int64_t rows;
};

// The paths this CPU runs, best first ("avx2", "generic").
std::vector<std::string> available_paths();
Path parse_path(const std::string& name);  // throws (TORCH_CHECK) on an unknown or unsupported path

// y [batch, rows] = x [batch, mask_stride * 8] times the weight's transpose; x rows are x_stride
// floats apart and zero past the weight's true width.  Rows are split over ATen's threads.
void matmul(const Packed& w, const float* x, int64_t batch, int64_t x_stride, float* y, Path path);

// The dense float32 weight [rows, mask_stride * 8] (int8 values times their row's scale).
void unpack(const Packed& w, float* out, Path path);

}  // namespace losa
