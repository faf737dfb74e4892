"""Pure-PyTorch versions of every op: the ground truth for tests and the baseline for benchmarks.

Tests and benchmarks import these; nobody re-writes a baseline. They are written the way a careful
user of plain PyTorch would write them (``torch.sparse.mm`` per layer, then ``stack`` + ``mean``),
and are differentiable through ordinary autograd.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------- propagate
def propagate_csr(rowptr: torch.Tensor, col: torch.Tensor, dinv: torch.Tensor, x: torch.Tensor,
                  num_layers: int, adj: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of layers 0..K of ``x_{k+1} = D^-1/2 A D^-1/2 x_k`` over the joint CSR graph.

    ``adj`` may pass a prebuilt normalised sparse matrix (as LightGCN's reference code caches it).
    Accumulation is float32 whatever the storage dtype of ``x``.
    """
    if adj is None:
        n = rowptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(n, device=rowptr.device), rowptr[1:] - rowptr[:-1])
        vals = dinv[rows] * dinv[col]
        adj = torch.sparse_csr_tensor(rowptr, col, vals, (n, n))
    out_dtype = x.dtype
    h = x.float()
    layers = [h]
    for _ in range(num_layers):
        h = torch.sparse.mm(adj, h)
        layers.append(h)
    return torch.stack(layers, 0).mean(0).to(out_dtype)


