"""Triton kernels for ``glrec::gated_fusion`` and ``glrec::gated_fusion_backward`` on CUDA.

    g = sigmoid(W[c, 0] * e_graph + W[c, 1] * e_text + b[c]),   fused = g * e_graph + (1 - g) * e_text

per row (context ``c = context[row]``) and per dimension. Forward: one pass, reads two [N, d] tables
and the row's context, writes one; the [C, 2, d] / [C, d] gate tables stay in cache. Backward: one
pass that writes d_e_graph and d_e_text and reduces the weight/bias gradients per context:

* C <= ``MAX_STATIC_CONTEXTS`` (the hybrid model has 2-3 contexts): each program walks a fixed,
  strided set of row tiles and keeps [C, d] partial sums for dW0, dW1, db in registers; the
  [programs, 3, C, d] partials are summed by one small torch reduction. The grid size depends only
  on N and the device's SM count, so the result is bitwise reproducible run to run.
* more contexts: per-element float32 atomics into [C, 2, d] / [C, d] (order-dependent rounding).

Math in float32 whatever the storage dtype; outputs in the inputs' dtypes (as reference.py).
The host functions check their inputs and raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_STATIC_CONTEXTS = 8
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gated_fusion_fwd_kernel(eg_ptr, et_ptr, ctx_ptr, w_ptr, b_ptr, out_ptr, n, d,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n
    m = rmask[:, None] & (cols < d)[None, :]
    c = tl.load(ctx_ptr + rows, mask=rmask, other=0)
    offs = rows[:, None] * d + cols[None, :]
    eg = tl.load(eg_ptr + offs, mask=m, other=0.0).to(tl.float32)
    et = tl.load(et_ptr + offs, mask=m, other=0.0).to(tl.float32)
    woffs = c[:, None] * (2 * d) + cols[None, :]
    w0 = tl.load(w_ptr + woffs, mask=m, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + woffs + d, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.sigmoid(w0 * eg + w1 * et + b)
    tl.store(out_ptr + offs, (et + g * (eg - et)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_fusion_bwd_kernel(go_ptr, eg_ptr, et_ptr, ctx_ptr, w_ptr, b_ptr, deg_ptr, det_ptr, part_ptr,
                             dw_ptr, db_ptr, n, d, num_tiles,
                             C: tl.constexpr, C_PAD: tl.constexpr, ATOMIC: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    cidx = tl.arange(0, C_PAD)
    acc_w0 = tl.zeros([C_PAD, BLOCK_D], dtype=tl.float32)
    acc_w1 = tl.zeros([C_PAD, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([C_PAD, BLOCK_D], dtype=tl.float32)
    for tile in range(pid, num_tiles, nprog):
        rows = tl.arange(0, BLOCK_N).to(tl.int64) + tile * BLOCK_N  # tile * BLOCK_N < n fits int32
        rmask = rows < n
        m = rmask[:, None] & cmask[None, :]
        c = tl.load(ctx_ptr + rows, mask=rmask, other=0)
        offs = rows[:, None] * d + cols[None, :]
        go = tl.load(go_ptr + offs, mask=m, other=0.0).to(tl.float32)
        eg = tl.load(eg_ptr + offs, mask=m, other=0.0).to(tl.float32)
        et = tl.load(et_ptr + offs, mask=m, other=0.0).to(tl.float32)
        woffs = c[:, None] * (2 * d) + cols[None, :]
        w0 = tl.load(w_ptr + woffs, mask=m, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + woffs + d, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.sigmoid(w0 * eg + w1 * et + b)
        dl = go * (eg - et) * g * (1.0 - g)  # d loss / d logit; 0 on masked lanes (go = 0 there)
        tl.store(deg_ptr + offs, (go * g + dl * w0).to(deg_ptr.dtype.element_ty), mask=m)
        tl.store(det_ptr + offs, (go * (1.0 - g) + dl * w1).to(det_ptr.dtype.element_ty), mask=m)
        pw0 = dl * eg
        pw1 = dl * et
        if ATOMIC:
            tl.atomic_add(dw_ptr + woffs, pw0, mask=m)
            tl.atomic_add(dw_ptr + woffs + d, pw1, mask=m)
            tl.atomic_add(db_ptr + c[:, None] * d + cols[None, :], dl, mask=m)
        else:
            for cc in tl.static_range(C):
                sel = (c == cc)[:, None]
                hit = (cidx == cc)[:, None]
                acc_w0 += tl.where(hit, tl.sum(tl.where(sel, pw0, 0.0), axis=0)[None, :], 0.0)
                acc_w1 += tl.where(hit, tl.sum(tl.where(sel, pw1, 0.0), axis=0)[None, :], 0.0)
                acc_b += tl.where(hit, tl.sum(tl.where(sel, dl, 0.0), axis=0)[None, :], 0.0)
    if not ATOMIC:
        # partials laid out [programs, 3, C, d]
        pm = (cidx < C)[:, None] & cmask[None, :]
        poffs = pid.to(tl.int64) * 3 * C * d + cidx[:, None] * d + cols[None, :]
        tl.store(part_ptr + poffs, acc_w0, mask=pm)
        tl.store(part_ptr + poffs + C * d, acc_w1, mask=pm)
        tl.store(part_ptr + poffs + 2 * C * d, acc_b, mask=pm)


# --------------------------------------------------------------------------- host side
def _check(op, e_graph, e_text, context, gate_weight, gate_bias, grad_out=None):
    named = [("e_graph", e_graph), ("e_text", e_text), ("context", context), ("gate_weight", gate_weight),
             ("gate_bias", gate_bias)]
    if grad_out is not None:
        named.insert(0, ("grad_out", grad_out))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != e_graph.device:
            raise ValueError(f"{op}: {name} is on {t.device} but e_graph is on {e_graph.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if name != "context" and t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if e_graph.dim() != 2:
        raise ValueError(f"{op}: e_graph must be 2-d [N, d], got shape {tuple(e_graph.shape)}")
    n, d = e_graph.shape
    if e_text.shape != e_graph.shape:
        raise ValueError(f"{op}: e_text must have e_graph's shape {tuple(e_graph.shape)}, got {tuple(e_text.shape)}")
    if grad_out is not None and grad_out.shape != e_graph.shape:
        raise ValueError(f"{op}: grad_out must have e_graph's shape {tuple(e_graph.shape)}, got {tuple(grad_out.shape)}")
    if context.dtype != torch.int64 or context.dim() != 1 or context.numel() != n:
        raise ValueError(f"{op}: context must be a 1-d int64 tensor of {n} codes, got {context.dtype} "
                         f"shape {tuple(context.shape)}")
    if gate_bias.dim() != 2 or gate_bias.size(1) != d:
        raise ValueError(f"{op}: gate_bias must be [C, {d}], got shape {tuple(gate_bias.shape)}")
    num_ctx = gate_bias.size(0)
    if tuple(gate_weight.shape) != (num_ctx, 2, d):
        raise ValueError(f"{op}: gate_weight must be [{num_ctx}, 2, {d}], got shape {tuple(gate_weight.shape)}")
    if n and num_ctx == 0:
        raise ValueError(f"{op}: gate_bias has no context rows but context has {n} entries")
    # One host sync; an out-of-range code would read outside the gate tables.
    if n and bool(((context < 0) | (context >= num_ctx)).any()):
        raise ValueError(f"{op}: context codes must lie in [0, {num_ctx}), got "
                         f"[{int(context.min())}, {int(context.max())}]")
    return n, d, num_ctx


def _blocks(d: int, elems: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(d, 1))
    return max(1, min(128, elems // block_d)), block_d


def _num_programs(device: torch.device, num_tiles: int) -> int:
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # TRITON_INTERPRET=1 on CPU tensors
        cap = 4
    return max(1, min(num_tiles, cap))


def gated_fusion_forward(e_graph, e_text, context, gate_weight, gate_bias):
    n, d, _ = _check("glrec::gated_fusion", e_graph, e_text, context, gate_weight, gate_bias)
    out = torch.empty_like(e_graph)
    if n == 0 or d == 0:
        return out
    # 4k elements per program: 16 B/thread loads with 4 warps, ~N/32 programs at d=128.
    block_n, block_d = _blocks(d, 4096)
    _gated_fusion_fwd_kernel[(triton.cdiv(n, block_n),)](e_graph, e_text, context, gate_weight, gate_bias, out, n, d,
                                                         BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out


def gated_fusion_backward(grad_out, e_graph, e_text, context, gate_weight, gate_bias):
    n, d, num_ctx = _check("glrec::gated_fusion_backward", e_graph, e_text, context, gate_weight, gate_bias,
                           grad_out=grad_out)
    d_eg = torch.empty_like(e_graph)
    d_et = torch.empty_like(e_text)
    dev = e_graph.device
    if n == 0 or d == 0:
        return (d_eg, d_et, torch.zeros_like(gate_weight), torch.zeros_like(gate_bias))
    atomic = num_ctx > MAX_STATIC_CONTEXTS
    # Smaller tiles than the forward: the backward keeps 3 [C_PAD, BLOCK_D] accumulators live.
    block_n, block_d = _blocks(d, 2048)
    num_tiles = triton.cdiv(n, block_n)
    grid = _num_programs(dev, num_tiles)
    if atomic:
        dw = torch.zeros((num_ctx, 2, d), dtype=torch.float32, device=dev)
        db = torch.zeros((num_ctx, d), dtype=torch.float32, device=dev)
        part = dw  # unused
        c_static, c_pad = 1, 1
    else:
        part = torch.empty((grid, 3, num_ctx, d), dtype=torch.float32, device=dev)
        dw = db = part  # unused
        c_static, c_pad = num_ctx, triton.next_power_of_2(num_ctx)
    _gated_fusion_bwd_kernel[(grid,)](grad_out, e_graph, e_text, context, gate_weight, gate_bias, d_eg, d_et, part,
                                      dw, db, n, d, num_tiles, C=c_static, C_PAD=c_pad, ATOMIC=atomic,
                                      BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    if not atomic:
        red = part.sum(0)                          # [3, C, d], fixed order: deterministic
        dw = torch.stack((red[0], red[1]), dim=1)  # [C, 2, d]
        db = red[2]
    return d_eg, d_et, dw.to(gate_weight.dtype), db.to(gate_bias.dtype)
