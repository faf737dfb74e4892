"""Ranking's top-k: ``ops.topk_rows`` (the compiled row top-k) beside ``torch.topk``, side by side.

    python bench/ranking_topk.py --json bench/results/ranking_topk.json

Three levels, each provider interleaved round by round in one process (medians of ``--rounds``):

* the op on the tiles ranking makes: 20 of 768 candidates (the score hybrid's weight search), 20 of
  12,101 and of 40,981 items (a full-ranking batch on amazon-beauty and Gowalla), 256 of 12,101 (the
  search's candidate lists); normal scores, 1,024 rows;
* ``metrics.evaluate`` of a random d=64 embedding model over 22,363 users x 12,101 items with 8 training
  items excluded per user (amazon-beauty's shape), where the only top-k is the swapped one;
* with ``--gowalla``, ``bench/time_to_quality.py --stage eval_speed``'s case: every Gowalla test user
  ranked against every item, cut-offs 10/20/50 and the per-context breakdown;
* ``hybrid.tune_score_shares`` over 5,000 users and three branch tiles of that shape (the score
  hybrid's per-evaluation search of 11 kNN shares x 20 weights).

The op's values are checked equal to torch.topk's and its ids to ``reference.topk_rows`` (torch.topk
orders ties its own way), and each measured call's answers equal across providers (the tuner's within
1e-3: its mixed scores can tie at float rounding), before timing. Both providers
use the same thread count (``--threads``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from glrec_fast import metrics, ops, reference
from glrec_fast.models import hybrid
from glrec_fast.models.score_hybrid import HYBRID_GRID, KNN_SHARES

PROVIDERS = {"ops.topk_rows": ops.topk_rows, "torch.topk": lambda x, k: torch.topk(x, k, dim=1)}


def same(a, b, tol: float = 0.0) -> bool:
    """Equal results within ``tol``, nan (a context with no test item) equal to nan."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b))
    return a == b or (a != a and b != b) or abs(a - b) <= tol


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(cases: dict, rounds: int) -> dict:
    """{case: {provider: median seconds}}: every round runs every (case, provider) once."""
    times = {c: {p: [] for p in PROVIDERS} for c in cases}
    for _ in range(rounds):
        for c, run in cases.items():
            for p in PROVIDERS:
                times[c][p].append(run(p))
    return {c: {p: statistics.median(v) for p, v in ps.items()} for c, ps in times.items()}


def with_provider(p, fn):
    """Run ``fn`` with ``ops.topk_rows`` bound to provider ``p`` (metrics and hybrid call it through ops)."""
    saved = ops.topk_rows
    ops.topk_rows = PROVIDERS[p]
    try:
        return timed(fn)
    finally:
        ops.topk_rows = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--gowalla", action="store_true",
                    help="add time_to_quality's eval_speed case: every Gowalla test user, cut-offs 10/20/50, per context")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)

    tiles = {f"{k} of {n}": (torch.randn(1024, n, generator=gen), k)
             for n, k in ((768, 20), (12101, 20), (40981, 20), (12101, 256))}
    for name, (x, k) in tiles.items():
        got, ref = ops.topk_rows(x, k), reference.topk_rows(x, k)
        assert torch.equal(got[0], torch.topk(x, k, dim=1).values) and torch.equal(got[1], ref[1]), name
    op_cases = {name: (lambda p, x=x, k=k: timed(lambda: PROVIDERS[p](x, k))) for name, (x, k) in tiles.items()}

    U, I, d = 22363, 12101, 64
    user, item = torch.randn(U, d, generator=gen), torch.randn(I, d, generator=gen)
    train = torch.stack([torch.arange(U).repeat_interleave(8), torch.randint(0, I, (U * 8,), generator=gen)], 1)
    valid = torch.stack([torch.arange(U), torch.randint(0, I, (U,), generator=gen)], 1)
    scorer = metrics.EmbeddingScorer(user, item)
    ev = lambda: metrics.evaluate(scorer, valid, U, I, exclude=[train], ks=(20,))  # noqa: E731
    base = torch.randn(5000, 16, generator=gen) @ torch.randn(16, I, generator=gen)
    branch = [base + s * torch.randn(5000, I, generator=gen) for s in (1.0, 2.0, 2.0)]
    branch[2] = torch.nn.functional.softplus(branch[2])   # skewed, like kNN scores, but without exact ties
    vt = torch.stack([torch.arange(5000), base.argmax(1)], 1)
    tr = train[train[:, 0] < 5000]
    vt = vt[~torch.isin(vt[:, 0] * I + vt[:, 1], tr[:, 0] * I + tr[:, 1])]
    scorers = [lambda u, m=m: m[u].clone() for m in branch]
    tune = lambda: hybrid.tune_score_shares(*scorers, KNN_SHARES, vt, 5000, I, exclude=[tr],  # noqa: E731
                                            grid=HYBRID_GRID)
    saved = ops.topk_rows   # the same answers from both providers
    ops.topk_rows = PROVIDERS["torch.topk"]
    want_ev, want_tune = ev(), tune()
    ops.topk_rows = saved
    # The tuner's mixed scores can tie at float rounding, where the two top-ks order ties differently.
    assert same(ev(), want_ev) and same(tune(), want_tune, tol=1e-3), "the providers disagree"
    gowalla = {}
    if a.gowalla:
        from glrec_fast import BipartiteGraph
        from glrec_fast.data import load_dataset
        ds = load_dataset("gowalla")
        g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
        gs = metrics.EmbeddingScorer(torch.randn(ds.num_users, 64, generator=gen), torch.randn(ds.num_items, 64, generator=gen))
        gev = lambda: metrics.evaluate(gs, ds.test, ds.num_users, ds.num_items, exclude=[ds.train],  # noqa: E731
                                       ks=(10, 20, 50), item_context=g.item_context)
        ops.topk_rows = PROVIDERS["torch.topk"]
        want_g = gev()
        ops.topk_rows = saved
        assert same(gev(), want_g), "the providers disagree on Gowalla"
        gowalla = {"metrics.evaluate Gowalla test 29,858 x 40,981, ks 10/20/50, per context": lambda p: with_provider(p, gev)}
    cases = {**op_cases, **gowalla,
             "metrics.evaluate 22,363 x 12,101": lambda p: with_provider(p, ev),
             "tune_score_shares 5,000 x 12,101, 11 x 20": lambda p: with_provider(p, tune)}
    med = interleave(cases, a.rounds)
    print(f"threads {a.threads}, medians of {a.rounds} interleaved rounds")
    print("| case | ops.topk_rows | torch.topk | speed-up |\n|---|---|---|---|")
    for c, m in med.items():
        print(f"| {c} | {m['ops.topk_rows'] * 1e3:.1f} ms | {m['torch.topk'] * 1e3:.1f} ms | "
              f"{m['torch.topk'] / m['ops.topk_rows']:.2f}x |")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "torch": torch.__version__,
                       "median_s": med, "argv": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
