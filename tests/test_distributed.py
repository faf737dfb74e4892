"""Data-parallel training with real torch.distributed processes (torchrun, gloo on CPU) on ml-100k.

Each torchrun job here is a pair of real processes with one thread each; the module shares one
2-rank training run between the tests that read its output folder.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import need_dataset
from glrec_fast import distributed, metrics
from glrec_fast.train import load_export, recommend

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--dataset", "ml-100k", "--split", "random", "--model", "lightgcn", "--epochs", "2", "--device", "cpu",
       "--num_threads", "1", "--emb_dim", "32"]


def _env() -> dict:
    """A torchrun launcher's environment: this checkout importable, one thread per process."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_train(nproc: int, out, extra=()) -> subprocess.CompletedProcess:
    return torchrun(nproc, ["-m", "glrec_fast.train", *RUN, *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    need_dataset("ml-100k")
    out = tmp_path_factory.mktemp("dist2")
    proc = run_train(2, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def ml100k():
    need_dataset("ml-100k")
    from glrec_fast.data import load_dataset
    from glrec_fast.graph import BipartiteGraph
    ds = load_dataset("ml-100k", split="random", seed=0)
    return ds, BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)


# ----------------------------------------------------------------------------- in one process
def test_shards_partition_every_batch():
    for world in (1, 2, 3, 7):
        for start, stop in ((0, 10), (5, 6), (100, 2148)):
            parts = [distributed.Context(rank=r, world_size=world).shard(start, stop) for r in range(world)]
            got = [i for p in parts for i in range(p.start, p.stop)]
            assert got == list(range(start, stop))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_sampler_seeds_differ_by_rank_and_rank0_keeps_the_run_seed():
    seeds = [distributed.Context(rank=r, world_size=4).sample_seed(7) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [distributed.Context(rank=r, world_size=4).sample_seed(7) for r in range(4)]


def test_sharded_evaluation_is_bit_identical_to_one_process(ml100k):
    """Two shards whose sums are combined as an all-reduce would (rank 0's tensors added to rank 1's)
    give exactly the one-process metrics, on every key."""
    ds, graph = ml100k
    gen = torch.Generator().manual_seed(0)
    scorer = metrics.EmbeddingScorer(torch.randn(ds.num_users, 16, generator=gen),
                                     torch.randn(ds.num_items, 16, generator=gen))
    kw = dict(exclude=[ds.train, ds.valid], ks=(10, 20), item_context=graph.item_context, batch_size=97)
    whole = metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, **kw)
    first: list[torch.Tensor] = []
    metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, shard=(0, 2),
                     reduce=lambda t: first.append(t.clone()) or t, **kw)
    both = metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, shard=(1, 2),
                            reduce=lambda t: t + first.pop(0), **kw)
    assert both == whole
    alone = metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, shard=(1, 2), **kw)
    assert alone["n_users"] < whole["n_users"]   # a shard on its own is not the whole
    with pytest.raises(ValueError, match="shard"):
        metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, shard=(2, 2), **kw)


def test_exit_rank_flushes_and_keeps_the_exit_code(tmp_path):
    # A finished rank leaves with os._exit: what it printed and logged (block-buffered into pipes and
    # a file) must be out first, and the launcher must see the code main returned.
    code = ("import logging, sys\n"
            "from glrec_fast import distributed\n"
            f"logging.basicConfig(filename={str(tmp_path / 'rank.log')!r}, level=logging.INFO)\n"
            "logging.getLogger('x').info('logged line')\n"
            "print('printed line', end='')\n"
            "sys.stderr.write('stderr line')\n"
            "distributed.exit_rank(3)\n"
            "print('never')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONUNBUFFERED", None)   # block-buffered pipes, as under torchrun
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3
    assert proc.stdout == "printed line" and proc.stderr.endswith("stderr line")
    assert "logged line" in (tmp_path / "rank.log").read_text()


