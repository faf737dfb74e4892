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

import torch
import torch.nn.functional as F


def sampled_softmax(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_ids: torch.Tensor,
                    neg_ids: torch.Tensor, temperature: float, pos_bias: torch.Tensor | None = None,
                    neg_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``-log softmax`` of the positive among ``[pos, negatives]``.

    ``u``, ``pos``: [B, d] user and positive item vectors; ``neg``: [N, d] shared negatives;
    ``pos_ids`` [B] and ``neg_ids`` [N] are item ids (a negative equal to the positive is masked).
    ``pos_bias`` [B] and ``neg_bias`` [N], when given, are the items' logit offsets (``--item_bias``),
    added to ``cosine / temperature``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    u, pos, neg = F.normalize(u, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    pos_logit = (u * pos).sum(-1, keepdim=True) / temperature                  # [B, 1]
    neg_logit = (u @ neg.T) / temperature                                     # [B, N]
    if pos_bias is not None:
        pos_logit, neg_logit = pos_logit + pos_bias[:, None], neg_logit + neg_bias[None, :]
    neg_logit = neg_logit.masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    pos_logit = pos_logit.squeeze(1)
    return -(pos_logit - torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, 1))).mean()


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
