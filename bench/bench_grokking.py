"""GrokkingMonitor.observe() cost next to one training step.

    pytest bench/bench_grokking.py --benchmark-only -q -s

Training step: the real ml-100k hybrid (FusedHybridRec on the ml-100k random split's training
graph: LightGCN branch d=64 with 3 layers, a 384 -> 128 -> 64 text projector over frozen content
vectors (random here: the step's cost does not depend on their values; MiniLM gives 384 dims),
gated fusion, cold-start simulation and auxiliary losses), one BPR step on a batch of 2048
(user, positive, negative) triples with Adam. Falls back to a stand-in of the same size when
ml-100k is not in GLREC_DATA_DIR.
observe(): a three-branch monitor (graph, text, fused) fed 0-dim device tensors for the training
loss, the validation metric and the weight norm, as train.py does once per evaluation.
Providers: ``reference`` (the pure-torch update: ~150 elementwise ops, GLREC_BACKEND=reference) and
``ours`` (torch.ops.glrec.grokking_observe: the compiled C++ kernel on CPU). The observe rows carry
``train_step_ms`` (measured in the same test, interleaved) and ``observe_pct_of_step``.
"""
import pytest
import torch
from torch import nn

from glrec_fast import _backend
from glrec_fast.grokking import GrokkingMonitor

from conftest import DEVICES, record, run_pedantic, wall_median

NUM_USERS, NUM_ITEMS, DIM, CONTENT_DIM, BATCH = 943, 1682, 64, 384, 2048


class HybridSized(nn.Module):
    """Embedding + text-projector + gate at the ml-100k hybrid's size (not the real model)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ego = nn.Embedding(NUM_USERS + NUM_ITEMS, DIM)
        self.register_buffer("content", torch.randn(NUM_USERS + NUM_ITEMS, CONTENT_DIM, generator=g))
        self.projector = nn.Sequential(nn.Linear(CONTENT_DIM, 128), nn.GELU(), nn.Linear(128, DIM))
        self.gate = nn.Parameter(torch.zeros(3, DIM))

    def embed(self, rows):
        eg, et = self.ego(rows), self.projector(self.content[rows])
        g = torch.sigmoid(self.gate[0] * eg + self.gate[1] * et + self.gate[2])
        return g * eg + (1 - g) * et

    def loss(self, users, pos, neg):
        u, p, n = self.embed(users), self.embed(pos + NUM_USERS), self.embed(neg + NUM_USERS)
        return -nn.functional.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()


def _real_hybrid():
    try:
        from glrec_fast import BipartiteGraph, FusedHybridRec, load_dataset
        ds = load_dataset("ml-100k", split="random", seed=0)
    except FileNotFoundError:
        return None
    g = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    content = torch.randn(ds.num_items, CONTENT_DIM, generator=torch.Generator().manual_seed(0))
    return FusedHybridRec(g, content, dim=DIM, num_layers=3)


def make_train_step(device):
    torch.manual_seed(0)
    real = _real_hybrid()
    model = (real if real is not None else HybridSized()).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        users = torch.randint(0, NUM_USERS, (BATCH,), device=device, generator=g)
        pos = torch.randint(0, NUM_ITEMS, (BATCH,), device=device, generator=g)
        neg = torch.randint(0, NUM_ITEMS, (BATCH,), device=device, generator=g)
        loss = model.loss(users, pos, neg, 1e-4)[0] if real is not None else model.loss(users, pos, neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def make_observe(device):
    mon = GrokkingMonitor(["graph", "text", "fused"]).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    vals = torch.rand(64, 3, 3, device=device, generator=g)   # pre-made 0-dim inputs, cycled
    inputs = [({"graph": v[0, 0], "text": v[0, 1], "fused": v[0, 2]}, {"graph": v[1, 0], "text": v[1, 1], "fused": v[1, 2]},
               {"graph": v[2, 0] + 10, "text": v[2, 1] + 10, "fused": v[2, 2] + 10}) for v in vals]
    state = {"t": 0}

    def observe():
        t = state["t"]
        tl, vm, wn = inputs[t % len(inputs)]
        mon.observe(t, tl, vm, wn)
        state["t"] = t + 1
    return observe


@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device):
    step = make_train_step(device)
    for _ in range(3):
        step()
    run_pedantic(benchmark, step, device, rounds=30, warmup=2)
    record(benchmark, batch=BATCH, threads=torch.get_num_threads())


@pytest.mark.parametrize("provider", ["reference", "ours"])
@pytest.mark.parametrize("device", DEVICES)
def test_observe(benchmark, device, provider, monkeypatch):
    if provider == "ours" and torch.device(device).type == "cpu" and not _backend.extension_has("grokking_observe", "CPU"):
        pytest.skip("glrec_fast._C has no grokking_observe CPU kernel (pip install --no-build-isolation -e .)")
    monkeypatch.setenv("GLREC_BACKEND", "reference" if provider == "reference" else "auto")
    observe = make_observe(device)
    step = make_train_step(device)
    for _ in range(20):
        observe()
    step_before = wall_median(step, reps=10, device=device)
    run_pedantic(benchmark, observe, device, rounds=2000, warmup=20)
    step_after = wall_median(step, reps=10, device=device)
    step_s = (step_before + step_after) / 2
    median = benchmark.stats.stats.median
    record(benchmark, train_step_ms=round(step_s * 1e3, 3), observe_us=round(median * 1e6, 1),
           observe_pct_of_step=round(100 * median / step_s, 3), threads=torch.get_num_threads())
    print(f"\n[grokking] {device} {provider}: observe {median * 1e6:.1f} us, train step {step_s * 1e3:.2f} ms "
          f"-> {100 * median / step_s:.2f}% of a step")
