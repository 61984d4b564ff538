// losa's native decode step: one C++ call per token for the whole model, batch 1.
//
// PyTorch spends ~4 us per operator and a decoder block needs ~20 of them, so a 30-block model pays
// milliseconds per token before any arithmetic.  This object is built once from a plan's tensors
// (decode/native.py; it keeps references so they stay alive), owns every buffer a step needs, and
// shares the KV cache tensor with LeanModel (decode/model.py, the readable reference it is tested
// against): LeanModel's prefill fills the cache this step goes on from.  Per token: embedding row,
// then per block RMSNorm, the fused q/k/v product, q/k norms, RoPE from the tables, cache write,
// attention over the past (GQA, sliding window), o, residual, RMSNorm, fused gate/up, act(gate) * up,
// down, residual; final norm and head.  Packed products run on losa::matmul, dense fp32 ones on
// ATen's mv into preallocated outputs; nothing is allocated per token.
//
// The hot loops (attention, the gated activation) are written once on GCC vectors of eight floats and
// compiled twice: for AVX2 + FMA (one ymm instruction per operation) and for any CPU.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LOSA_X86 1
#endif
#define LOSA_INLINE static inline __attribute__((always_inline))

namespace losa {

// module.cpp: checks a packed weight's tensors (packed.py's format) and returns the kernels' view of them.
Packed packed_view(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_offsets,
                   const at::Tensor& scale);

namespace {

constexpr int64_t kParallelAttention = 1 << 18;  // multiply-adds of q . K from which attention is split
constexpr int64_t kAlign = 64;  // packed weights read inputs padded to 64 columns, zero past the true width
int64_t padded(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
bool empty(const at::Tensor& t) { return !t.defined() || t.numel() == 0; }

// ---- loops, compiled per instruction set (see the top) ---------------------------------------------

// Eight floats as one GCC vector: inside a function with the AVX2 target each operation is one ymm
// instruction; elsewhere the compiler splits it (two SSE or NEON registers, or scalars).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float f8_unaligned __attribute__((vector_size(32), aligned(4)));

LOSA_INLINE f8 load8(const float* p) { return *reinterpret_cast<const f8_unaligned*>(p); }
LOSA_INLINE void store8(float* p, f8 v) { *reinterpret_cast<f8_unaligned*>(p) = v; }
LOSA_INLINE f8 splat(float x) { return f8{} + x; }
LOSA_INLINE float sum8(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// a . b, four independent accumulators so the FMAs do not wait on one another.
LOSA_INLINE float dot(const float* a, const float* b, int64_t n) {
  f8 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
    acc2 += load8(a + i + 16) * load8(b + i + 16);
    acc3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return sum8((acc0 + acc1) + (acc2 + acc3)) + tail;
}

// exp(x) for x <= 88: x = n ln2 + r, exp(r) by a degree-6 polynomial on |r| <= ln2 / 2 (Cephes'
// coefficients, ~1 ulp), times 2^n put into the exponent bits.
LOSA_INLINE f8 exp8(f8 x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const f8 n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  const f8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * reinterpret_cast<f8>((__builtin_convertvector(n, i8) + 127) << 23);
}
LOSA_INLINE float exp1(float x) { return exp8(splat(x))[0]; }

struct Attend {
  const float* q;        // [heads, head_dim], after RoPE
  const float* keys;     // this layer's cache: [kv_heads, capacity, head_dim]
  const float* values;
  float* scores;         // [heads, capacity] scratch
  float* out;            // [heads, head_dim]
  int64_t group, head_dim, head_stride, capacity, first, last;  // attend to positions first..last
  float scale;
};

// Softmax attention of the query heads of kv heads [g0, g1) over the cached positions first..last.
// The `group` query heads sharing a kv head are done together, so each key and value row is read
// from memory once for all of them (GQA: SmolLM2's 9 query heads share 3 kv heads).
LOSA_INLINE void attend_body(const Attend& a, int64_t g0, int64_t g1) {
  const int64_t d = a.head_dim;
  for (int64_t g = g0; g < g1; ++g) {
    const float* keys = a.keys + g * a.head_stride;
    const float* values = a.values + g * a.head_stride;
    const float* q = a.q + g * a.group * d;
    float* scores = a.scores + g * a.group * a.capacity;
    float* out = a.out + g * a.group * d;
    for (int64_t t = a.first; t <= a.last; ++t)
      for (int64_t j = 0; j < a.group; ++j) scores[j * a.capacity + t] = dot(q + j * d, keys + t * d, d) * a.scale;
    float inverse_total[64];  // per query head of the group, 1 / sum of exp (groups are far smaller)
    for (int64_t j = 0; j < a.group; ++j) {
      float* s = scores + j * a.capacity;
      float top = -INFINITY;
      for (int64_t t = a.first; t <= a.last; ++t) top = std::max(top, s[t]);
      f8 sums = {};
      int64_t t = a.first;
      for (; t + 8 <= a.last + 1; t += 8) {
        const f8 e = exp8(load8(s + t) - top);
        store8(s + t, e);
        sums += e;
      }
      float total = sum8(sums);
      for (; t <= a.last; ++t) total += (s[t] = exp1(s[t] - top));
      inverse_total[j] = 1.f / total;
    }
    std::fill(out, out + a.group * d, 0.f);
    for (int64_t t = a.first; t <= a.last; ++t) {
      const float* v = values + t * d;
      for (int64_t j = 0; j < a.group; ++j) {
        const float p = scores[j * a.capacity + t];
        float* o = out + j * d;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) store8(o + i, load8(o + i) + p * load8(v + i));
        for (; i < d; ++i) o[i] += p * v[i];
      }
    }
    for (int64_t j = 0; j < a.group; ++j)
      for (int64_t i = 0; i < d; ++i) out[j * d + i] *= inverse_total[j];
  }
}

// out = act(gate) * up, act(x) = x * sigmoid(k(x)): k(x) = x is SiLU; k(x) = 2 sqrt(2/pi) (x + 0.044715 x^3)
// is GELU's tanh form (0.5 (1 + tanh u) = sigmoid(2u)).
LOSA_INLINE f8 gated8(f8 x, f8 up, bool gelu) {
  const f8 k = gelu ? 1.5957691216f * (x + 0.044715f * x * x * x) : x;
  return x / (1.f + exp8(-k)) * up;
}
LOSA_INLINE void gated_body(const float* gate, const float* up, float* out, int64_t n, bool gelu) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, gated8(load8(gate + i), load8(up + i), gelu));
  for (; i < n; ++i) out[i] = gated8(splat(gate[i]), splat(up[i]), gelu)[0];
}

#ifdef LOSA_X86
__attribute__((target("avx2,fma"))) void attend_avx2(const Attend& a, int64_t g0, int64_t g1) {
  attend_body(a, g0, g1);
}
__attribute__((target("avx2,fma"))) void gated_avx2(const float* g, const float* u, float* o, int64_t n, bool gelu) {
  gated_body(g, u, o, n, gelu);
}
#endif
void attend_generic(const Attend& a, int64_t g0, int64_t g1) { attend_body(a, g0, g1); }
void gated_generic(const float* g, const float* u, float* o, int64_t n, bool gelu) { gated_body(g, u, o, n, gelu); }

// ---- the rest of a step: O(width) work, plain code -----------------------------------------------

// out = w * x / rms(x) (w holds Gemma's 1 + w already); out may be x.
void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// RoPE on `heads` rows of x [heads, d] in place, the half-split layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
void rope(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* r = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = r[i], x2 = r[i + half];
      r[i] = x1 * cos[i] - x2 * sin[i];
      r[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
  }
}

// One linear layer with its input and output buffers fixed at build time: a dense float32 weight (ATen's
// mv into the preallocated output) or a packed one (losa::matmul, reading the input padded with zeros).
struct Linear {
  at::Tensor weight, mask, values, row_offsets, scale, bias;  // held so the views below stay valid
  at::Tensor in, out;  // views of the step's buffers: what the product reads and writes
  Packed packed{};
  bool is_packed = false;
  int64_t rows = 0;

