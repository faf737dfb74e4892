// glrec::propagate on CPU: fused LightGCN propagation, mean of layers 0..K in one pass per layer.
//
//   x_{k+1} = D^-1/2 A D^-1/2 x_k,     out = (x_0 + x_1 + ... + x_K) / (K + 1)
//
// The normalisation is applied from the per-node dinv = deg^-1/2 on the fly; no per-edge value
// array exists. We carry the *scaled* table z_k = dinv ⊙ x_k between layers, because then
//
//   s_i       = sum_{j in N(i)} z_k[j]          (a pure gather-add: no per-edge multiply or dinv load)
//   x_{k+1}[i] = dinv[i] * s_i,   z_{k+1}[i] = dinv[i]^2 * s_i
//
// so one pass over the rows does the sparse product, writes the next scaled table and adds the new
// layer into the running sum (the output buffer) while s_i is still in registers. Layer 1 gathers x
// itself with a dinv[j] factor (z_0 is never materialised), and the last layer writes the mean
// directly, so the K+1 layer tables of the stack+mean formulation are never stored.
//
// Scheduling: rows are cut into blocks of equal *work* (edges + 1 per row, found by binary search on
// rowptr), not equal row counts, so a power-law graph (Gowalla: max degree 1,415, median 13) splits
// evenly over the threads of at::parallel_for. Within a block, rows are processed in order, so
// writes are sequential and each gathered neighbour row (d contiguous floats) is prefetched a few
// edges ahead. Sums are float32 throughout (the contract of reference.propagate_csr). A bfloat16
// input keeps its layer tables in bfloat16 (half the bytes of every gathered row: the loop is bound
// by those bytes) and returns bfloat16; a float16 input is widened once and narrowed back.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

#ifndef GLREC_PREFETCH_DISTANCE  // overridable for A/B builds (-DGLREC_PREFETCH_DISTANCE=0)
#define GLREC_PREFETCH_DISTANCE 4
#endif
constexpr int64_t kPrefetchDistance = GLREC_PREFETCH_DISTANCE;  // edges ahead; see bench/RESULTS.md "Kernels"

void check_graph(const char* op, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& dinv,
                 int64_t num_nodes) {
  check_csr(op, "rowptr/col", rowptr, col, num_nodes, num_nodes);
  TORCH_CHECK(dinv.device().is_cpu(), op, ": dinv must be a CPU tensor, got ", dinv.device());
  TORCH_CHECK(dinv.scalar_type() == at::kFloat, op, ": dinv must be float32, got ", dinv.scalar_type());
  TORCH_CHECK(dinv.dim() == 1 && dinv.is_contiguous(), op, ": dinv must be a contiguous 1-d tensor, got shape ",
              dinv.sizes());
  TORCH_CHECK(dinv.numel() == num_nodes, op, ": dinv must have x.size(0) = ", num_nodes, " entries, got ",
              dinv.numel());
}

// Storage of the gathered tables: float32, or bfloat16 bits (half the bytes per gathered row, which
// is what this loop is bound by) widened to float32 for the sums.
inline float widen(float v) { return v; }
inline float widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void narrow(float v, float* p) { *p = v; }
inline void narrow(float v, uint16_t* p) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  *p = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

