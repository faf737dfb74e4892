"""Synthetic interactions with power-law popularity, latent tastes and attribute-bearing item text.

Model
-----
* Every item has three taste attributes, drawn uniformly: a genre (12 values), a mood (8) and a
  setting (6), plus a distractor attribute, its format (4), that no user cares about. The item's
  latent factor is the sum of one random ``dim``-vector per attribute value:
  ``v_i = E_genre[g_i] + E_mood[m_i] + E_setting[s_i]`` (format has no vector).
* Every user has a latent factor ``u ~ N(0, I_dim)`` and an activity level ``~ LogNormal(0, 1)``;
  user ``u`` gets ``1 + Multinomial(N - num_users, activity)`` interactions (every user at least one
  when ``N >= num_users``).
* Items have power-law popularity ``pop_i ∝ rank_i ** -popularity_exponent`` over a random ranking.
* Each interaction of user ``u`` picks item ``i`` with probability
  ``∝ pop_i * exp(taste * <u, v_i> / sqrt(dim))``: a softmax over affinity times popularity.
* The item text states its attribute values in words (``"Item 17: a dark sci-fi story set in outer
  space. Format: short."``), so a text encoder can recover the taste-relevant part of ``v_i``: items
  that share a genre share that genre's word, and no other item's text contains it. Popularity is
  not in the text: that is what the graph branch adds.
* ``cold_fraction`` of the items (uniform over items, so both head and tail ones) are cold: the
  "cold" split keeps all their interactions out of train (splits.py deals them to valid/test).

Sampling is exact and vectorised: since ``v_i`` depends only on the item's (genre, mood, setting)
group (12*8*6 = 576 groups), a draw is "pick a group from the user's softmax over groups weighted
by the group's total popularity, then an item inside the group by popularity". Both steps are one
``searchsorted`` over row-offset CDFs (row ``r``'s CDF lives in ``[r, r+1]``), over chunks of users.
Duplicate (user, item) draws are merged and redrawn until exactly ``num_interactions`` distinct
pairs exist (a random surplus is dropped).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from . import splits as _splits
from .dataset import DataError, Dataset, logger, merge_sorted_unique, sorted_unique

GENRES = ("sci-fi", "fantasy", "mystery", "romance", "horror", "comedy", "documentary", "western",
          "thriller", "drama", "animation", "musical")
MOODS = ("dark", "uplifting", "quirky", "tense", "gentle", "epic", "melancholic", "playful")
SETTINGS = ("a coastal town", "outer space", "a medieval kingdom", "a big city", "the desert",
            "a remote island")
FORMATS = ("short", "feature-length", "serialized", "illustrated")      # distractor: no taste effect
ATTRIBUTES = {"genre": GENRES, "mood": MOODS, "setting": SETTINGS, "format": FORMATS}
TASTE_ATTRIBUTES = ("genre", "mood", "setting")

# Cells (users x groups) of one chunk's CDF: 4M float64 = 32 MiB, large enough that per-chunk
# overhead is negligible at 20M interactions, small enough to stay in cache-friendly sizes.
_CHUNK_CELLS = 1 << 22


def _draw(rng, users, counts, user_f, group_f, log_group_pop, scale, item_key, items_by_group):
    """Items for ``counts[k]`` draws of user ``users[k]``; returns (user, item) int64 arrays."""
    G = group_f.shape[0]
    b_max = max(1, _CHUNK_CELLS // G)
    out_u, out_i = [], []
    for s in range(0, len(users), b_max):
        uu, cc = users[s:s + b_max], counts[s:s + b_max]
        b = len(uu)
        logits = (user_f[uu] @ group_f.T).astype(np.float32)
        logits *= scale
        logits += log_group_pop
        logits -= logits.max(axis=1, keepdims=True)
        # One running CDF over the whole chunk (not normalised per row): row r owns (T[r-1], T[r]],
        # so a draw for row r is T[r-1] + uniform * (T[r] - T[r-1]). exp in float32, sum in float64.
        cum = np.cumsum(np.exp(logits, out=logits), dtype=np.float64, axis=None)
        t_end = cum[G - 1::G]
        t_start = np.concatenate(([0.0], t_end[:-1]))
        rows = np.repeat(np.arange(b, dtype=np.int64), cc)
        q = t_start[rows] + rng.random(len(rows)) * (t_end - t_start)[rows]
        pos = np.searchsorted(cum, q, side="right")
        # q can round up to T[r] for a uniform within ~1e-16 of 1; clamp so it stays in the row.
        group = np.minimum(pos - rows * G, G - 1)
        ipos = np.searchsorted(item_key, group + rng.random(len(rows)), side="right")
        out_u.append(uu[rows])
        out_i.append(items_by_group[np.minimum(ipos, len(items_by_group) - 1)])
    if not out_u:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_u), np.concatenate(out_i)


def draw_reference(model: "LatentModel", users, counts, rng) -> tuple[np.ndarray, np.ndarray]:
    """Dense ground truth for ``_draw``: per user, the full p(item | user) and ``rng.choice``.
    O(users x items); the baseline of bench/bench_data.py."""
    out_u, out_i = [], []
    for u, c in zip(np.asarray(users).tolist(), np.asarray(counts).tolist()):
        p = model.probabilities([u])[0]
        out_i.append(rng.choice(len(p), size=c, p=p))
        out_u.append(np.full(c, u, dtype=np.int64))
    return np.concatenate(out_u), np.concatenate(out_i).astype(np.int64)


def _multinomial(rng, n: int, p: np.ndarray) -> np.ndarray:
    return rng.multinomial(n, p / p.sum()) if n > 0 else np.zeros(len(p), dtype=np.int64)


def item_text(attrs: dict[str, np.ndarray], item_ids: np.ndarray) -> list[str]:
    g, m, s, f = (np.asarray(ATTRIBUTES[k], dtype=object)[attrs[k]] for k in ("genre", "mood", "setting", "format"))
    return [f"Item {i}: {'an' if mo[0] in 'aeiou' else 'a'} {mo} {ge} story set in {se}. Format: {fo}."
            for i, ge, mo, se, fo in zip(item_ids.tolist(), g.tolist(), m.tolist(), s.tolist(), f.tolist())]


class LatentModel(SimpleNamespace):
    """The generator's hidden state (module docstring): attributes, factors, popularity, and the
    lookup tables ``_draw`` samples from."""

    def probabilities(self, users) -> np.ndarray:
        """Exact p(item | user) as a dense [len(users), num_items] array (for tests on tiny sizes)."""
        logits = self.scale * (self.user_f[users].astype(np.float64) @ self.group_f.T.astype(np.float64))
        w = np.exp(logits - logits.max(1, keepdims=True))[:, self.group] * self.pop
        return w / w.sum(1, keepdims=True)


def latent_model(num_users: int, num_items: int, dim: int, popularity_exponent: float, taste: float,
                 rng: np.random.Generator) -> LatentModel:
    attrs = {k: rng.integers(0, len(v), num_items) for k, v in ATTRIBUTES.items()}
    card = [len(ATTRIBUTES[k]) for k in TASTE_ATTRIBUTES]
    group = (attrs["genre"] * card[1] + attrs["mood"]) * card[2] + attrs["setting"]
    G = int(np.prod(card))
    emb = {k: rng.standard_normal((len(ATTRIBUTES[k]), dim)) / math.sqrt(len(TASTE_ATTRIBUTES))
           for k in TASTE_ATTRIBUTES}
    gg, gm, gs = np.unravel_index(np.arange(G), card)
    group_f = (emb["genre"][gg] + emb["mood"][gm] + emb["setting"][gs]).astype(np.float32)   # [G, dim]
    rank = rng.permutation(num_items)
    pop = (rank + 1.0) ** -float(popularity_exponent)
    group_pop = np.bincount(group, weights=pop, minlength=G)
    with np.errstate(divide="ignore"):
        log_group_pop = np.log(group_pop).astype(np.float32)                       # -inf: empty group
    items_by_group = np.argsort(group, kind="stable")
    gsorted = group[items_by_group]
    cum = np.cumsum(pop[items_by_group])
    before = np.concatenate(([0.0], cum))[np.searchsorted(gsorted, np.arange(G))]   # mass before group g
    item_key = gsorted + (cum - before[gsorted]) / group_pop[gsorted]            # group g lives in (g, g+1]
    last = np.r_[gsorted[1:] != gsorted[:-1], True]
    item_key[last] = gsorted[last] + 1.0                                         # exact right ends
    user_f = rng.standard_normal((num_users, dim)).astype(np.float32)
    activity = rng.lognormal(0.0, 1.0, num_users)
    return LatentModel(attrs=attrs, group=group, group_f=group_f, pop=pop, log_group_pop=log_group_pop,
                       item_key=item_key, items_by_group=items_by_group, user_f=user_f, activity=activity,
                       scale=float(taste) / math.sqrt(dim))


def make_synthetic(num_users: int = 2000, num_items: int = 1000, num_interactions: int = 50_000, dim: int = 16,
                   cold_fraction: float = 0.2, popularity_exponent: float = 1.0, taste: float = 2.0,
                   split: str = "cold", seed: int = 0, ratios=_splits.DEFAULT_RATIOS, with_text: bool = True,
                   name: str = "synthetic") -> Dataset:
    """A synthetic Dataset (see the module docstring for the model).

    The defaults (2k users x 1k items x 50k interactions) are the quickstart's size. ``split`` is
    "cold" (default: the generator's cold items held out) or "random" (cold items ignored).
    ``taste`` scales the affinity logits (their std is about ``taste``); ``with_text=False`` skips
    building the strings for benchmark-sized graphs.
    """
    for k, v in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
        if int(v) != v or v < 1:
            raise DataError(f"make_synthetic: {k} must be a positive integer, got {v!r}")
    if int(num_interactions) != num_interactions or num_interactions < 1:
        raise DataError(f"make_synthetic: num_interactions must be a positive integer, got {num_interactions!r}")
    num_users, num_items, N = int(num_users), int(num_items), int(num_interactions)
    if N > num_users * num_items:
        raise DataError(f"make_synthetic: num_interactions={N} exceeds num_users * num_items = "
                        f"{num_users * num_items} distinct (user, item) pairs")
    if split not in ("cold", "random"):
        raise DataError(f"make_synthetic: split={split!r}: expected 'cold' or 'random' (no given split)")
    if not 0.0 <= cold_fraction < 1.0:
        raise DataError(f"make_synthetic: cold_fraction must lie in [0, 1), got {cold_fraction!r}")
    if popularity_exponent < 0:
        raise DataError(f"make_synthetic: popularity_exponent must be >= 0, got {popularity_exponent!r}")
    rng = np.random.default_rng(seed)
    m = latent_model(num_users, num_items, dim, popularity_exponent, taste, rng)
    draw = lambda counts: _draw(rng, np.flatnonzero(counts), counts[counts > 0], m.user_f, m.group_f,  # noqa: E731
                                m.log_group_pop, m.scale, m.item_key, m.items_by_group)
    activity, attrs = m.activity, m.attrs

    counts = (1 + _multinomial(rng, N - num_users, activity)) if N >= num_users else _multinomial(rng, N, activity)
    u, i = draw(counts)
    keys = sorted_unique(u * num_items + i)
    drawn, fresh, rounds = len(u), len(keys), 0
    while len(keys) < N:
        rounds += 1
        if rounds > 30:
            raise DataError(f"make_synthetic: could not draw {N} distinct interactions after 30 rounds "
                            f"(have {len(keys)}); the requested density is too high for this popularity skew")
        # Draw enough for the deficit at the last round's yield of new pairs (+10%): 1-3 rounds
        # instead of ~8 with a fixed 1.5x (20M interactions, 200k x 100k).
        yield_ = max(fresh / max(drawn, 1), 0.02)
        u, i = draw(_multinomial(rng, int((N - len(keys)) / yield_ * 1.1) + 16, activity))
        keys, fresh = merge_sorted_unique(keys, u * num_items + i)
        drawn = len(u)
    if len(keys) > N:
        keys = np.delete(keys, rng.choice(len(keys), len(keys) - N, replace=False))
    edges = np.stack([keys // num_items, keys % num_items], axis=1)
    logger.info("make_synthetic: %d interactions drawn (%d redraw rounds for duplicates)", N, rounds)

    cold = None
    if split == "cold":
        cold_items = np.sort(rng.choice(num_items, int(round(cold_fraction * num_items)), replace=False))
        train, valid, test, cold = _splits.split_cold(edges, num_users, num_items, ratios=ratios, rng=rng,
                                                      cold_items=cold_items)
        cold = torch.from_numpy(cold)
    else:
        train, valid, test = _splits.split_random(edges, num_users, num_items, ratios, rng)
    ids = np.arange(num_items)
    fields = {k: [ATTRIBUTES[k][a] for a in attrs[k].tolist()] for k in ATTRIBUTES} if with_text else None
    return Dataset(name=name, split=split, num_users=num_users, num_items=num_items,
                   train=torch.from_numpy(train), valid=torch.from_numpy(valid), test=torch.from_numpy(test),
                   user_ids=np.arange(num_users), item_ids=ids,
                   item_text=item_text(attrs, ids) if with_text else None, item_fields=fields,
                   cold_items=cold, seed=seed,
                   stats={"redraw_rounds": rounds, "popularity_exponent": popularity_exponent, "taste": taste})
