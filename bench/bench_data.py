"""Data layer: parsing Gowalla, sampling synthetic interactions, and the 20M-interaction generator.

    pytest bench/bench_data.py --benchmark-only -q -s

* ``test_lightgcn_parse``: Gowalla's train.txt (810,128 interactions). reference =
  ``loaders.read_lightgcn_reference`` (per-line Python), ours = ``loaders.read_lightgcn`` (numpy over
  the whole buffer, with validation). extra_info: interactions/s.
* ``test_synthetic_draw``: 1M draws for 20k users over 10k items from the generator's latent model.
  reference = ``synthetic.draw_reference`` (dense p(item|user) + rng.choice per user), ours =
  ``synthetic._draw`` (group-then-item inverse-CDF search, chunked). extra_info: draws/s.
* ``test_make_synthetic_20m``: ``make_synthetic(200k users, 100k items, 20M interactions)`` end to
  end (draws, duplicate redraws, cold split, item text). Target: under a minute on 2 cores.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from conftest import record

from glrec_fast.data import loaders, make_synthetic, synthetic

PROVIDERS = ["reference", "ours"]


def _gowalla_train() -> pathlib.Path:
    d = os.environ.get("GLREC_DATA_DIR")
    path = pathlib.Path(d) / "gowalla" / "train.txt" if d else None
    if path is None or not path.is_file():
        pytest.skip("Gowalla not found: set GLREC_DATA_DIR to a folder holding gowalla/train.txt")
    return path


@pytest.mark.parametrize("provider", PROVIDERS)
def test_lightgcn_parse(benchmark, provider):
    path = _gowalla_train()
    fn = loaders.read_lightgcn_reference if provider == "reference" else loaders.read_lightgcn
    part = benchmark.pedantic(fn, args=(path,), rounds=3, iterations=1, warmup_rounds=1)
    assert len(part.items) == 810_128
    record(benchmark, interactions=len(part.items),
           interactions_per_s=round(len(part.items) / benchmark.stats.stats.median))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_synthetic_draw(benchmark, provider):
    num_users, num_items, draws = 20_000, 10_000, 1_000_000
    model = synthetic.latent_model(num_users, num_items, 16, 1.0, 2.0, np.random.default_rng(0))
    counts = np.random.default_rng(1).multinomial(draws, model.activity / model.activity.sum())
    users = np.flatnonzero(counts)
    counts = counts[users]

    def run():
        rng = np.random.default_rng(2)
        if provider == "reference":
            return synthetic.draw_reference(model, users, counts, rng)
        return synthetic._draw(rng, users, counts, model.user_f, model.group_f, model.log_group_pop,
                               model.scale, model.item_key, model.items_by_group)

    u, _ = benchmark.pedantic(run, rounds=1 if provider == "reference" else 3, iterations=1, warmup_rounds=0)
    assert len(u) == draws
    record(benchmark, draws=draws, draws_per_s=round(draws / benchmark.stats.stats.median))


def test_make_synthetic_20m(benchmark):
    n = 20_000_000
    ds = benchmark.pedantic(make_synthetic, kwargs=dict(num_users=200_000, num_items=100_000, num_interactions=n,
                                                        seed=0), rounds=1, iterations=1, warmup_rounds=0)
    assert sum(e.size(0) for e in (ds.train, ds.valid, ds.test)) == n
    record(benchmark, interactions=n, interactions_per_s=round(n / benchmark.stats.stats.median),
           redraw_rounds=ds.stats["redraw_rounds"])