// One layer over rows [r0, r1). src: the gathered table (x for the first layer, z_{k-1} after), of
// storage type S; scale_src: multiply gathered rows by dinv[j] (first layer only). z_next (type S)
// may be null (last layer). x0 (the input, type S; first layer only) or out: the running sum, always
// float32; `final_scale` != 0 turns it into the mean.
template <typename S>
GLREC_CLONES
void layer_rows(int64_t r0, int64_t r1, int64_t d, const int64_t* rp, const int64_t* cp, const float* dinv,
                const S* src, bool scale_src, const S* x0, S* z_next, float* out, float final_scale, float* acc) {
  for (int64_t i = r0; i < r1; ++i) {
    std::fill(acc, acc + d, 0.f);
    const int64_t e0 = rp[i], e1 = rp[i + 1];
    for (int64_t e = e0; e < e1; ++e) {
      if (kPrefetchDistance > 0 && e + kPrefetchDistance < e1) {
        const char* p = reinterpret_cast<const char*>(src + cp[e + kPrefetchDistance] * d);
        for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(S)); off += 64) __builtin_prefetch(p + off);
      }
      const S* row = src + cp[e] * d;
      if (scale_src) {
        const float w = dinv[cp[e]];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) acc[c] += w * widen(row[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) acc[c] += widen(row[c]);
      }
    }
    const float di = dinv[i];
    float* o = out + i * d;
    if (z_next != nullptr) {
      S* zn = z_next + i * d;
      const float di2 = di * di;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) narrow(di2 * acc[c], zn + c);
    }
    const float scale = final_scale != 0.f ? final_scale : 1.f;
    if (x0 != nullptr) {
      const S* xi = x0 + i * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] = (widen(xi[c]) + di * acc[c]) * scale;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] = (o[c] + di * acc[c]) * scale;
    }
  }
}

// K layers with tables of storage type S; x: the input in that storage (contiguous); out: float32.
template <typename S>
void propagate_layers(const int64_t* rp, const int64_t* cp, const float* dv, int64_t n, int64_t d,
                      int64_t num_layers, const S* x, S* z_a, S* z_b, float* out) {
  // 16 blocks per thread: enough that the static split of at::parallel_for stays balanced, few enough
  // that each block is long (sequential output writes).
  const auto bounds = balanced_row_blocks(rp, n, std::max<int64_t>(1, at::get_num_threads() * 16));
  const int64_t num_blocks = static_cast<int64_t>(bounds.size()) - 1;
  const S* src = x;
  S* zs[2] = {z_a, z_b};
  for (int64_t k = 1; k <= num_layers; ++k) {
    const bool first = k == 1, last = k == num_layers;
    S* z_next = last ? nullptr : zs[(k - 1) % 2];
    const S* x0 = first ? x : nullptr;
    const float final_scale = last ? 1.f / static_cast<float>(num_layers + 1) : 0.f;
    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> acc(d);
      for (int64_t b = b0; b < b1; ++b)
        layer_rows<S>(bounds[b], bounds[b + 1], d, rp, cp, dv, src, first, x0, z_next, out, final_scale, acc.data());
    });
    src = z_next;
  }
}

}  // namespace

at::Tensor propagate_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& dinv, const at::Tensor& x,
                         int64_t num_layers) {
  constexpr const char* op = "glrec::propagate";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-d [num_nodes, d], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(num_layers >= 0, op, ": num_layers must be >= 0, got ", num_layers);
  const int64_t n = x.size(0), d = x.size(1);
  check_graph(op, rowptr, col, dinv, n);
  if (num_layers == 0 || n == 0 || d == 0) return x.clone();

  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  const float* dv = dinv.data_ptr<float>();
  at::Tensor out = at::empty({n, d}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {
    // bfloat16 in: the layer tables stay bfloat16 (half the gathered bytes), sums in float32.
    at::Tensor z_a = num_layers >= 2 ? at::empty({n, d}, x.options()) : at::Tensor();
    at::Tensor z_b = num_layers >= 3 ? at::empty({n, d}, x.options()) : at::Tensor();
    auto bits = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) : nullptr;
    };
    propagate_layers<uint16_t>(rp, cp, dv, n, d, num_layers, bits(x), bits(z_a), bits(z_b), out.data_ptr<float>());
    return out.to(at::kBFloat16);
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();   // float16 is widened once
  at::Tensor z_a = num_layers >= 2 ? at::empty({n, d}, xf.options()) : at::Tensor();
  at::Tensor z_b = num_layers >= 3 ? at::empty({n, d}, xf.options()) : at::Tensor();
  propagate_layers<float>(rp, cp, dv, n, d, num_layers, xf.data_ptr<float>(),
                          z_a.defined() ? z_a.data_ptr<float>() : nullptr,
                          z_b.defined() ? z_b.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(glrec, CPU, m) { m.impl("propagate", &propagate_cpu); }

}  // namespace glrec
