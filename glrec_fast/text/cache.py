"""Disk cache of text vectors, content-addressed per text.

Layout: ``<cache_dir>/text/<encoder>-<sha(cache_key)>/<sha(list of text hashes)>.pt``, each file a
``{"cache_key", "hashes", "vectors"}`` dict. A lookup first tries the file of the exact list (one
read for the common "same dataset again" case); on a miss it scans the other files of the same
encoder key for the hashes it needs, so a dataset where one title changed re-encodes that one
text and reuses the rest. Every vector is matched by the hash of its own text, so a changed text
can never pick up a stale vector. Writes are atomic (temp file in the same folder + os.replace),
so a crash or a concurrent writer never leaves a half-written file that a later run would load.
Old list files are not pruned: delete the folder to reclaim space.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("glrec_fast.text")


def default_cache_dir() -> Path:
    """GLREC_CACHE_DIR, else ~/.cache/glrec_fast."""
    env = os.environ.get("GLREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glrec_fast"


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _list_hash(hashes: list[str]) -> str:
    return hashlib.blake2b("\n".join(hashes).encode(), digest_size=16).hexdigest()


class VectorCache:
    def __init__(self, cache_dir, cache_key: str):
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cache_key.split("|", 1)[0])[:40]
        self.cache_key = cache_key
        self.dir = root / "text" / f"{slug}-{hashlib.sha256(cache_key.encode()).hexdigest()[:16]}"

    def _read(self, path: Path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated/corrupt file from another tool: treat as a miss, say so
            logger.warning("ignoring unreadable cache file %s because of %r", path, e)
            return None
        if not isinstance(blob, dict) or blob.get("cache_key") != self.cache_key:
            return None
        hashes, vecs = blob.get("hashes"), blob.get("vectors")
        if not isinstance(hashes, list) or not torch.is_tensor(vecs) or vecs.shape[0] != len(hashes):
            logger.warning("ignoring malformed cache file %s", path)
            return None
        return hashes, vecs

    def lookup(self, hashes: list[str]):
        """-> (vectors [n, dim] or None, found: BoolTensor [n], exact: bool)."""
        n = len(hashes)
        found = torch.zeros(n, dtype=torch.bool)
        exact_path = self.dir / f"{_list_hash(hashes)}.pt"
        if exact_path.is_file():
            got = self._read(exact_path)
            if got is not None and got[0] == hashes:
                return got[1].to(torch.float32), torch.ones(n, dtype=torch.bool), True
        if not self.dir.is_dir():
            return None, found, False
        want: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            want.setdefault(h, []).append(i)
        out = None
        files = sorted(self.dir.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in files:  # newest first: the likeliest to share texts with this list
            got = self._read(path)
            if got is None:
                continue
            for row, h in enumerate(got[0]):
                rows = want.pop(h, None)
                if rows is None:
                    continue
                if out is None:
                    out = torch.empty(n, got[1].shape[1], dtype=torch.float32)
                if got[1].shape[1] != out.shape[1]:
                    continue
                out[rows] = got[1][row].to(torch.float32)
                found[rows] = True
            if not want:
                break
        return out, found, False

    def save(self, hashes: list[str], vectors: torch.Tensor) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{_list_hash(hashes)}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"cache_key": self.cache_key, "hashes": list(hashes),
                            "vectors": vectors.detach().to("cpu", torch.float32).contiguous()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path
