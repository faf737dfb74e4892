"""Shared benchmark helpers: graphs (Gowalla, synthetic power-law), byte models, timing helpers.

`pytest bench/ --benchmark-only` collects the ``bench_*.py`` files here (hook below). Helpers are
plain functions so ``bench/gpu_suite.py`` (a script, no pytest) can import them too; add your own
below with small edits.
"""
from __future__ import annotations

import functools
import os
import pathlib
import time

import numpy as np
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

# Real datasets live in ../shared/data beside the checkout (DESIGN.md); GLREC_DATA_DIR wins.
if "GLREC_DATA_DIR" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["GLREC_DATA_DIR"] = str(REPO.parent / "shared" / "data")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default pattern is test_*.py). A file named on
    the command line is collected by pytest itself; collecting it here too would run it twice."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]


# --------------------------------------------------------------------------- graphs
def _read_lightgcn_train(path: pathlib.Path):
    """(edges [n, 2] int64, num_users, num_items) from a LightGCN ``uid item item ...`` file (numpy)."""
    users, items = [], []
    with open(path) as f:
        for line in f:
            parts = np.array(line.split(), dtype=np.int64)
            if parts.size > 1:
                users.append(np.full(parts.size - 1, parts[0]))
                items.append(parts[1:])
    u, i = np.concatenate(users), np.concatenate(items)
    return torch.from_numpy(np.stack([u, i], 1)), int(u.max()) + 1, int(i.max()) + 1


@functools.lru_cache(maxsize=None)
def gowalla_graph():
    """Gowalla's training graph as a BipartiteGraph (29,858 users, 40,981 items, 810,128 edges), or
    None when the data is not on this machine. Through glrec_fast.data when it is importable."""
    from glrec_fast.graph import BipartiteGraph
    data_dir = os.environ.get("GLREC_DATA_DIR")
    if not data_dir or not (pathlib.Path(data_dir) / "gowalla" / "train.txt").is_file():
        return None
    try:
        from glrec_fast.data import load_dataset
    except ImportError:  # the data package is optional here: parse train.txt directly
        edges, nu, ni = _read_lightgcn_train(pathlib.Path(data_dir) / "gowalla" / "train.txt")
        return BipartiteGraph.from_interactions(edges, nu, ni)
    ds = load_dataset("gowalla")
    return BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)


def powerlaw_graph(num_users: int, num_items: int, num_interactions: int, user_alpha: float = 0.3,
                   item_alpha: float = 0.5, seed: int = 0):
    """Random bipartite graph with Zipf-like popularity ``p(rank r) ~ (r + 1)^-alpha`` on both sides,
    exactly ``num_interactions`` distinct (user, item) pairs, ids shuffled so hubs are scattered.

    Built straight into CSR with numpy (no from_interactions: its lexicographic unique over 10M rows
    is the slow part). The defaults give a heavier tail than Gowalla (max/median item degree ~500 vs
    ~100), so it also stresses the kernels' handling of long rows.
    """
    from glrec_fast.graph import BipartiteGraph
    rng = np.random.default_rng(seed)

    def popularity(n, alpha):
        p = (np.arange(n) + 1.0) ** -alpha
        return rng.permutation(p / p.sum())

    pu, pi = popularity(num_users, user_alpha), popularity(num_items, item_alpha)
    keys = np.empty(0, dtype=np.int64)
    while keys.size < num_interactions:
        m = int((num_interactions - keys.size) * 1.15) + 1000
        u = rng.choice(num_users, size=m, p=pu)
        i = rng.choice(num_items, size=m, p=pi)
        keys = np.unique(np.concatenate([keys, u.astype(np.int64) * num_items + i]))
    keys = np.sort(rng.choice(keys, size=num_interactions, replace=False))
    u, i = keys // num_items, keys % num_items
    urp = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=num_users), out=urp[1:])
    order = np.argsort(i * num_users + u, kind="stable")
    irp = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(i, minlength=num_items), out=irp[1:])
    t = torch.from_numpy
    return BipartiteGraph(t(urp), t(i.copy()), t(irp), t(u[order].copy()), num_users, num_items)


@functools.lru_cache(maxsize=None)
def synthetic_10m_graph():
    """>= 10M interactions (20M joint CSR entries) at Gowalla's users:items ratio and skew-like
    power law: 370k users, 505k items."""
    return powerlaw_graph(370_000, 505_000, 10_000_000, seed=0)


GRAPHS = ["gowalla", "synthetic10m"]


def get_graph(name: str):
    if name == "gowalla":
        g = gowalla_graph()
        if g is None:
            pytest.skip("Gowalla not found: set GLREC_DATA_DIR to a folder holding gowalla/train.txt")
        return g
    if name == "synthetic10m":
        return synthetic_10m_graph()
    raise ValueError(f"unknown benchmark graph {name!r}; expected one of {GRAPHS}")


def degree_summary(g) -> dict:
    deg = (g.rowptr[1:] - g.rowptr[:-1]).float()
    return {"num_nodes": g.num_nodes, "nnz": int(g.col.numel()), "max_degree": int(deg.max()),
            "median_degree": float(deg.median())}


# --------------------------------------------------------------------------- byte models
def propagate_min_bytes(num_nodes: int, nnz: int, d: int, num_layers: int, elem_bytes: int = 4,
                        index_bytes: int = 8) -> int:
    """Bytes a layer-by-layer propagation must move at least: each layer reads the graph once
    (rowptr, col, dinv) and the previous layer's table once, and writes its own table once (the last
    one being the output). Gathered rows re-read from cache are not counted, so GB/s against this
    model is a lower bound on the memory traffic actually served."""
    graph = (num_nodes + 1) * index_bytes + nnz * index_bytes + num_nodes * 4
    table = num_nodes * d * elem_bytes
    return num_layers * (graph + 2 * table)


def fusion_min_bytes(n: int, d: int, elem_bytes: int = 4, backward: bool = False) -> int:
    """Forward: read e_graph, e_text, context; write fused. Backward adds: read grad_out, e_graph,
    e_text, context; write d_e_graph, d_e_text (the [C, 3, d] gate tables are negligible)."""
    fwd = 3 * n * d * elem_bytes + n * 8
    bwd = 5 * n * d * elem_bytes + n * 8
    return fwd + (bwd if backward else 0)


# --------------------------------------------------------------------------- timing helpers
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def record(benchmark, nbytes: int | None = None, **info) -> None:
    """Put the median time, GB/s against ``nbytes`` and any extra facts into benchmark.extra_info."""
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = round(median * 1e3, 3)
    if nbytes is not None:
        benchmark.extra_info["min_bytes"] = int(nbytes)
        benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
    benchmark.extra_info.update(info)


def run_pedantic(benchmark, fn, device, rounds: int, warmup: int = 1):
    """pedantic() with a device sync inside the timed call (CUDA work is asynchronous)."""
    def timed():
        out = fn()
        sync(device)
        return out
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)


def wall_median(fn, reps: int = 5, device="cpu") -> float:
    """Median wall seconds of ``fn`` (for scripts without pytest-benchmark)."""
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))
