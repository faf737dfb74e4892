"""Training-free graph filters (GF-CF, BSPM), the validation carve-out, the sampled softmax and the
spectral initialisation, each against a plain-torch or dense reference; the CLI routes end to end."""
import json
import math

import numpy as np
import pytest
import torch

from glrec_fast import metrics, ops, reference, train
from glrec_fast.data.splits import carve_valid
from glrec_fast.graph import BipartiteGraph
from glrec_fast.models import filters, losses
from conftest import need_dataset


def _graph(num_users=97, num_items=59, n=700, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Items 0..2 and user 96 stay isolated (zero-degree rows and columns); a few heavy users and items.
    u = torch.cat([torch.randint(0, num_users - 1, (n,), generator=gen), torch.zeros(40, dtype=torch.long)])
    i = torch.cat([torch.randint(3, num_items, (n,), generator=gen), torch.arange(3, 43) % (num_items - 3) + 3])
    edges = torch.unique(torch.stack([u, i], 1), dim=0)
    return edges, BipartiteGraph.from_interactions(edges, num_users, num_items)


def _v_of(f, g):
    """The singular vectors a fitted filter uses, recovered from its D^-1/2 V factor."""
    di = g.item_degree.float()
    return f.ideal_in * torch.where(di > 0, di.sqrt(), torch.zeros_like(di))[:, None]


@pytest.mark.parametrize("kw", [
    dict(rank=8, ideal_weight=0.3),                                               # GF-CF
    dict(rank=8, ideal_weight=0.2, sharpen_time=2.5, sharpen_solver="rk4"),       # BSPM, one RK4 step
    dict(rank=0, ideal_weight=0.0, sharpen_time=1.0, sharpen_steps=3),            # linear + 3 Euler steps
    dict(rank=12, ideal_weight=1.0, sharpen_time=1.2, sharpen_steps=2, sharpen_solver="rk4"),
])
def test_filter_equals_dense_reference(kw):
    edges, g = _graph()
    f = filters.GraphFilter(g, **kw).fit()
    users = torch.arange(g.num_users)
    got = f.scores(users).double()
    v = _v_of(f, g) if kw["rank"] else torch.zeros(g.num_items, 1)
    want = reference.graph_filter_dense(edges, g.num_users, g.num_items, v, kw["ideal_weight"], f.poly)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A reordered scorer returns the same scores with the columns permuted.
    order = torch.randperm(g.num_items)
    torch.testing.assert_close(f.scorer().reorder(order)(users), f.scores(users)[:, order], rtol=1e-5, atol=1e-6)


COMPILED_GRAM = ops.KERNELS["gram_rows"]["CPU"] == "C++ (_C)"


@pytest.mark.parametrize("provider", ["kernel", "reference"])
def test_gram_rows_is_the_pattern_times_t_r(provider):
    """ops.gram_rows (compiled kernel, or the torch reference) against the dense product in float64,
    with repeated rows, an isolated user, and the output's columns permuted."""
    if provider == "kernel" and not COMPILED_GRAM:
        pytest.skip("compiled extension not built")
    _, g = _graph()
    r, rt, _, _ = filters.normalised_csr(g)
    rows = torch.tensor([0, 5, 5, 96, 17, 40, 95])
    dense_r = r.to_dense().double()
    pattern = (dense_r[rows] != 0).double()
    want = pattern @ rt.to_dense().double() @ dense_r
    perm = torch.randperm(g.num_items, generator=torch.Generator().manual_seed(4))
    for out_index in (None, perm):
        if provider == "kernel":
            got = ops.gram_rows(r, rt, rows, out_index)
        else:
            idx = torch.arange(g.num_items) if out_index is None else out_index
            got = reference.gram_rows(r.crow_indices(), r.col_indices(), r.values(), rt.crow_indices(),
                                      rt.col_indices(), rt.values(), rows, idx)
        placed = want if out_index is None else torch.empty_like(want).index_copy_(1, out_index, want)
        torch.testing.assert_close(got.double(), placed, rtol=1e-5, atol=1e-6)
    assert (want[3] == 0).all()          # user 96 has no training row


@pytest.mark.skipif(not COMPILED_GRAM, reason="compiled extension not built")
def test_gram_rows_bad_input_names_it():
    _, g = _graph()
    r, rt, _, _ = filters.normalised_csr(g)
    with pytest.raises(ValueError, match="rows: expected ids in"):
        ops.gram_rows(r, rt, torch.tensor([0, 97]))
    with pytest.raises(ValueError, match="t: expected shape"):
        ops.gram_rows(r, r, torch.tensor([0]))
    with pytest.raises(ValueError, match="r: expected a float32 sparse CSR"):
        ops.gram_rows(r.to_dense(), rt, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="out_index must be a permutation"):
        ops.gram_rows(r, rt, torch.tensor([0]), torch.zeros(g.num_items, dtype=torch.long))
    bad = torch.sparse_csr_tensor(r.crow_indices(), r.col_indices().clone().fill_(g.num_items + 5), r.values(),
                                  r.shape, check_invariants=False)
    with pytest.raises(RuntimeError, match="column ids must lie in"):
        ops.gram_rows(bad, rt, torch.tensor([0]))


def test_memoised_scores_are_the_filter_scores():
    """memoise(): repeated users come from memory, exactly, in fresh tiles; past the capacity users are
    recomputed; a reordered scorer permutes the memoised rows."""
    _, g = _graph()
    f = filters.GraphFilter(g, rank=8, ideal_weight=0.3, sharpen_time=1.0, sharpen_solver="rk4").fit()
    want = f.scores(torch.arange(g.num_users))
    f.memoise(max_bytes=4 * g.num_items * 10)          # room for 10 users
    sc = f.scorer()
    first = torch.tensor([5, 3, 5, 40, 7, 0, 1, 2, 9, 11, 12, 13, 14])   # a repeat; more users than room
    got = sc(first)
    kept = got.clone()
    torch.testing.assert_close(got, want[first], rtol=1e-6, atol=1e-7)
    stored = torch.tensor([0, 1, 2, 3, 5, 7, 9, 11, 12, 13])    # the first 10 distinct users, ascending
    assert f._memo_used == 10 and torch.equal(torch.nonzero(f._memo_slot >= 0).flatten(), stored)
    got.fill_(7.0)                                     # the caller may write into its tile
    again = torch.tensor([14, 40, 5, 96, 3])           # recomputed (past the room) and memoised
    out = sc(again)
    assert torch.equal(out[[2, 4]], kept[[0, 1]])      # served from memory: the first call's bits
    torch.testing.assert_close(out, want[again], rtol=1e-6, atol=1e-7)
    order = torch.randperm(g.num_items)
    torch.testing.assert_close(sc.reorder(order)(again), want[again][:, order], rtol=1e-6, atol=1e-7)
    assert torch.equal(sc.reorder(order)(stored)[:, torch.argsort(order)], sc(stored))


def test_singular_vectors_match_a_dense_svd():
    _, g = _graph()
    r, _, _, _ = filters.normalised_csr(g)
    v = filters.top_right_singular_vectors(r, 8, iters=6)
    _, s, vh = torch.linalg.svd(r.to_dense().double())
    assert s[7] > s[8] * 1.01, "the test graph needs a spectral gap after 8"
    proj = vh[:8].T @ vh[:8]
    torch.testing.assert_close(v.double() @ v.double().T, proj, atol=5e-3, rtol=0)


def test_sharpen_poly_is_the_solver():
    # Euler: (1 - hP)^K; RK4 on a linear ODE: the order-4 Taylor polynomial of exp(-hP) per step.
    assert filters.sharpen_poly("euler", 2, 1.0) == pytest.approx([1.0, -1.0, 0.25])
    assert filters.sharpen_poly("rk4", 1, 2.0) == pytest.approx([1, -2, 2, -8 / 6, 16 / 24])
    assert filters.sharpen_poly("rk4", 1, 0.0) == [1.0]
    # Many small steps converge to exp(-T P) on a scalar eigenvalue.
    lam, c = 0.7, filters.sharpen_poly("rk4", 8, 2.0)
    assert sum(ci * lam ** j for j, ci in enumerate(c)) == pytest.approx(math.exp(-1.4), rel=1e-4)
    for bad in (dict(solver="heun", steps=1, time=1.0), dict(solver="rk4", steps=0, time=1.0),
                dict(solver="rk4", steps=1, time=-1.0)):
        with pytest.raises(ValueError):
            filters.sharpen_poly(**bad)


def test_grid_search_agrees_with_separate_fits():
    edges, g = _graph(seed=1)
    keep = torch.arange(edges.size(0)) % 4 != 0
    train_e, valid = edges[keep], edges[~keep]
    g = BipartiteGraph.from_interactions(train_e, g.num_users, g.num_items)
    rows = filters.grid_search(g, valid, exclude=[train_e], ranks=(4, 8), ideal_weights=(0.0, 0.4, 1.5),
                               sharpen=(("euler", 1, 0.0), ("rk4", 1, 1.5)), num_users=None, batch_size=16)
    assert len(rows) == 10 and rows[0]["ndcg@20"] >= rows[-1]["ndcg@20"]
    for r in rows:
        # A rank below the largest is the leading part of the largest rank's SVD (grid_search's docstring).
        f = filters.GraphFilter(g, rank=8 if r["rank"] else 0, ideal_weight=r["ideal_weight"],
                                sharpen_time=r["sharpen_time"], sharpen_solver=r["sharpen_solver"]).fit()
        if r["rank"] == 4:
            f.ideal_in, f.ideal_out = f.ideal_in[:, :4], f.ideal_out[:4]
        m = metrics.evaluate(f.scorer(), valid, g.num_users, g.num_items, exclude=[train_e], ks=(20,))
        assert r["ndcg@20"] == pytest.approx(m["ndcg@20"], abs=1e-6)
        assert r["recall@20"] == pytest.approx(m["recall@20"], abs=1e-6)


def test_carve_valid_is_seeded_and_disjoint():
    rng = np.random.default_rng(0)
    train = np.unique(np.stack([rng.integers(0, 50, 2000), rng.integers(0, 80, 2000)], 1), axis=0)
    a_tr, a_va = carve_valid(train, 50, 0.1, rng=3)
    b_tr, b_va = carve_valid(train, 50, 0.1, rng=3)
    _, c_va = carve_valid(train, 50, 0.1, rng=4)
    assert np.array_equal(a_va, b_va) and np.array_equal(a_tr, b_tr)
    assert not np.array_equal(a_va, c_va)
    key = lambda e: set(map(tuple, e.tolist()))  # noqa: E731
    assert key(a_tr) | key(a_va) == key(train) and not key(a_tr) & key(a_va)
    n = np.bincount(train[:, 0], minlength=50)
    nv = np.bincount(a_va[:, 0], minlength=50)
    assert np.array_equal(nv, np.floor(n * 0.1 + 0.5).astype(int))      # round(10%) of each user
    assert (np.bincount(a_tr[:, 0], minlength=50)[n > 0] >= 1).all()


def test_gowalla_validation_never_holds_a_test_interaction():
    need_dataset("gowalla")
    from glrec_fast.data import load_dataset
    ds = load_dataset("gowalla", valid_fraction=0.1, seed=0)
    full = load_dataset("gowalla")
    key = lambda e: e[:, 0] * ds.num_items + e[:, 1]  # noqa: E731
    assert ds.valid.size(0) > 0.09 * full.train.size(0)
    assert not torch.isin(key(ds.valid), key(full.test)).any()
    assert torch.equal(torch.sort(torch.cat([key(ds.train), key(ds.valid)])).values, torch.sort(key(full.train)).values)
    assert torch.equal(ds.test, full.test)
    again = load_dataset("gowalla", valid_fraction=0.1, seed=0)
    assert torch.equal(again.valid, ds.valid)
    with pytest.raises(ValueError, match="valid_fraction"):
        load_dataset("ml-100k", split="random", valid_fraction=0.1)


def _softmax_reference(u, p, n, pos_ids, neg_ids, t, bias=None):
    """The loss written row by row from its definition (``bias``: the item offsets, by item id)."""
    total = 0.0
    off = (lambda i: 0.0) if bias is None else (lambda i: bias[i])  # noqa: E731
    for b in range(u.size(0)):
        cos = lambda a, c: (a @ c) / (a.norm() * c.norm())  # noqa: E731
        logits = [cos(u[b], p[b]) / t + off(pos_ids[b])] + [cos(u[b], n[j]) / t + off(neg_ids[j])
                                                            for j in range(n.size(0)) if neg_ids[j] != pos_ids[b]]
        logits = torch.stack(logits)
        total = total - (logits[0] - torch.logsumexp(logits, 0))
    return total / u.size(0)


def test_sampled_softmax_values_and_gradients():
    torch.manual_seed(2)
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    items = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    pos_ids = torch.tensor([0, 1, 2, 3, 3, 9])
    neg_ids = torch.tensor([3, 4, 5, 9, 7])                 # 3 and 9 collide with some positives
    got = losses.sampled_softmax(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.2)
    want = _softmax_reference(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.2)
    torch.testing.assert_close(got, want)
    gu, gi = torch.autograd.grad(got, (u, items))
    wu, wi = torch.autograd.grad(want, (u, items))
    torch.testing.assert_close(gu, wu)
    torch.testing.assert_close(gi, wi)
    with pytest.raises(ValueError, match="temperature"):
        losses.sampled_softmax(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.0)


def test_sampled_softmax_with_item_bias_values_and_gradients():
    torch.manual_seed(3)
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    items = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    pos_ids, neg_ids = torch.tensor([0, 1, 2, 3, 3, 9]), torch.tensor([3, 4, 5, 9, 7])
    got = losses.sampled_softmax(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.2, bias[pos_ids], bias[neg_ids])
    want = _softmax_reference(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.2, bias)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (u, items, bias)), torch.autograd.grad(want, (u, items, bias))):
        torch.testing.assert_close(g, w)
    assert not torch.isclose(got, losses.sampled_softmax(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.2))


