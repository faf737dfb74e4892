"""TextKNN, the training-free text branch, and the score hybrid that is fitted without training."""
import json

import pytest
import torch

from conftest import minilm
from glrec_fast import BipartiteGraph, reference, train
from glrec_fast.graph import ITEM_COLD
from glrec_fast.models.text_knn import TextKNN


SMALL = ["--dataset", "synthetic", "--synthetic_users", "300", "--synthetic_items", "150",
         "--synthetic_interactions", "6000", "--encoder", "minilm", "--model", "hybrid", "--num_threads", "1"]


def _graph(U=30, I=25, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.stack([torch.randint(0, U - 2, (n,), generator=g), torch.randint(0, I - 5, (n,), generator=g)], 1)
    return BipartiteGraph.from_interactions(e, U, I), e   # items I-5.. and users U-2.. have no interaction


@pytest.mark.parametrize("neighbours,power", [(3, 2.0), (7, 1.0), (100, 3.5)])
def test_text_knn_matches_the_dense_formula(neighbours, power):
    g, e = _graph()
    content = torch.randn(g.num_items, 8, generator=torch.Generator().manual_seed(1))
    content[4] = 0.0                                            # an item without text: cosine 0 with all
    m = TextKNN(g, content, neighbours=neighbours, power=power, chunk=6).fit()   # chunks that split rows
    users = torch.tensor([5, 0, 29, 3, 28, 11])
    got = m.scores(users)
    want = reference.text_knn_dense(content, e, g.num_users, neighbours, power)[users]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert m.nbr_idx.shape == (g.num_items, min(neighbours, g.num_items - 1))
    assert not (m.nbr_idx == torch.arange(g.num_items)[:, None]).any()      # never its own neighbour
    cold = g.item_context == ITEM_COLD
    assert (got[:, cold] > 0).any()          # cold items are reached from the warm items they resemble
    assert (got[2] == 0).all() and (got[4] == 0).all()          # users without training items


def test_text_knn_export_round_trip_and_scorer():
    g, _ = _graph()
    m = TextKNN(g, torch.randn(g.num_items, 5), neighbours=4).fit()
    back = TextKNN.from_export(g, m.export())
    users = torch.arange(g.num_users)
    assert torch.equal(back.scorer()(users), m.scores(users))
    assert back.hparams == m.hparams == {"neighbours": 4, "power": 2.0}
    bad = dict(m.export(), nbr_val=m.nbr_val[:, :2])
    with pytest.raises(ValueError, match="neighbour tables"):
        TextKNN.from_export(g, bad)


def test_text_knn_rejects_bad_arguments_by_name():
    g, _ = _graph()
    c = torch.randn(g.num_items, 4)
    with pytest.raises(ValueError, match="content: expected"):
        TextKNN(g, c[:-1])
    nan = c.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TextKNN(g, nan)
    with pytest.raises(ValueError, match="text_neighbours"):
        TextKNN(g, c, neighbours=0)
    with pytest.raises(ValueError, match="text_power"):
        TextKNN(g, c, power=0.0)
    with pytest.raises(RuntimeError, match="fit"):
        TextKNN(g, c).scores(torch.tensor([0]))


def test_score_hybrid_of_a_trained_graph_branch_and_text_knn_trains_only_the_graph():
    from glrec_fast.models.lightgcn import LightGCN
    from glrec_fast.models.score_hybrid import ScoreHybrid
    g, _ = _graph()
    m = ScoreHybrid(g, LightGCN(g, dim=8, num_layers=2), TextKNN(g, torch.randn(g.num_items, 6)).fit())
    assert m.trainable and m.branch_embeddings().keys() == {"graph"}
    loss, parts = m.loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]), 1e-4)
    loss.backward()
    assert set(parts) == {"bpr_graph", "reg_graph"} and m.graph_model.ego.weight.grad.abs().sum() > 0


