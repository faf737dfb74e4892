"""BipartiteGraph: the user–item interaction graph in CSR form, both directions.

No dense adjacency is ever built. Users come first in the joint node numbering: user ``u`` is
node ``u`` and item ``i`` is node ``num_users + i``. The joint CSR (``rowptr``, ``col``) holds both
directions, so LightGCN's symmetric normalised adjacency is ``D^-1/2 A D^-1/2`` with ``dinv =
deg^-1/2`` applied on the fly by the kernels (isolated nodes get ``dinv = 0``).
"""
from __future__ import annotations

import functools

import torch

# Item contexts (DESIGN.md): cold = no training interaction; head = among the top 20% of items by
# training interactions; tail = every other warm item. A cold item is never head.
ITEM_COLD, ITEM_HEAD, ITEM_TAIL = 0, 1, 2
ITEM_CONTEXT_NAMES = {ITEM_COLD: "cold", ITEM_HEAD: "head", ITEM_TAIL: "tail"}
# The item groups evaluation reports (metrics.evaluate's "/cold", "/warm", ... keys): name -> contexts.
CONTEXTS = {"cold": (ITEM_COLD,), "warm": (ITEM_HEAD, ITEM_TAIL), "head": (ITEM_HEAD,), "tail": (ITEM_TAIL,)}
# User contexts: cold = no training interaction.
USER_COLD, USER_WARM = 0, 1
USER_CONTEXT_NAMES = {USER_COLD: "cold", USER_WARM: "warm"}
HEAD_FRACTION = 0.2


def _csr(src: torch.Tensor, dst: torch.Tensor, num_rows: int):
    """CSR of edges src->dst, rows sorted, neighbours sorted within a row."""
    order = torch.argsort(src * (int(dst.max()) + 1 if dst.numel() else 1) + dst, stable=True)
    src, dst = src[order], dst[order]
    counts = torch.bincount(src, minlength=num_rows)
    rowptr = torch.zeros(num_rows + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr, dst.contiguous(), counts


def _check_csr(name: str, rowptr, col, num_rows: int, num_cols: int) -> None:
    for part, t in (("rowptr", rowptr), ("col", col)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}_{part}: expected a 1-d integer tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if rowptr.numel() != num_rows + 1:
        raise ValueError(f"{name}_rowptr: expected {num_rows + 1} entries (num rows + 1), got {rowptr.numel()}")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != col.numel() or bool((rowptr[1:] < rowptr[:-1]).any()):
        raise ValueError(f"{name}_rowptr: expected non-decreasing offsets from 0 to len({name}_col)="
                         f"{col.numel()}, got {int(rowptr[0])}..{int(rowptr[-1])}")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= num_cols):
        raise ValueError(f"{name}_col: ids must lie in [0, {num_cols}), got [{int(col.min())}, {int(col.max())}]")


def _check_symmetric(user_rowptr, user_col, item_rowptr, item_col, num_users: int, num_items: int) -> None:
    """The user and item CSRs hold the same (user, item) pairs, each once (module docstring)."""
    _check_csr("user", user_rowptr, user_col, num_users, num_items)
    _check_csr("item", item_rowptr, item_col, num_items, num_users)
    if user_col.numel() != item_col.numel():
        raise ValueError(f"user_col has {user_col.numel()} edges but item_col {item_col.numel()}: the two CSRs "
                         f"must hold the same (user, item) pairs (a symmetric adjacency)")
    rows = lambda rp: torch.repeat_interleave(torch.arange(rp.numel() - 1), (rp[1:] - rp[:-1]).cpu())  # noqa: E731
    a = rows(user_rowptr.cpu()) * num_items + user_col.cpu().long()
    b = item_col.cpu().long() * num_items + rows(item_rowptr.cpu())
    a, b = torch.sort(a).values, torch.sort(b).values
    if a.numel() > 1 and bool((a[1:] == a[:-1]).any()):
        k = int(a[1:][a[1:] == a[:-1]][0])
        raise ValueError(f"user CSR: duplicate edge (user {k // num_items}, item {k % num_items}); "
                         f"use BipartiteGraph.from_interactions, which merges duplicates")
    if not torch.equal(a, b):
        k = int(a[(a != b).nonzero()[0, 0]])
        raise ValueError(f"the item CSR is not the transpose of the user CSR (first difference near user "
                         f"{k // num_items}, item {k % num_items}): propagate's backward assumes a symmetric "
                         f"adjacency; build the graph with BipartiteGraph.from_interactions")


