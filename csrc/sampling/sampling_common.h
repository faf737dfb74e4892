// Shared by the CPU and CUDA neighbour samplers: the counter-based random stream and the
// per-node sample size. Both kernels use exactly these functions, so for a fixed seed the CUDA
// kernel returns the same sample as the CPU kernel, and neither depends on the thread count.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GLREC_HD __host__ __device__ __forceinline__
#else
#define GLREC_HD inline
#endif

namespace glrec {
namespace sampling {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64's output function (Steele et al. 2014): a bijective 64-bit mixer.
GLREC_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The key of node `node`'s stream at hop `hop`: a function of (seed, hop, node) only, never of
// the thread that samples the node -- that is what makes the result thread-count independent.
GLREC_HD uint64_t stream_key(int64_t seed, int64_t hop, int64_t node) {
  uint64_t k = mix64(static_cast<uint64_t>(seed) + kGolden);
  k = mix64(k + static_cast<uint64_t>(hop) * kGolden + 0x632BE59BD9B4E019ULL);
  return mix64(k + static_cast<uint64_t>(node) * kGolden);
}

// Draw number `i` (0-based) of a stream: splitmix64 is counter-based, so draw i is computable
// directly (the CUDA kernel uses this to spread draws with replacement over a warp).
GLREC_HD uint64_t draw(uint64_t key, int64_t i) {
  return mix64(key + static_cast<uint64_t>(i + 1) * kGolden);
}

// Uniform integer in [0, n) from 64 random bits (Lemire's multiply-shift; the bias is below
// n / 2^64, i.e. < 2^-30 for any CSR row that fits in memory).
GLREC_HD int64_t bounded(uint64_t r, int64_t n) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__umul64hi(r, static_cast<uint64_t>(n)));
#elif defined(__SIZEOF_INT128__)
  return static_cast<int64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(n)) >> 64);
#else  // no 128-bit integers (MSVC): the high word of the 64 x 64 product from 32-bit halves
  const uint64_t m = static_cast<uint64_t>(n);
  const uint64_t rl = r & 0xffffffffu, rh = r >> 32, ml = m & 0xffffffffu, mh = m >> 32;
  const uint64_t lo = rl * ml, mid1 = rh * ml, mid2 = rl * mh;
  const uint64_t carry = ((lo >> 32) + (mid1 & 0xffffffffu) + (mid2 & 0xffffffffu)) >> 32;
  return static_cast<int64_t>(rh * mh + (mid1 >> 32) + (mid2 >> 32) + carry);
#endif
}

// How many neighbours of a node of degree `deg` the sampler returns at a hop with `fanout`.
// fanout -1: every neighbour. With replacement: exactly `fanout` draws (none for an isolated
// node). Without: min(deg, fanout).
GLREC_HD int64_t sample_count(int64_t deg, int64_t fanout, bool replace) {
  if (fanout < 0) return deg;
  if (replace) return deg > 0 ? fanout : 0;
  return deg < fanout ? deg : fanout;
}

// Whether the node's neighbours are taken in CSR order (no randomness): fanout -1, or fewer
// neighbours than the fanout without replacement.
GLREC_HD bool takes_all(int64_t deg, int64_t fanout, bool replace) {
  return fanout < 0 || (!replace && deg <= fanout);
}

// Error codes the kernels report (CUDA writes them to a status word; CPU throws directly).
enum Error : int64_t {
  kOk = 0,
  kSeedOutOfRange = 1,   // info: position in seeds, value
  kBadRowptr = 2,        // info: node, rowptr[node], rowptr[node + 1]
  kColOutOfRange = 3,    // info: edge position in col, value
};

}  // namespace sampling
}  // namespace glrec
