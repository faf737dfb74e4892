"""Mini-batch (neighbour-sampled) training at scale: epoch time, test metrics and peak memory.

    python bench/sampled_scale.py --dataset gowalla --model graphsage --epochs 3
    python bench/sampled_scale.py --dataset synthetic --synthetic_interactions 20000000 --epochs 1 --batch_size 8192

Trains through ``glrec_fast.train.train`` (the CLI's code path) with ``--fanouts [10, 10]`` and
reports the process's peak resident memory (``ru_maxrss``), which includes data loading, the graph,
the model, sampling and the full-ranking evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from glrec_fast import config, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gowalla")
    ap.add_argument("--model", default="graphsage", choices=["graphsage", "lightgcn"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--synthetic_interactions", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    over = dict(dataset=args.dataset, model=args.model, sampled=True, fanouts=[10, 10], epochs=args.epochs,
                eval_every=args.epochs, batch_size=args.batch_size, lr=args.lr, grokking=False, patience=0)
    if args.synthetic_interactions:
        n = args.synthetic_interactions
        over.update(synthetic_interactions=n, synthetic_users=max(2000, n // 100), synthetic_items=max(1000, n // 200))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = train.train(config.resolve([], overrides={**over, "out": out}))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    res = {"args": vars(args), "dataset": r["dataset"], "epoch_times_s": [h["epoch_time_s"] for h in r["history"]],
           "test": {k: r["test"][k] for k in ("recall@20", "ndcg@20")}, "peak_rss_gib": peak_gib,
           "wall_s": time.time() - t0}
    print(json.dumps(res, indent=1))
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     f"sampled_{args.model}_{args.dataset}{'_' + str(args.synthetic_interactions) if args.synthetic_interactions else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
