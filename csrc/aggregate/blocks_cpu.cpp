// glrec::block_mean_concat on CPU: the input of a GraphSAGE mean-aggregator layer on a sampled block,
//
//   out[i] = [ h[i] | (1 / c_i) sum_{e in row i} h[col[e]] ]      i < n,  out: [n, 2d] float32
//
// (c_i = the row's edge count; a row without edges gets a zero mean), so the layer is one GEMM of
// out with [W_self | W_neigh]. Its backward, through the block's transposed CSR (t_rowptr, t_col):
//
//   grad_h[j] = (j < n ? grad[j, :d] : 0) + sum_{i : j in row i} grad[i, d:] / c_i       grad_h: [m, d]
//
// The torch form (h[:n], a sparse product, a cat; backward: a zero-filled [m, d] gradient for the
// slice, a zero-filled sparse-product output, an add, and per-edge value arrays 1 / c_i in both
// orders) makes five passes over [m, d] tables per layer and two over [edges] arrays; here each
// output row is written once, the mean's scale comes from rowptr, and no value array exists.
// h and grad in float32 or bfloat16; `out_dtype` (default: the input's) picks the result's, float32 or
// bfloat16. Sums are float32 whatever the storage (ops.block_mean_concat sends other dtypes to
// reference.block_mean_concat).
//
// Optional row maps, for a first layer that reads the ID table itself (ops.table_mean_concat):
// with `index` (the table row of each of the block's m local rows), h is the table, `col` lists each
// edge's neighbour by its table row (index[local column], so the kernel reads no index per edge) and
// the self half is h[index[i]]: no [m, d] copy of the block's ID rows is made. The backward's `order`
// writes the gradient of local row order[s] as output row s (the optimiser's sorted row order, so no
// reordering pass over [m, d] either).
//
// glrec::csr_transpose: the transposed CSR of a block (t_rowptr, t_col = the row of each edge listed by
// column) and `order` (the edges' positions in that listing: argsort(col, stable=True)) by one
// counting sort, O(edges + columns) on one thread: it runs on the sampler's worker thread beside the
// training step, where torch's stable argsort of ~1M column ids cost ~36 ms and the gather ~12 ms.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

// Rows are gathered at random from tables far larger than the caches, so each read waits on memory
// unless it was asked for ahead: kPrefetch edges ahead (through row boundaries, so a row's first
// neighbours are not cold) and, with a row map, the self row kPrefetchRows rows ahead.
constexpr int64_t kPrefetch = 16;
constexpr int64_t kPrefetchRows = 4;

// Element access for float32 and bfloat16 rows (bfloat16 held as its 16 bits: the shifts vectorise).
inline float load(const float* p, int64_t c) { return p[c]; }
inline float load(const uint16_t* p, int64_t c) {
  const uint32_t u = static_cast<uint32_t>(p[c]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, int64_t c, float v) { p[c] = v; }
inline void store(uint16_t* p, int64_t c, float v) {   // round to nearest even, as torch's conversion
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {   // NaN stays NaN (rounding could carry it into infinity)
    p[c] = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  p[c] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// D > 0: the width at compile time, so the row's sum stays in registers across its edges (d = 64 is
// GraphSAGE's default); D = 0: any width d, the sum in a buffer.
template <int D, typename In, typename Out>
GLREC_CLONES
void concat_mean_rows(int64_t r0, int64_t r1, int64_t d, const int64_t* rp, const int64_t* cp, const int64_t* idx,
                      const In* h, Out* out) {
  const int64_t w = D > 0 ? D : d;
  std::vector<float> buf(D > 0 ? 0 : d);
  float local[D > 0 ? D : 1];
  float* acc = D > 0 ? local : buf.data();
  const int64_t last_edge = rp[r1];
  for (int64_t i = r0; i < r1; ++i) {
    if (i + kPrefetchRows < r1) prefetch_row(h + (idx ? idx[i + kPrefetchRows] : i + kPrefetchRows) * w, w);
    Out* self = out + i * 2 * w;
    const In* hi = h + (idx ? idx[i] : i) * w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) { store(self, c, load(hi, c)); acc[c] = 0.f; }
    const int64_t e0 = rp[i], e1 = rp[i + 1];
    for (int64_t e = e0; e < e1; ++e) {
      if (e + kPrefetch < last_edge) prefetch_row(h + cp[e + kPrefetch] * w, w);   // across rows too
      const In* row = h + cp[e] * w;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) acc[c] += load(row, c);
    }
    const float inv = e1 > e0 ? 1.f / static_cast<float>(e1 - e0) : 0.f;
    Out* mean = self + w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) store(mean, c, acc[c] * inv);
  }
}

