"""Training step time with dense table gradients (torch.optim.AdamW, the previous path), with
row-sparse gradients through plain PyTorch (torch.optim.SparseAdam on the tables, AdamW on the rest:
what a PyTorch engineer writes for sparse embeddings) and with optim.RowAdam (one optimiser for both),
side by side in one process on Gowalla.

    python bench/row_sparse_steps.py                     # mf d=256 softmax, mf d=64 softmax, graphsage [10, 10] BPR
    python bench/row_sparse_steps.py --steps 30 --repeats 3

Each (model, path) times ``--steps`` steps after 3 warm-up steps, the paths interleaved ``--repeats``
times (median reported) from the same initial weights and the same batches. Also reported: the
share of table rows one step touches (row sparsity only pays when it is small) and each path's loss
after the timed steps (lazy and dense Adam are different optimisers, so it is a sanity check, not
an equality). Results: bench/results/row_sparse_steps.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import glrec_fast as gl  # noqa: E402
from glrec_fast.models.graphsage import GraphSAGE  # noqa: E402
from glrec_fast.models.mf import MF  # noqa: E402
from glrec_fast.optim import RowAdam  # noqa: E402

CASES = {
    "mf-d256-softmax": dict(model="mf", dim=256, loss="softmax", batch=4096),
    "mf-d64-softmax": dict(model="mf", dim=64, loss="softmax", batch=4096),
    "graphsage-d64-bpr": dict(model="graphsage", dim=64, loss="bpr", batch=8192),
}


def build(case, graph):
    torch.manual_seed(0)
    if case["model"] == "mf":
        return MF(graph.num_users, graph.num_items, case["dim"])
    return GraphSAGE(graph, case["dim"], fanouts=(10, 10))


def batches(ds, case, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = ds.train.long()
    out = []
    for _ in range(steps):
        idx = torch.randint(0, pairs.size(0), (case["batch"],), generator=g)
        negs = torch.randint(0, ds.num_items, (1024 if case["loss"] == "softmax" else case["batch"],), generator=g)
        out.append((pairs[idx, 0], pairs[idx, 1], negs))
    return out


class _TorchSparse:
    """torch.optim.SparseAdam for the row-sparse tables and torch.optim.AdamW for every other weight."""

    def __init__(self, model, lr):
        tables = {id(t.weight) for t in model.sparse_tables()}
        rest = [p for p in model.parameters() if id(p) not in tables]
        self.opts = [torch.optim.SparseAdam([t.weight for t in model.sparse_tables()], lr=lr)]
        if rest:
            self.opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=0.0))

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.opts:
            o.step()


PATHS = {
    "dense": lambda model: torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0),
    "torch_sparse_adam": lambda model: _TorchSparse(model, 5e-3),
    "row_adam": lambda model: RowAdam(model.parameters(), lr=5e-3),
}


def run(model, opt, data, case, sparse):
    model.row_sparse = sparse
    for tab in model.sparse_tables():
        tab.weight.grad = None
    t, loss = None, None
    for j, (u, p, n) in enumerate(data):
        if j == 3:
            t = time.perf_counter()
        if case["loss"] == "softmax":
            loss, _ = model.softmax_loss(u, p, n, 0.1, 0.0)
        else:
            loss, _ = model.loss(u, p, n, 1e-4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / (len(data) - 3), float(loss.detach())


def touched(model, data):
    n = sum(t.weight.size(0) for t in model.sparse_tables())
    if isinstance(model, MF):
        u, p, neg = data[0]
        return (u.unique().numel() + torch.cat([p, neg]).unique().numel()) / n
    blocks = model.blocks_for(*data[0])
    return blocks.nodes.numel() / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=23)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "row_sparse_steps.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = gl.load_dataset("gowalla")
    graph = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    rows = []
    for name in args.cases:
        case = CASES[name]
        data = batches(ds, case, args.steps)
        base = build(case, graph)
        times = {path: [] for path in PATHS}
        losses = {}
        for _ in range(args.repeats):
            for path, make in PATHS.items():
                model = copy.deepcopy(base)
                model.row_sparse = path != "dense"
                s, loss = run(model, make(model), data, case, sparse=path != "dense")
                times[path].append(s)
                losses[path] = loss
        row = {"case": name, **case, "threads": args.threads, "touched_rows": touched(base, data),
               **{f"{path}_ms": 1e3 * statistics.median(times[path]) for path in PATHS}, "final_loss": losses}
        row["speedup_vs_dense"] = row["dense_ms"] / row["row_adam_ms"]
        row["speedup_vs_torch_sparse_adam"] = row["torch_sparse_adam_ms"] / row["row_adam_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
