"""Item and user content vectors: cached item encoding, and users as the mean of their items.

User mix (documented choice): a user's vector is the mean of the vectors of the items in their
training interactions (each (user, item) row counts once, so repeated interactions weigh more).
When the dataset has user text, ``u = (1 - text_weight) * mean_items + text_weight * user_text``
for users with training items, and ``u = user_text`` for users without (cold users), so a cold user
still gets a content vector. Users with neither get the zero vector.
"""
from __future__ import annotations

import logging
import time

import torch

from .cache import VectorCache, text_hash
from .encoders import TextEncoder, check_texts
from .prompts import build_item_text

logger = logging.getLogger("glrec_fast.text")


def _as_texts(dataset_or_texts) -> list[str]:
    if isinstance(dataset_or_texts, str):
        raise TypeError("encode_items got a single string: expected a Dataset or a list of str")
    if isinstance(dataset_or_texts, (list, tuple)):
        return list(dataset_or_texts)
    if hasattr(dataset_or_texts, "item_text") or hasattr(dataset_or_texts, "item_fields"):
        return build_item_text(dataset_or_texts)
    raise TypeError(f"encode_items got {type(dataset_or_texts).__name__}: expected a Dataset (with "
                    f"item_text or item_fields) or a list of str")


def encode_items(dataset_or_texts, encoder: TextEncoder, cache_dir=None, *, on_empty=None,
                 use_cache: bool = True) -> torch.Tensor:
    """Vectors of all item texts -> FloatTensor [num_items, dim] (CPU), through the disk cache.

    cache_dir: default GLREC_CACHE_DIR or ~/.cache/glrec_fast. Only texts whose hash is not cached
    under ``encoder.cache_key`` are run through the model; duplicate texts are encoded once.
    """
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"encoder is {type(encoder).__name__}: expected a TextEncoder from "
                        f"glrec_fast.text.get_encoder")
    texts = check_texts(_as_texts(dataset_or_texts), on_empty or getattr(encoder, "on_empty", "raise"))
    n = len(texts)
    if n == 0:
        return torch.empty(0, encoder.dim, dtype=torch.float32)
    hashes = [text_hash(t) for t in texts]
    cache = VectorCache(cache_dir, encoder.cache_key) if use_cache else None
    t0 = time.perf_counter()
    out, found, exact = (cache.lookup(hashes) if cache is not None
                         else (None, torch.zeros(n, dtype=torch.bool), False))
    if exact:
        logger.info("text cache hit: %d vectors of %s from %s in %.2fs", n, encoder.name, cache.dir,
                    time.perf_counter() - t0)
        return out
    if out is None:
        out = torch.empty(n, encoder.dim, dtype=torch.float32)
    missing = (~found).nonzero().flatten().tolist()
    first_of: dict[str, int] = {}
    for i in missing:
        first_of.setdefault(hashes[i], i)
    todo = list(first_of.values())
    if cache is not None:
        logger.info("text cache: %d of %d texts cached, encoding %d unique new ones with %s",
                    n - len(missing), n, len(todo), encoder.name)
    vecs = encoder.encode([texts[i] for i in todo], on_empty="raise")
    if vecs.shape != (len(todo), encoder.dim):
        raise RuntimeError(f"{encoder.name}.encode returned shape {tuple(vecs.shape)}, expected "
                           f"{(len(todo), encoder.dim)}")
    by_hash = {hashes[i]: r for r, i in enumerate(todo)}
    rows = torch.tensor([by_hash[hashes[i]] for i in missing], dtype=torch.long)
    out[torch.tensor(missing, dtype=torch.long)] = vecs[rows]
    if cache is not None:
        cache.save(hashes, out)
    return out