@pytest.mark.parametrize("bias", [False, True], ids=["", "item-bias"])
def test_fused_sampled_softmax_equals_the_plain_autograd_reference(bias):
    # The one-buffer [B, N] path (losses._NegativeLogSumExp) against reference.sampled_softmax, with
    # duplicate negatives, several positives colliding with negatives and a row whose positive
    # appears twice among them; values and every gradient.
    torch.manual_seed(4)
    u = torch.randn(33, 8, dtype=torch.float64, requires_grad=True)
    items = torch.randn(25, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(25, dtype=torch.float64, requires_grad=True)
    pos_ids, neg_ids = torch.randint(0, 25, (33,)), torch.cat([torch.randint(0, 25, (16,)), torch.tensor([7, 7])])
    pos_ids[0] = 7
    wrt = (u, items, b) if bias else (u, items)
    out = {}
    for name, fn in (("fused", losses.sampled_softmax), ("reference", reference.sampled_softmax)):
        extra = (b[pos_ids], b[neg_ids]) if bias else ()
        loss = fn(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.1, *extra)
        out[name] = (loss, torch.autograd.grad(loss, wrt))
    torch.testing.assert_close(out["fused"][0], out["reference"][0])
    for g, w in zip(out["fused"][1], out["reference"][1]):
        torch.testing.assert_close(g, w)
    loss = losses.sampled_softmax(u, items[pos_ids], items[neg_ids], pos_ids, neg_ids, 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


def test_item_bias_ranks_as_the_logits_do_and_trains_row_sparse():
    # MF with --item_bias: export's inner product is temperature x the training logit, so ranking by
    # it is ranking by the logit; the bias table is a row-sparse table beside the ID tables.
    from glrec_fast.models.mf import MF
    from glrec_fast.train import _optimizer
    torch.manual_seed(0)
    model = MF(7, 9, 4)
    model.cosine = True
    model.add_item_bias(0.2)
    with torch.no_grad():
        model.item_bias.weight.normal_()
    opt = _optimizer(model, {"lr": 0.01, "weight_decay": 0.0})
    assert model.sparse_tables() == [model.user, model.item, model.item_bias]
    ex = model.export()
    assert ex["user_emb"].shape == (7, 5) and ex["item_emb"].shape == (9, 5)
    u, i = torch.nn.functional.normalize(model.user.weight, dim=-1), torch.nn.functional.normalize(model.item.weight, dim=-1)
    logits = (u @ i.T) / 0.2 + model.item_bias.weight[:, 0][None, :]
    torch.testing.assert_close(ex["user_emb"] @ ex["item_emb"].T, 0.2 * logits.detach())
    before = model.item_bias.weight.detach().clone()
    loss, _ = model.softmax_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]), 0.2, 0.0)
    loss.backward()
    assert model.item_bias.weight.grad.is_sparse
    opt.step()
    moved = (model.item_bias.weight != before).any(1).nonzero().flatten().tolist()
    assert moved == [2, 3, 4, 5]     # the positives' and the negatives' offsets, no other


