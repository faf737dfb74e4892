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

from . import ops
from .graph import CONTEXTS, BipartiteGraph

METRICS = ("recall", "ndcg", "precision", "hit", "mrr")


def csr_of_pairs(pairs: torch.Tensor, num_users: int):
    """(rowptr, items) of a [n, 2] (user, item) tensor, grouped by user."""
    pairs = pairs.to(torch.long).cpu()
    order = torch.argsort(pairs[:, 0], stable=True)
    items = pairs[order, 1]
    counts = torch.bincount(pairs[:, 0], minlength=num_users)
    rowptr = torch.zeros(num_users + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr, items


def csr_rows(rowptr: torch.Tensor, items: torch.Tensor, users: torch.Tensor):
    """(row, col): every (position in ``users``, item) pair of the CSR rows of ``users``."""
    users = users.cpu()
    starts, lens = rowptr[users], rowptr[users + 1] - rowptr[users]
    total = int(lens.sum())
    row = torch.repeat_interleave(torch.arange(users.numel()), lens, output_size=total)
    offs = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens, output_size=total)
    return row, items[torch.repeat_interleave(starts, lens, output_size=total) + offs]


def batch_mask(rowptr, items, users: torch.Tensor, num_items: int, device) -> torch.Tensor:
    """Dense bool [len(users), num_items] with True at each (user, item) pair of the CSR."""
    mask = torch.zeros((users.numel(), num_items), dtype=torch.bool, device=device)
    row, col = csr_rows(rowptr, items, users)
    if row.numel():
        mask[row.to(device), col.to(device)] = True
    return mask


def _check_pairs(name: str, pairs: torch.Tensor, num_users: int, num_items: int):
    if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.size(1) != 2:
        raise ValueError(f"{name}: expected a LongTensor [n, 2] of (user, item), got "
                         f"{tuple(pairs.shape) if isinstance(pairs, torch.Tensor) else type(pairs).__name__}")
    if pairs.numel() and (int(pairs[:, 0].min()) < 0 or int(pairs[:, 0].max()) >= num_users
                          or int(pairs[:, 1].min()) < 0 or int(pairs[:, 1].max()) >= num_items):
        raise ValueError(f"{name}: ids out of range for num_users={num_users}, num_items={num_items}")


class TileScorer:
    """The scorer of one user batch whose ``[batch, items]`` tile is already computed, handed to
    ``evaluate`` without a copy (it masks the tile in place): for loops that rank many settings of
    the same users (``filters.grid_search``, ``hybrid.tune_score_weight``), each with a new tile."""

    fresh_tiles = True

    def __init__(self, tile: torch.Tensor):
        self.tile = tile

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self.tile


class EmbeddingScorer:
    """``users -> user_emb[users] @ item_emb.T``: the scorer of every embedding model.

    ``reorder(order)`` returns the scorer whose columns come in ``order`` (the item table permuted
    once), which is how ``evaluate`` gets context-contiguous score tiles without permuting each tile.
    """

    fresh_tiles = True   # every call returns a new tensor: evaluate may write into it

    def __init__(self, user_emb: torch.Tensor, item_emb: torch.Tensor):
        self.user_emb, self.item_emb = user_emb, item_emb

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb[users.to(self.user_emb.device)] @ self.item_emb.T

    def reorder(self, order: torch.Tensor) -> "EmbeddingScorer":
        return EmbeddingScorer(self.user_emb, self.item_emb[order.to(self.item_emb.device)])


def _exclusion_csr(j: int, p, num_users: int, num_items: int):
    """(rowptr, items) of ``exclude[j]``: a graph's own user CSR (no copy of its interactions), or
    the CSR of a pair tensor."""
    if isinstance(p, BipartiteGraph):
        if (p.num_users, p.num_items) != (num_users, num_items):
            raise ValueError(f"exclude[{j}]: a graph of {p.num_users} users x {p.num_items} items, expected "
                             f"{num_users} x {num_items}")
        g = p.to("cpu")
        return g.user_rowptr, g.user_col
    _check_pairs(f"exclude[{j}]", p, num_users, num_items)
    return csr_of_pairs(p, num_users)


def _relabel(pairs: torch.Tensor, rank: torch.Tensor | None) -> torch.Tensor:
    pairs = pairs.to(torch.long).cpu()
    return pairs if rank is None else torch.stack([pairs[:, 0], rank[pairs[:, 1]]], 1)


