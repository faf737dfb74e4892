"""MF-BPR vs LightGCN on ml-100k (random 80/10/10 split): test metrics, same budget and tuning.

    python bench/ml100k_baselines.py --seeds 0 1 2

Both: d=64, Adam lr 0.005, L2 1e-4 on the batch's embeddings, batch 2048, up to 100 epochs with
early stopping on valid ndcg@20 (patience 5); LightGCN with 3 layers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from glrec_fast import config, train

KEYS = ["recall@20", "ndcg@20", "ndcg@20/head", "ndcg@20/tail"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args(argv)
    rows = {"mf": [], "lightgcn": []}
    for seed in args.seeds:
        for model in rows:
            with tempfile.TemporaryDirectory() as out:
                cfg = config.resolve([], overrides=dict(dataset="ml-100k", split="random", model=model, seed=seed,
                                                        epochs=args.epochs, lr=0.005, patience=5, grokking=False,
                                                        out=out))
                r = train.train(cfg)
            rows[model].append({"seed": seed, "test": r["test"], "best_epoch": r["best_epoch"],
                                "train_time_s": r["train_time_s"]})
            print(f"seed {seed} {model}: test ndcg@20 {r['test']['ndcg@20']:.4f} (best epoch {r['best_epoch']}, "
                  f"{r['train_time_s']:.0f} s)", flush=True)
    lines = ["| model | " + " | ".join(KEYS) + " | best epoch | train time (s) |", "|---" * (len(KEYS) + 3) + "|"]
    for model, rs in rows.items():
        cell = []
        for k in KEYS:
            v = [r["test"][k] for r in rs]
            cell.append(f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}")
        lines.append(f"| {model} | " + " | ".join(cell) + f" | {[r['best_epoch'] for r in rs]} | "
                     f"{statistics.mean(r['train_time_s'] for r in rs):.0f} |")
    print("\n".join(lines))
    path = os.path.join(os.path.dirname(__file__), "results", "ml100k_baselines.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "table": "\n".join(lines)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