class BipartiteGraph:
    """CSR user→item and item→user, degrees, symmetric normalisation and contexts."""

    def __init__(self, user_rowptr, user_col, item_rowptr, item_col, num_users: int, num_items: int,
                 validate: bool = True):
        """From the two CSRs of one interaction set: ``user_rowptr/user_col`` (user -> items) and
        ``item_rowptr/item_col`` (item -> users). They must hold the same edges, each seen from its
        side, with no duplicates: the propagation's backward reuses the forward, which is right only
        for that symmetric adjacency. ``validate`` checks it (O(E log E); ``from_interactions``
        builds both sides from one edge list and skips it) and raises ValueError otherwise."""
        if validate:
            _check_symmetric(user_rowptr, user_col, item_rowptr, item_col, int(num_users), int(num_items))
        self.num_users = int(num_users)
        self.num_items = int(num_items)
        self.user_rowptr, self.user_col = user_rowptr, user_col    # user -> items
        self.item_rowptr, self.item_col = item_rowptr, item_col    # item -> users
        self.user_degree = (user_rowptr[1:] - user_rowptr[:-1])
        self.item_degree = (item_rowptr[1:] - item_rowptr[:-1])
        num_edges = int(user_col.numel())
        # Joint CSR over users + items (both directions).
        self.rowptr = torch.cat([user_rowptr, item_rowptr[1:] + num_edges])
        self.col = torch.cat([user_col + self.num_users, item_col])
        deg = torch.cat([self.user_degree, self.item_degree]).to(torch.float32)
        self.dinv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
        self.item_context = self._item_context()
        self.user_context = torch.where(self.user_degree > 0, USER_WARM, USER_COLD).to(torch.long)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_interactions(cls, edges: torch.Tensor, num_users: int, num_items: int) -> "BipartiteGraph":
        """Build from a LongTensor [n, 2] of (user, item) contiguous ids. Duplicates are merged."""
        edges = torch.as_tensor(edges)
        if edges.dim() != 2 or edges.size(1) != 2:
            raise ValueError(f"edges: expected a [n, 2] tensor of (user, item), got shape {tuple(edges.shape)}")
        if edges.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"edges: expected an integer tensor, got {edges.dtype}")
        edges = edges.to(torch.long).cpu()
        if edges.numel():
            if int(edges[:, 0].min()) < 0 or int(edges[:, 0].max()) >= num_users:
                raise ValueError(f"edges: user ids must lie in [0, num_users={num_users}), got "
                                 f"[{int(edges[:, 0].min())}, {int(edges[:, 0].max())}]")
            if int(edges[:, 1].min()) < 0 or int(edges[:, 1].max()) >= num_items:
                raise ValueError(f"edges: item ids must lie in [0, num_items={num_items}), got "
                                 f"[{int(edges[:, 1].min())}, {int(edges[:, 1].max())}]")
        # One sort of the (user, item) keys merges duplicates and orders the user side (a row-wise
        # torch.unique(dim=0) took ~1 min at 32M edges); the item side is a stable sort by item.
        keys = torch.unique(edges[:, 0] * num_items + edges[:, 1])
        u, i = keys.div(max(1, num_items), rounding_mode="floor"), keys.remainder(max(1, num_items))
        del keys
        urp = torch.zeros(num_users + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(u, minlength=num_users), 0, out=urp[1:])
        irp, icol, _ = _csr(i, u, num_items)
        ucol = i
        return cls(urp, ucol, irp, icol, num_users, num_items, validate=False)

    # ------------------------------------------------------------------ properties
    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def num_edges(self) -> int:
        """Number of (user, item) interactions; the joint CSR holds twice as many entries."""
        return int(self.user_col.numel())

    @property
    def device(self) -> torch.device:
        return self.rowptr.device

    def _item_context(self) -> torch.Tensor:
        deg = self.item_degree
        ctx = torch.full((self.num_items,), ITEM_TAIL, dtype=torch.long)
        ctx[deg == 0] = ITEM_COLD
        num_head = int(round(HEAD_FRACTION * self.num_items))
        if num_head > 0:
            # Ties broken by item id (stable sort) so the split is deterministic.
            order = torch.argsort(-deg, stable=True)[:num_head]
            head = order[deg[order] > 0]
            ctx[head] = ITEM_HEAD
        return ctx

    @property
    def cold_items(self) -> torch.Tensor:
        return torch.nonzero(self.item_context == ITEM_COLD).flatten()

    def norm_adj(self) -> torch.Tensor:
        """The normalised joint adjacency as a torch sparse CSR tensor (for the reference path)."""
        key = ("norm_adj", self.rowptr.device)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            rows = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.rowptr.device),
                                           self.rowptr[1:] - self.rowptr[:-1])
            vals = self.dinv[rows] * self.dinv[self.col]
            # The CSR was validated when the graph was built: no per-call invariant checks.
            cache[key] = torch.sparse_csr_tensor(self.rowptr, self.col, vals,
                                                 (self.num_nodes, self.num_nodes), check_invariants=False)
        return cache[key]

    def to(self, device) -> "BipartiteGraph":
        """The graph with every tensor on ``device``: itself when already there, otherwise one copy
        per device, kept, so every holder (a model, its GraphSAGE branch, the training loop) that
        moves the same graph shares one copy instead of each making its own."""
        device = torch.device(device)
        if device == self.rowptr.device:
            return self
        cache = self.__dict__.setdefault("_cache", {})
        key = ("to", str(device))
        if key not in cache:
            new = object.__new__(BipartiteGraph)
            for k, v in self.__dict__.items():
                if k == "_cache":
                    continue
                new.__dict__[k] = v.to(device) if isinstance(v, torch.Tensor) else v
            cache[key] = new
        return cache[key]

    def __repr__(self) -> str:
        return (f"BipartiteGraph(num_users={self.num_users}, num_items={self.num_items}, "
                f"num_edges={self.num_edges}, cold_items={int((self.item_context == ITEM_COLD).sum())})")