template <int D, typename G, typename Out>
GLREC_CLONES
void concat_mean_backward_rows(int64_t j0, int64_t j1, int64_t d, int64_t n, const int64_t* rp, const int64_t* trp,
                               const int64_t* tcp, const int64_t* dest, const G* grad, Out* gh) {
  const int64_t w = D > 0 ? D : d;
  std::vector<float> buf(D > 0 ? 0 : d);
  float local[D > 0 ? D : 1];
  float* acc = D > 0 ? local : buf.data();
  const int64_t last_edge = trp[j1];
  for (int64_t j = j0; j < j1; ++j) {   // local order: t_col streams; the output row is dest[j]
    if (j < n) {
      const G* g = grad + j * 2 * w;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) acc[c] = load(g, c);
    } else {
      std::fill(acc, acc + w, 0.f);
    }
    const int64_t e0 = trp[j], e1 = trp[j + 1];
    for (int64_t e = e0; e < e1; ++e) {
      if (e + kPrefetch < last_edge) prefetch_row(grad + (tcp[e + kPrefetch] * 2 + 1) * w, w);   // across columns too
      const int64_t i = tcp[e];
      const float s = 1.f / static_cast<float>(rp[i + 1] - rp[i]);   // >= 1 edge: row i lists j
      const G* g = grad + (i * 2 + 1) * w;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) acc[c] += s * load(g, c);
    }
    Out* o = gh + (dest ? dest[j] : j) * w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) store(o, c, acc[c]);
  }
}

void check_float_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-d tensor, got shape ",
              t.sizes());
}

at::ScalarType out_type(const char* op, const c10::optional<at::ScalarType>& out_dtype, at::ScalarType fallback) {
  const at::ScalarType t = out_dtype.value_or(fallback);
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, op, ": out_dtype must be float32 or bfloat16, got ", t);
  return t;
}

// Calls f(In{}, Out{}) with the kernels' element types for the two tensors' dtypes (float32: float,
// bfloat16: its 16 bits as uint16_t).
template <typename F>
void with_elements(at::ScalarType in, at::ScalarType out, F f) {
  auto with_out = [&](auto in_tag) {
    if (out == at::kFloat) f(in_tag, float{});
    else f(in_tag, uint16_t{});
  };
  if (in == at::kFloat) with_out(float{});
  else with_out(uint16_t{});
}

template <typename F>
void for_row_blocks(const int64_t* rp, int64_t rows, F body) {
  const auto bounds = balanced_row_blocks(rp, rows, std::max<int64_t>(1, at::get_num_threads() * 16));
  const int64_t num_blocks = static_cast<int64_t>(bounds.size()) - 1;
  parallel_chunks(num_blocks, [&](int64_t b) { body(bounds[b], bounds[b + 1]); });
}

}  // namespace

// Checks that t is a contiguous 1-d int64 CPU tensor of `len` entries, each in [0, bound); with
// `permutation`, also that no entry repeats (then bound == len makes it a permutation of [0, len)).
static void check_row_map(const char* op, const char* name, const at::Tensor& t, int64_t len, int64_t bound,
                   bool permutation) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), op, ": ",
              name, " must be a contiguous 1-d int64 CPU tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.numel() == len, op, ": ", name, " must have ", len, " entries, got ", t.numel());
  const int64_t* p = t.data_ptr<int64_t>();
  std::vector<bool> seen(permutation ? bound : 0, false);
  for (int64_t k = 0; k < len; ++k) {
    TORCH_CHECK(p[k] >= 0 && p[k] < bound, op, ": ", name, "[", k, "] = ", p[k], " is out of range [0, ", bound, ")");
    if (permutation) {
      TORCH_CHECK(!seen[p[k]], op, ": ", name, " must be a permutation; ", p[k], " appears twice");
      seen[p[k]] = true;
    }
  }
}

at::Tensor block_mean_concat_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& t_rowptr,
                                 const at::Tensor& t_col, const at::Tensor& h, const c10::optional<at::Tensor>& index,
                                 c10::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "glrec::block_mean_concat";
  check_float_matrix(op, "h", h);
  const bool mapped = index.has_value() && index->defined();
  if (mapped) check_row_map(op, "index", *index, index->numel(), h.size(0), false);
  const int64_t m = mapped ? index->numel() : h.size(0), d = h.size(1), n = rowptr.numel() - 1;
  TORCH_CHECK(n >= 0 && n <= m, op, ": rowptr must have between 1 and ", mapped ? "index.numel()" : "h.size(0)",
              " + 1 = ", m + 1, " entries, got ", rowptr.numel());
  const int64_t col_bound = mapped ? h.size(0) : m;   // mapped: col holds table rows
  check_csr(op, "rowptr/col", rowptr, col, n, col_bound);   // (t_rowptr, t_col): read by the backward, checked there
  at::Tensor out = at::empty({n, 2 * d}, h.options().dtype(out_type(op, out_dtype, h.scalar_type())));
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  const int64_t* ip = mapped ? index->data_ptr<int64_t>() : nullptr;
  with_elements(h.scalar_type(), out.scalar_type(), [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    const In* hp = static_cast<const In*>(h.data_ptr());
    Out* op_ = static_cast<Out*>(out.data_ptr());
    for_row_blocks(rp, n, [&](int64_t r0, int64_t r1) {
      if (d == 64) concat_mean_rows<64>(r0, r1, d, rp, cp, ip, hp, op_);
      else concat_mean_rows<0>(r0, r1, d, rp, cp, ip, hp, op_);
    });
  });
  return out;
}

