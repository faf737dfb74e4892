"""Keep a training step's large temporaries in the heap instead of fresh pages every step (glibc).

glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a fresh ``mmap``
and hands it back with ``munmap`` on ``free``. A training step allocates several such tensors
(at 20M interactions GraphSAGE's layer input alone is ~100 MB) and frees them by the next step,
so each step faults its whole working set in again: zeroed by the kernel, one page at a time.
Measured at 20M interactions, batch 8,192 (bench/RESULTS.md, "Page faults"): ~33k minor faults
and ~70 ms of system time per step, and at 50M 644M faults and 1,690 s of system time in one
epoch. Whether a block happened to fit a hole left in the heap by the data build decided how
many.

``keep_freed_memory()`` sets ``M_MMAP_MAX=0`` (every block from the heap, where a freed one is
reused by the next step) and ``M_TRIM_THRESHOLD`` to ``TRIM_THRESHOLD`` (free memory at the heap's
top is handed back to the OS only above that). Training calls it once at its start. It does
nothing, and says why, on a libc without ``mallopt`` or when the process's allocator was chosen
from outside (the same settings in ``MALLOC_*_`` variables or ``GLIBC_TUNABLES``, or an
allocator in ``LD_PRELOAD``).

``bound_onednn_cache()`` does the same for memory oneDNN would hold: a bfloat16 GraphSAGE calls it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4      # glibc's <malloc.h>
# Free heap kept for reuse: above a 50M step's temporaries (~650 MB) and twice evaluation's 1 GiB
# score tile (train.EVAL_TILE_BYTES): at 1 GiB, a tile and its top-k's temporaries were still handed
# back and faulted in again (bench/eval_page_faults.py, bench/RESULTS.md).
TRIM_THRESHOLD = 2 << 30

_state: dict[str, str] = {}


_OUTSIDE_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OUTSIDE_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
                     "glibc.malloc.top_pad")


def _chosen_outside() -> str | None:
    """Why the process's allocator settings are someone else's (None when they are not)."""
    for key in _OUTSIDE_ENV:
        if key in os.environ:
            return f"{key} is set"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    for name in _OUTSIDE_TUNABLES:
        if name in tunables:
            return f"GLIBC_TUNABLES sets {name}"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:   # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD={preload}"
    return None


def keep_freed_memory() -> str:
    """Apply the settings above (once per process) and log what was done; returns ``"kept"`` or
    the reason they were not applied. Each training run calls it, so each run's log says it."""
    if "result" not in _state:
        _state["result"] = _apply()
    result = _state["result"]
    if result == "kept":
        log.info("malloc: large blocks from the heap and up to %d MiB of freed heap kept for reuse (M_MMAP_MAX=0, "
                 "M_TRIM_THRESHOLD); every step would otherwise fault its temporaries in again",
                 TRIM_THRESHOLD >> 20)
    else:
        log.info("malloc: %s", result)
    return result


def _apply() -> str:
    if not sys.platform.startswith("linux"):
        return f"not applied: {sys.platform} (glibc only)"
    if (why := _chosen_outside()) is not None:
        return f"not applied: {why}; the process's own allocator settings stand"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not applied: this libc has no mallopt (not glibc)"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "not applied: mallopt refused the settings"
    return "kept"


# oneDNN (torch's bfloat16 GEMMs on the CPU) caches a primitive per GEMM shape, up to 1,024, each with
# its buffers. A sampled GraphSAGE step's row counts differ every batch, so the cache never hits and
# only grows: at 20M interactions, batch 8,192, bfloat16 layers held 6.9 GiB at the end of one epoch
# against 2.4-2.7 GiB in float32, and a 20M step was no slower without the cache (bench/RESULTS.md,
# "GraphSAGE's layers in bfloat16").
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_onednn_cache() -> str:
    """Set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` unless the process set it (oneDNN reads it when it
    first builds a primitive: call this before the first bfloat16 GEMM). Logs once; returns what
    was done."""
    if "onednn" not in _state:
        if ONEDNN_CACHE_ENV in os.environ:
            _state["onednn"] = f"{ONEDNN_CACHE_ENV}={os.environ[ONEDNN_CACHE_ENV]} was set; left as it is"
        else:
            os.environ[ONEDNN_CACHE_ENV] = "0"
            _state["onednn"] = (f"{ONEDNN_CACHE_ENV}=0: bfloat16 GEMMs whose row counts change every step "
                                f"would otherwise fill oneDNN's primitive cache (GiBs at 20M interactions)")
        log.info("oneDNN: %s", _state["onednn"])
    return _state["onednn"]
