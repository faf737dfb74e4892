"""One sampled GraphSAGE training epoch through ``train.train``, timed, for comparing commits.

    python bench/train_epoch_time.py --synthetic_interactions 20000000 [--propagate_dtype bfloat16]
    PYTHONPATH=/path/to/older/checkout python bench/train_epoch_time.py ...   # the same at another commit

The configuration is the one issue 14's 20M run used (``bench/sampled_scale.py``: fanouts [10, 10],
batch 8,192, lr 0.005, no grokking monitor). Unlike that script it times the training loop only:
``train.evaluate_split`` is replaced by a stub, so the full-ranking evaluations (most of that run's
wall time) are not run, and the metrics it prints are not the model's. Page faults and system time
are the process's (``getrusage``) between the model's construction and the end of the epoch, so they
include whatever the training loop does as it is, allocator settings and all.

Only interfaces that older commits share are used (``train.train``, ``train.build_model``,
``train.evaluate_split``), so the script runs unchanged against them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from glrec_fast import config, train


class _NoMetrics(dict):
    """Every metric reads 0.0: evaluation is not what this bench times."""

    def __missing__(self, key):
        return 0.0


def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"t": time.time(), "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "stime": ru.ru_stime,
            "utime": ru.ru_utime}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic_interactions", type=int, default=20_000_000)
    ap.add_argument("--batch_size", type=int, default=8192)
    ap.add_argument("--propagate_dtype", default=None, choices=["float32", "bfloat16"],
                    help="GraphSAGE's layer dtype (unset: the commit's default; older commits have no such key)")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    n = a.synthetic_interactions
    over = dict(dataset="synthetic", synthetic_interactions=n, synthetic_users=max(2000, n // 100),
                synthetic_items=max(1000, n // 200), model="graphsage", sampled=True, fanouts=[10, 10],
                epochs=1, eval_every=1, batch_size=a.batch_size, lr=0.005, grokking=False, patience=0,
                **({"propagate_dtype": a.propagate_dtype} if a.propagate_dtype else {}))
    marks = {}
    build = train.build_model

    def build_model(*args, **kw):
        model = build(*args, **kw)
        marks.setdefault("train_pairs", int(args[1].train.size(0)))   # build_model(cfg, ds, graph, device)
        marks.setdefault("start", _usage())
        return model

    def evaluate_split(*args, **kw):
        marks.setdefault("end", _usage())
        return _NoMetrics()

    train.build_model, train.evaluate_split = build_model, evaluate_split
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = train.train(config.resolve([], overrides={**over, "out": out}))
    s, e = marks["start"], marks["end"]
    epoch = r["history"][0]["epoch_time_s"]
    res = {"code": os.path.dirname(os.path.abspath(train.__file__)), "args": vars(a),
           "train_pairs": marks["train_pairs"], "epoch_time_s": epoch, "triples_per_s": marks["train_pairs"] / epoch,
           "epoch_minor_faults": e["minflt"] - s["minflt"], "epoch_major_faults": e["majflt"] - s["majflt"],
           "epoch_system_s": e["stime"] - s["stime"], "epoch_user_s": e["utime"] - s["utime"],
           "model_built_to_first_eval_s": e["t"] - s["t"],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "wall_s": time.time() - t0}
    print(json.dumps(res, indent=1))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