@minilm
def test_cli_fitted_hybrid_is_fitted_once_and_serves_recommend(tmp_path):
    """--text_branch knn with the default graph branch (GF-CF): no training epochs, the mix weight
    chosen on every validation user, and best.pt ranks exactly as the fitted model did."""
    from glrec_fast.data import load_dataset
    from glrec_fast.models import score_hybrid
    out = tmp_path / "fit"
    args = SMALL + ["--split", "cold", "--text_branch", "knn", "--out", str(out)]
    assert train.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 0 and m["text_knn"] == {"neighbours": 20, "power": 2.0} and "rank" in m["filter"]
    assert m["test"]["ndcg@20"] > 0.05 and m["test"]["n_users/cold"] > 0
    a = m["gates"]["score/graph_weight"]
    # The weight is the one tune_score_weight picks on all validation users.
    from glrec_fast import config
    cfg = train.resolve_graph_branch(config.resolve(args), ds := load_dataset(
        "synthetic", split="cold", seed=0, num_users=300, num_items=150, num_interactions=6000))
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    model = score_hybrid.build(cfg, ds, g, torch.device("cpu"))
    assert model.tune(ds.valid, exclude=[ds.train], max_users=None) == pytest.approx(a)
    # The cold items' own weight is the one tune_cold_weight picks after it.
    from glrec_fast.models.hybrid import tune_cold_weight
    a_cold, _ = tune_cold_weight(*model.branch_scorers(), a, g.item_context == ITEM_COLD, ds.valid, ds.num_users,
                                 ds.num_items, exclude=[ds.train], grid=score_hybrid.HYBRID_GRID)
    assert m["gates"]["score/graph_weight_cold"] == pytest.approx(a_cold) == float(model.cold_weight)
    users = torch.arange(ds.num_users)
    ex = train.load_export(out / "best.pt")
    torch.testing.assert_close(train.scorer_from_export(ex)(users), model.scorer()(users))
    top = train.recommend(out / "best.pt", [ds.user_ids[0].item()], k=5)
    assert len(top[0]) == 5


def test_auto_text_branch_mixes_both_text_branches_as_valid_chooses():
    """tune() with a trained text branch and a TextKNN: the kNN share, the weight and the cold weight
    are the ones a brute-force search over full rankings of every mix picks (best share by the one-
    weight mix; then it, the trained branch alone and kNN alone judged with their cold weight)."""
    from glrec_fast import metrics
    from glrec_fast.models.hybrid import FusedHybridRec, ScoreFusion
    from glrec_fast.models.lightgcn import LightGCN
    from glrec_fast.models.score_hybrid import HYBRID_GRID, KNN_SHARES, ScoreHybrid
    g, e = _graph()
    torch.manual_seed(0)
    knn = TextKNN(g, torch.randn(g.num_items, 6), neighbours=3).fit()
    m = ScoreHybrid(g, LightGCN(g, dim=8, num_layers=2), FusedHybridRec(g, torch.randn(g.num_items, 6), fusion="text",
                                                                         dim=8), text_knn=knn)
    assert m.trainable and m.knn_in_use() is None and float(m.knn_share) == 0.0
    cold = g.item_context == ITEM_COLD
    users = torch.arange(g.num_users - 2)
    # Valid pairs: each user's top item under a mix of all three branches (kNN share 0.5), so a share
    # strictly inside (0, 1) should win.
    three = ScoreFusion(m.branch_scorers()[0], m.text_scorer(0.5), 0.3)(users)
    valid = torch.stack([users, three.masked_fill(reference._dense_pair_mask(e, users, g.num_items), -1e9).argmax(1)], 1)

    def ndcg(s, a, a_cold=None):
        f = ScoreFusion(m.branch_scorers()[0], m.text_scorer(s), a, a if a_cold is None else a_cold, cold)
        return metrics.evaluate(f, valid, g.num_users, g.num_items, exclude=[e], ks=(20,))["ndcg@20"]
    one = {s: max(((ndcg(s, a), -a) for a in HYBRID_GRID)) for s in KNN_SHARES}
    s_best = max(KNN_SHARES, key=lambda s: (round(one[s][0], 9), -s))
    judged = {}
    for s in (s_best, 0.0, 1.0):
        a = -one[s][1]
        vals = {c: ndcg(s, a, c) for c in HYBRID_GRID}
        top = max(vals.values())
        a_cold = a if vals[a] >= top - 1e-9 else min(c for c in HYBRID_GRID if vals[c] >= top - 1e-9)
        judged.setdefault(s, (top, a, a_cold))
    want_s = max(judged, key=lambda s: (round(judged[s][0], 9), -[s_best, 0.0, 1.0].index(s)))
    m.tune(valid, exclude=[e], max_users=None)
    assert float(m.knn_share) == pytest.approx(want_s) and 0.0 < want_s < 1.0
    assert (float(m.weight), float(m.cold_weight)) == (pytest.approx(judged[want_s][1]), pytest.approx(judged[want_s][2]))
    assert m.gate_report()["score/text_knn_share"] == pytest.approx(want_s)
    assert len({round(v[0], 6) for v in one.values()}) > 2          # the shares are told apart
    # The export ranks as the model does, whatever the share.
    for s in (0.0, 0.3, 1.0):
        m.knn_share.fill_(s)
        ex = m.export()
        assert ("text_knn_branch" in ex) == (0.0 < s < 1.0) and ("text_knn" in ex["text_branch"]) == (s == 1.0)
        torch.testing.assert_close(ScoreHybrid.scorer_from_export(ex, g)(users), m.scorer()(users))
    with pytest.raises(ValueError, match="text_knn"):
        ScoreHybrid(g, m.graph_model, knn, text_knn=knn)


