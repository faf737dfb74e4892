// glrec::neighbor_sample on CUDA. Compiled only when setup.py finds a CUDA torch and nvcc (it
// then defines GLREC_WITH_CUDA); registered under the schema defined in glrec_fast/ops.py.
//
// Same output as the CPU kernel, bit for bit: each frontier node draws from the counter-based
// stream keyed by (seed, hop, node) with the same Floyd steps (sampling_common.h), and new nodes
// are numbered in order of first appearance in the hop's edge list -- here computed with an
// atomicMin of the edge position per node, then a scan of "is the first occurrence" flags.
//
// Per hop (all on the current stream; two host syncs per hop, to size the outputs):
//   count   thread per frontier node: validate its CSR row, sample_count()     -> cumsum, sync
//   sample  warp per frontier node: lanes split "take all" / with-replacement draws; Floyd is
//           sequential in its draws, lane 0 picks and the warp checks membership with __any_sync
//   relabel first[v] = min edge position (atomicMin) for nodes without a local id; flag the
//           first occurrences; cumsum -> sync; assign ids; map every edge to local ids
// Node ids -> local ids live in a dense int64 array of num_nodes entries (memset per call: 8 bytes
// per node, e.g. 0.6 MB for Gowalla, microseconds at HBM bandwidth).
// Errors (bad rowptr rows, col/seeds out of range) are written to a device status word and raised
// on the host as ValueError after the next sync; kernels never read out of bounds meanwhile.
#ifdef GLREC_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../sampling_common.h"

namespace glrec {
namespace sampling {
namespace {

using Out = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>>;
using ll = long long;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr ll kNoPos = std::numeric_limits<ll>::max();
// status: [error code, info a, info b, info c, a count the host needs]
constexpr int kStatusLen = 5;

// Raw int64 pointer as long long (what atomicMin/atomicCAS take; same size as int64_t).
inline ll* P(const at::Tensor& t) { return reinterpret_cast<ll*>(t.data_ptr<int64_t>()); }

inline unsigned grid_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < (1 << 22) ? (blocks > 0 ? blocks : 1) : (1 << 22));  // grid-stride beyond
}

__device__ __forceinline__ void report(ll* status, ll code, ll a, ll b, ll c) {
  if (atomicCAS(reinterpret_cast<unsigned long long*>(status), 0ULL, static_cast<unsigned long long>(code)) == 0ULL) {
    status[1] = a;
    status[2] = b;
    status[3] = c;
  }
}

// ---------------------------------------------------------------- relabel kernels
// first[v] = min position p with ids[p] == v, for nodes v without a local id yet. Out-of-range ids
// are reported (seeds) or skipped (edges: the sample kernel already reported them).
__global__ void first_occurrence_kernel(const ll* ids, ll n, ll num_nodes, const ll* local, ll* first,
                                        ll* status, bool report_range) {
  for (ll p = blockIdx.x * (ll)blockDim.x + threadIdx.x; p < n; p += (ll)gridDim.x * blockDim.x) {
    const ll v = ids[p];
    if (v < 0 || v >= num_nodes) {
      if (report_range) report(status, kSeedOutOfRange, p, v, 0);
      continue;
    }
    if (local[v] < 0) atomicMin(&first[v], p);
  }
}

__global__ void flag_kernel(const ll* ids, ll n, ll num_nodes, const ll* local, const ll* first, ll* flag) {
  for (ll p = blockIdx.x * (ll)blockDim.x + threadIdx.x; p < n; p += (ll)gridDim.x * blockDim.x) {
    const ll v = ids[p];
    flag[p] = (v >= 0 && v < num_nodes && local[v] < 0 && first[v] == p) ? 1 : 0;
  }
}

__global__ void assign_kernel(const ll* ids, ll n, const ll* flag, const ll* incl, ll* local, ll* new_nodes,
                              ll base) {
  for (ll p = blockIdx.x * (ll)blockDim.x + threadIdx.x; p < n; p += (ll)gridDim.x * blockDim.x) {
    if (flag[p]) {
      const ll idx = incl[p] - 1;
      new_nodes[idx] = ids[p];
      local[ids[p]] = base + idx;
    }
  }
}

__global__ void to_local_kernel(const ll* ids, ll n, ll num_nodes, const ll* local, ll* out) {
  for (ll p = blockIdx.x * (ll)blockDim.x + threadIdx.x; p < n; p += (ll)gridDim.x * blockDim.x) {
    const ll v = ids[p];
    out[p] = (v >= 0 && v < num_nodes) ? local[v] : -1;
  }
}

__global__ void last_into_status_kernel(const ll* incl, ll n, ll* status) {
  status[4] = n > 0 ? incl[n - 1] : 0;
}

// ---------------------------------------------------------------- sampling kernels
__global__ void count_kernel(const ll* frontier, ll F, const ll* rowptr, ll num_col, ll fanout, bool replace,
                             ll* counts, ll* status) {
  for (ll i = blockIdx.x * (ll)blockDim.x + threadIdx.x; i < F; i += (ll)gridDim.x * blockDim.x) {
    const ll v = frontier[i];
    const ll r0 = rowptr[v], r1 = rowptr[v + 1];
    if (r0 < 0 || r1 < r0 || r1 > num_col) {
      report(status, kBadRowptr, v, r0, r1);
      counts[i] = 0;
      continue;
    }
    counts[i] = sample_count(r1 - r0, fanout, replace);
  }
}

__global__ void sample_kernel(const ll* frontier, ll F, const ll* rowptr, const ll* col, ll num_col, ll num_nodes,
                              ll fanout, bool replace, ll seed, ll hop, ll row_base, const ll* counts,
                              const ll* incl_offsets, ll* eids, ll* nbrs, ll* rows, ll* status) {
  const int lane = threadIdx.x & 31;
  const ll warps = (ll)gridDim.x * kWarpsPerBlock;
  for (ll i = blockIdx.x * (ll)kWarpsPerBlock + (threadIdx.x >> 5); i < F; i += warps) {  // warp-uniform
    const ll k = counts[i];
    if (k == 0) continue;
    const ll off = incl_offsets[i] - k;
    const ll v = frontier[i];
    const ll r0 = rowptr[v], deg = rowptr[v + 1] - r0;  // valid: count_kernel gave k = 0 otherwise
    ll* ei = eids + off;
    if (takes_all(deg, fanout, replace)) {
      for (ll j = lane; j < k; j += 32) ei[j] = r0 + j;
    } else {
      const uint64_t key = stream_key(seed, hop, v);
      if (replace) {
        for (ll j = lane; j < k; j += 32) ei[j] = r0 + bounded(draw(key, j), deg);
      } else {
        // Floyd: draw s picks t in [0, deg - k + s]; t is taken unless already picked, then j is.
        for (ll s = 0; s < k; ++s) {
          const ll j = deg - k + s;
          const ll t = bounded(draw(key, s), j + 1);
          bool found = false;
          for (ll q = lane; q < s; q += 32) found |= (ei[q] - r0 == t);
          found = __any_sync(0xffffffffu, found);
          if (lane == 0) ei[s] = r0 + (found ? j : t);
          __syncwarp();  // lane 0's pick is visible to the warp's next membership check
        }
      }
    }
    __syncwarp();
    for (ll j = lane; j < k; j += 32) {
      const ll e = ei[j];
      ll u = col[e];
      if (u < 0 || u >= num_nodes) {
        report(status, kColOutOfRange, e, u, 0);
        u = -1;  // skipped by the relabel kernels; the host raises before using the output
      }
      nbrs[off + j] = u;
      rows[off + j] = row_base + i;
    }
  }
}

// ---------------------------------------------------------------- host side
void check_tensor(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.dim() == 1, "neighbor_sample: ", name, " must be a 1-d tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "neighbor_sample: ", name, " must be int64 (torch.long), got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == dev, "neighbor_sample: ", name, " is on ", t.device(), " but rowptr is on ", dev,
                    " (rowptr, col and seeds must share one device)");
}

