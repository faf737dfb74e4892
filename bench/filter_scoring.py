"""A graph filter's first product ``r P~`` for 1,024 users (the rows of GF-CF's scores before the low-rank
term), three ways side by side in one process, interleaved call by call (medians of --rounds after 2
warm-up rounds), on real data:

* ``ops.gram_rows``: the compiled kernel, each user's two-hop neighbourhood only;
* ``torch CSR x dense``: ``R~^T (R~ X)`` on the dense [I, 1024] block X of the users' 0/1 rows
  (``reference.gram_rows``; what GraphFilter did before the kernel);
* ``torch sparse x sparse``: ``(X_sparse R~^T) R~`` with torch's CSR x CSR product, then to dense.

Also the whole GF-CF score tile (K=256, w=0.3) per 1,024 users. Writes --json.

    python bench/filter_scoring.py --datasets amazon-beauty gowalla
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from glrec_fast import ops, reference
from glrec_fast.data import load_dataset
from glrec_fast.graph import BipartiteGraph
from glrec_fast.models import filters


def providers(f: filters.GraphFilter, users: torch.Tensor) -> dict:
    r, rt = f._r, f._rt
    args = (r.crow_indices(), r.col_indices(), r.values(), rt.crow_indices(), rt.col_indices(), rt.values(), users,
            torch.arange(f.num_items))
    rows = f._rows(users)

    def spgemm():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            return torch.sparse.mm(torch.sparse.mm(rows, rt), r).to_dense()
    return {"gram_rows (ours)": lambda: ops.gram_rows(r, rt, users),
            "torch CSR x dense": lambda: reference.gram_rows(*args),
            "torch sparse x sparse": spgemm,
            "GF-CF tile, ours (K=256)": lambda: f.scores(users)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["amazon-beauty", "gowalla"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default="bench/results/filter_scoring.json")
    a = ap.parse_args(argv)
    out = {"threads": torch.get_num_threads(), "users_per_call": 1024}
    for name in a.datasets:
        ds = load_dataset(name)
        g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
        f = filters.GraphFilter(g, rank=256, ideal_weight=0.3).fit()
        users = torch.randperm(g.num_users, generator=torch.Generator().manual_seed(0))[:1024].sort().values
        fns = providers(f, users)
        want = fns["torch CSR x dense"]()
        for k in ("gram_rows (ours)", "torch sparse x sparse"):
            torch.testing.assert_close(fns[k](), want, rtol=1e-4, atol=1e-6)
        times = {k: [] for k in fns}
        for rnd in range(a.rounds + 2):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if rnd >= 2:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"users": g.num_users, "items": g.num_items, "interactions": g.num_edges, "median_ms": med}
        print(f"{name} ({g.num_users:,} users x {g.num_items:,} items, {g.num_edges:,} interactions), "
              f"{torch.get_num_threads()} threads, median ms per 1,024 users:")
        for k, v in med.items():
            print(f"  {k:<26} {v:9.1f}")
    with open(a.json, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
