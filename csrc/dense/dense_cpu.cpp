// glrec::dense_layer on CPU: y = x W^T + b, then tanh when asked (a GraphSAGE layer's GEMM and its
// activation in one pass), and its backward, for float32.
//
// Why a kernel of our own: the layer's GEMMs are tall and thin (x: [~100k, 128], W: [64, 128] at
// d = 64) and torch's float32 path (MKL on this project's AMD EPYC dev box) runs them at ~45
// GFLOP/s on two cores; the backward's dX = dZ W takes twice the forward's time. The weights fit in
// L1, so each thread streams its rows once through a 4-row x 64-column register tile (16 vector
// accumulators) and applies bias and tanh before the tile leaves the registers.
//
// Numerics: products summed in float32 in k order; tanh from a range-reduced exp (|x| >= 0.5) or its
// odd Taylor series (|x| < 0.5), within a few float32 ulps of std::tanh (tests/test_ops_dense.py).
// Shapes: in and out features multiples of 16 (ops.dense_layer sends anything else to the reference).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/cpu_kernels.h"

// The vector type below is passed between always-inline helpers only, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace glrec {
namespace {

// 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones (GCC lowers the vector type to the
// clone's ISA). aligned(4): loads and stores from any float address.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

constexpr int kRows = 4;      // rows in a register tile
constexpr int kVecs = 4;      // 16-float vectors across a full tile (64 columns)
constexpr int64_t kSlab = 32; // rows per slab of the backward
constexpr int64_t kChunkRows = 512;      // rows per chunk of the forward's thread split
constexpr int64_t kBackwardBlocks = 16;  // the backward's row blocks, each with its dW^T / db partial

#define GLREC_INLINE inline __attribute__((always_inline))

GLREC_INLINE v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
GLREC_INLINE void store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// exp(y) for y <= 0: y = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor series
// (truncation < 1.2e-7 relative), 2^n from the exponent bits. y below -87 is taken as -87.
GLREC_INLINE v16 exp_nonpos(v16 y) {
  const v16 lo = v16{} - 87.0f;
  y = y < lo ? lo : y;
  const v16 t = y * 1.44269504f - 0.5f;
  const v16i n = __builtin_convertvector(t, v16i);   // truncation toward 0: round(y log2 e) for y <= 0
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = (y - nf * 0.693145752f) - nf * 1.42860677e-06f;   // ln 2 in two parts
  v16 p = r * (1.0f / 720) + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v16i bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

GLREC_INLINE v16 tanh16(v16 x) {
  v16i xb;
  std::memcpy(&xb, &x, sizeof(x));
  const v16i sign = xb & static_cast<int32_t>(0x80000000);
  const v16i ab = xb & 0x7fffffff;
  v16 a;
  std::memcpy(&a, &ab, sizeof(a));
  const v16 e = exp_nonpos(a * -2.0f);
  const v16 big = (1.0f - e) / (1.0f + e);
  const v16 a2 = a * a;   // odd Taylor series of tanh through a^13 (next term < 5e-8 at 0.5)
  v16 s = a2 * (21844.0f / 6081075) - (1382.0f / 155925);
  s = s * a2 + (62.0f / 2835);
  s = s * a2 - (17.0f / 315);
  s = s * a2 + (2.0f / 15);
  s = s * a2 - (1.0f / 3);
  const v16 small = a + a * a2 * s;
  const v16 mag = a < 0.5f ? small : big;
  v16i mb;
  std::memcpy(&mb, &mag, sizeof(mag));
  mb |= sign;
  v16 out;
  std::memcpy(&out, &mb, sizeof(out));
  return out;
}

// acc[r][v] = sum_t A[r * sr + t * st] * B[t * ldb + 16 v .. 16 v + 15] for r < R, t < kdim.
template <int R, int V>
GLREC_INLINE void tile(const float* A, int64_t sr, int64_t st, const float* B, int64_t ldb, int64_t kdim,
                       v16 (&acc)[R][V]) {
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v16{};
  for (int64_t t = 0; t < kdim; ++t) {
    const float* b = B + t * ldb;
    v16 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(b + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * sr + t * st];
      for (int v = 0; v < V; ++v) acc[r][v] += a * bv[v];
    }
  }
}

// C[i, :] = act(sum_t A[i, t] B[t, :] + bias) for rows [lo, hi) of a row-major A [*, kdim] and
// B [kdim, n]; C row-major [*, n]. bias may be null.
template <int R, int V>
GLREC_INLINE void rows_tile(const float* A, int64_t kdim, const float* B, int64_t n, const float* bias, bool act,
                            float* C, int64_t i, int64_t c0) {
  v16 acc[R][V];
  tile<R, V>(A + i * kdim, kdim, 1, B + c0, n, kdim, acc);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      v16 y = acc[r][v];
      if (bias) y += load(bias + c0 + 16 * v);
      if (act) y = tanh16(y);
      store(C + (i + r) * n + c0 + 16 * v, y);
    }
  }
}

