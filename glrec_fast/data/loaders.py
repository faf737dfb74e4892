"""Readers for the three on-disk formats, and the pipeline that turns them into a Dataset.

Formats
-------
* LightGCN text (``train.txt`` / ``test.txt``): one line per user, ``user item item ...``, ids are
  non-negative integers separated by spaces or tabs. A line holding only a user id adds nothing.
  Blank lines are ignored. Parsed with numpy over the whole file (Gowalla's 1M ids in ~0.2 s).
* RecBole atomic files (``NAME.inter``, optional ``NAME.item`` / ``NAME.user``; or the benchmark
  trio ``NAME.train.inter`` / ``NAME.valid.inter`` / ``NAME.test.inter`` which is a given split):
  tab-separated, first line a typed header ``field:type`` with type in token, token_seq, float,
  float_seq. ``.inter`` needs ``user_id:token`` and ``item_id:token``. Tokens are strings (RecBole's
  definition, e.g. Amazon ASINs); when every token is a canonical integer they become int ids.
* CSV (``user,item[,rating,timestamp]``; tab-separated when the first line has tabs and no commas),
  header optional: a first line whose first field is not an integer is a header, whose columns are
  found by name (user/user_id/uid, item/item_id/iid, rating, timestamp). User and item ids must be
  non-negative integers; ratings and timestamps, when present, must be numbers.
* A DataFrame-like object (anything with ``obj["user"]`` and ``obj["item"]`` array-likes, e.g. a
  dict of numpy arrays or a pandas DataFrame); rows are reported 0-based.

Rules (documented choices)
--------------------------
* Ids are remapped to contiguous ranges in ascending original order (integers numerically, string
  tokens lexicographically); ``Dataset.user_ids`` / ``item_ids`` hold the originals.
* Duplicate (user, item) interactions are kept once (first occurrence); the count is logged through
  ``logging.getLogger("glrec_fast.data")`` (warning) and kept in ``Dataset.stats``.
* ``given`` split: every test (and valid) user and item must appear in training. By default a
  violation is a DataError naming the file and line; ``on_unseen="drop"`` drops those interactions
  and logs the count instead. A (user, item) pair present in train and in test is dropped from test
  (it would be masked at evaluation anyway) with a logged count. Gowalla has neither.
* All interactions count as implicit feedback, whatever their rating.
* Bad input raises ``DataError`` (a ValueError) naming the file and 1-based line: malformed lines,
  wrong field counts, non-integer or negative ids, empty files, unparseable numbers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import splits as _splits
from .dataset import DataError, Dataset, logger, remap, tokens_to_ids, unique_first

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
# An int64 holds every 18-digit decimal; longer ids are refused rather than silently wrapped.
_MAX_ID_DIGITS = 18


@dataclass
class Part:
    """Interactions read from one file, in original ids, with where each came from."""
    users: np.ndarray
    items: np.ndarray
    lines: np.ndarray     # 1-based line (or 0-based row for frames) of each interaction
    path: str
    unit: str = "line"

    def where(self, k: int) -> str:
        return f"{self.path}:{int(self.lines[k])}" if self.unit == "line" else f"{self.path} row {int(self.lines[k])}"

    def take(self, mask: np.ndarray) -> "Part":
        return Part(self.users[mask], self.items[mask], self.lines[mask], self.path, self.unit)


def _read_bytes(path) -> bytes:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: expected a file, found a directory") from None
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    return data


def _decode(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _id_problem(tok) -> str:
    tok = str(tok)                                   # np.str_ would print as np.str_('x')
    if re.fullmatch(r"-\d+", tok):
        return f"negative id {tok!r}"
    if tok == "":
        return "empty id"
    return f"non-integer id {tok!r}"


# ---------------------------------------------------------------------------------------- LightGCN
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 13, 32]] = True
_LGCN_BAD = re.compile(rb"[^0-9 \t\r\n]")


def read_lightgcn(path) -> Part:
    """``user item item ...`` per line (module docstring)."""
    path = os.fspath(path)
    data = _read_bytes(path)
    m = _LGCN_BAD.search(data)
    if m:
        line = data.count(b"\n", 0, m.start()) + 1
        lo = max(data.rfind(b" ", 0, m.start()), data.rfind(b"\t", 0, m.start()), data.rfind(b"\n", 0, m.start())) + 1
        hi = m.start()
        while hi < len(data) and not _WS[data[hi]]:
            hi += 1
        tok = data[lo:hi].decode("utf-8", "replace")
        raise DataError(f"{path}:{line}: {_id_problem(tok)}: expected lines 'user item item ...' of "
                        f"non-negative integer ids separated by spaces")
    buf = np.frombuffer(data, dtype=np.uint8)
    ws = _WS[buf]
    starts = np.flatnonzero(~ws & np.concatenate(([True], ws[:-1])))
    ends = np.flatnonzero(~ws & np.concatenate((ws[1:], [True])))
    line = np.searchsorted(np.flatnonzero(buf == 10), starts)          # 0-based line of each token
    long = np.flatnonzero(ends - starts + 1 > _MAX_ID_DIGITS)
    if long.size:
        k = long[0]
        raise DataError(f"{path}:{line[k] + 1}: id {data[starts[k]:ends[k] + 1].decode()!r} has more than "
                        f"{_MAX_ID_DIGITS} digits: expected ids that fit in int64")
    values = np.fromstring(data, dtype=np.int64, sep=" ")  # text mode: any whitespace separates
    if values.size != starts.size:   # cannot happen after the checks above; never return a wrong parse
        raise DataError(f"{path}: parsed {values.size} ids but found {starts.size} tokens")
    first = np.concatenate(([True], line[1:] != line[:-1]))           # the user id of each line
    owner = np.maximum.accumulate(np.where(first, np.arange(len(values)), 0))
    keep = ~first
    return Part(values[owner][keep], values[keep], line[keep] + 1, path)


def read_lightgcn_reference(path) -> Part:
    """Plain per-line Python parse of the same format: the ground truth the vectorised reader is
    tested against and the baseline of bench/bench_data.py. No validation beyond int()."""
    users, items, lines = [], [], []
    with open(path, "rb") as f:
        for k, line in enumerate(f, 1):
            tok = line.split()
            if len(tok) > 1:
                u = int(tok[0])
                for t in tok[1:]:
                    users.append(u)
                    items.append(int(t))
                    lines.append(k)
    return Part(np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
                np.array(lines, dtype=np.int64), os.fspath(path))


# ---------------------------------------------------------------------------------------- tables
def _read_table(path, sep: str | None, header: bool = False):
    """Split a delimited text file into a [rows, cols] str array with 1-based line numbers.

    ``header=True``: the first non-blank line is a header (returned), else it is the first row for
    the caller to decide. ``sep=None``: tab when the first line has tabs and no commas, else comma.
    Every row must have the same number of fields (no quoting: fields cannot contain ``sep``).
    """
    path = os.fspath(path)
    text = _decode(_read_bytes(path), path)
    raw = text.split("\n")
    lines = [(k + 1, l[:-1] if l.endswith("\r") else l) for k, l in enumerate(raw)]
    lines = [(k, l) for k, l in lines if l.strip()]
    if sep is None:
        first = lines[0][1]
        sep = "\t" if (path.endswith(".tsv") or ("\t" in first and "," not in first)) else ","
    head = None
    if header:
        head = lines[0][1].split(sep)
        lines = lines[1:]
        if not lines:
            raise DataError(f"{path}: no data rows after the header line")
    ncol = len(head) if head is not None else lines[0][1].count(sep) + 1
    counts = np.fromiter((l.count(sep) for _, l in lines), dtype=np.int64, count=len(lines))
    bad = np.flatnonzero(counts != ncol - 1)
    if bad.size:
        k, l = lines[bad[0]]
        what = f"the header's {ncol} ({sep.join(head)!r})" if head is not None else f"{ncol} like the first line"
        raise DataError(f"{path}:{k}: malformed line {l[:80]!r}: found {counts[bad[0]] + 1} "
                        f"{'tab' if sep == chr(9) else repr(sep)}-separated fields, expected {what}")
    cells = np.array(sep.join(l for _, l in lines).split(sep) if ncol > 1 else [l for _, l in lines], dtype=str)
    cells = cells.reshape(len(lines), ncol)
    line_no = np.fromiter((k for k, _ in lines), dtype=np.int64, count=len(lines))
    return head, cells, line_no, sep


def _int_ids(col: np.ndarray, line_no: np.ndarray, path, what: str, expect: str) -> np.ndarray:
    col = np.char.strip(col)
    joined = "\n".join(col.tolist())
    m = re.search(r"[^0-9\n]", joined)
    empty = np.flatnonzero(np.char.str_len(col) == 0)
    bad = []
    if m:
        bad.append(joined.count("\n", 0, m.start()))
    if empty.size:
        bad.append(int(empty[0]))
    if bad:
        k = min(bad)
        raise DataError(f"{path}:{line_no[k]}: {_id_problem(col[k])} in the {what} column: {expect}")
    long = np.flatnonzero(np.char.str_len(col) > _MAX_ID_DIGITS)
    if long.size:
        k = long[0]
        raise DataError(f"{path}:{line_no[k]}: {what} id {str(col[k])!r} has more than {_MAX_ID_DIGITS} digits")
    return col.astype(np.int64)


def _numbers(col: np.ndarray, line_no: np.ndarray, path, what: str, allow_empty: bool) -> None:
    """Check that a column holds numbers (error names the line)."""
    col = np.char.strip(col)
    present = np.char.str_len(col) > 0
    try:
        col[present].astype(np.float64)
        ok = allow_empty or bool(present.all())
    except ValueError:
        ok = False
    if ok:
        return
    for k, v in enumerate(col.tolist()):
        try:
            if v or not allow_empty:
                float(v)
        except ValueError:
            raise DataError(f"{path}:{line_no[k]}: {what} {v!r} is not a number") from None


# ---------------------------------------------------------------------------------------- RecBole
@dataclass
class AtomicTable:
    path: str
    fields: list[str]       # names without types
    types: list[str]
    cells: np.ndarray       # [rows, cols] str
    lines: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.cells[:, self.fields.index(name)]


def read_atomic(path) -> AtomicTable:
    path = os.fspath(path)
    head, cells, line_no, _ = _read_table(path, "\t", header=True)
    names, types = [], []
    for f in head:
        name, _, typ = f.strip().rpartition(":")
        if not name or typ not in ATOMIC_TYPES:
            raise DataError(f"{path}:1: header field {f!r} is not 'name:type' with type one of "
                            f"{', '.join(ATOMIC_TYPES)} (RecBole atomic file header)")
        names.append(name)
        types.append(typ)
    if len(set(names)) != len(names):
        raise DataError(f"{path}:1: duplicate field names in header {head!r}")
    for j, typ in enumerate(types):
        if typ == "float":
            _numbers(cells[:, j], line_no, path, f"field {names[j]!r} (float)", allow_empty=True)
    return AtomicTable(path, names, types, cells, line_no)


def _atomic_part(table: AtomicTable) -> Part:
    for f in ("user_id", "item_id"):
        if f not in table.fields or table.types[table.fields.index(f)] != "token":
            raise DataError(f"{table.path}:1: expected a '{f}:token' field in the header, found "
                            f"{[f'{n}:{t}' for n, t in zip(table.fields, table.types)]}")
    cols = {}
    for f in ("user_id", "item_id"):
        c = np.char.strip(table.column(f))
        empty = np.flatnonzero(np.char.str_len(c) == 0)
        if empty.size:
            raise DataError(f"{table.path}:{table.lines[empty[0]]}: empty {f}")
        cols[f] = c
    return Part(cols["user_id"], cols["item_id"], table.lines, table.path)


def find_atomic(folder) -> dict:
    """{'inter': path} or {'train','valid','test': paths}, plus 'item' / 'user' when present."""
    folder = os.fspath(folder)
    files = sorted(os.listdir(folder))
    stem = os.path.basename(os.path.normpath(folder))
    inter = [f for f in files if f.endswith(".inter")]
    if not inter:
        raise DataError(f"{folder}: no RecBole atomic '.inter' file in this folder")
    stems = sorted({f[:-len(".inter")].rsplit(".", 1)[0] if f[:-6].endswith((".train", ".valid", ".test"))
                    else f[:-len(".inter")] for f in inter})
    if len(stems) > 1:
        if stem not in stems:
            raise DataError(f"{folder}: several atomic datasets {stems}; expected one, or one named like "
                            f"the folder ({stem!r})")
    else:
        stem = stems[0]
    out = {}
    given = [f"{stem}.{p}.inter" for p in ("train", "valid", "test")]
    if all(g in files for g in given):
        out.update({p: os.path.join(folder, g) for p, g in zip(("train", "valid", "test"), given)})
    elif f"{stem}.inter" in files:
        out["inter"] = os.path.join(folder, f"{stem}.inter")
    else:
        raise DataError(f"{folder}: expected {stem}.inter or {', '.join(given)}")
    for kind in ("item", "user"):
        p = os.path.join(folder, f"{stem}.{kind}")
        if os.path.exists(p):
            out[kind] = p
    return out


# ---------------------------------------------------------------------------------------- CSV
_CSV_NAMES = {"user": ("user", "user_id", "userid", "uid"), "item": ("item", "item_id", "itemid", "iid"),
              "rating": ("rating", "score"), "timestamp": ("timestamp", "time", "ts")}


def read_csv(path) -> Part:
    path = os.fspath(path)
    _, cells, line_no, sep = _read_table(path, None)
    row0 = [c.strip() for c in cells[0]]
    expect = f"expected non-negative integer user and item ids (lines 'user{sep}item[{sep}rating{sep}timestamp]')"
    if not re.fullmatch(r"-?\d+", row0[0]):        # a header: find the columns by name
        names = [c.split(":")[0].strip().strip('"').lower() for c in row0]
        col = {}
        for key, aliases in _CSV_NAMES.items():
            hit = [j for j, n in enumerate(names) if n in aliases]
            if hit:
                col[key] = hit[0]
        if "user" not in col or "item" not in col:
            raise DataError(f"{path}:{line_no[0]}: header {row0!r} has no user and item columns: expected "
                            f"names like 'user,item[,rating,timestamp]' (or a first line of integer ids, no header)")
        cells, line_no = cells[1:], line_no[1:]
        if len(cells) == 0:
            raise DataError(f"{path}: no data rows after the header line")
    else:
        if not 2 <= cells.shape[1] <= 4:
            raise DataError(f"{path}:{line_no[0]}: {cells.shape[1]} columns without a header: "
                            f"expected user{sep}item[{sep}rating{sep}timestamp]")
        col = dict(zip(("user", "item", "rating", "timestamp"), range(cells.shape[1])))
    users = _int_ids(cells[:, col["user"]], line_no, path, "user", expect)
    items = _int_ids(cells[:, col["item"]], line_no, path, "item", expect)
    for key in ("rating", "timestamp"):
        if key in col:
            _numbers(cells[:, col[key]], line_no, path, key, allow_empty=False)
    return Part(users, items, line_no, path)


def read_frame(frame, name: str = "frame") -> Part:
    """A DataFrame-like with ``frame["user"]`` and ``frame["item"]`` (integer ids >= 0)."""
    cols = {}
    for key in ("user", "item"):
        try:
            v = frame[key]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{name}: expected a '{key}' column (frame['user'], frame['item'])") from None
        v = np.asarray(getattr(v, "values", v))
        if v.ndim != 1:
            raise DataError(f"{name}['{key}']: expected a 1-D column, got shape {v.shape}")
        if v.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(v) | (v != np.floor(v)))
            if bad.size:
                raise DataError(f"{name}['{key}'] row {bad[0]}: non-integer id {v[bad[0]].item()!r}: expected "
                                f"non-negative integer ids")
            v = v.astype(np.int64)
        elif v.dtype.kind not in "iu":
            try:
                v = v.astype(np.int64)
            except (ValueError, TypeError):
                bad = next(k for k, x in enumerate(v.tolist()) if not re.fullmatch(r"-?\d+", str(x).strip()))
                raise DataError(f"{name}['{key}'] row {bad}: {_id_problem(str(v[bad]))}: expected non-negative "
                                f"integer ids") from None
        v = v.astype(np.int64)
        neg = np.flatnonzero(v < 0)
        if neg.size:
            raise DataError(f"{name}['{key}'] row {neg[0]}: negative id {int(v[neg[0]])}: expected non-negative integer ids")
        cols[key] = v
    if len(cols["user"]) != len(cols["item"]):
        raise DataError(f"{name}: 'user' and 'item' columns differ in length ({len(cols['user'])} vs {len(cols['item'])})")
    if len(cols["user"]) == 0:
        raise DataError(f"{name}: no interactions")
    return Part(cols["user"], cols["item"], np.arange(len(cols["user"])), name, unit="row")


# ---------------------------------------------------------------------------------------- text
_MISSING = {"", "unknown", "unkonwn", "none", "nan", "n/a"}   # "unkonwn": RecBole ml-100k's own typo
_TITLE = ("movie_title", "title", "name", "item_name", "movie_name")
_YEAR = ("release_year", "year")
_GENRE = ("class", "genre", "genres", "categories", "category", "type")


def item_text_from_fields(fields: dict[str, list]) -> list[str]:
    """One description per item: ``"Star Wars (1977). Genres: Action, Adventure, ..."``; other
    fields follow as ``"Field: value."``; missing values (None, "", "unknown") are left out, and an
    item with no row at all gets ``""``."""
    names = list(fields)
    n = len(next(iter(fields.values()))) if fields else 0
    title = next((f for f in _TITLE if f in fields), None)
    year = next((f for f in _YEAR if f in fields), None)
    genre = next((f for f in _GENRE if f in fields), None)
    rest = [f for f in names if f not in (title, year, genre)]
    out = []
    for k in range(n):
        if all(fields[f][k] is None for f in names):     # no row for this item: no text, not "Unknown"
            out.append("")
            continue

        def val(f):
            v = fields[f][k]
            return None if v is None or str(v).strip().lower() in _MISSING else str(v).strip()
        t = (val(title) or "Unknown title") if title else None
        y = val(year) if year else None
        head = f"{t} ({y})" if t and y else (t or (f"Released {y}" if y else ""))
        parts = [head] if head else []
        if genre:
            g = fields[genre][k]
            g = [] if g is None else str(g).split()
            if g:
                parts.append("Genres: " + ", ".join(g))
        for f in rest:
            v = val(f)
            if v:
                parts.append(f"{f.replace('_', ' ').capitalize()}: {v}")
        out.append(". ".join(parts))
    return out


def user_text_from_fields(fields: dict[str, list]) -> list[str]:
    """``"A 24-year-old male technician."`` when age/gender/occupation exist, else ``"Field: value"``."""
    n = len(next(iter(fields.values()))) if fields else 0
    out = []
    for k in range(n):
        get = {f: (None if fields[f][k] is None else str(fields[f][k]).strip()) for f in fields}
        age, gender, occ = get.get("age"), (get.get("gender") or "").upper(), get.get("occupation")
        if age and occ and gender in ("M", "F"):
            g = "male" if gender == "M" else "female"
            s = (f"A {age}-year-old {g}, occupation: {occ}." if occ.lower() in ("other", "none")
                 else f"A {age}-year-old {g} {occ}.")
        else:
            s = "; ".join(f"{f.replace('_', ' ')}: {v}" for f, v in get.items() if v and f != "user_id")
        out.append(s)
    return out


def _aligned_fields(table: AtomicTable, key: str, ids: np.ndarray, path_kind: str, stats: dict):
    """Fields of ``table`` aligned with contiguous ids (original ids ``ids``); None where missing."""
    keys = tokens_to_ids(np.char.strip(table.column(key)))
    ids_str = ids.astype(str)
    keys_str = keys.astype(str)
    first = unique_first(keys_str)
    uniq = keys_str[first]
    if len(uniq) != len(keys_str):
        logger.warning("%s: %d rows repeat a %s already seen; the first row is kept",
                       table.path, len(keys_str) - len(uniq), key)
    pos = np.searchsorted(uniq, ids_str).clip(0, max(len(uniq) - 1, 0))
    found = uniq[pos] == ids_str if len(uniq) else np.zeros(len(ids), dtype=bool)
    row = first[pos]
    missing = int((~found).sum())
    unused = len(uniq) - int(found.sum())
    if missing:
        logger.warning("%s: %d %ss of the interactions have no row here (their fields are None)",
                       table.path, missing, path_kind)
        stats[f"{path_kind}s_without_{path_kind}_row"] = missing
    if unused:
        logger.info("%s: %d rows describe %ss without interactions; they are not part of the dataset",
                    table.path, unused, path_kind)
    out = {}
    for j, f in enumerate(table.fields):
        if f == key:
            continue
        col = table.cells[:, j][row].tolist()
        out[f] = [v if ok else None for v, ok in zip(col, found.tolist())]
    return out


# ---------------------------------------------------------------------------------------- pipeline
def _dedup(edges: np.ndarray, num_items: int, where: str, stats: dict) -> np.ndarray:
    first = unique_first(edges[:, 0] * num_items + edges[:, 1])
    dups = len(edges) - len(first)
    if dups:
        logger.warning("%s: %d duplicate interactions, each kept once", where, dups)
        stats["duplicates_dropped"] = stats.get("duplicates_dropped", 0) + dups
    return edges[first]      # sorted by (user, item)


def build_dataset(name: str, parts: dict[str, Part], split: str, seed: int = 0, *, ratios=_splits.DEFAULT_RATIOS,
                  cold_fraction: float = 0.2, on_unseen: str = "error", item_table: AtomicTable | None = None,
                  user_table: AtomicTable | None = None, cold_items=None, valid_fraction: float = 0.0) -> Dataset:
    """Parts (``{"train": ..., "test": ...}`` for a given split, or ``{"all": ...}``) -> Dataset.

    ``valid_fraction`` (given split without a valid file): carve that fraction of each user's
    training interactions out as a seeded validation set (``splits.carve_valid``).
    """
    if split not in _splits.SPLITS:
        raise DataError(f"split={split!r}: expected one of {', '.join(_splits.SPLITS)}")
    if on_unseen not in ("error", "drop"):
        raise DataError(f"on_unseen={on_unseen!r}: expected 'error' or 'drop'")
    stats: dict = {}
    parts = dict(parts)
    if split == "given" and ("train" not in parts or "test" not in parts):
        raise DataError(f"dataset {name!r} has no given split (one interaction file: "
                        f"{', '.join(p.path for p in parts.values())}); use split='random' or 'cold'")
    plist = list(parts.values())
    if sum(len(p.users) for p in plist) == 0:
        raise DataError(f"dataset {name!r}: no interactions in {', '.join(p.path for p in plist)}")
    user_ids, item_ids, uinv, iinv = _remap_parts(plist)
    if split == "given":
        # Unseen test/valid users and items, checked on contiguous ids with O(n) masks.
        keys = list(parts)
        tr = keys.index("train")
        seen_u = np.bincount(uinv[tr], minlength=len(user_ids)) > 0
        seen_i = np.bincount(iinv[tr], minlength=len(item_ids)) > 0
        dropped = False
        for k, key in enumerate(keys):
            if key == "train":
                continue
            p = parts[key]
            bad_u, bad_i = ~seen_u[uinv[k]], ~seen_i[iinv[k]]
            bad = bad_u | bad_i
            if not bad.any():
                continue
            if on_unseen == "error":
                j = int(np.argmax(bad))
                what = f"user {p.users[j]}" if bad_u[j] else f"item {p.items[j]}"
                raise DataError(
                    f"{p.where(j)}: {key} {what} never appears in the training file {parts['train'].path}: the "
                    f"given split requires every {key} user and item to be seen in training ({int(bad.sum())} "
                    f"such interactions); pass on_unseen='drop' to drop them with a logged count")
            logger.warning("%s: dropped %d %s interactions whose user or item never appears in %s",
                           p.path, int(bad.sum()), key, parts["train"].path)
            stats["unseen_dropped"] = stats.get("unseen_dropped", 0) + int(bad.sum())
            parts[key] = p.take(~bad)
            dropped = True
        if dropped:   # ids seen only in dropped interactions disappear: remap again
            plist = list(parts.values())
            user_ids, item_ids, uinv, iinv = _remap_parts(plist)
    num_users, num_items = len(user_ids), len(item_ids)
    edges = {k: _dedup(np.stack([u, i], 1), num_items, parts[k].path, stats)
             for k, u, i in zip(parts, uinv, iinv)}
    rng = np.random.default_rng(seed)
    cold = None
    if split == "given":
        train = edges["train"]
        tkey = train[:, 0] * num_items + train[:, 1]
        valid = edges.get("valid", np.zeros((0, 2), dtype=np.int64))
        test = edges["test"]
        vkey = valid[:, 0] * num_items + valid[:, 1]          # both sorted (by _dedup)
        for key, e, others in (("valid", valid, [tkey]), ("test", test, [tkey, vkey])):
            ek = e[:, 0] * num_items + e[:, 1]
            dup = np.zeros(len(e), dtype=bool)
            for o in others:
                pos = np.searchsorted(o, ek).clip(0, max(len(o) - 1, 0))
                dup |= (o[pos] == ek) if len(o) else dup
            if dup.any():
                logger.warning("%s: %d %s interactions also appear in an earlier part; dropped from %s",
                               parts[key].path, int(dup.sum()), key, key)
                stats[f"{key}_overlap_dropped"] = int(dup.sum())
                if key == "valid":
                    valid = e[~dup]
                else:
                    test = e[~dup]
        seed_out = None
        if valid_fraction:
            if "valid" in parts:
                raise DataError(f"valid_fraction={valid_fraction!r}: dataset {name!r} ships its own valid split "
                                f"({parts['valid'].path}); carve a validation set only from a train/test split")
            train, valid = _splits.carve_valid(train, num_users, valid_fraction, rng)
            seed_out = seed
    elif valid_fraction:
        raise DataError(f"valid_fraction={valid_fraction!r}: only the given split carves a validation set; "
                        f"split={split!r} makes its own (see ratios)")
    else:
        allv = np.concatenate(list(edges.values()))
        if len(edges) > 1:
            allv = _dedup(allv, num_items, f"{name} (train+test merged for split={split!r})", stats)
        if split == "random":
            train, valid, test = _splits.split_random(allv, num_users, num_items, ratios, rng)
        else:
            train, valid, test, cold = _splits.split_cold(allv, num_users, num_items, cold_fraction, ratios,
                                                          rng, cold_items)
            cold = torch.from_numpy(cold)
        seed_out = seed
    item_fields = user_fields = item_text = user_text = None
    if item_table is not None:
        item_fields = _aligned_fields(item_table, "item_id", item_ids, "item", stats)
        item_text = item_text_from_fields(item_fields)
    if user_table is not None:
        user_fields = _aligned_fields(user_table, "user_id", user_ids, "user", stats)
        user_text = user_text_from_fields(user_fields)
    return Dataset(name=name, split=split, num_users=num_users, num_items=num_items,
                   train=torch.from_numpy(train), valid=torch.from_numpy(valid), test=torch.from_numpy(test),
                   user_ids=user_ids, item_ids=item_ids, item_text=item_text, user_text=user_text,
                   item_fields=item_fields, user_fields=user_fields, cold_items=cold, seed=seed_out, stats=stats)


def _remap_parts(plist: list[Part]):
    if any(p.users.dtype.kind in "US" for p in plist):       # atomic tokens: remap as strings first
        user_ids, uinv = _remap_tokens([p.users for p in plist])
        item_ids, iinv = _remap_tokens([p.items for p in plist])
    else:
        user_ids, uinv = remap(*[p.users for p in plist])
        item_ids, iinv = remap(*[p.items for p in plist])
    return user_ids, item_ids, uinv, iinv


def _remap_tokens(arrays: list[np.ndarray]):
    """Remap string tokens; ids become ints (sorted numerically) when every token is an integer."""
    uniq, inv = remap(*[np.asarray(a, dtype=str) for a in arrays])
    ids = tokens_to_ids(uniq)
    if ids.dtype.kind == "i":
        order = np.argsort(ids, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return ids[order], [rank[x] for x in inv]
    return uniq, inv


# ---------------------------------------------------------------------------------------- entry points
def load_lightgcn(folder, name: str | None = None, split: str = "given", seed: int = 0, **kw) -> Dataset:
    folder = os.fspath(folder)
    parts = {"train": read_lightgcn(os.path.join(folder, "train.txt")),
             "test": read_lightgcn(os.path.join(folder, "test.txt"))}
    return build_dataset(name or os.path.basename(os.path.normpath(folder)), parts, split, seed, **kw)


def load_atomic(folder, name: str | None = None, split: str | None = None, seed: int = 0, **kw) -> Dataset:
    folder = os.fspath(folder)
    files = find_atomic(folder)
    if "inter" in files:
        parts = {"all": _atomic_part(read_atomic(files["inter"]))}
    else:
        parts = {k: _atomic_part(read_atomic(files[k])) for k in ("train", "valid", "test")}
    split = split or ("given" if "train" in parts else "random")
    item_table = read_atomic(files["item"]) if "item" in files else None
    user_table = read_atomic(files["user"]) if "user" in files else None
    for t, key in ((item_table, "item_id"), (user_table, "user_id")):
        if t is not None and key not in t.fields:
            raise DataError(f"{t.path}:1: expected a '{key}:token' field in the header, found {t.fields}")
    return build_dataset(name or os.path.basename(os.path.normpath(folder)), parts, split, seed,
                         item_table=item_table, user_table=user_table, **kw)


def load_csv(path, name: str | None = None, split: str = "random", seed: int = 0, **kw) -> Dataset:
    path = os.fspath(path)
    return build_dataset(name or os.path.splitext(os.path.basename(path))[0], {"all": read_csv(path)}, split, seed, **kw)


def load_frame(frame, name: str = "frame", split: str = "random", seed: int = 0, **kw) -> Dataset:
    return build_dataset(name, {"all": read_frame(frame, name)}, split, seed, **kw)