def user_vectors(item_vecs: torch.Tensor, train_pairs: torch.Tensor, num_users: int,
                 user_text_vecs: torch.Tensor | None = None, *, text_weight: float = 0.5,
                 user_has_text: torch.Tensor | None = None) -> torch.Tensor:
    """User content vectors [num_users, dim]: mean of their training items' vectors, mixed with
    their own text vector when given (see the module docstring for the mix)."""
    if not torch.is_tensor(item_vecs) or item_vecs.dim() != 2:
        raise ValueError(f"item_vecs must be a 2-D tensor [num_items, dim], got "
                         f"{getattr(item_vecs, 'shape', type(item_vecs).__name__)}")
    if not torch.is_tensor(train_pairs) or train_pairs.dim() != 2 or train_pairs.shape[1] != 2:
        raise ValueError(f"train_pairs must be a LongTensor [n, 2] of (user, item), got "
                         f"{getattr(train_pairs, 'shape', type(train_pairs).__name__)}")
    if train_pairs.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"train_pairs must be an integer tensor, got dtype {train_pairs.dtype}")
    num_users = int(num_users)
    if num_users < 0:
        raise ValueError(f"num_users={num_users}: expected >= 0")
    if not 0.0 <= float(text_weight) <= 1.0:
        raise ValueError(f"text_weight={text_weight}: expected a number in [0, 1]")
    num_items, dim = item_vecs.shape
    pairs = train_pairs.to(torch.long).cpu()
    u, i = pairs[:, 0], pairs[:, 1]
    for col, ids, bound, what in ((0, u, num_users, "user"), (1, i, num_items, "item")):
        bad = ((ids < 0) | (ids >= bound)).nonzero()
        if len(bad):
            r = int(bad[0])
            raise ValueError(f"train_pairs[{r}, {col}] = {int(ids[r])} is not a valid {what} id: "
                             f"expected 0 <= id < {bound} ({len(bad)} bad rows)")
    vecs = item_vecs.detach().to("cpu", torch.float32)
    sums = torch.zeros(num_users, dim, dtype=torch.float32).index_add_(0, u, vecs[i])
    counts = torch.bincount(u, minlength=num_users).to(torch.float32)
    mean = sums / counts.clamp(min=1.0).unsqueeze(1)
    if user_text_vecs is None:
        return mean
    tv = user_text_vecs.detach().to("cpu", torch.float32)
    if tv.shape != (num_users, dim):
        raise ValueError(f"user_text_vecs has shape {tuple(tv.shape)}: expected (num_users, dim) = "
                         f"{(num_users, dim)} (same encoder as the items)")
    has_text = (torch.ones(num_users, dtype=torch.bool) if user_has_text is None
                else user_has_text.to("cpu", torch.bool))
    if has_text.shape != (num_users,):
        raise ValueError(f"user_has_text has shape {tuple(has_text.shape)}: expected ({num_users},)")
    has_items = (counts > 0).unsqueeze(1)
    has_text = has_text.unsqueeze(1)
    w = float(text_weight)
    mixed = torch.where(has_items, (1.0 - w) * mean + w * tv, tv)
    return torch.where(has_text, mixed, mean)


def encode_users(dataset, encoder: TextEncoder, item_vecs: torch.Tensor, cache_dir=None, *,
                 text_weight: float = 0.5) -> torch.Tensor:
    """User vectors for a data-layer Dataset: ``user_vectors`` over ``dataset.train``, mixed with
    ``dataset.user_text`` when the dataset has it (users with empty text get the item mean only)."""
    user_text = getattr(dataset, "user_text", None)
    num_users = int(dataset.num_users)
    if user_text is None:
        return user_vectors(item_vecs, dataset.train, num_users)
    user_text = list(user_text)
    if len(user_text) != num_users:
        raise ValueError(f"dataset.user_text has {len(user_text)} entries, expected num_users="
                         f"{num_users}")
    has = torch.tensor([isinstance(t, str) and bool(t.strip()) for t in user_text], dtype=torch.bool)
    tv = torch.zeros(num_users, item_vecs.shape[1], dtype=torch.float32)
    idx = has.nonzero().flatten()
    if len(idx):
        tv[idx] = encode_items([user_text[j] for j in idx.tolist()], encoder, cache_dir)
    return user_vectors(item_vecs, dataset.train, num_users, tv, text_weight=text_weight,
                        user_has_text=has)
