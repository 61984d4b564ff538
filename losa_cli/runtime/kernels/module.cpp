// Python bindings of the kernels (kernels.h): torch tensors in, checked once here, plain views to the kernels.
// packed.py validates a weight's contents (offsets, popcounts) once when it is built or loaded; these
// checks are the cheap per-call ones on shapes and types.
#include <torch/extension.h>

#include "kernels.h"

namespace losa {
void bind_decode(pybind11::module_& m);  // decode.cpp: the native decode step

// The view the kernels read, with the per-call checks shared by both entry points and decode.cpp's packed
// layers.  A dense weight comes as values [rows, cols_padded] and an empty mask.
Packed packed_view(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                   const torch::Tensor& scale) {
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  losa::ValueKind kind;
  switch (values.scalar_type()) {
    case torch::kFloat32: kind = losa::kFloat32; break;
    case torch::kBFloat16: kind = losa::kBFloat16; break;
    case torch::kInt8: kind = losa::kInt8; break;
    default: TORCH_CHECK(false, "values: float32, bfloat16 or int8");
  }
  const bool dense = values.dim() == 2;
  int64_t rows, mask_stride;
  if (dense) {
    TORCH_CHECK(mask.numel() == 0 && values.size(1) % 64 == 0, "dense values: [rows, cols_padded], no mask");
    rows = values.size(0);
    mask_stride = values.size(1) / 8;
  } else {
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous() && mask.size(1) % 8 == 0,
                "mask: contiguous uint8 [rows, cols_padded / 8]");
    TORCH_CHECK(row_offsets.scalar_type() == torch::kInt64 && row_offsets.numel() == mask.size(0) + 1 &&
                    row_offsets.is_contiguous(), "row_offsets: int64 [rows + 1]");
    rows = mask.size(0);
    mask_stride = mask.size(1);
  }
  TORCH_CHECK((kind == losa::kInt8) == (scale.numel() > 0), "scale: one per row for int8 values, none otherwise");
  TORCH_CHECK(scale.numel() == 0 || (scale.scalar_type() == torch::kFloat32 && scale.numel() == rows &&
                                     scale.is_contiguous()), "scale: float32, one per row");
  return {dense ? nullptr : mask.data_ptr<uint8_t>(), mask_stride, values.data_ptr(), kind,
          dense ? nullptr : row_offsets.data_ptr<int64_t>(),
          scale.numel() > 0 ? scale.data_ptr<float>() : nullptr, rows};
}

}  // namespace losa

namespace {

// Returns the dense float32 weight [rows, cols_padded] (int8 values times their row's scale).
torch::Tensor sparse_unpack(torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets, torch::Tensor scale,
                            const std::string& path) {
  const losa::Packed w = losa::packed_view(mask, values, row_offsets, scale);
  const losa::Path p = losa::parse_path(path);
  auto out = torch::empty({w.rows, w.cols()}, torch::dtype(torch::kFloat32));
  losa::unpack(w, out.data_ptr<float>(), p);
  return out;
}

// x: [batch, cols_padded] float32 (zero-padded); returns y: [batch, rows] float32.
torch::Tensor sparse_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_offsets,
                            torch::Tensor scale, const std::string& path, int64_t gemm_from) {
  const losa::Packed w = losa::packed_view(mask, values, row_offsets, scale);
  const losa::Path p = losa::parse_path(path);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x: contiguous float32 [batch, cols]");
  TORCH_CHECK(x.size(1) == w.cols(), "x width must equal the weight's padded width");
  auto y = torch::empty({x.size(0), w.rows}, x.options());
  losa::matmul(w, x.data_ptr<float>(), x.size(0), x.size(1), y.data_ptr<float>(), p, gemm_from);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_matmul", &sparse_matmul, "packed (bitmask or dense) weights times dense activations", py::arg("x"),
        py::arg("mask"), py::arg("values"), py::arg("row_offsets"), py::arg("scale"), py::arg("path"),
        py::arg("gemm_from") = losa::kGemmFrom);
  m.def("sparse_unpack", &sparse_unpack, "the dense float32 weight of a packed one (rows padded to 64 columns)");
  m.def("available_paths", &losa::available_paths, "kernel paths this CPU runs, best first");
  m.def("gemm_from", []() { return losa::kGemmFrom; }, "input rows from which matmul runs the prefill GEMM");
  losa::bind_decode(m);
}
