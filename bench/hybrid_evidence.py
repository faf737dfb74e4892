"""Does context-aware gated fusion beat a static mix? Measured per context, over several seeds.

    python bench/hybrid_evidence.py --dataset ml-100k --split cold --encoder minilm --seeds 0 1 2
    python bench/hybrid_evidence.py --dataset synthetic --synthetic_interactions 1000000 --seeds 0 1 2

Variants (all trained by ``glrec_fast.train.train`` with the same budget and early stopping on
valid ndcg@20):
  lightgcn   LightGCN alone (graph branch only)
  content    FusedHybridRec(fusion="text"): the language branch alone
  static     FusedHybridRec(fusion="static"): one fixed mixing weight, chosen per seed among
             --static_grid by validation ndcg@20 (the tuned static baseline)
  gated      FusedHybridRec(fusion="gated"): the per-context learned gate, users mixed per item
             context; every gate starts at the static weight chosen on valid for the same seed
             (gate_init), so the tuning budget is shared and the gate learns the deviations
  gated_shared  ablation: one fused vector per user for all items (user_gate="shared")
  gated_learned_cold  ablation: the gates that score cold items learned per dimension like the
             warm ones (cold_gate="vector") instead of kept at the tuned static weight
Prints a markdown table of test metrics (mean ± std over seeds) and the gated-vs-static change
per context, and writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from glrec_fast import config, train

KEYS = ["recall@20", "ndcg@20", "ndcg@20/cold", "ndcg@20/warm", "ndcg@20/head", "ndcg@20/tail"]


def run(overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = config.resolve([], overrides={**overrides, "out": out})
        res = train.train(cfg)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="cold")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--batch_size", type=int, default=2048)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--static_grid", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--synthetic_interactions", type=int, default=None)
    ap.add_argument("--synthetic_users", type=int, default=None)
    ap.add_argument("--synthetic_items", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=["lightgcn", "content", "static", "gated", "gated_shared",
                                                    "gated_learned_cold"])
    ap.add_argument("--json", default=None, help="where to write all numbers (default: bench/results/)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no training: build one table from the --json files of runs over disjoint seeds "
                         "(e.g. one process per seed on a multi-core box) and write it to --json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args)

    base = dict(dataset=args.dataset, split=args.split, encoder=args.encoder, epochs=args.epochs, lr=args.lr,
                batch_size=args.batch_size, patience=args.patience, grokking=False)
    for k in ("synthetic_interactions", "synthetic_users", "synthetic_items"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    chosen_static = []
    if any(v.startswith("gated") for v in args.variants) and "static" not in args.variants:
        raise SystemExit("--variants: the gated variants start from the tuned static weight; include 'static'")
    t0 = time.time()
    for seed in args.seeds:
        # static first: the gated variants start from the weight it chooses for this seed.
        for variant in sorted(args.variants, key=lambda v: v != "static"):
            o = {**base, "seed": seed}
            if variant == "lightgcn":
                res = run({**o, "model": "lightgcn"})
            elif variant == "content":
                res = run({**o, "model": "hybrid", "fusion": "text"})
            elif variant in ("gated", "gated_shared", "gated_learned_cold"):
                res = run({**o, "model": "hybrid", "fusion": "gated", "gate_init": chosen_static[-1],
                           "user_gate": "shared" if variant == "gated_shared" else "item_context",
                           "cold_gate": "vector" if variant == "gated_learned_cold" else "fixed"})
            elif variant == "static":
                best = None
                for w in args.static_grid:
                    r = run({**o, "model": "hybrid", "fusion": "static", "static_weight": w})
                    if best is None or r["valid"]["ndcg@20"] > best[1]["valid"]["ndcg@20"]:
                        best = (w, r)
                chosen_static.append(best[0])
                res = best[1]
            else:
                raise SystemExit(f"--variants: unknown {variant!r}")
            results[variant].append({"seed": seed, "valid": res["valid"], "test": res["test"],
                                     "best_epoch": res["best_epoch"], "gates": res.get("gates", {})})
            print(f"[{time.time() - t0:7.0f}s] seed {seed} {variant:<9} test ndcg@20 {res['test']['ndcg@20']:.4f} "
                  f"cold {res['test'].get('ndcg@20/cold', float('nan')):.4f}", flush=True)

    write(args, results, chosen_static, time.time() - t0)
    return 0


def merge(args) -> int:
    parts = []
    for p in args.merge:
        with open(p) as f:
            parts.append(json.load(f))
    first = parts[0]["args"]
    for p, part in zip(args.merge, parts):
        for k in ("dataset", "split", "encoder", "epochs", "lr", "batch_size", "patience", "static_grid",
                  "synthetic_interactions", "synthetic_users", "synthetic_items", "variants"):
            if part["args"].get(k) != first.get(k):
                raise SystemExit(f"--merge: {p} was run with {k}={part['args'].get(k)!r}, "
                                 f"{args.merge[0]} with {first.get(k)!r}")
    seeds = [s for part in parts for s in part["args"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: seeds overlap across files: {seeds}")
    merged = argparse.Namespace(**{**first, "seeds": seeds, "json": args.json, "merge": args.merge})
    results = {v: [r for part in parts for r in part["results"][v]] for v in first["variants"]}
    chosen = [w for part in parts for w in part["static_weights"]]
    write(merged, results, chosen, sum(part["wall_s"] for part in parts))
    return 0


def write(args, results, chosen_static, wall_s):
    def agg(variant, key):
        vals = [r["test"][key] for r in results[variant]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = [f"Test metrics, {args.dataset} ({args.split} split), encoder {args.encoder}, seeds {args.seeds} "
             f"(mean ± std)", "", "| variant | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for v in args.variants:
        lines.append(f"| {v} | " + " | ".join("%.4f ± %.4f" % agg(v, k) for k in KEYS) + " |")
    for g in ("gated", "gated_shared", "gated_learned_cold"):
        if "static" in results and g in results:
            lines.append(f"| {g} vs static | " + " | ".join(
                f"{(agg(g, k)[0] / agg('static', k)[0] - 1) * 100:+.1f}%" if agg('static', k)[0] else "n/a"
                for k in KEYS) + " |")
    if "static" in results:
        lines.append("")
        lines.append(f"static weight chosen on valid per seed: {chosen_static}")
    table = "\n".join(lines)
    print(table)
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     f"hybrid_{args.dataset}_{args.split}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results, "static_weights": chosen_static, "table": table,
                   "wall_s": wall_s}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
