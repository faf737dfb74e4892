"""optim.RowAdam: dense steps equal torch.optim.AdamW; row-sparse steps equal torch.optim.SparseAdam's
lazy update and leave untouched rows (and their moments) alone; the models' row-sparse reads."""
import copy

import pytest
import torch

from glrec_fast import ops, reference
from glrec_fast.optim import RowAdam


def _grads(seed, shape, steps):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def test_dense_steps_equal_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = RowAdam([a], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1, foreach=False)
    for g in _grads(1, w.shape, 5):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _sparse(rows, vals, shape):
    return torch.sparse_coo_tensor(torch.tensor([rows]), vals, shape)


def test_sparse_steps_equal_torch_sparse_adam_and_skip_untouched_rows():
    torch.manual_seed(0)
    shape = (10, 4)
    w = torch.randn(shape)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    # SparseAdam puts eps outside the bias correction; with a negligible eps both are the same update.
    ours = RowAdam([a], lr=0.05, eps=1e-12)
    ref = torch.optim.SparseAdam([b], lr=0.05, eps=1e-12)
    g = torch.Generator().manual_seed(3)
    row_sets = [[1, 3, 3, 7], [0, 3], [7, 8, 9, 1]]     # duplicates are summed
    for rows in row_sets:
        vals = torch.randn(len(rows), shape[1], generator=g)
        a.grad, b.grad = _sparse(rows, vals, shape), _sparse(rows, vals, shape)
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    untouched = [2, 4, 5, 6]
    torch.testing.assert_close(a[untouched], w[untouched], rtol=0, atol=0)
    st = ours.state[a]
    assert st["exp_avg"][untouched].abs().max() == 0 and st["exp_avg_sq"][untouched].abs().max() == 0
    assert int(st["step"]) == len(row_sets)


@pytest.mark.skipif(ops.KERNELS["row_adam_"]["CPU"] != "C++ (_C)", reason="compiled extension not loaded")
def test_row_adam_kernel_equals_the_reference():
    # The one-pass C++ step against the torch reference: unsorted unique rows, a row width that is
    # no multiple of a vector register, several steps so the moments carry over.
    g = torch.Generator().manual_seed(5)
    p, m = torch.randn(500, 67, generator=g), torch.randn(500, 67, generator=g) * 0.1
    v = torch.rand(500, 67, generator=g) * 0.01
    ours, ref = [t.clone() for t in (p, m, v)], [t.clone() for t in (p, m, v)]
    for step in range(1, 4):
        rows = torch.randperm(500, generator=g)[:321]
        grad = torch.randn(321, 67, generator=g)
        bc2 = (1 - 0.999 ** step) ** 0.5
        ops.row_adam_(*ours, rows, grad, 0.01 / (1 - 0.9 ** step), 0.9, 0.999, 1e-8, bc2)
        reference.row_adam_(*ref, rows, grad, 0.01 / (1 - 0.9 ** step), 0.9, 0.999, 1e-8, bc2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], p)


def test_row_adam_rejects_bad_rows():
    p, m, v = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="grad: expected shape"):
        ops.row_adam_(p, m, v, torch.tensor([0, 1]), torch.ones(3, 3), 0.1, 0.9, 0.999, 1e-8, 1.0)
    with pytest.raises(ValueError, match="rows: expected a 1-d int64"):
        ops.row_adam_(p, m, v, torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, 3), 0.1, 0.9, 0.999, 1e-8, 1.0)
    if ops.KERNELS["row_adam_"]["CPU"] == "C++ (_C)":
        with pytest.raises(RuntimeError, match="out of range"):
            ops.row_adam_(p, m, v, torch.tensor([0, 4]), torch.ones(2, 3), 0.1, 0.9, 0.999, 1e-8, 1.0)


def test_a_sparse_gradient_over_every_row_is_the_dense_step():
    torch.manual_seed(0)
    w = torch.randn(6, 3)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    oa, ob = RowAdam([a], lr=0.02), RowAdam([b], lr=0.02)
    for g in _grads(2, w.shape, 4):
        a.grad = g.to_sparse(1)
        b.grad = g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sparse_gradient_in_a_decayed_group_is_refused():
    p = torch.zeros(4, 2, requires_grad=True)
    opt = RowAdam([p], weight_decay=0.1)
    p.grad = _sparse([1], torch.ones(1, 2), (4, 2))
    with pytest.raises(ValueError, match="weight_decay=0.1"):
        opt.step()


def test_resumes_from_a_torch_adamw_state():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.optim.AdamW([b], lr=0.01, foreach=False)
    gs = _grads(4, w.shape, 6)
    for g in gs[:3]:
        b.grad = g.clone()
        ref.step()
    a.data.copy_(b.data)
    ours = RowAdam([a], lr=0.01)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))   # as from a file: no shared tensors
    for g in gs[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_row_sparse_models_read_rows_only():
    """Training reads of MF and GraphSAGE give row-sparse gradients once train.py switches them on;
    full-graph LightGCN declares no row-sparse table."""
    from glrec_fast.graph import BipartiteGraph
    from glrec_fast.models.graphsage import GraphSAGE
    from glrec_fast.models.lightgcn import LightGCN
    from glrec_fast.models.mf import MF
    from glrec_fast.train import _optimizer
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack([torch.randint(0, 30, (300,), generator=g), torch.randint(0, 20, (300,), generator=g)], 1)
    graph = BipartiteGraph.from_interactions(pairs, 30, 20)
    cfg = {"lr": 0.01, "weight_decay": 0.0}
    users, pos, negs = torch.tensor([0, 1, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6])
    for model in (MF(30, 20, 8), GraphSAGE(graph, 8, fanouts=(3, 3))):
        opt = _optimizer(model, cfg)
        assert model.row_sparse
        before = [t.weight.detach().clone() for t in model.sparse_tables()]
        loss, _ = model.softmax_loss(users, pos, negs, 0.1, 1e-4)
        loss.backward()
        for t in model.sparse_tables():
            assert t.weight.grad.is_sparse
        opt.step()
        changed = sum(int((t.weight != b).any(1).sum()) for t, b in zip(model.sparse_tables(), before))
        total = sum(t.weight.size(0) for t in model.sparse_tables())
        assert 0 < changed < total   # only the rows the step read moved
    lg = LightGCN(graph, 8)
    _optimizer(lg, cfg)
    assert lg.sparse_tables() == [] and not lg.row_sparse
