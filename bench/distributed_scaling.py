"""Data-parallel scaling on one machine: 1 vs N torchrun processes, one thread each.

    python bench/distributed_scaling.py                          # Gowalla: LightGCN (full graph) and GraphSAGE (sampled)
    python bench/distributed_scaling.py --models graphsage --nprocs 1 2 --epochs 2 --repeats 2
    torchrun --standalone --nproc_per_node=2 bench/distributed_scaling.py --probe   # per-step costs every rank repeats
    python bench/distributed_scaling.py --ceiling --models graphsage --json bench/results/distributed_ceiling.json

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


def _cmd(model: str, nproc: int, epochs: int, dataset: str, out: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "glrec_fast.train", "--dataset", dataset, *MODELS[model], "--epochs", str(epochs),
            "--eval_every", str(epochs), "--grokking", "false", "--patience", "0", "--device", "cpu",
            "--num_threads", "1", "--out", out]


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


def probe(rows: int, dim: int) -> dict:
    """Fixed costs of one data-parallel step that do not shrink with the shard: the dense gradient
    of an embedding table of ``rows x dim`` (what indexing ``nn.Embedding`` rows gives), one Adam
    step over the whole table, and (under torchrun) the gloo all-reduce of that gradient. Medians of
    20 calls, ms."""
    import torch
    torch.set_num_threads(1)
    table = torch.nn.Parameter(torch.randn(rows, dim) * 0.1)
    opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.0)
    idx = torch.randint(0, rows, (3 * 8192,))

    def timed(fn):
        ts = []
        for _ in range(23):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[3:]) * 1e3

    def grad():
        table.grad = None
        table[idx].pow(2).sum().backward()
    out = {"rows": rows, "dim": dim, "dense_grad_ms": timed(grad), "adam_step_ms": timed(opt.step)}
    if "RANK" in os.environ:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        g = table.grad.clone()
        dist.barrier()
        out["allreduce_ms"] = timed(lambda: dist.all_reduce(g))
        out["world_size"] = dist.get_world_size()
        dist.destroy_process_group()
        if int(os.environ["RANK"]):
            return out
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gowalla")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; throughput is their median")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "distributed_scaling.json"))
    ap.add_argument("--ceiling", action="store_true", help="run 2 independent one-process trainings at once "
                    "and report their summed throughput over one alone: the machine's bound on a 2-rank speed-up")
    ap.add_argument("--probe", action="store_true", help="time the per-step costs that every rank repeats "
                    "(Gowalla-sized table); run under torchrun for the all-reduce too")
    args = ap.parse_args(argv)
    if args.probe:
        probe(29_858 + 40_981, 64)
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
