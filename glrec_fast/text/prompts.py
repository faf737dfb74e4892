"""Item text from dataset fields, and the prompt used by last-token pooling.

The data layer gives ``Dataset.item_text`` (``list[str] | None``) ready made; when it is missing we
build one string per item from ``Dataset.item_fields`` (title, year, genres and any other columns).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# Field names as RecBole atomic files and our own loaders spell them; first match wins.
_TITLE_KEYS = ("title", "movie_title", "name", "item_name", "item_title")
_YEAR_KEYS = ("year", "release_year")
_GENRE_KEYS = ("genres", "genre", "class", "categories", "category")
_SKIP_KEYS = ("item_id", "id")

# PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"): asking a
# decoder-only LM to sum the text up "in one word" makes the hidden state of the last prompt token a
# usable sentence embedding without fine-tuning. Plain last-token pooling of the raw text instead
# mostly encodes the last word of the title.
DEFAULT_PROMPT = 'This item: "{text}" means in one word:"'


def build_prompt(text: str, template: str = DEFAULT_PROMPT) -> str:
    """Wrap one item text in the last-token prompt (``template`` must contain ``{text}``)."""
    if "{text}" not in template:
        raise ValueError(f"prompt template {template!r} must contain the placeholder '{{text}}'")
    return template.replace("{text}", text)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value if str(v).strip())
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _fmt(value.tolist())
    if isinstance(value, float) and value.is_integer():  # years parsed as floats: 1995.0 -> 1995
        return str(int(value))
    return str(value).strip()


def format_item(fields: Mapping) -> str:
    """One item's fields -> "Title (year). Genres: a, b. key: value." (missing parts are left out)."""
    keys = {k.lower(): k for k in fields}

    def take(candidates):
        for c in candidates:
            if c in keys:
                return keys.pop(c)
        return None

    title_k, year_k, genre_k = take(_TITLE_KEYS), take(_YEAR_KEYS), take(_GENRE_KEYS)
    for s in _SKIP_KEYS:
        keys.pop(s, None)
    title = _fmt(fields[title_k]) if title_k else ""
    year = _fmt(fields[year_k]) if year_k else ""
    genres = _fmt(fields[genre_k]) if genre_k else ""
    head = title
    if year and f"({year})" not in title:  # ml-100k raw titles already carry "(1977)"
        head = f"{title} ({year})" if title else year
    parts = [head] if head else []
    if genres:
        parts.append(f"Genres: {genres}")
    for low, k in keys.items():
        v = _fmt(fields[k])
        if v:
            parts.append(f"{k}: {v}")
    return ". ".join(parts)


def _rows(item_fields) -> list[Mapping]:
    """Accept columns (``{field: sequence}``) or rows (``[{field: value}, ...]``)."""
    if isinstance(item_fields, Mapping):
        cols = {k: list(v) for k, v in item_fields.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Dataset.item_fields columns have different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        return [{k: cols[k][i] for k in cols} for i in range(n)]
    if isinstance(item_fields, Sequence) and not isinstance(item_fields, str):
        for i, row in enumerate(item_fields):
            if not isinstance(row, Mapping):
                raise TypeError(f"Dataset.item_fields[{i}] is {type(row).__name__}: expected a mapping "
                                f"field -> value")
        return list(item_fields)
    raise TypeError(f"Dataset.item_fields is {type(item_fields).__name__}: expected a mapping "
                    f"field -> per-item values, or a list of per-item mappings")


def build_item_text(dataset) -> list[str]:
    """One text per item (indexed by contiguous item id) for a data-layer ``Dataset``.

    Uses ``dataset.item_text`` when the loader made it, else formats ``dataset.item_fields``.
    Raises ValueError when the dataset has neither, or when the count is not ``num_items``.
    """
    texts = getattr(dataset, "item_text", None)
    if texts is None:
        fields = getattr(dataset, "item_fields", None)
        if fields is None:
            name = getattr(dataset, "name", type(dataset).__name__)
            raise ValueError(f"dataset {name!r} has no item_text and no item_fields: the language "
                             f"branch needs item text (ml-100k and synthetic have it)")
        texts = [format_item(row) for row in _rows(fields)]
    texts = list(texts)
    n = getattr(dataset, "num_items", None)
    if n is not None and len(texts) != int(n):
        raise ValueError(f"dataset has {len(texts)} item texts but num_items={n}: expected one text "
                         f"per contiguous item id")
    return texts
