"""Data-parallel training on torch.distributed: ``torchrun --nproc_per_node=N -m glrec_fast.train ...``.

A run is distributed when it is started by ``torchrun`` (the launcher sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); otherwise every function here is the identity
of a one-process run. What the training loop does with a :class:`Context`:

- one process group: gloo on CPU, NCCL on CUDA (each rank takes ``cuda:LOCAL_RANK``), with a
  collective timeout (``--dist_timeout`` minutes) so that a stuck peer ends the job instead of
  hanging it;
- the model wrapped in ``DistributedDataParallel`` (gradients all-reduced, averaged); embedding
  tables are replicated on every rank; tables read row by row (``Recommender.sparse_tables``) are
  left out of DDP and synchronised as row-sparse gradients (:func:`sync_row_grads`: an all-gather
  of the rows each rank touched, not an all-reduce of the whole table);
- each step's global batch (``--batch_size`` triples, the same permutation on every rank) split
  into ``world_size`` disjoint contiguous shards, one per rank, so that N ranks compute the same
  averaged gradient as one process (up to the reduction's float order);
- losses averaged over ranks every step (every rank sees the same loss, so divergence and the
  grokking monitor decide the same thing everywhere) and the time budget decided by rank 0;
- full-ranking evaluation sharded by user batches (``metrics.evaluate(shard=..., reduce=...)``),
  reduced exactly: each batch's sums come from one rank and are added in one process's order;
- files (logs, metrics.json, plots, checkpoints) written by rank 0 only.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass

import torch

from . import checkpoint

log = logging.getLogger("glrec_fast.train")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(ValueError):
    """The job as launched does not fit this machine or this run (device, world size, backend)."""


class PeerTimeout(RuntimeError):
    """A collective waited ``--dist_timeout`` minutes for the other ranks and gave up."""


def peer_timeout(e: BaseException, ctx: "Context", timeout_min: float) -> PeerTimeout | None:
    """``e`` restated for the user when it is a collective's timeout on a distributed run (gloo says
    "Timed out waiting ...", NCCL's watchdog "Watchdog caught collective operation timeout"); None
    for any other error."""
    text = str(e)
    if not ctx.active or not ("Timed out waiting" in text or "collective operation timeout" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return PeerTimeout(f"rank {ctx.rank}: a collective waited --dist_timeout={timeout_min:g} min for the other ranks "
                       f"and gave up ({first}). Another rank is stuck or has died: its log says which. If a step "
                       f"or an evaluation legitimately takes longer, raise --dist_timeout")


@dataclass(frozen=True)
class Context:
    """Who this process is in the job. ``Context()`` is the one-process run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None     # None: no process group (a plain one-process run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    # ------------------------------------------------------------------ collectives
    def average(self, loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict]:
        """The step's loss and loss parts averaged over ranks (one all-reduce)."""
        if not self.active:
            return loss, parts
        keys = list(parts)
        vals = torch.stack([loss.detach().float()] + [torch.as_tensor(parts[k], dtype=torch.float32,
                                                                       device=loss.device) for k in keys])
        torch.distributed.all_reduce(vals)
        vals /= self.world_size
        return vals[0], {k: vals[j + 1] for j, k in enumerate(keys)}

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision made on one clock, such as the time budget)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device_for_collectives)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce sum (the identity without a process group)."""
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    @property
    def device_for_collectives(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, start: int, stop: int) -> slice:
        """This rank's contiguous part of the global batch ``[start, stop)`` (sizes differ by <= 1)."""
        n = stop - start
        lo = start + (n * self.rank) // self.world_size
        hi = start + (n * (self.rank + 1)) // self.world_size
        return slice(lo, hi)

    def sample_seed(self, seed: int) -> int:
        """Rank-distinct sampler seed; rank 0 keeps the one-process seed."""
        if self.rank == 0:
            return int(seed)
        h = hashlib.blake2b(f"{seed}:{self.rank}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little", signed=True)

    def eval_shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.active and self.world_size > 1 else None

    def check_same_checkpoint(self, path: str, epoch: int, step: int) -> None:
        """Every rank resumed from the same bytes as rank 0 (a hash of ``path``, one all-gather; nothing
        on a one-process run); otherwise a LaunchError, on every rank, naming the ranks that read
        another file: ranks that resumed from different states would train apart without an error
        (the row-sparse tables and the optimiser state are never broadcast), or wait on each other
        at different steps."""
        if not self.active:
            return
        every: list = [None] * self.world_size
        torch.distributed.all_gather_object(every, (path, checkpoint.digest(path), int(epoch), int(step)))
        p0, d0, e0, s0 = every[0]
        odd = [f"rank {r} read {p!r} (epoch {e}, step {s})" for r, (p, d, e, s) in enumerate(every) if d != d0]
        if odd:
            raise LaunchError(f"--resume: the ranks read different checkpoints: rank 0 read {p0!r} (epoch {e0}, step "
                              f"{s0}), {'; '.join(odd)}. Every rank must resume from the same file: put --out on a "
                              f"filesystem every machine shares")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def launched() -> bool:
    """True when torchrun (or any launcher with the same environment) started this process."""
    return all(k in os.environ for k in ENV_KEYS)


