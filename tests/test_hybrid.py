"""FusedHybridRec: gate semantics, cold-start routing, cold simulation, the grokking prior, errors."""
import inspect
import json
import math

import pytest
import torch
import yaml

from conftest import minilm
from glrec_fast import BipartiteGraph, reference, train
from glrec_fast.graph import ITEM_COLD, USER_COLD
from glrec_fast.models.hybrid import FusedHybridRec, user_gate_ids


def _graph(U=30, I=25, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.stack([torch.randint(0, U, (n,), generator=g), torch.randint(0, I - 5, (n,), generator=g)], 1)
    return BipartiteGraph.from_interactions(e, U, I)  # items I-5..I-1 are cold


def _model(fusion="gated", **kw):
    g = _graph()
    content = torch.randn(g.num_items, 12)
    return g, FusedHybridRec(g, content, fusion=fusion, dim=8, num_layers=2, text_hidden=16, **kw)


def test_fused_embeddings_follow_the_gate_formula():
    g, m = _model(cold_gate="vector")
    with torch.no_grad():
        m.gate_weight.normal_()
        m.gate_bias.normal_()
    br = m.branch_embeddings()
    (gu, gi), (tu, ti), (fu, fi) = br["graph"], br["text"], br["fused"]
    want_i = reference.gated_fusion(gi, ti, g.item_context, m.gate_weight, m.gate_bias)
    # score(u, i) = user vector through the gate of (user context, item i's context) . item vector.
    want_u = torch.stack([reference.gated_fusion(gu, tu, user_gate_ids(g.user_context, c), m.gate_weight,
                                                 m.gate_bias) for c in range(3)])  # [3, U, d]
    want_scores = (want_u[g.item_context] * want_i.unsqueeze(1)).sum(-1).T  # [U, I]
    assert fu.shape == (g.num_users, 3 * 8) and fi.shape == (g.num_items, 3 * 8)
    assert torch.allclose(fu @ fi.T, want_scores, atol=1e-5)
    # The forward (BPR) scores use the same per-pair rule.
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 21, 3]), torch.tensor([22, 4, 5])
    m.eval()
    _, gi_all = m.graph_embeddings()
    assert torch.all(gi_all[21:] == 0)
    scores = fu @ fi.T
    m.cold_drop = 0.0
    m.train()
    loss, parts = m.loss(users, pos, neg, 0.0)
    want = torch.nn.functional.softplus(-(scores[users, pos] - scores[users, neg])).mean()
    assert torch.allclose(parts["bpr"], want, atol=1e-5)


def test_shared_user_gate_gives_one_user_vector():
    g, m = _model(user_gate="shared", cold_gate="vector")
    with torch.no_grad():
        m.gate_weight.normal_()
        m.gate_bias.normal_()
    br = m.branch_embeddings()
    (gu, gi), (tu, ti), (fu, fi) = br["graph"], br["text"], br["fused"]
    assert fu.shape == (g.num_users, 8)
    assert torch.allclose(fu, reference.gated_fusion(gu, tu, user_gate_ids(g.user_context, 0), m.gate_weight,
                                                     m.gate_bias), atol=1e-5)
    assert torch.allclose(fi, reference.gated_fusion(gi, ti, g.item_context, m.gate_weight, m.gate_bias), atol=1e-5)


def test_cold_items_come_from_content_alone():
    g, m = _model()
    cold = g.item_context == ITEM_COLD
    assert int(cold.sum()) == 5
    _, gi = m.graph_embeddings()
    assert torch.all(gi[cold] == 0) and torch.any(gi[~cold] != 0)
    # A cold item's fused vector changes with its text and not with its (untrained) graph row.
    fi = m.branch_embeddings()["fused"][1].detach()
    with torch.no_grad():
        m.ego.weight[g.num_users:][cold] += 5.0
    assert torch.allclose(m.branch_embeddings()["fused"][1][cold], fi[cold])


def test_cold_simulation_trains_the_cold_gate_from_warm_items():
    g, m = _model(cold_drop=0.5, cold_gate="vector")
    warm = torch.nonzero(g.item_context != ITEM_COLD).flatten()
    users = torch.randint(0, g.num_users, (64,))
    pos, neg = warm[torch.randint(0, warm.numel(), (64,))], warm[torch.randint(0, warm.numel(), (64,))]
    m.train()
    loss, _ = m.loss(users, pos, neg, 1e-4)
    loss.backward()
    # Only warm items were in the batch, yet the cold gate (row ITEM_COLD) received a gradient.
    assert m.gate_bias.grad[ITEM_COLD].abs().sum() > 0
    m.zero_grad()
    _, m0 = _model(cold_drop=0.0, cold_gate="vector")
    m0.train()
    m0.loss(users, pos, neg, 1e-4)[0].backward()
    assert m0.gate_bias.grad[ITEM_COLD].abs().sum() == 0


