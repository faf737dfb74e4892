// glrec::gram_rows on CPU: for a batch of rows u of a sparse matrix R [U, I] (CSR rowptr, col, val) and a
// matrix T [I, U] (CSR t_rowptr, t_col, t_val; for a graph filter T = R^T):
//
//   out[b, out_index[j]] = sum_{i in pattern(R[rows[b]])} sum_v T[i, v] R[v, j]       out: [B, I] float32
//
// i.e. the row's 0/1 pattern times T R. With R = D_U^-1/2 R D_I^-1/2 and T = R^T this is the linear graph
// filter r P~ (models/filters.py), the first (and for GF-CF the only) product a user's scores need.
// torch's CSR x dense product computes it as R^T (R X) on a dense [I, B] block X that is almost all
// zeros, so it touches every edge of R twice for every batch column (2 * nnz * B multiply-adds); here
// each row walks only its two-hop neighbourhood (Gustavson): the row's items' users accumulated in a
// per-thread dense buffer over U, then those users' rows scattered into the output row. out_index
// permutes the output's columns (metrics.evaluate's context-contiguous order) at no extra pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

void check_float_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == n,
              op, ": ", name, " must be a contiguous 1-d float32 CPU tensor of ", n, " values, got ", t.scalar_type(),
              " of shape ", t.sizes());
}

}  // namespace

at::Tensor gram_rows_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
                         const at::Tensor& t_rowptr, const at::Tensor& t_col, const at::Tensor& t_val,
                         const at::Tensor& rows, const at::Tensor& out_index) {
  constexpr const char* op = "glrec::gram_rows";
  const int64_t num_u = rowptr.numel() - 1, num_i = t_rowptr.numel() - 1;
  TORCH_CHECK(num_u >= 0 && num_i >= 0, op, ": rowptr and t_rowptr must have at least one entry");
  check_csr(op, "rowptr/col (R)", rowptr, col, num_u, num_i);
  check_csr(op, "t_rowptr/t_col (T)", t_rowptr, t_col, num_i, num_u);
  check_float_vector(op, "val", val, col.numel());
  check_float_vector(op, "t_val", t_val, t_col.numel());
  for (const auto& [name, t, n] : {std::tuple<const char*, const at::Tensor*, int64_t>{"rows", &rows, -1},
                                   {"out_index", &out_index, num_i}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    (n < 0 || t->numel() == n),
                op, ": ", name, " must be a contiguous 1-d int64 CPU tensor", n < 0 ? "" : " with one entry per column of R",
                ", got ", t->scalar_type(), " of shape ", t->sizes());
  }
  const int64_t nb = rows.numel();
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(rw[b] >= 0 && rw[b] < num_u, op, ": rows[", b, "] = ", rw[b], " is outside [0, ", num_u, ")");
  }
  const int64_t* oi = out_index.data_ptr<int64_t>();
  {
    std::vector<char> seen(num_i, 0);
    for (int64_t j = 0; j < num_i; ++j) {
      TORCH_CHECK(oi[j] >= 0 && oi[j] < num_i && !seen[oi[j]], op, ": out_index must be a permutation of [0, ", num_i,
                  "), entry ", j, " is ", oi[j]);
      seen[oi[j]] = 1;
    }
  }
  at::Tensor out = at::zeros({nb, num_i}, val.options());
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  const float* vp = val.data_ptr<float>();
  const int64_t* trp = t_rowptr.data_ptr<int64_t>();
  const int64_t* tcp = t_col.data_ptr<int64_t>();
  const float* tvp = t_val.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(num_u, 0.f);       // the row's weight on each user, over the touched ones
    std::vector<char> mark(num_u, 0);
    std::vector<int64_t> touched;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t u = rw[b];
      touched.clear();
      for (int64_t e = rp[u]; e < rp[u + 1]; ++e) {
        const int64_t i = cp[e];
        for (int64_t f = trp[i]; f < trp[i + 1]; ++f) {
          const int64_t v = tcp[f];
          if (!mark[v]) { mark[v] = 1; touched.push_back(v); }
          acc[v] += tvp[f];
        }
      }
      float* o = op_ + b * num_i;
      for (const int64_t v : touched) {
        const float m = acc[v];
        acc[v] = 0.f;
        mark[v] = 0;
        for (int64_t g = rp[v]; g < rp[v + 1]; ++g) o[oi[cp[g]]] += m * vp[g];
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("gram_rows", &gram_rows_cpu);
}

}  // namespace glrec
