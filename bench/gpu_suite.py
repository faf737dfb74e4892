#!/usr/bin/env python
"""GPU measurements for the kernels, in one process (<= 5 minutes on an H100/H200).

Builds nothing: run `pip install --no-build-isolation -e .` first. Then

    GLREC_DATA_DIR=/path/to/data python bench/gpu_suite.py      # OUT=dir also writes dir/gpu_suite.json
    python bench/gpu_suite.py --dry-run                         # tiny CPU tensors: exercises the table code

Sections (each in try/except: an error is printed and the suite goes on):
  1. device-to-device copy bandwidth (the roofline the GB/s columns are compared against)
  2. correctness of the Triton kernels vs glrec_fast.reference on CUDA, float32 and bfloat16
  3. propagate (3 layers, d = 64) forward and forward+backward: ours (Triton) vs the fair baseline
     (torch.sparse CSR with the matrix cached, symmetric backward, in the input's dtype: bf16 with
     bf16), torch.sparse through autograd, and PyG LGConv when installed; on Gowalla (GLREC_DATA_DIR) or a synthetic graph of Gowalla's
     size and skew, and on a 10M-interaction power-law graph; plus a tile/schedule sweep of ours
  4. gated_fusion forward and forward+backward: ours (Triton) vs the eager torch reference
  5. the neighbour sampler, if glrec_fast.ops.neighbor_sample has a CUDA kernel
Times are triton.testing.do_bench medians (ms). GB/s use bench/conftest.py's byte models.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import conftest as helpers  # noqa: E402  (bench helpers: graphs, byte models)
from glrec_fast import ops, reference  # noqa: E402

ROWS: list[dict] = []
CHECKS: list[dict] = []
SWEEP: list[dict] = []
ERRORS: list[str] = []
STATE: dict = {"copy_GBps": None}
NUM_LAYERS, DIM = 3, 64


# --------------------------------------------------------------------------- plumbing
def section(name):
    def deco(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            print(f"== {name}", flush=True)
            try:
                fn(*args, **kwargs)
            except Exception as e:  # keep going: one broken section must not hide the others
                traceback.print_exc()
                ERRORS.append(f"{name}: {e!r}")
            print(f"   ({time.time() - t0:.1f} s)", flush=True)
        return run
    return deco


def bench_ms(fn, device) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return helpers.wall_median(fn, reps=3, device=device) * 1e3


def add_row(section_name, case, provider, dtype, pas, ms, nbytes=None, baseline=None):
    row = {"section": section_name, "case": case, "provider": provider, "dtype": dtype, "pass": pas,
           "ms": round(ms, 4)}
    if nbytes:
        row["GB/s"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
        if STATE["copy_GBps"]:
            row["%copy"] = round(100 * row["GB/s"] / STATE["copy_GBps"], 1)
    if baseline is not None:
        row["baseline"] = baseline
    ROWS.append(row)
    print(f"   {case:14s} {provider:22s} {dtype:5s} {pas:8s} {ms:9.3f} ms"
          + (f"  {row['GB/s']:8.1f} GB/s" if "GB/s" in row else ""), flush=True)
    return row


def check(name, err, limit, extra=""):
    ok = bool(err == err and err < limit)  # NaN never passes
    CHECKS.append({"check": name, "rel_err": err, "limit": limit, "ok": ok})
    print(f"   {'ok  ' if ok else 'FAIL'} {name:48s} rel err {err:.2e} (< {limit:g}) {extra}", flush=True)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def speedups():
    """x vs the baseline provider of the same (section, case, pass, dtype): bf16 against bf16."""
    base = {}
    for r in ROWS:
        if r["provider"] == r.get("baseline"):
            base[(r["section"], r["case"], r["pass"], r["dtype"])] = r["ms"]
    for r in ROWS:
        if not r.get("baseline"):
            continue
        key = (r["section"], r["case"], r["pass"])
        b = base.get(key + (r["dtype"],))
        if b and r["ms"] > 0:
            r["x_vs_base"] = round(b / r["ms"], 2)


def print_table():
    speedups()
    cols = ["section", "case", "provider", "dtype", "pass", "ms", "GB/s", "%copy", "x_vs_base"]
    cells = [[str(r.get(c, "")) for c in cols] for r in ROWS]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print("\n" + "=" * len(line))
    print(f"device: {STATE.get('device')}   copy bandwidth: {STATE['copy_GBps']} GB/s (read + write)   "
          f"checks: {sum(c['ok'] for c in CHECKS)}/{len(CHECKS)} ok   errors: {len(ERRORS)}")
    print(f"x_vs_base = baseline ms / this ms, same dtype (baseline: {BASELINE} for propagate, reference for fusion)")
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for e in ERRORS:
        print("ERROR", e)


# --------------------------------------------------------------------------- sections
@section("copy bandwidth")
def copy_bandwidth(device, dry):
    n = (1 << 16) if dry else (1 << 28)  # 1 GiB of float32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    STATE["copy_GBps"] = round(2 * src.numel() * 4 / (ms * 1e-3) / 1e9, 1)
    print(f"   {2 * src.numel() * 4 / 1e9:.2f} GB moved in {ms:.3f} ms: {STATE['copy_GBps']} GB/s", flush=True)


def kernels_for(device):
    """The Triton host functions on CUDA; in a dry run the public ops (C++ on CPU) stand in."""
    if device == "cuda":
        from glrec_fast.kernels import gated_fusion as kf
        from glrec_fast.kernels import propagate as kp
        return kp, kf

    class _P:
        @staticmethod
        def propagate(rowptr, col, dinv, x, num_layers, **_):
            return torch.ops.glrec.propagate(rowptr, col, dinv, x, num_layers)

    class _F:
        gated_fusion_forward = staticmethod(torch.ops.glrec.gated_fusion)
        gated_fusion_backward = staticmethod(torch.ops.glrec.gated_fusion_backward)
    return _P, _F


@section("correctness vs reference")
def correctness(device, graphs):
    kp, kf = kernels_for(device)
    for name, g in graphs.items():
        for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            for d in (59, 64, 128):
                for k in (0, 1, 3):
                    for seg in ((64, 8) if name == "small" else (64,)):
                        x = torch.randn(g.num_nodes, d, device=device).to(dtype)
                        out = kp.propagate(g.rowptr, g.col, g.dinv, x, k, seg_len=seg)
                        again = kp.propagate(g.rowptr, g.col, g.dinv, x, k, seg_len=seg)
                        ref = reference.propagate(g, x, k)
                        tag = f"propagate {name} {str(dtype)[6:]} d={d} K={k} seg={seg}"
                        check(tag, rel_err(out, ref), limit,
                              "deterministic" if torch.equal(out, again) else "NOT DETERMINISTIC")
                        if not torch.equal(out, again):
                            CHECKS[-1]["ok"] = False
                if name != "small":
                    break  # one d on the big graphs
        # gradient through the public op (autograd = propagate of the gradient)
        x1 = torch.randn(g.num_nodes, DIM, device=device, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        go = torch.randn(g.num_nodes, DIM, device=device)
        ops.propagate(g, x1, NUM_LAYERS).backward(go)
        reference.propagate(g, x2, NUM_LAYERS).backward(go)
        check(f"propagate grad {name} float32 K=3", rel_err(x1.grad, x2.grad), 1e-5)
    for n, d, c in ((1025, 59, 3), (1 << 20, 64, 3), (4097, 96, 11)):
        for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            eg = torch.randn(n, d, device=device).to(dtype)
            et = torch.randn(n, d, device=device).to(dtype)
            ctx = torch.randint(0, c, (n,), device=device)
            w = torch.randn(c, 2, d, device=device)
            b = torch.randn(c, d, device=device)
            go = torch.randn(n, d, device=device).to(dtype)
            leaves = [t.float().requires_grad_(True) for t in (eg, et, w, b)]
            ref = reference.gated_fusion(leaves[0], leaves[1], ctx, leaves[2], leaves[3])
            ref.backward(go.float())
            out = kf.gated_fusion_forward(eg, et, ctx, w, b)
            grads = kf.gated_fusion_backward(go, eg, et, ctx, w, b)
            tag = f"gated_fusion n={n} d={d} C={c} {str(dtype)[6:]}"
            check(tag + " fwd", rel_err(out, ref), limit)
            for gname, got, leaf in zip(("d_eg", "d_et", "d_w", "d_b"), grads, leaves):
                check(f"{tag} {gname}", rel_err(got, leaf.grad), limit if gname in ("d_eg", "d_et") else 1e-4)
            if c <= 8:
                again = kf.gated_fusion_backward(go, eg, et, ctx, w, b)
                if not all(torch.equal(a, b_) for a, b_ in zip(grads, again)):
                    check(f"{tag} backward deterministic", 1.0, 0.5)


def _pyg_provider(g):
    from torch_geometric.nn import LGConv
    conv = LGConv(normalize=False)
    adj = g.norm_adj()

    def run(x):  # PyG's LightGCN.get_embedding, alpha = 1 / (K + 1)
        out = x / (NUM_LAYERS + 1)
        for _ in range(NUM_LAYERS):
            x = conv(x, adj)
            out = out + x / (NUM_LAYERS + 1)
        return out
    return run


BASELINE = "torch.sparse symmetric"


@section("propagate timings")
def propagate_timings(device, graphs, dry):
    for name, g in graphs.items():
        if name == "small":
            continue
        adj = {torch.float32: g.norm_adj()}   # cached, as LightGCN's code caches it
        adj[torch.bfloat16] = adj[torch.float32].to(torch.bfloat16)
        providers = {
            "ours": lambda x: ops.propagate(g, x, NUM_LAYERS),
            # the fair baseline in the input's dtype (bf16 with bf16), float32 layer sum, symmetric backward
            BASELINE: lambda x: reference.propagate_symmetric(g, x, NUM_LAYERS, adj=adj[x.dtype]),
            "torch.sparse autograd": lambda x: reference.propagate(g, x, NUM_LAYERS),
        }
        try:
            providers["pyg LGConv"] = _pyg_provider(g)
        except ImportError as e:
            print(f"   pyg skipped: {e!r}")
        nnz = int(g.col.numel())
        for dtype in (torch.float32, torch.bfloat16):
            for pname, fn in providers.items():
                if dtype == torch.bfloat16 and pname not in ("ours", BASELINE):
                    continue  # bf16 is compared with bf16 only
                try:
                    x = torch.randn(g.num_nodes, DIM, device=device).to(dtype)
                    nb = helpers.propagate_min_bytes(g.num_nodes, nnz, DIM, NUM_LAYERS, x.element_size())
                    with torch.no_grad():
                        ms = bench_ms(lambda: fn(x), device)
                    add_row("propagate", name, pname, str(dtype)[6:], "fwd", ms, nb, BASELINE)
                    xg = x.detach().clone().requires_grad_(True)
                    go = torch.randn(g.num_nodes, DIM, device=device).to(dtype)

                    def step():
                        xg.grad = None
                        fn(xg).backward(go)
                    ms = bench_ms(step, device)
                    add_row("propagate", name, pname, str(dtype)[6:], "fwd+bwd", ms, 2 * nb, BASELINE)
                except NotImplementedError as e:   # e.g. torch has no bf16 CSR product on this device
                    print(f"   {pname} {str(dtype)[6:]}: not available here ({e})")
                except Exception as e:
                    traceback.print_exc()
                    ERRORS.append(f"propagate {name} {pname} {dtype}: {e!r}")
        if device == "cuda" and not dry:
            sweep(name, g)


def sweep(name, g):
    """Tile configs and the schedule choices of ours (forward, float32): evidence for the defaults."""
    kp, _ = kernels_for("cuda")
    x = torch.randn(g.num_nodes, DIM, device="cuda")
    nb = helpers.propagate_min_bytes(g.num_nodes, int(g.col.numel()), DIM, NUM_LAYERS)
    configs = [dict(block_e=e, num_warps=w) for e, w in ((4, 1), (8, 1), (8, 2), (16, 1), (16, 2))]
    configs += [dict(sort=True), dict(seg_len=0), dict(seg_len=0, sort=True), dict(seg_len=64), dict(seg_len=1024)]
    default = kp.default_config(DIM)
    for cfg in configs:
        try:
            ms = bench_ms(lambda: kp.propagate(g.rowptr, g.col, g.dinv, x, NUM_LAYERS, **cfg), "cuda")
            entry = {"case": name, **cfg, "ms": round(ms, 4), "GB/s": round(nb / (ms * 1e-3) / 1e9, 1)}
            SWEEP.append(entry)
            print(f"   sweep {name:14s} {json.dumps(cfg):40s} {ms:8.3f} ms  (default tile {default})", flush=True)
        except Exception as e:
            ERRORS.append(f"sweep {name} {cfg}: {e!r}")
    x128 = torch.randn(g.num_nodes, 128, device="cuda")
    for cfg in (dict(), dict(block_e=8, num_warps=1), dict(block_e=8, num_warps=2), dict(block_e=16, num_warps=2)):
        try:
            ms = bench_ms(lambda: kp.propagate(g.rowptr, g.col, g.dinv, x128, NUM_LAYERS, **cfg), "cuda")
            SWEEP.append({"case": name, "d": 128, **cfg, "ms": round(ms, 4)})
            print(f"   sweep {name:14s} d=128 {json.dumps(cfg):34s} {ms:8.3f} ms  (default tile "
                  f"{kp.default_config(128)})", flush=True)
        except Exception as e:
            ERRORS.append(f"sweep {name} d=128 {cfg}: {e!r}")


@section("gated_fusion timings")
def fusion_timings(device, graphs, dry):
    cases = []
    for name, g in graphs.items():
        if name != "small":
            cases.append((f"{name} items", g.item_context.to(device), 3))
    n_big = 4096 if dry else 4_000_000
    cases.append((f"rand {n_big // 1000}k", torch.randint(0, 3, (n_big,), device=device), 3))
    for case, ctx, num_ctx in cases:
        n = ctx.numel()
        for dtype in (torch.float32, torch.bfloat16):
            eg = torch.randn(n, DIM, device=device).to(dtype)
            et = torch.randn(n, DIM, device=device).to(dtype)
            w = torch.randn(num_ctx, 2, DIM, device=device)
            b = torch.randn(num_ctx, DIM, device=device)
            go = torch.randn(n, DIM, device=device).to(dtype)
            es = eg.element_size()
            for pname, fn in (("ours", ops.gated_fusion), ("reference", reference.gated_fusion)):
                ms = bench_ms(lambda: fn(eg, et, ctx, w, b), device)
                add_row("gated_fusion", case, pname, str(dtype)[6:], "fwd", ms, helpers.fusion_min_bytes(n, DIM, es),
                        "reference")
                leaves = [t.detach().clone().requires_grad_(True) for t in (eg, et, w, b)]

                def step():
                    for t in leaves:
                        t.grad = None
                    fn(leaves[0], leaves[1], ctx, leaves[2], leaves[3]).backward(go)
                ms = bench_ms(step, device)
                add_row("gated_fusion", case, pname, str(dtype)[6:], "fwd+bwd", ms,
                        helpers.fusion_min_bytes(n, DIM, es, backward=True), "reference")


@section("neighbor sampler")
def sampler_timings(device, graphs):
    if not hasattr(ops, "neighbor_sample"):
        print("   skipped: glrec_fast.ops has no neighbor_sample")
        return
    served = ops.kernel_report().get("neighbor_sample", {}).get("CUDA" if device == "cuda" else "CPU", "none")
    if device == "cuda" and served != "CUDA (_C)":
        print(f"   skipped: the CUDA neighbor_sample kernel is {served!r}, not a compiled CUDA kernel")
        return
    for name, g in graphs.items():
        if name == "small":
            continue
        for fanouts in ([10, 10], [25, 10]):
            seeds = torch.randperm(g.num_users, device=device)[:1024]
            out = ops.neighbor_sample(g.rowptr, g.col, seeds, fanouts, seed=0)
            edges = sum(int(r.numel()) for r in out.rows)
            ms = bench_ms(lambda: ops.neighbor_sample(g.rowptr, g.col, seeds, fanouts, seed=0), device)
            row = add_row("neighbor_sample", name, f"ours {served}", "-", f"{fanouts}", ms, None, f"ours {served}")
            row["sampled_edges_per_s"] = round(edges / (ms * 1e-3))
            if device == "cuda":
                cpu_g = (g.rowptr.cpu(), g.col.cpu(), seeds.cpu())
                ms_cpu = bench_ms(lambda: ops.neighbor_sample(*cpu_g, fanouts, seed=0), "cpu")
                add_row("neighbor_sample", name, "CPU kernel (same op)", "-", f"{fanouts}", ms_cpu, None,
                        f"ours {served}")


# --------------------------------------------------------------------------- main
def build_graphs(device, dry):
    graphs = {}
    t = time.time()
    graphs["small"] = helpers.powerlaw_graph(400, 625, 4000, seed=1)  # 1025 nodes, split rows at seg=8
    if dry:
        graphs["tiny-powerlaw"] = helpers.powerlaw_graph(2000, 3000, 20_000, seed=2)
    else:
        gw = None
        try:
            gw = helpers.gowalla_graph()
        except Exception as e:  # a broken data folder must not stop the synthetic runs
            traceback.print_exc()
            ERRORS.append(f"gowalla: {e!r}")
        if gw is not None:
            graphs["gowalla"] = gw
        else:  # Gowalla's size and skew: 29,858 users, 40,981 items, 810,128 interactions
            print("   Gowalla not found (set GLREC_DATA_DIR): using a synthetic graph of its size")
            graphs["synth-gowalla"] = helpers.powerlaw_graph(29_858, 40_981, 810_128, seed=3)
        graphs["synthetic10m"] = helpers.synthetic_10m_graph()
    for name in list(graphs):
        graphs[name] = graphs[name].to(device) if device != "cpu" else graphs[name]
        print(f"   graph {name}: {helpers.degree_summary(graphs[name])}", flush=True)
    print(f"   graphs ready in {time.time() - t:.1f} s", flush=True)
    return graphs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU tensors, no Triton: checks the suite's own code")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: correctness,propagate,fusion,sampler")
    args = ap.parse_args()
    t0 = time.time()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device (use --dry-run on a CPU machine)")
    import triton
    STATE["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    STATE["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    STATE["kernels"] = ops.kernel_report()
    print(json.dumps(STATE), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    copy_bandwidth(device, args.dry_run)
    graphs = build_graphs(device, args.dry_run)
    if "correctness" not in skip:
        correctness(device, graphs)
    if "propagate" not in skip:
        propagate_timings(device, graphs, args.dry_run)
    if "fusion" not in skip:
        fusion_timings(device, graphs, args.dry_run)
    if "sampler" not in skip:
        sampler_timings(device, graphs)
    STATE["wall_s"] = round(time.time() - t0, 1)
    print_table()
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out) / "gpu_suite.json"
        path.write_text(json.dumps({**STATE, "checks": CHECKS, "rows": ROWS, "sweep": SWEEP, "errors": ERRORS},
                                   indent=1))
        print(f"wrote {path}")
    print(f"total {STATE['wall_s']} s")
    sys.exit(1 if ERRORS or not all(c["ok"] for c in CHECKS) else 0)


if __name__ == "__main__":
    main()
