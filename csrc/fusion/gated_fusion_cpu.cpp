// glrec::gated_fusion and glrec::gated_fusion_backward on CPU, fused.
//
//   g = sigmoid(W[c,0] * e_graph + W[c,1] * e_text + b[c]),   fused = g * e_graph + (1 - g) * e_text
//
// The torch reference materialises gate_weight[context] ([N, 2, d]) and runs ~8 elementwise passes
// (and autograd keeps their intermediates); here one pass per row reads e_graph/e_text (+ grad_out)
// and the row's gate rows (C x 3 x d floats, resident in L1) and writes the outputs.
//
// sigmoid uses a Cephes-style polynomial exp (max rel. error ~2e-7 over the clamped range) instead
// of libm expf, because a libm call per element blocks vectorisation; the row kernels are compiled
// for AVX-512 / AVX2 / baseline with GCC target_clones (runtime dispatch) since setup.py builds for
// the baseline ISA. Weight/bias gradients are reduced deterministically: rows are cut into a fixed
// number of chunks that depends only on (N, C, d) -- not on the thread count -- each chunk writes its
// own [3, C, d] partial, and partials are summed in chunk order.
//
// float32 math; bfloat16/half embeddings are widened once and results narrowed back, gradients
// returned in each argument's dtype (the same contract as reference.py / ops.py).
#if defined(__GNUC__) && !defined(__clang__)
// Without it GCC keeps the clamps in fast_sigmoid as branches (a compare may trap) and vectorises
// nothing (checked with -fopt-info-vec-missed; placed after the torch headers it had no effect).
// torch itself is built with -fno-trapping-math.
#pragma GCC optimize("no-trapping-math")
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

inline float fast_sigmoid(float z) {
  // exp(-z) via 2^n * p(r), n = round(-z * log2 e), |r| <= ln2 / 2 (Cephes expf coefficients).
  float x = -z;
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);  // a bit cast every compiler folds to a register move
  return 1.0f / (1.0f + p * scale);
}

GLREC_CLONES
void fwd_rows(int64_t r0, int64_t r1, int64_t d, const float* eg, const float* et, const int64_t* ctx,
              const float* w, const float* b, float* out) {
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t c = ctx[i];
    const float* w0 = w + c * 2 * d;
    const float* w1 = w0 + d;
    const float* bb = b + c * d;
    const float* x = eg + i * d;
    const float* y = et + i * d;
    float* o = out + i * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const float g = fast_sigmoid(w0[k] * x[k] + w1[k] * y[k] + bb[k]);
      o[k] = y[k] + g * (x[k] - y[k]);
    }
  }
}

// part: this chunk's [3, C, d] partial sums (zeroed by the caller).
GLREC_CLONES
void bwd_rows(int64_t r0, int64_t r1, int64_t d, int64_t num_ctx, const float* go, const float* eg, const float* et,
              const int64_t* ctx, const float* w, const float* b, float* d_eg, float* d_et, float* part) {
  float* pw0 = part;
  float* pw1 = part + num_ctx * d;
  float* pb = part + 2 * num_ctx * d;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t c = ctx[i];
    const float* w0 = w + c * 2 * d;
    const float* w1 = w0 + d;
    const float* bb = b + c * d;
    const float* x = eg + i * d;
    const float* y = et + i * d;
    const float* gr = go + i * d;
    float* dx = d_eg + i * d;
    float* dy = d_et + i * d;
    float* aw0 = pw0 + c * d;
    float* aw1 = pw1 + c * d;
    float* ab = pb + c * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const float g = fast_sigmoid(w0[k] * x[k] + w1[k] * y[k] + bb[k]);
      const float dl = gr[k] * (x[k] - y[k]) * g * (1.0f - g);
      dx[k] = gr[k] * g + dl * w0[k];
      dy[k] = gr[k] * (1.0f - g) + dl * w1[k];
      aw0[k] += dl * x[k];
      aw1[k] += dl * y[k];
      ab[k] += dl;
    }
  }
}

