"""Mini-batch graph training on sampled neighbourhoods: blocks, aggregation, prefetching.

Sampling runs on the **joint CSR** of a ``BipartiteGraph`` (``graph.rowptr/col``: users
``0..U-1``, items ``U..U+I-1``), not on the two one-way CSRs. The joint graph is bipartite, so
hops alternate user -> item -> user by themselves; one ``neighbor_sample`` call covers a whole BPR
batch (users, positive and negative items as seeds together, so shared neighbours are sampled
once); and local node ids map straight onto the ``[U + I, d]`` embedding tables that LightGCN and
GraphSAGE share.

Layout (see ``ops.neighbor_sample``): ``nodes[:sizes[l]]`` are the nodes within ``l`` hops of the
seeds; hop ``l``'s edges go from a frontier node (row, local id in ``[sizes[l-1], sizes[l])``) to a
neighbour (col). An ``L``-layer model computes layer ``t`` for the first ``sizes[L - t]`` nodes
from the edges of hops ``0..L - t`` (``Blocks.edges_upto``), so the seeds get exact
``L``-hop receptive fields of the sampled graph while no node is sampled twice.
"""
from __future__ import annotations

import collections
import concurrent.futures
import warnings
from dataclasses import dataclass, field

import torch

from . import ops

__all__ = ["Blocks", "sample_blocks", "bpr_blocks", "aggregate", "lightgcn_sampled", "Prefetcher",
           "SampledTraining", "batch_seed"]

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def batch_seed(base: int, *ids: torch.Tensor) -> int:
    """A sampler seed from ``base`` and a batch's ids (a hash of their content).

    Derived from the batch itself rather than from a call counter, so the sample of a batch is the
    same whether it was prefetched or not, and a resumed run (same batches) draws the same samples.
    """
    acc = _mix64((int(base) + 0x9E3779B97F4A7C15) & _MASK64)
    for t in ids:
        t = t.reshape(-1).long()
        # Position-weighted sum with int64 wrap-around: order-sensitive, one pass, no host copy of t.
        w = torch.arange(1, 2 * t.numel() + 1, 2, device=t.device, dtype=torch.long) * 0x2545F4914F6CDD1D
        acc = _mix64((acc + (int((t * w).sum()) & _MASK64) + t.numel()) & _MASK64)
    return acc - (1 << 64) if acc >= (1 << 63) else acc  # as a signed int64 for the op's `int seed`


