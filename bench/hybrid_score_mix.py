"""Score-level hybrids against each branch alone, every choice made on validation.

    python bench/hybrid_score_mix.py --dataset amazon-beauty --split random --seeds 0 1 2
    python bench/hybrid_score_mix.py --dataset amazon-beauty --split cold --seeds 0 1 2
    python bench/hybrid_score_mix.py --merge A.json B.json --json ALL.json   # runs over disjoint seeds

Per seed, on the same split:
  lightgcn       LightGCN (BPR, early stopping on valid ndcg@20)
  gfcf           the GF-CF/BSPM graph filter, its (K, w, sharpening) chosen by a grid on valid
  content        the language branch alone (FusedHybridRec fusion="text", MiniLM item titles)
  gated          the embedding-level gated hybrid (FusedHybridRec, the library's defaults)
  gated-cont     the same with the continuous-context gate (--gate_features continuous)
  lightgcn+text  ScoreFusion of lightgcn (cold items scored 0, as ScoreHybrid does) and content,
                 weight a in {0, 0.05, ..., 0.95} chosen on valid (ScoreHybrid's grid)
  gfcf+text      ScoreFusion of gfcf and content, weight chosen on valid
Test is read once per variant with training and validation pairs masked; per-context keys rank each
context's items among themselves (cold items: the split's test-cold items among all cold items).
Prints a markdown table (mean ± std over seeds), writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from glrec_fast import config, metrics, train
from glrec_fast.data import load_dataset
from glrec_fast.graph import BipartiteGraph
from glrec_fast.models import filters
from glrec_fast.graph import ITEM_COLD
from glrec_fast.models.hybrid import ScoreFusion, tune_score_weight
from glrec_fast.models.score_hybrid import HYBRID_GRID, cold_zero_scorer

KEYS = ["recall@20", "ndcg@20", "ndcg@20/cold", "ndcg@20/warm", "ndcg@20/head", "ndcg@20/tail"]
VARIANTS = ["lightgcn", "gfcf", "content", "gated", "gated-cont", "lightgcn+text", "gfcf+text"]


def trained(overrides: dict):
    """Train through the CLI's train(); return (metrics, scorer of the best checkpoint)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = config.resolve([], overrides={**overrides, "out": out})
        res = train.train(cfg)
        scorer = train.scorer_from_export(train.load_export(os.path.join(out, "best.pt")))
    return res, scorer