GLREC_INLINE void gemm_rows(const float* A, int64_t kdim, const float* B, int64_t n, const float* bias, bool act,
                            float* C, int64_t lo, int64_t hi) {
  int64_t i = lo;
  for (; i + kRows <= hi; i += kRows) {
    int64_t c0 = 0;
    for (; c0 + 16 * kVecs <= n; c0 += 16 * kVecs) rows_tile<kRows, kVecs>(A, kdim, B, n, bias, act, C, i, c0);
    for (; c0 < n; c0 += 16) rows_tile<kRows, 1>(A, kdim, B, n, bias, act, C, i, c0);
  }
  for (; i < hi; ++i) {
    int64_t c0 = 0;
    for (; c0 + 16 * kVecs <= n; c0 += 16 * kVecs) rows_tile<1, kVecs>(A, kdim, B, n, bias, act, C, i, c0);
    for (; c0 < n; c0 += 16) rows_tile<1, 1>(A, kdim, B, n, bias, act, C, i, c0);
  }
}

GLREC_CLONES void forward_rows(const float* X, int64_t kdim, const float* Wt, int64_t n, const float* bias, bool act,
                               float* Y, int64_t lo, int64_t hi) {
  gemm_rows(X, kdim, Wt, n, bias, act, Y, lo, hi);
}

// The backward over rows [lo, hi), one slab of kSlab rows at a time so that the slab's dZ (kSlab x n
// floats, in `dz`), X rows and dX rows stay in L1 between its three uses:
//   dZ = grad * (1 - y^2) (tanh; grad itself otherwise);  dX[slab] = dZ W;
//   dW^T += X[slab]^T dZ (into the block's partial `dwt` [kdim, n]);  db += column sums of dZ (double).
// Each slab's sums are added to the partials once, which also keeps the float32 sums short; db is
// kept in double since a bias gradient often sums ~100k terms of one sign.
GLREC_CLONES void backward_rows(const float* G, const float* Y, bool act, const float* X, int64_t kdim, const float* W,
                                int64_t n, float* DX, float* dwt, double* db, float* dz, int64_t lo, int64_t hi) {
  for (int64_t s = lo; s < hi; s += kSlab) {
    const int64_t len = std::min(kSlab, hi - s);
    const float* D = G + s * n;
    if (act) {
      const float* g = G + s * n;
      const float* y = Y + s * n;
      for (int64_t e = 0; e < len * n; e += 16) {
        const v16 yv = load(y + e);
        store(dz + e, load(g + e) * (1.0f - yv * yv));
      }
      D = dz;
    }
    gemm_rows(D, n, W, kdim, nullptr, false, DX + s * kdim, 0, len);
    for (int64_t k0 = 0; k0 < kdim; k0 += kRows) {
      const float* A = X + s * kdim + k0;     // A[r][t] = X[s + t, k0 + r]
      int64_t c0 = 0;
      for (; c0 + 16 * kVecs <= n; c0 += 16 * kVecs) {
        v16 acc[kRows][kVecs];
        tile<kRows, kVecs>(A, 1, kdim, D + c0, n, len, acc);
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < kVecs; ++v) {
            float* o = dwt + (k0 + r) * n + c0 + 16 * v;
            store(o, load(o) + acc[r][v]);
          }
      }
      for (; c0 < n; c0 += 16) {
        v16 acc[kRows][1];
        tile<kRows, 1>(A, 1, kdim, D + c0, n, len, acc);
        for (int r = 0; r < kRows; ++r) {
          float* o = dwt + (k0 + r) * n + c0;
          store(o, load(o) + acc[r][0]);
        }
      }
    }
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      v16 sum{};
      for (int64_t t = 0; t < len; ++t) sum += load(D + t * n + c0);
      for (int j = 0; j < 16; ++j) db[c0 + j] += sum[j];
    }
  }
}

