"""Full-ranking top-K metrics with the per-context breakdown (DESIGN.md, evaluation protocol).

Every user is ranked against all items, with the items they interacted with in training (and any
other ``exclude`` pairs, e.g. validation items when scoring test) masked out. Scores, masks and
top-k stay on the scoring device, in user batches. Metrics follow the LightGCN paper:

* ``recall@K``    = hits in top K / |test items of the user|
* ``precision@K`` = hits in top K / K
* ``ndcg@K``      = DCG / IDCG with binary relevance, IDCG over ``min(|test|, K)`` positions
* ``hit@K``       = 1 if any hit in top K
* ``mrr@K``       = 1 / rank of the first hit within the top K (0 if none)

Averages are over users with at least one test item. The per-context keys (``ndcg@20/cold``,
``/warm``, ``/head``, ``/tail``) rank the items *of that context only* (every other item is masked
out) against the user's test items of that context, averaged over users who have at least one
such item. This is the usual item cold-start protocol: it asks how well a model orders cold items
among themselves, which is what a cold gate changes; whether cold items can also compete with
warm ones shows in the overall numbers. An item's context comes from the training graph
(``BipartiteGraph.item_context``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .graph import ITEM_COLD, ITEM_HEAD, ITEM_TAIL

METRICS = ("recall", "ndcg", "precision", "hit", "mrr")
CONTEXTS = {"cold": (ITEM_COLD,), "warm": (ITEM_HEAD, ITEM_TAIL), "head": (ITEM_HEAD,), "tail": (ITEM_TAIL,)}


def _csr_of_pairs(pairs: torch.Tensor, num_users: int):
    """(rowptr, items) of a [n, 2] (user, item) tensor, grouped by user."""
    pairs = pairs.to(torch.long).cpu()
    order = torch.argsort(pairs[:, 0], stable=True)
    items = pairs[order, 1]
    counts = torch.bincount(pairs[:, 0], minlength=num_users)
    rowptr = torch.zeros(num_users + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr, items


def _batch_mask(rowptr, items, users: torch.Tensor, num_items: int, device) -> torch.Tensor:
    """Dense bool [len(users), num_items] with True at each (user, item) pair of the CSR."""
    users = users.cpu()
    starts, ends = rowptr[users], rowptr[users + 1]
    lens = ends - starts
    mask = torch.zeros((users.numel(), num_items), dtype=torch.bool, device=device)
    total = int(lens.sum())
    if total:
        row = torch.repeat_interleave(torch.arange(users.numel()), lens)
        offs = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        col = items[torch.repeat_interleave(starts, lens) + offs]
        mask[row.to(device), col.to(device)] = True
    return mask


def _check_pairs(name: str, pairs: torch.Tensor, num_users: int, num_items: int):
    if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.size(1) != 2:
        raise ValueError(f"{name}: expected a LongTensor [n, 2] of (user, item), got "
                         f"{tuple(pairs.shape) if isinstance(pairs, torch.Tensor) else type(pairs).__name__}")
    if pairs.numel() and (int(pairs[:, 0].min()) < 0 or int(pairs[:, 0].max()) >= num_users
                          or int(pairs[:, 1].min()) < 0 or int(pairs[:, 1].max()) >= num_items):
        raise ValueError(f"{name}: ids out of range for num_users={num_users}, num_items={num_items}")


@torch.no_grad()
def evaluate(score_fn: Callable[[torch.Tensor], torch.Tensor], test: torch.Tensor, num_users: int,
             num_items: int, exclude: Iterable[torch.Tensor] = (), ks: Iterable[int] = (10, 20),
             item_context: torch.Tensor | None = None, batch_size: int = 1024,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Full-ranking metrics of ``score_fn(users) -> [len(users), num_items]`` against ``test`` pairs.

    ``exclude``: pair tensors whose items are masked out of each user's ranking (training items,
    and validation items when scoring test). ``item_context`` adds the per-context breakdown.
    Returns a flat dict such as ``{"recall@20": ..., "ndcg@20/cold": ..., "n_users": ...}``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks: expected positive cut-offs, got {ks}")
    _check_pairs("test", test, num_users, num_items)
    exclude = list(exclude)
    for j, p in enumerate(exclude):
        _check_pairs(f"exclude[{j}]", p, num_users, num_items)
    kmax = min(ks[-1], num_items)
    test_rp, test_items = _csr_of_pairs(test, num_users)
    excl = [_csr_of_pairs(p, num_users) for p in exclude]
    users_all = torch.nonzero(test_rp[1:] > test_rp[:-1]).flatten()

    contexts = {"": None}
    if item_context is not None:
        if item_context.numel() != num_items:
            raise ValueError(f"item_context: expected {num_items} codes, got {item_context.numel()}")
        # Items ordered by context code (stable, so ties keep their item order), so that every
        # context (cold, head, tail, warm = head + tail) is one contiguous column range of the
        # permuted score tile: ranking a context is then top-k over a slice instead of masking the
        # whole tile once per context (2.3x less work per batch on a 1024 x 100k tile here).
        codes_all = item_context.cpu()
        order = torch.argsort(codes_all, stable=True)
        sorted_codes = codes_all[order]
        for name, codes in CONTEXTS.items():
            pos = torch.nonzero(torch.isin(sorted_codes, torch.tensor(list(codes)))).flatten()
            lo, hi = (int(pos[0]), int(pos[-1]) + 1) if pos.numel() else (0, 0)
            assert hi - lo == pos.numel(), "context codes must be consecutive"
            contexts["/" + name] = (lo, hi)
    sums = {(m, k, c): 0.0 for m in METRICS for k in ks for c in contexts}
    counts = {c: 0 for c in contexts}
    discount = None

    for start in range(0, users_all.numel(), batch_size):
        users = users_all[start:start + batch_size]
        scores = score_fn(users.to(device) if device is not None else users)
        if scores.shape != (users.numel(), num_items):
            raise ValueError(f"score_fn: expected scores of shape {(users.numel(), num_items)}, got "
                             f"{tuple(scores.shape)}")
        dev = scores.device
        scores = scores.float().clone()
        for rp, it in excl:
            scores.masked_fill_(_batch_mask(rp, it, users, num_items, dev), -math.inf)
        truth = _batch_mask(test_rp, test_items, users, num_items, dev)        # [b, I]
        if discount is None:
            discount = 1.0 / torch.log2(torch.arange(kmax, device=dev, dtype=torch.float32) + 2.0)
        if len(contexts) > 1:
            order_d = order.to(dev)
            scores_ctx, truth_ctx = scores.index_select(1, order_d), truth.index_select(1, order_d)
        for cname, span in contexts.items():
            if span is None:
                rel_mask, ranked = truth, scores
            else:
                rel_mask, ranked = truth_ctx[:, span[0]:span[1]], scores_ctx[:, span[0]:span[1]]
            n_rel = rel_mask.sum(1)                                            # [b]
            has = n_rel > 0
            if not bool(has.any()):
                continue
            kc = min(kmax, ranked.size(1))
            top = torch.topk(ranked, kc, dim=1).indices                         # [b, kc]
            hits = rel_mask.gather(1, top).float()                             # [b, kc]
            if kc < kmax:  # a context with fewer items than kmax: the missing ranks hold nothing
                hits = torch.nn.functional.pad(hits, (0, kmax - kc))
            counts[cname] += int(has.sum())
            for k in ks:
                kk = min(k, kmax)
                h = hits[:, :kk]
                nh = h.sum(1)
                dcg = (h * discount[:kk]).sum(1)
                ideal_len = torch.clamp(n_rel, max=kk)
                idcg = torch.cumsum(discount[:kk], 0)[(ideal_len - 1).clamp(min=0)]
                first = torch.where(h.any(1), h.argmax(1).float() + 1.0, torch.full_like(nh, math.inf))
                vals = {
                    "recall": nh / n_rel.clamp(min=1),
                    "precision": nh / k,
                    "ndcg": dcg / idcg,
                    "hit": (nh > 0).float(),
                    "mrr": 1.0 / first,
                }
                for m, v in vals.items():
                    sums[(m, k, cname)] += float(v[has].sum())
    out: dict[str, float] = {}
    for (m, k, c), s in sums.items():
        out[f"{m}@{k}{c}"] = s / counts[c] if counts[c] else float("nan")
    out["n_users"] = counts[""]
    for c in contexts:
        if c:
            out[f"n_users{c}"] = counts[c]
    return out


def format_table(results: dict[str, dict[str, float]], k: int = 20) -> str:
    """A small text table: rows = splits, columns = overall and per-context recall/ndcg@k."""
    cols = [f"recall@{k}", f"ndcg@{k}"] + [f"ndcg@{k}/{c}" for c in CONTEXTS]
    lines = [f"{'split':<8}" + "".join(f"{c:>14}" for c in cols)]
    for split, m in results.items():
        if not m:
            continue
        lines.append(f"{split:<8}" + "".join(f"{m.get(c, float('nan')):>14.4f}" for c in cols))
    return "\n".join(lines)
