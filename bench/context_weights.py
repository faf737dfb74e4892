"""How much can a context-aware score mix gain over one weight? A per-context weight table chosen on validation.

    python bench/context_weights.py --dataset amazon-beauty --split random --seeds 0 1 2

The default hybrid's branches (GF-CF, its setting chosen on valid; TextKNN), both training-free, mixed at
score level as ``ScoreFusion`` does (per-user standardised scores), with the graph branch's weight
looked up per (user-degree bin, item-degree bin) instead of one scalar: items cold / warm split into
``--item_bins`` degree quantiles, users into ``--user_bins``. The table starts at the best single weight
on validation and is improved by coordinate ascent on validation ndcg@20 (each cell over 0..0.95 in
steps of 0.05, rounds until no cell changes); test is read once for each of the two. It is the most a
gate that reads only these contexts could get from the weight, chosen with validation's labels (an
optimistic bound for a learned gate), so a small gain here says the context gate has little to find.

Ranking uses each branch's top ``--candidates`` items per user (the union); the single weight's valid
ndcg@20 on the candidates is printed beside the exact one of ``tune_score_weight`` (they agree when an
item outside the union never reaches a top 20).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from glrec_fast import config, metrics, text
from glrec_fast.data import load_dataset
from glrec_fast.graph import BipartiteGraph
from glrec_fast.models import filters
from glrec_fast.models.hybrid import ScoreFusion, tune_score_weight
from glrec_fast.models.score_hybrid import HYBRID_GRID
from glrec_fast.models.text_knn import TextKNN


def degree_bins(deg: torch.Tensor, n: int, cold_bin: bool) -> torch.Tensor:
    """Bin ids: 0 = degree 0 when ``cold_bin``, then ``n`` quantile bins of the positive degrees."""
    out = torch.zeros(deg.numel(), dtype=torch.long)
    warm = deg > 0
    qs = torch.quantile(deg[warm].float(), torch.linspace(0, 1, n + 1)[1:-1]) if n > 1 else torch.zeros(0)
    out[warm] = torch.bucketize(deg[warm].float(), qs, right=True) + int(cold_bin)
    return out


class Candidates:
    """Both branches' z-scores on the union of their top ``c`` items, per user of a split."""

    def __init__(self, zg_fn, zt_fn, target, exclude, num_users, num_items, c):
        self.users = torch.unique(target[:, 0])
        keys = torch.sort(target[:, 0] * num_items + target[:, 1]).values
        excl = [metrics._exclusion_csr(j, p, num_users, num_items) for j, p in enumerate(exclude)]
        parts = []
        for s in range(0, self.users.numel(), 1024):
            ub = self.users[s:s + 1024]
            zg, zt = zg_fn(ub), zt_fn(ub)
            for rp, it in excl:
                r, col = metrics.csr_rows(rp, it, ub)
                zg[r, col] = -math.inf
                zt[r, col] = -math.inf
            vg, ig = torch.topk(zg, c, 1)
            vt, it_ = torch.topk(zt, c, 1)
            cand = torch.cat([ig, it_], 1)
            cg, ct = torch.cat([vg, zg.gather(1, it_)], 1), torch.cat([zt.gather(1, ig), vt], 1)
            dup = torch.zeros_like(zg, dtype=torch.bool).scatter_(1, ig, True).gather(1, it_)
            cg[:, c:].masked_fill_(dup, -math.inf)
            ct[:, c:].masked_fill_(dup, -math.inf)
            k = ub.unsqueeze(1) * num_items + cand
            rel = keys[torch.searchsorted(keys, k).clamp(max=keys.numel() - 1)] == k
            parts.append((cand, cg, ct, rel))
        self.cand, self.cg, self.ct, self.rel = (torch.cat(p) for p in zip(*parts))
        self.n_rel = torch.bincount(target[:, 0], minlength=num_users)[self.users]

    def ndcg(self, table, ubin, ibin, rows=None) -> torch.Tensor:
        """Per-user ndcg@20 with weight ``table[user bin, item bin]``."""
        sl = slice(None) if rows is None else rows
        users, cand, cg, ct, rel, n_rel = (t[sl] for t in (self.users, self.cand, self.cg, self.ct, self.rel, self.n_rel))
        a = table[ubin[users]].gather(1, ibin[cand])
        s = torch.nan_to_num(cg * a + ct * (1 - a), nan=-math.inf)
        hit = rel.gather(1, torch.topk(s, 20, 1).indices).float()
        disc = metrics.discounts(20)
        return (hit * disc).sum(1) / torch.cumsum(disc, 0)[n_rel.clamp(max=20) - 1]


