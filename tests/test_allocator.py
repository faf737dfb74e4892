"""glrec_fast.allocator: training keeps freed heap memory instead of faulting fresh pages each step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux)")

# Allocates and frees a 96 MiB tensor (above glibc's largest mmap threshold) a few times, the way
# a training step's temporaries come and go, and counts the minor page faults of the later rounds.
_PROBE = r"""
import json, resource, sys, torch
from glrec_fast import allocator
result = allocator.keep_freed_memory() if sys.argv[1] == "keep" else "system"
for _ in range(3):   # the first rounds map the memory in either case (and settle the heap's layout)
    torch.empty(24 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(24 << 20).fill_(1.0)
print(json.dumps({"result": result, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_faults():
    system, kept = _probe("system"), _probe("keep")
    assert kept["result"] == "kept"
    pages = 4 * (96 << 20) // 4096
    assert system["faults"] > pages // 2, system        # glibc maps each round afresh by default
    assert kept["faults"] < pages // 8, kept            # kept: the freed block is reused (under half a round)


def test_settings_chosen_outside_stand():
    probe = _probe("keep", MALLOC_TRIM_THRESHOLD_="1000000")
    assert probe["result"].startswith("not applied: MALLOC_TRIM_THRESHOLD_ is set"), probe
    probe = _probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
    assert "GLIBC_TUNABLES sets glibc.malloc.mmap_max" in probe["result"], probe


_ONEDNN_PROBE = r"""
import os, sys, torch
import glrec_fast as gl
from glrec_fast.models.graphsage import GraphSAGE
g = gl.BipartiteGraph.from_interactions(torch.tensor([[0, 0], [1, 1], [2, 1]]), 3, 2)
GraphSAGE(g, dim=8, fanouts=[2, 2], layer_dtype=sys.argv[1])
print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "unset"))
"""


@pytest.mark.parametrize("layer_dtype, preset, want", [("bfloat16", None, "0"), ("bfloat16", "7", "7"),
                                                       ("float32", None, "unset")])
def test_bfloat16_graphsage_bounds_onednn_primitive_cache(layer_dtype, preset, want):
    # bfloat16 GEMMs whose row counts change every step would fill oneDNN's cache (GiBs at 20M);
    # a capacity the process chose stands, and float32 layers leave it alone.
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    out = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE, layer_dtype], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == want
