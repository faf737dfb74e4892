// Shared by the CPU kernels: the ISA dispatch attribute, row prefetch, the equal-work row split of a
// CSR, CSR checks, and the chunk queue that splits a kernel's work over threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// Row kernels are compiled for AVX-512 / AVX2 / baseline with runtime dispatch (GCC target_clones),
// since setup.py builds for the baseline ISA (16-byte vectors).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(GLREC_NO_TARGET_CLONES)  // setup.py defines it where the toolchain lacks ifunc
#define GLREC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLREC_CLONES
#endif

namespace glrec {

// Asks for a row of w elements (a cache line at a time) ahead of its use: rows gathered at random
// from tables far larger than the caches otherwise wait on memory one at a time. kWrite: the row
// will be written too.
template <bool kWrite = false, typename T>
inline void prefetch_row(const T* row, int64_t w) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < w * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, kWrite);
}

// Row-block boundaries of a CSR with about equal work each, row r costing (degree + 1): a power-law
// graph (Gowalla: max degree 1,415, median 13) then splits evenly over at::parallel_for's threads.
inline std::vector<int64_t> balanced_row_blocks(const int64_t* rp, int64_t n, int64_t num_blocks) {
  std::vector<int64_t> bounds{0};
  const int64_t total = rp[n] + n;
  for (int64_t b = 1; b < num_blocks; ++b) {
    const int64_t target = total * b / num_blocks;
    // first row r with rp[r] + r >= target
    int64_t lo = bounds.back(), hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (rp[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    if (lo > bounds.back()) bounds.push_back(lo);
  }
  if (bounds.back() != n) bounds.push_back(n);
  return bounds;
}

// A CSR of `rows` rows over `cols` columns: contiguous int64 on the CPU, rowptr[0] == 0, non-decreasing,
// rowptr[rows] == col.numel(), every col entry in [0, cols). O(rows + edges) integer checks, a small
// fraction of the float work over the same edges: a corrupt CSR raises instead of reading out of bounds.
inline void check_csr(const char* op, const char* name, const at::Tensor& rowptr, const at::Tensor& col, int64_t rows,
                      int64_t cols) {
  for (const at::Tensor* t : {&rowptr, &col}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(), op,
                ": ", name, " must be contiguous 1-d int64 CPU tensors, got ", t->scalar_type(), " of shape ",
                t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(rowptr.numel() == rows + 1, op, ": ", name, ": rowptr must have ", rows + 1, " entries, got ",
              rowptr.numel());
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t nnz = col.numel();
  TORCH_CHECK(rp[0] == 0, op, ": ", name, ": rowptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK(rp[rows] == nnz, op, ": ", name, ": rowptr[-1] must equal col.numel() = ", nnz, ", got ", rp[rows]);
  bool monotone = true;
  for (int64_t i = 0; i < rows; ++i) monotone &= rp[i] <= rp[i + 1];
  TORCH_CHECK(monotone, op, ": ", name, ": rowptr must be non-decreasing");
  const int64_t* cp = col.data_ptr<int64_t>();
  const int64_t bad = at::parallel_reduce(
      0, nnz, 1 << 16, int64_t(0),
      [&](int64_t b, int64_t e, int64_t acc) {
        for (int64_t k = b; k < e; ++k) acc += (cp[k] < 0) | (cp[k] >= cols);
        return acc;
      },
      std::plus<int64_t>());
  TORCH_CHECK(bad == 0, op, ": ", name, ": column ids must lie in [0, ", cols, "), found ", bad, " out of range");
}

// Runs f(0) .. f(num_chunks - 1), on the calling thread plus up to `helpers` threads of ATen's
// inter-op pool, each claiming the next chunk from a shared counter. The caller never waits for a
// helper to *start* -- only for chunks a helper has claimed -- so a helper thread that the OS
// schedules late (another process on the core) costs nothing; at::parallel_for's static split and
// end-of-region barrier wait for every thread. Measured on Gowalla, [10, 10], 1024 seeds, 2
// threads, 300 interleaved calls while other jobs kept this 2-core machine at load ~6: median
// 16.8 ms per call with at::parallel_for vs 7.0 ms here. Which thread runs a chunk never changes
// what the chunk computes, so results do not depend on the thread count.
struct ChunkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;  // only called after a successful claim, i.e. while the caller waits
  std::mutex error_mutex;
  std::exception_ptr error;

  void drain() {
    while (true) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= total) return;
      try {
        fn(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

template <typename F>
void run_chunks(int64_t num_chunks, int64_t helpers, const F& f) {
  if (helpers <= 0 || num_chunks <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < num_chunks; ++c) f(c);
    return;
  }
  // Shared with helpers that may start after this function returned: they then find no chunk
  // to claim and touch nothing but this state.
  auto q = std::make_shared<ChunkQueue>();
  q->total = num_chunks;
  q->fn = [&f](int64_t c) { f(c); };
  for (int64_t h = 0; h < std::min(helpers, num_chunks - 1); ++h) at::launch([q] { q->drain(); });
  q->drain();
  while (q->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
  if (q->error) std::rethrow_exception(q->error);
}

// run_chunks with every thread torch may use: the training kernels' split. A kernel run while the
// sampler's worker thread shares the two cores keeps both busy instead of waiting at the end of a
// static split for the thread the OS set aside.
template <typename F>
void parallel_chunks(int64_t num_chunks, const F& f) {
  run_chunks(num_chunks, at::get_num_threads() - 1, f);
}

}  // namespace glrec
