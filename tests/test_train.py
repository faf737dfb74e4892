"""The training CLI end to end on real ml-100k: outputs, resume, divergence, recommend, config errors."""
import json
import os
import sys

import pytest
import torch
import yaml

from glrec_fast import checkpoint, config, train
from conftest import need_dataset

BASE = ["--dataset", "ml-100k", "--split", "random", "--grokking", "false", "--eval_every", "1",
        "--batch_size", "4096"]


@pytest.fixture(scope="module")
def lightgcn_run(tmp_path_factory):
    need_dataset("ml-100k")
    out = tmp_path_factory.mktemp("lgcn")
    rc = train.main(BASE + ["--model", "lightgcn", "--epochs", "3", "--lr", "0.005", "--out", str(out)])
    assert rc == 0
    return out


def test_outputs_and_metric_keys(lightgcn_run):
    out = lightgcn_run
    for f in ("metrics.json", "config.yaml", "best.pt", "data.pt", "last.pt", "train.log"):
        assert (out / f).is_file(), f
    from glrec_fast import allocator
    # glrec_fast.allocator ran and said what it did: on Linux with no allocator settings from outside,
    # it kept the heap (anything else there is a failure to apply them).
    expect = ("malloc: large blocks from the heap" if sys.platform.startswith("linux") and allocator._chosen_outside() is None
              else "malloc: not applied")
    assert expect in (out / "train.log").read_text()
    m = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        for key in ("recall@20", "ndcg@20", "ndcg@20/warm", "ndcg@20/head", "ndcg@20/tail", "precision@10",
                    "hit@50", "mrr@20"):
            assert 0.0 <= m[split][key] <= 1.0, (split, key)
        assert "ndcg@20/cold" in m[split]
    # Random ranking scores about 0.01 ndcg@20 on ml-100k; three epochs of LightGCN are far above it.
    assert m["test"]["ndcg@20"] > 0.05
    assert len(m["history"]) == 3 and m["best_epoch"] >= 1


def test_recommend_returns_original_ids(lightgcn_run):
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    user = ds.user_ids[5]
    recs = train.recommend(lightgcn_run / "best.pt", [user], k=10)
    assert len(recs) == 1 and len(recs[0]) == 10 and len(set(recs[0])) == 10
    seen = {ds.item_ids[i] for u, i in ds.train.tolist() if u == 5}
    assert not seen & set(recs[0]), "recommend must not return items the user trained on"
    assert set(recs[0]) <= set(ds.item_ids)
    with pytest.raises(ValueError, match="user_ids"):
        train.recommend(lightgcn_run / "best.pt", ["no-such-user"], k=5)
    with pytest.raises(ValueError, match="k"):
        train.recommend(lightgcn_run / "best.pt", [user], k=0)


def test_best_pt_refers_to_the_runs_data_written_once(lightgcn_run, tmp_path):
    """best.pt keeps no training pairs (every improvement rewrites only the model); recommend() reads
    them from the data.pt beside it, refuses a missing or foreign data.pt, and still serves an
    export of version 2 that carries them inline."""
    from glrec_fast.data import load_dataset
    ds = load_dataset("ml-100k", split="random", seed=0)
    best = checkpoint.load(lightgcn_run / "best.pt")
    assert "train" not in best and "user_ids" not in best and best["data"]["num_pairs"] == ds.train.size(0)
    ck = train.load_export(lightgcn_run / "best.pt")
    assert torch.equal(ck["train"], ds.train) and ck["user_ids"] == ds.user_ids.tolist()
    users = ds.user_ids[:3].tolist()
    want = train.recommend(lightgcn_run / "best.pt", users, k=5)

    alone = tmp_path / "alone"
    alone.mkdir()
    checkpoint.save(best, alone / "best.pt")
    with pytest.raises(FileNotFoundError, match="data.pt"):
        train.recommend(alone / "best.pt", users, k=5)
    data = checkpoint.load(lightgcn_run / "data.pt")
    checkpoint.save({**data, "train": data["train"][1:], "sha256": "0" * 64}, alone / "data.pt")
    with pytest.raises(ValueError, match="other training data"):
        train.recommend(alone / "best.pt", users, k=5)

    inline = {k: v for k, v in ck.items() if k != "data"}   # version 2: pairs and ids inside best.pt
    checkpoint.save({**inline, "version": 2}, tmp_path / "v2.pt")
    assert train.recommend(tmp_path / "v2.pt", users, k=5) == want


