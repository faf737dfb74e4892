// glrec::row_adam_ on CPU: one row-sparse Adam step (optim.RowAdam, "lazy Adam") in a single pass.
//
// For every listed row r (unique: the caller coalesces the gradient first) and column j:
//   m = m + (1 - beta1) * (g - m);   v = v * beta2 + (1 - beta2) * g * g
//   p = p - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
// the arithmetic of reference.row_adam_ in the same order. The torch form gathers, updates and
// scatters the moment rows in ~12 passes over [rows, d] temporaries (at a GraphSAGE batch of 8,192
// on 20M interactions, ~300k rows: 77 MB each); here each row's p/m/v are read and written once.
// float32 tables only (ops.row_adam_ sends anything else to the reference).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

constexpr int64_t kPrefetchRows = 4;

void row_adam_cpu(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& rows,
                  const at::Tensor& grad, double step_size, double beta1, double beta2, double eps,
                  double bc2_sqrt) {
  const at::Tensor* tables[] = {&param, &exp_avg, &exp_avg_sq, &grad};
  for (const at::Tensor* t : tables) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "row_adam_: expected contiguous float32 tables and gradient rows");
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "row_adam_: rows must be 1-d int64");
  TORCH_CHECK(param.dim() >= 1 && exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(),
              "row_adam_: exp_avg / exp_avg_sq must have the parameter's shape");
  const int64_t n = rows.numel();
  const int64_t num_rows = param.size(0);
  const int64_t d = num_rows ? param.numel() / num_rows : 0;
  TORCH_CHECK(grad.numel() == n * d, "row_adam_: grad must hold ", n, " rows of ", d, " values");
  const auto rows_c = rows.contiguous();
  const int64_t* R = rows_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(R[i] >= 0 && R[i] < num_rows, "row_adam_: row id ", R[i], " out of range [0, ", num_rows, ")");
  }
  float* P = param.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  const float b2 = static_cast<float>(beta2), w1 = static_cast<float>(1.0 - beta1),
              w2 = static_cast<float>(1.0 - beta2), e = static_cast<float>(eps),
              bc2 = static_cast<float>(bc2_sqrt), ss = static_cast<float>(-step_size);
  constexpr int64_t kChunkRows = 1024;
  parallel_chunks((n + kChunkRows - 1) / kChunkRows, [&](int64_t c) {
    const int64_t lo = c * kChunkRows, hi = std::min(n, lo + kChunkRows);
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kPrefetchRows < hi) {   // the sorted rows skip about: ask for the next ones ahead
        const int64_t r = R[i + kPrefetchRows] * d;
        prefetch_row<true>(P + r, d);
        prefetch_row<true>(M + r, d);
        prefetch_row<true>(V + r, d);
      }
      float* p = P + R[i] * d;
      float* m = M + R[i] * d;
      float* v = V + R[i] * d;
      const float* g = G + i * d;
      for (int64_t j = 0; j < d; ++j) {
        const float gj = g[j];
        const float mj = m[j] + w1 * (gj - m[j]);
        const float vj = v[j] * b2 + w2 * gj * gj;
        m[j] = mj;
        v[j] = vj;
        p[j] = p[j] + ss * (mj / (std::sqrt(vj) / bc2 + e));
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("row_adam_", &row_adam_cpu);
}

}  // namespace glrec