@dataclass
class Blocks:
    """A sampled multi-hop neighbourhood, laid out for layer-wise aggregation.

    ``nodes``: global (joint) ids, position = local id; ``sizes[l]``: number of nodes within ``l``
    hops (``sizes[0]`` = unique seeds); ``rows/cols/edge_ids``: per hop, as ``ops.neighbor_sample``
    returns them; ``seed_local``: the local id of every requested seed (duplicates allowed).
    """
    nodes: torch.Tensor
    sizes: list[int]
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]
    edge_ids: list[torch.Tensor]
    seed_local: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_hops(self) -> int:
        return len(self.rows)

    @property
    def num_edges(self) -> int:
        return sum(int(r.numel()) for r in self.rows)

    def edges_upto(self, hop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of hops ``0..hop`` concatenated, sorted by row.

        Rows index the first ``sizes[hop]`` nodes (each has its sampled neighbourhood in here),
        cols the first ``sizes[hop + 1]``.
        """
        if hop not in self._cache:
            self._cache[hop] = (torch.cat(self.rows[: hop + 1]), torch.cat(self.cols[: hop + 1]))
        return self._cache[hop]

    def row_counts(self, hop: int) -> torch.Tensor:
        """Sampled edges per node for the first ``sizes[hop]`` nodes (edges of hops ``0..hop``)."""
        key = ("counts", hop)
        if key not in self._cache:
            rows, _ = self.edges_upto(hop)
            self._cache[key] = torch.bincount(rows, minlength=self.sizes[hop])
        return self._cache[key]

    def _structure(self, hop: int):
        """CSR layouts of hop ``0..hop``'s edges both ways: (rowptr, order, t_rowptr, t_cols), where the
        edges as listed (sorted by row) are the CSR ``[sizes[hop], sizes[hop + 1]]`` with ``rowptr`` and
        ``order`` lists them by column (the transposed CSR's entries ``t_cols = rows[order]``)."""
        key = ("csr", hop)
        if key not in self._cache:
            rows, cols = self.edges_upto(hop)
            rowptr = torch.zeros(self.sizes[hop] + 1, dtype=torch.long, device=rows.device)
            torch.cumsum(self.row_counts(hop), 0, out=rowptr[1:])
            t_rowptr, t_cols, order = ops.csr_transpose(rowptr, cols, self.sizes[hop + 1])
            self._cache[key] = (rowptr, order, t_rowptr, t_cols)
        return self._cache[key]

    def mean_csr(self, hop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rowptr, cols, t_rowptr, t_cols)``: hop ``0..hop``'s edges as the CSR ``[sizes[hop],
        sizes[hop + 1]]`` and its transpose, what ``ops.block_mean_concat`` reads (GraphSAGE's layers)."""
        rowptr, _, t_rowptr, t_cols = self._structure(hop)
        return rowptr, self.edges_upto(hop)[1], t_rowptr, t_cols

    def aggregation(self, hop: int, values: torch.Tensor | None = None, dtype=torch.float32):
        """``(A, A^T)``: hop ``0..hop``'s edges as a sparse CSR matrix ``[sizes[hop], sizes[hop + 1]]``
        with ``values`` per edge (in ``edges_upto(hop)`` order; default ``1 / row count``, the mean
        over each row's sampled neighbours) and its transpose, for :func:`aggregate`."""
        rows, cols = self.edges_upto(hop)
        rowptr, order, t_rowptr, t_cols = self._structure(hop)
        if values is None:
            inv = 1.0 / self.row_counts(hop).clamp(min=1).to(dtype)
            values, t_values = inv[rows], inv[t_cols]
        else:
            values = values.to(dtype)
            t_values = values[order]
        n, m = self.sizes[hop], self.sizes[hop + 1]
        with warnings.catch_warnings():  # torch's one-time "sparse CSR is beta" notice
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            a = torch.sparse_csr_tensor(rowptr, cols, values, (n, m), check_invariants=False)
            at = torch.sparse_csr_tensor(t_rowptr, t_cols, t_values, (m, n), check_invariants=False)
        return a, at

    def table_cols(self, hop: int) -> torch.Tensor:
        """``nodes[edges_upto(hop)[1]]``: each edge's neighbour by its global id (a table row), what
        ``ops.table_mean_concat`` reads (GraphSAGE's first layer; its sampler builds it on the worker)."""
        key = ("table_cols", hop)
        if key not in self._cache:
            self._cache[key] = self.nodes[self.edges_upto(hop)[1]]
        return self._cache[key]

    def sorted_nodes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, nodes[order])`` with the global ids ascending (a coalesced gradient's layout)."""
        if "sorted" not in self._cache:
            order = torch.argsort(self.nodes)
            self._cache["sorted"] = (order, self.nodes[order])
        return self._cache["sorted"]

    def prepare(self) -> "Blocks":
        """Build every hop's CSR layouts and the nodes' sort order now (the sampler's worker thread
        calls this, so the training step finds them ready)."""
        for hop in range(self.num_hops):
            self._structure(hop)
        self.sorted_nodes()
        return self

    def to(self, device) -> "Blocks":
        mv = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return Blocks(self.nodes.to(device, non_blocking=True), list(self.sizes), mv(self.rows), mv(self.cols),
                      mv(self.edge_ids), self.seed_local.to(device, non_blocking=True))


def sample_blocks(rowptr: torch.Tensor, col: torch.Tensor, seeds: torch.Tensor, fanouts, seed: int = 0,
                  replace: bool = False) -> Blocks:
    """Sample ``len(fanouts)`` hops around ``seeds`` (duplicates allowed) on a CSR graph."""
    seeds = torch.as_tensor(seeds)
    uniq, inverse = torch.unique(seeds.to(rowptr.device), return_inverse=True)
    out = ops.neighbor_sample(rowptr, col, uniq, fanouts, replace=replace, seed=seed)
    return Blocks(out.nodes[-1], [int(n.numel()) for n in out.nodes], list(out.rows), list(out.cols),
                  list(out.edge_ids), inverse).prepare()


def bpr_blocks(graph, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, fanouts, seed: int = 0,
               replace: bool = False) -> Blocks:
    """Blocks for a batch on ``graph``'s joint CSR; ``seed_local`` is ``[users | pos | neg]``.
    ``neg`` holds one negative per triple (BPR) or any number shared by the batch (softmax)."""
    for name, t in (("users", users), ("pos", pos), ("neg", neg)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"{name}: expected a 1-d int64 tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if users.numel() != pos.numel():
        raise ValueError(f"users/pos: expected equal lengths, got {users.numel()} and {pos.numel()}")
    dev = graph.rowptr.device
    seeds = torch.cat([users.to(dev), pos.to(dev) + graph.num_users, neg.to(dev) + graph.num_users])
    return sample_blocks(graph.rowptr, graph.col, seeds, fanouts, seed=seed, replace=replace)


class _BlockProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a, at):
        ctx.at = at
        return torch.sparse.mm(a, h)

    @staticmethod
    def backward(ctx, grad):
        return torch.sparse.mm(ctx.at, grad.contiguous()), None, None


def aggregate(h: torch.Tensor, a: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``a @ h`` for a block's aggregation matrix (``Blocks.aggregation``: ``a`` sparse CSR
    ``[n, m]``, ``at`` its transpose), differentiable in ``h`` (the gradient is ``at @ grad``).

    One sparse product each way: no ``[edges, d]`` gather or scatter temporary (at 20M interactions
    a GraphSAGE batch of 8,192 has ~2.6M sampled edges, 670 MB of float32 rows at d=64). The
    gather-and-``index_add_`` form it replaces is ``reference.block_aggregate``."""
    if h.size(0) != a.size(1):
        raise ValueError(f"h: expected {a.size(1)} rows (the block's columns), got {h.size(0)}")
    return _BlockProduct.apply(h, a, at)


def lightgcn_sampled(h0: torch.Tensor, graph, blocks: Blocks) -> torch.Tensor:
    """LightGCN's layer mean at the seeds, estimated on sampled blocks with full-graph normalisation.

    A layer is ``e'_v = sum_{u in N(v)} e_u / sqrt(d_v d_u)`` with the degrees ``d`` of the *full*
    graph. On a sample ``S(v)`` of ``k_v`` neighbours (uniform, with or without replacement) the sum
    is estimated by ``(d_v / k_v) * sum_{u in S(v)} e_u / sqrt(d_v d_u)``, which is unbiased; when
    ``S(v)`` is the whole neighbourhood (fanout -1 or ``d_v <= fanout``) the factor is 1 and the
    layer is exact. Each node keeps one sample for every layer that uses it, and samples of different
    nodes are independent, so every path that never revisits a node is estimated without bias
    (with three or more layers a path v -> u -> v -> ... reuses v's sample: a small correlation).

    ``h0`` is ``[len(blocks.nodes), d]``: the layer-0 (ID table) rows of ``blocks.nodes``.
    Returns ``[sizes[0], d]``: the layer mean (layers 0..L) for the unique seeds, in local-id order.
    """
    L = blocks.num_hops
    nodes = blocks.nodes
    if h0.size(0) != nodes.numel():
        raise ValueError(f"h0: expected the {nodes.numel()} rows of blocks.nodes, got {h0.size(0)}")
    deg = (graph.rowptr[nodes + 1] - graph.rowptr[nodes]).to(h0.dtype)
    dinv = graph.dinv[nodes].to(h0.dtype)
    h = h0
    n0 = blocks.sizes[0]
    total = h[:n0]
    for t in range(1, L + 1):
        hop = L - t
        rows, cols = blocks.edges_upto(hop)
        counts = blocks.row_counts(hop).to(h0.dtype)
        scale = deg[: counts.numel()] / counts.clamp(min=1)
        h = aggregate(h, *blocks.aggregation(hop, dinv[rows] * dinv[cols] * scale[rows], h0.dtype))
        total = total + h[:n0]
    return total / (L + 1)


# --------------------------------------------------------------------------- prefetching
def _one_thread_here() -> None:
    """The worker's ops run on its own thread only (``glrec_fast._C.one_thread_here``): the training
    thread's kernels already use every core torch was given, and a second team of threads on the
    worker made both wait on each other (20M GraphSAGE step, one process, A/B every 30 steps:
    180-185 vs 190-194 ms; bench/RESULTS.md). Without the extension nothing changes."""
    from . import _backend
    mod = _backend.load_extension()
    if mod is not None and hasattr(mod, "one_thread_here"):
        mod.one_thread_here()


class Prefetcher:
    """Runs ``fn(*args)`` on one worker thread ahead of time; ``take(*args)`` returns its result.

    The compiled sampler runs without the GIL (torch.ops release it around the C++ kernel; see
    ``tests/test_graphsage.py::test_sampler_releases_the_gil``), so a sample for batch ``b + 1``
    is drawn while batch ``b`` trains. ``take`` checks that the prefetched arguments are the ones
    asked for (``torch.equal``), so a caller that skips or reorders batches gets a fresh sample,
    never a wrong one.
    """

    def __init__(self, fn, depth: int = 2):
        # depth 2: a training loop submits batch b + 1 before taking batch b (so that b + 1 is
        # sampled while b trains); the queue then holds both.
        self.fn = fn
        self.depth = depth
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: collections.deque = collections.deque()

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glrec-sampler",
                                                               initializer=_one_thread_here)
        while len(self._queue) >= self.depth:
            self._queue.popleft()[1].cancel()
        return self._pool

    def submit(self, *args) -> None:
        pool = self._worker()
        self._queue.append((args, pool.submit(self.fn, *args)))

    def submit_from(self, make) -> concurrent.futures.Future:
        """``args = make()`` and then ``fn(*args)``, both on the worker thread; returns the future of
        ``args`` (``take(*args)`` with them finds the result). The one worker runs its tasks in order,
        so ``fn`` starts as soon as ``make`` is done."""
        pool = self._worker()
        made = pool.submit(make)
        self._queue.append((made, pool.submit(lambda: self.fn(*made.result()))))
        return made

    def take(self, *args):
        """The result queued for ``args``: entries queued before it are stale and dropped, those after
        it (batches submitted ahead) stay. Not queued: computed on the spot, the queue left alone."""
        for i, (queued, _) in enumerate(self._queue):
            if isinstance(queued, concurrent.futures.Future):
                queued = queued.result()   # submit_from: its args, made on the worker (done by now)
            if len(queued) == len(args) and all(_same(a, b) for a, b in zip(queued, args)):
                for _ in range(i):
                    self._queue.popleft()[1].cancel()
                return self._queue.popleft()[1].result()
        return self.fn(*args)

    def close(self) -> None:
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __getstate__(self):  # a model holding a Prefetcher stays deep-copyable / picklable
        return {"fn": self.fn, "depth": self.depth, "_pool": None, "_queue": collections.deque()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    return a == b


class SampledTraining:
    """Mixin for models trained on sampled blocks (GraphSAGE, sampled LightGCN).

    ``forward(users, pos, neg)`` keeps the ``Recommender`` interface; its blocks come from
    ``prefetch(users, pos, neg)`` called one batch ahead (a worker thread samples while the current
    batch trains) or, without it, are sampled on the spot. Either way the seed is
    ``batch_seed(sample_seed, users, pos, neg)``, so both give the same sample.
    """

    fanouts: list[int]
    replace: bool
    sample_seed: int

    def _init_sampling(self, fanouts, replace: bool, sample_seed: int) -> None:
        if isinstance(fanouts, int) or not all(isinstance(k, int) and not isinstance(k, bool) for k in fanouts):
            raise ValueError(f"fanouts: expected a list of ints, got {fanouts!r}")
        fanouts = list(fanouts)
        if not fanouts or any(k < -1 for k in fanouts):
            raise ValueError(f"fanouts: expected a non-empty list of ints >= -1 (-1 = every neighbour), got {fanouts}")
        self.fanouts, self.replace, self.sample_seed = fanouts, bool(replace), int(sample_seed)
        self._prefetcher = Prefetcher(self.sample)

    def sample(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Blocks:
        """The blocks of a BPR batch (thread-safe: reads the graph only)."""
        return bpr_blocks(self.graph, users, pos, neg, self.fanouts,
                          seed=batch_seed(self.sample_seed, users, pos, neg), replace=self.replace)

    def prefetch(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> None:
        """Start sampling the blocks of an upcoming batch on the worker thread."""
        self._prefetcher.submit(users, pos, neg)

    def prefetch_from(self, make) -> concurrent.futures.Future:
        """Build an upcoming batch (``make() -> (users, pos, neg)``) and then sample its blocks, both on
        the worker thread; returns the future of the batch. The training loop builds batches so: its BPR
        negatives (a search of every training key) leave the training thread too."""
        return self._prefetcher.submit_from(make)

    def forward(self, users, pos, neg):
        """BPR triples' scores and the L2 term, as ``Recommender.forward`` returns them; the L2 rows
        (``ego_params``'s) are read off the block's ID rows, so the table's gradient stays one
        coalesced piece."""
        u, p, n, sq = self._batch(users, pos, neg)
        return (u * p).sum(-1), (u * n).sum(-1), sq.sum() / (2 * users.numel())

    def softmax_loss(self, users, pos, negs, temperature: float, reg_weight: float):
        """``Recommender.softmax_loss`` with the L2 rows (users and positives) off the block's ID rows."""
        from .models.losses import sampled_softmax
        u, p, n, sq = self._batch(users, pos, negs)
        sm = sampled_softmax(u, p, n, pos, negs, temperature, *self.bias_rows(pos, negs))
        reg = sq[: 2 * users.numel()].sum() / (2 * users.numel())
        return sm + reg_weight * reg, {"softmax": sm.detach(), "reg": reg.detach()}

    def block_embeddings(self, blocks: Blocks, h0: torch.Tensor | None = None) -> torch.Tensor:
        """Final embeddings of ``blocks``' seeds (local-id order) from the ID rows ``h0`` of
        ``blocks.nodes`` (``block_rows`` when None); each sampled model defines it."""
        raise NotImplementedError

    def block_rows(self, blocks: Blocks) -> torch.Tensor:
        """``ego.weight[blocks.nodes]``; a row-sparse gradient comes out with its rows sorted."""
        if self.row_sparse:
            return ops.table_rows(self.ego.weight, blocks.nodes, *blocks.sorted_nodes())
        return self.ego.weight[blocks.nodes]

    def block_forward(self, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """(final embeddings of the unique seeds, their ID rows), both in local-id order: what a
        training step reads (the rows feed the L2 term)."""
        h0 = self.block_rows(blocks)
        return self.block_embeddings(blocks, h0), h0[: blocks.sizes[0]]   # seeds are the first local ids

    def _batch(self, users, pos, negs):
        """(users, positives, negatives) final vectors on the batch's sampled blocks, and the squared
        norms of the ID rows of ``[users | positives | negatives]`` (the L2 term's)."""
        blocks = self.blocks_for(users, pos, negs)
        h, seed_rows = self.block_forward(blocks)
        h = h[blocks.seed_local]
        sq = seed_rows.pow(2).sum(1)[blocks.seed_local]
        n = users.numel()
        return h[:n], h[n:2 * n], h[2 * n:], sq

    def batch_embeddings(self, users, pos, negs):
        """(users, positives, negatives) final vectors on the batch's sampled blocks."""
        return self._batch(users, pos, negs)[:3]

    def sample_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors, item vectors) of ``users`` and ``items`` on one fresh sampled neighbourhood:
        no full-graph work and the training prefetch queue left alone (the grokking monitor's view)."""
        if items.numel() == 0:
            raise ValueError("items: expected at least one item id")
        pos = items[torch.arange(users.numel(), device=items.device) % items.numel()]   # BPR blocks pair each user
        blocks = self.sample(users, pos, items)
        h = self.block_embeddings(blocks)[blocks.seed_local]
        return h[: users.numel()], h[2 * users.numel():]

    def blocks_for(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Blocks:
        """The prefetched blocks of this batch, or a fresh sample when it was not prefetched."""
        return self._prefetcher.take(users, pos, neg)
