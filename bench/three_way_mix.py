"""Probe: the score mix of all three branches (graph filter, TextKNN, trained text) against the two-way mixes.

    python bench/three_way_mix.py --dataset amazon-beauty --split random --seeds 0 1 2

Per seed: GF-CF with its setting chosen on valid (the default hybrid's graph branch), TextKNN (the
library's defaults), the content-only model trained as bench/hybrid_evidence.py trains it. Each
branch's scores are standardised per user (``ScoreFusion.standardise``) and mixed as
``a * graph + b * knn + (1 - a - b) * trained``, (a, b) on the 0.05 grid of the simplex chosen on
valid ndcg@20; the two-way mixes are the grid's edges (b = 0, a + b = 1), so the library's
``text_branch auto`` is the better of those two on valid. Test is read once per mix. Ranking uses
the union of each branch's top ``--candidates`` items per user.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hybrid_evidence import trained  # noqa: E402

from glrec_fast import config, metrics, text  # noqa: E402
from glrec_fast.data import load_dataset  # noqa: E402
from glrec_fast.graph import BipartiteGraph  # noqa: E402
from glrec_fast.models import filters  # noqa: E402
from glrec_fast.models.hybrid import ScoreFusion  # noqa: E402
from glrec_fast.models.text_knn import TextKNN  # noqa: E402


def candidates(scorers, target, exclude, num_users, num_items, c):
    """Per user of ``target``: each branch's z-scores on the union of the branches' top ``c`` items
    (repeats masked), and whether each candidate is a target item."""
    users = torch.unique(target[:, 0])
    keys = torch.sort(target[:, 0] * num_items + target[:, 1]).values
    excl = [metrics._exclusion_csr(j, p, num_users, num_items) for j, p in enumerate(exclude)]
    vals, rels = [[] for _ in scorers], []
    for s in range(0, users.numel(), 1024):
        ub = users[s:s + 1024]
        tiles = [ScoreFusion.branch_z(f, ub) for f in scorers]
        for rp, it in excl:
            r, col = metrics.csr_rows(rp, it, ub)
            for t in tiles:
                t[r, col] = -math.inf
        cand = torch.cat([torch.topk(t, c, 1).indices for t in tiles], 1).sort(1).values
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        for j, t in enumerate(tiles):
            vals[j].append(t.gather(1, cand).masked_fill_(dup, -math.inf))
        k = ub.unsqueeze(1) * num_items + cand
        rels.append(keys[torch.searchsorted(keys, k).clamp(max=keys.numel() - 1)] == k)
    return [torch.cat(v) for v in vals], torch.cat(rels), torch.bincount(target[:, 0], minlength=num_users)[users]


def ndcg(part, a, b) -> float:
    (vg, vk, vt), rel, n_rel = part
    s = torch.nan_to_num(a * vg + b * vk + (1 - a - b) * vt, nan=-math.inf)
    hit = rel.gather(1, torch.topk(s, 20, 1).indices).float()
    disc = metrics.discounts(20)
    return float(((hit * disc).sum(1) / torch.cumsum(disc, 0)[n_rel.clamp(max=20) - 1]).mean())


def one_seed(a, seed, log):
    ds = load_dataset(a.dataset, split=a.split, seed=seed)
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    _, content = trained(dict(dataset=a.dataset, split=a.split, encoder=a.encoder, epochs=60, lr=0.005,
                              batch_size=2048, patience=5, grokking=False, seed=seed, model="hybrid", fusion="text"))
    cfg = filters.tune(dict(config.resolve([]), model="gfcf", seed=seed), g, ds.valid, exclude=[ds.train])
    gf = filters.build(dict(cfg, tune_filter=False), g).fit().scorer()
    knn = TextKNN(g, text.encode_items(ds, text.get_encoder(a.encoder, device="cpu"))).fit().scorer()
    V = candidates([gf, knn, content], ds.valid, [ds.train], ds.num_users, ds.num_items, a.candidates)
    T = candidates([gf, knn, content], ds.test, [ds.train, ds.valid], ds.num_users, ds.num_items, a.candidates)
    grid = [(i / 20, j / 20) for i in range(21) for j in range(21 - i)]
    valid = {w: ndcg(V, *w) for w in grid}
    picks = {"graph+trained": max((w for w in grid if w[1] == 0), key=valid.get),
             "graph+knn": max((w for w in grid if abs(sum(w) - 1) < 1e-9), key=valid.get),
             "three-way": max(grid, key=valid.get)}
    picks["auto (two-way)"] = max((picks["graph+trained"], picks["graph+knn"]), key=valid.get)
    out = {"seed": seed}
    for name, w in picks.items():
        out[name] = {"weights": w, "valid": valid[w], "test": ndcg(T, *w)}
        log(f"seed {seed} {name:<15} a={w[0]:.2f} b={w[1]:.2f} valid {valid[w]:.4f} test {out[name]['test']:.4f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-beauty")
    ap.add_argument("--split", default="random")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)   # noqa: E731
    runs = [one_seed(a, s, log) for s in a.seeds]
    lines = [f"{a.dataset} ({a.split}), seeds {a.seeds}, test ndcg@20 (valid), mean ± std", "",
             "| mix | test | valid |", "|---|---|---|"]
    for name in ("graph+trained", "graph+knn", "auto (two-way)", "three-way"):
        t = [r[name]["test"] for r in runs]
        v = [r[name]["valid"] for r in runs]
        sd = statistics.stdev(t) if len(t) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(t):.4f} ± {sd:.4f} | {statistics.mean(v):.4f} |")
    table = "\n".join(lines)
    print(table)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "runs": runs, "table": table, "wall_s": time.time() - t0}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