def setup(device_name: str, timeout_min: float) -> tuple[Context, torch.device]:
    """Join the job torchrun started (if any) and choose this rank's device.

    ``device_name`` is the run's ``--device``: ``auto`` or ``cuda`` gives each rank
    ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, ``cpu`` (or ``auto`` without CUDA) gives
    gloo. Raises LaunchError naming what does not fit (more ranks on a node than CUDA devices, an
    explicit ``cuda:N`` with several ranks, CUDA asked for on a machine without it)."""
    if not launched():
        return Context(), None
    try:
        rank, world, local = (int(os.environ[k]) for k in ENV_KEYS)
    except ValueError as e:
        raise LaunchError(f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
    if not (0 <= rank < world and 0 <= local < world):
        raise LaunchError(f"torchrun environment: RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    name = str(device_name)
    want_cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise LaunchError(f"device: {name!r} with torchrun, but torch sees no CUDA device; use --device cpu (gloo)")
        if ":" in name and world > 1:
            raise LaunchError(f"device: {name!r} names one GPU, but {world} ranks each need their own; use "
                             f"--device cuda (rank r takes cuda:LOCAL_RANK)")
        n_dev = torch.cuda.device_count()
        if ":" not in name and local >= n_dev:
            raise LaunchError(f"torchrun started local rank {local} but this machine has {n_dev} CUDA device(s); "
                             f"use --nproc_per_node={n_dev} (one GPU per rank) or --device cpu")
        device = torch.device(name) if ":" in name else torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_available():
        raise LaunchError("torchrun: this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=float(timeout_min)), **kw)
    ctx = Context(rank=rank, world_size=world, local_rank=local, backend=backend)
    return ctx, device


def idle_cpus_hint(cpus: int, local_world: int, threads: int) -> str | None:
    """A line for the log when ``local_world`` ranks of ``threads`` torch threads each leave some of
    the machine's ``cpus`` idle (torchrun sets OMP_NUM_THREADS=1 for every rank unless told otherwise,
    so a 2-rank job on 16 CPUs runs 2 threads); None when they use them all."""
    if threads * local_world >= cpus:
        return None
    return (f"{local_world} rank(s) of {threads} torch thread(s) each use {threads * local_world} of this machine's "
            f"{cpus} CPUs; --num_threads {cpus // local_world} gives each rank its share")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def teardown(ctx: Context) -> None:
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_rank(code: int) -> None:
    """Ends a torchrun rank whose work is done (process group destroyed, every file written and
    closed) with ``code``, without the interpreter's native teardown: on the CPU build a finished
    rank aborted there in about one 2-rank run in a dozen ("terminate called without an active
    exception", after its results were written), and the launcher reported the job as failed.
    Logging and the standard streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken stream: nothing left to save
            pass
    os._exit(code)


class _Step(torch.nn.Module):
    """What DistributedDataParallel wraps: ``forward(kind, *args)`` calls ``model.<kind>(*args)``
    (``loss`` or ``softmax_loss``), so the loss methods run inside DDP's forward and their
    backward all-reduces the gradients."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, kind: str, *args):
        return getattr(self.model, kind)(*args)


def step_function(model: torch.nn.Module, ctx: Context, device: torch.device):
    """``(fn, sync_rows)``: ``fn(kind, *args) -> (loss, parts)`` runs the model's loss method, through
    DDP when distributed; ``sync_rows()``, called between ``backward`` and the optimiser step, sums the
    row-sparse gradients of ``model.sparse_tables()`` over ranks (DDP leaves those tables to it)."""
    sparse = [t.weight for t in model.sparse_tables()] if getattr(model, "row_sparse", False) else []
    if not ctx.active:
        return (lambda kind, *args: getattr(model, kind)(*args)), (lambda: None)
    sync_rows = (lambda: sync_row_grads(sparse, ctx)) if sparse else (lambda: None)
    from torch.nn.parallel import DistributedDataParallel as DDP
    step = _Step(model)
    sparse_ids = {id(p) for p in sparse}
    ignored = [n for n, p in step.named_parameters() if id(p) in sparse_ids]
    if len(ignored) == len(list(step.parameters())):   # every parameter is a row-sparse table (MF)
        return (lambda kind, *args: getattr(model, kind)(*args)), sync_rows
    DDP._set_params_and_buffers_to_ignore_for_model(step, ignored)
    ids = [device.index] if device.type == "cuda" else None
    # static_graph: a run's loss uses the same parameters every step, so DDP learns once which ones
    # a model leaves out (a branch at aux_weight 0, say); buffers (the grokking prior) are equal on
    # every rank by construction and need no sync per step.
    import inspect
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})   # torch >= 2.13 renamed the flag
    ddp = DDP(step, device_ids=ids, static_graph=True, **no_buffer_sync)
    return (lambda kind, *args: ddp(kind, *args)), sync_rows


def _dense_row_mean(p: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' mean row gradient through one dense all-reduce of the table's shape with one more
    column counting the ranks that touched each row: for steps that touch most of a table (GraphSAGE
    batches reach ~all nodes), where gathering every rank's row list and coalescing it costs a sort
    of world x rows. One collective, not two: the touched-row mask rides in the extra column."""
    d = vals.shape[1]
    buf = p.new_zeros((p.shape[0], d + 1))
    buf[:, :d].index_copy_(0, idx, vals)
    buf[:, d].index_fill_(0, idx, 1)
    torch.distributed.all_reduce(buf)
    rows = torch.nonzero(buf[:, d]).flatten()   # ascending: the gradient is coalesced by construction
    return torch.sparse_coo_tensor(rows.unsqueeze(0), buf[:, :d].index_select(0, rows) / world, p.shape,
                                   is_coalesced=True, check_invariants=False)   # in range by construction


def sync_row_grads(params: list[torch.Tensor], ctx: Context) -> None:
    """Replace each parameter's row-sparse gradient by the mean over ranks (DDP's convention).

    Each rank contributes the rows its shard touched: the (row ids, row gradients) of every rank
    are all-gathered (padded to the longest), so the bytes moved grow with the rows a step reads,
    not with the table. Every rank then holds the same coalesced gradient, summed in rank order.
    When the ranks' rows together reach half the table, a dense all-reduce of the table-shaped sum
    and a touched-row mask replaces the gather (about the same bytes, no sort of the row lists).
    Works on gloo and NCCL alike (plain dense collectives)."""
    world = ctx.world_size
    for p in params:
        g = p.grad
        if g is not None and not g.is_sparse:
            raise RuntimeError(f"sync_row_grads: a row-sparse table of shape {tuple(p.shape)} got a dense gradient; "
                               f"some training read used table.weight directly instead of Recommender.rows")
        if world == 1:
            continue   # one rank: its gradient is already the mean
        if g is None:
            idx, vals = torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros((0,) + p.shape[1:])
        else:
            g = g.coalesce()
            idx, vals = g.indices()[0], g.values()
        n = torch.tensor([idx.numel()], device=p.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        torch.distributed.all_gather(sizes, n)
        sizes = [int(x) for x in sizes]
        m = max(sizes)
        if world * m * 2 >= p.shape[0]:
            p.grad = _dense_row_mean(p, idx, vals, world)
            continue
        pad = m - idx.numel()
        idx_p = torch.cat([idx, idx.new_zeros(pad)])
        vals_p = torch.cat([vals, vals.new_zeros((pad,) + vals.shape[1:])])
        all_idx = [torch.empty_like(idx_p) for _ in range(world)]
        all_vals = [torch.empty_like(vals_p) for _ in range(world)]
        torch.distributed.all_gather(all_idx, idx_p)
        torch.distributed.all_gather(all_vals, vals_p)
        idx = torch.cat([t[:k] for t, k in zip(all_idx, sizes)])
        vals = torch.cat([t[:k] for t, k in zip(all_vals, sizes)]) / world
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, p.shape).coalesce()
