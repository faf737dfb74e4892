"""glrec::gated_fusion (+ backward) against reference.py autograd: the C++ CPU kernels (through
torch.ops.glrec and glrec_fast.ops), the Triton kernels under TRITON_INTERPRET=1 on CPU (in a
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

HAS_CUDA = torch.cuda.is_available()


def make_inputs(n, d, num_ctx, dtype=torch.float32, param_dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    eg = torch.randn(n, d, generator=gen).to(device, dtype)
    et = torch.randn(n, d, generator=gen).to(device, dtype)
    ctx = torch.randint(0, num_ctx, (n,), generator=gen).to(device)
    w = torch.randn(num_ctx, 2, d, generator=gen).to(device, param_dtype)
    b = torch.randn(num_ctx, d, generator=gen).to(device, param_dtype)
    return eg, et, ctx, w, b


def reference_grads(eg, et, ctx, w, b, go):
    """Forward and all four gradients of reference.gated_fusion through ordinary autograd (float32)."""
    leaves = [t.detach().float().requires_grad_(True) for t in (eg, et, w, b)]
    out = reference.gated_fusion(leaves[0], leaves[1], ctx, leaves[2], leaves[3])
    out.backward(go.float())
    return out, [t.grad for t in leaves]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


SHAPES = [(1, 64, 3), (97, 59, 3), (97, 128, 2), (1025, 64, 3), (1025, 59, 11), (300, 16, 1)]


@pytest.mark.parametrize("n,d,num_ctx", SHAPES)
def test_reference_closed_form_backward_matches_autograd(n, d, num_ctx):
    # reference.gated_fusion_backward serves every device without a kernel: it must equal autograd.
    eg, et, ctx, w, b = make_inputs(n, d, num_ctx, seed=n * 3 + d)
    go = torch.randn(n, d)
    _, want = reference_grads(eg, et, ctx, w, b, go)
    got = reference.gated_fusion_backward(go, eg, et, ctx, w, b)
    for g, r, name in zip(got, want, ("e_graph", "e_text", "gate_weight", "gate_bias")):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- C++ CPU kernels
def test_cpu_kernels_are_the_compiled_extension():
    import glrec_fast._C  # noqa: F401  (fails, not skips, when the extension is not built)
    report = ops.kernel_report()
    assert report["gated_fusion"]["CPU"] == "C++ (_C)"
    assert report["gated_fusion_backward"]["CPU"] == "C++ (_C)"


@pytest.mark.parametrize("n,d,num_ctx", SHAPES)
def test_cpu_forward_and_grads_match_reference(n, d, num_ctx):
    eg, et, ctx, w, b = make_inputs(n, d, num_ctx, seed=n + d)
    go = torch.randn(n, d)
    ref, ref_grads = reference_grads(eg, et, ctx, w, b, go)
    out = torch.ops.glrec.gated_fusion(eg, et, ctx, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
    for got, want, name in zip(grads, ref_grads, ("e_graph", "e_text", "gate_weight", "gate_bias")):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    # and through the public op with autograd
    leaves = [t.clone().requires_grad_(True) for t in (eg, et, w, b)]
    ops.gated_fusion(leaves[0], leaves[1], ctx, leaves[2], leaves[3]).backward(go)
    for leaf, want in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-4, atol=1e-4)


def test_cpu_hand_computed_gate():
    eg, et, ctx, w, b = make_inputs(50, 24, 3)
    w.zero_()
    b.zero_()  # g = sigmoid(0) = 1/2
    torch.testing.assert_close(torch.ops.glrec.gated_fusion(eg, et, ctx, w, b), (eg + et) / 2)
    b[1] = 40.0   # context 1: g -> 1, fused = e_graph
    b[2] = -40.0  # context 2: g -> 0, fused = e_text
    out = torch.ops.glrec.gated_fusion(eg, et, ctx, w, b)
    torch.testing.assert_close(out[ctx == 1], eg[ctx == 1])
    torch.testing.assert_close(out[ctx == 2], et[ctx == 2])
    # extreme logits stay finite and saturate (the polynomial exp is clamped)
    big = torch.ops.glrec.gated_fusion(eg * 1e4, et * 1e4, ctx, w + 1.0, b)
    assert torch.isfinite(big).all()


def test_cpu_mixed_dtypes():
    eg, et, ctx, w, b = make_inputs(97, 64, 3, dtype=torch.bfloat16)
    go = torch.randn(97, 64).to(torch.bfloat16)
    ref, ref_grads = reference_grads(eg, et, ctx, w, b, go)
    out = torch.ops.glrec.gated_fusion(eg, et, ctx, w, b)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    grads = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-2


def test_cpu_backward_deterministic_across_thread_counts():
    eg, et, ctx, w, b = make_inputs(5000, 64, 3)
    go = torch.randn(5000, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(one, many))


def _bad_fusion_inputs(device):
    """(what is wrong, argument the error must name, forward args)."""
    eg, et, ctx, w, b = make_inputs(40, 16, 3, device=device)
    bad_ctx = ctx.clone()
    bad_ctx[3] = 3
    return [
        ("e_text shape", "e_text", (eg, et[:, :8].contiguous(), ctx, w, b)),
        ("e_text dtype", "e_text", (eg, et.double(), ctx, w, b)),
        ("e_graph 1-d", "e_graph", (eg[:, 0].contiguous(), et[:, 0].contiguous(), ctx, w, b)),
        ("context int32", "context", (eg, et, ctx.int(), w, b)),
        ("context length", "context", (eg, et, ctx[:-1], w, b)),
        ("context out of range", "context", (eg, et, bad_ctx, w, b)),
        ("gate_weight shape", "gate_weight", (eg, et, ctx, w[:, :1].contiguous(), b)),
        ("gate_bias width", "gate_bias", (eg, et, ctx, w, b[:, :8].contiguous())),
        ("e_graph not contiguous", "e_graph", (eg.t().contiguous().t(), et, ctx, w, b)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_cpu_bad_input_raises_naming_the_argument(case):
    what, name, args = _bad_fusion_inputs("cpu")[case]
    with pytest.raises(RuntimeError, match=name):
        torch.ops.glrec.gated_fusion(*args)
    go = torch.randn(args[0].shape)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.glrec.gated_fusion_backward(go, *args)


def test_cpu_backward_grad_out_shape():
    eg, et, ctx, w, b = make_inputs(40, 16, 3)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.glrec.gated_fusion_backward(torch.randn(40, 8), eg, et, ctx, w, b)


def test_public_wrapper_bad_input():
    eg, et, ctx, w, b = make_inputs(40, 16, 3)
    with pytest.raises(ValueError, match="e_text"):
        ops.gated_fusion(eg, et[:30], ctx, w, b)
    with pytest.raises(ValueError, match="context"):
        ops.gated_fusion(eg, et, ctx + 3, w, b)
    with pytest.raises(ValueError, match="gate_weight"):
        ops.gated_fusion(eg, et, ctx, w[:, :1], b)
    with pytest.raises(ValueError, match="context"):
        ops.gated_fusion(eg, et, ctx.float(), w, b)


# --------------------------------------------------------------------------- Triton kernels
# (name, n, d, C, embedding dtype). C = 11 > MAX_STATIC_CONTEXTS takes the atomic reduction path.
INTERP_CASES = [
    ("n97_d59_c3", 97, 59, 3, "float32"),
    ("n1025_d64_c3", 1025, 64, 3, "float32"),
    ("n300_d128_c2", 300, 128, 2, "float32"),
    ("n1_d64_c3", 1, 64, 3, "float32"),
    ("n200_d59_c11_atomic", 200, 59, 11, "float32"),
    ("n97_d64_c3_bf16", 97, 64, 3, "bfloat16"),
    ("n0_d64_c3", 0, 64, 3, "float32"),
]


def _kernel_case(kf, n, d, num_ctx, dtype, device):
    eg, et, ctx, w, b = make_inputs(n, d, num_ctx, dtype=dtype, device=device, seed=n * 3 + d)
    go = torch.randn(n, d, device=device).to(dtype)
    ref, ref_grads = reference_grads(eg, et, ctx, w, b, go)
    out = kf.gated_fusion_forward(eg, et, ctx, w, b)
    grads = kf.gated_fusion_backward(go, eg, et, ctx, w, b)
    errs = {"fwd": rel_err(out, ref) if n else 0.0}
    for got, want, name in zip(grads, ref_grads, ("d_e_graph", "d_e_text", "d_gate_weight", "d_gate_bias")):
        errs[name] = rel_err(got, want) if n else float(got.abs().sum())
    errs["dtypes_ok"] = out.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == w.dtype
    errs["shapes_ok"] = [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (eg, et, w, b)]
    return errs


def _kernel_bad_inputs(kf, device):
    found = {}
    for what, name, args in _bad_fusion_inputs(device):
        for fn_name, fn, call_args in (("forward", kf.gated_fusion_forward, args),
                                       ("backward", kf.gated_fusion_backward,
                                        (torch.randn(args[0].shape, device=device), *args))):
            try:
                fn(*call_args)
                found[f"{what} ({fn_name})"] = (name, None)
            except (ValueError, RuntimeError) as e:
                found[f"{what} ({fn_name})"] = (name, str(e))
    return found


def _run_interpreter_cases():
    import kernels.gated_fusion as kf
    res = {}
    for name, n, d, c, dt in INTERP_CASES:
        try:
            res[name] = _kernel_case(kf, n, d, c, getattr(torch, dt), "cpu")
        except Exception as e:  # reported to the parent test, which fails on it
            res[name] = {"error": repr(e)}
    res["bad_inputs"] = _kernel_bad_inputs(kf, "cpu")
    return res


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_case(r, bf16):
    assert "error" not in r, r.get("error")
    assert r["dtypes_ok"] and r["shapes_ok"], r
    limit = 1e-2 if bf16 else 1e-5
    for key in ("fwd", "d_e_graph", "d_e_text"):
        assert r[key] < limit, (key, r)
    # weight/bias gradients are float32 reductions over rows
    assert r["d_gate_weight"] < 1e-4 and r["d_gate_bias"] < 1e-4, r


@pytest.mark.parametrize("name", [c[0] for c in INTERP_CASES])
def test_triton_interpreted_matches_reference(interpreted, name):
    _assert_case(interpreted[name], bf16="bf16" in name)


def test_triton_interpreted_bad_input(interpreted):
    for what, (name, msg) in interpreted["bad_inputs"].items():
        assert msg is not None, f"{what}: no error raised"
        assert name in msg, f"{what}: error does not name {name!r}: {msg}"


def _cuda_kernels():
    try:
        import glrec_fast.kernels.gated_fusion as kf
    except ImportError:  # not pip-installed: the repo's kernels/ folder
        import kernels.gated_fusion as kf
    return kf


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n,d,num_ctx", SHAPES + [(70000, 64, 3), (4097, 96, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(n, d, num_ctx, dtype):
    _assert_case(_kernel_case(_cuda_kernels(), n, d, num_ctx, dtype, "cuda"), bf16=dtype == torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_ops_autograd_deterministic_and_bad_input():
    eg, et, ctx, w, b = make_inputs(20000, 64, 3, device="cuda")
    go = torch.randn(20000, 64, device="cuda")
    _, ref_grads = reference_grads(eg, et, ctx, w, b, go)
    leaves = [t.clone().requires_grad_(True) for t in (eg, et, w, b)]
    ops.gated_fusion(leaves[0], leaves[1], ctx, leaves[2], leaves[3]).backward(go)
    for leaf, want in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-4, atol=1e-4)
    first = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
    again = torch.ops.glrec.gated_fusion_backward(go, eg, et, ctx, w, b)
    assert all(torch.equal(a, c) for a, c in zip(first, again))  # partial sums, no atomics at C = 3
    for what, (name, msg) in _kernel_bad_inputs(_cuda_kernels(), "cuda").items():
        assert msg is not None and name in msg, (what, msg)


if __name__ == "__main__":  # the TRITON_INTERPRET=1 subprocess of the `interpreted` fixture
    print(json.dumps(_run_interpreter_cases()))
