import pytest
import torch

from glrec_fast import BipartiteGraph
from glrec_fast.graph import ITEM_COLD, ITEM_HEAD, ITEM_TAIL, USER_COLD, USER_WARM


def _dense_norm_adj(edges, U, I):
    # Small dense matrix built independently, only to check the CSR on tiny graphs.
    A = torch.zeros(U + I, U + I)
    for u, i in edges.tolist():
        A[u, U + i] = A[U + i, u] = 1
    d = A.sum(1)
    dinv = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    return dinv[:, None] * A * dinv[None, :]


def test_csr_matches_dense_and_duplicates_merge():
    edges = torch.tensor([[0, 0], [0, 2], [1, 2], [1, 2], [3, 4], [0, 0]])
    g = BipartiteGraph.from_interactions(edges, 5, 6)
    assert g.num_edges == 4  # two duplicates merged
    assert g.user_rowptr.tolist() == [0, 2, 3, 3, 4, 4]
    assert g.user_col.tolist() == [0, 2, 2, 4]
    assert g.item_rowptr.tolist() == [0, 1, 1, 3, 3, 4, 4]
    assert g.item_col.tolist() == [0, 0, 1, 3]
    dense = _dense_norm_adj(torch.unique(edges, dim=0), 5, 6)
    assert torch.allclose(g.norm_adj().to_dense(), dense)
    assert g.dinv[2].item() == 0  # isolated user 2
    assert g.user_context.tolist() == [USER_WARM, USER_WARM, USER_COLD, USER_WARM, USER_COLD]


def test_item_contexts_head_tail_cold():
    # item degrees: 0:5, 1:4, 2:3, 3:2, 4:1, 5..9: 0 -> head = top round(0.2*10)=2 items
    edges = [[u, i] for i, deg in enumerate([5, 4, 3, 2, 1]) for u in range(deg)]
    g = BipartiteGraph.from_interactions(torch.tensor(edges), 5, 10)
    assert g.item_context.tolist() == [ITEM_HEAD, ITEM_HEAD, ITEM_TAIL, ITEM_TAIL, ITEM_TAIL] + [ITEM_COLD] * 5
    assert g.cold_items.tolist() == [5, 6, 7, 8, 9]


def test_bad_edges_name_the_argument():
    with pytest.raises(ValueError, match="edges"):
        BipartiteGraph.from_interactions(torch.tensor([[0, 7]]), 2, 3)
    with pytest.raises(ValueError, match="edges"):
        BipartiteGraph.from_interactions(torch.tensor([[-1, 0]]), 2, 3)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        BipartiteGraph.from_interactions(torch.tensor([0, 1, 2]), 2, 3)
    with pytest.raises(ValueError, match="integer"):
        BipartiteGraph.from_interactions(torch.tensor([[0.0, 1.0]]), 2, 3)


def test_to_returns_one_shared_copy_per_device():
    g = BipartiteGraph.from_interactions(torch.tensor([[0, 0], [1, 2], [2, 1]]), 3, 4)
    assert g.to("cpu") is g
    m1, m2 = g.to("meta"), g.to("meta")
    assert m1 is m2 and m1.rowptr.device.type == "meta" and m1.num_items == 4
    assert g.rowptr.device.type == "cpu"  # the original stays where it was


# --------------------------------------------------------------------------- constructor symmetry
def _sides(edges, nu, ni):
    g = BipartiteGraph.from_interactions(torch.tensor(edges), nu, ni)
    return [g.user_rowptr.clone(), g.user_col.clone(), g.item_rowptr.clone(), g.item_col.clone()]


def test_constructor_accepts_a_symmetric_pair_of_csrs():
    edges = [[0, 1], [0, 2], [1, 0], [2, 2]]
    g = BipartiteGraph(*_sides(edges, 3, 3), 3, 3)
    ref = BipartiteGraph.from_interactions(torch.tensor(edges), 3, 3)
    assert torch.equal(g.rowptr, ref.rowptr) and torch.equal(g.col, ref.col) and torch.equal(g.dinv, ref.dinv)


def test_constructor_refuses_an_asymmetric_adjacency():
    # item CSR from another edge set: propagate's backward (= its forward) would be silently wrong
    urp, ucol, _, _ = _sides([[0, 1], [0, 2], [1, 0], [2, 2]], 3, 3)
    _, _, irp, icol = _sides([[0, 1], [0, 2], [1, 0], [2, 1]], 3, 3)
    with pytest.raises(ValueError, match="not the transpose"):
        BipartiteGraph(urp, ucol, irp, icol, 3, 3)
    _, _, irp, icol = _sides([[0, 1], [0, 2], [1, 0]], 3, 3)
    with pytest.raises(ValueError, match="same \\(user, item\\) pairs"):
        BipartiteGraph(urp, ucol, irp, icol, 3, 3)


def test_constructor_refuses_malformed_csrs():
    urp, ucol, irp, icol = _sides([[0, 1], [0, 2], [1, 0], [2, 2]], 3, 3)
    with pytest.raises(ValueError, match="user_rowptr: expected 4 entries"):
        BipartiteGraph(urp[:-1], ucol, irp, icol, 3, 3)
    with pytest.raises(ValueError, match="user_col: ids must lie in"):
        BipartiteGraph(urp, ucol + 5, irp, icol, 3, 3)
    with pytest.raises(ValueError, match="item_rowptr: expected non-decreasing"):
        BipartiteGraph(urp, ucol, irp.flip(0), icol, 3, 3)
    dup_u = torch.tensor([0, 2, 2, 2]), torch.tensor([1, 1])          # user 0 -> item 1 twice
    dup_i = torch.tensor([0, 0, 2]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="duplicate edge \\(user 0, item 1\\)"):
        BipartiteGraph(*dup_u, *dup_i, 3, 2)