at::Tensor block_mean_concat_backward_cpu(const at::Tensor& rowptr, const at::Tensor& t_rowptr,
                                          const at::Tensor& t_col, const at::Tensor& grad,
                                          const c10::optional<at::Tensor>& order,
                                          c10::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "glrec::block_mean_concat_backward";
  check_float_matrix(op, "grad", grad);
  const int64_t n = rowptr.numel() - 1, m = t_rowptr.numel() - 1;
  TORCH_CHECK(grad.size(0) == n && grad.size(1) % 2 == 0, op, ": grad must be [", n, ", 2d], got ", grad.sizes());
  const int64_t d = grad.size(1) / 2;
  TORCH_CHECK(m >= n, op, ": t_rowptr must have at least rowptr.numel() = ", n + 1, " entries, got ", m + 1);
  check_csr(op, "t_rowptr/t_col", t_rowptr, t_col, m, n);
  // Only rowptr's counts are read here (the weights 1 / c_i); each listed row has an edge.
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.dim() == 1 && rowptr.is_contiguous() &&
                  rowptr.data_ptr<int64_t>()[0] == 0 && rowptr.data_ptr<int64_t>()[n] == t_col.numel(),
              op, ": rowptr must be contiguous int64 from 0 to the ", t_col.numel(), " edges of t_col");
  const bool ordered = order.has_value() && order->defined();
  std::vector<int64_t> dest(ordered ? m : 0);   // dest[order[s]] = s: where local row j's gradient goes
  if (ordered) {
    check_row_map(op, "order", *order, m, m, true);
    const int64_t* ord = order->data_ptr<int64_t>();
    for (int64_t s = 0; s < m; ++s) dest[ord[s]] = s;
  }
  const int64_t* dp = ordered ? dest.data() : nullptr;
  at::Tensor gh = at::empty({m, d}, grad.options().dtype(out_type(op, out_dtype, grad.scalar_type())));
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* trp = t_rowptr.data_ptr<int64_t>();
  const int64_t* tcp = t_col.data_ptr<int64_t>();
  with_elements(grad.scalar_type(), gh.scalar_type(), [&](auto g_tag, auto out_tag) {
    using G = decltype(g_tag);
    using Out = decltype(out_tag);
    const G* gp = static_cast<const G*>(grad.data_ptr());
    Out* hp = static_cast<Out*>(gh.data_ptr());
    for_row_blocks(trp, m, [&](int64_t j0, int64_t j1) {
      if (d == 64) concat_mean_backward_rows<64>(j0, j1, d, n, rp, trp, tcp, dp, gp, hp);
      else concat_mean_backward_rows<0>(j0, j1, d, n, rp, trp, tcp, dp, gp, hp);
    });
  });
  return gh;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& rowptr, const at::Tensor& col,
                                                                 int64_t num_cols) {
  constexpr const char* op = "glrec::csr_transpose";
  TORCH_CHECK(num_cols >= 0, op, ": num_cols must be >= 0, got ", num_cols);
  const int64_t n = rowptr.numel() - 1;
  TORCH_CHECK(n >= 0, op, ": rowptr must have at least one entry");
  check_csr(op, "rowptr/col", rowptr, col, n, num_cols);
  const int64_t nnz = col.numel();
  const auto opts = col.options();
  at::Tensor t_rowptr = at::zeros({num_cols + 1}, opts);
  at::Tensor t_col = at::empty({nnz}, opts);
  at::Tensor order = at::empty({nnz}, opts);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  int64_t* trp = t_rowptr.data_ptr<int64_t>();
  int64_t* tc = t_col.data_ptr<int64_t>();
  int64_t* ord = order.data_ptr<int64_t>();
  for (int64_t e = 0; e < nnz; ++e) ++trp[cp[e] + 1];
  for (int64_t c = 0; c < num_cols; ++c) trp[c + 1] += trp[c];
  std::vector<int64_t> next(trp, trp + num_cols);   // the next free slot of each column
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
      const int64_t slot = next[cp[e]]++;
      tc[slot] = r;
      ord[slot] = e;
    }
  }
  return {t_rowptr, t_col, order};
}

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("csr_transpose", &csr_transpose_cpu);
  m.impl("block_mean_concat", &block_mean_concat_cpu);
  m.impl("block_mean_concat_backward", &block_mean_concat_backward_cpu);
}

}  // namespace glrec
