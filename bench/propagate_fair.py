"""Gowalla propagate (3 layers, d=64, 2 threads), forward and forward+backward: ours (float32, and
bfloat16 layer tables) against the fair torch.sparse baseline (reference.propagate /
reference.propagate_symmetric), the providers interleaved call by call for 25 rounds (3 warm-up),
so that a drifting shared machine slows each alike. Medians and interquartile ranges; writes
bench/results/propagate_fair.json.

    python bench/propagate_fair.py
"""
import os
import time, torch, statistics, json
import glrec_fast as gl
from glrec_fast import ops, reference
torch.set_num_threads(2)
ds = gl.load_dataset("gowalla")
g = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
g.norm_adj()
x = torch.randn(g.num_nodes, 64); xb = x.to(torch.bfloat16); go = torch.randn(g.num_nodes, 64); gob = go.to(torch.bfloat16)
def fb(fn, x0, gg):
    xx = x0.clone().requires_grad_(True)
    def step():
        xx.grad = None
        fn(xx).backward(gg)
    return step
fwd = {"torch": lambda: reference.propagate(g, x, 3), "ours": lambda: ops.propagate(g, x, 3),
       "ours_bf16": lambda: ops.propagate(g, xb, 3)}
fwdbwd = {"torch_symmetric": fb(lambda v: reference.propagate_symmetric(g, v, 3), x, go),
          "ours": fb(lambda v: ops.propagate(g, v, 3), x, go),
          "ours_bf16": fb(lambda v: ops.propagate(g, v, 3), xb, gob)}
out = {}
for label, fns in (("fwd", fwd), ("fwdbwd", fwdbwd)):
    times = {k: [] for k in fns}
    for r in range(25):
        for k, fn in fns.items():
            if label == "fwd":
                with torch.no_grad():
                    a = time.perf_counter(); fn(); t = time.perf_counter() - a
            else:
                a = time.perf_counter(); fn(); t = time.perf_counter() - a
            if r >= 3: times[k].append(t * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: (round(sorted(v)[len(v)//4],1), round(sorted(v)[3*len(v)//4],1)) for k, v in times.items()}
    base = med["torch"] if label == "fwd" else med["torch_symmetric"]
    for k in fns:
        print(f"{label:7s} {k:16s} median {med[k]:6.1f} ms  IQR {q[k]}  ratio {base/med[k]:.2f}x")
    out[label] = {"median_ms": med, "iqr_ms": q}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "propagate_fair.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", path)
