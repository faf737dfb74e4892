#!/usr/bin/env python
"""Where the time of one propagate forward+backward goes on a GPU (Gowalla, d = 64, 3 layers):
host wall time vs GPU kernel time per call, ours vs the fair torch.sparse baseline, from
torch.profiler. Answers whether a gap is kernel time or host overhead (launches, Python).

    GLREC_DATA_DIR=... python bench/gpu_propagate_profile.py
"""
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import conftest as helpers  # noqa: E402
from glrec_fast import ops, reference  # noqa: E402

g = helpers.gowalla_graph().to("cuda")
x = torch.randn(g.num_nodes, 64, device="cuda", requires_grad=True)
go = torch.randn(g.num_nodes, 64, device="cuda")
providers = {"ours": lambda t: ops.propagate(g, t, 3),
             "torch.sparse symmetric": lambda t: reference.propagate_symmetric(g, t, 3)}
from glrec_fast.kernels import propagate as kp  # noqa: E402


def direct_pair(t):
    """The two Triton propagations a fwd+bwd runs, called directly: no autograd, no dispatcher."""
    kp.propagate(g.rowptr, g.col, g.dinv, t.detach(), 3)
    kp.propagate(g.rowptr, g.col, g.dinv, go, 3)


providers["ours, 2 direct Triton calls"] = direct_pair
for name, fn in providers.items():
    for pas in (("fwd+bwd",) if name.startswith("ours, 2") else ("fwd", "fwd+bwd")):
        def call():
            x.grad = None
            if pas == "fwd" or name.startswith("ours, 2"):
                with torch.no_grad():
                    fn(x)
            else:
                fn(x).backward(go)
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        n = 50
        t = time.perf_counter()
        for _ in range(n):
            call()
        host = (time.perf_counter() - t) / n
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ev) / 10 / 1e3
        print(f"{name:24s} {pas:8s} host issue {host * 1e3:7.3f} ms/call, wall {wall * 1e3:7.3f} ms/call, "
              f"GPU kernels {gpu:7.3f} ms/call", flush=True)
        if name == "ours" and pas == "fwd+bwd":
            print(ev.table(sort_by="self_cpu_time_total", row_limit=14))