  // tensors: [weight, bias] (dense) or [mask, values, row_offsets, scale, bias] (packed, packed.py's format);
  // an empty tensor stands for "none".
  // `width`: the input's true width (the buffer holds padded(width) floats, zero past width).
  Linear(const std::vector<at::Tensor>& t, const at::Tensor& in_buffer, int64_t width, const at::Tensor& out_buffer) {
    TORCH_CHECK(t.size() == 2 || t.size() == 5, "a linear is [weight, bias] or [mask, values, offsets, scale, bias]");
    is_packed = t.size() == 5;
    bias = t.back();
    if (is_packed) {
      mask = t[0], values = t[1], row_offsets = t[2], scale = t[3];
      packed = packed_view(mask, values, row_offsets, scale);
      rows = packed.rows;
      TORCH_CHECK(packed.mask_stride * 8 == padded(width), "packed weight: ", packed.mask_stride * 8,
                  " padded columns for an input of ", width);
    } else {
      weight = t[0];
      TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight");
      rows = weight.size(0);
      TORCH_CHECK(weight.size(1) == width, "dense weight: ", weight.size(1), " columns for an input of ", width);
    }
    in = in_buffer.narrow(0, 0, is_packed ? packed.mask_stride * 8 : weight.size(1));
    TORCH_CHECK(rows == out_buffer.numel(), "linear: ", rows, " rows for an output of ", out_buffer.numel());
    TORCH_CHECK(empty(bias) || (bias.numel() == rows && bias.scalar_type() == at::kFloat), "bias: float32 [rows]");
    out = out_buffer;
  }

