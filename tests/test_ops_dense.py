"""ops.dense_layer: a GraphSAGE layer's GEMM and tanh (csrc/dense/dense_cpu.cpp) against the reference."""
from __future__ import annotations

import pytest
import torch

import glrec_fast as gl
from glrec_fast import ops, reference
from glrec_fast.models.graphsage import GraphSAGE

COMPILED = ops.KERNELS["dense_layer"]["CPU"] == "C++ (_C)"
need_kernel = pytest.mark.skipif(not COMPILED, reason="compiled extension not built")


def _inputs(m, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 0.7
    w = torch.randn(n, k, generator=g) * (1.5 / k ** 0.5)   # pre-activations of order 1: both tanh branches
    b = torch.randn(n, generator=g) * 0.3 if bias else None
    return x, w, b


@need_kernel
@pytest.mark.parametrize("m", [1, 3, 7, 257, 1029])          # tails of the 4-row tile and the 256-row split
@pytest.mark.parametrize("k, n", [(128, 64), (16, 16), (48, 80), (144, 32)])   # 64-column tiles and 16-column tails
@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_layer_and_its_gradient_equal_float64(m, k, n, tanh, bias):
    x, w, b = _inputs(m, k, n, bias=bias)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    got = torch.ops.glrec.dense_layer(leaves[0], leaves[1], leaves[2] if bias else None, tanh)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = reference.dense_layer(leaves64[0], leaves64[1], leaves64[2] if bias else None, tanh)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(got, leaves, g)
    grads64 = torch.autograd.grad(want, leaves64, g.double())
    for name, a, e in zip(("x", "weight", "bias"), grads, grads64):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name)


@need_kernel
def test_tanh_is_within_a_few_ulps_everywhere():
    z = torch.cat([torch.linspace(-30, 30, 60_000), torch.linspace(-0.6, 0.6, 60_000),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.4999999, 0.5, 0.5000001, 88.0, 1e4, -1e30]
                                + [0.0] * 5)])   # (not inf: x times the identity's zeros is NaN before tanh)
    x = z.view(-1, 16).contiguous()
    got = torch.ops.glrec.dense_layer(x, torch.eye(16), None, True).view(-1)
    want = torch.tanh(z.double())
    err = (got.double() - want).abs()
    assert float(err.max()) < 2.5e-7                                   # ~2 float32 ulps of 1
    assert float((err / want.abs().clamp(min=1e-30)).max()) < 5e-7      # relative, down to the tiniest input
    assert torch.equal(got > 0, z > 0) and torch.equal(got < 0, z < 0)   # odd, and 0 at 0
    nan = torch.ops.glrec.dense_layer(torch.full((1, 16), float("nan")), torch.eye(16), None, True)
    assert bool(nan.isnan().all())


@need_kernel
def test_dense_layer_is_deterministic():
    x, w, b = _inputs(5000, 128, 64)
    g = torch.randn(5000, 64)
    outs = []
    for _ in range(2):
        y = torch.ops.glrec.dense_layer(x, w, b, True)
        outs.append((y, *torch.ops.glrec.dense_layer_backward(g, x, w, y, True)))
    for a, e in zip(*outs):
        assert torch.equal(a, e)


@need_kernel
def test_dense_layer_gives_the_same_bits_for_any_thread_count():
    # The backward adds its dW / db partials per fixed row block, whichever thread ran the block, so
    # one thread and two give the same bits (a per-thread partial would not).
    x, w, b = _inputs(9000, 128, 64)
    g = torch.randn(9000, 64)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = torch.ops.glrec.dense_layer(x, w, b, True)
            outs.append((y, *torch.ops.glrec.dense_layer_backward(g, x, w, y, True)))
    finally:
        torch.set_num_threads(before)
    for a, e in zip(*outs):
        assert torch.equal(a, e)


