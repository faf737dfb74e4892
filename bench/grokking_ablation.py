"""Grokking monitor on vs off on the ml-100k hybrid: test metrics, training time, events.

    python bench/grokking_ablation.py --epochs 20

Same seed, data, model (FusedHybridRec, MiniLM, gated fusion) and budget; the only difference is
``--grokking true|false``. With the monitor on, every ``grok_every`` steps the callback scores a
fixed sample of 256 validation users with each branch (graph, text, fused) and calls
``GrokkingMonitor.observe``; any event moves the fusion prior. The time difference is the whole
cost of monitoring (the per-branch validation sample included), not only ``observe``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from glrec_fast import config, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="random")
    args = ap.parse_args(argv)
    res = {}
    for on in (False, True):
        with tempfile.TemporaryDirectory() as out:
            cfg = config.resolve([], overrides=dict(dataset="ml-100k", split=args.split, model="hybrid",
                                                    encoder="minilm", epochs=args.epochs, lr=0.005, patience=0,
                                                    seed=args.seed, grokking=on, out=out))
            cbs = train.default_callbacks(cfg)
            r = train.train(cfg, callbacks=cbs)
        g = r.get("grokking", {})
        res["on" if on else "off"] = {"test": {k: r["test"][k] for k in ("recall@20", "ndcg@20", "ndcg@20/cold",
                                                                          "ndcg@20/head", "ndcg@20/tail")},
                                      "train_time_s": r["train_time_s"],
                                      "epoch_time_s": sum(h["epoch_time_s"] for h in r["history"]),
                                      "events": g.get("events", []), "observations": g.get("observations", 0)}
    on, off = res["on"], res["off"]
    print("| monitor | test recall@20 | test ndcg@20 | ndcg@20/cold | summed epoch time (s) | observations | events |")
    print("|---|---|---|---|---|---|---|")
    for name in ("off", "on"):
        r = res[name]
        print(f"| {name} | {r['test']['recall@20']:.4f} | {r['test']['ndcg@20']:.4f} | {r['test']['ndcg@20/cold']:.4f} | "
              f"{r['epoch_time_s']:.1f} | {r['observations']} | {len(r['events'])} |")
    print(f"monitoring overhead: {(on['epoch_time_s'] / off['epoch_time_s'] - 1) * 100:+.1f}% of training time")
    path = os.path.join(os.path.dirname(__file__), "results", "grokking_ablation.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": res}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