@minilm
def test_cli_auto_text_branch_trains_and_reports_its_choice(tmp_path):
    out = tmp_path / "auto"
    args = SMALL + ["--epochs", "2", "--grokking", "false", "--out", str(out)]
    assert train.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    share = m["gates"]["score/text_knn_share"]
    assert m["epochs_run"] == 2 and 0.0 <= share <= 1.0
    assert ("text_knn" in m) == (share > 0.0)
    ex = train.load_export(out / "best.pt")
    assert ("text_knn" in ex["text_branch"]) == (share == 1.0) and ("text_knn_branch" in ex) == (0.0 < share < 1.0)
    assert len(train.recommend(out / "best.pt", [ex["user_ids"][0]], k=3)[0]) == 3


def _two_scorers(g, seed=0):
    from glrec_fast.metrics import EmbeddingScorer
    gen = torch.Generator().manual_seed(seed)
    cold = g.item_context == ITEM_COLD
    item_g = torch.randn(g.num_items, 4, generator=gen).masked_fill(cold[:, None], 0.0)   # cold: one graph score
    return (EmbeddingScorer(torch.randn(g.num_users, 4, generator=gen), item_g),
            EmbeddingScorer(torch.randn(g.num_users, 4, generator=gen), torch.randn(g.num_items, 4, generator=gen)))


def _half_cold_valid(g, e):
    """Valid pairs where half of the users' held-out item is cold (the last 5 items), so the cold weight
    matters; training pairs ``e`` left out."""
    users = torch.arange(g.num_users - 2)
    gen = torch.Generator().manual_seed(4)
    items = torch.where(users % 2 == 0, torch.randint(g.num_items - 5, g.num_items, (users.numel(),), generator=gen),
                        torch.randint(0, g.num_items - 5, (users.numel(),), generator=gen))
    valid = torch.stack([users, items], 1)
    return valid[~torch.isin(valid[:, 0] * g.num_items + valid[:, 1], e[:, 0] * g.num_items + e[:, 1])]


def test_score_fusion_mixes_cold_items_with_their_own_weight():
    from glrec_fast.models.hybrid import ScoreFusion
    g, _ = _graph()
    gs, ts = _two_scorers(g)
    cold = g.item_context == ITEM_COLD
    users = torch.arange(g.num_users)
    zg, zt = ScoreFusion.standardise(gs(users)), ScoreFusion.standardise(ts(users))
    got = ScoreFusion(gs, ts, 0.7, 0.2, cold)(users)
    want = torch.where(cold[None, :], 0.2 * zg + 0.8 * zt, 0.7 * zg + 0.3 * zt)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ScoreFusion(gs, ts, 0.7)(users), 0.7 * zg + 0.3 * zt)
    order = torch.randperm(g.num_items, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ScoreFusion(gs, ts, 0.7, 0.2, cold).reorder(order)(users), got[:, order])
    with pytest.raises(ValueError, match="go together"):
        ScoreFusion(gs, ts, 0.7, 0.2)
    with pytest.raises(ValueError, match="cold_weight"):
        ScoreFusion(gs, ts, 0.7, 1.5, cold)


def test_tune_cold_weight_picks_the_best_full_ranking_on_valid():
    from glrec_fast import metrics
    from glrec_fast.models.hybrid import ScoreFusion, tune_cold_weight
    from glrec_fast.models.score_hybrid import HYBRID_GRID
    g, e = _graph()
    gs, ts = _two_scorers(g, seed=1)
    cold = g.item_context == ITEM_COLD
    valid = _half_cold_valid(g, e)
    a_cold, table = tune_cold_weight(gs, ts, 0.6, cold, valid, g.num_users, g.num_items, exclude=[e], grid=HYBRID_GRID)
    brute = {a: metrics.evaluate(ScoreFusion(gs, ts, 0.6, a, cold), valid, g.num_users, g.num_items, exclude=[e],
                                 ks=(20,))["ndcg@20"] for a in HYBRID_GRID}
    for a, m in table:
        assert m["ndcg@20"] == pytest.approx(brute[a], abs=1e-6)
    best = max(brute.values())
    tied = [a for a in HYBRID_GRID if brute[a] >= best - 1e-6]
    assert a_cold == (0.6 if 0.6 in tied else min(tied))
    assert len(set(round(v, 6) for v in brute.values())) > 1      # the case can tell weights apart


