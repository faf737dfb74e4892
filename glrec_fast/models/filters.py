"""Training-free graph filters: GF-CF (Shen et al., CIKM 2021) and BSPM (Choi et al., SIGIR 2023).

Both score a user from the user's training row ``r`` (binary, over items) with filters built from
the normalised interaction matrix ``R~ = D_U^-1/2 R D_I^-1/2``:

* the linear (blurring) filter ``r P~`` with ``P~ = R~^T R~``, the item block of the squared
  symmetric-normalised bipartite adjacency LightGCN propagates over;
* the ideal low-pass filter ``r D_I^-1/2 V_K V_K^T D_I^1/2`` with ``V_K`` the top-K right singular
  vectors of ``R~`` (a randomised truncated SVD of the sparse matrix);
* BSPM's sharpening ``dx/dt = -x P~`` from ``x(0) = r P~ + w * ideal`` to time ``T``, solved with
  Euler or classical RK4 steps. For a linear ODE each solver step is a polynomial in ``P~``
  (Euler ``1 - hP``; RK4 the order-4 Taylor polynomial of ``exp(-hP)``), so the whole filter is

      score(r) = (r P~ + w * r D_I^-1/2 V_K V_K^T D_I^1/2) p(P~),      p = product of the steps.

  ``p = 1`` (no sharpening) is GF-CF. Fitting computes ``V_K`` once and folds ``p(P~)`` into the
  low-rank factor (``V_K^T D_I^1/2 p(P~)``, a [K, I] matrix); scoring a batch of users then costs
  ``r P~`` (``ops.gram_rows``: each user's two-hop neighbourhood only), ``deg(p)`` applications of
  ``P~`` to a dense [I, batch] block and two thin matrix products.

``P~`` is never built, nor any dense I x I or U x I matrix: it is applied as two sparse products,
``R~^T (R~ X)``, over the training graph's CSR in both directions (``BipartiteGraph.user_rowptr`` /
``item_rowptr``), with torch's CSR x dense kernel, or for the first product, whose input rows are
the users' sparse training rows, by ``ops.gram_rows``. ``reference.graph_filter_dense`` is the dense
ground truth for tests.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

SOLVERS = ("euler", "rk4")

log = logging.getLogger(__name__)


def sharpen_poly(solver: str, steps: int, time: float) -> list[float]:
    """Coefficients ``[c0, c1, ...]`` (ascending powers of P~) of ``steps`` solver steps of
    ``dx/dt = -x P~`` over ``[0, time]``; ``[1.0]`` when ``time == 0`` (no sharpening)."""
    if solver not in SOLVERS:
        raise ValueError(f"sharpen_solver: expected one of {SOLVERS}, got {solver!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"sharpen_steps: expected an int >= 1, got {steps!r}")
    if not (math.isfinite(time) and time >= 0):
        raise ValueError(f"sharpen_time: expected a finite time >= 0, got {time!r}")
    if time == 0:
        return [1.0]
    h = time / steps
    one = [1.0, -h] if solver == "euler" else [(-h) ** j / math.factorial(j) for j in range(5)]
    poly = [1.0]
    for _ in range(steps):
        prod = [0.0] * (len(poly) + len(one) - 1)
        for a, ca in enumerate(poly):
            for b, cb in enumerate(one):
                prod[a + b] += ca * cb
        poly = prod
    return poly


def normalised_csr(graph):
    """``R~`` as torch sparse CSR [U, I] and ``R~^T`` as CSR [I, U], plus ``d_I^1/2`` and ``d_I^-1/2``
    (zero for items without training interactions)."""
    du = graph.user_degree.to(torch.float32)
    di = graph.item_degree.to(torch.float32)
    du_m = torch.where(du > 0, du.clamp(min=1).rsqrt(), torch.zeros_like(du))
    di_m = torch.where(di > 0, di.clamp(min=1).rsqrt(), torch.zeros_like(di))
    urows = torch.repeat_interleave(torch.arange(graph.num_users), graph.user_degree)
    irows = torch.repeat_interleave(torch.arange(graph.num_items), graph.item_degree)
    # The CSRs come from a BipartiteGraph (validated when built): no invariant checks per call.
    with warnings.catch_warnings():   # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        r = torch.sparse_csr_tensor(graph.user_rowptr, graph.user_col, du_m[urows] * di_m[graph.user_col],
                                    (graph.num_users, graph.num_items), check_invariants=False)
        rt = torch.sparse_csr_tensor(graph.item_rowptr, graph.item_col, di_m[irows] * du_m[graph.item_col],
                                     (graph.num_items, graph.num_users), check_invariants=False)
    return r, rt, di.sqrt(), di_m


def top_right_singular_vectors(r: torch.Tensor, rank: int, oversample: int = 32, iters: int = 4,
                               seed: int = 0) -> torch.Tensor:
    """[I, rank] top right singular vectors of the sparse ``r``: randomised subspace iteration
    (Halko et al.) on ``r^T r``, re-orthonormalised every step, then a small dense eigenproblem."""
    n = r.size(1)
    q = min(rank + oversample, n)
    gen = torch.Generator().manual_seed(seed)
    rt = r.t().to_sparse_csr() if r.layout == torch.sparse_csr else r.t()
    basis = torch.linalg.qr(torch.randn(n, q, generator=gen))[0]
    for _ in range(iters):
        basis = torch.linalg.qr(torch.sparse.mm(rt, torch.sparse.mm(r, basis)))[0]
    small = basis.T @ torch.sparse.mm(rt, torch.sparse.mm(r, basis))      # [q, q], symmetric
    evals, evecs = torch.linalg.eigh((small + small.T) / 2)
    top = torch.argsort(evals, descending=True)[:rank]
    return (basis @ evecs[:, top]).contiguous()


class GraphFilter(nn.Module):
    """GF-CF / BSPM scorer (module docstring). ``fit()`` once, then ``scorer()`` like any model.

    ``rank`` K of the ideal low-pass filter (0 = none), ``ideal_weight`` its weight w,
    ``sharpen_time`` T (0 = no sharpening: GF-CF), ``sharpen_steps`` and ``sharpen_solver``.
    """

    trainable = False

    def __init__(self, graph, rank: int = 256, ideal_weight: float = 0.3, sharpen_time: float = 0.0,
                 sharpen_steps: int = 1, sharpen_solver: str = "euler", svd_iters: int = 4, seed: int = 0):
        super().__init__()
        if not (isinstance(rank, int) and 0 <= rank <= graph.num_items):
            raise ValueError(f"filter_rank: expected an int in [0, num_items={graph.num_items}], got {rank!r}")
        if not math.isfinite(ideal_weight):
            raise ValueError(f"ideal_weight: expected a finite number, got {ideal_weight!r}")
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.rank, self.ideal_weight, self.svd_iters, self.seed = rank, float(ideal_weight), svd_iters, seed
        self.poly = sharpen_poly(sharpen_solver, sharpen_steps, float(sharpen_time))
        self.hparams = {"rank": rank, "ideal_weight": float(ideal_weight), "sharpen_time": float(sharpen_time),
                        "sharpen_steps": sharpen_steps, "sharpen_solver": sharpen_solver}
        self._dummy = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the module a device
        self.register_buffer("ideal_in", torch.zeros(0))    # [I, K]  D_I^-1/2 V_K
        self.register_buffer("ideal_out", torch.zeros(0))   # [K, I]  V_K^T D_I^1/2 p(P~)
        self._fitted = False
        self._memo_rows = 0                 # memoise(): capacity in users; 0 = off
        self._memo = self._memo_slot = None
        self._memo_used = 0

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self) -> "GraphFilter":
        r, rt, di_half, di_mhalf = normalised_csr(self.graph.to("cpu"))
        self._r, self._rt = r, rt
        if self.rank:
            v = top_right_singular_vectors(r, self.rank, iters=self.svd_iters, seed=self.seed)
            self.ideal_in = di_mhalf[:, None] * v
            # V^T D^1/2 p(P~) as columns: p(P~) (D^1/2 V), P~ symmetric.
            self.ideal_out = self._apply_poly((v * di_half[:, None]), self.poly).T.contiguous()
        self._fitted = True
        return self

    def _apply_poly(self, x: torch.Tensor, coefs) -> torch.Tensor:
        """``p(P~) x`` for columns ``x`` [I, n] by Horner's rule: ``len(coefs) - 1`` products."""
        acc = coefs[-1] * x
        for c in reversed(coefs[:-1]):
            acc = self._p(acc)          # a new tensor: the in-place add below is safe
            if c:
                acc = acc.add_(x, alpha=c)
        return acc

    def _rows(self, users: torch.Tensor) -> torch.Tensor:
        """The users' training rows as a sparse CSR [len(users), I] of ones."""
        from ..metrics import csr_rows
        g = self.graph.to("cpu")
        users = users.cpu()
        _, col = csr_rows(g.user_rowptr, g.user_col, users)
        rowptr = torch.zeros(users.numel() + 1, dtype=torch.long)
        torch.cumsum(g.user_degree[users], 0, out=rowptr[1:])
        return torch.sparse_csr_tensor(rowptr, col, torch.ones(col.numel()), (users.numel(), self.num_items),
                                       check_invariants=False)

    def _p(self, x: torch.Tensor) -> torch.Tensor:
        """``P~ x`` for dense columns ``x`` [I, n], as ``R~^T (R~ x)``."""
        return torch.sparse.mm(self._rt, torch.sparse.mm(self._r, x))

    def _first_hop(self, users: torch.Tensor, out_index=None) -> torch.Tensor:
        """``r P~`` for the users' 0/1 rows ``r``: [len(users), I] (columns at ``out_index``), over each
        user's two-hop neighbourhood (``ops.gram_rows``) instead of a dense block of mostly zeros."""
        from .. import ops
        return ops.gram_rows(self._r, self._rt, users.cpu(), out_index)

    @torch.no_grad()
    def scores(self, users: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Filter scores [len(users), I] (module docstring), computed on the CPU; with ``order`` the
        columns come in that item order (``scores(users)[:, order]``)."""
        if not self._fitted:
            raise RuntimeError("GraphFilter: call fit() before scoring")
        users = users.cpu()
        if order is not None:
            order = order.cpu()
        if len(self.poly) == 1:      # GF-CF: r P~ is the only product; it writes the columns in order
            rank = None
            if order is not None:
                rank = torch.empty_like(order)
                rank[order] = torch.arange(order.numel())
            acc = self._first_hop(users, rank).mul_(self.poly[0])
            ideal_out = self.ideal_out if order is None or not self.rank else self.ideal_out[:, order]
        else:                        # r P~ p(P~) = (p(P~) y)^T for the columns y = (r P~)^T
            acc = self._apply_poly(self._first_hop(users).T.contiguous(), self.poly).T.contiguous()
            ideal_out = self.ideal_out
        if self.rank and self.ideal_weight:
            t = torch.sparse.mm(self._rows(users), self.ideal_in)      # r D^-1/2 V: [b, K], nnz x K work
            acc.addmm_(t, ideal_out, alpha=self.ideal_weight)
        if order is not None and len(self.poly) > 1:
            acc = acc.index_select(1, order)
        return acc

    def memoise(self, max_bytes: int) -> None:
        """Keep the scores of up to ``max_bytes // (4 * num_items)`` users once computed, and serve
        them from memory after that (float32, exact). A fitted filter never changes, so a caller that
        ranks the same users again and again (ScoreHybrid's evaluation at every epoch) pays for the
        sparse products once; users beyond the capacity are recomputed on every call."""
        self._memo_rows = min(self.num_users, int(max_bytes) // (4 * max(self.num_items, 1)))
        self._memo = self._memo_slot = None
        self._memo_used = 0

    def memo_scores(self, users: torch.Tensor) -> torch.Tensor:
        """``scores(users)`` (a new tensor), through the memo of :meth:`memoise`."""
        users = users.cpu()
        if not self._memo_rows:
            return self.scores(users)
        if self._memo is None:
            self._memo = torch.empty(self._memo_rows, self.num_items)      # pages touched as rows are stored
            self._memo_slot = torch.full((self.num_users,), -1, dtype=torch.long)
        slot = self._memo_slot[users]
        miss = slot < 0
        if not miss.any():
            return self._memo.index_select(0, slot)
        out = torch.empty(users.numel(), self.num_items)
        if not miss.all():
            out[~miss] = self._memo[slot[~miss]]
        new, inverse = torch.unique(users[miss], return_inverse=True)
        fresh = self.scores(new)
        out[miss] = fresh[inverse]
        take = min(new.numel(), self._memo_rows - self._memo_used)
        if take:
            rows = torch.arange(self._memo_used, self._memo_used + take)
            self._memo[rows] = fresh[:take]
            self._memo_slot[new[:take]] = rows
            self._memo_used += take
        return out

    # ------------------------------------------------------------------ the Recommender surface
    def scorer(self):
        return _FilterScorer(self)

    def export(self) -> dict:
        """What ``recommend`` needs to rebuild this scorer without refitting."""
        return {"filter": dict(self.hparams), "ideal_in": self.ideal_in.cpu(), "ideal_out": self.ideal_out.cpu()}

    @classmethod
    def from_export(cls, graph, ex: dict) -> "GraphFilter":
        m = cls(graph, **ex["filter"])
        r, rt, _, _ = normalised_csr(graph)
        m._r, m._rt = r, rt
        m.ideal_in, m.ideal_out = ex["ideal_in"], ex["ideal_out"]
        m._fitted = True
        return m


class _FilterScorer:
    """``users -> scores`` of a fitted filter; ``reorder`` gives the scorer whose columns come in a
    given item order (``metrics.evaluate`` asks for context-contiguous columns)."""
    fresh_tiles = True   # every call builds a new tile

    def __init__(self, model: GraphFilter, order=None):
        self.model, self.order = model, order

    def __call__(self, users):
        with torch.no_grad():
            m = self.model
            if m._memo_rows:          # memoised rows are in the natural order
                s = m.memo_scores(users)
                if self.order is not None:
                    s = s.index_select(1, self.order.cpu())
            else:
                s = m.scores(users, self.order)
            return s.to(m._dummy.device)

    def reorder(self, order):
        return _FilterScorer(self.model, order)


TUNE_RANKS = (128, 256, 512)
TUNE_IDEAL_WEIGHTS = (0.1, 0.3, 0.5)
TUNE_SHARPEN_TIMES = (1.5, 2.5)     # bspm: one RK4 step over [0, T]


def tune(cfg, graph, valid: torch.Tensor, exclude=()) -> dict:
    """``--tune_filter``: the config with ``filter_rank``, ``ideal_weight`` (and for bspm the sharpening)
    chosen on ``valid`` by :func:`grid_search` over ``TUNE_*`` (every validation user scored)."""
    if valid.numel() == 0:
        raise ValueError("tune_filter: the validation split is empty (a given train/test split has none: add "
                         "--valid_fraction 0.1 to carve one out of train)")
    ranks = tuple(sorted({min(k, graph.num_items) for k in TUNE_RANKS}))   # a small graph has fewer
    sharpen = (tuple(("rk4", 1, t) for t in TUNE_SHARPEN_TIMES) if cfg["model"] == "bspm"
               else (("euler", 1, 0.0),))
    table = grid_search(graph, valid, exclude=exclude, ranks=ranks, ideal_weights=TUNE_IDEAL_WEIGHTS,
                        sharpen=sharpen, num_users=None, seed=cfg["seed"])
    best = table[0]
    log.info("tune_filter: %s with K=%d, w=%.1f, sharpening %s T=%.1f: valid ndcg@20 %.4f (best of %d on the grid)",
             cfg["model"], best["rank"], best["ideal_weight"], best["sharpen_solver"], best["sharpen_time"],
             best["ndcg@20"], len(table))
    return dict(cfg, filter_rank=best["rank"], ideal_weight=best["ideal_weight"], sharpen_time=best["sharpen_time"],
                sharpen_steps=best["sharpen_steps"], sharpen_solver=best["sharpen_solver"])


def build(cfg, graph, ds=None) -> GraphFilter:
    """``--model gfcf`` (sharpening off unless ``sharpen_time`` is set) or ``--model bspm``; with
    ``tune_filter`` the hyperparameters come from :func:`tune` on ``ds.valid``."""
    if cfg.get("tune_filter"):
        if ds is None:
            raise ValueError("tune_filter: needs the dataset (its validation split) to choose on")
        cfg = tune(cfg, graph, ds.valid, exclude=[ds.train])
    return GraphFilter(graph, rank=cfg["filter_rank"], ideal_weight=cfg["ideal_weight"],
                       sharpen_time=cfg["sharpen_time"] if cfg["model"] == "bspm" else 0.0,
                       sharpen_steps=cfg["sharpen_steps"], sharpen_solver=cfg["sharpen_solver"],
                       seed=cfg["seed"])


@torch.no_grad()
def grid_search(graph, valid: torch.Tensor, exclude=(), ranks=(256,), ideal_weights=(0.3,),
                sharpen=(("euler", 1, 0.0),), num_users: int | None = 5000, batch_size: int = 1024,
                seed: int = 0, key: str = "ndcg@20") -> list[dict]:
    """Valid metrics of every filter setting on a grid, best first (choose on validation only).

    ``sharpen``: (solver, steps, time) triples; ``ranks`` may differ (the SVD is computed once at the
    largest rank and truncated). Every setting scores the same ``num_users`` sampled validation
    users (all when None). Per user batch the basis ``r P~^j`` (j up to the largest degree) and the
    low-rank terms (one thin product per sharpening at the largest rank, ranks below it as its
    leading partial sums) are computed once; each setting is then a weighted sum of them, so a grid
    of many settings costs little more than its most expensive member. (A rank below the largest uses
    the leading columns of the largest SVD, which can differ slightly from an SVD at that rank.)
    """
    from .. import metrics
    polys = [(s, sharpen_poly(*s)) for s in sharpen]
    degree = max(len(p) for _, p in polys)                 # r P~^1 .. r P~^degree are needed
    base = GraphFilter(graph, rank=max(ranks)).fit()      # no sharpening: ideal_out = (D^1/2 V)^T
    v_half = base.ideal_out.T if max(ranks) else None       # [I, K]
    w_pow = []                                              # [K, I]: V^T D^1/2 P~^j
    if v_half is not None:
        acc = v_half
        for j in range(degree):
            w_pow.append(acc.T.contiguous())
            if j + 1 < degree:
                acc = base._p(acc)
    users = torch.unique(valid[:, 0])
    if num_users is not None and users.numel() > num_users:
        gen = torch.Generator().manual_seed(seed)
        users = users[torch.randperm(users.numel(), generator=gen)[:num_users]].sort().values
    settings = list(dict.fromkeys((k if w else 0, w if k else 0.0, s, tuple(p)) for k in ranks
                                  for w in ideal_weights for s, p in polys))   # rank is moot at weight 0
    sums = [dict() for _ in settings]
    n_total = 0
    keep = torch.isin(valid[:, 0], users)
    valid = valid[keep]
    # Per polynomial p: its low-rank factor V^T D^1/2 p(P~) [K, I] (batch-independent), and the ranks
    # its settings use, ascending: a batch's rank-k term is the rank-(k-1 on the grid) term plus one
    # thin product, so every rank costs one product at the largest rank per batch.
    by_poly = {}
    for idx, (k, w, _, p) in enumerate(settings):
        by_poly.setdefault(p, []).append((idx, k, w))
    low_factor = {p: sum(c * w_pow[j] for j, c in enumerate(p) if c) for p in by_poly} if w_pow else {}
    for start in range(0, users.numel(), batch_size):
        ub = users[start:start + batch_size]
        acc = base._first_hop(ub).T.contiguous()
        m_pow = [acc]                                           # [I, b]: (r P~^j)^T, j = 1..degree
        for _ in range(degree - 1):
            acc = base._p(acc)
            m_pow.append(acc)
        t = torch.sparse.mm(base._rows(ub), base.ideal_in) if v_half is not None else None
        vb = valid[torch.isin(valid[:, 0], ub)]
        ex = [e[torch.isin(e[:, 0], ub)] for e in exclude]
        for p, members in by_poly.items():
            lin = sum(c * m_pow[j] for j, c in enumerate(p) if c).T.contiguous()     # [b, I]
            low, prev = {}, 0
            for k in sorted({k for _, k, w in members if k and w}):
                part = t[:, prev:k] @ low_factor[p][prev:k]
                low[k] = part if not low else part.add_(low[max(low)])
                prev = k
            for idx, k, w in members:
                tile = torch.add(lin, low[k], alpha=w) if k and w else lin.clone()   # evaluate writes into it
                m = metrics.evaluate(metrics.TileScorer(tile), vb, graph.num_users, graph.num_items, exclude=ex,
                                     ks=(20,), batch_size=ub.numel())
                for name, val in m.items():
                    if name != "n_users":
                        sums[idx][name] = sums[idx].get(name, 0.0) + val * m["n_users"]
        n_total += ub.numel()
    out = []
    for (k, w, s, _), sm in zip(settings, sums):
        out.append({"rank": k, "ideal_weight": w, "sharpen_solver": s[0], "sharpen_steps": s[1],
                    "sharpen_time": s[2], **{name: v / n_total for name, v in sm.items()}, "n_users": n_total})
    return sorted(out, key=lambda d: -d[key])