def evaluate(scorer, ds, graph, split):
    exclude = [ds.train] + ([ds.valid] if split == "test" else [])
    return metrics.evaluate(scorer, getattr(ds, split), ds.num_users, ds.num_items, exclude=exclude, ks=(20,),
                            item_context=graph.item_context)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-beauty")
    ap.add_argument("--split", default="random")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                    help="gated-cont is optional (runs only when named here or by default)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no training: one table from the --json files of runs over disjoint seeds")
    a = ap.parse_args(argv)
    if a.merge:
        parts = [json.load(open(p)) for p in a.merge]
        results = {v: [r for part in parts for r in part["results"].get(v, [])] for v in VARIANTS}
        chosen = [c for part in parts for c in part["chosen"]]
        a.seeds = [c["seed"] for c in chosen]
        a.dataset, a.split = parts[0]["args"]["dataset"], parts[0]["args"]["split"]
        return report(a, results, chosen, sum(p.get("wall_s", 0.0) for p in parts))
    torch.set_num_threads(2)
    base = dict(dataset=a.dataset, split=a.split, epochs=a.epochs, lr=0.005, batch_size=2048, patience=5,
                grokking=False, encoder="minilm")
    results = {v: [] for v in VARIANTS}
    chosen = []
    t0 = time.time()
    for seed in a.seeds:
        ds = load_dataset(a.dataset, split=a.split, seed=seed)
        g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
        got = {}
        res, lgcn = trained({**base, "seed": seed, "model": "lightgcn"})
        got["lightgcn"] = (res["valid"], res["test"], lgcn)
        res, content = trained({**base, "seed": seed, "model": "hybrid", "fusion": "text"})
        got["content"] = (res["valid"], res["test"], content)
        res, gated = trained({**base, "seed": seed, "model": "hybrid", "fusion": "gated"})
        got["gated"] = (res["valid"], res["test"], gated)
        if "gated-cont" in a.variants:
            res, cont = trained({**base, "seed": seed, "model": "hybrid", "fusion": "gated",
                                 "gate_features": "continuous"})
            got["gated-cont"] = (res["valid"], res["test"], cont)
        grid = filters.grid_search(g, ds.valid, exclude=[ds.train], ranks=(128, 256, 512),
                                   ideal_weights=(0.1, 0.3, 0.5), sharpen=(("euler", 1, 0.0), ("rk4", 1, 1.5)),
                                   num_users=None, seed=seed)
        best = grid[0]
        f = filters.GraphFilter(g, rank=best["rank"], ideal_weight=best["ideal_weight"],
                                sharpen_time=best["sharpen_time"], sharpen_steps=best["sharpen_steps"],
                                sharpen_solver=best["sharpen_solver"], seed=seed).fit()
        gf = f.scorer()
        got["gfcf"] = (evaluate(gf, ds, g, "valid"), evaluate(gf, ds, g, "test"), gf)
        pick = {"gfcf": {k: best[k] for k in ("rank", "ideal_weight", "sharpen_time")}}
        lgcn_cold0 = cold_zero_scorer(lgcn.user_emb, lgcn.item_emb, g.item_context == ITEM_COLD)
        for name, graph_scorer in (("lightgcn+text", lgcn_cold0), ("gfcf+text", gf)):
            w, _ = tune_score_weight(graph_scorer, content, ds.valid, ds.num_users, ds.num_items, exclude=[ds.train],
                                     grid=HYBRID_GRID)   # the library's grid (ScoreHybrid.tune): 1.0 would tie every cold item
            mix = ScoreFusion(graph_scorer, content, w)
            got[name] = (evaluate(mix, ds, g, "valid"), evaluate(mix, ds, g, "test"), mix)
            pick[name] = w
        chosen.append({"seed": seed, **pick})
        for v in VARIANTS:
            if v not in got:
                continue
            results[v].append({"seed": seed, "valid": got[v][0], "test": got[v][1]})
            print(f"[{time.time() - t0:6.0f}s] seed {seed} {v:<14} test ndcg@20 {got[v][1]['ndcg@20']:.4f} "
                  f"cold {got[v][1].get('ndcg@20/cold', float('nan')):.4f}", flush=True)
        print("chosen on valid:", chosen[-1], flush=True)
    return report(a, results, chosen, time.time() - t0)


def report(a, results, chosen, wall_s):
    # A random split holds a handful of cold items: too few to mean anything (DESIGN.md), not shown.
    keys = KEYS if a.split == "cold" else [k for k in KEYS if not k.endswith("/cold")]

    def agg(v, k):
        vals = [r["test"].get(k, float("nan")) for r in results[v]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = [f"Test metrics, {a.dataset} ({a.split} split), seeds {a.seeds}, mean ± std", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for v in VARIANTS:
        if results[v]:
            lines.append(f"| {v} | " + " | ".join("%.4f ± %.4f" % agg(v, k) for k in keys) + " |")
    best_single = max(("lightgcn", "gfcf", "content"), key=lambda v: agg(v, "ndcg@20")[0])
    for v in ("gated", "gated-cont", "lightgcn+text", "gfcf+text"):
        if not results[v]:
            continue
        lines.append(f"| {v} vs {best_single} | " + " | ".join(
            f"{(agg(v, k)[0] / agg(best_single, k)[0] - 1) * 100:+.1f}%" if agg(best_single, k)[0] else "n/a"
            for k in keys) + " |")
    lines += ["", f"chosen on valid: {chosen}", f"wall time {wall_s:.0f} s"]
    table = "\n".join(lines)
    print(table)
    path = a.json or os.path.join(os.path.dirname(__file__), "results", f"score_mix_{a.dataset}_{a.split}.json")
    with open(path, "w") as fh:
        json.dump({"args": vars(a), "results": results, "chosen": chosen, "table": table, "wall_s": wall_s},
                  fh, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
