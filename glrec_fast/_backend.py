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


REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall -e ."


def version_mismatch(built: str | None, running: str) -> str | None:
    """Why an extension compiled against torch ``built`` must not be trusted under torch ``running``
    (None when they agree). torch's C++ ABI is not stable across releases; the local build tag
    (``+cpu``, ``+cu130``) does not change it."""
    base = lambda v: v.split("+")[0]   # noqa: E731
    if built is None:
        return "it does not record which torch it was built against (built before this check existed)"
    if base(built) != base(running):
        return f"it was built against torch {built} but torch {running} is running"
    return None


def load_extension():
    """Import ``glrec_fast._C`` (which registers the C++/CUDA kernels). Returns the module or None.

    An extension built against another torch usually fails to import (undefined symbols); one
    that imports but records another torch version is refused too, since its kernels could read
    tensors with the wrong layout. Either way the message names the command that rebuilds it."""
    if "_C" in _state:
        return _state["_C"]
    import torch
    try:
        mod = importlib.import_module("glrec_fast._C")
        why = version_mismatch(getattr(mod, "torch_version", None), torch.__version__)
    except (ImportError, OSError) as e:
        mod, why = None, repr(e)
        if "undefined symbol" in str(e) or "Symbol not found" in str(e):
            why += " (an extension built against another torch version)"
    if why is not None:
        announce("_C", f"glrec_fast: compiled extension glrec_fast._C not used, CPU ops use the "
                       f"pure-torch reference (slower): {why}. Rebuild it against the installed torch "
                       f"from the source checkout with `{REBUILD}`")
        mod = None
    elif not getattr(mod, "openmp", True) and torch.backends.openmp.is_available():
        announce("_C_serial", "glrec_fast: compiled extension glrec_fast._C was built without OpenMP "
                              "(its compiler had none), so its CPU kernels run on one thread; rebuild "
                              f"with a compiler that has OpenMP (g++, or clang++ with libomp) using `{REBUILD}`")
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