  void run(Path path) {
    float* y = out.data_ptr<float>();
    if (is_packed) {
      matmul(packed, in.data_ptr<float>(), 1, packed.mask_stride * 8, y, path);
    } else {
      at::mv_out(out, weight, in);
    }
    if (!empty(bias)) {
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) y[r] += b[r];
    }
  }
};

}  // namespace

class DecodeStep {
 public:
  // dims: hidden, heads, kv_heads, head_dim, intermediate, vocab; scalars: eps, embed_scale, attn_scale,
  // final_softcap (0 = none); windows per layer (0 = none); layer_rope per layer (index into cos/sin);
  // linears: per layer qkv, o, gate_up, down (Linear's tensor lists); norms: per layer attn, mlp, attn_out,
  // mlp_out, q, k (empty = none).
  DecodeStep(std::vector<int64_t> dims, std::vector<double> scalars, bool gelu, std::vector<int64_t> windows,
             std::vector<int64_t> layer_rope, at::Tensor embed, at::Tensor cos, at::Tensor sin, at::Tensor final_norm,
             std::vector<at::Tensor> head, std::vector<std::vector<at::Tensor>> linears,
             std::vector<std::vector<at::Tensor>> norms, const std::string& path)
      : hidden_(dims.at(0)), heads_(dims.at(1)), kv_heads_(dims.at(2)), head_dim_(dims.at(3)),
        intermediate_(dims.at(4)), vocab_(dims.at(5)), eps_(scalars.at(0)), embed_scale_(scalars.at(1)),
        attn_scale_(scalars.at(2)), softcap_(scalars.at(3)), gelu_(gelu), windows_(std::move(windows)),
        layer_rope_(std::move(layer_rope)), embed_(embed), cos_(cos), sin_(sin), final_norm_(final_norm),
        norms_(std::move(norms)), path_(parse_path(path)) {
    const int64_t layers = static_cast<int64_t>(windows_.size());
    TORCH_CHECK(static_cast<int64_t>(linears.size()) == 4 * layers && static_cast<int64_t>(norms_.size()) == layers &&
                    static_cast<int64_t>(layer_rope_.size()) == layers, "one entry per layer");
    TORCH_CHECK(embed.dim() == 2 && embed.size(0) == vocab_ && embed.size(1) == hidden_ && embed.is_contiguous() &&
                    embed.scalar_type() == at::kFloat, "embed: float32 [vocab, hidden]");
    TORCH_CHECK(cos.dim() == 3 && cos.size(2) == head_dim_ && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                    sin.is_contiguous(), "cos, sin: [kinds, max_len, head_dim]");
    TORCH_CHECK(heads_ % kv_heads_ == 0 && heads_ / kv_heads_ <= 64 && head_dim_ % 2 == 0,
                "heads: a multiple of kv_heads (at most 64 per kv head); head_dim: even");
    for (int64_t l = 0; l < layers; ++l)
      TORCH_CHECK(layer_rope_[l] >= 0 && layer_rope_[l] < cos.size(0) && windows_[l] >= 0, "layer ", l,
                  ": RoPE table index or window out of range");
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    x_ = at::zeros({hidden_}, f32);
    normed_ = at::zeros({padded(hidden_)}, f32);
    qkv_ = at::zeros({(heads_ + 2 * kv_heads_) * head_dim_}, f32);  // q rows, then k, then v
    attended_ = at::zeros({padded(heads_ * head_dim_)}, f32);
    out_ = at::zeros({hidden_}, f32);
    gate_up_ = at::zeros({2 * intermediate_}, f32);
    gated_ = at::zeros({padded(intermediate_)}, f32);
    logits_ = at::zeros({vocab_}, f32);
    for (int64_t l = 0; l < layers; ++l) {
      blocks_.push_back({Linear(linears[4 * l], normed_, hidden_, qkv_),
                         Linear(linears[4 * l + 1], attended_, heads_ * head_dim_, out_),
                         Linear(linears[4 * l + 2], normed_, hidden_, gate_up_),
                         Linear(linears[4 * l + 3], gated_, intermediate_, out_)});
      const std::vector<at::Tensor>& norm = norms_[l];
      TORCH_CHECK(norm.size() == 6, "six norms per layer: attn, mlp, attn_out, mlp_out, q, k");
      for (size_t i = 0; i < 6; ++i) {
        const bool optional = i >= 2, per_head = i >= 4;
        TORCH_CHECK((optional && empty(norm[i])) ||
                        (norm[i].numel() == (per_head ? head_dim_ : hidden_) && norm[i].is_contiguous() &&
                         norm[i].scalar_type() == at::kFloat), "norm ", i, " of layer ", l, ": float32 of its width");
      }
      TORCH_CHECK(empty(norm[4]) == empty(norm[5]), "q and k norms come together");
    }
    blocks_.push_back({Linear(head, normed_, hidden_, logits_)});
    TORCH_CHECK(final_norm.numel() == hidden_ && final_norm.scalar_type() == at::kFloat,
                "final_norm: float32 [hidden]");
  }

