"""Does the hybrid earn its place? Every fusion against each branch alone, per context, over seeds.

    python bench/hybrid_evidence.py --dataset amazon-beauty --split random --seeds 0 1 2
    python bench/hybrid_evidence.py --dataset ml-100k --split cold --seeds 0 1 2
    python bench/hybrid_evidence.py --dataset synthetic --synthetic_interactions 1000000 --variants lightgcn content static gated
    python bench/hybrid_evidence.py --merge A.json B.json --json ALL.json   # disjoint seeds, or variants added to seeds

Per seed, on the same split, every choice made on validation (test is read once per variant):
  lightgcn        LightGCN alone (BPR, early stopping on valid ndcg@20)
  gfcf            the GF-CF/BSPM graph filter, its (K, w, sharpening) chosen by a grid on valid
  content         the language branch alone (FusedHybridRec fusion="text", item titles)
  textknn         the training-free text branch alone (TextKNN, the library's default neighbours and power)
  static          embedding-level static mix (FusedHybridRec fusion="static"): the weight chosen on
                  valid, coarse to fine: --static_coarse, then steps of 0.05 from the best until
                  both its neighbours are tried (an explicit --static_grid tries exactly that list)
  gated           the per-context gate (buckets); it starts at the static weight chosen for the
                  seed when `static` runs (so the gate learns the deviations), else at the defaults,
                  and the library's gate_reg pulls it back there (0.1; runs before that default were
                  unpulled, gate_reg 0)
  gated-cont      the same with the continuous-context gate (--gate_features continuous)
  gated-shared    ablation: one fused user vector for all item contexts (user_gate="shared")
  gated-learned-cold  ablation: cold items' gates learned per dimension (cold_gate="vector")
  lightgcn+text   score-level mix of lightgcn (cold items scored 0, as ScoreHybrid does) and
                  content, weight in {0, 0.05, ..., 0.95} chosen on valid (ScoreHybrid's grid)
  gfcf+text       score-level mix of gfcf and content, weight chosen the same way
  gfcf+textknn    score-level mix of gfcf and textknn, weight chosen the same way
  auto            the library's default hybrid (text_branch auto): gfcf, content and textknn mixed as
                  ScoreHybrid.tune chooses on every validation user (score_hybrid.choose_mix: the kNN
                  share of the text side, the graph weight, and cold items' own weight)
Per-context keys rank each context's items among themselves (cold: the split's test-cold items).
Prints a markdown table (mean ± std over seeds) with each fusion against the best single branch and
the gates against the static mixes, and writes everything to --json.
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
from glrec_fast.graph import ITEM_COLD, BipartiteGraph
from glrec_fast.models import filters, score_hybrid
from glrec_fast.models.hybrid import ScoreFusion, tune_score_weight
from glrec_fast.models.score_hybrid import HYBRID_GRID, cold_zero_scorer

KEYS = ["recall@20", "ndcg@20", "ndcg@20/cold", "ndcg@20/warm", "ndcg@20/head", "ndcg@20/tail"]
SINGLE = ["lightgcn", "gfcf", "content", "textknn"]
GATED = {"gated": {}, "gated-cont": {"gate_features": "continuous"}, "gated-shared": {"user_gate": "shared"},
         "gated-learned-cold": {"cold_gate": "vector"}}
MIXES = ["lightgcn+text", "gfcf+text", "gfcf+textknn"]
VARIANTS = SINGLE + ["static", *GATED, *MIXES, "auto"]
DEFAULT = [v for v in VARIANTS if v not in ("gated-shared", "gated-learned-cold")]


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


def tune_static(run, coarse, grid=None):
    """(weight, result, {weight: valid ndcg@20}) with the best valid ndcg@20: ``grid`` exactly when
    given, else ``coarse`` and then a climb in steps of 0.05 from the best weight until both of its
    neighbours (within [0, 1]) have been tried."""
    tried = {}
    for w in grid or coarse:
        tried[w] = run(w)
    while not grid:
        best = max(tried, key=lambda w: tried[w]["valid"]["ndcg@20"])
        todo = [w for w in (round(best - 0.05, 2), round(best + 0.05, 2)) if 0.0 <= w <= 1.0 and w not in tried]
        if not todo:
            break
        for w in todo:
            tried[w] = run(w)
    best = max(tried, key=lambda w: tried[w]["valid"]["ndcg@20"])
    return best, tried[best], {w: r["valid"]["ndcg@20"] for w, r in sorted(tried.items())}


def one_seed(a, base, seed, log):
    ds = load_dataset(a.dataset, split=a.split, seed=seed, **_synthetic(a))
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    o = {**base, "seed": seed}
    got, pick, scorers = {}, {"seed": seed}, {}

    def keep(name, res, scorer=None):
        got[name] = {"seed": seed, "valid": res["valid"], "test": res["test"], "best_epoch": res.get("best_epoch"),
                     "gates": res.get("gates", {})}
        scorers[name] = scorer
        log(f"seed {seed} {name:<18} test ndcg@20 {res['test']['ndcg@20']:.4f} "
            f"cold {res['test'].get('ndcg@20/cold', float('nan')):.4f}")

    need = set(a.variants)
    if need & {"lightgcn", "lightgcn+text"}:
        keep("lightgcn", *trained({**o, "model": "lightgcn"}))
    if need & {"content", "lightgcn+text", "gfcf+text", "auto"}:
        keep("content", *trained({**o, "model": "hybrid", "fusion": "text"}))
    if "static" in need:
        w, res, curve = tune_static(lambda w: trained({**o, "model": "hybrid", "fusion": "static",
                                                       "static_weight": w})[0], a.static_coarse, a.static_grid)
        keep("static", res)
        pick["static"], pick["static_valid_ndcg"] = w, curve
    for name, flags in GATED.items():
        if name in need:
            init = {"gate_init": pick["static"]} if "static" in pick else {}
            keep(name, trained({**o, "model": "hybrid", "fusion": "gated", **init, **flags})[0])
    if need & {"textknn", "gfcf+textknn", "auto"}:
        from glrec_fast import text
        from glrec_fast.models.text_knn import TextKNN
        knn = TextKNN(g, text.encode_items(ds, text.get_encoder(a.encoder, device="cpu"))).fit().scorer()
        keep("textknn", {"valid": evaluate(knn, ds, g, "valid"), "test": evaluate(knn, ds, g, "test")}, knn)
    if need & {"gfcf", "gfcf+text", "gfcf+textknn", "auto"}:
        ranks = tuple(sorted({min(r, g.num_items) for r in (128, 256, 512)}))   # a tiny graph has fewer
        grid = filters.grid_search(g, ds.valid, exclude=[ds.train], ranks=ranks,
                                   ideal_weights=(0.1, 0.3, 0.5), sharpen=(("euler", 1, 0.0), ("rk4", 1, 1.5)),
                                   num_users=None, seed=seed)
        best = grid[0]
        f = filters.GraphFilter(g, rank=best["rank"], ideal_weight=best["ideal_weight"],
                                sharpen_time=best["sharpen_time"], sharpen_steps=best["sharpen_steps"],
                                sharpen_solver=best["sharpen_solver"], seed=seed).fit()
        gf = f.scorer()
        keep("gfcf", {"valid": evaluate(gf, ds, g, "valid"), "test": evaluate(gf, ds, g, "test")}, gf)
        pick["gfcf"] = {k: best[k] for k in ("rank", "ideal_weight", "sharpen_time")}
    for name in MIXES:
        if name not in need:
            continue
        graph_scorer = scorers["gfcf"] if name.startswith("gfcf+") else cold_zero_scorer(
            scorers["lightgcn"].user_emb, scorers["lightgcn"].item_emb, g.item_context == ITEM_COLD)
        text_scorer = scorers["textknn" if name.endswith("textknn") else "content"]
        # The library's grid (ScoreHybrid.tune): a weight of 1.0 would tie every cold item.
        w, _ = tune_score_weight(graph_scorer, text_scorer, ds.valid, ds.num_users, ds.num_items,
                                 exclude=[ds.train], grid=HYBRID_GRID)
        mix = ScoreFusion(graph_scorer, text_scorer, w)
        keep(name, {"valid": evaluate(mix, ds, g, "valid"), "test": evaluate(mix, ds, g, "test")})
        pick[name] = w
    if "auto" in need:   # ScoreHybrid.tune's choice (score_hybrid.choose_mix) on every validation user
        cold = g.item_context == ITEM_COLD
        share, w, w_cold, _ = score_hybrid.choose_mix(scorers["gfcf"], scorers["content"], scorers["textknn"], cold,
                                                      ds.valid, ds.num_users, ds.num_items, exclude=[ds.train])
        mix = ScoreFusion(scorers["gfcf"], score_hybrid.text_side(scorers["content"], scorers["textknn"], share),
                          w, w_cold, cold)
        keep("auto", {"valid": evaluate(mix, ds, g, "valid"), "test": evaluate(mix, ds, g, "test")})
        pick["auto"] = {"knn_share": share, "weight": w, "cold_weight": w_cold}
    log(f"chosen on valid: {pick}")
    return {v: r for v, r in got.items() if v in need}, pick


def _synthetic(a) -> dict:
    keys = {"synthetic_users": "num_users", "synthetic_items": "num_items", "synthetic_interactions": "num_interactions"}
    return {kw: getattr(a, k) for k, kw in keys.items() if a.dataset == "synthetic" and getattr(a, k) is not None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-beauty")
    ap.add_argument("--split", default="random")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--batch_size", type=int, default=2048)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=VARIANTS)
    ap.add_argument("--static_coarse", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--static_grid", type=float, nargs="+", default=None,
                    help="try exactly these static weights (no refinement around the best)")
    ap.add_argument("--synthetic_interactions", type=int, default=None)
    ap.add_argument("--synthetic_users", type=int, default=None)
    ap.add_argument("--synthetic_items", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 beside another job)")
    ap.add_argument("--json", default=None, help="default: bench/results/hybrid_evidence_DATASET_SPLIT.json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no training: one table from the --json files of runs over disjoint seeds")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a)
    torch.set_num_threads(a.threads)
    base = dict(dataset=a.dataset, split=a.split, encoder=a.encoder, epochs=a.epochs, lr=a.lr,
                batch_size=a.batch_size, patience=a.patience, grokking=False)
    base.update({k: getattr(a, k) for k in ("synthetic_interactions", "synthetic_users", "synthetic_items")
                 if getattr(a, k) is not None})
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)   # noqa: E731
    results = {v: [] for v in a.variants}
    chosen = []
    for seed in a.seeds:
        got, pick = one_seed(a, base, seed, log)
        for v, r in got.items():
            results[v].append(r)
        chosen.append(pick)
    return report(a, results, chosen, time.time() - t0)


def merge(a) -> int:
    """One table from several runs on the same dataset and split: over disjoint seeds, or adding
    variants to seeds run before (each (variant, seed) once). Settings a file does not record (the
    older hybrid_score_mix.py wrote fewer) are taken to be the defaults it shared."""
    parts = []
    for p in a.merge:
        with open(p) as f:
            parts.append(json.load(f))
    first = parts[0]["args"]
    for p, part in zip(a.merge, parts):
        for k in ("dataset", "split", "encoder", "epochs", "lr", "batch_size", "patience"):
            if k in part["args"] and k in first and part["args"][k] != first[k]:
                raise SystemExit(f"--merge: {p} was run with {k}={part['args'][k]!r}, {a.merge[0]} with {first[k]!r}")
    results, chosen = {}, {}
    for p, part in zip(a.merge, parts):
        for v, runs in part["results"].items():
            for r in runs:
                if any(q["seed"] == r["seed"] for q in results.get(v, [])):
                    raise SystemExit(f"--merge: {p} repeats variant {v!r} for seed {r['seed']}")
                results.setdefault(v, []).append(r)
        for c in part["chosen"]:
            chosen.setdefault(c["seed"], {}).update(c)
    for v in results:
        results[v].sort(key=lambda r: r["seed"])
    seeds = sorted(chosen)
    variants = [v for v in VARIANTS if results.get(v)]
    known = {}
    for part in parts:   # what any file recorded (they agree where two recorded the same key)
        for k, v in part["args"].items():
            known.setdefault(k, v)
    known.setdefault("encoder", "minilm")   # hybrid_score_mix.py did not record it; it ran MiniLM
    merged = argparse.Namespace(**{**known, "seeds": seeds, "variants": variants, "json": a.json, "merge": a.merge})
    return report(merged, results, [chosen[s] for s in seeds], sum(part["wall_s"] for part in parts))


def report(a, results, chosen, wall_s) -> int:
    # A random split holds a handful of cold items: too few to mean anything (DESIGN.md), not shown.
    keys = KEYS if a.split == "cold" else [k for k in KEYS if not k.endswith("/cold")]

    def agg(v, k, seeds=None):
        vals = [r["test"].get(k, float("nan")) for r in results[v] if seeds is None or r["seed"] in seeds]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    def seeds_of(v):
        return {r["seed"] for r in results[v]}

    def versus(v, ref):
        # Over the seeds both ran (a merged table may hold variants run on different seeds).
        both = seeds_of(v) & seeds_of(ref)
        if not both:
            return f"| {v} vs {ref} | " + " | ".join("no common seed" for _ in keys) + " |"
        note = "" if both == seeds_of(v) == seeds_of(ref) else f" (seeds {sorted(both)})"
        return f"| {v} vs {ref}{note} | " + " | ".join(
            f"{(agg(v, k, both)[0] / agg(ref, k, both)[0] - 1) * 100:+.1f}%" if agg(ref, k, both)[0] else "n/a"
            for k in keys) + " | |"

    lines = [f"Test metrics, {a.dataset} ({a.split} split), encoder {a.encoder}, seeds {a.seeds}, mean ± std", "",
             "| variant | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for v in VARIANTS:
        if results.get(v):
            lines.append(f"| {v} | " + " | ".join("%.4f ± %.4f" % agg(v, k) for k in keys)
                         + f" | {len(results[v])} |")
    singles = [v for v in SINGLE if results.get(v)]
    if singles:
        best_single = max(singles, key=lambda v: agg(v, "ndcg@20")[0])
        lines += [versus(v, best_single) for v in ("static", *GATED, *MIXES, "auto") if results.get(v)]
    statics = [v for v in ("static", *MIXES) if results.get(v)]
    if statics:   # the gates against the best tuned static mix (embedding or score level)
        best_static = max(statics, key=lambda v: agg(v, "ndcg@20")[0])
        lines += [versus(v, best_static) for v in GATED if results.get(v)]
        if best_static != "static" and results.get("static"):   # the seed's claim: the gate vs its own level's mix
            lines += [versus(v, "static") for v in GATED if results.get(v)]
    lines += ["", f"chosen on valid: {chosen}", f"wall time {wall_s:.0f} s"]
    table = "\n".join(lines)
    print(table)
    path = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"hybrid_evidence_{a.dataset}_{a.split}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"args": vars(a), "results": results, "chosen": chosen, "table": table, "wall_s": wall_s},
                  fh, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
