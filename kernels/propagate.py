"""Triton kernel for ``glrec::propagate`` (LightGCN layer mean) on CUDA.

Math (the same as csrc/propagate/propagate_cpu.cpp): carry the scaled table ``z_k = dinv * x_k``;
then per row ``s_i = sum_{j in N(i)} z_k[j]`` is a pure gather-add, ``x_{k+1}[i] = dinv[i] * s_i``
and ``z_{k+1}[i] = dinv[i]^2 * s_i``. One launch per layer does the sparse product, writes the next
scaled table and adds the layer into a float32 running sum; layer 1 gathers ``x`` with a ``dinv[j]``
factor (``z_0`` is never stored) and the last layer writes the mean in ``x``'s dtype. No per-edge
value array, no K+1 stored layer tables. bf16/fp16 ``x`` keeps ``z`` in that dtype (the gathers
are the traffic) and accumulates in float32.

Schedule (why power-law rows do not stall): the launch is a list of *work items*, one per row, except
that a row with more than ``seg_len`` (64) neighbours is cut into segments of at most 64 edges.
A program sums its item's edges in chunks of ``BLOCK_E`` neighbours (a ``[BLOCK_E, BLOCK_D]`` tile of
independent gathers in flight per iteration); a whole row finishes itself (epilogue above), a
segment writes its partial sum to a float32 scratch slot and a tiny second launch adds each long
row's slots in order and finishes it. So no program does more than 64 edges (Gowalla: the
1,415-neighbour row becomes 23 segments; 3,669 of 70,839 rows are split, 29% of the edges), small
one-warp tiles keep many programs per SM to hide the dependent rowptr -> col -> row load latency
of the short rows (median 13), and no atomics are used: results are bitwise deterministic.
Measured on an H100 (bench/gpu_suite.py sweep, 3 layers, d = 64, fp32 forward, 8x64 tile, 1 warp),
Gowalla / 10M-edge power-law graph: split at 64 in row order 0.248 / 4.72 ms; at 256: 0.260 / 4.74;
at 1024: 0.412 / 4.94; never split: 0.469 / 6.04 (the long rows straggle); split at 256 with the
longest items launched first (LPT, ``sort=True``): 0.242 / 5.26; LPT without split: 0.426 / 5.26.
cuSPARSE (torch.sparse CSR, matrix cached) on the same runs: 0.479 / 7.39 ms.

The schedule (and the one-off CSR validation, a host sync) depends only on ``rowptr``/``col``, so it
is cached per tensor pair: the cache holds the tensors, so their addresses cannot be reused by other
tensors while cached, and in-place edits bump ``_version`` and miss the cache (writes that bypass
autograd's version counter, e.g. through ``.data``, are not detected: build a new graph instead).

The host functions check their inputs and raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _finish_row(row, s, cols, cmask, d, dinv_ptr, x0_ptr, znext_ptr, acc_ptr, res_ptr, final_scale,
                FIRST: tl.constexpr, WRITE_Z: tl.constexpr, LAST: tl.constexpr):
    """Row epilogue given s = sum of the gathered (scaled) neighbour rows."""
    di = tl.load(dinv_ptr + row)
    out_offs = row * d + cols
    if WRITE_Z:
        tl.store(znext_ptr + out_offs, (di * di * s).to(znext_ptr.dtype.element_ty), mask=cmask)
    if FIRST:
        base = tl.load(x0_ptr + out_offs, mask=cmask, other=0.0).to(tl.float32)
    else:
        base = tl.load(acc_ptr + out_offs, mask=cmask, other=0.0)
    new = base + di * s
    if LAST:
        tl.store(res_ptr + out_offs, (new * final_scale).to(res_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(acc_ptr + out_offs, new, mask=cmask)


@triton.jit
def _propagate_layer_kernel(work_row_ptr, work_start_ptr, work_end_ptr, work_slot_ptr, col_ptr, dinv_ptr, src_ptr,
                            x0_ptr, znext_ptr, acc_ptr, res_ptr, part_ptr, final_scale, d,
                            FIRST: tl.constexpr, WRITE_Z: tl.constexpr, LAST: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """One work item: a whole row (slot < 0: sum + epilogue) or one segment of a long row (slot >= 0:
    the partial sum goes to part[slot], finished by _long_rows_kernel)."""
    pid = tl.program_id(0)
    row = tl.load(work_row_ptr + pid).to(tl.int64)
    start = tl.load(work_start_ptr + pid)
    end = tl.load(work_end_ptr + pid)
    slot = tl.load(work_slot_ptr + pid)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    # 2-d accumulator, reduced once after the loop: each iteration is pure loads + adds.
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for e in range(start, end, BLOCK_E):
        offs = e + tl.arange(0, BLOCK_E)
        emask = offs < end
        nbr = tl.load(col_ptr + offs, mask=emask, other=0).to(tl.int64)
        vals = tl.load(src_ptr + nbr[:, None] * d + cols[None, :], mask=emask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
        if FIRST:
            w = tl.load(dinv_ptr + nbr, mask=emask, other=0.0)
            vals = vals * w[:, None]
        acc += vals
    s = tl.sum(acc, axis=0)
    if slot < 0:
        _finish_row(row, s, cols, cmask, d, dinv_ptr, x0_ptr, znext_ptr, acc_ptr, res_ptr, final_scale,
                    FIRST, WRITE_Z, LAST)
    else:
        tl.store(part_ptr + slot.to(tl.int64) * d + cols, s, mask=cmask)


@triton.jit
def _long_rows_kernel(long_row_ptr, slot_ptr, part_ptr, dinv_ptr, x0_ptr, znext_ptr, acc_ptr, res_ptr, final_scale, d,
                      FIRST: tl.constexpr, WRITE_Z: tl.constexpr, LAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum a long row's segment partials in slot order (deterministic) and finish the row."""
    pid = tl.program_id(0)
    row = tl.load(long_row_ptr + pid).to(tl.int64)
    s0 = tl.load(slot_ptr + pid)
    s1 = tl.load(slot_ptr + pid + 1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    s = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(s0, s1):
        s += tl.load(part_ptr + k * d + cols, mask=cmask, other=0.0)
    _finish_row(row, s, cols, cmask, d, dinv_ptr, x0_ptr, znext_ptr, acc_ptr, res_ptr, final_scale,
                FIRST, WRITE_Z, LAST)


# --------------------------------------------------------------------------- host side
_SCHEDULES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_SCHEDULE_CACHE_SIZE = 4


def _check_inputs(rowptr, col, dinv, x, num_layers):
    op = "glrec::propagate"
    for name, t in (("rowptr", rowptr), ("col", col), ("dinv", dinv), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"{op}: num_layers must be an int >= 0, got {num_layers!r}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-d [num_nodes, d], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous")
    for name, t, dt in (("rowptr", rowptr, torch.int64), ("col", col, torch.int64), ("dinv", dinv, torch.float32)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != dt:
            raise ValueError(f"{op}: {name} must be {dt}, got {t.dtype}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous 1-d tensor, got shape {tuple(t.shape)}")
    n = x.size(0)
    if rowptr.numel() != n + 1:
        raise ValueError(f"{op}: rowptr must have x.size(0) + 1 = {n + 1} entries, got {rowptr.numel()}")
    if dinv.numel() != n:
        raise ValueError(f"{op}: dinv must have x.size(0) = {n} entries, got {dinv.numel()}")


def _validate_csr(rowptr, col, n):
    """One host sync for all CSR invariants (the kernel trusts them when it gathers)."""
    nnz = col.numel()
    flags = torch.stack([
        rowptr[0] != 0,
        rowptr[-1] != nnz,
        (rowptr[1:] < rowptr[:-1]).any() if n > 0 else torch.zeros((), dtype=torch.bool, device=rowptr.device),
        ((col < 0) | (col >= n)).any() if nnz else torch.zeros((), dtype=torch.bool, device=col.device),
    ]).tolist()
    op = "glrec::propagate"
    if flags[0]:
        raise ValueError(f"{op}: rowptr[0] must be 0, got {int(rowptr[0])}")
    if flags[1]:
        raise ValueError(f"{op}: rowptr[-1] must equal col.numel() = {nnz}, got {int(rowptr[-1])}")
    if flags[2]:
        raise ValueError(f"{op}: rowptr must be non-decreasing")
    if flags[3]:
        raise ValueError(f"{op}: col must hold node ids in [0, x.size(0) = {n})")


class Schedule:
    """Work items of one layer launch, in launch order, plus the long rows' finishing list."""

    def __init__(self, rowptr: torch.Tensor, seg_len: int, sort: bool):
        n = rowptr.numel() - 1
        dev = rowptr.device
        deg = rowptr[1:] - rowptr[:-1]
        is_long = deg > seg_len if seg_len > 0 else torch.zeros_like(deg, dtype=torch.bool)
        nseg = torch.where(is_long, (deg + seg_len - 1) // max(seg_len, 1), torch.ones_like(deg))
        item_row = torch.repeat_interleave(torch.arange(n, device=dev), nseg)
        first = torch.cumsum(nseg, 0) - nseg
        k = torch.arange(item_row.numel(), device=dev) - first[item_row]
        start = rowptr[item_row] + k * max(seg_len, 0)
        end = rowptr[item_row + 1]
        if seg_len > 0:
            end = torch.minimum(start + seg_len, end)
        item_long = is_long[item_row]
        # a long row's segments get consecutive slots, in edge order
        slot = torch.where(item_long, torch.cumsum(item_long.long(), 0) - 1, torch.full_like(start, -1))
        if sort:  # longest work first (LPT); stable, so equal lengths keep row order
            order = torch.argsort(end - start, descending=True, stable=True)
            item_row, start, end, slot = item_row[order], start[order], end[order], slot[order]
        idx = torch.int32 if n < 2**31 else torch.int64
        self.work_row = item_row.to(idx).contiguous()
        self.work_start = start.contiguous()
        self.work_end = end.contiguous()
        self.work_slot = slot.contiguous()
        self.num_items = int(item_row.numel())
        self.long_rows = torch.nonzero(is_long).flatten().to(idx)
        self.long_slot_ptr = torch.zeros(self.long_rows.numel() + 1, dtype=torch.int64, device=dev)
        torch.cumsum(nseg[is_long], 0, out=self.long_slot_ptr[1:])
        self.num_long = int(self.long_rows.numel())
        self.num_slots = int(self.long_slot_ptr[-1])


def schedule_for(rowptr: torch.Tensor, col: torch.Tensor, seg_len: int = 64, sort: bool = False) -> Schedule:
    """Validated, cached schedule (see the module docstring for why caching by identity is safe)."""
    key = (rowptr.data_ptr(), rowptr._version, rowptr.numel(), col.data_ptr(), col._version, col.numel(),
           str(rowptr.device), seg_len, sort)
    hit = _SCHEDULES.get(key)
    if hit is not None:
        _SCHEDULES.move_to_end(key)
        return hit[2]
    _validate_csr(rowptr, col, rowptr.numel() - 1)
    sched = Schedule(rowptr, seg_len, sort)
    _SCHEDULES[key] = (rowptr, col, sched)  # strong refs: the addresses stay ours while cached
    while len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
        _SCHEDULES.popitem(last=False)
    return sched


def default_config(d: int) -> tuple[int, int]:
    """(BLOCK_E, num_warps): a [BLOCK_E, BLOCK_D] tile of ~512 elements on one warp, so many small
    programs share an SM. H100, 3-layer fp32 forward (bench/gpu_suite.py sweeps, split at 256),
    Gowalla / 10M graph, d = 64: 4x1 warp 0.257 / 4.76 ms, 8x1 0.260 / 4.74, 8x2 0.264 / 4.61,
    16x1 0.280 / 5.06, 16x2 0.301 / 5.17 (an earlier run: 32x2 0.363 / 6.50, 32x4 0.524 / 7.69);
    d = 128: 4x1 0.424 / 10.20, 8x1 0.420 / 10.24, 8x2 0.456 / 10.32, 16x2 0.519 / 10.90."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_e = max(2, min(32, 512 // block_d))
    num_warps = 1 if block_d * block_e <= 512 else 2
    return block_e, num_warps


def propagate(rowptr: torch.Tensor, col: torch.Tensor, dinv: torch.Tensor, x: torch.Tensor, num_layers: int,
              block_e: int | None = None, num_warps: int | None = None, seg_len: int = 64,
              sort: bool = False) -> torch.Tensor:
    """Mean of layers 0..num_layers of ``x`` over the normalised CSR graph (``dinv = deg^-1/2``).

    ``block_e``/``num_warps`` override the tile config, ``seg_len`` is the longest row one program
    sums (0: never split) and ``sort=True`` launches the longest work items first instead of in row order
    (the last three are for bench/gpu_suite.py's schedule comparison; results are the same).
    """
    _check_inputs(rowptr, col, dinv, x, num_layers)
    if isinstance(seg_len, bool) or not isinstance(seg_len, int) or seg_len < 0:
        raise ValueError(f"glrec::propagate: seg_len must be an int >= 0, got {seg_len!r}")
    n, d = x.shape
    sched = schedule_for(rowptr, col, seg_len, bool(sort))
    if num_layers == 0 or n == 0 or d == 0:
        return x.clone()
    cfg_e, cfg_w = default_config(d)
    block_e = block_e or cfg_e
    num_warps = num_warps or cfg_w
    block_d = triton.next_power_of_2(d)

    acc = torch.empty((n, d), dtype=torch.float32, device=x.device) if num_layers > 1 else None
    res = acc if (x.dtype == torch.float32 and acc is not None) else torch.empty_like(x)
    if acc is None:
        acc = res  # K == 1: the running sum is never stored
    z = [torch.empty_like(x) if num_layers > 1 else None, torch.empty_like(x) if num_layers > 2 else None]
    part = torch.empty((max(sched.num_slots, 1), d), dtype=torch.float32, device=x.device)
    src = x
    for k in range(1, num_layers + 1):
        first, last = k == 1, k == num_layers
        z_next = None if last else z[(k - 1) % 2]
        znext_arg = z_next if z_next is not None else x  # not written when WRITE_Z is False
        flags = dict(FIRST=first, WRITE_Z=not last, LAST=last)
        _propagate_layer_kernel[(sched.num_items,)](
            sched.work_row, sched.work_start, sched.work_end, sched.work_slot, col, dinv, src, x, znext_arg, acc,
            res, part, 1.0 / (num_layers + 1), d, **flags, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps)
        if sched.num_long:
            _long_rows_kernel[(sched.num_long,)](
                sched.long_rows, sched.long_slot_ptr, part, dinv, x, znext_arg, acc, res, 1.0 / (num_layers + 1), d,
                **flags, BLOCK_D=block_d, num_warps=1 if block_d <= 128 else 2)
        src = z_next
    return res
