"""Mini-batch training on sampled blocks: GraphSAGE, sampled LightGCN, the prefetching loader."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import glrec_fast as gl
from glrec_fast import _backend, ops, reference, sampling
from glrec_fast.models.graphsage import GraphSAGE, SampledLightGCN
from conftest import need_dataset

COMPILED = ops.KERNELS["neighbor_sample"]["CPU"] == "C++ (_C)"


@pytest.fixture(scope="module")
def graph():
    # 97 users, 59 items; user 96 and items 57, 58 have no interaction (isolated nodes).
    g = torch.Generator().manual_seed(1)
    e = torch.stack([torch.randint(0, 96, (700,), generator=g), torch.randint(0, 57, (700,), generator=g)], 1)
    return gl.BipartiteGraph.from_interactions(e, 97, 59)


BATCH = (torch.tensor([0, 3, 3, 50, 96]), torch.tensor([1, 2, 5, 1, 57]), torch.tensor([7, 8, 9, 1, 58]))


def test_mean_aggregation_by_hand():
    # Seeds 0..2 (node 1 without a sampled edge), node 3 at hop 1: the mean over sampled neighbours.
    b = sampling.Blocks(torch.arange(4), [3, 4], [torch.tensor([0, 0, 2])], [torch.tensor([1, 3, 0])],
                        [torch.zeros(3, dtype=torch.long)], torch.arange(3))
    h = torch.tensor([[1., 2.], [3., 4.], [5., 6.], [7., 8.]])
    out = sampling.aggregate(h, *b.aggregation(0))
    assert torch.equal(out, torch.tensor([[5., 6.], [0., 0.], [1., 2.]]))


@pytest.mark.parametrize("hop", [0, 1])
def test_block_aggregation_equals_the_gather_reference(graph, hop):
    # The sparse product (and its transposed backward) against gathering every edge's row:
    # values and gradients, for the mean and for per-edge weights (sampled LightGCN's).
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    rows, cols = b.edges_upto(hop)
    assert bool((rows[1:] >= rows[:-1]).all())          # the CSR layout needs edges sorted by row
    counts = b.row_counts(hop)
    weights = {"mean": (1.0 / counts.clamp(min=1).double())[rows], "weighted": torch.rand(rows.numel()).double()}
    for name, w in weights.items():
        h = torch.randn(b.sizes[hop + 1], 5, dtype=torch.float64, requires_grad=True)
        got = sampling.aggregate(h, *b.aggregation(hop, None if name == "mean" else w, torch.float64))
        want = reference.block_aggregate(h, rows, cols, w, b.sizes[hop])
        torch.testing.assert_close(got, want, msg=name)
        g = torch.randn_like(got)
        (gh,) = torch.autograd.grad(got, h, g)
        (wh,) = torch.autograd.grad(want, h, g)
        torch.testing.assert_close(gh, wh, msg=name)


COMPILED_MEAN = ops.KERNELS["block_mean_concat"]["CPU"] == "C++ (_C)"


def test_block_mean_concat_by_hand():
    # The Blocks of test_mean_aggregation_by_hand: [h_self | mean], node 1 without edges -> zero mean.
    b = sampling.Blocks(torch.arange(4), [3, 4], [torch.tensor([0, 0, 2])], [torch.tensor([1, 3, 0])],
                        [torch.zeros(3, dtype=torch.long)], torch.arange(3))
    h = torch.tensor([[1., 2.], [3., 4.], [5., 6.], [7., 8.]])
    want = torch.tensor([[1., 2., 5., 6.], [3., 4., 0., 0.], [5., 6., 1., 2.]])
    assert torch.equal(ops.block_mean_concat(h, *b.mean_csr(0)), want)
    assert torch.equal(reference.block_mean_concat(*b.mean_csr(0), h), want)


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
@pytest.mark.parametrize("hop", [0, 1])
@pytest.mark.parametrize("dim", [64, 6])       # 64: the fixed-width kernel, 6: any width
def test_block_mean_concat_kernel_equals_reference(graph, hop, dim):
    # The compiled kernel (float32) and its backward against the plain-torch form in float64.
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    csr = b.mean_csr(hop)
    assert torch.equal(csr[1], b.edges_upto(hop)[1])
    h = torch.randn(b.sizes[hop + 1], dim, requires_grad=True)
    got = ops.block_mean_concat(h, *csr)
    h64 = h.detach().double().requires_grad_()
    want = reference.block_mean_concat(*csr, h64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(got)
    (gh,) = torch.autograd.grad(got, h, g)
    (wh,) = torch.autograd.grad(want, h64, g.double())
    torch.testing.assert_close(gh.double(), wh, rtol=1e-6, atol=1e-6)
    # The reference backward (CUDA's kernel and GLREC_BACKEND=reference's) is the same gradient.
    torch.testing.assert_close(reference.block_mean_concat_backward(csr[0], csr[2], csr[3], g.double()), wh)


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
@pytest.mark.parametrize("dim", [64, 6])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_block_mean_concat_bfloat16_output_and_gradient(graph, dim, h_dtype):
    # GraphSAGE's bfloat16 layers: the kernel reads float32 or bfloat16 rows, sums in float32 and
    # writes bfloat16; its backward reads a bfloat16 gradient and writes the input's dtype.
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    csr = b.mean_csr(1)
    h = torch.randn(b.sizes[2], dim).to(h_dtype).requires_grad_()
    got = ops.block_mean_concat(h, *csr, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    want = reference.block_mean_concat(*csr, h.detach().double())
    n = csr[0].numel() - 1
    # The self half is a copy: rounded to bfloat16 exactly as torch rounds (to nearest, ties to even).
    assert torch.equal(got[:, :dim], h.detach()[:n].to(torch.bfloat16))
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)
    g = torch.randn(got.shape).to(torch.bfloat16)
    (gh,) = torch.autograd.grad(got, h, g)
    assert gh.dtype == h_dtype
    h64 = h.detach().double().requires_grad_()
    (wh,) = torch.autograd.grad(reference.block_mean_concat(*csr, h64), h64, g.double())
    # float32 h: float32 sums of the bfloat16 gradient, exact up to float32 rounding; bfloat16 h: then rounded.
    tol = dict(rtol=8e-3, atol=1e-2) if h_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), wh, **tol)
    # The fallback (reference) path gives the same dtypes and values.
    ref = reference.block_mean_concat(*csr, h.detach(), out_dtype=torch.bfloat16)
    assert ref.dtype == torch.bfloat16
    torch.testing.assert_close(ref.double(), got.detach().double(), rtol=8e-3, atol=1e-3)
    # Rounding keeps infinities and NaN what they are.
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0e38, -0.0, 1.0 + 2 ** -8])
    hs = torch.zeros(b.sizes[2], 6)
    hs[0] = special
    out = ops.block_mean_concat(hs, *csr, out_dtype=torch.bfloat16)[0, :6]
    torch.testing.assert_close(out, special.to(torch.bfloat16), equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out_dtype: expected"):
        ops.block_mean_concat(h, *csr, out_dtype=torch.float16)


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
def test_table_mean_concat_bfloat16_keeps_a_float32_table_gradient(graph):
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    csr = b.mean_csr(1)
    order, ids = b.sorted_nodes()
    table = torch.randn(graph.num_nodes, 64, requires_grad=True)
    got = ops.table_mean_concat(table, b.nodes, order, ids, *csr, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and type(got.grad_fn).__name__ == "_TableMeanConcatBackward"
    t64 = table.detach().double().requires_grad_()
    want = reference.block_mean_concat(*csr, t64[b.nodes])
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)
    g = torch.randn(got.shape).to(torch.bfloat16)
    (gt,) = torch.autograd.grad(got, table, g)
    (wt,) = torch.autograd.grad(want, t64, g.double())
    assert gt.dtype == torch.float32 and gt.is_sparse and torch.equal(gt._indices()[0], ids)
    torch.testing.assert_close(gt.to_dense().double(), wt, rtol=1e-5, atol=1e-5)   # float32 sums of bf16 grads


def test_graphsage_bfloat16_layers_train_like_float32(graph):
    # The same batch and parameters through float32 and bfloat16 layers: the loss and the table's
    # gradient agree to bfloat16's precision; parameters and evaluation stay float32.
    users, pos, neg = BATCH
    models = {}
    for dt in ("float32", "bfloat16"):
        torch.manual_seed(0)
        m = GraphSAGE(graph, dim=16, fanouts=[3, 4], sample_seed=5, layer_dtype=dt)
        m.row_sparse = True
        loss, _ = m.loss(users, pos, neg, 1e-4)
        loss.backward()
        models[dt] = (m, loss.detach())
    (m32, l32), (m16, l16) = models["float32"], models["bfloat16"]
    blocks = m16.sample(users, pos, neg)    # the layers really run in bfloat16; the embeddings come out float32
    assert m16._first_input(blocks, None).dtype == torch.bfloat16 and m32._first_input(blocks, None).dtype == torch.float32
    assert m16.block_embeddings(blocks).dtype == torch.float32
    assert l16.dtype == torch.float32 and torch.isfinite(l16)
    torch.testing.assert_close(l16, l32, rtol=2e-2, atol=1e-3)
    g32, g16 = m32.ego.weight.grad.to_dense(), m16.ego.weight.grad.to_dense()
    assert g16.dtype == torch.float32 and g16.abs().sum() > 0
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert m16.ego.weight.dtype == torch.float32 and m16.embeddings()[0].dtype == torch.float32
    with pytest.raises(ValueError, match="layer_dtype: expected"):
        GraphSAGE(graph, dim=16, fanouts=[3, 4], layer_dtype="float16")
    # --propagate_dtype reaches the model built from a training config.
    from glrec_fast.config import defaults
    from glrec_fast.models import graphsage
    cfg = {**defaults(), "model": "graphsage", "fanouts": [3, 4], "propagate_dtype": "bfloat16"}
    assert graphsage.build(cfg, None, graph).layer_dtype == torch.bfloat16


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
def test_block_mean_concat_bad_input_names_it(graph):
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    rowptr, col, t_rowptr, t_col = b.mean_csr(1)
    h = torch.randn(b.sizes[2], 8)
    bad = col.clone()
    bad[0] = h.size(0)
    with pytest.raises(RuntimeError, match="column ids must lie in"):
        torch.ops.glrec.block_mean_concat(rowptr, bad, t_rowptr, t_col, h)
    unsorted = rowptr.clone()
    unsorted[1] = col.numel()                     # then rowptr[2] < rowptr[1]
    with pytest.raises(RuntimeError, match="rowptr must be non-decreasing"):
        torch.ops.glrec.block_mean_concat(unsorted, col, t_rowptr, t_col, h)
    with pytest.raises(ValueError, match="t_rowptr: expected"):
        ops.block_mean_concat(h[:-1], rowptr, col, t_rowptr, t_col)
    bad_t = t_col.clone()
    bad_t[0] = rowptr.numel()
    grad = torch.randn(rowptr.numel() - 1, 16)
    with pytest.raises(RuntimeError, match="t_rowptr/t_col"):
        torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, bad_t, grad)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, t_col, grad[:, :15].contiguous())


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
@pytest.mark.parametrize("dim", [64, 6])
def test_table_mean_concat_reads_the_table_and_writes_sorted_rows(graph, dim):
    # Layer 0 read straight off the ID table (index) with the gradient written in sorted row order
    # (order): values and the row-sparse gradient equal the gather-then-concat form in float64.
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    csr = b.mean_csr(1)
    order, ids = b.sorted_nodes()
    table = torch.randn(graph.num_nodes, dim, requires_grad=True)
    got = ops.table_mean_concat(table, b.nodes, order, ids, *csr)
    assert type(got.grad_fn).__name__ == "_TableMeanConcatBackward"   # the compiled path, not the fallback
    torch.testing.assert_close(ops.table_mean_concat(table, b.nodes, order, ids, *csr, table_col=b.table_cols(1)), got,
                               rtol=0, atol=0)
    t64 = table.detach().double().requires_grad_()
    want = reference.block_mean_concat(*csr, t64[b.nodes])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(got)
    (gt,) = torch.autograd.grad(got, table, g)
    (wt,) = torch.autograd.grad(want, t64, g.double())
    assert gt.is_sparse and gt.is_coalesced() and torch.equal(gt._indices()[0], ids)
    torch.testing.assert_close(gt.to_dense().double(), wt, rtol=1e-6, atol=1e-6)
    # The op's reference kernels (CUDA, GLREC_BACKEND=reference) take the same row maps (col by table row).
    table_csr = (csr[0], b.table_cols(1), csr[2], csr[3])
    assert torch.equal(table_csr[1], b.nodes[csr[1]])
    torch.testing.assert_close(reference.block_mean_concat(*table_csr, t64.detach(), b.nodes), want.detach())
    torch.testing.assert_close(reference.block_mean_concat_backward(csr[0], csr[2], csr[3], g.double(), order),
                               wt[ids])
    # Through the op's registered autograd, index gives h's dense gradient.
    h = table.detach().clone().requires_grad_()
    (gh,) = torch.autograd.grad(torch.ops.glrec.block_mean_concat(*table_csr, h, b.nodes), h, g)
    torch.testing.assert_close(gh.double(), wt, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
def test_table_mean_concat_bad_row_maps_name_it(graph):
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    rowptr, col, t_rowptr, t_col = b.mean_csr(1)
    table = torch.randn(graph.num_nodes, 8)
    bad = b.nodes.clone()
    bad[3] = graph.num_nodes
    with pytest.raises(RuntimeError, match=r"index\[3\] = .* is out of range"):
        torch.ops.glrec.block_mean_concat(rowptr, col, t_rowptr, t_col, table, bad)
    with pytest.raises(RuntimeError, match="index must be a contiguous 1-d int64"):
        torch.ops.glrec.block_mean_concat(rowptr, col, t_rowptr, t_col, table, b.nodes.int())
    grad = torch.randn(rowptr.numel() - 1, 16)
    order = b.sorted_nodes()[0]
    twice = order.clone()
    twice[1] = twice[0]
    with pytest.raises(RuntimeError, match="order must be a permutation"):
        torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, t_col, grad, twice)
    with pytest.raises(RuntimeError, match="order must have"):
        torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, t_col, grad, order[:-1].contiguous())
    with pytest.raises(ValueError, match="t_rowptr: expected nodes.numel"):
        ops.table_mean_concat(table, b.nodes[:-1], order, b.nodes, rowptr, col, t_rowptr, t_col)


@pytest.mark.skipif(not COMPILED_MEAN, reason="compiled extension not built")
@pytest.mark.parametrize("hop", [0, 1])
def test_csr_transpose_equals_stable_argsort(graph, hop):
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 4], seed=2)
    rows, cols = b.edges_upto(hop)
    rowptr = b.mean_csr(hop)[0]
    t_rowptr, t_col, order = ops.csr_transpose(rowptr, cols, b.sizes[hop + 1] + 3)   # 3 empty columns
    assert torch.equal(order, torch.argsort(cols, stable=True))
    assert torch.equal(t_col, rows[order])
    assert torch.equal(t_rowptr.diff(), torch.bincount(cols, minlength=b.sizes[hop + 1] + 3))
    for got, want in zip((t_rowptr, t_col, order), reference.csr_transpose(rowptr, cols, b.sizes[hop + 1] + 3)):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="column ids must lie in"):
        ops.csr_transpose(rowptr, cols, int(cols.max()))
    with pytest.raises(ValueError, match="num_cols"):
        ops.csr_transpose(rowptr, cols, -1)


def test_blocks_layout(graph):
    users, pos, neg = BATCH
    b = sampling.bpr_blocks(graph, users, pos, neg, [3, 2], seed=4)
    seeds = torch.cat([users, pos + graph.num_users, neg + graph.num_users])
    assert torch.equal(b.nodes[b.seed_local], seeds)  # seed_local maps every requested seed
    assert b.sizes[0] == seeds.unique().numel() and len(b.sizes) == 3 and b.sizes[-1] == b.nodes.numel()
    rows, cols = b.edges_upto(1)
    assert int(rows.max()) < b.sizes[1] and int(cols.max()) < b.sizes[2]
    # Every block edge is a graph edge between the right global nodes.
    eids = torch.cat(b.edge_ids)
    assert torch.equal(graph.col[eids], b.nodes[cols])
    assert bool(((eids >= graph.rowptr[b.nodes[rows]]) & (eids < graph.rowptr[b.nodes[rows] + 1])).all())


def test_graphsage_sampled_equals_full_with_all_neighbours(graph):
    # With fanout -1 the sampled training path and the full-graph evaluation path must agree.
    model = GraphSAGE(graph, dim=16, fanouts=[-1, -1], eval_chunk=37)  # 37: several uneven eval chunks
    users, pos, neg = BATCH
    ps, ns, reg = model(users, pos, neg)
    u, i = model.embeddings()
    torch.testing.assert_close(ps, (u[users] * i[pos]).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ns, (u[users] * i[neg]).sum(-1), rtol=1e-5, atol=1e-6)
    w = model.ego.weight
    expected_reg = (w[users].pow(2).sum() + w[97 + pos].pow(2).sum() + w[97 + neg].pow(2).sum()) / 10
    torch.testing.assert_close(reg, expected_reg)
    (ps.sum() - ns.sum() + reg).backward()
    assert model.ego.weight.grad is not None and model.lin_neigh[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("item_bias", [False, True], ids=["", "item-bias"])
@pytest.mark.parametrize("cls", [GraphSAGE, SampledLightGCN])
def test_sampled_softmax_equals_the_full_graph_softmax_with_all_neighbours(graph, cls, item_bias):
    # --loss softmax on sampled blocks: [users | pos | shared negatives] of any count. With fanout -1
    # the loss and every gradient must equal the same softmax on the full-graph embeddings.
    from glrec_fast.models.losses import sampled_softmax
    users, pos, _ = BATCH
    negs = torch.tensor([4, 9, 11, 30, 58, 0, 1])    # 7 shared negatives (!= 5 users), an isolated item
    model = cls(graph, dim=16, fanouts=[-1, -1])
    bias = None
    if item_bias:
        model.add_item_bias(0.2)
        with torch.no_grad():
            bias = model.item_bias.weight.normal_()[:, 0]
    model.prefetch(users, pos, negs)                 # what the training loop does one batch ahead
    loss, parts = model.softmax_loss(users, pos, negs, 0.2, 0.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    u, i = model.embeddings()
    want = sampled_softmax(u[users], i[pos], i[negs], pos, negs, 0.2,
                           *((None, None) if bias is None else (model.item_bias.weight[pos, 0], model.item_bias.weight[negs, 0])))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.isclose(parts["softmax"], want.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("cls", [GraphSAGE, SampledLightGCN])
@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_row_sparse_gradient_is_the_dense_gradient_with_sorted_rows(graph, cls, loss):
    # train.py switches sampled models to row-sparse table gradients: the gradient (L2 rows read off
    # the block's ID rows included) must equal the dense one, built as one piece with sorted rows.
    users, pos, neg = BATCH
    grads = {}
    for row_sparse in (False, True):
        torch.manual_seed(0)
        model = cls(graph, dim=8, fanouts=[3, 2], sample_seed=3)
        model.row_sparse = row_sparse
        out = (model.loss(users, pos, neg, 0.1) if loss == "bpr"
               else model.softmax_loss(users, pos, neg[:3], 0.2, 0.1))[0]
        out.backward()
        grads[row_sparse] = model.ego.weight.grad
    assert grads[True].is_sparse
    idx = grads[True]._indices()[0]
    assert bool((idx[1:] > idx[:-1]).all())            # one piece, rows sorted and unique: RowAdam skips the sort
    torch.testing.assert_close(grads[True].to_dense(), grads[False], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [GraphSAGE, SampledLightGCN])
@pytest.mark.parametrize("row_sparse", [False, True])
def test_sampled_l2_term_is_the_seeds_id_rows(graph, cls, row_sparse):
    # The L2 term of a sampled step reads the seeds' ID rows off the block (GraphSAGE: off the self
    # half of layer 0's input); its value and its gradient must be those of the table rows of
    # [users | positives | negatives], one square per triple, over 2n.
    users, pos, neg = BATCH
    n, U = users.numel(), graph.num_users

    def grad_of(reg_weight):
        torch.manual_seed(0)
        model = cls(graph, dim=8, fanouts=[3, 2], sample_seed=3)
        model.row_sparse = row_sparse
        loss, parts = model.loss(users, pos, neg, reg_weight)
        loss.backward()
        g = model.ego.weight.grad
        return model, parts["reg"], (g.to_dense() if g.is_sparse else g)

    model, reg, g1 = grad_of(0.5)
    g0 = grad_of(0.0)[2]
    w = model.ego.weight.detach().clone().requires_grad_()
    want = sum(w[ids].pow(2).sum() for ids in (users, U + pos, U + neg)) / (2 * n)
    want.backward()
    torch.testing.assert_close(reg, want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1 - g0, 0.5 * w.grad, rtol=1e-4, atol=1e-6)


def test_graphsage_full_embeddings_by_hand(graph):
    # One layer, checked against an explicit per-node loop over the one-way CSRs.
    model = GraphSAGE(graph, dim=8, fanouts=[4])
    u_emb, i_emb = model.embeddings()
    w = model.ego.weight.detach()
    lin_s, lin_n = model.lin_self[0], model.lin_neigh[0]
    for user in (0, 3, 96):
        items = graph.user_col[graph.user_rowptr[user]:graph.user_rowptr[user + 1]]
        mean = w[97 + items].mean(0) if items.numel() else torch.zeros(8)
        torch.testing.assert_close(u_emb[user], lin_s(w[user]) + lin_n(mean), rtol=1e-5, atol=1e-6)
    for item in (1, 58):
        users = graph.item_col[graph.item_rowptr[item]:graph.item_rowptr[item + 1]]
        mean = w[users].mean(0) if users.numel() else torch.zeros(8)
        torch.testing.assert_close(i_emb[item], lin_s(w[97 + item]) + lin_n(mean), rtol=1e-5, atol=1e-6)


def test_sampled_lightgcn_exact_with_all_neighbours(graph):
    model = SampledLightGCN(graph, dim=16, fanouts=[-1, -1, -1])
    users, pos, neg = BATCH
    ps, ns, _ = model(users, pos, neg)
    full = reference.propagate(graph, model.ego.weight, 3)
    u, i = full[:97], full[97:]
    torch.testing.assert_close(ps, (u[users] * i[pos]).sum(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ns, (u[users] * i[neg]).sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("replace", [False, True])
def test_sampled_lightgcn_is_unbiased(graph, replace):
    # Fanout 2 (most nodes have more neighbours): the mean of the estimate over many samples must
    # match full propagation within its Monte-Carlo error; without the deg/k scaling it is off by
    # factors of deg/2 and fails.
    torch.manual_seed(0)
    ego = torch.randn(graph.num_nodes, 4)
    users, pos, neg = BATCH
    seeds = torch.cat([users, pos + 97, neg + 97])
    full = reference.propagate(graph, ego, 2)[seeds]
    n = 300
    draws = torch.stack([
        (lambda b: sampling.lightgcn_sampled(ego[b.nodes], graph, b)[b.seed_local])(
            sampling.sample_blocks(graph.rowptr, graph.col, seeds, [2, 2], seed=s, replace=replace))
        for s in range(n)])
    mean, se = draws.mean(0), draws.std(0) / n ** 0.5
    z = (mean - full).abs() / (se + 1e-6)
    assert float((z < 4.5).float().mean()) > 0.97, z.max()
    assert float(se.max()) > 0  # the sample really varied


def test_prefetched_sample_is_the_fresh_sample(graph):
    model = GraphSAGE(graph, dim=8, fanouts=[3, 3], sample_seed=7)
    users, pos, neg = BATCH
    fresh = model.sample(users, pos, neg)
    model.prefetch(users, pos, neg)
    model.prefetch(users.flip(0), pos.flip(0), neg.flip(0))
    got = model.blocks_for(users, pos, neg)
    for a, b in zip(fresh.edge_ids + [fresh.nodes], got.edge_ids + [got.nodes]):
        assert torch.equal(a, b)
    # A batch that was not prefetched (or mismatches) is sampled on the spot, never mixed up.
    other = model.blocks_for(users[:3], neg[:3], pos[:3])
    assert torch.equal(other.nodes[other.seed_local], torch.cat([users[:3], neg[:3] + 97, pos[:3] + 97]))
    assert torch.equal(other.edge_ids[1], model.sample(users[:3], neg[:3], pos[:3]).edge_ids[1])
    # Different batches get different samples; a different base seed too.
    assert not torch.equal(model.sample(users, pos, neg).edge_ids[1],
                           GraphSAGE(graph, 8, [3, 3], sample_seed=8).sample(users, pos, neg).edge_ids[1])


def test_prefetch_in_the_training_loops_order_samples_ahead():
    # train.py submits batch b + 1, then takes batch b. From the second batch on, every take must
    # find its batch sampled on the worker thread; a take that dropped the batch queued after it
    # (b + 1) would leave every batch to be sampled again on the training thread.
    import threading
    from glrec_fast.sampling import Prefetcher
    pf = Prefetcher(lambda j: (j, threading.current_thread().name))
    where = []
    for b in range(6):
        pf.submit(torch.tensor([b + 1]))
        j, thread = pf.take(torch.tensor([b]))
        assert int(j) == b
        where.append(thread.startswith("glrec-sampler"))
    pf.close()
    assert where == [False] + [True] * 5


@pytest.mark.skipif(not hasattr(_backend.load_extension(), "one_thread_here"), reason="compiled extension not built")
def test_the_sampler_worker_runs_its_ops_on_one_thread_and_leaves_the_others_alone():
    # Its ops (torch's and the compiled sampler's) must stay on one thread after their first parallel
    # use, which re-reads torch's default; the training thread and later threads keep theirs.
    import threading
    from glrec_fast.sampling import Prefetcher
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(1 << 22)   # big enough that sort and sum go parallel when they may
        rowptr, col = torch.arange(0, 2001, 2), torch.arange(2000) % 7   # 1000 rows over 7 columns

        def work():   # a compiled op and torch's parallel ops first, then the thread count they leave
            ops.csr_transpose(rowptr, col, 7)
            return (x * 2).sum(), torch.sort(x).values[0], torch.get_num_threads()
        pf = Prefetcher(work)
        pf.submit()
        assert pf.take()[2] == 1
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
        pf.close()
    finally:
        torch.set_num_threads(before)


def test_prefetch_from_builds_the_batch_and_its_sample_on_the_worker():
    # train.py hands the sampler's thread the making of batch b + 1 (its BPR negatives search every
    # training key), then takes batch b: both the batch and its sample must come from the worker,
    # and take() must find the sample by the batch the future returned.
    from glrec_fast.sampling import Prefetcher
    made_on = []

    def make(b):
        made_on.append(threading.current_thread().name)
        return (torch.tensor([b]),)

    pf = Prefetcher(lambda j: (int(j), threading.current_thread().name))
    upcoming = (torch.tensor([0]),)
    sampled_on = []
    for b in range(5):
        args = upcoming if isinstance(upcoming, tuple) else upcoming.result()
        upcoming = pf.submit_from(lambda b=b: make(b + 1))
        j, thread = pf.take(*args)
        assert j == b
        sampled_on.append(thread.startswith("glrec-sampler"))
    assert int(upcoming.result()[0]) == 5
    pf.close()
    assert sampled_on == [False] + [True] * 4
    assert len(made_on) == 5 and all(t.startswith("glrec-sampler") for t in made_on)

    def broken():
        raise RuntimeError("no batch")
    pf = Prefetcher(lambda j: j)
    with pytest.raises(RuntimeError, match="no batch"):
        pf.submit_from(broken).result()
    pf.close()


def test_training_with_batches_made_ahead_matches_on_the_spot(tmp_path, monkeypatch):
    # The training loop builds each next batch on the sampler's thread (prefetch_from). Without that
    # method it builds batches on the training thread and prefetches only their samples (the loop
    # before): the same training.
    need_dataset("ml-100k")
    from glrec_fast import train
    args = BASE[:-4] + ["--epochs", "1", "--patience", "0", "--model", "graphsage", "--fanouts", "[5,5]",
                        "--num_threads", "1"]
    made = []
    real = sampling.SampledTraining.prefetch_from
    monkeypatch.setattr(sampling.SampledTraining, "prefetch_from",
                        lambda self, make: made.append(1) or real(self, make))
    assert train.main(args + ["--out", str(tmp_path / "ahead")]) == 0
    assert len(made) > 10   # the loop really made its batches ahead
    monkeypatch.delattr(sampling.SampledTraining, "prefetch_from")
    assert train.main(args + ["--out", str(tmp_path / "spot")]) == 0
    ahead, spot = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ahead", "spot"))
    assert ahead["history"][0]["loss"] == spot["history"][0]["loss"]
    assert ahead["test"] == spot["test"]


def test_prefetch_errors_surface_in_the_training_thread(graph):
    model = GraphSAGE(graph, dim=8, fanouts=[3])
    bad = torch.tensor([0, 1000])
    model.prefetch(bad, bad, bad)
    with pytest.raises(ValueError, match="seeds"):
        model.blocks_for(bad, bad, bad)


@pytest.mark.skipif(not COMPILED, reason="compiled sampler not built")
def test_sampler_releases_the_gil():
    # While one thread is inside the C++ sampler, another thread must keep running Python.
    # Holding the GIL would leave the counter near 0; releasing it gives ~10^5+ iterations.
    n_nodes, deg = 20_000, 100
    col = torch.randint(0, n_nodes, (n_nodes * deg,), generator=torch.Generator().manual_seed(0))
    rowptr = torch.arange(0, n_nodes * deg + 1, deg)
    seeds = torch.arange(n_nodes)
    started, done = threading.Event(), threading.Event()
    took = []

    def work():
        started.set()
        t = time.perf_counter()
        ops.neighbor_sample(rowptr, col, seeds, [-1, 3])
        took.append(time.perf_counter() - t)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    count = 0
    while not done.is_set():
        count += 1
    th.join()
    assert count > 10_000, f"only {count} Python iterations ran during a {took[0]:.3f}s sampler call"


def test_bad_config_is_reported(graph):
    with pytest.raises(ValueError, match="fanouts"):
        GraphSAGE(graph, fanouts=[10, -2])
    with pytest.raises(ValueError, match="fanouts"):
        GraphSAGE(graph, fanouts=[])
    with pytest.raises(ValueError, match="fanouts"):
        SampledLightGCN(graph, fanouts=["a"])
    with pytest.raises(ValueError, match="users/pos: expected equal lengths"):
        sampling.bpr_blocks(graph, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]), [2])


# --------------------------------------------------------------------------- real data, end to end
BASE = ["--dataset", "ml-100k", "--split", "random", "--grokking", "false", "--batch_size", "2048",
        "--lr", "0.005", "--epochs", "3", "--patience", "0"]


def _random_ndcg():
    """ndcg@20 of random scores on the same split (the floor a trained model must clear)."""
    from glrec_fast import metrics
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(ds.num_users, ds.num_items, generator=gen)
    m = metrics.evaluate(lambda u: table[u], ds.test, ds.num_users, ds.num_items, exclude=[ds.train, ds.valid],
                         ks=[20])
    return m["ndcg@20"]


@pytest.mark.parametrize("model_args", [["--model", "graphsage", "--fanouts", "[10,10]"],
                                        ["--model", "lightgcn", "--sampled", "--fanouts", "[10,10,10]"],
                                        ["--model", "graphsage", "--fanouts", "[10,10]", "--loss", "softmax",
                                         "--num_negatives", "256", "--reg_weight", "0"]],
                         ids=["graphsage", "sampled-lightgcn", "graphsage-softmax"])
def test_trains_on_ml100k_and_beats_random(tmp_path, model_args):
    need_dataset("ml-100k")
    from glrec_fast import train
    threads = torch.get_num_threads()
    try:
        # One thread: on a shared 2-core CI box, 2-thread OpenMP regions stall behind other jobs
        # (measured 28 ms vs 200+ ms per GraphSAGE step at load ~6).
        assert train.main(BASE + model_args + ["--num_threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    m = json.loads((tmp_path / "metrics.json").read_text())
    floor = _random_ndcg()  # ~0.01
    # 3 epochs on 80k interactions reach ~0.2 (measured 0.219 graphsage, 0.204 sampled LightGCN; random 0.010).
    assert m["test"]["ndcg@20"] > max(5 * floor, 0.08), (m["test"]["ndcg@20"], floor)


def test_num_layers_warning_only_when_it_was_changed(graph, caplog):
    # The default config's num_layers (3, the full-graph LightGCN's) must not warn on every sampled
    # run; a num_layers the user changed that disagrees with the fanouts does.
    import logging
    from glrec_fast import config
    from glrec_fast.models import graphsage
    cfg = config.defaults()
    with caplog.at_level(logging.WARNING, logger="glrec_fast"):
        graphsage.build(dict(cfg, model="graphsage", fanouts=[10, 10]), None, graph)
        assert "num_layers" not in caplog.text
        graphsage.build(dict(cfg, model="graphsage", fanouts=[10, 10], num_layers=4), None, graph)
        assert "num_layers=4 is not used" in caplog.text
