"""Mini-batch (neighbour-sampled) training at scale: epoch time, test metrics and peak memory.

    python bench/sampled_scale.py --dataset gowalla --model graphsage --epochs 3
    python bench/sampled_scale.py --dataset synthetic --synthetic_interactions 20000000 --epochs 1 --batch_size 8192
    python bench/sampled_scale.py --dataset synthetic --synthetic_interactions 20000000 --batch_size 8192 --step_bench 20

Trains through ``glrec_fast.train.train`` (the CLI's code path) with ``--fanouts [10, 10]`` and
reports the process's peak resident memory (``ru_maxrss``), which includes data loading, the graph,
the model, sampling and the full-ranking evaluation.

``--step_bench N`` trains no epoch: it times N GraphSAGE BPR steps (sampling prefetched one batch
ahead, forward, backward, RowAdam) on the same batches for each way of forming a layer's input
``[h_self | mean of sampled neighbours]``, interleaved step by step in this one process (this
machine drifts): the library (layer 0 read off the ID table by ``ops.table_mean_concat``, the next
layer by ``ops.block_mean_concat``) and, each on a gathered copy of the block's ID rows, the same
compiled kernel (the library before commit 3d9f2c8), the sparse product with
a prebuilt transposed backward plus a slice and a cat (``sampling.aggregate``, the library until
this kernel), ``torch.sparse.mm`` with torch's own autograd (the strong plain-PyTorch form), and
the gather + ``index_add_`` of ``reference.block_mean_concat`` (the library until commit ae066ba),
and the library with its layers in bfloat16 (``--propagate_dtype bfloat16``). The process first
keeps freed heap memory, as training does (``glrec_fast.allocator``).
The sparse forms build their per-edge mean values (``1 / row count``) in the step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

import statistics

import torch

from glrec_fast import allocator, config, ops, reference, sampling, train
from glrec_fast.graph import BipartiteGraph


def _mean_matrices(rowptr, col, t_rowptr, t_col, h):
    """The block's mean aggregation as CSR matrices both ways (values ``1 / row count``)."""
    counts = rowptr.diff()
    inv = 1.0 / counts.clamp(min=1).to(h.dtype)
    n, m = rowptr.numel() - 1, t_rowptr.numel() - 1
    a = torch.sparse_csr_tensor(rowptr, col, inv.repeat_interleave(counts, output_size=col.numel()), (n, m))
    return n, a, torch.sparse_csr_tensor(t_rowptr, t_col, inv[t_col], (m, n))


def _float32_only(out_dtype):
    if out_dtype not in (None, torch.float32):
        raise ValueError(f"this provider computes in float32, not {out_dtype}")


def _sparse_product(h, *csr, out_dtype=None):
    _float32_only(out_dtype)
    n, a, at = _mean_matrices(*csr, h)
    return torch.cat([h[:n], sampling.aggregate(h, a, at)], 1)


def _torch_sparse(h, *csr, out_dtype=None):
    _float32_only(out_dtype)
    n, a, _ = _mean_matrices(*csr, h)
    return torch.cat([h[:n], torch.sparse.mm(a, h)], 1)   # torch's autograd for the dense operand


def _gather(h, *csr, out_dtype=None):
    _float32_only(out_dtype)
    return reference.block_mean_concat(*csr, h)


LIBRARY = "library (layer 0 off the table: table_mean_concat; then block_mean_concat)"
BF16 = "library, bfloat16 layers (--propagate_dtype bfloat16)"
# Every form but the library's builds layer 0 from a gathered copy of the block's ID rows.
PROVIDERS = {LIBRARY: ops.block_mean_concat,
             BF16: ops.block_mean_concat,
             "compiled block_mean_concat on a gathered copy of the ID rows (the library before 3d9f2c8)":
                 ops.block_mean_concat,
             "sparse product, prebuilt transposed backward, slice + cat": _sparse_product,
             "torch.sparse.mm, torch autograd, slice + cat": _torch_sparse,
             "gather + index_add_ (the form before ae066ba)": _gather}


def _on_gathered_rows(model):
    """``model`` with layer 0's input built by ``ops.block_mean_concat`` (whichever form is swapped in)
    from ``model.block_rows``, a gathered copy of the block's ID rows, instead of off the table."""
    def first_input(self, blocks, h0):
        return ops.block_mean_concat(self.block_rows(blocks) if h0 is None else h0,
                                     *blocks.mean_csr(self.num_layers - 1))
    model._first_input = types.MethodType(first_input, model)
    model.block_forward = types.MethodType(sampling.SampledTraining.block_forward, model)
    return model