def one_seed(a, seed, log):
    ds = load_dataset(a.dataset, split=a.split, seed=seed)
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    cfg = filters.tune(dict(config.resolve([]), model="gfcf", seed=seed), g, ds.valid, exclude=[ds.train])
    gf = filters.build(dict(cfg, tune_filter=False), g).fit()
    knn = TextKNN(g, text.encode_items(ds, text.get_encoder(a.encoder, device="cpu"))).fit()
    zg = lambda ub: ScoreFusion.branch_z(gf.scorer(), ub)   # noqa: E731
    zt = lambda ub: ScoreFusion.branch_z(knn.scorer(), ub)  # noqa: E731
    V = Candidates(zg, zt, ds.valid, [ds.train], ds.num_users, ds.num_items, a.candidates)
    T = Candidates(zg, zt, ds.test, [ds.train, ds.valid], ds.num_users, ds.num_items, a.candidates)
    ibin = degree_bins(g.item_degree, a.item_bins, True)
    ubin = degree_bins(g.user_degree, a.user_bins, False)
    shape = (a.user_bins, a.item_bins + 1)
    w0, exact = tune_score_weight(gf.scorer(), knn.scorer(), ds.valid, ds.num_users, ds.num_items, exclude=[ds.train],
                              grid=HYBRID_GRID)
    table = torch.full(shape, w0)
    res = {"seed": seed, "weight": w0, "static": {"valid": float(V.ndcg(table, ubin, ibin).mean()),
                                                  "test": float(T.ndcg(table, ubin, ibin).mean()),
                                                  "valid_exact": dict(exact)[w0]["ndcg@20"]}}
    vu, vi = ubin[V.users], ibin[V.cand]
    for rnd in range(a.rounds):
        changed = 0
        for u in range(shape[0]):
            rows = (vu == u).nonzero().squeeze(1)
            for i in range(shape[1]):
                if not bool((vi[rows] == i).any()):
                    continue
                cur, best = float(table[u, i]), (float(V.ndcg(table, ubin, ibin, rows).sum()), float(table[u, i]))
                for w in HYBRID_GRID:
                    table[u, i] = w
                    v = float(V.ndcg(table, ubin, ibin, rows).sum())
                    if v > best[0] + 1e-9:
                        best = (v, w)
                table[u, i] = best[1]
                changed += best[1] != cur
        if not changed:
            break
    res["context"] = {"valid": float(V.ndcg(table, ubin, ibin).mean()), "test": float(T.ndcg(table, ubin, ibin).mean()),
                      "table": table.tolist()}
    log(f"seed {seed}: one weight {w0} valid {res['static']['valid']:.4f} (exact {res['static']['valid_exact']:.4f}) test {res['static']['test']:.4f}; "
        f"per context valid {res['context']['valid']:.4f} test {res['context']['test']:.4f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-beauty")
    ap.add_argument("--split", default="random")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--item_bins", type=int, default=4, help="warm-item degree quantile bins (plus one for cold)")
    ap.add_argument("--user_bins", type=int, default=3, help="user degree quantile bins")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)   # noqa: E731
    runs = [one_seed(a, s, log) for s in a.seeds]
    rows = []
    for key in ("static", "context"):
        for split in ("valid", "test"):
            vals = [r[key][split] for r in runs]
            rows.append(f"| {key} | {split} | {statistics.mean(vals):.4f} ± "
                        f"{statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f} |")
    gain = [r["context"]["test"] / r["static"]["test"] - 1 for r in runs]
    table = "\n".join([f"{a.dataset} ({a.split}), seeds {a.seeds}, ndcg@20, {a.user_bins} user x "
                       f"{a.item_bins}+cold item bins", "", "| mix | split | ndcg@20 |", "|---|---|---|", *rows, "",
                       f"per-context vs one weight on test: {statistics.mean(gain) * 100:+.1f}% "
                       f"(per seed {', '.join(f'{x * 100:+.1f}%' for x in gain)})"])
    print(table)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "runs": runs, "table": table, "wall_s": time.time() - t0}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
