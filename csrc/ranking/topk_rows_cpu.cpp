// glrec::topk_rows on CPU: each row's k largest values of a float32 [B, N] tile and their column ids,
// best first. NaN ranks above every number, and ties go by a fixed pseudo-random order of the columns
// (Fibonacci hashing: col * 0x9E3779B1 mod 2^32, smaller first), so no range of item ids is favoured
// where scores tie (a filter scores every cold item alike; by "smaller id first" ml-100k's cold-item
// metrics of a tie-only ranker rose from 0.014 to 0.171). The result is reference.topk_rows's, whatever
// the thread count.
//
// Why not torch.topk: ranking keeps k = 20 of thousands of items per row (metrics.evaluate, the score
// hybrid's weight search), and torch's CPU topk partially sorts every row (about 13 ns an element on
// this repo's 2-core box). Here a row is one pass over a k-slot min-heap of 64-bit keys: a block of
// columns below the smallest kept value, almost all of them once the heap has warmed up, costs one
// vectorised compare.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/cpu_kernels.h"

namespace glrec {
namespace {

constexpr uint32_t kTieHash = 0x9E3779B1u;   // odd: col -> col * kTieHash is a bijection mod 2^32

constexpr uint32_t inverse_mod_2_32(uint32_t a) {   // Newton's iteration: a * inv == 1 (mod 2^32)
  uint32_t inv = a;
  for (int i = 0; i < 5; ++i) inv *= 2u - a * inv;
  return inv;
}
constexpr uint32_t kTieHashInverse = inverse_mod_2_32(kTieHash);
static_assert(kTieHash * kTieHashInverse == 1u, "the tie order must be invertible");

// A (value, column) pair as one unsigned 64-bit key that orders like the ranking: the value's bits
// mapped to an unsigned int that orders as the floats do (NaN above +inf, -0 as +0), then the column's
// tie rank complemented (a smaller hash ranks first). Heap work is then one integer compare per step.
inline uint64_t encode(float v, int64_t col) {
  uint32_t b;
  if (v == 0.f) v = 0.f;
  std::memcpy(&b, &v, sizeof b);
  const uint32_t key = std::isnan(v) ? 0xffffffffu : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~(static_cast<uint32_t>(col) * kTieHash));
}

inline float decode_value(uint64_t c) {
  const uint32_t key = static_cast<uint32_t>(c >> 32);
  if (key == 0xffffffffu) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline int64_t decode_column(uint64_t c) {
  return static_cast<uint32_t>(~static_cast<uint32_t>(c) * kTieHashInverse);
}

// Restore the min-heap below position p (heap[0]: the kept key that ranks last).
inline void sift_down(uint64_t* heap, int64_t k, int64_t p) {
  const uint64_t x = heap[p];
  for (;;) {
    int64_t c = 2 * p + 1;
    if (c >= k) break;
    if (c + 1 < k && heap[c + 1] < heap[c]) ++c;
    if (x <= heap[c]) break;
    heap[p] = heap[c];
    p = c;
  }
  heap[p] = x;
}

GLREC_CLONES
void row_topk(const float* x, int64_t n, int64_t k, uint64_t* heap, float* out_v, int64_t* out_i) {
  for (int64_t j = 0; j < k; ++j) heap[j] = encode(x[j], j);
  for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(heap, k, p);
  // A later column can enter only with a value at least the last kept one's, or as a NaN (an equal
  // value enters when its tie rank is smaller: the 64-bit key decides). Blocks of 32 columns are
  // screened with one vectorisable test, so a block with no candidate is a few instructions.
  constexpr int64_t kBlock = 32;
  float last = decode_value(heap[0]);
  int64_t j = k;
  while (j < n) {
    const int64_t end = std::min(n, j + kBlock);
    int any = 0;
    if (end - j == kBlock) {
      const float* xb = x + j;
      for (int t = 0; t < kBlock; ++t) any |= static_cast<int>(xb[t] >= last) | static_cast<int>(xb[t] != xb[t]);
    } else {
      any = 1;
    }
    if (any) {
      for (int64_t t = j; t < end; ++t) {
        if (!(x[t] >= last) && !std::isnan(x[t])) continue;
        const uint64_t c = encode(x[t], t);
        if (c > heap[0]) {
          heap[0] = c;
          sift_down(heap, k, 0);
          last = decode_value(heap[0]);
        }
      }
    }
    j = end;
  }
  std::sort(heap, heap + k, std::greater<uint64_t>());
  for (int64_t r = 0; r < k; ++r) {
    out_v[r] = decode_value(heap[r]);
    out_i[r] = decode_column(heap[r]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& x, int64_t k) {
  constexpr const char* op = "glrec::topk_rows";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  (x.stride(1) == 1 || x.size(1) <= 1),
              op, ": x must be a 2-d float32 CPU tensor with contiguous rows (a column slice of a tile is fine), got ",
              x.scalar_type(), " of shape ", x.sizes(), " and strides ", x.strides());
  const int64_t b = x.size(0), n = x.size(1), row_stride = x.stride(0);
  TORCH_CHECK(k >= 0 && k <= n, op, ": k must be in [0, ", n, "] (the row length), got ", k);
  TORCH_CHECK(n < (int64_t{1} << 32), op, ": rows of at most 2^32 - 1 columns, got ", n);
  at::Tensor values = at::empty({b, k}, x.options());
  at::Tensor indices = at::empty({b, k}, x.options().dtype(at::kLong));
  if (b == 0 || k == 0) return {values, indices};
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, b, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> heap(k);
    for (int64_t r = r0; r < r1; ++r) row_topk(xp + r * row_stride, n, k, heap.data(), vp + r * k, ip + r * k);
  });
  return {values, indices};
}

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("topk_rows", &topk_rows_cpu);
}

}  // namespace glrec