def test_score_hybrid_tune_sets_the_cold_weight_after_the_weight():
    from glrec_fast.models.hybrid import tune_cold_weight, tune_score_weight
    from glrec_fast.models.score_hybrid import HYBRID_GRID, ScoreHybrid
    g, e = _graph()
    gs, _ = _two_scorers(g, seed=1)

    class Fixed(torch.nn.Module):   # a fitted graph branch with known scores (cold items score 0)
        trainable = False

        def memoise(self, max_bytes):
            pass

        def scorer(self):
            return gs
    m = ScoreHybrid(g, Fixed(), TextKNN(g, torch.randn(g.num_items, 6, generator=torch.Generator().manual_seed(2)),
                                        neighbours=3).fit())
    valid = _half_cold_valid(g, e)
    a = m.tune(valid, exclude=[e])
    want_a, _ = tune_score_weight(*m.branch_scorers(), valid, g.num_users, g.num_items, exclude=[e], grid=HYBRID_GRID)
    want_cold, _ = tune_cold_weight(*m.branch_scorers(), a, g.item_context == ITEM_COLD, valid, g.num_users,
                                    g.num_items, exclude=[e], grid=HYBRID_GRID)
    assert a == want_a and float(m.cold_weight) == pytest.approx(want_cold)
    assert want_cold != pytest.approx(a)                     # the case tells the two weights apart
    s = m.scorer()
    assert (s.weight, s.cold_weight) == (pytest.approx(a), pytest.approx(want_cold))


def test_choose_mix_judges_the_ends_with_their_cold_weight():
    """score_hybrid.choose_mix against brute force over full rankings, on a case (found by search) where
    the share that wins with one weight for every item (0.1) loses to one text branch alone once each
    candidate's cold items get their own weight: the rule must judge both ends with their cold weight."""
    from glrec_fast import metrics
    from glrec_fast.models.hybrid import ScoreFusion
    from glrec_fast.models.score_hybrid import HYBRID_GRID, KNN_SHARES, choose_mix, text_side
    U, I, C = 40, 30, 6
    gen = torch.Generator().manual_seed(4)
    cold = torch.zeros(I, dtype=torch.bool)
    cold[-C:] = True
    G = torch.randn(U, I, generator=gen).masked_fill(cold, 0.0)          # a filter: cold items alike
    T, K = torch.randn(U, I, generator=gen), torch.randn(U, I, generator=gen).relu()
    e = torch.stack([torch.arange(U).repeat_interleave(4), torch.randint(0, I - C, (U * 4,), generator=gen)], 1)
    items = torch.where(torch.arange(U) % 2 == 0, torch.randint(I - C, I, (U,), generator=gen),
                        torch.randint(0, I - C, (U,), generator=gen))
    valid = torch.stack([torch.arange(U), items], 1)
    valid = valid[~torch.isin(valid[:, 0] * I + valid[:, 1], e[:, 0] * I + e[:, 1])]
    gs, ts, ks = (lambda u: G[u]), (lambda u: T[u]), (lambda u: K[u])

    def ndcg(s, a, a_cold):
        f = ScoreFusion(gs, text_side(ts, ks, s), a, a_cold, cold)
        return metrics.evaluate(f, valid, U, I, exclude=[e], ks=(20,))["ndcg@20"]
    one = {s: max((round(ndcg(s, a, a), 9), -a) for a in HYBRID_GRID) for s in KNN_SHARES}
    first = min(KNN_SHARES, key=lambda s: (-one[s][0], s))
    judged = {}
    for s in dict.fromkeys((first, 0.0, 1.0)):
        a = -one[s][1]
        vals = {c: round(ndcg(s, a, c), 9) for c in HYBRID_GRID}
        a_cold = max(HYBRID_GRID, key=lambda c: (vals[c], c == a, -c))
        judged[s] = (vals[a_cold], a, a_cold)
    want = max(judged, key=lambda s: (judged[s][0], -list(judged).index(s)))
    s, a, a_cold, table = choose_mix(gs, ts, ks, cold, valid, U, I, exclude=[e])
    assert (s, a, a_cold) == (want, pytest.approx(judged[want][1]), pytest.approx(judged[want][2]))
    assert 0.0 < first < 1.0 and want in (0.0, 1.0)     # the case tells the two rules apart
    assert [w for w, _ in table] == list(HYBRID_GRID)
    s0, a0, a0_cold, _ = choose_mix(gs, ts, None, cold, valid, U, I, exclude=[e])   # no kNN: the share is 0
    assert s0 == 0.0 and (a0, a0_cold) == (pytest.approx(judged[0.0][1]), pytest.approx(judged[0.0][2]))