def test_idle_cpus_hint_names_the_threads_that_would_use_them():
    # torchrun's default of one thread per rank, 2 ranks on 16 CPUs: 14 idle
    assert distributed.idle_cpus_hint(16, 2, 1) == ("2 rank(s) of 1 torch thread(s) each use 2 of this machine's 16 "
                                                    "CPUs; --num_threads 8 gives each rank its share")
    assert distributed.idle_cpus_hint(2, 2, 1) is None and distributed.idle_cpus_hint(16, 2, 8) is None
    assert distributed.idle_cpus_hint(16, 4, 16) is None   # oversubscribed: not this hint's business


def test_peer_timeout_restates_collective_timeouts_only():
    ctx = distributed.Context(rank=1, world_size=2, backend="gloo")
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to "
                        "complete")
    said = distributed.peer_timeout(gloo, ctx, 0.1)
    assert isinstance(said, distributed.PeerTimeout)
    assert str(said).startswith("rank 1: a collective waited --dist_timeout=0.1 min for the other ranks and gave up "
                                "([gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms")
    nccl = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) "
                        "ran for 600000 milliseconds before timing out.")
    assert distributed.peer_timeout(nccl, ctx, 10.0) is not None
    assert distributed.peer_timeout(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ctx, 10.0) is None
    assert distributed.peer_timeout(gloo, distributed.Context(), 10.0) is None   # one process has no peers


def test_one_process_run_is_not_distributed(monkeypatch):
    for k in distributed.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    ctx, device = distributed.setup("cpu", 1.0)
    assert not ctx.active and ctx.is_main and device is None


