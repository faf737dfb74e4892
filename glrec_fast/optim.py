"""The training optimiser: Adam(W) whose row-sparse gradients update only the rows they touch.

A step of MF, GraphSAGE or sampled LightGCN reads a few thousand rows of embedding tables that
hold every user and item. With a dense gradient, every step pays for the whole table three times
over: the zero-filled gradient, Adam's moment updates and the parameter update (on Gowalla's
70,839 x 64 table that was most of a GraphSAGE step, and the part that N data-parallel ranks all
repeat). Models that read a table only row by row declare it (``Recommender.sparse_tables``);
their reads then give ``torch.sparse_coo`` gradients and :class:`RowAdam` updates those rows only
("lazy Adam", as ``torch.optim.SparseAdam`` and TensorFlow's LazyAdam): a row's moments decay only
on the steps that touch it. Dense gradients take the ordinary AdamW update, identical to
``torch.optim.AdamW``'s single-tensor path.
"""
from __future__ import annotations

import math

import torch

from . import ops

__all__ = ["RowAdam"]


class RowAdam(torch.optim.Optimizer):
    """AdamW for dense gradients, lazy row-wise Adam for row-sparse (``sparse_coo``) gradients.

    The state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) has AdamW's names and shapes, so
    a checkpoint written with ``torch.optim.AdamW`` resumes here. ``step`` counts the steps on
    which a parameter had a gradient (bias correction uses it for every row, as SparseAdam does).
    Decoupled weight decay applies to dense gradients only; a group with decay cannot take a
    sparse gradient (decaying untouched rows would make the step dense again).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr: expected > 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: expected two values in [0, 1), got {betas!r}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError(f"eps: expected > 0 and weight_decay >= 0, got {eps!r}, {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if p.grad.is_sparse:
                    if group["weight_decay"]:
                        raise ValueError(f"RowAdam: a parameter of shape {tuple(p.shape)} got a row-sparse gradient "
                                         f"in a group with weight_decay={group['weight_decay']}; row-sparse tables "
                                         f"take no decoupled decay")
                    _sparse_step(p, p.grad, state, group)
                else:
                    _dense_step(p, p.grad, state, group)
        return loss


def _bias(state, group):
    t = float(state["step"])
    b1, b2 = group["betas"]
    return group["lr"] / (1 - b1 ** t), math.sqrt(1 - b2 ** t)


def _dense_step(p, grad, state, group):
    b1, b2 = group["betas"]
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    step_size, bc2_sqrt = _bias(state, group)
    p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(group["eps"]), value=-step_size)


def _sparse_step(p, grad, state, group):
    """The dense update restricted to the rows in ``grad`` (duplicates summed first)."""
    if grad.sparse_dim() != 1:
        raise ValueError(f"RowAdam: expected a row-sparse gradient (sparse_dim 1) for a parameter of shape "
                         f"{tuple(p.shape)}, got sparse_dim {grad.sparse_dim()}")
    rows = grad._indices()[0]
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        # Already sorted and unique (a sampled block's node rows arrive so: ops.table_rows,
        # ops.table_mean_concat), which torch's gradient accumulation does not flag; one comparison
        # pass instead of a sort.
        g = grad._values()
    else:
        grad = grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
    if rows.numel() == 0:
        return
    b1, b2 = group["betas"]
    step_size, bc2_sqrt = _bias(state, group)
    ops.row_adam_(p.data, state["exp_avg"], state["exp_avg_sq"], rows, g, step_size, b1, b2, group["eps"], bc2_sqrt)
