"""Train/valid/test splits on (user, item) edge arrays in contiguous ids.

All splits are vectorised (no per-user Python loop) and deterministic for a seed: the same edges
and seed give the same split (numpy's PCG64 ``default_rng``). Every part comes back sorted by
(user, item).

* ``given``: the dataset's own split (see loaders); nothing to do here.
* ``random``: per user, shuffle the user's interactions and put ``round(ratio_test * n)`` in test and
  ``round(ratio_valid * n)`` in valid (half rounds up), the rest in train. With the default
  80/10/10 ratios a user with fewer than 5 interactions gets 0 valid and 0 test (round(0.4) = 0)
  and keeps everything in train; if the quotas would leave a user with no train interaction
  (only possible with larger ratios) the user keeps everything in train too.
* ``cold``: ``cold_fraction`` of the items that have interactions (default 20%) are held out
  entirely: none of their interactions is in train. The cold items are split into two disjoint
  halves, chosen at random: *validation-cold* items have every interaction in valid, *test-cold*
  items every interaction in test (with an odd count test gets the extra item). So nothing chosen on
  validation (a fusion weight, a gate, an epoch) has seen a test-cold item, and cold numbers on test
  are clean. The warm interactions are split per user like ``random``. Do not merge valid into
  train before testing: the test ranking masks valid pairs, and its cold candidates are all cold
  items of both halves.

A dataset that ships only train/test (Gowalla) gets its validation set from ``carve_valid``: a
seeded ``valid_fraction`` of each user's *training* interactions (the per-user rule of ``random``),
so tuning never sees a test interaction. Tune on (train - valid, valid), then fit on the full train
with the chosen settings and read test once.
"""
from __future__ import annotations

import numpy as np

from .dataset import DataError, sort_numeric, sorted_unique

SPLITS = ("given", "random", "cold")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def check_ratios(ratios) -> tuple[float, float, float]:
    try:
        r = tuple(float(x) for x in ratios)
    except TypeError:
        raise DataError(f"ratios: expected (train, valid, test) fractions, got {ratios!r}") from None
    if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6 or r[0] <= 0:
        raise DataError(f"ratios: expected 3 non-negative fractions (train, valid, test) summing to 1 "
                        f"with train > 0, got {ratios!r}")
    return r


def sort_edges(edges: np.ndarray, num_items: int) -> np.ndarray:
    """Edges ordered by (user, item); free when they already are (every loader's output is)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    key = edges[:, 0] * num_items + edges[:, 1]
    if len(key) < 2 or bool(np.all(key[1:] >= key[:-1])):
        return edges
    return edges[sort_numeric(key, return_order=True)[1]]


def _segment_ranks(group: np.ndarray, num_groups: int, rng: np.random.Generator):
    """A uniformly random rank (0..size-1) of each element inside its group, and its group's size,
    both in input order. One sort of ``group << 32 | random32`` (ties keep input order)."""
    if num_groups >= 1 << 31:
        raise DataError(f"too many groups ({num_groups}) for a 32-bit random key")
    key = (group.astype(np.int64) << 32) | rng.integers(0, 1 << 32, len(group), dtype=np.int64)
    _, order = sort_numeric(key, return_order=True)
    counts = np.bincount(group, minlength=num_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - starts[group[order]]
    return rank, counts[group]


def random_labels(users: np.ndarray, num_users: int, ratios, rng: np.random.Generator) -> np.ndarray:
    """0 (train) / 1 (valid) / 2 (test) per interaction, by the per-user rule of the module docstring."""
    _, r_valid, r_test = check_ratios(ratios)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int8)
    rank, n = _segment_ranks(users, num_users, rng)
    n_test = np.floor(n * r_test + 0.5).astype(np.int64)
    n_valid = np.floor(n * r_valid + 0.5).astype(np.int64)
    keep_all = n - n_test - n_valid < 1
    n_test[keep_all] = 0
    n_valid[keep_all] = 0
    labels = np.zeros(len(users), dtype=np.int8)
    labels[rank < n_test + n_valid] = 1
    labels[rank < n_test] = 2
    return labels


def split_random(edges: np.ndarray, num_users: int, num_items: int, ratios=DEFAULT_RATIOS,
                 rng: np.random.Generator | int = 0):
    """Per-user random split (module docstring). Returns (train, valid, test) int64 [n, 2] arrays."""
    check_ratios(ratios)
    rng = np.random.default_rng(rng)
    edges = sort_edges(edges, num_items)
    labels = random_labels(edges[:, 0], num_users, ratios, rng)
    return tuple(edges[labels == k] for k in (0, 1, 2))


def carve_valid(train: np.ndarray, num_users: int, valid_fraction: float,
                rng: np.random.Generator | int = 0):
    """(train - valid, valid): ``round(valid_fraction * n)`` of each user's n training interactions
    (half rounds up) go to valid, uniformly at random; a user always keeps one in train."""
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction: expected a fraction in (0, 1), got {valid_fraction!r}")
    rng = np.random.default_rng(rng)
    train = np.asarray(train, dtype=np.int64).reshape(-1, 2)
    labels = random_labels(train[:, 0], num_users, (1.0 - valid_fraction, valid_fraction, 0.0), rng)
    return train[labels == 0], train[labels == 1]


def choose_cold_items(edges: np.ndarray, num_items: int, cold_fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``round(cold_fraction * #items with interactions)`` items, uniformly among those items."""
    if not 0.0 <= cold_fraction < 1.0:
        raise DataError(f"cold_fraction: expected a fraction in [0, 1), got {cold_fraction!r}")
    seen = np.flatnonzero(np.bincount(edges[:, 1], minlength=num_items))
    k = int(round(cold_fraction * len(seen)))
    return np.sort(rng.choice(seen, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


def split_cold(edges: np.ndarray, num_users: int, num_items: int, cold_fraction: float = 0.2,
               ratios=DEFAULT_RATIOS, rng: np.random.Generator | int = 0, cold_items=None):
    """Cold-item holdout (module docstring). ``cold_items`` overrides the random choice (the
    synthetic generator passes its own). Returns (train, valid, test, cold_items)."""
    rng = np.random.default_rng(rng)
    check_ratios(ratios)
    edges = sort_edges(edges, num_items)
    if cold_items is None:
        cold_items = choose_cold_items(edges, num_items, cold_fraction, rng)
    cold_items = sorted_unique(np.asarray(cold_items, dtype=np.int64).reshape(-1))
    if cold_items.size and (cold_items[0] < 0 or cold_items[-1] >= num_items):
        raise DataError(f"cold_items: ids must lie in [0, {num_items})")
    is_cold_item = np.zeros(num_items, dtype=bool)
    is_cold_item[cold_items] = True
    is_valid_cold = np.zeros(num_items, dtype=bool)
    is_valid_cold[cold_items[rng.permutation(cold_items.size)[: cold_items.size // 2]]] = True
    cold_mask = is_cold_item[edges[:, 1]]
    labels = np.zeros(len(edges), dtype=np.int8)
    labels[cold_mask] = np.where(is_valid_cold[edges[cold_mask, 1]], 1, 2)   # all of an item in one split
    labels[~cold_mask] = random_labels(edges[~cold_mask, 0], num_users, ratios, rng)
    return (*(edges[labels == k] for k in (0, 1, 2)), cold_items)
