"""Which kernels are available, and announcing each fallback exactly once.

The package must import and run without a GPU, without Triton and without the compiled
extension. Every time it falls back it says so once, with the reason, through ``warnings``.
``GLREC_BACKEND=reference`` forces the pure-torch reference path for every op.
"""
from __future__ import annotations

import importlib
import os
import warnings

_announced: dict[str, str] = {}  # key -> message, for env_report
_state: dict[str, object] = {}


class GlrecFallbackWarning(UserWarning):
    """Emitted once per fallback: an accelerated path is not used, and why."""


def announce(key: str, message: str) -> None:
    """Warn once per ``key`` for the process."""
    if key in _announced:
        return
    _announced[key] = message
    warnings.warn(message, GlrecFallbackWarning, stacklevel=3)


def fallbacks() -> dict[str, str]:
    """Every fallback announced so far in this process."""
    return dict(_announced)


def backend() -> str:
    """``"auto"`` (default: kernels where they loaded) or ``"reference"`` (pure torch)."""
    value = os.environ.get("GLREC_BACKEND", "auto").strip().lower()
    if value not in ("auto", "reference"):
        raise ValueError(f"GLREC_BACKEND={value!r}: expected 'auto' or 'reference'")
    return value


def load_extension():
    """Import ``glrec_fast._C`` (which registers the C++/CUDA kernels). Returns the module or None."""
    if "_C" in _state:
        return _state["_C"]
    try:
        mod = importlib.import_module("glrec_fast._C")
    except (ImportError, OSError) as e:
        announce("_C", f"glrec_fast: compiled extension glrec_fast._C not loaded, CPU ops use the "
                       f"pure-torch reference (slower) because of {e!r}. Build it with "
                       f"`pip install --no-build-isolation -e .`")
        mod = None
    _state["_C"] = mod
    return mod


def triton_status():
    """(usable, reason). Triton kernels need CUDA or TRITON_INTERPRET=1."""
    if "triton" in _state:
        return _state["triton"]
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        result = (True, "")
    except Exception as e:  # triton can fail at import with many error types (missing libcuda, ...)
        result = (False, repr(e))
    _state["triton"] = result
    return result


def extension_has(op: str, dispatch_key: str) -> bool:
    import torch
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"glrec::{op}", dispatch_key))
