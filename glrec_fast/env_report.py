"""``python -m glrec_fast.env_report``: versions, devices, and which kernels serve each op."""
from __future__ import annotations

import importlib
import os
import platform
import sys
import warnings


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "installed")
    except Exception as e:  # report, never fail: this command exists to diagnose broken installs
        return f"not available ({type(e).__name__}: {e})"


def report() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report lists every fallback below
        import torch

        import glrec_fast
        from glrec_fast import _backend, ops
    lines = [f"glrec_fast {glrec_fast.__version__}",
             f"python {sys.version.split()[0]} on {platform.platform()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), "
             f"CPU threads: {torch.get_num_threads()}"]
    for mod in ("triton", "transformers", "bitsandbytes", "numpy", "torch_geometric"):
        lines.append(f"{mod}: {_version(mod)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                         f"{p.multi_processor_count} SMs")
    else:
        lines.append("CUDA: no device")
    lines.append(f"compiled extension glrec_fast._C: {'loaded' if ops._C is not None else 'NOT loaded'}")
    ok, why = _backend.triton_status()
    lines.append(f"Triton kernels: {'importable' if ok else 'unavailable: ' + why}"
                 + (" (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    lines.append(f"GLREC_BACKEND={_backend.backend()}")
    lines.append("kernels per op and device:")
    for name, devs in ops.kernel_report().items():
        lines.append(f"  {name:<24} " + "  ".join(f"{d}: {k}" for d, k in devs.items()))
    for msg in _backend.fallbacks().values():
        lines.append(f"fallback: {msg}")
    lines.append(f"GLREC_DATA_DIR={os.environ.get('GLREC_DATA_DIR', '(unset)')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