def step_bench(over: dict, steps: int, warmup: int = 2) -> dict:
    """Median GraphSAGE step time per aggregation provider, interleaved step by step."""
    cfg = config.resolve([], overrides={**over, "out": os.devnull})
    torch.set_num_threads(int(cfg["num_threads"] or torch.get_num_threads()))
    allocator.keep_freed_memory()   # what training does first
    t0 = time.time()
    ds = train.load_data(cfg)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    build_s = time.time() - t0
    pairs = ds.train.long()
    keys = torch.sort(pairs[:, 0] * ds.num_items + pairs[:, 1]).values
    perm = torch.randperm(pairs.size(0), generator=torch.Generator().manual_seed(0))
    bs = cfg["batch_size"]

    def batch(j):
        p = pairs[perm[j * bs:(j + 1) * bs]]
        return p[:, 0], p[:, 1], train.sample_negatives(p[:, 0], ds.num_items, keys,
                                                         torch.Generator().manual_seed(j))

    runs = {}
    for name in PROVIDERS:
        torch.manual_seed(0)
        model = train.build_model({**cfg, "propagate_dtype": "bfloat16" if name == BF16 else "float32"},
                                  ds, graph, torch.device("cpu"))
        if name not in (LIBRARY, BF16):
            _on_gathered_rows(model)
        runs[name] = (model, train._optimizer(model, cfg), [])
    batches = [batch(j) for j in range(warmup + steps + 1)]
    for j in range(warmup + steps):
        for name, fn in PROVIDERS.items():
            model, opt, times = runs[name]
            ops.block_mean_concat = fn
            t = time.perf_counter()
            model.prefetch(*batches[j + 1])
            loss, _ = model.loss(*batches[j], cfg["reg_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if j >= warmup:
                times.append(time.perf_counter() - t)
    ops.block_mean_concat = PROVIDERS[LIBRARY]
    out = {"build_s": build_s, "batch_size": bs, "steps": steps, "providers": {}}
    base = statistics.median(runs[next(iter(PROVIDERS))][2])
    for name, (_, _, times) in runs.items():
        med = statistics.median(times)
        out["providers"][name] = {"median_step_s": med, "triples_per_s": bs / med, "library_speedup": med / base}
        print(f"{name:50s} {med * 1000:8.1f} ms/step {bs / med:10,.0f} triples/s  library {med / base:.2f}x",
              flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gowalla")
    ap.add_argument("--model", default="graphsage", choices=["graphsage", "lightgcn"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--synthetic_interactions", type=int, default=None)
    ap.add_argument("--step_bench", type=int, default=0, metavar="N",
                    help="time N steps per aggregation provider instead of training an epoch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    over = dict(dataset=args.dataset, model=args.model, sampled=True, fanouts=[10, 10], epochs=args.epochs,
                eval_every=args.epochs, batch_size=args.batch_size, lr=args.lr, grokking=False, patience=0)
    if args.synthetic_interactions:
        n = args.synthetic_interactions
        over.update(synthetic_interactions=n, synthetic_users=max(2000, n // 100), synthetic_items=max(1000, n // 200))
    if args.step_bench:
        if args.model != "graphsage":
            ap.error("--step_bench times GraphSAGE steps; use --model graphsage")
        res = {"args": vars(args), **step_bench(over, args.step_bench)}
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        _write(args, res, "steps_")
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = train.train(config.resolve([], overrides={**over, "out": out}))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    epochs = [h["epoch_time_s"] for h in r["history"]]
    res = {"args": vars(args), "dataset": r["dataset"], "commit": _commit(),
           "load_time_s": r["load_time_s"], "epoch_times_s": epochs,
           "triples_per_s": [r["train_pairs"] / t for t in epochs],
           "validation_eval_times_s": [h.get("eval_time_s") for h in r["history"]],
           "report_eval_time_s": r["report_eval_time_s"],
           "test": {k: r["test"][k] for k in ("recall@20", "ndcg@20")}, "peak_rss_gib": peak_gib,
           "wall_s": time.time() - t0}
    print(json.dumps(res, indent=1))
    _write(args, res)
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _write(args, res: dict, prefix: str = "") -> None:
    size = f"_{args.synthetic_interactions}" if args.synthetic_interactions else ""
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     f"sampled_{prefix}{args.model}_{args.dataset}{size}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
