"""Data-parallel scaling on one machine: 1 vs N torchrun processes, one thread each.

    python bench/distributed_scaling.py                          # Gowalla: LightGCN (full graph) and GraphSAGE (sampled)
    python bench/distributed_scaling.py --models graphsage --nprocs 1 2 --epochs 2 --repeats 2
    python bench/distributed_scaling.py --frontier --frontier_steps 5   # why a rank's step does not halve
    python bench/distributed_scaling.py --frontier 8192 --dataset synthetic   # the same bound on issue 14's 20M graph
    python bench/distributed_scaling.py --ceiling --models graphsage --json bench/results/distributed_ceiling.json
    python bench/distributed_scaling.py --models graphsage --nprocs 2 --train_args="--propagate_dtype bfloat16"

Every run is ``torchrun --standalone --nproc_per_node=N -m glrec_fast.train`` (gloo, ``--device cpu
--num_threads 1``; one process is launched the same way, so it pays the same DDP machinery) with the
same global batch, seed and epochs; the runs go one after another, never side by side. Reported per
run (the median of ``--repeats`` interleaved runs): training triples per second (training pairs / the
epoch's wall time on rank 0, evaluation excluded; the first epoch is left out when there are
several), scaling efficiency (speed-up / N), the test metrics after the same number of epochs, and
the cores the job kept busy (CPU seconds of every process / wall seconds, whole run).
Results: bench/results/distributed_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

MODELS = {
    "lightgcn": ["--model", "lightgcn", "--batch_size", "8192", "--lr", "0.005"],
    "graphsage": ["--model", "graphsage", "--fanouts", "[10, 10]", "--batch_size", "8192", "--lr", "0.005"],
}


TRAIN_ARGS: list[str] = []   # --train_args: more glrec_fast.train options for every run


def _cmd(model: str, nproc: int, epochs: int, dataset: str, out: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "glrec_fast.train", "--dataset", dataset, *MODELS[model], "--epochs", str(epochs),
            "--eval_every", str(epochs), "--grokking", "false", "--patience", "0", "--device", "cpu",
            "--num_threads", "1", *TRAIN_ARGS, "--out", out]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _parse(model: str, nproc: int, epochs: int, out: str) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    times = [h["epoch_time_s"] for h in m["history"]]
    steady = times[1:] if len(times) > 1 else times
    found = re.search(r"train ([\d,]+)", m["dataset"])
    n_train = int(found.group(1).replace(",", "")) if found else None
    return {"model": model, "nproc": nproc, "epochs": epochs, "epoch_times_s": times,
            "triples_per_s": n_train / statistics.median(steady) if n_train else None, "n_train": n_train,
            "test": {k: m["test"][k] for k in ("recall@20", "ndcg@20")}}


def run(model: str, nproc: int, epochs: int, dataset: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = _cmd(model, nproc, epochs, dataset, out)
        t, ru = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO)
        wall = time.time() - t
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return dict(_parse(model, nproc, epochs, out), wall_s=wall, cores_busy=cpu / wall)


def ceiling(model: str, epochs: int, dataset: str, copies: int = 2) -> dict:
    """The most any data-parallel code could get here: ``copies`` independent one-process runs at
    once (no process group, no communication, nothing shared), each one thread. Their summed
    triples/s over one run alone bounds the speed-up of ``copies`` ranks on this machine."""
    alone = run(model, 1, epochs, dataset)
    with tempfile.TemporaryDirectory() as root:
        outs = [os.path.join(root, str(j)) for j in range(copies)]
        logs = [open(o + ".log", "w") for o in outs]
        procs = [subprocess.Popen(_cmd(model, 1, epochs, dataset, o), env=_env(), cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT) for o, log in zip(outs, logs)]
        for p, o, log in zip(procs, outs, logs):
            code = p.wait()
            log.close()
            if code:
                with open(o + ".log") as f:
                    raise SystemExit(f"a concurrent run failed:\n{f.read()[-4000:]}")
        each = [_parse(model, 1, epochs, o)["triples_per_s"] for o in outs]
    out = {"model": model, "copies": copies, "alone_triples_per_s": alone["triples_per_s"],
           "concurrent_triples_per_s": each, "ceiling_speedup": sum(each) / alone["triples_per_s"]}
    print(json.dumps(out), flush=True)
    return out


def _synthetic_shape(dataset: str, n: int) -> dict:
    """load_dataset's arguments for ``synthetic``: n interactions, users and items in the proportions of
    issue 14's 20M graph (bench/train_epoch_time.py)."""
    return (dict(num_users=max(2000, n // 100), num_items=max(1000, n // 200), num_interactions=n)
            if dataset == "synthetic" else {})


def frontier(dataset: str, batches: list[int], fanouts=(10, 10), steps: int = 0,
             synthetic_interactions: int = 20_000_000) -> list[dict]:
    """Why a rank's step does not shrink with its shard: the sampled neighbourhood of half a batch is
    most of the full batch's. For each global batch B: GraphSAGE's sampled edges and nodes for the
    first batch of an epoch as one process draws it, and for each of 2 ranks' halves (their own
    sampler seeds), and ``edge_bound`` = full edges / the larger half's (the 2-rank speed-up if a
    step cost only its sampled edges). With ``steps`` > 0 also the measured bound: the median time
    of a one-thread GraphSAGE softmax-free BPR step (forward + backward) on B over that on B/2."""
    import torch

    import glrec_fast as gl
    from glrec_fast.models.graphsage import GraphSAGE
    from glrec_fast.sampling import bpr_blocks
    torch.set_num_threads(1)
    ds = gl.load_dataset(dataset, **_synthetic_shape(dataset, synthetic_interactions))
    g = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    nodes = g.num_users + g.num_items
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(ds.train.size(0), generator=gen)
    model = GraphSAGE(g, dim=64, fanouts=list(fanouts)) if steps else None
    rows = []
    for b in batches:
        pairs = ds.train[perm[:b]]
        neg = torch.randint(0, g.num_items, (b,), generator=gen)
        parts = {"full": (slice(0, b), 1), "rank0": (slice(0, b // 2), 1), "rank1": (slice(b // 2, b), 2)}
        row = {"batch": b}
        for name, (sl, seed) in parts.items():
            bl = bpr_blocks(g, pairs[sl, 0], pairs[sl, 1], neg[sl], list(fanouts), seed=seed)
            row[name] = {"edges": bl.num_edges, "nodes": bl.sizes[-1], "node_share": bl.sizes[-1] / nodes}
        row["edge_bound"] = row["full"]["edges"] / max(row["rank0"]["edges"], row["rank1"]["edges"])
        if steps:
            def step_s(sl):
                ts = []
                for _ in range(steps + 1):
                    t = time.perf_counter()
                    model.loss(pairs[sl, 0], pairs[sl, 1], neg[sl], 0.0)[0].backward()
                    ts.append(time.perf_counter() - t)
                return statistics.median(ts[1:])
            row["step_s_full"], row["step_s_half"] = step_s(slice(0, b)), step_s(slice(0, b // 2))
            row["time_bound"] = row["step_s_full"] / row["step_s_half"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gowalla", help="a dataset name; --frontier also takes synthetic "
                    "(--synthetic_interactions, users and items in issue 14's proportions)")
    ap.add_argument("--synthetic_interactions", type=int, default=20_000_000)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; throughput is their median")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "distributed_scaling.json"))
    ap.add_argument("--ceiling", action="store_true", help="run 2 independent one-process trainings at once "
                    "and report their summed throughput over one alone: the machine's bound on a 2-rank speed-up")
    ap.add_argument("--frontier", type=int, nargs="*", default=None, metavar="BATCH",
                    help="no training: GraphSAGE's sampled edges for global batches (default 1024 .. 16384) and "
                    "for each of 2 ranks' halves, the bound they set on a 2-rank speed-up")
    ap.add_argument("--frontier_steps", type=int, default=0, help="--frontier: also time this many one-thread "
                    "GraphSAGE steps on the full and the half batch")
    ap.add_argument("--train_args", default="", help="more glrec_fast.train options for every run, one string "
                    "(e.g. --train_args=\"--propagate_dtype bfloat16\")")
    args = ap.parse_args(argv)
    TRAIN_ARGS[:] = shlex.split(args.train_args)
    if args.frontier is not None:
        res = frontier(args.dataset, args.frontier or [1024, 2048, 4096, 8192, 16384], steps=args.frontier_steps,
                       synthetic_interactions=args.synthetic_interactions)
        name = "distributed_frontier" + ("" if args.dataset == "gowalla" else f"_{args.dataset}")
        path = os.path.join(os.path.dirname(args.json), name + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"args": vars(args), "frontier": res, "commit": _commit()}, f, indent=1)
        return 0
    if args.ceiling:
        res = [ceiling(m, args.epochs, args.dataset) for m in args.models]
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ceiling": res, "commit": _commit()}, f, indent=1)
        return 0
    rows = []
    for model in args.models:
        runs = {n: [] for n in args.nprocs}
        for _ in range(args.repeats):   # 1, 2, 1, 2, ...: this shared VM drifts between minutes
            for n in args.nprocs:
                runs[n].append(run(model, n, args.epochs, args.dataset))
                print(json.dumps(runs[n][-1]), flush=True)
        for n in args.nprocs:
            r = dict(runs[n][0], repeats=runs[n],
                     triples_per_s=statistics.median(x["triples_per_s"] for x in runs[n]),
                     cores_busy=statistics.median(x["cores_busy"] for x in runs[n]))
            base = next((x for x in rows if x["model"] == model and x["nproc"] == 1), None)
            if base:
                r["speedup"] = r["triples_per_s"] / base["triples_per_s"]
                r["efficiency"] = r["speedup"] / n
            rows.append(r)
    print(f"\n{'model':10s} {'procs':>5s} {'triples/s':>10s} {'speed-up':>8s} {'effic.':>6s} "
          f"{'recall@20':>9s} {'ndcg@20':>8s} {'epoch s':>8s} {'cores busy':>10s}")
    for r in rows:
        print(f"{r['model']:10s} {r['nproc']:5d} {r['triples_per_s']:10.0f} {r.get('speedup', 1.0):8.2f} "
              f"{r.get('efficiency', 1.0):6.2f} {r['test']['recall@20']:9.4f} {r['test']['ndcg@20']:8.4f} "
              f"{statistics.median(r['epoch_times_s']):8.1f} {r['cores_busy']:10.2f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "commit": _commit()}, f, indent=1)
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