@pytest.mark.parametrize("loss", ["bpr", "softmax"])   # softmax: the item-bias table and its Adam rows resume too
def test_resume_reproduces_an_unbroken_run(tmp_path, loss):
    need_dataset("ml-100k")
    args = BASE + ["--model", "mf", "--lr", "0.01", "--patience", "0", "--loss", loss]
    assert train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert train.main(args + ["--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["epochs_run"] == 2
    assert b["test"]["ndcg@20"] == pytest.approx(a["test"]["ndcg@20"], abs=1e-6)
    assert b["history"][1]["loss"] == pytest.approx(a["history"][1]["loss"], rel=1e-5)


def test_resume_continues_the_grokking_monitor(tmp_path):
    """The monitor's device state and history are stored in last.pt, so a resumed run's monitor sees
    the same observations as an unbroken run's (not a fresh monitor that restarts at the resume)."""
    need_dataset("ml-100k")
    args = [a if a != "false" else "true" for a in BASE] + ["--model", "mf", "--lr", "0.01", "--patience", "0",
                                                            "--grok_every", "2"]
    assert train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    first = checkpoint.load(tmp_path / "b" / "last.pt")["callbacks"]["GrokkingCallback"]
    assert first["monitor"]["calls"] > 0
    assert train.main(args + ["--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["grokking"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["grokking"]
    assert b["observations"] == a["observations"] > first["monitor"]["calls"]
    hist_a = checkpoint.load(tmp_path / "a" / "last.pt")["callbacks"]["GrokkingCallback"]["monitor"]["history"]
    hist_b = checkpoint.load(tmp_path / "b" / "last.pt")["callbacks"]["GrokkingCallback"]["monitor"]["history"]
    assert torch.allclose(hist_a, hist_b, atol=1e-5, equal_nan=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    need_dataset("ml-100k")
    args = BASE + ["--model", "mf", "--out", str(tmp_path)]
    assert train.main(args + ["--epochs", "1"]) == 0
    before = checkpoint.load(tmp_path / "last.pt")
    # An absurd learning rate makes the scores overflow to inf within the next epoch.
    rc = train.main(args + ["--epochs", "3", "--resume", "--lr", "1e30"])
    assert rc == 3
    assert "loss became" in capsys.readouterr().err
    after = checkpoint.load(tmp_path / "last.pt")
    assert after["state"]["epoch"] == 1
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]) and torch.isfinite(after["model"][k]).all()


def test_config_errors_are_reported(tmp_path, capsys):
    assert train.main(["--epochz", "3"]) == 2
    assert "unknown key 'epochz'" in capsys.readouterr().err
    assert train.main(["--epochs", "three"]) == 2
    assert "expects int" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [\n")
    assert train.main(["--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def _cli(*args, env=None, timeout=300):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "glrec_fast.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args, says", [
    (["--model", "lightgcm"], "model: expected one of mf | lightgcn"),
    (["--loss", "softmax", "--model", "gfcf"], "loss: softmax is for trained models"),
    (["--lr", "-1"], "lr: expected a number > 0"),
    (["--fanouts", "[0, 3]"], "fanouts: expected a list of positive integers"),
    (["--device", "gpu"], "device: expected auto | cpu"),
    (["--dataset", "gowala"], "'gowala' is neither a known dataset"),
])
def test_cli_user_errors_are_one_line_before_any_loading(tmp_path, args, says):
    # The dataset folder is empty: a configuration error must be found before any data is read,
    # and reported as one line (no traceback) with exit code 2.
    out = tmp_path / "run"
    r = _cli("--dataset", "gowalla", "--out", str(out), *args, env={"GLREC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()   # nothing was started


def test_cli_missing_dataset_is_one_line(tmp_path):
    r = _cli("--dataset", "gowalla", "--model", "mf", "--out", str(tmp_path / "run"),
             env={"GLREC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "dataset 'gowalla' not found" in r.stderr and str(tmp_path) in r.stderr


def test_cli_normal_start_prints_no_warning(tmp_path):
    r = _cli("--dataset", "synthetic", "--synthetic_users", "60", "--synthetic_items", "40",
             "--synthetic_interactions", "800", "--model", "mf", "--epochs", "1", "--grokking", "false",
             "--out", str(tmp_path / "run"), env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_config_precedence(tmp_path):
    from glrec_fast import config
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.5\n")
    cfg = config.resolve(["--config", str(f), "--lr", "0.25"])
    assert cfg["epochs"] == 7 and cfg["lr"] == 0.25 and cfg["batch_size"] == 2048


def test_atomic_save_leaves_no_partial_file(tmp_path):
    p = tmp_path / "ck.pt"
    checkpoint.save({"a": torch.ones(3)}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save({"a": Boom()}, p)
    assert torch.equal(checkpoint.load(p)["a"], torch.ones(3))  # old file intact
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]     # no temp file left


def test_monitor_ndcg_equals_the_full_evaluation_on_its_sample():
    """The grokking callback's on-device NDCG@20 (fixed validation sample, training items masked) is
    the same number metrics.evaluate gives for those users."""
    need_dataset("ml-100k")
    from glrec_fast import config
    from glrec_fast.data import load_dataset
    from glrec_fast.graph import BipartiteGraph
    from glrec_fast.metrics import evaluate
    from glrec_fast.models.mf import MF
    from glrec_fast.monitoring import GrokkingCallback
    ds = load_dataset("ml-100k", split="random", seed=0)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    torch.manual_seed(0)
    model = MF(ds.num_users, ds.num_items, 16, 0.1)
    cfg = config.resolve([], overrides={"grok_sample_users": 100})
    cb = GrokkingCallback(cfg)
    cb.on_start(model=model, ds=ds, graph=graph, cfg=cfg, device=torch.device("cpu"))
    with torch.no_grad():
        u, i = model.embeddings()
        mask = torch.isin(ds.valid[:, 0], cb.users)
        want = evaluate(lambda us: u[us] @ i.T, ds.valid[mask], ds.num_users, ds.num_items,
                        exclude=[ds.train], ks=[20])["ndcg@20"]
        got = float(cb._ndcg(u[cb.users], i))
    assert cb.users.numel() == 100
    assert got == pytest.approx(want, rel=1e-5)


def test_grokking_monitor_on_a_sampled_model_does_no_full_graph_work(monkeypatch):
    """GraphSAGE is watched on sampled vectors against a fixed candidate set (every validation item of
    the sample users plus random items): the NDCG is metrics.evaluate's with the other items ruled
    out, and no step of the monitor asks for full-graph embeddings."""
    need_dataset("ml-100k")
    from glrec_fast import config
    from glrec_fast.data import load_dataset
    from glrec_fast.graph import BipartiteGraph
    from glrec_fast.metrics import evaluate
    from glrec_fast.models.graphsage import GraphSAGE
    from glrec_fast.monitoring import CANDIDATES, GrokkingCallback
    ds = load_dataset("ml-100k", split="random", seed=0)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    torch.manual_seed(0)
    model = GraphSAGE(graph, 16, fanouts=[5, 5])
    cfg = config.resolve([], overrides={"grok_sample_users": 100, "grok_every": 1})
    cb = GrokkingCallback(cfg)
    cb.on_start(model=model, ds=ds, graph=graph, cfg=cfg, device=torch.device("cpu"))
    mask = torch.isin(ds.valid[:, 0], cb.users)
    assert torch.isin(ds.valid[mask, 1], cb.cand).all() and cb.cand.numel() <= mask.sum() + CANDIDATES
    calls = []
    monkeypatch.setattr(GraphSAGE, "embeddings", lambda self: calls.append(1))
    cb.on_step(step=1, loss=torch.tensor(0.5), parts={})
    assert calls == [] and cb.mon.history["step"] == [1]
    with torch.no_grad():
        u, i = model.sample_embeddings(cb.users, cb.cand)   # the same fresh sample (seeded by its ids)
        pos = {int(x): j for j, x in enumerate(cb.users)}

        def scores(us):
            out = torch.full((us.numel(), ds.num_items), -float("inf"))
            out[:, cb.cand] = u[[pos[int(x)] for x in us]] @ i.T
            return out
        want = evaluate(scores, ds.valid[mask], ds.num_users, ds.num_items, exclude=[ds.train], ks=[20])["ndcg@20"]
    assert cb.mon.history["val_metric"]["model"][0] == pytest.approx(want, rel=1e-5)


class _RunsCode:
    """Unpickling this calls a function of the loader's choosing (here: writes a marker file)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path, lightgcn_run):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "glrec_fast.export", "payload": _RunsCode(marker)}, evil)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="refused to load"):
        checkpoint.load(evil)
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        train.recommend(evil, ["1"], k=5)
    assert not marker.exists(), "loading ran code from the checkpoint"
    # Our own checkpoints (best.pt and last.pt, with the RNG states) load under the same rule.
    assert checkpoint.load(lightgcn_run / "best.pt")["kind"] == "glrec_fast.export"
    assert "rng" in checkpoint.load(lightgcn_run / "last.pt")


def test_scale_hints_and_the_evaluation_tile_budget(caplog, monkeypatch):
    import glrec_fast.train as tr
    from glrec_fast import config
    from glrec_fast.graph import BipartiteGraph
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack([torch.randint(0, 50, (400,), generator=g), torch.randint(0, 40, (400,), generator=g)], 1)
    graph = BipartiteGraph.from_interactions(pairs, 50, 40)
    cfg = config.resolve([], overrides={"model": "lightgcn"})
    monkeypatch.setattr(tr, "FULL_GRAPH_HINT_EDGES", graph.num_edges - 1)
    with caplog.at_level("INFO", logger="glrec_fast.train"):
        tr._scale_hints(cfg, graph)
        tr._scale_hints(dict(cfg, sampled=True), graph)
        tr._scale_hints(dict(cfg, model="graphsage"), graph)
    hints = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hint:")]
    assert len(hints) == 1 and "--sampled true" in hints[0]
    # 1,024 users x 1M items would be a 4 GiB tile: the batch shrinks to fit 1 GiB; small graphs keep it.
    assert tr.eval_batch_users({"eval_batch_size": 1024}, 1_000_000) == (1 << 30) // 4_000_000
    assert tr.eval_batch_users({"eval_batch_size": 1024}, 40_981) == 1024


def test_cosine_lr_schedule(tmp_path):
    """--lr_schedule cosine: lr at step 0, half at the midpoint, 0 after the last step; a 2-epoch run
    ends with the lr of its last step (and constant keeps --lr)."""
    assert train.cosine_lr_at(0.01, 0, 100) == pytest.approx(0.01)
    assert train.cosine_lr_at(0.01, 50, 100) == pytest.approx(0.005)
    assert train.cosine_lr_at(0.01, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert train.cosine_lr_at(0.01, 25, 100) > train.cosine_lr_at(0.01, 75, 100)
    need_dataset("ml-100k")
    from glrec_fast.data import load_dataset
    steps_per_epoch = -(-load_dataset("ml-100k", split="random", seed=0).train.size(0) // 4096)
    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        assert train.main(BASE + ["--model", "mf", "--epochs", "2", "--lr", "0.01", "--lr_schedule", schedule,
                                  "--out", str(out)]) == 0
        lr = checkpoint.load(out / "last.pt")["optimizer"]["param_groups"][0]["lr"]
        want = train.cosine_lr_at(0.01, 2 * steps_per_epoch - 1, 2 * steps_per_epoch) if schedule == "cosine" else 0.01
        assert lr == pytest.approx(want), schedule
    assert train.main(BASE + ["--lr_schedule", "linear", "--out", str(tmp_path / "bad")]) == 2


def test_eval_users_validates_on_a_fixed_sample_and_reports_every_user(tmp_path):
    """--eval_users N: training validates on a seeded sample of N validation users (the history's
    numbers are that sample's), the final report ranks every validation user."""
    need_dataset("ml-100k")
    from glrec_fast import metrics
    from glrec_fast.data import load_dataset
    from glrec_fast.graph import BipartiteGraph
    ds = load_dataset("ml-100k", split="random", seed=0)
    every = torch.unique(ds.valid[:, 0])
    cfg = {"eval_users": 100, "seed": 0}
    sample = train.validation_users(cfg, ds)
    assert sample.numel() == 100 and torch.isin(sample, every).all() and torch.equal(sample, sample.sort().values)
    assert torch.equal(sample, train.validation_users(cfg, ds))
    assert not torch.equal(sample, train.validation_users({"eval_users": 100, "seed": 1}, ds))
    assert train.validation_users({"eval_users": 0, "seed": 0}, ds) is None
    assert train.validation_users({"eval_users": every.numel(), "seed": 0}, ds) is None

    out = tmp_path / "run"
    assert train.main(BASE + ["--model", "mf", "--epochs", "2", "--lr", "0.01", "--eval_users", "100",
                              "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ck = train.load_export(out / "best.pt")
    scorer = train.scorer_from_export(ck)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    kw = dict(exclude=[ds.train], ks=ck["config"]["topk"], item_context=graph.item_context)
    full = metrics.evaluate(scorer, ds.valid, ds.num_users, ds.num_items, **kw)
    part = metrics.evaluate(scorer, ds.valid[torch.isin(ds.valid[:, 0], sample)], ds.num_users, ds.num_items, **kw)
    assert m["valid"]["n_users"] == every.numel() and m["valid"]["ndcg@20"] == pytest.approx(full["ndcg@20"], abs=1e-6)
    row = next(r for r in m["history"] if r["epoch"] == m["best_epoch"])
    assert row["valid/ndcg@20"] == pytest.approx(part["ndcg@20"], abs=1e-6)
    assert abs(part["ndcg@20"] - full["ndcg@20"]) > 1e-4   # the sample is not the whole split


def test_bpr_negatives_avoid_training_items_and_repeat_per_seed():
    from glrec_fast.train import sample_negatives
    gen = torch.Generator().manual_seed(0)
    nu, ni = 50, 40
    edges = torch.stack([torch.randint(0, nu, (900,), generator=gen), torch.randint(0, ni, (900,), generator=gen)], 1)
    edges = torch.cat([edges, torch.stack([torch.zeros(ni, dtype=torch.long), torch.arange(ni)], 1)])  # user 0 saw all
    keys = torch.sort(edges[:, 0] * ni + edges[:, 1]).values
    seen = set(map(tuple, edges.tolist()))
    users = torch.randint(1, nu, (4000,), generator=gen)
    neg = sample_negatives(users, ni, keys, torch.Generator().manual_seed(7))
    assert not any((u, i) in seen for u, i in zip(users.tolist(), neg.tolist()))
    assert torch.equal(neg, sample_negatives(users, ni, keys, torch.Generator().manual_seed(7)))
    assert neg.unique().numel() > ni // 2   # drawn across the catalogue, not a fixed fallback
    # a user who saw every item cannot get a true negative: bounded retries, then the last draw
    sat = sample_negatives(torch.zeros(10, dtype=torch.long), ni, keys, torch.Generator().manual_seed(1))
    assert sat.shape == (10,) and bool(((sat >= 0) & (sat < ni)).all())


def test_default_loss_is_softmax_for_the_filter_score_hybrid_only():
    """loss: null resolves to softmax for the default hybrid (score fusion, filter graph branch: the one
    trained branch is the text model) and to bpr for every other model; an explicit --loss wins."""
    cfg = config.resolve([])
    assert cfg["loss"] is None and cfg["model"] == "hybrid" and cfg["fusion"] == "score"
    for branch in ("gfcf", "bspm"):   # graph_branch auto resolves to gfcf at score level (resolve_graph_branch)
        assert train.resolve_loss(dict(cfg, graph_branch=branch))["loss"] == "softmax"
    for other in (dict(model="lightgcn"), dict(model="mf"), dict(fusion="gated"), dict(graph_branch="lightgcn")):
        assert train.resolve_loss(dict(cfg, **other))["loss"] == "bpr", other
    assert train.resolve_loss(dict(cfg, loss="bpr"))["loss"] == "bpr"
    with pytest.raises(ValueError, match="loss: expected one of"):
        train.check_config(dict(cfg, loss="hinge"))


def test_default_lr_is_chosen_per_model_and_recorded(tmp_path):
    """lr: null (the default) resolves to HYBRID_LR for the hybrid and DEFAULT_LR otherwise; an explicit
    --lr wins; config.yaml and the optimizer carry the resolved value; a non-number is named."""
    cfg = config.resolve([])
    assert cfg["lr"] is None
    assert train.resolve_lr(dict(cfg, model="hybrid"))["lr"] == train.HYBRID_LR == 5e-3
    assert train.resolve_lr(dict(cfg, model="lightgcn"))["lr"] == train.DEFAULT_LR == 1e-3
    assert train.resolve_lr(dict(cfg, model="hybrid", lr=0.02))["lr"] == 0.02
    for bad in ("fast", True, -1.0):
        with pytest.raises(ValueError, match="lr: expected a number > 0"):
            train.check_config(dict(cfg, lr=bad))
    need_dataset("ml-100k")
    out = tmp_path / "mf"
    assert train.main(BASE + ["--model", "mf", "--epochs", "1", "--out", str(out)]) == 0
    assert checkpoint.load(out / "last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["lr"] == pytest.approx(1e-3) and recorded["loss"] == "bpr"
