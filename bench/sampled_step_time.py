"""Median time of a sampled GraphSAGE training step, for comparing commits on the same data.

    python bench/sampled_step_time.py --synthetic_interactions 20000000 --steps 12
    PYTHONPATH=/path/to/older/checkout python bench/sampled_step_time.py ...   # the same at another commit

Minor page faults and system time per step are the whole process's (``getrusage``). The bench
first does what training does (``glrec_fast.allocator.keep_freed_memory``); ``--system_malloc``
leaves glibc as configured, ``--no_prefetch`` samples each batch on the training thread.

One step is what the training loop does: the batch's pairs and BPR negatives, the next batch's
neighbourhood submitted to the sampler's worker thread, the loss, backward and the optimiser step
(``train.build_model`` and ``train._optimizer``: RowAdam with row-sparse tables). Only interfaces
that older commits share are used, so the script runs unchanged against them. Since commit 4aa77a5 the
training loop also builds the next batch (its BPR negatives) on the sampler's thread
(``prefetch_from``); this bench builds it on the training thread, as older commits did, so it times
a little more than a step of ``train.train`` does. ``bench/train_epoch_time.py`` times the loop itself.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

from glrec_fast import config, train
from glrec_fast.graph import BipartiteGraph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic_interactions", type=int, default=20_000_000)
    ap.add_argument("--batch_size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no_prefetch", action="store_true", help="sample each batch on the training thread")
    ap.add_argument("--propagate_dtype", default=None, choices=["float32", "bfloat16"],
                    help="GraphSAGE's layer dtype (unset: the commit's default; older commits have no such key)")
    ap.add_argument("--system_malloc", action="store_true",
                    help="leave glibc malloc's settings alone (training keeps freed memory, glrec_fast.allocator)")
    a = ap.parse_args(argv)
    n, bs = a.synthetic_interactions, a.batch_size
    cfg = config.resolve([], overrides=dict(
        dataset="synthetic", synthetic_interactions=n, synthetic_users=max(2000, n // 100),
        synthetic_items=max(1000, n // 200), model="graphsage", sampled=True, fanouts=[10, 10], num_layers=2,
        batch_size=bs, grokking=False, out="unused",
        **({"propagate_dtype": a.propagate_dtype} if a.propagate_dtype else {})))
    cfg = getattr(train, "resolve_lr", lambda c: c)(cfg)   # lr: null resolves per model (older commits: a number)
    torch.set_num_threads(int(cfg["num_threads"] or torch.get_num_threads()))
    if not a.system_malloc:
        try:   # what train() does first; older commits have no such module (an editable install of a
            from glrec_fast import allocator   # newer checkout can still supply it: not this commit's code)
            mine = os.path.dirname(allocator.__file__) == os.path.dirname(train.__file__)
        except ImportError:
            mine = False
        malloc = allocator.keep_freed_memory() if mine else "not in this commit"
    else:
        malloc = "system"
    ds = train.load_data(cfg)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    model = train.build_model(cfg, ds, graph, torch.device("cpu"))
    opt = train._optimizer(model, cfg)
    pairs = ds.train.long()
    keys = torch.sort(pairs[:, 0] * ds.num_items + pairs[:, 1]).values
    perm = torch.randperm(pairs.size(0), generator=torch.Generator().manual_seed(0))

    def batch(j):
        p = pairs[perm[j * bs:(j + 1) * bs]]
        return p[:, 0], p[:, 1], train.sample_negatives(p[:, 0], ds.num_items, keys, torch.Generator().manual_seed(j))

    times, faults, sys_s = [], [], []
    for j in range(a.warmup + a.steps):
        t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        users, pos, neg = batch(j)
        if not a.no_prefetch:
            model.prefetch(*batch(j + 1))
        loss, _ = model.loss(users, pos, neg, cfg["reg_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if j >= a.warmup:
            times.append(time.perf_counter() - t)
            ru2 = resource.getrusage(resource.RUSAGE_SELF)   # the whole process: the sampler's thread too
            faults.append(ru2.ru_minflt - ru.ru_minflt)
            sys_s.append(ru2.ru_stime - ru.ru_stime)
    med = statistics.median(times)
    print(json.dumps({"synthetic_interactions": n, "batch_size": bs, "steps": a.steps, "median_step_s": med,
                      "triples_per_s": bs / med, "median_minor_faults_per_step": statistics.median(faults),
                      "median_system_s_per_step": statistics.median(sys_s),
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "malloc": malloc, "torch": torch.__version__,
                      "propagate_dtype": cfg.get("propagate_dtype")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