def test_fusion_prior_moves_the_gate_toward_the_graph_branch():
    g, m = _model()
    br = m.branch_embeddings()
    before = m.gate_values(br["graph"][1], br["text"][1], g.item_context).mean()
    m.fusion_prior.fill_(1.0)
    after = m.gate_values(br["graph"][1], br["text"][1], g.item_context).mean()
    assert after > before + 0.1


def test_static_and_single_branch_modes():
    g, m = _model("static", static_weight=0.25)
    br = m.branch_embeddings()
    assert torch.allclose(br["fused"][1], 0.25 * br["graph"][1] + 0.75 * br["text"][1])
    _, mt = _model("text")
    assert "graph" not in mt.branch_embeddings()


def test_bad_arguments():
    g = _graph()
    with pytest.raises(ValueError, match="content"):
        FusedHybridRec(g, torch.randn(g.num_items + 1, 4))
    with pytest.raises(ValueError, match="fusion"):
        FusedHybridRec(g, torch.randn(g.num_items, 4), fusion="max")
    with pytest.raises(ValueError, match="cold_drop"):
        FusedHybridRec(g, torch.randn(g.num_items, 4), cold_drop=1.5)
    with pytest.raises(ValueError, match="user_gate"):
        FusedHybridRec(g, torch.randn(g.num_items, 4), user_gate="per_user")
    with pytest.raises(ValueError, match="cold_gate"):
        FusedHybridRec(g, torch.randn(g.num_items, 4), cold_gate="matrix")
    with pytest.raises(ValueError, match="gate_init"):
        FusedHybridRec(g, torch.randn(g.num_items, 4), gate_init=1.0)
    bad = torch.randn(g.num_items, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FusedHybridRec(g, bad)


# A small hybrid job through the CLI: synthetic data, the real MiniLM encoder, 3 epochs, one thread.
SMALL_HYBRID = ["--dataset", "synthetic", "--synthetic_users", "300", "--synthetic_items", "150",
                "--synthetic_interactions", "6000", "--encoder", "minilm", "--epochs", "3",
                "--batch_size", "512", "--lr", "0.01", "--num_threads", "1", "--fusion", "gated"]


@minilm
def test_cli_hybrid_with_real_minilm_and_monitor(tmp_path):
    """The default job's path end to end: synthetic data, MiniLM text, gated hybrid, monitor, plot."""
    out = tmp_path / "run"
    rc = train.main(SMALL_HYBRID + ["--grok_every", "2", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "hybrid"
    assert set(m["gates"]) >= {"gate/item_cold", "gate/item_head", "gate/item_tail"}
    assert m["grokking"]["branches"] == ["graph", "text", "fused"] and m["grokking"]["observations"] > 0
    assert (out / "training_curves.png").stat().st_size > 10_000
    # Better than random ranking (about 20/150 recall@20 for a user with items spread uniformly).
    assert m["test"]["recall@20"] > 0.2


@minilm
def test_cli_default_hybrid_is_the_score_mix(tmp_path):
    """Without --fusion the hybrid is the score-level mix (what won on validation): both branches
    trained, the graph weight chosen on valid from ScoreHybrid's grid and reported."""
    from glrec_fast.models.score_hybrid import HYBRID_GRID
    out = tmp_path / "default"
    args = [a for a in SMALL_HYBRID if a not in ("--fusion", "gated")]
    rc = train.main(args + ["--grokking", "false", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    w = m["gates"]["score/graph_weight"]
    assert m["model"] == "hybrid" and min(abs(w - a) for a in HYBRID_GRID) < 1e-6
    # graph_branch auto became the filter, so its one trained branch (the text model) trains by softmax.
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["graph_branch"] == "gfcf" and used["loss"] == "softmax"
    assert m["test"]["recall@20"] > 0.15   # random ranking: about 20/150 = 0.133 (3 epochs of a toy)


@pytest.mark.parametrize("cold_gate", ["fixed", "scalar"])
def test_cold_gate_modes_give_cold_items_one_share(cold_gate):
    g, m = _model(cold_gate=cold_gate, gate_init=0.75, cold_drop=0.5, cold_weight=1.0)
    with torch.no_grad():
        m.gate_weight.normal_()
        m.gate_bias.normal_()
    br = m.branch_embeddings()
    cold = g.item_context == ITEM_COLD
    gv = m.gate_values(br["graph"][1], br["text"][1], g.item_context)
    # Cold items: one share for every item and dimension (0.75 at the start), whatever their text.
    assert torch.allclose(gv[cold], torch.full_like(gv[cold], 0.75))
    assert not torch.allclose(gv[~cold], torch.full_like(gv[~cold], 0.75))
    users_cold_gate = m.gate_values(br["graph"][0], br["text"][0], user_gate_ids(g.user_context, ITEM_COLD))
    assert torch.allclose(users_cold_gate, torch.full_like(users_cold_gate, 0.75))
    m.train()
    warm = torch.nonzero(~cold).flatten()
    users = torch.randint(0, g.num_users, (64,))
    pos, neg = warm[torch.randint(0, warm.numel(), (64,))], warm[torch.randint(0, warm.numel(), (64,))]
    loss, parts = m.loss(users, pos, neg, 1e-4)
    loss.backward()
    assert "bpr_cold" in parts
    assert m.gate_weight.grad[ITEM_COLD].abs().sum() == 0 and m.gate_bias.grad[ITEM_COLD].abs().sum() == 0
    assert m.gate_bias.grad[1].abs().sum() > 0  # warm head gate still learns
    if cold_gate == "scalar":
        assert m.cold_logit.grad[ITEM_COLD] != 0
    else:
        assert m.cold_logit.grad is None


def test_graphsage_branch_trains_on_sampled_blocks():
    g, m = _model(graph_branch="graphsage", fanouts=[3, 3])
    assert m.sage.fanouts == [3, 3]
    warm = torch.nonzero(g.item_context != ITEM_COLD).flatten()
    users = torch.randint(0, g.num_users, (16,))
    pos = warm[torch.randint(0, warm.numel(), (16,))]
    neg = torch.randint(0, g.num_items, (16,))  # may hit cold items, whose graph vector is zero
    m.prefetch(users, pos, neg)                  # what the training loop does one batch ahead
    m.train()
    loss, parts = m.loss(users, pos, neg, 1e-4)
    loss.backward()
    assert torch.isfinite(loss) and {"bpr", "bpr_graph", "bpr_text"} <= set(parts)
    assert m.sage.lin_neigh[0].weight.grad.abs().sum() > 0 and m.ego.weight.grad.abs().sum() > 0
    gu, gi = m.graph_embeddings()  # full-neighbourhood GraphSAGE inference for ranking
    assert gu.shape == (g.num_users, 8) and torch.all(gi[g.item_context == ITEM_COLD] == 0)
    fu, fi = m.embeddings()
    assert (fu @ fi.T).shape == (g.num_users, g.num_items)
    with pytest.raises(ValueError, match="graph_branch"):
        _model(graph_branch="gat")
    with pytest.raises(ValueError, match="fanouts"):
        _model(graph_branch="graphsage", fanouts=[0, -2])


@minilm
def test_cli_hybrid_with_graphsage_branch(tmp_path):
    out = tmp_path / "sage"
    rc = train.main(SMALL_HYBRID + ["--grokking", "false", "--graph_branch", "graphsage", "--fanouts", "[5,5]",
                                    "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["recall@20"] > 0.2  # random: about 20/150


def test_gate_reg_pulls_gates_toward_their_start():
    g, m = _model(gate_init=0.75, gate_reg=0.1)
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    m.train()
    _, parts = m.loss(users, pos, neg, 0.0)
    assert float(parts["gate_reg"]) == pytest.approx(0.0, abs=1e-10)  # at the start: no pull
    with torch.no_grad():
        m.gate_bias[1] += 0.5
    loss, parts = m.loss(users, pos, neg, 0.0)
    assert float(parts["gate_reg"]) == pytest.approx(0.25 * m.gate_bias.size(1), rel=1e-5)
    m.zero_grad()
    loss.backward()
    assert torch.all(m.gate_bias.grad[1] > 0)  # gradient descent moves the bias back down
    with pytest.raises(ValueError, match="gate_reg"):
        _model(gate_reg=-1.0)


def _gate_drift(gate_reg: float, steps: int = 60) -> float:
    """Largest move of any warm item's gate from gate_init after ``steps`` Adam steps on triples with
    no signal (random positives and negatives)."""
    torch.manual_seed(3)
    g, m = _model(gate_init=0.75, gate_reg=gate_reg)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(steps):
        users, pos, neg = torch.randint(0, 30, (64,)), torch.randint(0, 20, (64,)), torch.randint(0, 20, (64,))
        loss, _ = m.loss(users, pos, neg, 1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        br = m.branch_embeddings()
        warm = g.item_context != ITEM_COLD
        gv = m.gate_values(br["graph"][1], br["text"][1], g.item_context)[warm]
    return float((gv - 0.75).abs().max())


def test_default_gate_reg_holds_a_gate_with_no_signal_at_its_start():
    """Issue 11: with no signal the gate stays at the tuned static mix it starts from. Unpulled
    (gate_reg 0) the gates wander; the default pull keeps every warm gate within 0.02 of gate_init."""
    from glrec_fast.config import defaults
    default = defaults()["gate_reg"]   # the Python API's default is the CLI's
    assert inspect.signature(FusedHybridRec).parameters["gate_reg"].default == default
    free, held = _gate_drift(0.0), _gate_drift(default)
    assert free > 0.05, free
    assert held < 0.02 and held < free / 3, (held, free)


def test_moving_the_model_moves_one_graph():
    """The hybrid and its GraphSAGE branch hold the same graph; .to() must leave them sharing one copy."""
    g, m = _model(graph_branch="graphsage", fanouts=[3, 3])
    assert m.graph is m.sage.graph
    m = m.to("meta")
    assert m.graph.rowptr.device.type == "meta" and m.graph is m.sage.graph


def test_score_fusion_equals_plain_torch_and_reorders():
    from glrec_fast.metrics import EmbeddingScorer
    from glrec_fast.models.hybrid import ScoreFusion
    torch.manual_seed(0)
    gu, gi, tu, ti = torch.randn(7, 4), torch.randn(11, 4), torch.randn(7, 3), torch.randn(11, 3)
    fused = ScoreFusion(EmbeddingScorer(gu, gi), EmbeddingScorer(tu, ti), 0.3)
    users = torch.tensor([0, 3, 6])
    z = lambda s: (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)  # noqa: E731
    want = 0.3 * z(gu[users] @ gi.T) + 0.7 * z(tu[users] @ ti.T)
    torch.testing.assert_close(fused(users), want)
    order = torch.randperm(11)
    torch.testing.assert_close(fused.reorder(order)(users), want[:, order])
    with pytest.raises(ValueError, match="weight"):
        ScoreFusion(fused.graph_scorer, fused.text_scorer, 1.5)


def test_zmix_is_the_three_way_mix_of_z_scores_and_reorders():
    """ScoreFusion(graph, ZMix(trained, knn, s), a) is a z_g + (1-a) s z_k + (1-a)(1-s) z_t (no second
    standardisation of the text side), also with -inf entries at the shares 0 and 1."""
    from glrec_fast.models.hybrid import ScoreFusion, ZMix
    torch.manual_seed(5)
    G, T, K = torch.randn(9, 13) * 2, torch.randn(9, 13) + 3, torch.rand(9, 13)
    users = torch.tensor([1, 4, 8])
    z = lambda s: (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)  # noqa: E731
    gs, ts, ks = (lambda u: G[u]), (lambda u: T[u]), (lambda u: K[u])
    got = ScoreFusion(gs, ZMix(ts, ks, 0.25), 0.4)(users)
    want = 0.4 * z(G[users]) + 0.6 * 0.25 * z(K[users]) + 0.6 * 0.75 * z(T[users])
    torch.testing.assert_close(got, want)
    order = torch.randperm(13)
    torch.testing.assert_close(ScoreFusion(gs, ZMix(ts, ks, 0.25), 0.4).reorder(order)(users), want[:, order])
    T2 = T.clone()
    T2[0, 3] = -math.inf
    for share in (0.0, 1.0):   # an excluded item stays -inf, never nan
        out = ZMix(lambda u: T2[u], ks, share)(torch.tensor([0]))
        assert not torch.isnan(out).any() and (share == 1.0 or out[0, 3] == -math.inf)
    with pytest.raises(ValueError, match="share"):
        ZMix(ts, ks, 1.2)


def test_score_share_search_equals_full_tile_ranking():
    """tune_score_shares' table for every (kNN share, weight) equals reference.evaluate of that mix's
    full tile, and a share of 0 is tune_score_weight's table."""
    from glrec_fast import reference
    from glrec_fast.models.hybrid import ScoreFusion, ZMix, tune_score_shares, tune_score_weight
    torch.manual_seed(6)
    U, I = 90, 500
    G, T, K = torch.randn(U, I) * 3 + 1, torch.rand(U, I), torch.randn(U, I) ** 2
    train_pairs = torch.stack([torch.arange(U).repeat_interleave(20), torch.randint(0, I, (U * 20,))], 1)
    valid = torch.stack([torch.arange(U).repeat_interleave(3), torch.randint(0, I, (U * 3,))], 1)
    valid = valid[~torch.isin(valid[:, 0] * I + valid[:, 1], train_pairs[:, 0] * I + train_pairs[:, 1])]
    gs, ts, ks = (lambda u: G[u]), (lambda u: T[u]), (lambda u: K[u])
    grid, shares = [0.0, 0.35, 1.0], [0.0, 0.3, 1.0]
    tables = tune_score_shares(gs, ts, ks, shares, valid, U, I, exclude=[train_pairs], grid=grid, batch_size=40,
                               candidates=30)
    assert sorted(tables) == shares
    seen = set()
    for s, table in tables.items():
        for a, got in table:
            want = reference.evaluate(ScoreFusion(gs, ZMix(ts, ks, s), a), valid, U, I, exclude=[train_pairs], ks=(20,))
            for key in ("recall@20", "ndcg@20"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), (s, a, key)
            seen.add(round(got["ndcg@20"], 6))
    assert len(seen) > 3                               # the case tells the mixes apart
    _, table0 = tune_score_weight(gs, ts, valid, U, I, exclude=[train_pairs], grid=grid, batch_size=40, candidates=30)
    assert table0 == tables[0.0]
    with pytest.raises(ValueError, match="shares"):
        tune_score_shares(gs, ts, None, [0.5], valid, U, I)


@pytest.mark.parametrize("true_weight", [0.3, 0.85])
def test_score_weight_search_picks_the_best_validation_weight(true_weight):
    """Each user's valid item is the top item of the mix at ``true_weight``: only that weight ranks
    every valid item first, so the grid search must return it."""
    from glrec_fast.models.hybrid import ScoreFusion, tune_score_weight
    torch.manual_seed(1)
    U, I = 300, 40
    G, T = torch.randn(U, I), torch.randn(U, I)
    mix = ScoreFusion(lambda u: G[u], lambda u: T[u], true_weight)
    valid = torch.stack([torch.arange(U), mix(torch.arange(U)).argmax(1)], 1)
    best, table = tune_score_weight(lambda u: G[u], lambda u: T[u], valid, U, I, batch_size=64)
    assert best == pytest.approx(true_weight)
    assert len(table) == 21 and dict(table)[true_weight]["ndcg@20"] == pytest.approx(1.0)


@pytest.mark.parametrize("candidates", [20, 60, 400])
@pytest.mark.parametrize("n_tiles", [2, 3])
def test_mixed_top_k_is_the_full_ranking(candidates, n_tiles):
    """Every weight vector's top 20 from the candidate union (and its per-user fallback) equals the top
    20 of the full mixed tile, with excluded (-inf) items and zero weights too."""
    from glrec_fast.models.hybrid import mixed_top_k
    torch.manual_seed(3)
    b, n = 64, 500
    tiles = [torch.randn(b, n) for _ in range(n_tiles)]
    tiles[1][:8] = tiles[0][:8] * -1.0 + 0.01 * tiles[1][:8]      # branches that disagree: the bound fails there
    ex = torch.rand(b, n) < 0.1
    for t in tiles:
        t[ex] = -math.inf
    shares = [0.0, 0.05, 0.5, 0.95, 1.0]
    weights = [(a, 1 - a) for a in shares] if n_tiles == 2 else \
        [(a, (1 - a) * (1 - s), (1 - a) * s) for a in shares for s in (0.0, 0.3, 1.0)]
    for w, top in zip(weights, mixed_top_k(tiles, weights, 20, candidates)):
        full = sum(t * wj for t, wj in zip(tiles, w) if wj != 0)
        want = torch.topk(full, 20, dim=1)
        assert torch.equal(full.gather(1, top), want.values), w
        assert torch.equal(top.sort(1).values, want.indices.sort(1).values), w


def test_score_weight_search_equals_full_tile_ranking():
    """tune_score_weight's table (candidate top-k, exclusions masked once per batch) equals the dense
    ground truth: reference.evaluate of every weight's full mixed tile."""
    from glrec_fast import reference
    from glrec_fast.models.hybrid import ScoreFusion, tune_score_weight
    torch.manual_seed(2)
    U, I = 120, 700
    G, T = torch.randn(U, I) * 3 + 1, torch.rand(U, I)
    train_pairs = torch.stack([torch.arange(U).repeat_interleave(30), torch.randint(0, I, (U * 30,))], 1)
    valid = torch.stack([torch.arange(U).repeat_interleave(3), torch.randint(0, I, (U * 3,))], 1)
    valid = valid[~torch.isin(valid[:, 0] * I + valid[:, 1], train_pairs[:, 0] * I + train_pairs[:, 1])]
    grid = [0.0, 0.3, 0.65, 1.0]
    best, table = tune_score_weight(lambda u: G[u], lambda u: T[u], valid, U, I, exclude=[train_pairs],
                                    grid=grid, batch_size=50, candidates=40)
    for a, got in table:
        want = reference.evaluate(ScoreFusion(lambda u: G[u], lambda u: T[u], a), valid, U, I,
                                  exclude=[train_pairs], ks=(20,))
        for key in ("recall@20", "ndcg@20", "precision@20", "hit@20", "mrr@20"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (a, key)
    assert best == max(table, key=lambda t: (t[1]["ndcg@20"], -t[0]))[0]


@pytest.mark.parametrize("branch", ["lightgcn", "graphsage"])
def test_cold_users_have_no_graph_embedding(branch):
    # Users 0 and 1 have no training interaction: like cold items, their graph vector is zero (not
    # the random initial one), in ranking and in a training batch; their scores come from text.
    e = torch.tensor([[u, i] for u in range(2, 12) for i in range(u % 4, 20, 3)])
    g = BipartiteGraph.from_interactions(e, 12, 20)
    assert torch.equal(torch.nonzero(g.user_context == USER_COLD).flatten(), torch.tensor([0, 1]))
    m = FusedHybridRec(g, torch.randn(20, 12), user_content=torch.randn(12, 12), dim=8, num_layers=2,
                       text_hidden=16, graph_branch=branch, fanouts=[3, 3])
    gu, _ = m.graph_embeddings()
    assert torch.all(gu[:2] == 0) and torch.all(gu[2:].abs().sum(1) > 0)
    users, items = torch.tensor([0, 1, 5]), torch.tensor([3, 4, 6, 7, 8, 9])
    if branch == "graphsage":
        m.prefetch(users, items[:3], items[3:])
    gu_b, _ = m._graph_batch(users, items)
    assert torch.all(gu_b[:2] == 0) and gu_b[2].abs().sum() > 0


@pytest.mark.parametrize("fusion, user_gate", [("gated", "item_context"), ("gated", "shared"), ("static", "item_context"),
                                               ("graph", "item_context"), ("text", "item_context")])
def test_softmax_loss_equals_the_softmax_on_ranking_embeddings(fusion, user_gate):
    # --loss softmax for the hybrid: each positive and shared negative is scored exactly as ranking
    # scores it (the user's vector through the gate of that item's context), so with no cold-start
    # simulation the loss and its gradients equal the sampled softmax on embeddings()' rows.
    from glrec_fast.models.losses import sampled_softmax
    g, m = _model(fusion=fusion, user_gate=user_gate, cold_drop=0.0, aux_weight=0.0, cold_gate="vector", gate_reg=0.0)
    with torch.no_grad():
        m.gate_weight.normal_()
        m.gate_bias.normal_()
    users, pos = torch.tensor([0, 4, 4, 9, 17]), torch.tensor([1, 2, 7, 3, 19])
    negs = torch.tensor([0, 5, 20, 21, 24, 8, 2])        # 20, 21, 24: cold items
    loss, parts = m.softmax_loss(users, pos, negs, 0.3, 0.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    u, i = m.embeddings()
    want = sampled_softmax(u[users], i[pos], i[negs], pos, negs, 0.3)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert set(got) == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_softmax_loss_trains_every_part():
    g, m = _model(cold_weight=0.5, gate_reg=1e-3)
    m.train()
    users, pos = torch.randint(0, g.num_users, (16,)), torch.randint(0, g.num_items - 5, (16,))
    loss, parts = m.softmax_loss(users, pos, torch.randint(0, g.num_items, (32,)), 0.1, 1e-4)
    loss.backward()
    assert {"softmax", "softmax_graph", "softmax_text", "softmax_cold", "gate_reg", "reg"} <= set(parts)
    assert m.ego.weight.grad.abs().sum() > 0 and m.gate_weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.projector.parameters())


@minilm
def test_cli_hybrid_softmax_trains(tmp_path):
    out = tmp_path / "sm"
    rc = train.main(SMALL_HYBRID + ["--loss", "softmax", "--num_negatives", "128", "--reg_weight", "0",
                                    "--grokking", "false", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] and m["test"]["ndcg@20"] > 0.05, (hist, m["test"])


# ----------------------------------------------------------------------------- score-level hybrid
def _score_hybrid(weight=0.5):
    from glrec_fast.models.lightgcn import LightGCN
    from glrec_fast.models.score_hybrid import ScoreHybrid
    g = _graph()
    torch.manual_seed(0)
    text = FusedHybridRec(g, torch.randn(g.num_items, 6), fusion="text", dim=8)
    return g, ScoreHybrid(g, LightGCN(g, dim=8, num_layers=2), text, weight=weight)


def test_score_hybrid_trains_both_branches_and_tunes_on_valid():
    from glrec_fast.models.hybrid import tune_score_weight
    from glrec_fast.models.score_hybrid import HYBRID_GRID
    g, m = _score_hybrid()
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    loss, parts = m.loss(users, pos, neg, 1e-4)
    loss.backward()
    assert {"bpr_graph", "bpr_text"} <= set(parts)
    assert m.graph_model.ego.weight.grad.abs().sum() > 0
    assert m.text_model.projector[0].weight.grad.abs().sum() > 0
    # Cold items score 0 in the graph branch (their vectors are untrained noise).
    cold = g.item_context == ITEM_COLD
    assert bool(cold.any())
    gs, _ = m.branch_scorers()
    assert (gs(torch.arange(5))[:, cold] == 0).all()
    # tune() sets the weight that tune_score_weight picks, and scorer() ranks with it.
    valid = torch.stack([torch.arange(g.num_users), torch.randint(0, g.num_items, (g.num_users,))], 1)
    a = m.tune(valid)
    want, _ = tune_score_weight(*m.branch_scorers(), valid, g.num_users, g.num_items, grid=HYBRID_GRID)
    assert a == want and float(m.weight) == pytest.approx(a) and m.scorer().weight == pytest.approx(a)
    # With more validation users than max_users, the weight is chosen on a seeded sample of them.
    k = g.num_users // 3
    a_k = m.tune(valid, max_users=k, seed=5)
    pick = torch.unique(valid[:, 0])[torch.randperm(g.num_users, generator=torch.Generator().manual_seed(5))[:k]]
    sample = valid[torch.isin(valid[:, 0], pick)]
    want_k, table_k = tune_score_weight(*m.branch_scorers(), sample, g.num_users, g.num_items, grid=HYBRID_GRID)
    assert a_k == want_k and m.tuning == table_k
    # Valid items that only the graph branch ranks first: the hybrid still keeps some text (a < 1),
    # so cold items are never left to ties.
    gs, _ = m.branch_scorers()
    best_graph = torch.stack([torch.arange(g.num_users), gs(torch.arange(g.num_users)).argmax(1)], 1)
    assert m.tune(best_graph) <= 0.95
    with pytest.raises(ValueError, match="content-only"):
        type(m)(g, m.graph_model, FusedHybridRec(g, torch.randn(g.num_items, 6)))


def test_auto_graph_branch_is_the_validation_winner_for_each_fusion():
    from glrec_fast import config
    from glrec_fast.data import load_dataset
    ds = load_dataset("synthetic", split="cold", seed=0, num_users=60, num_items=40, num_interactions=600)
    cfg = config.resolve([], overrides={"model": "hybrid"})
    assert cfg["graph_branch"] == "auto" and cfg["fusion"] == "score"
    got = train.resolve_graph_branch(cfg, ds)
    assert (got["graph_branch"], got["tune_filter"]) == ("gfcf", True)
    no_valid = type("NoValid", (), {"valid": ds.valid[:0]})()
    assert train.resolve_graph_branch(cfg, no_valid)["tune_filter"] is False     # nothing to choose on
    for fusion in ("gated", "static"):
        assert train.resolve_graph_branch(dict(cfg, fusion=fusion), ds)["graph_branch"] == "lightgcn"
    assert train.resolve_graph_branch(dict(cfg, graph_branch="graphsage"), ds)["graph_branch"] == "graphsage"


@minilm
def test_cli_score_hybrid_with_filter_branch_on_the_cold_split(tmp_path):
    """--fusion score --graph_branch gfcf end to end: the weight chosen on valid is reported, best.pt
    serves recommend(), and cold items are ranked by the text branch alone."""
    from glrec_fast import metrics
    from glrec_fast.data import load_dataset
    from glrec_fast.graph import BipartiteGraph
    from glrec_fast.metrics import EmbeddingScorer
    out = tmp_path / "score"
    rc = train.main(SMALL_HYBRID + ["--split", "cold", "--fusion", "score", "--graph_branch", "gfcf",
                                    "--text_branch", "trained", "--filter_rank", "16", "--grokking", "false",
                                    "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    a = m["gates"]["score/graph_weight"]
    assert 0.0 <= a <= 1.0 and m["test"]["n_users/cold"] > 0
    assert m["filter"]["rank"] == 16 and m["filter"]["sharpen_time"] == 0.0
    ck = train.load_export(out / "best.pt")
    scorer = train.scorer_from_export(ck)
    assert scorer.weight == pytest.approx(a)
    ds = load_dataset("synthetic", split="cold", seed=0, num_users=300, num_items=150, num_interactions=6000)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    kw = dict(exclude=[ds.train, ds.valid], ks=(20,), item_context=graph.item_context)
    got = metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, **kw)
    assert got["ndcg@20"] == pytest.approx(m["test"]["ndcg@20"], abs=1e-6)
    text_only = EmbeddingScorer(ck["text_branch"]["user_emb"], ck["text_branch"]["item_emb"])
    if a < 1.0:
        assert got["ndcg@20/cold"] == metrics.evaluate(text_only, ds.test, ds.num_users, ds.num_items, **kw)["ndcg@20/cold"]
    # The default graph branch (auto) of the score hybrid is GF-CF with --tune_filter: the branch's setting is
    # the one the grid ranks first on this validation split.
    tuned = tmp_path / "tuned"
    assert train.main(SMALL_HYBRID + ["--split", "cold", "--fusion", "score", "--epochs", "1",
                                      "--grokking", "false", "--out", str(tuned)]) == 0
    written = (tuned / "config.yaml").read_text()
    assert "graph_branch: gfcf" in written and "tune_filter: true" in written, written
    from glrec_fast.models import filters
    best = filters.grid_search(graph, ds.valid, exclude=[ds.train], ranks=(128, 150),
                               ideal_weights=filters.TUNE_IDEAL_WEIGHTS, num_users=None)[0]
    chosen = json.loads((tuned / "metrics.json").read_text())["filter"]
    assert (chosen["rank"], chosen["ideal_weight"]) == (best["rank"], best["ideal_weight"])
    # recommend() ranks with the same mix (training items masked).
    users = ck["user_ids"][:4]
    recs = train.recommend(out / "best.pt", users, k=5)
    tile = scorer(torch.arange(4))
    rowptr, items = metrics.csr_of_pairs(ck["train"], len(ck["user_ids"]))
    tile[metrics.csr_rows(rowptr, items, torch.arange(4))] = float("-inf")
    want = [[ck["item_ids"][i] for i in r] for r in torch.topk(tile, 5, dim=1).indices.tolist()]
    assert recs == want


# ----------------------------------------------------------------------------- continuous gate
def test_continuous_gate_starts_at_the_bucket_gate():
    torch.manual_seed(3)
    _, buckets = _model()
    torch.manual_seed(3)
    _, cont = _model(gate_features="continuous")
    for k in ("fused",):
        for a, b in zip(buckets.branch_embeddings()[k], cont.branch_embeddings()[k]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _features_by_hand(g, e_graph, e_text, side, cold):
    """The continuous gate's inputs written out in plain torch (log degree standardised over the
    graph's items or users, degree 0 for cold rows; cold flag; cosine of the two vectors; is-user)."""
    deg = (g.item_degree if side == "item" else g.user_degree).float()
    logd = torch.log1p(deg)
    z = (logd - logd.mean()) / logd.std()
    z = torch.where(cold, -logd.mean() / logd.std(), z)
    cos = torch.nn.functional.cosine_similarity(e_graph.detach(), e_text.detach(), dim=1)
    return torch.stack([z, cold.float(), cos, torch.full_like(cos, float(side == "user"))], 1)


@pytest.mark.parametrize("cold_gate", ["fixed", "vector"])
def test_continuous_gate_equals_its_plain_torch_reference(cold_gate):
    """Fused item and user vectors and every gradient (gate network, gate table, both branches)
    against reference.gated_fusion_offset with the features computed by hand."""
    torch.manual_seed(4)
    g, m = _model(gate_features="continuous", cold_gate=cold_gate)
    with torch.no_grad():   # a trained-looking gate: every parameter away from its start
        for p in list(m.gate_net.parameters()) + [m.gate_weight, m.gate_bias]:
            p.add_(0.3 * torch.randn_like(p))
    br = m.branch_embeddings()
    (g_u, g_i), (t_u, t_i) = br["graph"], br["text"]
    cases = [("item", g_i, t_i, g.item_context, g.item_context == ITEM_COLD),
             ("user", g_u, t_u, user_gate_ids(g.user_context, 1), g.user_context == USER_COLD)]
    for side, eg, et, ids, cold in cases:
        params = [eg, et, m.gate_weight, m.gate_bias, *m.gate_net.parameters()]
        go = torch.randn(eg.shape)
        got = m._fuse(eg, et, ids, side)
        grads = torch.autograd.grad((got * go).sum(), params, retain_graph=True, allow_unused=True)
        w, b = m._gate_params()
        offset = m.gate_net(_features_by_hand(g, eg, et, side, cold))
        if cold_gate != "vector":
            offset = offset * (~m.cold_rows[ids]).unsqueeze(1).float()
        want = reference.gated_fusion_offset(eg, et, ids, w, b, offset)
        ref_grads = torch.autograd.grad((want * go).sum(), params, retain_graph=True, allow_unused=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a if a is not None else torch.zeros(()), r if r is not None else torch.zeros(()),
                                       rtol=1e-4, atol=1e-6)
        assert grads[-1].abs().sum() > 0   # the network learns


def test_continuous_gate_trains_and_is_pulled_back_by_gate_reg():
    torch.manual_seed(5)
    g, m = _model(gate_features="continuous", gate_reg=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    users, pos, neg = torch.arange(10), torch.randint(0, 20, (10,)), torch.randint(0, 25, (10,))
    loss, parts = m.loss(users, pos, neg, 1e-4)
    assert "gate_reg" in parts
    loss.backward()
    assert m.gate_net[2].weight.grad.abs().sum() > 0
    opt.step()
    assert m.gate_net[2].weight.abs().sum() > 0
    with pytest.raises(ValueError, match="gate_features"):
        _model(gate_features="knn")