void check_dense(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": expected float32 x and weight, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), op,
              ": expected x [m, k] and weight [n, k], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) % 16 == 0 && weight.size(0) % 16 == 0, op,
              ": in and out features must be multiples of 16, got ", x.size(1), " and ", weight.size(0));
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

at::Tensor dense_layer_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           bool act) {
  constexpr const char* op = "glrec::dense_layer";
  check_dense(op, x, weight);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.numel() == n, op,
                ": bias must be float32 [", n, "], got ", b.scalar_type(), " ", b.sizes());
  }
  const at::Tensor wt = weight.t().contiguous();   // [k, n]: each t of the tile reads one row
  at::Tensor y = at::empty({m, n}, x.options());
  const float* X = x.data_ptr<float>();
  const float* Wt = wt.data_ptr<float>();
  const float* B = b.defined() ? b.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  parallel_chunks((m + kChunkRows - 1) / kChunkRows, [&](int64_t c) {
    forward_rows(X, k, Wt, n, B, act, Y, c * kChunkRows, std::min(m, (c + 1) * kChunkRows));
  });
  return y;
}

// (dx, dweight, dbias) of dense_layer for the upstream gradient grad [m, n]; y: its output (read only
// when act, for tanh's derivative 1 - y^2).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_layer_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& weight, const at::Tensor& y,
                                                                        bool act) {
  constexpr const char* op = "glrec::dense_layer_backward";
  check_dense(op, x, weight);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == m &&
                  grad.size(1) == n,
              op, ": grad must be contiguous float32 [", m, ", ", n, "], got ", grad.scalar_type(), " ", grad.sizes());
  if (act) {
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == grad.sizes(), op,
                ": y must be the forward's contiguous float32 output [", m, ", ", n, "]");
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor dx = at::empty({m, k}, x.options());
  // A fixed number of row blocks, each with its partial dW^T and db, added up in block order: the
  // result does not depend on the thread count or on which thread ran a block.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(kBackwardBlocks, (m + kChunkRows - 1) / kChunkRows));
  at::Tensor dwt_part = at::zeros({blocks, k, n}, x.options());
  at::Tensor db_part = at::zeros({blocks, n}, x.options().dtype(at::kDouble));
  at::Tensor dz_slabs = at::empty({blocks, kSlab * n}, x.options());
  const float* G = grad.data_ptr<float>();
  const float* Y = act ? y.data_ptr<float>() : nullptr;
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* DX = dx.data_ptr<float>();
  float* PW = dwt_part.data_ptr<float>();
  double* PB = db_part.data_ptr<double>();
  float* DZ = dz_slabs.data_ptr<float>();
  parallel_chunks(blocks, [&](int64_t bl) {
    backward_rows(G, Y, act, X, k, W, n, DX, PW + bl * k * n, PB + bl * n, DZ + bl * kSlab * n, m * bl / blocks,
                  m * (bl + 1) / blocks);
  });
  at::Tensor dw = dwt_part.sum(0).t().contiguous();
  at::Tensor db = db_part.sum(0).to(at::kFloat);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("dense_layer", &dense_layer_cpu);
  m.impl("dense_layer_backward", &dense_layer_backward_cpu);
}

}  // namespace glrec