std::vector<ll> read_status(const at::Tensor& status) {
  const at::Tensor h = status.to(at::kCPU);  // synchronises with the stream
  const ll* p = P(h);
  return std::vector<ll>(p, p + kStatusLen);
}

void raise_if_error(const std::vector<ll>& st, ll num_nodes, ll num_col) {
  switch (st[0]) {
    case kOk:
      return;
    case kSeedOutOfRange:
      TORCH_CHECK_VALUE(false, "neighbor_sample: seeds[", st[1], "] = ", st[2], " is out of range: node ids must lie "
                        "in [0, num_nodes = rowptr.numel() - 1 = ", num_nodes, ")");
    case kBadRowptr:
      TORCH_CHECK_VALUE(false, "neighbor_sample: rowptr is not a valid CSR row pointer at node ", st[1], ": rowptr[",
                        st[1], "] = ", st[2], ", rowptr[", st[1] + 1, "] = ", st[3],
                        " (expected 0 <= rowptr[v] <= rowptr[v + 1] <= col.numel() = ", num_col, ")");
    case kColOutOfRange:
      TORCH_CHECK_VALUE(false, "neighbor_sample: col[", st[1], "] = ", st[2], " is out of range: node ids must lie "
                        "in [0, num_nodes = rowptr.numel() - 1 = ", num_nodes, ")");
    default:
      TORCH_CHECK(false, "neighbor_sample: unknown CUDA status ", st[0]);
  }
}

