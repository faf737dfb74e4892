"""Context-aware gated fusion (d = 64, the graph's item contexts cold/head/tail as the gate index):
reference (glrec_fast.reference, eager torch + autograd) vs ours (glrec_fast.ops: fused C++ on CPU,
Triton on CUDA), forward and forward+backward, one row per item of Gowalla and of the 10M-edge
power-law graph. extra_info carries GB/s against conftest.fusion_min_bytes.

    pytest bench/bench_fusion.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, GRAPHS, fusion_min_bytes, get_graph, record, run_pedantic

from glrec_fast import ops, reference

DIM = 64
PROVIDERS = ["reference", "ours"]


def _inputs(graph, device, requires_grad):
    g = get_graph(graph)
    ctx = g.item_context.to(device)
    n, num_ctx = ctx.numel(), 3
    leaves = [torch.randn(n, DIM, device=device), torch.randn(n, DIM, device=device),
              torch.randn(num_ctx, 2, DIM, device=device), torch.randn(num_ctx, DIM, device=device)]
    for t in leaves:
        t.requires_grad_(requires_grad)
    eg, et, w, b = leaves
    return (eg, et, ctx, w, b), leaves


def _fn(provider):
    return reference.gated_fusion if provider == "reference" else ops.gated_fusion


def _rounds(device):
    return (50, 5) if device == "cuda" else (10, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_fusion_forward(benchmark, provider, graph, device):
    args, _ = _inputs(graph, device, requires_grad=False)
    fn = _fn(provider)
    benchmark.group = f"gated_fusion fwd {graph} {device}"
    run_pedantic(benchmark, lambda: fn(*args), device, *_rounds(device))
    n = args[0].size(0)
    record(benchmark, fusion_min_bytes(n, DIM), rows=n, threads=torch.get_num_threads())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_fusion_forward_backward(benchmark, provider, graph, device):
    args, leaves = _inputs(graph, device, requires_grad=True)
    fn = _fn(provider)
    go = torch.randn_like(args[0])
    benchmark.group = f"gated_fusion fwd+bwd {graph} {device}"

    def step():
        for t in leaves:
            t.grad = None
        fn(*args).backward(go)
    run_pedantic(benchmark, step, device, *_rounds(device))
    n = args[0].size(0)
    record(benchmark, fusion_min_bytes(n, DIM, backward=True), rows=n, threads=torch.get_num_threads())