void check_fusion(const char* op, const at::Tensor& e_graph, const at::Tensor& e_text, const at::Tensor& context,
                  const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor* grad_out) {
  std::vector<std::pair<const char*, const at::Tensor*>> named = {
      {"e_graph", &e_graph}, {"e_text", &e_text}, {"context", &context}, {"gate_weight", &gate_weight},
      {"gate_bias", &gate_bias}};
  if (grad_out != nullptr) named.insert(named.begin(), {"grad_out", grad_out});
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    if (t != &context) {
      const auto st = t->scalar_type();
      TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                  " must be float32, bfloat16 or float16, got ", st);
    }
  }
  TORCH_CHECK(e_graph.dim() == 2, op, ": e_graph must be 2-d [N, d], got shape ", e_graph.sizes());
  const int64_t n = e_graph.size(0), d = e_graph.size(1);
  TORCH_CHECK(e_text.sizes() == e_graph.sizes(), op, ": e_text must have e_graph's shape ", e_graph.sizes(), ", got ",
              e_text.sizes());
  TORCH_CHECK(e_text.scalar_type() == e_graph.scalar_type(), op, ": e_text must have e_graph's dtype ",
              e_graph.scalar_type(), ", got ", e_text.scalar_type());
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == e_graph.sizes(), op, ": grad_out must have e_graph's shape ", e_graph.sizes(),
                ", got ", grad_out->sizes());
  }
  TORCH_CHECK(context.scalar_type() == at::kLong, op, ": context must be int64, got ", context.scalar_type());
  TORCH_CHECK(context.dim() == 1 && context.numel() == n, op, ": context must be 1-d with ", n, " entries, got shape ",
              context.sizes());
  TORCH_CHECK(gate_bias.dim() == 2 && gate_bias.size(1) == d, op, ": gate_bias must be [C, ", d, "], got shape ",
              gate_bias.sizes());
  const int64_t num_ctx = gate_bias.size(0);
  TORCH_CHECK(gate_weight.dim() == 3 && gate_weight.size(0) == num_ctx && gate_weight.size(1) == 2 &&
                  gate_weight.size(2) == d,
              op, ": gate_weight must be [", num_ctx, ", 2, ", d, "], got shape ", gate_weight.sizes());
  const int64_t* cp = context.data_ptr<int64_t>();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (cp[i] < 0) | (cp[i] >= num_ctx);
  TORCH_CHECK(bad == 0, op, ": context codes must lie in [0, C = ", num_ctx, "), found ", bad, " out of range");
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat).contiguous(); }

}  // namespace

at::Tensor gated_fusion_cpu(const at::Tensor& e_graph, const at::Tensor& e_text, const at::Tensor& context,
                            const at::Tensor& gate_weight, const at::Tensor& gate_bias) {
  check_fusion("glrec::gated_fusion", e_graph, e_text, context, gate_weight, gate_bias, nullptr);
  const int64_t n = e_graph.size(0), d = e_graph.size(1);
  const at::Tensor eg = as_float(e_graph), et = as_float(e_text), w = as_float(gate_weight), b = as_float(gate_bias);
  at::Tensor out = at::empty({n, d}, eg.options());
  const float *pe = eg.data_ptr<float>(), *pt = et.data_ptr<float>(), *pw = w.data_ptr<float>(),
              *pb = b.data_ptr<float>();
  const int64_t* pc = context.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  // grain ~32k elements: large enough to amortise the OpenMP fork, small enough to split 2 ways at N~1k.
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) { fwd_rows(r0, r1, d, pe, pt, pc, pw, pb, po); });
  return e_graph.scalar_type() == at::kFloat ? out : out.to(e_graph.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_fusion_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& e_graph, const at::Tensor& e_text, const at::Tensor& context,
    const at::Tensor& gate_weight, const at::Tensor& gate_bias) {
  check_fusion("glrec::gated_fusion_backward", e_graph, e_text, context, gate_weight, gate_bias, &grad_out);
  const int64_t n = e_graph.size(0), d = e_graph.size(1), num_ctx = gate_bias.size(0);
  const at::Tensor go = as_float(grad_out), eg = as_float(e_graph), et = as_float(e_text), w = as_float(gate_weight),
                   b = as_float(gate_bias);
  at::Tensor d_eg = at::empty({n, d}, eg.options()), d_et = at::empty({n, d}, eg.options());
  // Fixed chunking (see the header): >= 1024 rows per chunk, partials capped at ~64 MB.
  const int64_t part_elems = std::max<int64_t>(1, 3 * num_ctx * d);
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t{1} << 24) / part_elems);
  const int64_t num_chunks = std::max<int64_t>(1, std::min((n + 1023) / 1024, max_chunks));
  const int64_t chunk = std::max<int64_t>(1, (n + num_chunks - 1) / num_chunks);
  at::Tensor part = at::zeros({num_chunks, part_elems}, eg.options());
  const float *pg = go.data_ptr<float>(), *pe = eg.data_ptr<float>(), *pt = et.data_ptr<float>(),
              *pw = w.data_ptr<float>(), *pb = b.data_ptr<float>();
  const int64_t* pc = context.data_ptr<int64_t>();
  float *pde = d_eg.data_ptr<float>(), *pdt = d_et.data_ptr<float>(), *pp = part.data_ptr<float>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(n, r0 + chunk);
      if (r0 < r1) bwd_rows(r0, r1, d, num_ctx, pg, pe, pt, pc, pw, pb, pde, pdt, pp + c * part_elems);
    }
  });
  at::Tensor red = at::zeros({part_elems}, eg.options());
  float* pr = red.data_ptr<float>();
  at::parallel_for(0, part_elems, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t c = 0; c < num_chunks; ++c)  // chunk order: deterministic
      for (int64_t k = k0; k < k1; ++k) pr[k] += pp[c * part_elems + k];
  });
  red = red.view({3, num_ctx, d});
  at::Tensor d_w = at::stack({red[0], red[1]}, 1);  // [C, 2, d]
  at::Tensor d_b = red[2].contiguous();
  return {d_eg.to(e_graph.scalar_type()), d_et.to(e_text.scalar_type()), d_w.to(gate_weight.scalar_type()),
          d_b.to(gate_bias.scalar_type())};
}

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("gated_fusion", &gated_fusion_cpu);
  m.impl("gated_fusion_backward", &gated_fusion_backward_cpu);
}

}  // namespace glrec
