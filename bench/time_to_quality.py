"""Time to quality on Gowalla: test recall@20 / ndcg@20 against wall time, for every route.

Protocol (DESIGN.md): every hyperparameter is chosen on a validation set carved out of Gowalla's
training file (``--valid_fraction 0.1``, seed 0, never a test interaction); the final model is then
fit on the full training file with those choices and test is read once per route (the trained
routes' curves read test at each evaluation for the plot only: nothing is chosen on them, and their
evaluation time is off the clock).

    python bench/time_to_quality.py --stage tune_filters      # grid on validation (gfcf, bspm)
    python bench/time_to_quality.py --stage final_filters     # fit on full train with the choice, test once
    python bench/time_to_quality.py --stage tune_trained      # budgeted runs on validation (--tune_budget min)
    python bench/time_to_quality.py --stage final_trained     # the chosen recipe and the BPR baseline, test curves
    python bench/time_to_quality.py --stage report            # the table (markdown) and the PNG
    python bench/time_to_quality.py --stage eval_speed        # full-ranking evaluation time, all test users
    python bench/time_to_quality.py --stage recommend_speed   # recommend() top-20 for every user, time and memory

Each stage writes JSON under ``--out`` (default bench/results/time_to_quality) and reads what the
earlier stages wrote; ``--stage all`` runs them in order. Needs ``GLREC_DATA_DIR`` with gowalla/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# Published anchors on this split. None of these papers had a validation set: they were tuned on test.
ANCHORS = [
    ("LightGCN paper (BPR, ~1000 epochs; tuned on test)", 0.1830, 0.1554),
    ("GF-CF paper (training-free; tuned on test)", 0.1849, 0.1518),
    ("BSPM paper (training-free; tuned on test)", 0.1920, 0.1597),
    ("SimpleX paper (epoch 27, ~2 h on a P100; tuned on test)", 0.1867, 0.1554),
]

FILTER_GRID = {
    "ranks": (256, 448, 640),
    "ideal_weights": (0.1, 0.2, 0.3, 0.5),
    "sharpen": (("euler", 1, 0.0),) + tuple(("rk4", 1, t) for t in (1.0, 1.5, 2.0, 2.5, 3.0)),
}

# Trained recipes tried on validation, each for the same budget. The baseline is plain BPR LightGCN
# as a new user would run it (the README's earlier recipe: batch 8192, Adam 5e-3).
TRAINED = {
    "lightgcn-bpr": ["--model", "lightgcn", "--loss", "bpr", "--batch_size", "8192", "--lr", "0.005"],
    "mf-softmax-spectral": ["--model", "mf", "--loss", "softmax", "--item_bias", "false", "--init", "spectral", "--batch_size", "4096",
                            "--lr", "0.001", "--reg_weight", "0", "--temperature", "0.1", "--num_negatives", "1024"],
    "mf-softmax": ["--model", "mf", "--loss", "softmax", "--item_bias", "false", "--batch_size", "4096", "--lr", "0.001", "--reg_weight", "0",
                   "--temperature", "0.1", "--num_negatives", "1024"],
    "mf-softmax-spectral-lr5e-3": ["--model", "mf", "--loss", "softmax", "--item_bias", "false", "--init", "spectral", "--batch_size", "4096",
                                   "--lr", "0.005", "--reg_weight", "0", "--temperature", "0.1",
                                   "--num_negatives", "1024"],
    "mf-softmax-spectral-lr5e-3-t0.2": ["--model", "mf", "--loss", "softmax", "--item_bias", "false", "--init", "spectral",
                                        "--batch_size", "4096", "--lr", "0.005", "--reg_weight", "0",
                                        "--temperature", "0.2", "--num_negatives", "1024"],
    "mf-softmax-spectral-lr5e-3-t0.05": ["--model", "mf", "--loss", "softmax", "--item_bias", "false", "--init", "spectral",
                                         "--batch_size", "4096", "--lr", "0.005", "--reg_weight", "0",
                                         "--temperature", "0.05", "--num_negatives", "1024"],
    "mf256-softmax-spectral-lr5e-3": ["--model", "mf", "--emb_dim", "256", "--loss", "softmax", "--item_bias", "false", "--init", "spectral",
                                      "--batch_size", "4096", "--lr", "0.005", "--reg_weight", "0",
                                      "--temperature", "0.1", "--num_negatives", "1024"],
    "mf512-softmax-spectral-lr5e-3": ["--model", "mf", "--emb_dim", "512", "--loss", "softmax", "--item_bias", "false", "--init", "spectral",
                                      "--batch_size", "4096", "--lr", "0.005", "--reg_weight", "0",
                                      "--temperature", "0.1", "--num_negatives", "1024"],
    # The learning rate decays down a half cosine to 0 over --epochs (the schedule's length is the
    # hyperparameter: the final fit keeps it and its last epoch); validated every 5 epochs.
    **{f"mf256-softmax-spectral-lr5e-3-cosine{e}": [
        "--model", "mf", "--emb_dim", "256", "--loss", "softmax", "--item_bias", "false", "--init", "spectral", "--batch_size", "4096",
        "--lr", "0.005", "--reg_weight", "0", "--temperature", "0.1", "--num_negatives", "1024",
        "--lr_schedule", "cosine", "--epochs", str(e), "--eval_every", "5"] for e in (40, 60)},
    # The same with a learned per-item logit offset (--item_bias): cosine logits alone cannot carry
    # item popularity (Wu et al., "On the effectiveness of sampled softmax loss for item recommendation").
    **{f"mf256-softmax-spectral-bias-lr5e-3-cosine{e}": [
        "--model", "mf", "--emb_dim", "256", "--loss", "softmax", "--item_bias", "true", "--init", "spectral",
        "--batch_size", "4096", "--lr", "0.005", "--reg_weight", "0", "--temperature", "0.1", "--num_negatives", "1024",
        "--lr_schedule", "cosine", "--epochs", str(e), "--eval_every", "5"] for e in (30, 60)},
    "lightgcn-softmax-spectral": ["--model", "lightgcn", "--loss", "softmax", "--item_bias", "false", "--init", "spectral",
                                  "--batch_size", "8192", "--lr", "0.001", "--reg_weight", "0",
                                  "--temperature", "0.1", "--num_negatives", "1024"],
}
COMMON = ["--dataset", "gowalla", "--grokking", "false", "--epochs", "1000", "--patience", "0",
          "--num_threads", "2"]


def _run(args: list[str], log_path: str) -> float:
    t = time.time()
    with open(log_path, "w") as log:
        subprocess.run([PY, "-m", "glrec_fast.train", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    return time.time() - t


def _load(path):
    with open(path) as f:
        return json.load(f)


def _save(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print("wrote", path)


def tune_filters(out, num_users):
    import torch

    import glrec_fast as gl
    from glrec_fast.models.filters import grid_search
    torch.set_num_threads(2)
    ds = gl.load_dataset("gowalla", valid_fraction=0.1, seed=0)
    g = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    t = time.time()
    rows = grid_search(g, ds.valid, exclude=[ds.train], num_users=num_users, seed=0, **FILTER_GRID)
    gfcf = next(r for r in rows if r["sharpen_time"] == 0)
    bspm = next(r for r in rows if r["sharpen_time"] > 0)
    _save(os.path.join(out, "tune_filters.json"), {"grid": FILTER_GRID, "valid_users": num_users,
                                                   "seconds": time.time() - t, "gfcf": gfcf, "bspm": bspm,
                                                   "rows": rows})
    for name, r in (("gfcf", gfcf), ("bspm", bspm)):
        print(f"{name}: {r}")


def final_filters(out):
    tuned = _load(os.path.join(out, "tune_filters.json"))
    res = {}
    for name in ("gfcf", "bspm"):
        p = tuned[name]
        run_dir = os.path.join(out, "runs", name)
        args = ["--dataset", "gowalla", "--model", name, "--filter_rank", str(p["rank"]),
                "--ideal_weight", str(p["ideal_weight"]), "--sharpen_time", str(p["sharpen_time"]),
                "--sharpen_steps", str(p["sharpen_steps"]), "--sharpen_solver", p["sharpen_solver"],
                "--num_threads", "2", "--out", run_dir]
        wall = _run(args, os.path.join(out, f"{name}.log"))
        m = _load(os.path.join(run_dir, "metrics.json"))
        res[name] = {"args": args, "wall_s": wall, "fit_s": m["fit_time_s"], "eval_s": m["eval_time_s"],
                     "test": {k: m["test"][k] for k in ("recall@20", "ndcg@20")}}
        print(name, res[name])
    _save(os.path.join(out, "final_filters.json"), res)


def tune_trained(out, budget, only=None):
    path = os.path.join(out, "tune_trained.json")
    res = {}
    if only and os.path.exists(path):   # --only adds to earlier runs (each keeps the budget it ran at)
        old = _load(path)
        res = {n: dict(r, budget_min=r.get("budget_min", old["budget_min"])) for n, r in old["runs"].items()}
    for name, flags in TRAINED.items():
        if name == "lightgcn-bpr" or (only and name not in only):
            continue   # the untuned baseline: run as a new user would, never chosen
        run_dir = os.path.join(out, "runs", f"tune-{name}")
        args = [*COMMON, *flags, "--valid_fraction", "0.1", "--time_budget", str(budget), "--out", run_dir]
        _run(args, os.path.join(out, f"tune-{name}.log"))
        m = _load(os.path.join(run_dir, "metrics.json"))
        res[name] = {"flags": flags, "budget_min": budget,
                     "valid": {k: m["valid"][k] for k in ("recall@20", "ndcg@20")},
                     "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                     "curve": [{k: r[k] for k in ("epoch", "elapsed_s", "valid/recall@20", "valid/ndcg@20") if k in r}
                               for r in m["history"]]}
        print(name, res[name]["valid"], "epochs", m["epochs_run"])
    # Recipes compete at the same budget: the best validation ndcg@20 among this call's budget.
    same = [n for n in res if res[n]["budget_min"] == budget]
    best = max(same, key=lambda n: res[n]["valid"]["ndcg@20"])
    _save(os.path.join(out, "tune_trained.json"), {"budget_min": budget, "runs": res, "chosen": best})


def final_trained(out, baseline_budget, only=None):
    tuned = _load(os.path.join(out, "tune_trained.json"))
    path = os.path.join(out, "final_trained.json")
    res = _load(path) if only and os.path.exists(path) else {}   # --only adds to earlier runs
    chosen = tuned["runs"][tuned["chosen"]]
    for name, minutes in ((tuned["chosen"], tuned["budget_min"]), ("lightgcn-bpr", baseline_budget)):
        if only and name not in only:
            continue
        run_dir = os.path.join(out, "runs", name)
        # The training length is validation's: the tuning budget, or the best validation epoch when
        # the recipe peaked before its budget ran out. With no validation set on the full train the
        # last epoch is the model (no selection on test).
        # A cosine recipe's length is its schedule: the final fit keeps its --epochs.
        epochs = ["--epochs", str(chosen["best_epoch"])] if (
            name == tuned["chosen"] and chosen["best_epoch"] < chosen["epochs_run"]
            and "cosine" not in TRAINED[name]) else []
        args = [*COMMON, *TRAINED[name], *epochs, "--time_budget", str(minutes), "--trace_test", "--eval_every", "2",
                "--out", run_dir]
        wall = _run(args, os.path.join(out, f"{name}.log"))
        m = _load(os.path.join(run_dir, "metrics.json"))
        res[name] = {"args": args, "wall_s": wall, "test": {k: m["test"][k] for k in ("recall@20", "ndcg@20")},
                     "epochs_run": m["epochs_run"],
                     "curve": [{k: r[k] for k in ("epoch", "elapsed_s", "test/recall@20", "test/ndcg@20") if k in r}
                               for r in m["history"]]}
        print(name, res[name]["test"], "epochs", m["epochs_run"])
    _save(path, res)


def eval_speed(out):
    """Full-ranking evaluation of every Gowalla test user against every item (training items masked,
    cut-offs 10/20/50, the per-context breakdown) for a d=64 embedding model, timed."""
    import torch

    import glrec_fast as gl
    from glrec_fast import metrics
    torch.set_num_threads(2)
    ds = gl.load_dataset("gowalla")
    g = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    gen = torch.Generator().manual_seed(0)
    scorer = metrics.EmbeddingScorer(torch.randn(ds.num_users, 64, generator=gen),
                                     torch.randn(ds.num_items, 64, generator=gen))
    times = []
    for _ in range(3):
        t = time.time()
        m = metrics.evaluate(scorer, ds.test, ds.num_users, ds.num_items, exclude=[ds.train], ks=(10, 20, 50),
                             item_context=g.item_context)
        times.append(time.time() - t)
    res = {"users": m["n_users"], "items": ds.num_items, "seconds": sorted(times)[1], "all_runs_s": times}
    _save(os.path.join(out, "eval_speed.json"), res)
    print(res)


_RECOMMEND_PROBE = """
import json, resource, sys, time, torch
import glrec_fast as gl
from glrec_fast import train
torch.set_num_threads(2)
ck = train.load_export(sys.argv[1])
users = list(ck["user_ids"])
del ck
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
top = gl.recommend(sys.argv[1], users, 20)
sec = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"users": len(top), "k": len(top[0]), "seconds": sec, "peak_rss_mb": peak / 1024,
                  "rss_before_mb": base / 1024}))
