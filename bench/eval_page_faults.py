"""Full-ranking evaluation with glibc's default malloc vs the heap training keeps (glrec_fast.allocator).

    python bench/eval_page_faults.py                       # the setting training uses
    python bench/eval_page_faults.py --system_malloc       # glibc as configured
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/eval_page_faults.py   # another threshold

``metrics.evaluate`` of a random d=64 embedding model, 20,000 users x 250,000 items (the 50M run's
item count), 200,000 test pairs and 400,000 excluded pairs, in 1 GiB score tiles (training's
``EVAL_TILE_BYTES``). Each of ``--repeats`` evaluations reports wall seconds, minor page faults,
system seconds and the process's peak RSS. (With ``MALLOC_*_`` set, ``keep_freed_memory`` stands
aside and those settings apply.)
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from glrec_fast import allocator, metrics
from glrec_fast.train import EVAL_TILE_BYTES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system_malloc", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    malloc = "system" if a.system_malloc else allocator.keep_freed_memory()
    torch.manual_seed(0)
    nu, ni, d = 20_000, 250_000, 64
    u, i = torch.randn(nu, d), torch.randn(ni, d)
    test = torch.stack([torch.randint(0, nu, (200_000,)), torch.randint(0, ni, (200_000,))], 1)
    seen = torch.stack([torch.randint(0, nu, (400_000,)), torch.randint(0, ni, (400_000,))], 1)

    def score(users):
        return u[users] @ i.T
    score.fresh_tiles = True
    for rep in range(a.repeats):
        ru, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        metrics.evaluate(score, test, nu, ni, exclude=[seen], batch_size=EVAL_TILE_BYTES // (4 * ni))
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"repeat": rep, "malloc": malloc, "eval_s": round(time.perf_counter() - t, 2),
                          "minor_faults": ru2.ru_minflt - ru.ru_minflt, "system_s": round(ru2.ru_stime - ru.ru_stime, 2),
                          "peak_rss_gib": round(ru2.ru_maxrss / 2**20, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
