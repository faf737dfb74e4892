"""Atomic checkpoint and file writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile

import torch


def _atomic(path: str, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    _atomic(path, lambda f: torch.save(obj, f))


def write_text(path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def digest(path) -> str:
    """A short hash of the file's bytes (blake2b): whether two processes read the same checkpoint."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path, map_location="cpu"):
    """Load a checkpoint safely: ``torch.load(weights_only=True)`` unpickles only tensors, plain
    containers and numbers, never code, so a file someone sent you cannot run anything. Our own
    checkpoints hold nothing else. One that needs more (a pickled callable, or a checkpoint written
    before glrec_fast stored numpy objects as tensors) is refused with the reason."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"checkpoint {path!r}: refused to load: it holds Python objects beyond tensors, containers and "
            f"numbers, which could run code while loading ({str(e).splitlines()[0]}). glrec_fast's own "
            f"checkpoints never do, except ones written by versions before safe loading (they kept numpy "
            f"arrays): retrain, or, only if you trust the file, convert it yourself with "
            f"torch.load(path, weights_only=False).") from None
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} could not be read ({e!r}); it may be from another "
                         f"version or not a glrec_fast checkpoint") from None


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs more than weights-only unpickling (it could run code): not loaded."""
