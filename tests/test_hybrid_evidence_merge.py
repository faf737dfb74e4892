"""bench/hybrid_evidence.py --merge: runs over disjoint seeds, or new variants added to seeds run
before, combine into one table; a repeated (variant, seed) is refused."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("hybrid_evidence", os.path.join(ROOT, "bench", "hybrid_evidence.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KEYS = ["recall@20", "ndcg@20", "ndcg@20/warm", "ndcg@20/head", "ndcg@20/tail"]


def _run(seed, ndcg):
    return {"seed": seed, "valid": {"ndcg@20": ndcg}, "test": dict.fromkeys(KEYS, ndcg)}


def _write(path, seeds, results, args=None):
    args = {"dataset": "ml-100k", "split": "random", "epochs": 60, "seeds": seeds, **(args or {})}
    path.write_text(json.dumps({"args": args, "results": results, "chosen": [{"seed": s} for s in seeds],
                                "wall_s": 1.0}))
    return str(path)


def test_merge_adds_variants_to_seeds_and_compares_on_common_seeds(tmp_path, capsys):
    bench = _bench()
    a = _write(tmp_path / "a.json", [0, 1], {"gfcf": [_run(0, 0.30), _run(1, 0.32)],
                                             "gfcf+text": [_run(0, 0.33), _run(1, 0.35)]})
    b = _write(tmp_path / "b.json", [0], {"static": [_run(0, 0.20)], "gated": [_run(0, 0.22)]},
               {"encoder": "minilm", "lr": 0.005})
    out = tmp_path / "all.json"
    assert bench.main(["--merge", a, b, "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["args"]["seeds"] == [0, 1]
    assert [r["seed"] for r in merged["results"]["gfcf"]] == [0, 1]
    assert [r["seed"] for r in merged["results"]["gated"]] == [0]
    table = capsys.readouterr().out
    assert "| gated vs static | +10.0% | +10.0% | +10.0% | +10.0% | +10.0% | |" in table        # 0.22 / 0.20
    assert "| static vs gfcf (seeds [0]) | -33.3% |" in table                   # seed 0 only: 0.20 / 0.30
    with pytest.raises(SystemExit, match="repeats variant 'gfcf' for seed 1"):
        bench.main(["--merge", a, _write(tmp_path / "c.json", [1], {"gfcf": [_run(1, 0.3)]}), "--json", str(out)])
    with pytest.raises(SystemExit, match="dataset"):
        bench.main(["--merge", a, _write(tmp_path / "d.json", [2], {"gfcf": [_run(2, 0.3)]},
                                         {"dataset": "amazon-beauty"}), "--json", str(out)])
