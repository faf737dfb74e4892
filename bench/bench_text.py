"""MiniLM throughput on the 1,682 ml-100k item texts (CPU unless CUDA is present).

    pytest bench/bench_text.py --benchmark-only -q

Providers: ``sentence-transformers`` (the library all-MiniLM-L6-v2 ships for; peer baseline),
``ours`` (glrec_fast.text encode: length-sorted batches), ``ours-cache-hit`` (encode_items when
every vector is already in the disk cache). One round each: a pass over 1,682 texts takes seconds
on 2 cores, and items/s goes to extra_info.
"""
import os
import pathlib
import time

import pytest
import torch

from glrec_fast import text as gt

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ml100k_texts() -> tuple[list[str], str]:
    data = os.environ.get("GLREC_DATA_DIR") or str(REPO.parent / "shared" / "data")
    try:
        from glrec_fast.data import load_dataset
    except ImportError as e:
        load_dataset, why = None, repr(e)
    if load_dataset is not None:
        os.environ.setdefault("GLREC_DATA_DIR", data)
        return gt.build_item_text(load_dataset("ml-100k")), "glrec_fast.data.load_dataset"
    path = pathlib.Path(data) / "ml-100k" / "ml-100k.item"
    if not path.is_file():
        pytest.skip(f"{path} not found: set GLREC_DATA_DIR to a folder holding ml-100k/")
    # RecBole atomic TSV: "name:type" header, then one item per line.
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    names = [h.split(":")[0] for h in lines[0].split("\t")]
    cols = {n: [] for n in names}
    for line in lines[1:]:
        if line.strip():
            for n, v in zip(names, line.split("\t")):
                cols[n].append(v)
    return gt.build_item_text(type("Items", (), {"item_text": None, "item_fields": cols})()), \
        f"{path} (glrec_fast.data not importable: {why})"


@pytest.fixture(scope="module")
def texts():
    t, source = _ml100k_texts()
    assert len(t) == 1682, (len(t), source)
    print(f"\n{len(t)} ml-100k item texts from {source}; e.g. {t[0]!r}")
    return t


@pytest.fixture(scope="module")
def encoder():
    return gt.get_encoder("minilm", progress=False)


@pytest.mark.parametrize("provider", ["sentence-transformers", "ours", "ours-cache-hit"])
def test_minilm_items_per_s(benchmark, provider, texts, encoder, tmp_path):
    if provider == "sentence-transformers":
        st = pytest.importorskip("sentence_transformers")
        model = st.SentenceTransformer(str(gt.minilm_model_dir()), device=str(encoder.device))
        model.encode(texts[:8])  # warm-up, as ours gets below

        def run():
            return model.encode(texts, batch_size=encoder.batch_size, convert_to_tensor=True)
    elif provider == "ours":
        encoder.encode(texts[:8])

        def run():
            return encoder.encode(texts)
    else:
        gt.encode_items(texts, encoder, cache_dir=tmp_path)  # fill the cache

        def run():
            return gt.encode_items(texts, encoder, cache_dir=tmp_path)
    t0 = time.perf_counter()
    out = benchmark.pedantic(run, rounds=1, iterations=1)
    dt = time.perf_counter() - t0
    assert tuple(out.shape) == (len(texts), 384) and torch.isfinite(out).all()
    benchmark.extra_info["items"] = len(texts)
    benchmark.extra_info["items_per_s"] = round(len(texts) / dt, 1)
    benchmark.extra_info["device"] = str(encoder.device)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    print(f"{provider}: {len(texts) / dt:.1f} items/s on {encoder.device}")
