"""Neighbour-sampler throughput: sampled edges/s and seeds/s, 1024 seeds per call.

    pytest bench/bench_sampler.py --benchmark-only -q -s

Graphs (bench/conftest.py): ``gowalla`` (joint user+item CSR of the LightGCN paper's train.txt:
70,839 nodes, 1.62M directed CSR entries) and ``synthetic10m`` (power-law, 10M interactions =
20M directed CSR entries). Fanouts ``[10, 10]`` and ``[15, 10, 5]``, without replacement.
Providers: ``reference`` (glrec_fast.reference.neighbor_sample, pure torch), ``ours``
(glrec_fast.ops.neighbor_sample on CPU tensors: the compiled C++ kernel), ``ours-cuda`` (same op on
CUDA tensors; skipped without a GPU), ``pyg`` (pyg-lib's / torch-sparse's sampler; skipped when
neither is installed). Each round draws 1024 fresh random seed nodes and a fresh seed; edges/s and
seeds/s (from the median round) go to extra_info and are printed with -s.
"""
import numpy as np
import pytest
import torch

import glrec_fast as gl
from conftest import GRAPHS, get_graph, record, sync

NUM_SEEDS = 1024
FANOUTS = {"10-10": [10, 10], "15-10-5": [15, 10, 5]}
ROUNDS = {"reference": 5, "ours": 40, "ours-cuda": 40, "pyg": 40}


def _pyg_sampler():
    """``(rowptr, col, seeds, fanouts) -> number of sampled edges`` through PyG's backends, or skip."""
    try:
        import pyg_lib.sampler

        def run(rowptr, col, seeds, fanouts):
            out = pyg_lib.sampler.neighbor_sample(rowptr, col, seeds, fanouts, replace=False, directed=True,
                                                  return_edge_id=True)
            return int(out[0].numel())  # row: one entry per sampled edge
        return run
    except ImportError:
        pass
    try:
        import torch_sparse  # noqa: F401

        def run(rowptr, col, seeds, fanouts):
            out = torch.ops.torch_sparse.neighbor_sample(rowptr, col, seeds, fanouts, False, True)
            return int(out[1].numel())
        return run
    except ImportError:
        pytest.skip("PyG sampler not installed (neither pyg-lib nor torch-sparse)")


@pytest.mark.parametrize("fanouts", list(FANOUTS), ids=list(FANOUTS))
@pytest.mark.parametrize("provider", ["reference", "ours", "ours-cuda", "pyg"])
@pytest.mark.parametrize("graph_name", GRAPHS)
def test_sampler_throughput(benchmark, graph_name, provider, fanouts):
    fan = FANOUTS[fanouts]
    device = "cuda" if provider == "ours-cuda" else "cpu"
    if provider == "ours" and gl.ops.KERNELS["neighbor_sample"]["CPU"] != "C++ (_C)":
        pytest.skip("compiled sampler not built (pip install --no-build-isolation -e .)")
    if provider == "ours-cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if gl.ops.KERNELS["neighbor_sample"]["CUDA"] != "CUDA (_C)":
            pytest.skip("compiled CUDA sampler not built")
    pyg = _pyg_sampler() if provider == "pyg" else None
    g = get_graph(graph_name)
    rowptr, col = g.rowptr.to(device), g.col.to(device)

    if provider == "reference":
        def sample(seeds, s):
            return sum(int(e.numel()) for e in gl.reference.neighbor_sample(rowptr, col, seeds, fan, False, s)[3])
    elif provider == "pyg":
        def sample(seeds, s):
            return pyg(rowptr, col, seeds, fan)
    else:
        def sample(seeds, s):
            return sum(int(e.numel()) for e in gl.ops.neighbor_sample(rowptr, col, seeds, fan, seed=s).edge_ids)

    gen = torch.Generator().manual_seed(0)
    edges, state = [], {"round": 0}

    def setup():
        state["round"] += 1
        return (torch.randint(0, g.num_nodes, (NUM_SEEDS,), generator=gen).to(device), state["round"]), {}

    def run(seeds, s):
        edges.append(sample(seeds, s))  # .numel() of the outputs: the sizes are known on the host
        sync(device)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS[provider], warmup_rounds=1)
    med = benchmark.stats.stats.median
    mean_edges = float(np.mean(edges))
    record(benchmark, graph=graph_name, fanouts=fan, edges_per_call=round(mean_edges),
           edges_per_s=round(mean_edges / med), seeds_per_s=round(NUM_SEEDS / med), threads=torch.get_num_threads())
    print(f"\n{graph_name} {fan} {provider}: {mean_edges / med / 1e6:.2f} M sampled edges/s, "
          f"{NUM_SEEDS / med / 1e3:.1f} k seeds/s ({mean_edges:,.0f} edges/call, median {med * 1e3:.2f} ms)")
