"""Pure-PyTorch versions of every op: the ground truth for tests and the baseline for benchmarks.

Tests and benchmarks import these; nobody re-writes a baseline. They are written the way a careful
user of plain PyTorch would write them (``torch.sparse.mm`` per layer on a cached CSR matrix, the
layer sum accumulated in place), and are differentiable through ordinary autograd.
"""
from __future__ import annotations

import math

import torch


# --------------------------------------------------------------------------- propagate
def propagate_csr(rowptr: torch.Tensor, col: torch.Tensor, dinv: torch.Tensor, x: torch.Tensor,
                  num_layers: int, adj: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of layers 0..K of ``x_{k+1} = D^-1/2 A D^-1/2 x_k`` over the joint CSR graph.

    ``adj`` may pass a prebuilt normalised sparse matrix (as LightGCN's reference code caches it);
    the products run in ``adj``'s dtype (a bfloat16 matrix gives the bf16-with-bf16 baseline on CUDA).
    Accumulation is float32 whatever the storage dtype of ``x``.
    """
    if adj is None:
        n = rowptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(n, device=rowptr.device), rowptr[1:] - rowptr[:-1])
        vals = dinv[rows] * dinv[col]
        adj = torch.sparse_csr_tensor(rowptr, col, vals, (n, n))
    out_dtype = x.dtype
    h = x.to(adj.dtype)
    out = x.float().clone()
    for _ in range(num_layers):   # the layer sum in place: no [K + 1, N, d] stack
        h = torch.sparse.mm(adj, h)
        out.add_(h)
    return out.div_(num_layers + 1).to(out_dtype)


def propagate(graph, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``propagate_csr`` on a ``BipartiteGraph`` (users first), with its cached sparse matrix."""
    return propagate_csr(graph.rowptr, graph.col, graph.dinv, x, num_layers, adj=graph.norm_adj())


class _SymmetricPropagate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj, x, num_layers):
        ctx.adj, ctx.num_layers = adj, num_layers
        with torch.no_grad():
            return propagate_csr(None, None, None, x, num_layers, adj=adj)

    @staticmethod
    def backward(ctx, grad):
        # The layer mean is a polynomial in the symmetric matrix: its transpose is itself.
        return None, propagate_csr(None, None, None, grad, ctx.num_layers, adj=ctx.adj), None


def propagate_symmetric(graph, x: torch.Tensor, num_layers: int, adj: torch.Tensor | None = None) -> torch.Tensor:
    """``propagate`` with the backward a PyTorch engineer writes for a symmetric ``A``: the same
    torch.sparse CSR products on the incoming gradient (autograd through ``torch.sparse.mm`` would
    transpose the CSR on every backward). The fair baseline of the kernels' fwd+bwd benchmarks;
    ``adj`` (default the graph's cached float32 matrix) may be a cached copy in another dtype."""
    return _SymmetricPropagate.apply(graph.norm_adj() if adj is None else adj, x, num_layers)


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


def gated_fusion_offset(e_graph, e_text, context, gate_weight, gate_bias, offset) -> torch.Tensor:
    """``gated_fusion`` with a per-row offset ``[N, d]`` on the gate logit (the hybrid's continuous
    gate: ``offset`` is its network's output for each row):
    ``g = sigmoid(W[c, 0] * e_graph + W[c, 1] * e_text + b[c] + offset)``."""
    w = gate_weight[context].float()
    b = gate_bias[context].float() + offset.float()
    eg, et = e_graph.float(), e_text.float()
    g = torch.sigmoid(w[:, 0] * eg + w[:, 1] * et + b)
    return (g * eg + (1 - g) * et).to(e_graph.dtype)


def gate_values(e_graph, e_text, context, gate_weight, gate_bias) -> torch.Tensor:
    """The gate ``g`` itself (for reports and plots)."""
    w = gate_weight[context].float()
    return torch.sigmoid(w[:, 0] * e_graph.float() + w[:, 1] * e_text.float() + gate_bias[context].float())


def gated_fusion_backward(grad_out, e_graph, e_text, context, gate_weight, gate_bias):
    """Closed-form gradients of ``gated_fusion`` (float32 math): ``(d_e_graph, d_e_text, d_gate_weight,
    d_gate_bias)`` for the incoming ``grad_out``; autograd through ``gated_fusion`` checks it."""
    go, eg, et = grad_out.float(), e_graph.float(), e_text.float()
    w = gate_weight[context].float()
    g = torch.sigmoid(w[:, 0] * eg + w[:, 1] * et + gate_bias[context].float())
    dl = go * (eg - et) * g * (1 - g)
    d_eg = go * g + dl * w[:, 0]
    d_et = go * (1 - g) + dl * w[:, 1]
    C, d = gate_bias.shape
    d_w = torch.zeros((C, 2, d), dtype=torch.float32, device=eg.device)
    d_w[:, 0].index_add_(0, context, dl * eg)
    d_w[:, 1].index_add_(0, context, dl * et)
    d_b = torch.zeros((C, d), dtype=torch.float32, device=eg.device).index_add_(0, context, dl)
    return (d_eg.to(e_graph.dtype), d_et.to(e_text.dtype), d_w.to(gate_weight.dtype), d_b.to(gate_bias.dtype))


# --------------------------------------------------------------------------- sampled softmax
def sampled_softmax(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_ids: torch.Tensor,
                    neg_ids: torch.Tensor, temperature: float, pos_bias: torch.Tensor | None = None,
                    neg_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``models.losses.sampled_softmax`` as a careful user of plain PyTorch writes it: the [B, N]
    negative logits from one ``addmm`` (offset folded in, temperature on the [B, d] side), masked in
    place where a negative is the row's positive, then ``cross_entropy`` with the positive first."""
    u, pos, neg = (torch.nn.functional.normalize(t, dim=-1) for t in (u, pos, neg))
    us = u / temperature
    pos_logit = (us * pos).sum(-1, keepdim=True)                                # [B, 1]
    if pos_bias is None:
        neg_logit = us @ neg.T                                                  # [B, N]
    else:
        pos_logit = pos_logit + pos_bias[:, None]
        neg_logit = torch.addmm(neg_bias[None, :], us, neg.T)
    neg_logit = neg_logit.masked_fill_(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    target = torch.zeros(u.size(0), dtype=torch.long, device=u.device)
    return torch.nn.functional.cross_entropy(torch.cat([pos_logit, neg_logit], 1), target)


# --------------------------------------------------------------------------- row-sparse Adam
def row_adam_(param, exp_avg, exp_avg_sq, rows, grad, step_size: float, beta1: float, beta2: float, eps: float,
              bc2_sqrt: float) -> None:
    """Adam's update restricted to ``rows`` (unique) of ``param`` and its moments, in place."""
    m = exp_avg.index_select(0, rows).lerp_(grad, 1 - beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    param.index_add_(0, rows, m.div_((v.sqrt_() / bc2_sqrt).add_(eps)), alpha=-step_size)


# --------------------------------------------------------------------------- sampled-block aggregation
def block_aggregate(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                    num_rows: int) -> torch.Tensor:
    """``out[r] = sum_{edges e = (r, c)} values[e] * h[c]`` by gathering every edge's row (what
    ``sampling.aggregate`` computes as a sparse product, without the ``[edges, d]`` temporary)."""
    return h.new_zeros((num_rows, h.size(1))).index_add_(0, rows, h[cols] * values.to(h.dtype).unsqueeze(1))


def csr_transpose(rowptr: torch.Tensor, col: torch.Tensor, num_cols: int):
    """``(t_rowptr, t_col, order)``: the transposed CSR of ``(rowptr, col)`` (``t_col`` lists each edge's
    row, edges grouped by column in their original order) and ``order = argsort(col, stable=True)``."""
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=col.device), rowptr.diff())
    order = torch.argsort(col, stable=True)
    t_rowptr = torch.zeros(num_cols + 1, dtype=torch.long, device=col.device)
    torch.cumsum(torch.bincount(col, minlength=num_cols), 0, out=t_rowptr[1:])
    return t_rowptr, rows[order], order


def block_mean_concat(rowptr: torch.Tensor, col: torch.Tensor, t_rowptr: torch.Tensor, t_col: torch.Tensor,
                      h: torch.Tensor, index: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
    """``[h[:n] | mean over each row's sampled neighbours]`` (``[n, 2d]``, ``n = rowptr.numel() - 1``),
    the input of a GraphSAGE mean-aggregator layer: a slice, a gather-sum and a cat, differentiable
    by torch's autograd. ``t_rowptr, t_col`` (the transposed CSR) are the compiled backward's.
    With ``index`` (the table row of each of the block's local rows), ``h`` is the ID table and
    ``col`` names each edge's neighbour by its table row. ``out_dtype`` (default ``h``'s): the result's
    dtype; bfloat16 ``h`` is summed in float32, as the compiled kernel does."""
    if h.dtype == torch.bfloat16 or (out_dtype is not None and out_dtype != h.dtype):
        x = h.float() if h.dtype == torch.bfloat16 else h
        return block_mean_concat(rowptr, col, t_rowptr, t_col, x, index).to(out_dtype or h.dtype)
    if index is not None:
        n = rowptr.numel() - 1
        counts = rowptr[1:] - rowptr[:-1]
        rows = torch.repeat_interleave(torch.arange(n, device=h.device), counts)
        inv = 1.0 / counts.clamp(min=1).to(h.dtype)
        return torch.cat([h[index[:n]], block_aggregate(h, rows, col, inv[rows], n)], 1)
    n = rowptr.numel() - 1
    counts = rowptr[1:] - rowptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n, device=h.device), counts)
    inv = 1.0 / counts.clamp(min=1).to(h.dtype)
    return torch.cat([h[:n], block_aggregate(h, rows, col, inv[rows], n)], 1)


def block_mean_concat_backward(rowptr: torch.Tensor, t_rowptr: torch.Tensor, t_col: torch.Tensor,
                               grad: torch.Tensor, order: torch.Tensor | None = None,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gradient of :func:`block_mean_concat` in the block's rows (``[m, d]``, ``m = t_rowptr.numel() - 1``):
    the self half into the first ``n`` rows plus the mean half spread back over the transposed CSR;
    with ``order``, row ``s`` holds local row ``order[s]``'s gradient. ``out_dtype`` (default
    ``grad``'s): the result's dtype; a bfloat16 ``grad`` is summed in float32."""
    if grad.dtype == torch.bfloat16 or (out_dtype is not None and out_dtype != grad.dtype):
        g = grad.float() if grad.dtype == torch.bfloat16 else grad
        return block_mean_concat_backward(rowptr, t_rowptr, t_col, g, order).to(out_dtype or grad.dtype)
    if order is not None:
        return block_mean_concat_backward(rowptr, t_rowptr, t_col, grad)[order]
    n, m, d = rowptr.numel() - 1, t_rowptr.numel() - 1, grad.size(1) // 2
    inv = 1.0 / (rowptr[1:] - rowptr[:-1]).clamp(min=1).to(grad.dtype)
    t_rows = torch.repeat_interleave(torch.arange(m, device=grad.device), t_rowptr[1:] - t_rowptr[:-1])
    out = block_aggregate(grad[:, d:], t_rows, t_col, inv[t_col], m)
    out[:n] += grad[:, :d]
    return out


def dense_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tanh: bool) -> torch.Tensor:
    """``x weight^T + bias``, then ``tanh`` when asked: a GraphSAGE layer after its input concat."""
    out = torch.nn.functional.linear(x, weight, bias)
    return torch.tanh(out) if tanh else out


def dense_layer_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, tanh: bool):
    """``(dx, dweight, dbias)`` of :func:`dense_layer` for the upstream ``grad``; ``y`` is its output
    (tanh's derivative is ``1 - y^2``)."""
    dz = torch.ops.aten.tanh_backward(grad, y) if tanh else grad
    return dz @ weight, dz.t() @ x, dz.sum(0)


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
TOPK_TIE_HASH = 0x9E3779B1   # ops.topk_rows's tie order: columns by (col * TOPK_TIE_HASH) mod 2^32, smaller first


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.topk_rows``: each row's first ``k`` columns by value, descending (NaN first), ties in the fixed
    pseudo-random column order of ``TOPK_TIE_HASH``: a stable sort of the columns put in that order."""
    order = torch.argsort(torch.arange(x.size(1), dtype=torch.long, device=x.device) * TOPK_TIE_HASH % (1 << 32))
    values, pos = torch.sort(x[:, order], dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), order[pos[:, :k]].contiguous()


def gram_rows(rowptr, col, val, t_rowptr, t_col, t_val, rows, out_index) -> torch.Tensor:
    """``ops.gram_rows``: ``pattern(R[rows]) T R`` as ``(T (R X))^T`` with torch's CSR x dense product on the
    dense [I, len(rows)] block ``X`` of the rows' 0/1 patterns, then the columns scattered to ``out_index``."""
    import warnings
    num_u, num_i = rowptr.numel() - 1, t_rowptr.numel() - 1
    with warnings.catch_warnings():   # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        # Checked: this is also the fallback without the compiled kernel (a bad CSR raises, never reads wild).
        r = torch.sparse_csr_tensor(rowptr, col, val, (num_u, num_i), check_invariants=True)
        t = torch.sparse_csr_tensor(t_rowptr, t_col, t_val, (num_i, num_u), check_invariants=True)
    dev = rowptr.device
    rp, cl = rowptr.cpu(), col.cpu()
    spans = [cl[rp[u]:rp[u + 1]] for u in rows.tolist()]    # each row's pattern: its items
    pos = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([s.numel() for s in spans], dtype=torch.long))
    items = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    x = torch.zeros(num_i, rows.numel(), device=dev)
    x[items.to(dev), pos.to(dev)] = 1.0
    nat = torch.sparse.mm(t, torch.sparse.mm(r, x)).T
    out = torch.empty_like(nat)
    out[:, out_index] = nat
    return out


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


def text_knn_dense(content: torch.Tensor, train: torch.Tensor, num_users: int, neighbours: int,
                   power: float) -> torch.Tensor:
    """TextKNN's scores of every user as dense matrices, written from the formula (small data only):
    ``R @ S`` with ``S[j, i] = max(0, cos(c_j, c_i)) ** power`` kept for the ``neighbours`` largest
    cosines of row ``j`` (the diagonal excluded), zero elsewhere."""
    c = torch.nn.functional.normalize(content.double(), dim=1)
    n = c.size(0)
    sim = c @ c.T
    sim.fill_diagonal_(-math.inf)
    k = min(neighbours, n - 1)
    top = torch.topk(sim, k, dim=1)
    s = torch.zeros(n, n, dtype=torch.float64).scatter_(1, top.indices, top.values.clamp(min=0) ** power)
    r = torch.zeros(num_users, n, dtype=torch.float64)
    r[train[:, 0], train[:, 1]] = 1.0
    return r @ s


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
    from .graph import CONTEXTS
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
            for m, v in vals.items():
                out[f"{m}@{k}{cname}"] = float(v[has].mean()) if bool(has.any()) else float("nan")
        out["n_users" + cname] = int(has.sum())
    return out


# --------------------------------------------------------------------------- grokking_observe
# One event record (a row of float64; step and branch/kind indices are exact integers there).
EVENT_FIELDS = ("step", "branch", "kind", "jump", "value", "baseline", "statistic", "threshold",
                "weight_norm_change", "prior")
# One history record per observe() call: these fields x branches.
HISTORY_FIELDS = ("train_loss", "weight_norm", "val_metric", "train_ema", "weight_norm_ema", "baseline",
                  "stat_up", "stat_down", "armed", "fusion_prior")
# Rows of the per-branch state tensor [len(STATE_ROWS), num_branches].
STATE_ROWS = ("train_ema", "weight_norm_ema", "val_last",       # "levels": rows as in the input vals
              "seen_train", "seen_weight_norm", "seen_val",     # finite observations so far
              "train_init", "fit_run", "noise_var", "ph_n", "ph_mean", "ph_up", "ph_down",
              "ph_up_min", "ph_down_min", "refractory_left", "fusion_prior")
# Order of the float config list handed to the observe kernel.
KERNEL_CONFIG = ("ema_alpha", "fit_ratio", "flat_tol", "patience", "min_jump", "drift", "threshold",
                 "drift_sigmas", "jump_sigmas", "threshold_sigmas", "weight_norm_tol", "weight_norm_discount",
                 "refractory", "respond", "prior_step", "prior_bound", "max_events")


def grokking_observe(state: torch.Tensor, ring: torch.Tensor, event_buf: torch.Tensor, event_count: torch.Tensor,
                      history_row: torch.Tensor, vals: torch.Tensor, config: list[float], step: int,
                      slot: int) -> None:
    """One ``grokking.GrokkingMonitor`` update in pure torch, in place (the method: that module's doc).

    state [len(STATE_ROWS), B]; ring [window, 3, B] (levels of past calls, slot = calls % window);
    event_buf [max_events + B, len(EVENT_FIELDS)]; event_count int64 0-dim; history_row
    [len(HISTORY_FIELDS), B] or empty (no history); vals [3, B] = train loss, weight norm, val
    metric (NaN = not observed); config = floats in KERNEL_CONFIG order. Elementwise ops, one
    index_copy_, no value read back: works on any device, including ``meta``.
    """
    c = dict(zip(KERNEL_CONFIG, config))
    (tr_ema, wn_ema0, val_last, seen_t, seen_w, seen_v, train_init, fit_run, noise_var, ph_n, ph_mean,
     ph_up, ph_dn, ph_up_min, ph_dn_min, refractory_left, prior) = state.unbind(0)
    levels, seen = state[0:3], state[3:6]
    ok = vals.abs() < math.inf                             # finite (NaN compares False)
    tl, wn, x = vals.unbind(0)
    ok_t, _, ok_v = ok.unbind(0)

    # EMAs of train loss and weight norm; the val row keeps the last value.
    first = ok & (seen == 0)
    smoothed = torch.cat([torch.lerp(levels[0:2], vals[0:2], c["ema_alpha"]), vals[2:3]])
    new_levels = torch.where(ok, torch.where(first, vals, smoothed), levels)
    new_seen = seen + ok.to(seen.dtype)
    new_init = torch.where(first[0], tl, train_init)
    ema_old, wn_old, val_old = ring[slot].unbind(0)        # the levels `window` calls ago
    ema, wn_ema = new_levels[0], new_levels[1]

    # 1. fit: low and flat training loss; armed = fit for `patience` calls before this one.
    scale = new_init.abs()
    fit_now = (ema <= c["fit_ratio"] * scale) & ((ema - ema_old).abs() <= c["flat_tol"] * scale)
    armed = fit_run >= c["patience"]
    new_fit_run = torch.where(ok_t, (fit_run + 1) * fit_now, fit_run)

    # 3. weight norm evidence: relative change of its EMA over the window (NaN -> not falling).
    wn_change = wn_ema / wn_old - 1
    falling = wn_change < -c["weight_norm_tol"]

    # Noise of the val metric from winsorised successive differences; effective thresholds.
    sigma = noise_var.mul(0.5).sqrt()
    lim = sigma.mul(4.0).add_(0.5 * c["min_jump"])
    d = torch.clamp(x - val_last, -lim, lim)
    new_noise = torch.where(d.abs() < math.inf, torch.lerp(noise_var, d * d, 0.1), noise_var)
    drift = sigma.mul(c["drift_sigmas"]).clamp_(min=c["drift"])
    min_jump = sigma.mul(c["jump_sigmas"]).clamp_(min=c["min_jump"])
    thr_dn = sigma.mul(c["threshold_sigmas"]).clamp_(min=c["threshold"])
    thr_up = torch.where(falling, thr_dn * c["weight_norm_discount"], thr_dn)

    # 2. two-sided Page–Hinkley on the val metric against the running mean since arming.
    active = ok_v & armed & (refractory_left <= 0)
    n1 = ph_n + 1
    jump = x - ph_mean                                     # vs the baseline before x
    mean = torch.where(ph_n > 0, ph_mean + jump / n1, x)
    dev = x - mean
    m_up = ph_up + dev - drift
    m_dn = ph_dn - dev - drift
    m_up_min = torch.minimum(ph_up_min, m_up)
    m_dn_min = torch.minimum(ph_dn_min, m_dn)
    stat_up, stat_dn = m_up - m_up_min, m_dn - m_dn_min
    grok = active & (stat_up > thr_up) & (jump > min_jump)
    ungrok = active & (stat_dn > thr_dn) & (jump < -min_jump)
    fired = grok | ungrok

    # Restart the statistics where the branch is not armed, refractory, or just fired.
    keep = active & ~fired
    restart = ok_v & ~keep
    zero = torch.zeros_like(x)
    new_ph = [torch.where(keep, new, torch.where(restart, fresh, old)) for new, fresh, old in (
        (n1, torch.ones_like(x), ph_n), (mean, x, ph_mean), (m_up, zero, ph_up), (m_dn, zero, ph_dn),
        (m_up_min, zero, ph_up_min), (m_dn_min, zero, ph_dn_min))]
    # 4. refractory: counts down only on calls whose metric has settled: moved less than the
    # allowance plus noise over the window. (min_jump here let a slow grok - 0.12 accuracy per
    # window - fire twice on modular addition, seed 1.)
    settled = (x - val_old).abs() <= drift + 4.0 * sigma
    left = torch.where(ok_v & settled, (refractory_left - 1).clamp_(min=0), refractory_left)
    new_left = torch.where(fired, torch.full_like(x, c["refractory"]), left)

    # Response: a bounded move of the fusion prior toward a grokking branch (away on ungrok).
    if c["respond"]:
        move = (grok.to(x.dtype) - ungrok.to(x.dtype)) * c["prior_step"]
        new_prior = (prior + move).clamp_(-c["prior_bound"], c["prior_bound"])
    else:
        new_prior = prior

    # Events: fired branches take the next ring slots after event_count, the others scratch rows.
    E, B = int(c["max_events"]), x.numel()
    branch_ids = torch.arange(B, device=x.device, dtype=event_buf.dtype)
    rows = torch.where(fired, torch.remainder(event_count + fired.cumsum(0) - 1, E),
                       torch.arange(E, E + B, device=x.device))
    record = torch.stack([torch.full_like(branch_ids, step), branch_ids, ungrok.to(event_buf.dtype), jump, x,
                          ph_mean, torch.where(ungrok, stat_dn, stat_up), torch.where(ungrok, thr_dn, thr_up),
                          wn_change, new_prior], 1)
    event_buf.index_copy_(0, rows, record.to(event_buf.dtype))
    event_count.add_(fired.sum())

    if history_row.numel():
        torch.stack([tl, wn, x, ema, wn_ema, torch.where(armed, ph_mean, torch.full_like(x, math.nan)), stat_up,
                     stat_dn, armed.to(x.dtype), new_prior], out=history_row)
    ring[slot] = new_levels
    state.copy_(torch.cat([new_levels, new_seen, torch.stack([new_init, new_fit_run, new_noise, *new_ph,
                                                              new_left, new_prior])]))