  // Point the step at the KV cache [layers, batch, kv_heads, capacity, head_dim] (batch row 0 is used).
  void set_cache(at::Tensor keys, at::Tensor values) {
    TORCH_CHECK(keys.dim() == 5 && keys.size(0) == static_cast<int64_t>(windows_.size()) &&
                    keys.size(2) == kv_heads_ && keys.size(4) == head_dim_ && keys.is_contiguous() &&
                    keys.scalar_type() == at::kFloat && values.sizes() == keys.sizes() && values.is_contiguous(),
                "cache: float32 [layers, batch, kv_heads, capacity, head_dim]");
    keys_ = keys, values_ = values;
    capacity_ = keys.size(3);
    scores_ = at::zeros({heads_, std::max<int64_t>(capacity_, 1)}, at::TensorOptions().dtype(at::kFloat));
  }

  // Logits [vocab] of `token` at `position` (its k, v written into the cache); the returned tensor is
  // the step's own buffer, overwritten by the next step.
  at::Tensor step(int64_t token, int64_t position) {
    TORCH_CHECK(token >= 0 && token < vocab_, "token ", token, " outside the vocabulary");
    TORCH_CHECK(position >= 0 && position < capacity_ && position < cos_.size(1), "position ", position,
                " outside the cache (", capacity_, ") or the RoPE tables (", cos_.size(1), ")");
    c10::InferenceMode guard;
    float* x = x_.data_ptr<float>();
    float* normed = normed_.data_ptr<float>();
    float* qkv = qkv_.data_ptr<float>();
    float* out = out_.data_ptr<float>();
    const float* row = embed_.data_ptr<float>() + token * hidden_;
    for (int64_t i = 0; i < hidden_; ++i) x[i] = row[i] * embed_scale_;
    const int64_t layers = static_cast<int64_t>(windows_.size()), d = head_dim_;
    for (int64_t l = 0; l < layers; ++l) {
      const std::vector<at::Tensor>& norm = norms_[l];
      std::vector<Linear>& linear = blocks_[l];
      rms_norm(x, norm[0].data_ptr<float>(), normed, hidden_, eps_);
      linear[0].run(path_);
      float* q = qkv;
      float* k = qkv + heads_ * d;
      float* v = k + kv_heads_ * d;
      if (!empty(norm[4])) {
        for (int64_t h = 0; h < heads_; ++h) rms_norm(q + h * d, norm[4].data_ptr<float>(), q + h * d, d, eps_);
        for (int64_t h = 0; h < kv_heads_; ++h) rms_norm(k + h * d, norm[5].data_ptr<float>(), k + h * d, d, eps_);
      }
      const int64_t table = (layer_rope_[l] * cos_.size(1) + position) * d;
      rope(q, heads_, d, cos_.data_ptr<float>() + table, sin_.data_ptr<float>() + table);
      rope(k, kv_heads_, d, cos_.data_ptr<float>() + table, sin_.data_ptr<float>() + table);
      float* keys = keys_.data_ptr<float>() + l * keys_.stride(0);
      float* values = values_.data_ptr<float>() + l * values_.stride(0);
      for (int64_t g = 0; g < kv_heads_; ++g) {
        std::copy(k + g * d, k + (g + 1) * d, keys + g * capacity_ * d + position * d);
        std::copy(v + g * d, v + (g + 1) * d, values + g * capacity_ * d + position * d);
      }
      const int64_t first = windows_[l] > 0 ? std::max<int64_t>(0, position - windows_[l] + 1) : 0;
      attend({q, keys, values, scores_.data_ptr<float>(), attended_.data_ptr<float>(), heads_ / kv_heads_, d,
              capacity_ * d, capacity_, first, position, attn_scale_});
      linear[1].run(path_);
      if (!empty(norm[2])) rms_norm(out, norm[2].data_ptr<float>(), out, hidden_, eps_);
      for (int64_t i = 0; i < hidden_; ++i) x[i] += out[i];
      rms_norm(x, norm[1].data_ptr<float>(), normed, hidden_, eps_);
      linear[2].run(path_);
      gated(gate_up_.data_ptr<float>(), gate_up_.data_ptr<float>() + intermediate_, gated_.data_ptr<float>());
      linear[3].run(path_);
      if (!empty(norm[3])) rms_norm(out, norm[3].data_ptr<float>(), out, hidden_, eps_);
      for (int64_t i = 0; i < hidden_; ++i) x[i] += out[i];
    }
    rms_norm(x, final_norm_.data_ptr<float>(), normed, hidden_, eps_);
    blocks_.back()[0].run(path_);
    if (softcap_ > 0) {
      float* logits = logits_.data_ptr<float>();
      for (int64_t i = 0; i < vocab_; ++i) logits[i] = std::tanh(logits[i] / softcap_) * softcap_;
    }
    return logits_;
  }