# ----------------------------------------------------------------------------- torchrun, 2 ranks
def test_two_ranks_write_rank0_files_only(two_rank_run):
    out, proc = two_rank_run
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "data.pt", "last.pt", "metrics.json",
                                                     "train.log", "training_curves.png"]
    log = (out / "train.log").read_text()
    assert "distributed: 2 ranks, backend gloo" in log
    assert "[rank 0]" in log and "[rank 1]" not in log
    assert "[rank 1] glrec_fast.train: epoch" not in proc.stderr   # other ranks log warnings only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_launchers(args: list[str], outs: list, timeout: float = 240) -> tuple[list[int], list[str]]:
    """Two torchrun launchers, one process each, that meet through the c10d rendezvous (two machines'
    launch line, both on this one); launcher i trains into ``outs[i]``. Their exit codes and output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=glrec-test", "-m", "glrec_fast.train", *args]
    logs = [pathlib.Path(f"{o}.launcher{i}.log") for i, o in enumerate(outs)]
    with open(logs[0], "w") as a, open(logs[1], "w") as b:
        nodes = [subprocess.Popen([*cmd, "--out", str(o)], env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
                 for o, f in zip(outs, (a, b))]
        try:
            codes = [p.wait(timeout=timeout) for p in nodes]
        finally:
            for p in nodes:
                p.kill()
    return codes, [log.read_text() for log in logs]


def test_two_machines_by_rendezvous_train_what_one_launch_does(two_rank_run, tmp_path):
    """The README's multi-machine line, its two "machines" on this one: two torchrun launchers, one
    process each, meet through the c10d rendezvous. The 2-rank job they form writes its files once
    and reports the metrics of the same job launched by one torchrun, to every digit."""
    out, _ = two_rank_run
    codes, text = _two_launchers(RUN, [tmp_path / "nodes"] * 2)
    assert codes == [0, 0], text[0][-2000:] + text[1][-2000:]
    assert not any("will be ignored" in t for t in text)   # the README's flags are all used
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == sorted(p.name for p in out.iterdir())
    assert "distributed: 2 ranks, backend gloo" in (tmp_path / "nodes" / "train.log").read_text()
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "nodes", out))
    assert got["test"] == want["test"] and got["history"][-1]["loss"] == want["history"][-1]["loss"]


def test_two_rank_evaluation_equals_one_process_on_the_checkpoint(two_rank_run, ml100k):
    """metrics.json's test numbers (ranked by 2 ranks) equal a one-process evaluation of best.pt."""
    out, _ = two_rank_run
    ds, graph = ml100k
    ck = load_export(out / "best.pt")
    reported = json.loads((out / "metrics.json").read_text())["test"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the ranks ran one thread each: the same matrix products
    try:
        again = metrics.evaluate(metrics.EmbeddingScorer(ck["user_emb"], ck["item_emb"]), ds.test, ds.num_users,
                                 ds.num_items, exclude=[ds.train, ds.valid], ks=ck["config"]["topk"],
                                 item_context=graph.item_context, batch_size=ck["config"]["eval_batch_size"])
    finally:
        torch.set_num_threads(threads)
    assert again.keys() == reported.keys()
    for k, v in again.items():
        assert v == reported[k] or (v != v and reported[k] is None), k
    # The checkpoint serves recommend() in one process.
    recs = recommend(out / "best.pt", ck["user_ids"][:3], k=5)
    assert len(recs) == 3 and all(len(r) == 5 for r in recs)


def test_two_ranks_reach_one_process_quality(two_rank_run, tmp_path):
    out, _ = two_rank_run
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "glrec_fast.train", *RUN, "--out", str(one)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((out / "metrics.json").read_text())
    # Same global batches and the same averaged gradient: equal up to the all-reduce's float order.
    assert m1["epochs_run"] == m2["epochs_run"] == 2
    assert abs(m1["test"]["ndcg@20"] - m2["test"]["ndcg@20"]) < 0.005, (m1["test"], m2["test"])
    assert abs(m1["history"][-1]["loss"] - m2["history"][-1]["loss"]) < 0.005


def test_resume_needs_the_same_world_size(two_rank_run):
    out, _ = two_rank_run
    proc = subprocess.run([sys.executable, "-m", "glrec_fast.train", *RUN, "--epochs", "3", "--resume",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert "written by a run of 2 process(es)" in proc.stderr and "same world size (now 1)" in proc.stderr


def test_two_ranks_resume_where_they_stopped_and_only_from_one_checkpoint(two_rank_run, tmp_path):
    """A 2-rank run of 1 epoch resumed to 2 epochs reports what the unbroken 2-epoch run reports, to
    every digit. Ranks that find different checkpoints (two machines whose --out folders are not
    shared: one holds a newer last.pt) stop with one clear error instead of training apart."""
    out, _ = two_rank_run
    run = tmp_path / "run"
    first = run_train(2, run, extra=["--epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    stale = tmp_path / "stale"
    shutil.copytree(run, stale)   # what a second machine's own --out would still hold
    again = run_train(2, run, extra=["--epochs", "2", "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, out))
    assert got["test"] == want["test"] and [h["loss"] for h in got["history"]] == [h["loss"] for h in want["history"]]

    codes, text = _two_launchers([*RUN, "--epochs", "3", "--resume"], [run, stale])
    assert codes[0] != 0 and codes[1] != 0
    said = text[0] + text[1]
    assert "--resume: the ranks read different checkpoints" in said, said[-3000:]
    assert "(epoch 2, step" in said and "(epoch 1, step" in said   # rank 0 and rank 1's states, named
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2   # nothing trained or written


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    need_dataset("ml-100k")
    t = time.time()
    proc = torchrun(2, [str(REPO / "tests" / "dist_worker.py"), "raise", "1", "3", *RUN, "--epochs", "5",
                        "--out", str(tmp_path / "fail")], timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
    assert time.time() - t < 120
    assert not (tmp_path / "fail" / "metrics.json").exists()


def test_a_rank_that_hangs_ends_the_job_after_the_collective_timeout(tmp_path):
    """Rank 1 stops answering at step 3; rank 0's next collective gives up after --dist_timeout
    (0.1 min here) and the job ends with the reason, instead of waiting forever."""
    need_dataset("ml-100k")
    t = time.time()
    proc = torchrun(2, [str(REPO / "tests" / "dist_worker.py"), "hang", "1", "3", *RUN, "--epochs", "5",
                        "--dist_timeout", "0.1", "--out", str(tmp_path / "hang")], timeout=180)
    took = time.time() - t
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "injected failure" not in said   # the hung rank never got to raise: the job ended around it
    assert "glrec_fast.train: rank 0: a collective waited --dist_timeout=0.1 min for the other ranks" in said, said[-3000:]
    assert "exitcode  : 4" in said and "[rank0]: Traceback" not in said   # one line from the rank, no traceback
    assert took < 120, took
    assert not (tmp_path / "hang" / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_under_torchrun_without_cuda_is_a_clear_error(tmp_path):
    need_dataset("ml-100k")
    proc = run_train(1, tmp_path / "cuda", extra=["--device", "cuda"])
    assert proc.returncode != 0
    # One line from the rank (exit 2, no traceback from our code); the launcher then reports the exit.
    assert "glrec_fast.train: device: 'cuda' with torchrun, but torch sees no CUDA device; use --device cpu" in proc.stderr
    assert "distributed.py" not in proc.stderr and "exitcode  : 2" in proc.stderr


def test_row_sparse_gradients_are_averaged_over_ranks():
    proc = torchrun(2, [str(REPO / "tests" / "dist_rows_worker.py")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 rows synced" in proc.stdout and "rank 1 rows synced" in proc.stdout


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_two_rank_mf_matches_one_process(tmp_path, loss):
    """MF's tables are row-sparse (left out of DDP, synced by all-gather): 2 ranks must train the
    one-process model, up to the float order of the sums. The softmax shares each global batch's
    negatives over the ranks and adds the item-bias table to the synced rows."""
    need_dataset("ml-100k")
    extra = ["--model", "mf", "--grokking", "false", "--lr", "0.01", "--loss", loss]
    proc = run_train(2, tmp_path / "two", extra=extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "glrec_fast.train", *RUN, *extra, "--out", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert abs(h1["loss"] - h2["loss"]) < 1e-4, (h1, h2)
    assert abs(m1["test"]["ndcg@20"] - m2["test"]["ndcg@20"]) < 1e-3, (m1["test"], m2["test"])


@pytest.mark.parametrize("extra", [["--model", "hybrid"], ["--model", "hybrid", "--fusion", "gated"],
                                   ["--model", "lightgcn", "--sampled", "true"]],
                         ids=["hybrid-score", "hybrid-gated", "lightgcn-sampled"])
def test_every_trained_model_runs_on_two_ranks_at_one_process_quality(tmp_path, extra):
    """The default hybrid (a fitted filter branch and a trained text branch, mixed by score), the gated
    hybrid (one DDP model with two branches and the grokking monitor) and sampled LightGCN: under
    torchrun they train (rank 1 logging no epochs), and one epoch gives one process's test metrics:
    the hybrids' to every digit (same global batches, nothing drawn per rank), sampled LightGCN's
    within 0.005 ndcg@20 (each rank samples its own neighbourhoods)."""
    need_dataset("ml-100k")
    args = [*extra, "--epochs", "1"]
    two = run_train(2, tmp_path / "two", extra=args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1] glrec_fast.train: epoch" not in two.stderr
    one = subprocess.run([sys.executable, "-m", "glrec_fast.train", *RUN, *args, "--out", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert m1["model"] == m2["model"] == extra[1]
    if extra[1] == "hybrid":   # its branches draw nothing per rank: the one-process model, to every digit
        assert m1["test"] == m2["test"]
    else:
        assert abs(m1["test"]["ndcg@20"] - m2["test"]["ndcg@20"]) < 0.005, (m1["test"], m2["test"])


def test_sampled_training_is_deterministic_for_a_world_size(tmp_path):
    """GraphSAGE on 2 ranks (each rank samples with its own seed) twice: the same metrics."""
    need_dataset("ml-100k")
    extra = ["--model", "graphsage", "--epochs", "1", "--grokking", "false"]
    runs = []
    for name in ("a", "b"):
        proc = run_train(2, tmp_path / name, extra=extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["history"][0]["loss"] == runs[1]["history"][0]["loss"]