def ranked_metrics(top: torch.Tensor, users: torch.Tensor, test_keys: torch.Tensor, n_rel: torch.Tensor,
                   num_items: int, ks, discount: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Per-user ``{(metric, k): [b] values}`` of ranked lists ``top`` [b, <= kmax] (item ids, best
    first) against the sorted ``test_keys`` (``user * num_items + item``); ``n_rel`` [b] counts each
    user's relevant items (> 0 wherever a value is used); ``discount`` [kmax] is ``1 / log2(rank + 1)``."""
    dev, kmax = top.device, discount.numel()
    test_keys = test_keys.to(dev)
    keys = users.to(dev)[:, None] * num_items + top
    pos = torch.searchsorted(test_keys, keys).clamp(max=max(test_keys.numel() - 1, 0))
    hits = (test_keys[pos] == keys).float()
    if hits.size(1) < kmax:  # a context with fewer items than kmax: the missing ranks hold nothing
        hits = torch.nn.functional.pad(hits, (0, kmax - hits.size(1)))
    out = {}
    for k in ks:
        kk = min(k, kmax)
        h = hits[:, :kk]
        nh = h.sum(1)
        dcg = (h * discount[:kk]).sum(1)
        ideal_len = torch.clamp(n_rel, max=kk)
        idcg = torch.cumsum(discount[:kk], 0)[(ideal_len - 1).clamp(min=0)]
        first = torch.where(h.any(1), h.argmax(1).float() + 1.0, torch.full_like(nh, math.inf))
        out.update({("recall", k): nh / n_rel.clamp(min=1), ("precision", k): nh / k, ("ndcg", k): dcg / idcg,
                    ("hit", k): (nh > 0).float(), ("mrr", k): 1.0 / first})
    return out


def discounts(kmax: int, device=None) -> torch.Tensor:
    """``1 / log2(rank + 1)`` for ranks 1..kmax."""
    return 1.0 / torch.log2(torch.arange(kmax, device=device, dtype=torch.float32) + 2.0)


@torch.no_grad()
def evaluate(score_fn: Callable[[torch.Tensor], torch.Tensor], test: torch.Tensor, num_users: int,
             num_items: int, exclude: Iterable = (), ks: Iterable[int] = (10, 20),
             item_context: torch.Tensor | None = None, batch_size: int = 1024,
             device: torch.device | str | None = None, shard: tuple[int, int] | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Full-ranking metrics of ``score_fn(users) -> [len(users), num_items]`` against ``test`` pairs.

    ``exclude``: pair tensors whose items are masked out of each user's ranking (training items,
    and validation items when scoring test), or a ``BipartiteGraph`` whose interactions are (read
    from its user CSR: the training graph masks training items without another copy of them).
    ``item_context`` adds the per-context breakdown.
    Returns a flat dict such as ``{"recall@20": ..., "ndcg@20/cold": ..., "n_users": ...}``.

    One [batch, num_items] score tile per user batch and nothing else of that size: excluded pairs
    are written into it as -inf by index, items are relabelled so that every base context (cold,
    head, tail) is one contiguous column range (a scorer with ``reorder`` permutes its item table
    once; any other scorer's tile is permuted per batch), each range gets one top-k, and the
    overall and warm rankings are exact merges of those. Hits are looked up in the sorted test
    keys. ``reference.evaluate`` is the dense ground truth.

    Sharded evaluation (``glrec_fast.distributed``): with ``shard=(rank, world)`` this process ranks
    only user batches ``rank, rank + world, ...`` and ``reduce`` (an all-reduce sum) combines the
    per-batch sums, which are then added in batch order: the result is bit-identical to one process.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks: expected positive cut-offs, got {ks}")
    _check_pairs("test", test, num_users, num_items)
    excl = [_exclusion_csr(j, p, num_users, num_items) for j, p in enumerate(exclude)]
    kmax = min(ks[-1], num_items)

    # Base contexts as contiguous ranges of relabelled item ids; reported contexts as unions of them.
    order = rank = None
    bases = {"all": (0, num_items)}
    reported = {"": ["all"]}
    item_base = torch.zeros(num_items, dtype=torch.long)
    if item_context is not None:
        if item_context.numel() != num_items:
            raise ValueError(f"item_context: expected {num_items} codes, got {item_context.numel()}")
        codes_all = item_context.cpu().to(torch.long)
        order = torch.argsort(codes_all, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(num_items)
        base_codes = sorted({c for codes in CONTEXTS.values() for c in codes})
        sorted_codes = codes_all[order]
        bases = {}
        for c in base_codes:
            pos = torch.nonzero(sorted_codes == c).flatten()
            bases[c] = (int(pos[0]), int(pos[-1]) + 1) if pos.numel() else (0, 0)
        item_base = sorted_codes        # base of each relabelled item
        reported = {"": base_codes, **{"/" + n: list(codes) for n, codes in CONTEXTS.items()}}
    base_names = list(bases)
    base_index = {b: j for j, b in enumerate(base_names)}

    test = _relabel(test, rank)
    test_keys = torch.sort(test[:, 0] * num_items + test[:, 1]).values
    # Relevant test items per (user, base context).
    if item_context is not None:
        lut = torch.full((max(base_names) + 1,), -1, dtype=torch.long)
        lut[torch.tensor(base_names)] = torch.arange(len(base_names))
        base_of_test = lut[item_base[test[:, 1]]]
    else:
        base_of_test = torch.zeros(len(test), dtype=torch.long)
    n_rel_base = torch.bincount(test[:, 0] * len(bases) + base_of_test,
                                minlength=num_users * len(bases)).view(num_users, len(bases))
    users_all = torch.nonzero(n_rel_base.sum(1) > 0).flatten()

    # A tile is written into (-inf at excluded pairs); copy it unless the scorer says it returns a
    # fresh tensor per call (an arbitrary score_fn may return a view of a table it keeps).
    fresh = getattr(score_fn, "fresh_tiles", False)
    if order is None:
        fn = score_fn
    elif hasattr(score_fn, "reorder"):
        fn = score_fn.reorder(order)
    else:
        fresh = True
        fn = lambda us: score_fn(us).index_select(1, order.to(device) if device is not None else order)  # noqa: E731

    keys_ = [(m, k, c) for m in METRICS for k in ks for c in reported]
    key_col = {key: j for j, key in enumerate(keys_)}
    n_batches = -(-users_all.numel() // batch_size)
    # One row of sums per user batch (float64) plus one count per reported context: each batch's row
    # is written by the one process that ranks it, and rows are added in batch order at the end.
    batch_sums = torch.zeros(n_batches, len(keys_), dtype=torch.float64)
    counts_t = torch.zeros(len(reported), dtype=torch.float64)
    cidx = {c: j for j, c in enumerate(reported)}
    my_rank, world = shard if shard is not None else (0, 1)
    if not 0 <= my_rank < world:
        raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got {shard!r}")
    discount = torch.ones(1)
    for bi in range(my_rank, n_batches, world):
        users = users_all[bi * batch_size:(bi + 1) * batch_size]
        scores = fn(users.to(device) if device is not None else users)
        if scores.shape != (users.numel(), num_items):
            raise ValueError(f"score_fn: expected scores of shape {(users.numel(), num_items)}, got "
                             f"{tuple(scores.shape)}")
        dev = scores.device
        if scores.dtype != torch.float32 or not scores.is_contiguous():
            scores, fresh_now = scores.float().contiguous(), True
        else:
            fresh_now = fresh
        if excl and not fresh_now:
            scores = scores.clone()
        for rp, it in excl:
            row, col = csr_rows(rp, it, users)
            if rank is not None:
                col = rank[col]
            scores[row.to(dev), col.to(dev)] = -math.inf
        if discount.numel() != kmax or discount.device != dev:
            discount = discounts(kmax, dev)
        # One top-k per base range: (values, relabelled item ids).
        tops = {}
        for b, (lo, hi) in bases.items():
            kc = min(kmax, hi - lo)
            if kc > 0:
                v, i = ops.topk_rows(scores[:, lo:hi], kc)
                tops[b] = (v, i + lo)
        n_rel_b = n_rel_base[users].to(dev)
        for cname, members in reported.items():
            parts = [tops[b] for b in members if b in tops]
            n_rel = sum(n_rel_b[:, base_index[b]] for b in members)
            has = n_rel > 0
            if not parts or not bool(has.any()):
                continue
            if len(parts) == 1:
                top = parts[0][1]
            else:
                vals = torch.cat([p[0] for p in parts], 1)
                idx = torch.cat([p[1] for p in parts], 1)
                kc = min(kmax, vals.size(1))
                top = idx.gather(1, ops.topk_rows(vals, kc)[1])
            counts_t[cidx[cname]] += int(has.sum())
            for (m, k), v in ranked_metrics(top, users, test_keys, n_rel, num_items, ks, discount).items():
                batch_sums[bi, key_col[(m, k, cname)]] = float(v[has].sum())
    if reduce is not None:
        batch_sums, counts_t = reduce(batch_sums), reduce(counts_t)
    totals = [0.0] * len(keys_)
    for row in batch_sums.tolist():   # batch order, as one process adds them
        totals = [t + r for t, r in zip(totals, row)]
    counts = {c: int(counts_t[cidx[c]]) for c in reported}
    out: dict[str, float] = {}
    for (m, k, c), s_ in zip(keys_, totals):
        out[f"{m}@{k}{c}"] = s_ / counts[c] if counts[c] else float("nan")
    out["n_users"] = counts[""]
    for c in reported:
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