"""


def recommend_speed(out):
    """``glrec_fast.recommend(best.pt, every user, 20)`` on the final Gowalla checkpoints: wall time
    (checkpoint load included) and the process's peak resident memory, one fresh process each."""
    res = {}
    for name in ("lightgcn-bpr", "gfcf"):
        path = os.path.join(out, "runs", name, "best.pt")
        if not os.path.exists(path):
            raise SystemExit(f"recommend_speed: {path} missing; run --stage final_trained / final_filters first")
        proc = subprocess.run([PY, "-c", _RECOMMEND_PROBE, path], capture_output=True, text=True, check=True)
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, res[name])
    _save(os.path.join(out, "recommend_speed.json"), res)


def report(out):
    rows = []
    ff = _load(os.path.join(out, "final_filters.json")) if os.path.exists(os.path.join(out, "final_filters.json")) else {}
    ft = _load(os.path.join(out, "final_trained.json")) if os.path.exists(os.path.join(out, "final_trained.json")) else {}
    for name, r in ff.items():
        rows.append((f"{name} (fit once; tuned on validation)", r["test"]["recall@20"], r["test"]["ndcg@20"],
                     f"{r['fit_s']:.0f} s fit, {r['wall_s']:.0f} s with data load and full valid+test ranking"))
    for name, r in ft.items():
        c = r["curve"]
        how = "untuned baseline, as a new user runs it" if name == "lightgcn-bpr" else "recipe chosen on validation"
        rows.append((f"{name} ({how})", r["test"]["recall@20"], r["test"]["ndcg@20"],
                     f"{c[-1]['elapsed_s'] / 60:.1f} min training, {r['epochs_run']} epochs"))
    lines = ["| route | test recall@20 | test ndcg@20 | time |", "|---|---|---|---|"]
    lines += [f"| {a} | {b:.4f} | {c:.4f} | {d} |" for a, b, c, d in rows]
    lines += [f"| {a} | {b:.4f} | {c:.4f} | published |" for a, b, c in ANCHORS]
    # Time to reach fixed quality levels: the trained curves, and the filters' whole wall time.
    for metric, levels in (("recall@20", (0.14, 0.15, 0.16, 0.17, 0.175, 0.183, 0.19)),
                           ("ndcg@20", (0.12, 0.13, 0.14, 0.145, 0.15, 0.1554, 0.16))):
        lines += ["", f"| time to test {metric} >= | " + " | ".join(str(x) for x in levels) + " |",
                  "|---" * (len(levels) + 1) + "|"]
        for name, r in ft.items():
            cells = []
            for level in levels:
                hit = next((p for p in r["curve"] if p.get(f"test/{metric}", 0) >= level), None)
                cells.append("%.1f min" % (hit["elapsed_s"] / 60) if hit else "not in budget")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for name, r in ff.items():
            lines.append(f"| {name} | " + " | ".join("%.1f min" % (r["wall_s"] / 60) if r["test"][metric] >= level
                                                      else "never" for level in levels) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib unavailable ({e!r})")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in ft.items():
        xs = [p["elapsed_s"] / 60 for p in r["curve"] if "test/recall@20" in p]
        ys = [p["test/recall@20"] for p in r["curve"] if "test/recall@20" in p]
        ax.plot(xs, ys, marker=".", label=name)
    for name, r in ff.items():
        ax.scatter([r["wall_s"] / 60], [r["test"]["recall@20"]], marker="*", s=150, label=f"{name} (fit + eval)")
    for label, rec, _ in ANCHORS:
        ax.axhline(rec, ls=":", lw=0.8, color="grey")
        ax.text(0.2, rec + 0.0008, label.split(" (")[0], fontsize=7, color="grey")
    ax.set_xlabel("wall time on this machine (minutes)")
    ax.set_ylabel("Gowalla test recall@20")
    ax.set_title("Gowalla, 2-core CPU, tuned on validation", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "time_to_quality.png")
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True,
                    choices=["tune_filters", "final_filters", "tune_trained", "final_trained", "report", "eval_speed",
                             "recommend_speed", "all"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "time_to_quality"))
    ap.add_argument("--tune_users", type=int, default=3000, help="validation users scored per filter setting")
    ap.add_argument("--tune_budget", type=float, default=5.0, help="minutes per trained recipe on validation")
    ap.add_argument("--only", nargs="+", default=None,
                    help="tune_trained / final_trained: run only these recipes, keep the others' results")
    ap.add_argument("--baseline_budget", type=float, default=10.0, help="minutes for the BPR LightGCN baseline")
    a = ap.parse_args()
    stages = ["tune_filters", "final_filters", "tune_trained", "final_trained", "report"] if a.stage == "all" else [a.stage]
    for st in stages:
        if st == "tune_filters":
            tune_filters(a.out, a.tune_users)
        elif st == "final_filters":
            final_filters(a.out)
        elif st == "tune_trained":
            tune_trained(a.out, a.tune_budget, a.only)
        elif st == "eval_speed":
            eval_speed(a.out)
        elif st == "recommend_speed":
            recommend_speed(a.out)
        elif st == "final_trained":
            final_trained(a.out, a.baseline_budget, a.only)
        else:
            report(a.out)


if __name__ == "__main__":
    main()
