"""LightGCN propagation (3 layers, d = 64), forward and forward+backward, on Gowalla and a
10M-interaction power-law graph: ours (glrec_fast.ops: C++ on CPU, Triton on CUDA) beside

* ``torch_sparse_symmetric`` - the fair baseline: torch.sparse CSR mm per layer with the
  normalised matrix prebuilt, then the layer mean, and the backward a PyTorch engineer writes for a
  symmetric matrix (the same products on the gradient; ``reference.propagate_symmetric``);
* ``torch_sparse_autograd`` (fwd+bwd only; its forward is the one above) - the same forward with
  plain autograd, which transposes the CSR on every backward (``reference.propagate``);
* ``pyg`` - PyG's LGConv, when torch_geometric is installed.

``ours_bf16`` runs the same op on a bfloat16 copy of the input (layer tables in bfloat16, sums in
float32; the backward likewise), as ``LightGCN(propagate_dtype="bfloat16")`` does. torch has no
bf16 sparse CSR product on the CPU, so its baselines are float32 there. extra_info carries GB/s
against conftest.propagate_min_bytes (float32 bytes).

    pytest bench/bench_propagate.py --benchmark-only
"""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICES, GRAPHS, degree_summary, get_graph, propagate_min_bytes, record, run_pedantic

from glrec_fast import ops, reference

NUM_LAYERS, DIM = 3, 64
PROVIDERS = ["torch_sparse_symmetric", "torch_sparse_autograd", "ours", "ours_bf16", "pyg"]


@functools.lru_cache(maxsize=None)
def _graph_on(name: str, device: str):
    g = get_graph(name)
    g = g if device == "cpu" else g.to(device)
    g.norm_adj()  # prebuilt and cached, as LightGCN's code caches its normalised matrix
    return g


def _pyg_layer_mean(g, num_layers):
    try:
        from torch_geometric.nn import LGConv
    except ImportError:
        pytest.skip("torch_geometric not installed")
    conv = LGConv(normalize=False)
    adj = g.norm_adj()  # symmetric, so it is its own transpose (PyG's adj_t)

    def run(x):  # PyG's LightGCN.get_embedding with alpha = 1 / (K + 1)
        out = x / (num_layers + 1)
        for _ in range(num_layers):
            x = conv(x, adj)
            out = out + x / (num_layers + 1)
        return out
    return run


def _provider_fn(provider, g):
    if provider == "torch_sparse_symmetric":
        return lambda x: reference.propagate_symmetric(g, x, NUM_LAYERS)
    if provider == "torch_sparse_autograd":
        return lambda x: reference.propagate(g, x, NUM_LAYERS)
    if provider == "ours":
        return lambda x: ops.propagate(g, x, NUM_LAYERS)
    if provider == "ours_bf16":   # bfloat16 layer tables, float32 sums (LightGCN propagate_dtype)
        return lambda x: ops.propagate(g, x.to(torch.bfloat16), NUM_LAYERS).float()
    return _pyg_layer_mean(g, NUM_LAYERS)


def _rounds(graph, device, provider):
    if device == "cuda":
        return 20, 2
    if graph == "synthetic10m":  # ~10-60 s per reference round on 2 cores
        return (1, 0) if provider != "ours" else (2, 1)
    return (3, 1) if provider != "ours" else (10, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_propagate_forward(benchmark, provider, graph, device):
    if provider == "torch_sparse_autograd":
        pytest.skip("its forward is torch_sparse_symmetric's")
    g = _graph_on(graph, device)
    fn = _provider_fn(provider, g)
    x = torch.randn(g.num_nodes, DIM, device=device)
    benchmark.group = f"propagate fwd {graph} {device}"
    rounds, warmup = _rounds(graph, device, provider)
    with torch.no_grad():
        run_pedantic(benchmark, lambda: fn(x), device, rounds, warmup)
    nbytes = propagate_min_bytes(g.num_nodes, int(g.col.numel()), DIM, NUM_LAYERS)
    record(benchmark, nbytes, **degree_summary(g), threads=torch.get_num_threads())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_propagate_forward_backward(benchmark, provider, graph, device):
    g = _graph_on(graph, device)
    fn = _provider_fn(provider, g)
    x = torch.randn(g.num_nodes, DIM, device=device, requires_grad=True)
    go = torch.randn(g.num_nodes, DIM, device=device)
    benchmark.group = f"propagate fwd+bwd {graph} {device}"
    rounds, warmup = _rounds(graph, device, provider)

    def step():
        x.grad = None
        fn(x).backward(go)
    run_pedantic(benchmark, step, device, rounds, warmup)
    nbytes = 2 * propagate_min_bytes(g.num_nodes, int(g.col.numel()), DIM, NUM_LAYERS)
    record(benchmark, nbytes, **degree_summary(g), threads=torch.get_num_threads())
