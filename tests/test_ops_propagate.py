"""glrec::propagate against reference.py: the C++ CPU kernel (through torch.ops.glrec and
glrec_fast.ops, with autograd), the Triton kernel under TRITON_INTERPRET=1 on CPU (in a
subprocess, because the interpreter must be chosen before triton is first imported) and on CUDA
when a GPU is present, and bad input."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the subprocess runs this file as a script
    sys.path.insert(0, str(REPO))

from glrec_fast import ops, reference  # noqa: E402
from glrec_fast.graph import BipartiteGraph  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def random_graph(num_users: int, num_items: int, num_edges: int, seed: int) -> BipartiteGraph:
    """Random bipartite graph with skewed item popularity (a few long rows) and the last 3 users and
    last 3 items left without any edge (isolated nodes: degree-0 rows, dinv = 0)."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(0, num_users - 3, (num_edges,), generator=gen)
    # u^3 skews toward item 0: a handful of items get a large share of the edges (power-law-like)
    items = ((num_items - 3) * torch.rand(num_edges, generator=gen) ** 3).long()
    return BipartiteGraph.from_interactions(torch.stack([users, items], 1), num_users, num_items)


SIZES = {97: (40, 57, 300), 1025: (400, 625, 4000)}


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- C++ CPU kernel
def test_cpu_kernel_is_the_compiled_extension():
    import glrec_fast._C  # noqa: F401  (fails, not skips, when the extension is not built)
    assert ops.kernel_report()["propagate"]["CPU"] == "C++ (_C)"


@pytest.mark.parametrize("num_nodes", [97, 1025])
@pytest.mark.parametrize("d", [59, 64, 128])
@pytest.mark.parametrize("num_layers", [1, 4])
def test_cpu_forward_and_grad_match_reference(num_nodes, d, num_layers):
    nu, ni, ne = SIZES[num_nodes]
    g = random_graph(nu, ni, ne, seed=num_nodes + d + num_layers)
    assert g.num_nodes == num_nodes and int((g.rowptr[1:] == g.rowptr[:-1]).sum()) >= 6
    x = torch.randn(num_nodes, d)
    out = torch.ops.glrec.propagate(g.rowptr, g.col, g.dinv, x, num_layers)
    torch.testing.assert_close(out, reference.propagate(g, x, num_layers), **tol(torch.float32))

    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    go = torch.randn(num_nodes, d)
    ops.propagate(g, x1, num_layers).backward(go)
    reference.propagate(g, x2, num_layers).backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(torch.float32))


def test_cpu_isolated_nodes_and_hand_computed_values():
    # 2 users, 2 items, one edge (u0, i0): u1 and i1 are isolated. dinv = 1 on the edge's ends, so
    # x1[u0] = x[i0], x1[i0] = x[u0], x2 = x, and an isolated row keeps only its layer-0 term.
    g = BipartiteGraph.from_interactions(torch.tensor([[0, 0]]), 2, 2)
    x = torch.randn(4, 5)
    for k in (1, 2, 3):
        out = torch.ops.glrec.propagate(g.rowptr, g.col, g.dinv, x, k)
        layers_u0 = [x[0] if j % 2 == 0 else x[2] for j in range(k + 1)]
        torch.testing.assert_close(out[0], torch.stack(layers_u0).mean(0))
        torch.testing.assert_close(out[1], x[1] / (k + 1))
        torch.testing.assert_close(out[3], x[3] / (k + 1))


def test_cpu_zero_layers_returns_x():
    g = random_graph(*SIZES[97], seed=1)
    x = torch.randn(97, 59)
    out = torch.ops.glrec.propagate(g.rowptr, g.col, g.dinv, x, 0)
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    xg = x.clone().requires_grad_(True)
    ops.propagate(g, xg, 0).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones_like(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_nodes", [97, 1025])
@pytest.mark.parametrize("d", [59, 64])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_cpu_bfloat16_storage(num_nodes, d, num_layers):
    # bfloat16 in: layer tables kept in bfloat16, sums in float32 (isolated nodes, power-law rows,
    # odd widths, one to four layers). The error is a few bfloat16 roundings (2^-9 each), checked
    # against the float32 reference of the same bfloat16 input, values and gradients.
    g = random_graph(*SIZES[num_nodes], seed=2 + d + num_layers)
    x = torch.randn(num_nodes, d).to(torch.bfloat16)
    out = ops.propagate(g, x, num_layers)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference.propagate(g, x.float(), num_layers)) < 3e-3   # measured <= 1.8e-3
    go = torch.randn(num_nodes, d)
    xb = x.clone().requires_grad_(True)
    ops.propagate(g, xb, num_layers).float().backward(go)
    xf = x.float().requires_grad_(True)
    reference.propagate(g, xf, num_layers).backward(go)
    assert xb.grad.dtype == torch.bfloat16 and rel_err(xb.grad, xf.grad) < 3e-3


