"""Training losses on (user, positive item) batches, and the spectral initialisation.

* ``bpr``: Bayesian personalised ranking, one sampled negative per triple (``base.bpr_loss``).
* ``sampled_softmax``: cross-entropy of the positive against ``N`` uniformly drawn negatives shared
  by the batch, on cosine similarities divided by a temperature (as in SimpleX and the sampled-
  softmax studies of Wu et al., 2023). Many negatives per step give a far stronger gradient per
  epoch than BPR's one. A negative that equals the row's positive is masked out. Cosine logits
  cannot say how popular an item is (the norms that would carry it are divided out; Wu et al.
  name this the weakness of sampled softmax with ID-only models such as MF), so a learned per-item
  offset can be added to them (``--item_bias``, ``Recommender.add_item_bias``).

``spectral_embeddings`` gives the top-K singular factors of the normalised interaction matrix
``R~ = D_U^-1/2 R D_I^-1/2`` (the same randomised SVD the graph filters use), for initialising
embedding tables at the graph's smoothest signals instead of noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def sampled_softmax(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_ids: torch.Tensor,
                    neg_ids: torch.Tensor, temperature: float, pos_bias: torch.Tensor | None = None,
                    neg_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``-log softmax`` of the positive among ``[pos, negatives]``.

    ``u``, ``pos``: [B, d] user and positive item vectors; ``neg``: [N, d] shared negatives;
    ``pos_ids`` [B] and ``neg_ids`` [N] are item ids (a negative equal to the positive is masked).
    ``pos_bias`` [B] and ``neg_bias`` [N], when given, are the items' logit offsets (``--item_bias``),
    added to ``cosine / temperature``. Equals ``reference.sampled_softmax``; the [B, N] block runs
    through :class:`_NegativeLogSumExp` (one buffer).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    u, pos, neg = F.normalize(u, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    pos_logit = (u * pos).sum(-1) / temperature                               # [B]
    if pos_bias is not None:
        pos_logit = pos_logit + pos_bias
    rows, cols = _collisions(pos_ids, neg_ids)
    lse = _NegativeLogSumExp.apply(u, neg, neg_bias, pos_logit, rows, cols, 1.0 / temperature)
    return (lse - pos_logit).mean()


def _collisions(pos_ids: torch.Tensor, neg_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every negative equal to its row's positive; few, found without a [B, N] mask."""
    rows = torch.isin(pos_ids, neg_ids).nonzero().flatten()
    r, c = (pos_ids[rows, None] == neg_ids[None, :]).nonzero(as_tuple=True)
    return rows[r], c


class _NegativeLogSumExp(torch.autograd.Function):
    """``lse[b] = log(exp(pos_logit[b]) + sum_j exp(u[b] . neg[j] / t + neg_bias[j]))`` over the
    negatives not masked at (rows, cols). The [B, N] logits are one GEMM into one buffer,
    exponentiated in place and reused by the backward, which turns them into the softmax weights
    in place for its two GEMMs. Plain PyTorch (``reference.sampled_softmax``) also keeps a
    concatenated [B, N + 1] copy and ``cross_entropy``'s saved log-softmax; the passes over them
    grow with N (bench/bench_softmax.py: 1.07-1.17x at 1,024 negatives, 1.48-1.59x at 2,048)."""

    @staticmethod
    def forward(ctx, u, neg, neg_bias, pos_logit, rows, cols, inv_t: float):
        us = u * inv_t
        logits = torch.mm(us, neg.t()) if neg_bias is None else torch.addmm(neg_bias[None, :], us, neg.t())
        logits[rows, cols] = -math.inf
        m = torch.maximum(logits.amax(1), pos_logit)
        e = logits.sub_(m[:, None]).exp_()                                   # exp(logit - m), in place
        s = e.sum(1) + torch.exp(pos_logit - m)
        ctx.save_for_backward(us, neg, e, s, pos_logit, m)
        ctx.inv_t, ctx.has_bias, ctx.used = inv_t, neg_bias is not None, False
        return m + s.log()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.used:
            raise RuntimeError("sampled_softmax: backward through the same loss twice is not supported "
                               "(its buffer is reused in place); recompute the loss")
        ctx.used = True
        us, neg, e, s, pos_logit, m = ctx.saved_tensors
        w = g / s
        p = e.mul_(w[:, None])                                               # g * softmax weight
        grad_u = torch.mm(p, neg).mul_(ctx.inv_t)
        grad_neg = torch.mm(p.t(), us)
        grad_bias = p.sum(0) if ctx.has_bias else None
        grad_pos = w * torch.exp(pos_logit - m)
        return grad_u, grad_neg, grad_bias, grad_pos, None, None, None


@torch.no_grad()
def spectral_embeddings(graph, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(user [U, dim], item [I, dim]) = (U_K S^1/2, V_K S^1/2) of ``R~``'s truncated SVD."""
    from .filters import normalised_csr, top_right_singular_vectors
    r, _, _, _ = normalised_csr(graph.to("cpu"))
    k = min(dim, graph.num_items, graph.num_users)
    v = top_right_singular_vectors(r, k, seed=seed)                          # [I, k]
    rv = torch.sparse.mm(r, v)                                               # U_K S
    s = rv.norm(dim=0).clamp(min=1e-12)
    user, item = rv / s.sqrt(), v * s.sqrt()
    if k < dim:   # fewer singular directions than dims: pad with zeros (the init noise fills them)
        user, item = F.pad(user, (0, dim - k)), F.pad(item, (0, dim - k))
    return user, item
