"""Metrics against values computed by hand (see the comments for each number)."""
import math

import pytest
import torch

from glrec_fast import metrics, ops, reference
from glrec_fast.graph import ITEM_COLD, ITEM_HEAD, ITEM_TAIL

L3 = 1 / math.log2(3)  # discount at rank 2
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


def _score_fn(users):
    return SCORES.expand(users.numel(), -1).clone()


def _run(**kw):
    train = torch.tensor([[0, 0]])                      # user 0 has seen item 0: masked
    test = torch.tensor([[0, 2], [0, 5],                # user 0: two test items
                         [1, 1], [1, 2], [1, 3], [1, 4]])  # user 1: more test items than K=2
    # user 2 has no test item: excluded from every average
    return metrics.evaluate(_score_fn, test, num_users=3, num_items=6, exclude=[train], ks=(2, 3), **kw)


def test_overall_values_by_hand():
    m = _run()
    # user 0 ranking after masking item 0: 1,2,3,4,5 -> top2 [1,2] (hit at rank 2)
    # user 1 ranking: 0,1,2,... -> top2 [0,1] (hit at rank 2), top3 [0,1,2] (hits at 2,3)
    assert m["n_users"] == 2
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    ndcg2 = L3 / (1 + L3)                               # both users: one hit at rank 2, IDCG over 2
    assert m["ndcg@2"] == pytest.approx(ndcg2)
    assert m["hit@2"] == pytest.approx(1.0)
    assert m["mrr@2"] == pytest.approx(0.5)
    # K=3: user 0 unchanged (IDCG over min(2,3)=2); user 1 hits at 2 and 3, IDCG over 3
    u1 = (L3 + 0.5) / (1 + L3 + 0.5)
    assert m["ndcg@3"] == pytest.approx((ndcg2 + u1) / 2)
    assert m["recall@3"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["precision@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_per_context_by_hand():
    ctx = torch.tensor([ITEM_HEAD, ITEM_HEAD, ITEM_TAIL, ITEM_TAIL, ITEM_COLD, ITEM_COLD])
    m = _run(item_context=ctx)
    # Each context ranks only its own items.
    # cold candidates {4,5}: user 0 wants {5} -> rank 2; user 1 wants {4} -> rank 1
    assert m["ndcg@3/cold"] == pytest.approx((L3 + 1) / 2) and m["n_users/cold"] == 2
    # head candidates {0,1}: only user 1 has a head test item {1} -> rank 2
    assert m["ndcg@3/head"] == pytest.approx(L3) and m["n_users/head"] == 1
    # tail candidates {2,3}: user 0 wants {2} -> rank 1; user 1 wants {2,3} -> ranks 1,2
    assert m["ndcg@3/tail"] == pytest.approx(1.0)
    # warm candidates: user 0 {1,2,3} (0 masked) wants {2} -> rank 2;
    # user 1 {0,1,2,3} wants {1,2,3} -> ranks 2,3 within the top 3, IDCG over 3
    assert m["ndcg@3/warm"] == pytest.approx((L3 + (L3 + 0.5) / (1 + L3 + 0.5)) / 2)
    assert m["recall@3/warm"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["mrr@3/cold"] == pytest.approx((0.5 + 1) / 2)


def test_batching_does_not_change_results():
    torch.manual_seed(1)
    U, I = 37, 23
    emb_u, emb_i = torch.randn(U, 4), torch.randn(I, 4)
    pairs = torch.stack([torch.randint(0, U, (300,)), torch.randint(0, I, (300,))], 1).unique(dim=0)
    train, test = pairs[::2], pairs[1::2]
    fn = lambda users: emb_u[users] @ emb_i.T  # noqa: E731
    a = metrics.evaluate(fn, test, U, I, exclude=[train], batch_size=5)
    b = metrics.evaluate(fn, test, U, I, exclude=[train], batch_size=1000)
    for key in a:
        assert a[key] == pytest.approx(b[key])


def test_perfect_and_worst_scorers():
    U, I = 4, 10
    test = torch.tensor([[u, u + 1] for u in range(U)])
    best = lambda users: torch.nn.functional.one_hot(users + 1, I).float()  # noqa: E731
    m = metrics.evaluate(best, test, U, I, ks=(1,))
    assert m["ndcg@1"] == 1.0 and m["recall@1"] == 1.0 and m["mrr@1"] == 1.0
    worst = lambda users: -torch.nn.functional.one_hot(users + 1, I).float()  # noqa: E731
    m = metrics.evaluate(worst, test, U, I, ks=(5,))
    assert m["ndcg@5"] == 0.0 and m["hit@5"] == 0.0


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="test"):
        metrics.evaluate(_score_fn, torch.tensor([[0, 9]]), 3, 6)
    with pytest.raises(ValueError, match="score_fn"):
        metrics.evaluate(lambda u: torch.zeros(len(u), 5), torch.tensor([[0, 1]]), 3, 6)
    with pytest.raises(ValueError, match="ks"):
        metrics.evaluate(_score_fn, torch.tensor([[0, 1]]), 3, 6, ks=(0,))
    from glrec_fast import BipartiteGraph
    with pytest.raises(ValueError, match=r"exclude\[0\]: a graph of 3 users x 5 items, expected 3 x 6"):
        metrics.evaluate(_score_fn, torch.tensor([[0, 1]]), 3, 6,
                         exclude=[BipartiteGraph.from_interactions(torch.tensor([[0, 1]]), 3, 5)])


def test_per_context_equals_ranking_the_context_alone():
    """Each per-context metric equals a separate evaluation over only that context's items (float
    scores, no ties), with contexts of mixed sizes, one smaller than K."""
    torch.manual_seed(3)
    U, I = 60, 300
    ctx = torch.full((I,), 2)
    ctx[torch.randperm(I)[:12]] = 0      # 12 cold items: fewer than K=20
    ctx[torch.randperm(I)[:80]] = 1
    pairs = lambda n: torch.unique(torch.stack([torch.randint(0, U, (n,)), torch.randint(0, I, (n,))], 1), dim=0)
    train, test = pairs(2000), pairs(900)
    test = test[~torch.isin(test[:, 0] * I + test[:, 1], train[:, 0] * I + train[:, 1])]
    scores = torch.randn(U, I)
    full = metrics.evaluate(lambda u: scores[u], test, U, I, exclude=[train], item_context=ctx, ks=(5, 20))
    for name, codes in {"cold": (0,), "head": (1,), "tail": (2,), "warm": (1, 2)}.items():
        items = torch.nonzero(torch.isin(ctx, torch.tensor(codes))).flatten()
        remap = torch.full((I,), -1)
        remap[items] = torch.arange(items.numel())
        keep = lambda p: p[remap[p[:, 1]] >= 0]
        sub = lambda p: torch.stack([keep(p)[:, 0], remap[keep(p)[:, 1]]], 1)
        alone = metrics.evaluate(lambda u: scores[u][:, items], sub(test), U, items.numel(), exclude=[sub(train)],
                         ks=(5, 20))
        for key in ("recall@20", "ndcg@20", "precision@5", "mrr@20", "hit@5"):
            assert full[f"{key}/{name}"] == pytest.approx(alone[key], abs=1e-9), (name, key)


@pytest.mark.parametrize("reorder,train_as_graph", [(False, False), (True, False), (True, True)])
def test_equals_dense_reference(reorder, train_as_graph):
    """The batched, index-masked, merged-top-k evaluation equals reference.evaluate (dense masks,
    one full-width top-k per context) on every key, through a plain score function and through
    an EmbeddingScorer whose item table is permuted instead of each tile; the training pairs
    excluded as pairs or as the training graph (its own CSR)."""
    from glrec_fast import BipartiteGraph
    from glrec_fast import reference
    torch.manual_seed(5)
    U, I = 71, 257
    ctx = torch.full((I,), ITEM_TAIL)
    ctx[torch.randperm(I)[:9]] = ITEM_COLD
    ctx[torch.randperm(I)[:50]] = ITEM_HEAD
    pairs = lambda n: torch.unique(torch.stack([torch.randint(0, U, (n,)), torch.randint(0, I, (n,))], 1), dim=0)
    train, valid, test = pairs(1500), pairs(300), pairs(700)
    key = lambda p: p[:, 0] * I + p[:, 1]
    valid = valid[~torch.isin(key(valid), key(train))]
    test = test[~torch.isin(key(test), torch.cat([key(train), key(valid)]))]
    eu, ei = torch.randn(U, 8), torch.randn(I, 8)
    fn = metrics.EmbeddingScorer(eu, ei) if reorder else (lambda u: eu[u] @ ei.T)
    masked = [BipartiteGraph.from_interactions(train, U, I) if train_as_graph else train, valid]
    got = metrics.evaluate(fn, test, U, I, exclude=masked, ks=(5, 20), item_context=ctx, batch_size=16)
    want = reference.evaluate(lambda u: eu[u] @ ei.T, test, U, I, exclude=[train, valid], ks=(5, 20),
                              item_context=ctx)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


COMPILED_TOPK = ops.KERNELS["topk_rows"]["CPU"] == "C++ (_C)"


@pytest.mark.skipif(not COMPILED_TOPK, reason="compiled extension not built")
@pytest.mark.parametrize("n,k", [(37, 20), (5000, 20), (700, 256), (9, 9), (9, 0), (1, 1)])
def test_topk_rows_kernel_is_the_stable_descending_sort_prefix(n, k):
    """The compiled kernel equals reference.topk_rows (values and ids: ties in the hashed column order,
    NaN first) on continuous scores, heavy ties, -inf (excluded items) and NaN, and its values are torch.topk's."""
    gen = torch.Generator().manual_seed(n + k)
    tiles = [torch.randn(33, n, generator=gen),
             torch.randint(0, 4, (33, n), generator=gen).float(),            # heavy ties
             torch.randn(33, n, generator=gen).masked_fill(torch.rand(33, n, generator=gen) < 0.5, -math.inf)]
    nan = torch.randn(33, n, generator=gen)
    nan[torch.rand(33, n, generator=gen) < 0.05] = math.nan
    tiles.append(nan)
    for x in tiles:
        got_v, got_i = ops.topk_rows(x, k)
        want_v, want_i = reference.topk_rows(x, k)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_v, want_v, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.topk(x, k, dim=1).values, equal_nan=True, rtol=0, atol=0)
    wide = torch.randn(33, n + 11, generator=gen)       # a column slice: rows are strided, not copied
    for got, want in zip(ops.topk_rows(wide[:, 5:5 + n], k), reference.topk_rows(wide[:, 5:5 + n], k)):
        assert torch.equal(got, want)
    empty_v, empty_i = ops.topk_rows(torch.zeros(0, n), k)
    assert empty_v.shape == empty_i.shape == (0, k)


def test_topk_rows_bad_input_names_it():
    with pytest.raises(ValueError, match="k: expected an int in \\[0, 5\\]"):
        ops.topk_rows(torch.zeros(3, 5), 6)
    with pytest.raises(ValueError, match="x: expected a 2-d tensor"):
        ops.topk_rows(torch.zeros(5), 2)
    if COMPILED_TOPK:
        with pytest.raises(RuntimeError, match="2-d float32 CPU tensor"):
            torch.ops.glrec.topk_rows(torch.zeros(3, 5, dtype=torch.float64), 2)
        with pytest.raises(RuntimeError, match="contiguous rows"):
            torch.ops.glrec.topk_rows(torch.zeros(5, 3).t(), 2)
        with pytest.raises(RuntimeError, match="k must be in"):
            torch.ops.glrec.topk_rows(torch.zeros(3, 5), 7)


def test_topk_rows_ties_favour_no_id_range():
    """A row of equal scores: the kept columns are spread over the row (the hashed tie order), not its
    first k columns, and the same on every call."""
    x = torch.zeros(2, 1000)
    _, idx = ops.topk_rows(x, 50)
    assert torch.equal(idx[0], idx[1]) and torch.equal(idx, ops.topk_rows(x, 50)[1])
    assert idx.unique().numel() == 50
    if COMPILED_TOPK:
        assert int((idx[0] < 500).sum()) in range(10, 41)       # about half in each half of the ids