def test_dense_layer_routes_what_the_kernel_does_not_serve_to_the_reference():
    # bfloat16 and features that are not multiples of 16 run the reference, bit for bit.
    x, w, b = _inputs(33, 24, 8)
    assert torch.equal(ops.dense_layer(x, w, b, tanh=True), reference.dense_layer(x, w, b, True))
    x, w, b = (t.bfloat16() for t in _inputs(33, 32, 16))
    assert torch.equal(ops.dense_layer(x, w, b, tanh=True), reference.dense_layer(x, w, b, True))


def test_dense_layer_bad_input_names_it():
    x, w, b = _inputs(10, 32, 16)
    with pytest.raises(ValueError, match=r"x, weight: expected x \[m, k\] and weight \[n, k\]"):
        ops.dense_layer(x, w[:, :16], b)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
        ops.dense_layer(x, w, b[:8])
    with pytest.raises(ValueError, match="x: expected a 2-d tensor"):
        ops.dense_layer(x[0], w, b)
    if COMPILED:
        with pytest.raises(RuntimeError, match="expected float32 x and weight"):
            torch.ops.glrec.dense_layer(x.double(), w.double(), None, False)
        with pytest.raises(RuntimeError, match="multiples of 16"):
            torch.ops.glrec.dense_layer(x[:, :24].contiguous(), w[:, :24].contiguous(), None, False)
        with pytest.raises(RuntimeError, match=r"grad must be contiguous float32 \[10, 16\]"):
            torch.ops.glrec.dense_layer_backward(torch.zeros(10, 8), x, w, x, False)
        with pytest.raises(RuntimeError, match="bias must be float32"):
            torch.ops.glrec.dense_layer(x, w, b[:8], False)


@need_kernel
@pytest.mark.parametrize("tanh", [False, True])
def test_dense_layer_and_corner_equals_the_layer_and_a_slice(tanh):
    # The corner's gradient is added into the layer's dx in place: the same as autograd's sum.
    x, w, b = _inputs(300, 64, 32)
    g = torch.Generator().manual_seed(2)
    gy, gc = torch.randn(300, 32, generator=g), torch.randn(41, 24, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y, corner = ops.dense_layer_and_corner(*leaves, tanh, 41, 24)
    assert torch.equal(corner, x[:41, :24])
    got = torch.autograd.grad((y * gy).sum() + (corner * gc).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference.dense_layer(*leaves64, tanh)
    want = torch.autograd.grad((y64 * gy.double()).sum() + (leaves64[0][:41, :24] * gc.double()).sum(), leaves64)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match=r"rows, cols: expected 0 <= rows <= 300 and 0 <= cols <= 64"):
        ops.dense_layer_and_corner(x, w, b, tanh, 301, 8)


@need_kernel
def test_graphsage_step_with_the_kernel_equals_the_reference_layers(monkeypatch):
    # One GraphSAGE loss and table gradient with the compiled layers and with the reference's.
    g = torch.Generator().manual_seed(1)
    e = torch.stack([torch.randint(0, 96, (700,), generator=g), torch.randint(0, 57, (700,), generator=g)], 1)
    graph = gl.BipartiteGraph.from_interactions(e, 97, 59)
    users, pos, neg = torch.tensor([0, 3, 50, 96]), torch.tensor([1, 2, 1, 57]), torch.tensor([7, 8, 1, 58])
    results = []
    for use_kernel in (True, False):
        with monkeypatch.context() as mp:
            if use_kernel:   # the kernel really runs: a fallback to the reference would raise
                mp.setattr(reference, "dense_layer", lambda *a: pytest.fail("dense_layer fell back"))
            else:            # every layer through the reference (autograd's slice gradient included)
                mp.setattr(ops, "_dense_compiled", lambda *a: False)
            torch.manual_seed(0)
            model = GraphSAGE(graph, dim=32, fanouts=[3, 4], sample_seed=5)
            loss, _ = model.loss(users, pos, neg, 1e-4)
            loss.backward()
            with torch.no_grad():
                items = model.embeddings()[1]
        results.append((loss.detach(), model.ego.weight.grad, model.lin_self[0].weight.grad,
                        model.lin_neigh[1].weight.grad, items))
    for name, a, e in zip(("loss", "table grad", "W_self grad", "W_neigh grad", "item embeddings"), *results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)