def test_spectral_embeddings_reconstruct_the_low_rank_graph():
    edges, g = _graph()
    user, item = losses.spectral_embeddings(g, 6)
    assert user.shape == (g.num_users, 6) and item.shape == (g.num_items, 6)
    r, _, _, _ = filters.normalised_csr(g)
    u, s, vh = torch.linalg.svd(r.to_dense().double())
    best = (u[:, :6] * s[:6]) @ vh[:6]                      # the rank-6 truncation of R~
    torch.testing.assert_close((user @ item.T).double(), best, atol=2e-3, rtol=0)
    assert user[96].abs().max() < 1e-6 and item[:3].abs().max() < 1e-6   # isolated nodes stay at zero
    pad_u, pad_i = losses.spectral_embeddings(g, 200)      # more dims than singular directions
    assert pad_u.shape == (g.num_users, 200) and pad_i[:, 59:].abs().max() == 0


# ----------------------------------------------------------------------------------- CLI routes
BASE = ["--dataset", "ml-100k", "--split", "random", "--grokking", "false"]


def test_gfcf_cli_writes_metrics_and_recommends(tmp_path):
    need_dataset("ml-100k")
    assert train.main(BASE + ["--model", "bspm", "--filter_rank", "64", "--ideal_weight", "0.2",
                              "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test"]["ndcg@20"] > 0.2 and m["valid"]["ndcg@20"] > 0.15     # random ranking: ~0.01
    assert m["filter"]["sharpen_time"] == 2.5 and m["epochs_run"] == 0
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    users = [ds.user_ids[j] for j in (0, 5, 17)]
    recs = train.recommend(tmp_path / "best.pt", users, k=10)
    # The same top 10 as the model's own scores with training items masked.
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    f = filters.GraphFilter(g, rank=64, ideal_weight=0.2, sharpen_time=2.5, sharpen_solver="rk4").fit()
    ck = torch.load(tmp_path / "best.pt", weights_only=True)
    f.ideal_in, f.ideal_out = ck["ideal_in"], ck["ideal_out"]
    s = f.scores(torch.tensor([0, 5, 17]))
    for r, u in enumerate((0, 5, 17)):
        s[r, ds.train[ds.train[:, 0] == u, 1]] = -math.inf
    want = [[ds.item_ids[i] for i in row] for row in torch.topk(s, 10, dim=1).indices.tolist()]
    assert recs == want


def test_time_budget_stops_on_time(tmp_path):
    need_dataset("ml-100k")
    args = BASE + ["--model", "lightgcn", "--epochs", "500", "--batch_size", "256", "--patience", "0",
                   "--time_budget", "0.05", "--out", str(tmp_path)]   # 3 seconds
    assert train.main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["epochs_run"] < 500
    assert 3.0 <= m["history"][-1]["elapsed_s"] < 20.0
    assert m["test"]["ndcg@20"] > 0 and (tmp_path / "best.pt").is_file()


def test_softmax_spectral_route_trains(tmp_path):
    need_dataset("ml-100k")
    args = BASE + ["--model", "mf", "--loss", "softmax", "--init", "spectral", "--epochs", "3", "--lr", "0.001",
                   "--reg_weight", "0", "--out", str(tmp_path)]
    assert train.main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test"]["ndcg@20"] > 0.25        # MF-BPR after 50 tuned epochs: 0.28 (README)
    with pytest.raises(ValueError, match="softmax is for trained models"):
        from glrec_fast import config
        cfg = config.resolve(BASE + ["--model", "bspm", "--loss", "softmax", "--out", str(tmp_path / "x")])
        train.train(cfg)


def test_item_bias_route_trains_and_recommends(tmp_path):
    need_dataset("ml-100k")
    args = BASE + ["--model", "mf", "--loss", "softmax", "--init", "spectral", "--epochs", "3",
                   "--lr", "0.005",
                   "--reg_weight", "0", "--out", str(tmp_path)]
    assert train.main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test"]["ndcg@20"] > 0.25
    ck = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ck["item_emb"].shape[1] == 65 and ck["user_emb"][:, -1].eq(1).all()   # the bias column
    assert ck["item_emb"][:, -1].abs().max() > 0          # the offsets were learned
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    users = [ds.user_ids[j] for j in (0, 5)]
    recs = train.recommend(tmp_path / "best.pt", users, k=10)
    scores = ck["user_emb"][[0, 5]] @ ck["item_emb"].T
    for r, u in enumerate((0, 5)):
        scores[r, ds.train[ds.train[:, 0] == u, 1]] = -math.inf
    assert recs == [[ds.item_ids[i] for i in row] for row in torch.topk(scores, 10, dim=1).indices.tolist()]
    # It is the default for the softmax; BPR scores and the hybrid's fused scores carry no offset.
    from glrec_fast import config
    for flags, has_bias in ((["--model", "mf", "--loss", "softmax"], True), (["--model", "mf", "--loss", "softmax",
                            "--item_bias", "false"], False), (["--model", "mf", "--loss", "bpr"], False)):
        cfg = config.resolve(BASE + flags + ["--out", str(tmp_path / "x")])
        from glrec_fast.models.mf import MF
        model = MF(10, 12, 4)
        train.prepare_model(cfg, model, None)
        assert ("item_bias" in model._modules) == has_bias, flags


@pytest.mark.parametrize("model", ["mf", "lightgcn", "graphsage", "hybrid"])
def test_spectral_init_for_every_trainable_model(model, tmp_path):
    """--init spectral puts the graph's top singular factors in the ID table, at init_std scale."""
    from glrec_fast import config
    from glrec_fast.data import make_synthetic
    ds = make_synthetic(num_users=120, num_items=80, num_interactions=2500, seed=0, split="random")
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    cfg = config.resolve([], overrides={"model": model, "init": "spectral", "emb_dim": 8, "out": str(tmp_path)})
    if model == "hybrid":   # built directly: the CLI's hybrid would encode text with a real encoder
        from glrec_fast.models.hybrid import FusedHybridRec
        m = FusedHybridRec(g, torch.randn(ds.num_items, 5), dim=8)
    else:
        m = train.build_model(cfg, ds, g, torch.device("cpu"))
    train.prepare_model(cfg, m, g)
    table = torch.cat([m.user.weight, m.item.weight]) if model == "mf" else m.ego.weight
    user, item = losses.spectral_embeddings(g, 8)
    want = torch.cat([user, item])
    torch.testing.assert_close(table, want * (0.1 / want.std()), rtol=1e-4, atol=1e-6)


def test_tune_filter_chooses_on_validation(tmp_path):
    # --tune_filter: the CLI fits the setting filters.grid_search ranks first on the validation split
    # (never on test).
    need_dataset("ml-100k")
    assert train.main(BASE + ["--model", "bspm", "--tune_filter", "true", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    table = filters.grid_search(g, ds.valid, exclude=[ds.train], ranks=filters.TUNE_RANKS,
                                ideal_weights=filters.TUNE_IDEAL_WEIGHTS,
                                sharpen=[("rk4", 1, t) for t in filters.TUNE_SHARPEN_TIMES], num_users=None)
    best = table[0]
    assert {k: m["filter"][k] for k in ("rank", "ideal_weight", "sharpen_time")} == \
        {k: best[k] for k in ("rank", "ideal_weight", "sharpen_time")}
    # Validation's choice is not the defaults here, so an ignored flag would fail the check above.
    assert (best["rank"], best["ideal_weight"], best["sharpen_time"]) != (256, 0.3, 2.5)
    with pytest.raises(ValueError, match="validation split is empty"):
        filters.tune({"model": "gfcf", "seed": 0}, g, ds.valid[:0], exclude=[ds.train])