// Give the nodes in `ids` that have no local id yet new ids base, base + 1, ... in order of first
// appearance; returns them (global ids). Reports out-of-range ids when `report_range`.
at::Tensor add_new_nodes(const at::Tensor& ids, ll base, at::Tensor& local, at::Tensor& first, at::Tensor& status,
                         bool report_range, ll num_nodes, ll num_col, cudaStream_t stream) {
  const ll n = ids.numel();
  const auto opts = ids.options();
  if (n == 0) {
    raise_if_error(read_status(status), num_nodes, num_col);
    return at::empty({0}, opts);
  }
  const unsigned grid = grid_for(n);
  first_occurrence_kernel<<<grid, kThreads, 0, stream>>>(P(ids),
                                                         n, num_nodes, P(local),
                                                         P(first), P(status),
                                                         report_range);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor flag = at::empty({n}, opts);
  flag_kernel<<<grid, kThreads, 0, stream>>>(P(ids), n, num_nodes,
                                             P(local), P(first),
                                             P(flag));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor incl = at::cumsum(flag, 0);
  last_into_status_kernel<<<1, 1, 0, stream>>>(P(incl), n, P(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::vector<ll> st = read_status(status);
  raise_if_error(st, num_nodes, num_col);
  at::Tensor new_nodes = at::empty({st[4]}, opts);
  if (st[4] > 0) {
    assign_kernel<<<grid, kThreads, 0, stream>>>(P(ids), n, P(flag),
                                                 P(incl), P(local),
                                                 P(new_nodes), base);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return new_nodes;
}

Out neighbor_sample_cuda(const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& seeds_t,
                         at::IntArrayRef fanouts, bool replace, int64_t seed) {
  const at::Device dev = rowptr_t.device();
  TORCH_CHECK_VALUE(dev.is_cuda(), "neighbor_sample: rowptr must be on a CUDA device for the CUDA kernel, got ", dev);
  check_tensor(rowptr_t, "rowptr", dev);
  check_tensor(col_t, "col", dev);
  check_tensor(seeds_t, "seeds", dev);
  TORCH_CHECK_VALUE(rowptr_t.numel() >= 1, "neighbor_sample: rowptr must have num_nodes + 1 >= 1 entries, got 0");
  for (size_t l = 0; l < fanouts.size(); ++l) {
    TORCH_CHECK_VALUE(fanouts[l] >= -1, "neighbor_sample: fanouts[", l, "] must be -1 (all neighbours) or >= 0, got ",
                      fanouts[l]);
  }
  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor rowptr = rowptr_t.contiguous(), col = col_t.contiguous(), seeds = seeds_t.contiguous();
  const ll num_nodes = rowptr.numel() - 1, num_col = col.numel();
  const auto opts = rowptr.options();

  at::Tensor local = at::full({num_nodes}, -1, opts);      // global -> local id, -1 = none yet
  at::Tensor first = at::full({num_nodes}, kNoPos, opts);  // first position of a new node in a list
  at::Tensor status = at::zeros({kStatusLen}, opts);

  std::vector<at::Tensor> nodes_out, rows_out, cols_out, eids_out;
  at::Tensor frontier = add_new_nodes(seeds, 0, local, first, status, true, num_nodes, num_col, stream);
  at::Tensor all_nodes = frontier;
  nodes_out.push_back(all_nodes);

  for (int64_t hop = 0; hop < static_cast<int64_t>(fanouts.size()); ++hop) {
    const ll F = frontier.numel();
    const ll row_base = all_nodes.numel() - F;
    at::Tensor rows = at::empty({0}, opts), eids = at::empty({0}, opts), nbrs = at::empty({0}, opts);
    ll E = 0;
    if (F > 0) {
      at::Tensor counts = at::empty({F}, opts);
      count_kernel<<<grid_for(F), kThreads, 0, stream>>>(P(frontier), F,
                                                         P(rowptr), num_col, fanouts[hop],
                                                         replace, P(counts),
                                                         P(status));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor offsets = at::cumsum(counts, 0);
      last_into_status_kernel<<<1, 1, 0, stream>>>(P(offsets), F,
                                                   P(status));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const std::vector<ll> st = read_status(status);
      raise_if_error(st, num_nodes, num_col);
      E = st[4];
      rows = at::empty({E}, opts);
      eids = at::empty({E}, opts);
      nbrs = at::empty({E}, opts);
      if (E > 0) {
        sample_kernel<<<grid_for(F * 32), kThreads, 0, stream>>>(
            P(frontier), F, P(rowptr),
            P(col), num_col, num_nodes, fanouts[hop], replace, seed, hop, row_base,
            P(counts), P(offsets), P(eids),
            P(nbrs), P(rows), P(status));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    // Also raises a col error reported by sample_kernel (the status is read after the scan).
    at::Tensor new_nodes = add_new_nodes(nbrs, all_nodes.numel(), local, first, status, false, num_nodes, num_col,
                                         stream);
    at::Tensor cols = at::empty({E}, opts);
    if (E > 0) {
      to_local_kernel<<<grid_for(E), kThreads, 0, stream>>>(P(nbrs), E, num_nodes,
                                                            P(local),
                                                            P(cols));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    all_nodes = at::cat({all_nodes, new_nodes});
    nodes_out.push_back(all_nodes);
    rows_out.push_back(rows);
    cols_out.push_back(cols);
    eids_out.push_back(eids);
    frontier = new_nodes;
  }
  return Out(std::move(nodes_out), std::move(rows_out), std::move(cols_out), std::move(eids_out));
}

}  // namespace
}  // namespace sampling
}  // namespace glrec

TORCH_LIBRARY_IMPL(glrec, CUDA, m) {
  m.impl("neighbor_sample", &glrec::sampling::neighbor_sample_cuda);
}
#endif  // GLREC_WITH_CUDA