def propagate(graph, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``propagate_csr`` on a ``BipartiteGraph`` (users first), with its cached sparse matrix."""
    return propagate_csr(graph.rowptr, graph.col, graph.dinv, x, num_layers, adj=graph.norm_adj())


# --------------------------------------------------------------------------- gated fusion
def gated_fusion(e_graph: torch.Tensor, e_text: torch.Tensor, context: torch.Tensor,
                 gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """Per-context, per-dimension gate.

    ``g = sigmoid(W[c, 0] * e_graph + W[c, 1] * e_text + b[c])``, ``fused = g * e_graph + (1 - g) * e_text``
    with ``e_graph, e_text: [N, d]``, ``context: [N]`` long in ``[0, C)``, ``gate_weight: [C, 2, d]``,
    ``gate_bias: [C, d]``. Computed in float32, returned in ``e_graph``'s dtype.
    """
    w = gate_weight[context].float()          # [N, 2, d]
    b = gate_bias[context].float()            # [N, d]
    eg, et = e_graph.float(), e_text.float()
    g = torch.sigmoid(w[:, 0] * eg + w[:, 1] * et + b)
    return (g * eg + (1 - g) * et).to(e_graph.dtype)


def gate_values(e_graph, e_text, context, gate_weight, gate_bias) -> torch.Tensor:
    """The gate ``g`` itself (for reports and plots)."""
    w = gate_weight[context].float()
    return torch.sigmoid(w[:, 0] * e_graph.float() + w[:, 1] * e_text.float() + gate_bias[context].float())


# --------------------------------------------------------------------------- neighbour sampling
def neighbor_sample(rowptr: torch.Tensor, col: torch.Tensor, seeds: torch.Tensor, fanouts,
                    replace: bool = False, seed: int = 0):
    """Multi-hop uniform neighbour sampling; same output layout as ``ops.neighbor_sample``.

    Written the plain-torch way (vectorised per hop, a dense ``num_nodes`` id map, ``torch.unique``
    to relabel). Without replacement a node keeps the ``fanout`` neighbours with the smallest
    random keys; with replacement it draws ``fanout`` uniform positions. Random numbers come from
    a ``torch.Generator`` seeded with ``seed``, so the sample differs from the compiled kernels'
    (which use per-node counter-based streams) but has the same distribution and invariants.
    Like the kernels, it validates only the CSR rows and ``col`` entries it touches.
    """
    dev = rowptr.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    num_nodes, num_col = rowptr.numel() - 1, col.numel()
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= num_nodes):
        bad = int(torch.nonzero((seeds < 0) | (seeds >= num_nodes))[0, 0])
        raise ValueError(f"neighbor_sample: seeds[{bad}] = {int(seeds[bad])} is out of range: node ids must lie "
                         f"in [0, num_nodes = rowptr.numel() - 1 = {num_nodes})")
    local = torch.full((num_nodes,), -1, dtype=torch.long, device=dev)  # global -> local id

    def add_new(ids: torch.Tensor, start: int) -> torch.Tensor:
        """Give the ids not yet in ``local`` new local ids from ``start`` in order of first appearance."""
        ids = ids[local[ids] < 0]
        if ids.numel() == 0:
            return ids
        uniq, inv = torch.unique(ids, return_inverse=True)
        pos = torch.arange(ids.numel(), device=dev)
        first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=dev)
        first = first.scatter_reduce(0, inv, pos, reduce="amin")
        new = uniq[torch.argsort(first)]
        local[new] = torch.arange(start, start + new.numel(), device=dev)
        return new

    nodes = add_new(seeds, 0)
    nodes_out, rows_out, cols_out, eids_out = [nodes.clone()], [], [], []
    begin, end = 0, nodes.numel()
    for fanout in fanouts:
        frontier = nodes[begin:end]
        r0, r1 = rowptr[frontier], rowptr[frontier + 1]
        bad = (r0 < 0) | (r1 < r0) | (r1 > num_col)
        if bool(bad.any()):
            v = int(frontier[int(torch.nonzero(bad)[0, 0])])
            raise ValueError(f"neighbor_sample: rowptr is not a valid CSR row pointer at node {v}: rowptr[{v}] = "
                             f"{int(rowptr[v])}, rowptr[{v + 1}] = {int(rowptr[v + 1])} (expected 0 <= rowptr[v] "
                             f"<= rowptr[v + 1] <= col.numel() = {num_col})")
        deg = r1 - r0
        row_local = torch.arange(begin, end, device=dev)
        if replace and fanout >= 0:
            keep = deg > 0
            draws = torch.rand((int(keep.sum()), fanout), generator=gen, device=dev, dtype=torch.float64)
            offs = (draws * deg[keep, None]).long().clamp_max(deg[keep, None] - 1)
            eids = (r0[keep, None] + offs).flatten()
            rows = row_local[keep].repeat_interleave(fanout)
        else:
            # Every neighbour of the frontier, then (fanout >= 0) the `fanout` smallest random keys per row.
            rows = row_local.repeat_interleave(deg)
            seg_start = torch.cumsum(deg, 0) - deg
            within = torch.arange(rows.numel(), device=dev) - seg_start.repeat_interleave(deg)
            eids = r0.repeat_interleave(deg) + within
            if fanout >= 0:
                keys = torch.rand(rows.numel(), generator=gen, device=dev, dtype=torch.float64) + (rows - begin)
                order = torch.argsort(keys)  # rows stay grouped (key's integer part), shuffled within
                eids = eids[order]
                keep = within < fanout  # rank of each shuffled entry within its row
                eids, rows = eids[keep], rows[keep]
        cols_global = col[eids]
        bad = (cols_global < 0) | (cols_global >= num_nodes)
        if bool(bad.any()):
            e = int(eids[int(torch.nonzero(bad)[0, 0])])
            raise ValueError(f"neighbor_sample: col[{e}] = {int(col[e])} is out of range: node ids must lie in "
                             f"[0, num_nodes = rowptr.numel() - 1 = {num_nodes})")
        new = add_new(cols_global, end)
        nodes = torch.cat([nodes, new])
        nodes_out.append(nodes)
        rows_out.append(rows)
        cols_out.append(local[cols_global])
        eids_out.append(eids)
        begin, end = end, nodes.numel()
    return nodes_out, rows_out, cols_out, eids_out


# --------------------------------------------------------------------------- graph filters
def graph_filter_dense(train: torch.Tensor, num_users: int, num_items: int, v: torch.Tensor,
                       ideal_weight: float, poly) -> torch.Tensor:
    """GF-CF / BSPM scores of every user as dense matrices, written straight from the formulas
    (for small graphs only): ``(R P + w R D^-1/2 V V^T D^1/2) p(P)``, ``P = R~^T R~``,
    ``p(P) = sum_j poly[j] P^j``; ``v`` [I, K] are the right singular vectors in use."""
    r = torch.zeros(num_users, num_items, dtype=torch.float64)
    r[train[:, 0], train[:, 1]] = 1.0
    du, di = r.sum(1), r.sum(0)
    du_m = torch.where(du > 0, du.rsqrt(), torch.zeros_like(du))
    di_m = torch.where(di > 0, di.rsqrt(), torch.zeros_like(di))
    rn = du_m[:, None] * r * di_m[None, :]
    p = rn.T @ rn
    v = v.double()
    ideal = torch.diag(di_m) @ v @ v.T @ torch.diag(di.sqrt())
    poly_p = sum(c * torch.linalg.matrix_power(p, j) for j, c in enumerate(poly))
    return (r @ p + ideal_weight * r @ ideal) @ poly_p


# --------------------------------------------------------------------------- full-ranking metrics
def _dense_pair_mask(pairs: torch.Tensor, users: torch.Tensor, num_items: int) -> torch.Tensor:
    """Dense bool [len(users), num_items]: True at each (user, item) of ``pairs`` for those users."""
    row_of = torch.full((int(pairs[:, 0].max()) + 1 if pairs.numel() else 1,), -1, dtype=torch.long)
    row_of[users[users < row_of.numel()]] = torch.arange(users.numel())[users < row_of.numel()]
    mask = torch.zeros((users.numel(), num_items), dtype=torch.bool)
    if pairs.numel():
        rows = row_of[pairs[:, 0]]
        keep = rows >= 0
        mask[rows[keep], pairs[keep, 1]] = True
    return mask


@torch.no_grad()
def evaluate(score_fn, test: torch.Tensor, num_users: int, num_items: int, exclude=(), ks=(10, 20),
             item_context: torch.Tensor | None = None) -> dict:
    """``metrics.evaluate`` written the plain way (dense masks, one full-width top-k per context over
    every test user at once, small inputs only): the ground truth for its tests."""
    import math

    from .metrics import CONTEXTS, METRICS
    ks = sorted({int(k) for k in ks})
    users = torch.unique(test[:, 0])
    scores = score_fn(users).float().clone()
    for p in exclude:
        scores.masked_fill_(_dense_pair_mask(p, users, num_items), -math.inf)
    truth = _dense_pair_mask(test, users, num_items)
    contexts = {"": torch.ones(num_items, dtype=torch.bool)}
    if item_context is not None:
        for name, codes in CONTEXTS.items():
            contexts["/" + name] = torch.isin(item_context, torch.tensor(codes))
    out = {}
    for cname, in_ctx in contexts.items():
        n_rel = (truth & in_ctx).sum(1)
        has = n_rel > 0
        ranked = scores.masked_fill(~in_ctx, -math.inf)
        kc = min(ks[-1], int(in_ctx.sum()))
        top = torch.topk(ranked, kc, dim=1).indices if kc else torch.zeros(users.numel(), 0, dtype=torch.long)
        hits = (truth & in_ctx).gather(1, top).double()
        for k in ks:
            h = hits[:, :k]
            nh = h.sum(1)
            disc = 1.0 / torch.log2(torch.arange(h.size(1), dtype=torch.float64) + 2.0)
            idcg = torch.tensor([sum(1.0 / math.log2(j + 2) for j in range(min(int(n), k))) for n in n_rel],
                                dtype=torch.float64)
            first = torch.where(h.any(1), h.argmax(1).double() + 1.0, torch.full_like(nh, math.inf))
            vals = {"recall": nh / n_rel.clamp(min=1), "precision": nh / k, "ndcg": (h * disc).sum(1) / idcg.clamp(min=1e-12),
                    "hit": (nh > 0).double(), "mrr": 1.0 / first}
            for m in METRICS:
                out[f"{m}@{k}{cname}"] = float(vals[m][has].mean()) if bool(has.any()) else float("nan")
        out["n_users" + cname] = int(has.sum())
    return out