 private:
  // kv heads split over ATen's threads (each reads its own slice of the cache) once there is enough work
  // to pay for waking a thread (~10-20 us with OMP_WAIT_POLICY=PASSIVE); a short past runs here.
  void attend(const Attend& a) {
    const int64_t work = heads_ * (a.last - a.first + 1) * head_dim_;
    at::parallel_for(0, kv_heads_, work < kParallelAttention ? kv_heads_ : 1, [&](int64_t g0, int64_t g1) {
#ifdef LOSA_X86
      if (path_ == Path::kAvx2) return attend_avx2(a, g0, g1);
#endif
      attend_generic(a, g0, g1);
    });
  }

  void gated(const float* gate, const float* up, float* out) {
#ifdef LOSA_X86
    if (path_ == Path::kAvx2) return gated_avx2(gate, up, out, intermediate_, gelu_);
#endif
    gated_generic(gate, up, out, intermediate_, gelu_);
  }

  int64_t hidden_, heads_, kv_heads_, head_dim_, intermediate_, vocab_;
  float eps_, embed_scale_, attn_scale_, softcap_;
  bool gelu_;
  std::vector<int64_t> windows_, layer_rope_;
  at::Tensor embed_, cos_, sin_, final_norm_;
  std::vector<std::vector<at::Tensor>> norms_;
  Path path_;
  std::vector<std::vector<Linear>> blocks_;  // per layer qkv, o, gate_up, down; last entry: the head
  at::Tensor x_, normed_, qkv_, attended_, out_, gate_up_, gated_, logits_, scores_, keys_, values_;
  int64_t capacity_ = 0;
};

void bind_decode(pybind11::module_& m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep", "losa's native batch-1 decode step (decode.cpp)")
      .def(pybind11::init<std::vector<int64_t>, std::vector<double>, bool, std::vector<int64_t>,
                          std::vector<int64_t>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>,
                          std::vector<std::vector<at::Tensor>>, const std::string&>())
      .def("set_cache", &DecodeStep::set_cache)
      .def("step", &DecodeStep::step, pybind11::call_guard<pybind11::gil_scoped_release>());  // others may run
}

}  // namespace losa