def test_cpu_deterministic_across_thread_counts():
    g = random_graph(*SIZES[1025], seed=3)
    x = torch.randn(1025, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.glrec.propagate(g.rowptr, g.col, g.dinv, x, 3)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.glrec.propagate(g.rowptr, g.col, g.dinv, x, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def _bad_propagate_inputs(g, x):
    """(what is wrong, argument the error must name, args for torch.ops.glrec.propagate)."""
    rp, col, dinv = g.rowptr, g.col, g.dinv
    bad_col = col.clone()
    bad_col[0] = x.size(0)
    return [
        ("rowptr too short", "rowptr", (rp[:-1], col, dinv, x, 2)),
        ("rowptr int32", "rowptr", (rp.int(), col, dinv, x, 2)),
        ("col float", "col", (rp, col.float(), dinv, x, 2)),
        ("col out of range", "col", (rp, bad_col, dinv, x, 2)),
        ("dinv float64", "dinv", (rp, col, dinv.double(), x, 2)),
        ("dinv too short", "dinv", (rp, col, dinv[:-1], x, 2)),
        ("x 1-d", "x", (rp, col, dinv, x[:, 0].contiguous(), 2)),
        ("x int", "x", (rp, col, dinv, x.long(), 2)),
        ("x not contiguous", "x", (rp, col, dinv, x.t().contiguous().t(), 2)),
        ("negative layers", "num_layers", (rp, col, dinv, x, -1)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_cpu_bad_input_raises_naming_the_argument(case):
    g = random_graph(*SIZES[97], seed=4)
    what, name, args = _bad_propagate_inputs(g, torch.randn(97, 8))[case]
    with pytest.raises(RuntimeError, match=name):
        torch.ops.glrec.propagate(*args)


def test_public_wrapper_bad_input():
    g = random_graph(*SIZES[97], seed=5)
    with pytest.raises(ValueError, match="x"):
        ops.propagate(g, torch.randn(96, 8), 2)
    with pytest.raises(ValueError, match="num_layers"):
        ops.propagate(g, torch.randn(97, 8), -1)
    with pytest.raises(ValueError, match="x"):
        ops.propagate(g, torch.randint(0, 3, (97, 8)), 2)
    with pytest.raises(ValueError, match="x"):
        ops.propagate(g, torch.randn(97, 8, device="meta"), 2)


# --------------------------------------------------------------------------- Triton kernel
# Interpreter cases: (name, num_nodes, d, num_layers, dtype, launch options). Each program is
# interpreted in numpy (~3 ms), so the 1025-node case runs one layer only. seg_len=8 splits every
# row of more than 8 neighbours into segments (the long-row path: partial slots + finishing launch).
INTERP_CASES = [
    ("n97_d59_k1", 97, 59, 1, "float32", {}),
    ("n97_d59_k4", 97, 59, 4, "float32", {}),
    ("n97_d64_k4_split", 97, 64, 4, "float32", {"seg_len": 8}),
    ("n97_d128_k1_split", 97, 128, 1, "float32", {"seg_len": 8}),
    ("n97_d128_k4", 97, 128, 4, "float32", {}),
    ("n97_d64_k2_sorted_unsplit", 97, 64, 2, "float32", {"seg_len": 0, "sort": True}),
    ("n1025_d64_k1", 1025, 64, 1, "float32", {}),
    ("n97_d59_k2_bf16_split_sorted", 97, 59, 2, "bfloat16", {"seg_len": 8, "sort": True}),
    ("n97_d64_k0", 97, 64, 0, "float32", {}),
]


def _kernel_case(kp, num_nodes, d, num_layers, dtype, device, **launch):
    """Forward and gradient of the Triton kernel vs the reference; returns relative errors."""
    nu, ni, ne = SIZES[num_nodes]
    g = random_graph(nu, ni, ne, seed=num_nodes * 7 + d + num_layers).to(device)
    x = torch.randn(num_nodes, d, device=device).to(dtype)
    out = kp.propagate(g.rowptr, g.col, g.dinv, x, num_layers, **launch)
    ref = reference.propagate(g, x, num_layers)
    # backward of the layer mean = the same propagation of the incoming gradient (symmetric operator)
    xr = x.float().clone().requires_grad_(True)
    go = torch.randn(num_nodes, d, device=device)
    reference.propagate(g, xr, num_layers).backward(go)
    grad = kp.propagate(g.rowptr, g.col, g.dinv, go.to(dtype).contiguous(), num_layers, **launch)
    # run-to-run bitwise equality: no atomics on the GPU; in the (sequential) interpreter it still
    # catches output rows the kernel leaves unwritten (torch.empty garbage differs between calls)
    again = kp.propagate(g.rowptr, g.col, g.dinv, x, num_layers, **launch)
    return {"fwd": rel_err(out, ref), "grad": rel_err(grad, xr.grad), "dtype_ok": out.dtype == x.dtype,
            "finite": bool(torch.isfinite(out).all()), "deterministic": bool(torch.equal(out, again))}


def _kernel_bad_inputs(kp, device):
    g = random_graph(*SIZES[97], seed=4).to(device)
    x = torch.randn(97, 8, device=device)
    found = {}
    for what, name, args in _bad_propagate_inputs(g, x):
        try:
            kp.propagate(*args)
            found[what] = (name, None)
        except (ValueError, RuntimeError) as e:
            found[what] = (name, str(e))
    return found


def _run_interpreter_cases():
    import kernels.propagate as kp
    res = {}
    for name, n, d, k, dt, launch in INTERP_CASES:
        try:
            res[name] = _kernel_case(kp, n, d, k, getattr(torch, dt), "cpu", **launch)
        except Exception as e:  # reported to the parent test, which fails on it
            res[name] = {"error": repr(e)}
    res["bad_inputs"] = _kernel_bad_inputs(kp, "cpu")
    return res


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in INTERP_CASES])
def test_triton_interpreted_matches_reference(interpreted, name):
    r = interpreted[name]
    assert "error" not in r, r.get("error")
    limit = 1e-5 if "bf16" not in name else 1e-2
    assert r["dtype_ok"] and r["finite"] and r["deterministic"]
    assert r["fwd"] < limit and r["grad"] < limit, r


def test_triton_interpreted_bad_input(interpreted):
    for what, (name, msg) in interpreted["bad_inputs"].items():
        assert msg is not None, f"{what}: no error raised"
        assert name in msg, f"{what}: error does not name {name!r}: {msg}"


def _cuda_kernels():
    try:
        import glrec_fast.kernels.propagate as kp
    except ImportError:  # not pip-installed: the repo's kernels/ folder
        import kernels.propagate as kp
    return kp


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_nodes", [97, 1025])
@pytest.mark.parametrize("d", [59, 64, 128])
@pytest.mark.parametrize("num_layers", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seg_len", [256, 8])
def test_triton_cuda_matches_reference(num_nodes, d, num_layers, dtype, seg_len):
    r = _kernel_case(_cuda_kernels(), num_nodes, d, num_layers, dtype, "cuda", seg_len=seg_len)
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert r["dtype_ok"] and r["finite"] and r["deterministic"] and r["fwd"] < limit and r["grad"] < limit, r


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_ops_autograd_and_bad_input():
    g = random_graph(*SIZES[1025], seed=9).to("cuda")
    x1 = torch.randn(1025, 64, device="cuda", requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    go = torch.randn(1025, 64, device="cuda")
    ops.propagate(g, x1, 3).backward(go)
    reference.propagate(g, x2, 3).backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for what, (name, msg) in _kernel_bad_inputs(_cuda_kernels(), "cuda").items():
        assert msg is not None and name in msg, (what, msg)


if __name__ == "__main__":  # the TRITON_INTERPRET=1 subprocess of the `interpreted` fixture
    print(json.dumps(_run_interpreter_cases()))


def test_symmetric_backward_baseline_equals_autograd():
    # reference.propagate_symmetric (the benchmarks' fair baseline) must be the same function with
    # the same gradient as autograd through torch.sparse.mm, isolated nodes included.
    g = random_graph(*SIZES[97], seed=11)
    x = torch.randn(97, 16, requires_grad=True)
    go = torch.randn(97, 16)
    reference.propagate(g, x, 3).backward(go)
    want = x.grad.clone()
    x.grad = None
    out = reference.propagate_symmetric(g, x, 3)
    out.backward(go)
    torch.testing.assert_close(out, reference.propagate(g, x.detach(), 3))
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


def test_symmetric_baseline_runs_its_products_in_the_matrix_dtype():
    """adj= of another dtype (bf16 on CUDA in the GPU suite; float64 here, which the CPU supports):
    the products run in that dtype, the layer sum in float32, the output in x's dtype, both ways."""
    g = random_graph(*SIZES[97], seed=12)
    adj64 = g.norm_adj().to(torch.float64)
    x = (torch.randn(97, 16) * 1e3).requires_grad_(True)
    go = torch.randn(97, 16)
    out = reference.propagate_symmetric(g, x, 3, adj=adj64)
    out.backward(go)
    h, want = x.detach().double(), x.detach().double().clone()
    for _ in range(3):
        h = torch.sparse.mm(adj64, h)
        want += h.float().double()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out, (want / 4).float(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(x.grad, reference.propagate_csr(None, None, None, go, 3, adj=adj64))
